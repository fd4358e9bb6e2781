"""The `memedit` command line: help texts, a small end-to-end run, resumable statistics,
and the demo on the real face weights with small settings."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

import memedit
import peers
import ports
from memedit import _io, covariance, rewrite as rw, specs
from memedit.cli import main
from ports.dcgan import variables_from_state_dict
from ports.dcgan.convert import expected_shapes

SUBCOMMANDS = {
    "convert": "Convert a PyTorch generator checkpoint",
    "stats": "resumes where it stopped",
    "rewrite": "Apply an edit spec",
    "sample": "original and the edited model",
    "evaluate": "Measure an edit on held-out latents",
    "demo": "MIT licence",
}


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_help(command, capsys):
  with pytest.raises(SystemExit) as e:
    main([command, "--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert f"usage: memedit {command}" in out
  assert SUBCOMMANDS[command] in " ".join(out.split())


def _tiny_checkpoint(path):
  rs = np.random.RandomState(0)
  sd = {}
  for name, shape in expected_shapes(100, 4, 3).items():
    if name.endswith("running_var"):
      sd[name] = (1.0 + 0.1 * np.abs(rs.standard_normal(shape))).astype(np.float32)
    elif name.endswith(".weight") and len(shape) == 1:
      sd[name] = (1.0 + 0.1 * rs.standard_normal(shape)).astype(np.float32)
    else:
      sd[name] = (0.2 * rs.standard_normal(shape)).astype(np.float32)
  variables, config = variables_from_state_dict(sd)
  return _io.save_tree(path, variables, config)


def _box(y0, y1, x0, x1):
  m = np.zeros((64, 64), np.uint8)
  m[y0:y1, x0:x1] = 255
  return m


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("cli")
  model = _tiny_checkpoint(tmp / "model")
  spec = specs.make_spec(key=[(1, _box(24, 40, 16, 48)), (2, _box(24, 40, 16, 48))],
                         object=(3, _box(16, 32, 16, 48)), paste=(4, _box(24, 40, 16, 48)),
                         layer="convt2", canvas=64, solver={"steps": 40})
  return tmp, model, specs.save_spec(tmp / "spec.json", spec)


def test_end_to_end(tiny, capsys):
  tmp, model, spec = tiny
  cache = str(tmp / "stats")
  stats = ["--samples", "64", "--batch-size", "16", "--cache-dir", cache, "--no-progress"]
  assert main(["stats", model, "--layer", "convt2", *stats]) == 0
  assert "4096 keys of dim 16" in capsys.readouterr().out
  assert main(["rewrite", model, spec, "--out", str(tmp / "e.edit"),
               "--save-model", str(tmp / "edited"), *stats]) == 0
  assert "edit written" in capsys.readouterr().out
  edit = memedit.load_edit(tmp / "e.edit")
  assert edit.path == ("params", "convt2", "kernel") and edit.rank == 1
  # The edited checkpoint is the original with the edit applied, and loads like any other.
  gen = rw.generator_from_converted(model)
  module, variables, config = ports.load_converted(tmp / "edited")
  assert config["edits"][0]["name"] == edit.name
  want, _ = memedit.apply_edit(gen.variables, edit)
  np.testing.assert_array_equal(np.asarray(memedit.get_leaf(variables, edit.path)),
                                np.asarray(memedit.get_leaf(want, edit.path)))
  assert main(["sample", model, "--edit", str(tmp / "e.edit"), "--images", "100-105",
               "--columns", "3", "--out", str(tmp / "s.png")]) == 0
  img = np.asarray(Image.open(tmp / "s.png"))
  assert img.ndim == 3 and img.shape[2] == 3 and img.shape[1] > img.shape[0]
  assert main(["evaluate", model, spec, "--edit", str(tmp / "e.edit"), "--images", "100-115",
               "--out", str(tmp / "m.json")]) == 0
  m = json.load(open(tmp / "m.json"))
  assert m["num_latents"] == 16 and set(m) >= {"context_match", "specificity", "efficacy"}
  # Held-out images must not be the spec's own.
  assert main(["evaluate", model, spec, "--edit", str(tmp / "e.edit"), "--images", "0-5"]) == 1
  assert "held-out images the spec does not use" in capsys.readouterr().err


def test_bad_input_is_one_line_error(tiny, tmp_path, capsys):
  _, model, spec = tiny
  data = json.load(open(spec))
  data["layer"] = "convt9"
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps(data))
  assert main(["rewrite", model, str(bad), "--out", str(tmp_path / "x"), "--no-progress",
               "--cache-dir", str(tmp_path / "c")]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("memedit rewrite: error: layer: expected one of") and "\n" not in err
  assert not os.path.exists(tmp_path / "x")


def test_interrupted_stats_resumes_without_recomputing(tiny, tmp_path, monkeypatch):
  _, model, _ = tiny
  args = ["stats", model, "--layer", "convt3", "--samples", "64", "--batch-size", "8",
          "--no-progress"]
  folded = []
  make = covariance._make_group_fn

  def counting_make(*key):
    fn = make(*key)

    def run(state, params, batches, valid):
      folded.append(int(np.asarray(valid).any(axis=1).sum()))
      return fn(state, params, batches, valid)
    return run

  monkeypatch.setattr(covariance, "_make_group_fn", counting_make)
  # Reference: an uninterrupted run (8 batches of 8 latents, 4 batches per group).
  assert main(args + ["--cache-dir", str(tmp_path / "ref")]) == 0
  assert sum(folded) == 8
  # Interrupt at the second save: the first group (4 batches) is on disk.
  saves = []
  real_save = _io.save_tree

  def failing_save(path, tree, metadata=None):
    saves.append(path)
    if len(saves) == 2:
      raise KeyboardInterrupt
    return real_save(path, tree, metadata)

  monkeypatch.setattr(_io, "save_tree", failing_save)
  folded.clear()
  with pytest.raises(KeyboardInterrupt):
    main(args + ["--cache-dir", str(tmp_path / "run")])
  assert sum(folded) == 8
  monkeypatch.setattr(_io, "save_tree", real_save)
  folded.clear()
  assert main(args + ["--cache-dir", str(tmp_path / "run")]) == 0
  assert sum(folded) == 4  # only the batches that were not saved
  folded.clear()
  assert main(args + ["--cache-dir", str(tmp_path / "run")]) == 0
  assert sum(folded) == 0  # a finished run is read back
  gen = rw.generator_from_converted(model)
  key = rw.statistics_cache_key(gen, "convt3", 64, 8)
  ref, _ = _io.load_tree(tmp_path / "ref" / key)
  got, meta = _io.load_tree(tmp_path / "run" / key)
  assert meta["complete"] and meta["batches"] == 8
  C_ref = memedit.second_moment(covariance.CovarianceState(**ref))
  C_got = memedit.second_moment(covariance.CovarianceState(**got))
  np.testing.assert_allclose(np.asarray(C_got), np.asarray(C_ref), rtol=1e-5, atol=1e-6)


def test_demo_on_the_real_weights_small(tmp_path, capsys):
  _, weights = peers.gan_face_generate()
  out = tmp_path / "out"
  assert main(["demo", "--weights", str(weights), "--work", str(tmp_path / "work"),
               "--out", str(out), "--samples", "200", "--held-out", "16", "--pictured", "4",
               "--steps", "100", "--overfit-steps", "50", "--no-progress"]) == 0
  report = json.load(open(out / "demo.json"))
  assert report["model"]["licence"] == "MIT" and report["spec"]["layer"] == "convt2"
  assert report["held_out_imgnums"] == [6000, 6015] and report["num_held_out"] == 16
  assert not set(range(6000, 6016)) & set(report["spec"]["imgnums_used"])
  assert set(report["by_quantile"]) == set(report["goals"]) == {"0.999", "0.99"}
  # The bundled spec edits the own taps; the same spec with all taps is measured beside it.
  assert report["spec"]["taps"] == "own"
  assert report["taps_comparison"] == {"edit": "memedit_taps_all", "taps": "all"}
  for q, at in report["by_quantile"].items():
    assert set(at) == {"memedit", "memedit_taps_all", "overfit"}
    m, o = at["memedit"], at["overfit"]
    assert m["num_latents"] == 16 and m["quantile"] == float(q)
    assert m["threshold"] == o["threshold"] == at["memedit_taps_all"]["threshold"]
    assert report["goals"][q]["specificity_ratio_at_least_5"] == (
        m["specificity"]["ratio"] >= 5)
  sweep = {s["quantile"]: s["ratio"] for s in report["specificity_by_quantile"]}
  assert sweep[0.99] == report["by_quantile"]["0.99"]["memedit"]["specificity"]["ratio"]
  assert report["paste_l1"]["memedit"][1] < report["paste_l1"]["memedit"][0]
  img = np.asarray(Image.open(out / "demo.png"))
  assert img.shape[0] > 64 and img.shape[1] > 4 * 64
  assert "wrote" in capsys.readouterr().out
  # A held-out count that measures nothing is refused before any work.
  assert main(["demo", "--weights", str(weights), "--out", str(out), "--held-out", "0"]) == 1
  assert "expected a positive count" in capsys.readouterr().err
