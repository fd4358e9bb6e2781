"""The `memedit` command line: help texts, a small end-to-end run, resumable statistics,
and the demo on the real face weights with small settings."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import memedit
import peers
import ports
from memedit import _io, covariance, fold_programs, generators as gens, specs
from memedit.generators import edit as gens_edit
from memedit.cli import main
from memedit.tree import get_leaf
from ports.dcgan import variables_from_state_dict
from ports.dcgan.convert import expected_shapes

SUBCOMMANDS = {
    "convert": "Convert a PyTorch generator (or GPT-2) checkpoint",
    "stats": "resumes where it stopped",
    "rewrite": "Apply an edit spec",
    "sample": "original and the edited model",
    "evaluate": "Measure an edit on held-out latents",
    "demo": "MIT licence",
    "log": "Show an edit log",
    "ui": "rewrite it interactively",
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
  gen = gens.generator_from_converted(model)
  module, variables, config = ports.load_converted(tmp / "edited")
  assert config["edits"][0]["name"] == edit.name
  want, _ = memedit.apply_edit(gen.params, edit)
  np.testing.assert_array_equal(np.asarray(get_leaf(variables, edit.path)),
                                np.asarray(get_leaf(want, edit.path)))
  assert main(["sample", model, "--edit", str(tmp / "e.edit"), "--images", "100-105",
               "--columns", "3", "--out", str(tmp / "s.png")]) == 0
  assert capsys.readouterr().err == ""
  img = np.asarray(Image.open(tmp / "s.png"))
  assert img.ndim == 3 and img.shape[2] == 3 and img.shape[1] > img.shape[0]
  # The edit records the kernel it was made on: applied to another (here the edited
  # checkpoint) it still runs, with a one-line warning.
  assert edit.settings["base_kernel"] == gens.kernel_digest(gen.params, edit.path)
  assert main(["sample", str(tmp / "edited"), "--edit", str(tmp / "e.edit"), "--images", "100",
               "--out", str(tmp / "s2.png")]) == 0
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith(
      f"memedit sample: warning: --edit {tmp / 'e.edit'}: the edit was made on a model whose "
      "kernel at params/convt2/kernel differs from this model's")
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
  assert err.startswith(f"memedit rewrite: error: {bad}: layer: expected one of")
  assert "\n" not in err
  assert not os.path.exists(tmp_path / "x")


def _one_line_error(capsys, command):
  err = capsys.readouterr().err
  assert err.startswith(f"memedit {command}: error: ") and err.count("\n") == 1, err
  return err


def test_outputs_and_inputs_are_checked_before_any_work(tiny, tmp_path, capsys, monkeypatch):
  _, model, spec = tiny
  a_file = tmp_path / "a-file"
  a_file.write_text("not a folder")
  folder = tmp_path / "folder"
  folder.mkdir()
  stats = ["--samples", "64", "--batch-size", "16", "--no-progress", "--cache-dir",
           str(tmp_path / "c")]
  edit = _nan_edit(model, tmp_path / "unused.edit", nan=False)
  cases = [
      (["convert", spec, str(a_file / "out")], "OUT: expected a path inside folders, got "
       f"'{a_file / 'out'}', whose parent '{a_file}' is a file"),
      (["convert", str(tmp_path / "missing.pt"), str(tmp_path / "o")],
       "SRC: expected a file, got"),
      (["convert", str(folder), str(tmp_path / "o")], "SRC: expected a checkpoint file, or a "
       f"Hugging Face GPT-2 folder (config.json and its weights), got the folder '{folder}', "
       "which holds no config.json"),
      (["rewrite", model, spec, "--out", str(a_file / "e"), *stats],
       "--out: expected a path inside folders"),
      (["rewrite", model, spec, "--out", str(tmp_path / "e"), "--save-model",
        str(a_file / "m"), *stats], "--save-model: expected a path inside folders"),
      (["sample", model, "--edit", edit, "--out", str(folder)],
       f"--out: expected a file to write, got the folder '{folder}'"),
      (["sample", model, "--edit", edit, "--out", str(a_file / "s.png")],
       "--out: expected a path inside folders"),
      (["evaluate", model, spec, "--edit", edit, "--out", str(a_file / "m.json")],
       "--out: expected a path inside folders"),
  ]
  for argv, message in cases:
    assert main(argv) == 1, argv
    assert message in _one_line_error(capsys, argv[0])
  assert sorted(os.listdir(tmp_path)) == ["a-file", "folder", "unused.edit"]
  # Permissions (checked with os.access, which a test cannot make fail as root).
  real_access = os.access
  locked = {str(tmp_path / "locked"), spec}
  monkeypatch.setattr(os, "access", lambda p, mode, **kw: (
      os.fspath(p) not in locked and real_access(p, mode, **kw)))
  (tmp_path / "locked").mkdir()
  assert main(["convert", str(a_file), str(tmp_path / "locked" / "out")]) == 1
  assert f"the folder '{tmp_path / 'locked'}' is not writable" in _one_line_error(capsys,
                                                                                  "convert")
  assert main(["convert", spec, str(tmp_path / "out")]) == 1
  assert f"SRC: expected a file you may read, got '{spec}': permission denied" in (
      _one_line_error(capsys, "convert"))
  monkeypatch.undo()
  # An OS error met later still gives one line, naming the file.
  import ports

  def denied(path):
    raise PermissionError(13, "Permission denied", os.fspath(path))

  monkeypatch.setattr(ports, "detect_format", denied)
  assert main(["convert", str(a_file), str(tmp_path / "out")]) == 1
  assert f"{a_file}: Permission denied" in _one_line_error(capsys, "convert")


def test_file_outputs_never_replace_inputs_or_other_files(tiny, tmp_path, capsys,
                                                         monkeypatch):
  tmp, model, spec = tiny
  edit = _nan_edit(model, tmp_path / "e.edit", nan=False)
  notes = tmp_path / "notes.txt"
  notes.write_text("keep me")
  before = {p: open(p, "rb").read() for p in (os.path.join(model, "meta.json"),
                                               os.path.join(edit, "meta.json"), spec, notes)}
  sample = ["sample", model, "--edit", edit, "--images", "0-3", "--out"]
  cases = [
      ([*sample, os.path.join(model, "meta.json")],
       f"--out: expected an output file apart from the inputs, got "
       f"'{os.path.join(model, 'meta.json')}', which lies inside the input '{model}'"),
      ([*sample, os.path.join(edit, "meta.json")], "lies inside the input"),
      ([*sample, model], "--out: expected a file to write, got the folder"),
      ([*sample, str(notes)], f"--out: expected a new file or a PNG image to replace, got "
       f"'{notes}', an existing file of 7 bytes that is not one; refusing to replace it"),
      (["evaluate", model, spec, "--edit", edit, "--out", spec],
       f"--out: expected an output file apart from the inputs, got '{spec}', which is the "
       f"input '{spec}'"),
      (["evaluate", model, spec, "--edit", edit, "--out", str(notes)],
       "an earlier `memedit evaluate` JSON report"),
  ]
  # Refused before any work: opening the model would fail.
  monkeypatch.setattr(gens, "generator_from_converted", lambda *a, **k: 1 / 0)
  for argv, message in cases:
    assert main(argv) == 1, argv
    assert message in _one_line_error(capsys, argv[0])
  monkeypatch.undo()
  assert before == {p: open(p, "rb").read() for p in before}
  # An existing PNG (or empty file) is replaced.
  png = tmp_path / "s.png"
  png.write_bytes(b"")
  assert main([*sample, str(png)]) == 0
  assert main([*sample, str(png)]) == 0
  assert Image.open(png).size[0] > 0
  capsys.readouterr()


def test_unwritable_outputs_name_the_users_path(tiny, tmp_path, capsys, monkeypatch):
  tmp, model, spec = tiny
  edit = _nan_edit(model, tmp_path / "e.edit", nan=False)
  from memedit.cli import checks

  # A folder that refuses new entries although os.access allows them (as /proc does).
  def refusing(path, flags, mode=0o777, **kw):
    if os.path.dirname(os.fspath(path)) == str(tmp_path / "ro"):
      raise FileNotFoundError(2, "No such file or directory", os.fspath(path))
    return real_open(path, flags, mode, **kw)

  (tmp_path / "ro").mkdir()
  real_open = os.open
  monkeypatch.setattr(checks.os, "open", refusing)
  ro = tmp_path / "ro"
  for argv, flag, out in (
      (["rewrite", model, spec, "--out", str(ro / "e2"), "--no-progress"], "--out", ro / "e2"),
      (["sample", model, "--edit", edit, "--out", str(ro / "p.png")], "--out", ro / "p.png"),
      (["convert", spec, str(ro / "x" / "y")], "OUT", ro / "x" / "y"),
      (["evaluate", model, spec, "--edit", edit, "--out", str(ro / "m.json")], "--out",
       ro / "m.json")):
    assert main(argv) == 1, argv
    err = _one_line_error(capsys, argv[0])
    assert (f"{flag}: expected a place you may write to, got '{out}': cannot write in the "
            f"folder '{ro}' (No such file or directory)") in err, err
  monkeypatch.undo()
  # An OS error met while writing names the user's path, not the temporary sibling.
  if os.path.isdir("/proc") and os.name == "posix":
    assert main(["sample", model, "--edit", edit, "--out", "/proc/p.png"]) == 1
    err = _one_line_error(capsys, "sample")
    assert "got '/proc/p.png'" in err and ".tmp-" not in err, err

  def failing(path, data):
    raise FileNotFoundError(2, "No such file or directory",
                            os.path.join(os.path.dirname(os.path.abspath(path)),
                                         ".tmp-m.json-ad75ef90"))

  monkeypatch.setattr(_io, "atomic_write_bytes", failing)
  out = tmp_path / "m.json"
  assert main(["evaluate", model, spec, "--edit", edit, "--images", "100-103",
               "--out", str(out)]) == 1
  err = _one_line_error(capsys, "evaluate")
  assert (f"--out: expected a place you may write to, got '{out}': cannot write there (No "
          "such file or directory)") in err and ".tmp-" not in err, err


def test_counts_are_bounded_and_their_limits_documented(tiny, tmp_path, capsys):
  _, model, spec = tiny
  edit = _nan_edit(model, tmp_path / "e.edit", nan=False)
  with pytest.raises(SystemExit) as info:
    main(["stats", model, "--layer", "convt2", "--samples", "1e12"])
  assert info.value.code == 2
  assert "argument --samples: invalid int value: '1e12'" in _one_line_error(capsys, "stats")
  cases = [
      (["stats", model, "--layer", "convt2", "--samples", str(10 ** 12)],
       "--samples: expected an integer in [1, 100000], got 1000000000000"),
      (["stats", model, "--layer", "convt2", "--batch-size", "0"],
       "--batch-size: expected an integer in [1, 4096], got 0"),
      (["rewrite", model, spec, "--out", str(tmp_path / "x"), "--steps", "1000000000"],
       "--steps: expected an integer in [1, 100000], got 1000000000"),
      (["sample", model, "--edit", edit, "--images", "0-300000000", "--out",
        str(tmp_path / "s.png")], "--images: expected image numbers in [0, 100000)"),
      (["sample", model, "--edit", edit, "--images", "0-99", "--out", str(tmp_path / "s.png")],
       "--images: expected at most 64 images, got 100"),
      (["sample", model, "--edit", edit, "--columns", "0", "--out", str(tmp_path / "s.png")],
       "--columns: expected an integer in [1, 64], got 0"),
      (["sample", model, "--edit", edit, "--truncation", "nan", "--out",
        str(tmp_path / "s.png")], "--truncation: expected a finite number, got nan"),
      (["evaluate", model, spec, "--edit", edit, "--images", "100-5000"],
       "--images: expected at most 4096 images, got 4901"),
      (["evaluate", model, spec, "--edit", edit, "--quantile", "1.5"],
       "--quantile: expected a number in (0, 1), got 1.5"),
  ]
  for argv, message in cases:
    assert main(argv) == 1, argv
    assert message in _one_line_error(capsys, argv[0])
  assert sorted(os.listdir(tmp_path)) == ["e.edit"]
  for command, limit in (("stats", "1 to 100000"), ("rewrite", "1 to 100000"),
                         ("sample", "at most 64"), ("evaluate", "at most 4096"),
                         ("demo", "1 to 100000")):
    with pytest.raises(SystemExit):
      main([command, "--help"])
    assert limit in " ".join(capsys.readouterr().out.split())


def _nan_edit(model, path, *, nan=True):
  """An edit of convt2 (Λ NaN when ``nan``), saved at ``path``; returns the path."""
  gen = gens.generator_from_converted(model)
  kernel = gens.layer_kernel(gen, "convt2")
  lam = np.full(kernel.shape[:2] + kernel.shape[3:] + (1,), 0.01, np.float32)
  D = np.eye(1, kernel.shape[2], dtype=np.float32)
  edit = memedit.make_edit(gen.weight_path("convt2"), lam, D, kind="conv")
  if nan:  # as a file written elsewhere could hold: make_edit itself refuses NaN factors
    edit = dataclasses.replace(edit, lam=np.full(lam.shape, np.nan, np.float32))
  return memedit.save_edit(path, edit)


def test_non_finite_models_and_edits_are_errors(tiny, tmp_path, capsys, monkeypatch):
  _, model, spec = tiny
  png = tmp_path / "s.png"
  # A NaN edit and a NaN model draw no PNG.
  nan_edit = _nan_edit(model, tmp_path / "nan.edit")
  assert main(["sample", model, "--edit", nan_edit, "--images", "100-101",
               "--out", str(png)]) == 1
  assert "expected an edit with finite values, got 128 NaN or infinite of the 128 values of Λ" in (
      _one_line_error(capsys, "sample"))
  variables, config = _io.load_tree(model)
  variables["params"]["convt3"]["kernel"][0, 0, 0, 0] = np.nan
  nan_model = _io.save_tree(tmp_path / "nan-model", variables, config, kind="converted")
  edit = _nan_edit(model, tmp_path / "ok.edit", nan=False)
  assert main(["sample", nan_model, "--edit", edit, "--images", "100-101",
               "--out", str(png)]) == 1
  assert "expected finite images, got" in _one_line_error(capsys, "sample")
  assert not png.exists()
  assert main(["evaluate", nan_model, spec, "--edit", edit, "--images", "100-103", "--out",
               str(tmp_path / "m.json")]) == 1
  assert "images: expected finite images from the original generator" in (
      _one_line_error(capsys, "evaluate"))
  assert not (tmp_path / "m.json").exists()
  with pytest.raises(ValueError, match="images: expected finite values, got 4 NaN or "
                     "infinite of 12"):
    gens.comparison_grid(np.zeros((1, 2, 2, 3)), np.array([[[[np.nan, 0, 0]] * 2] * 2]))
  with pytest.raises(ValueError, match="expected uint8 pixel values"):
    gens.save_png(png, np.full((2, 2, 3), np.nan))
  assert not png.exists()
  # A spec whose learning rate is infinite is refused; a solve that diverges saves nothing.
  stats = ["--samples", "64", "--batch-size", "16", "--no-progress", "--cache-dir",
           str(tmp_path / "c")]
  data = json.load(open(spec))
  data["solver"]["learning_rate"] = float("inf")
  inf_spec = tmp_path / "inf.json"
  inf_spec.write_text(json.dumps(data))  # JSON "Infinity"
  assert main(["rewrite", model, str(inf_spec), "--out", str(tmp_path / "e1"), *stats]) == 1
  assert "solver.learning_rate: expected a finite positive number, got inf" in (
      _one_line_error(capsys, "rewrite"))
  real_solve = gens_edit.solve_lambda

  def diverging(*args, **kwargs):
    res = real_solve(*args, **kwargs)
    return res._replace(lam=res.lam * np.nan)

  monkeypatch.setattr(gens_edit, "solve_lambda", diverging)
  assert main(["rewrite", model, spec, "--out", str(tmp_path / "e2"), *stats]) == 1
  assert "Λ: expected finite values from the adam solve" in _one_line_error(capsys, "rewrite")
  assert not (tmp_path / "e1").exists() and not (tmp_path / "e2").exists()


def test_damaged_converted_model_and_spec_files(tiny, tmp_path, capsys):
  _, model, spec = tiny
  damaged = tmp_path / "damaged"
  shutil.copytree(model, damaged)
  meta = damaged / "meta.json"
  config = json.load(open(meta))
  del config["z_dim"]
  meta.write_text(json.dumps(config))
  os.remove(damaged / _io.MARKER_FILE)  # as written before outputs carried checksums
  edit = _nan_edit(model, tmp_path / "e.edit", nan=False)
  assert main(["sample", str(damaged), "--edit", edit, "--out", str(tmp_path / "s.png")]) == 1
  assert "meta.json: z_dim: expected a positive integer, got nothing (the field is missing)" in (
      _one_line_error(capsys, "sample"))
  stats = ["--samples", "64", "--batch-size", "16", "--no-progress", "--cache-dir",
           str(tmp_path / "c")]
  text = open(spec).read()
  bad = tmp_path / "bad.json"
  cases = [
      (text.replace('"layer": "convt2"', '"layer": "convt\\u00e92"').encode().replace(
          b"\\u00e9", b"\xe9"), f"{bad}: expected UTF-8 text, got the byte 0xe9 at offset"),
      (text.replace('"canvas": 64', '"canvas": "64"').encode(),
       f"{bad}: canvas: expected 64 (the model's resolution), got the str '64'"),
      (text.replace('"rank": 1', '"rank": 1, "shrinkge": 0.2').encode(),
       "got unknown field ['shrinkge'] (did you mean 'shrinkage' for 'shrinkge'?)"),
      (b'{"key": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
       f"{bad}: expected a JSON edit spec, got lists or objects nested deeper"),
  ]
  for raw, message in cases:
    bad.write_bytes(raw)
    assert main(["rewrite", model, str(bad), "--out", str(tmp_path / "x"), *stats]) == 1
    assert message in _one_line_error(capsys, "rewrite")
  assert not (tmp_path / "x").exists()


def test_interrupted_stats_resumes_without_recomputing(tiny, tmp_path, monkeypatch):
  _, model, _ = tiny
  args = ["stats", model, "--layer", "convt3", "--samples", "64", "--batch-size", "8",
          "--no-progress"]
  folded = []
  make = fold_programs.make_group_fn

  def counting_make(*key):
    fn = make(*key)

    def run(state, params, batches, valid):
      folded.append(int(np.asarray(valid).any(axis=1).sum()))
      return fn(state, params, batches, valid)
    return run

  monkeypatch.setattr(fold_programs, "make_group_fn", counting_make)
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
  gen = gens.generator_from_converted(model)
  (key,) = os.listdir(tmp_path / "ref")
  assert os.listdir(tmp_path / "run") == [key]  # the same content-hash key
  ref, _ = _io.load_tree(tmp_path / "ref" / key)
  got, meta = _io.load_tree(tmp_path / "run" / key)
  assert meta["complete"] and meta["batches"] == 8
  C_ref = memedit.second_moment(covariance.CovarianceState(**ref))
  C_got = memedit.second_moment(covariance.CovarianceState(**got))
  np.testing.assert_allclose(np.asarray(C_got), np.asarray(C_ref), rtol=1e-5, atol=1e-6)


def test_demo_on_the_real_weights_small(tmp_path, capsys):
  _, weights = peers.gan_face_generate()
  out = tmp_path / "out"
  # Small settings: the run is mostly compilation. 10 solver steps already lower both paste
  # losses; 8 held-out latents run in the batch shape the spec's images compiled, and 4
  # of them are pictured.
  assert main(["demo", "--weights", str(weights), "--work", str(tmp_path / "work"),
               "--out", str(out), "--samples", "100", "--held-out", "8", "--pictured", "4",
               "--steps", "10", "--overfit-steps", "10", "--stylegan2-held-out", "8",
               "--no-progress"]) == 0
  # The shipped StyleGAN2, edited by the same workflow at a modulated convolution.
  sg2 = json.load(open(out / "demo-stylegan2.json"))
  assert sg2["model"]["architecture"] == "stylegan2" and sg2["model"]["licence"] == "MIT"
  assert sg2["spec"]["layer"] == "conv_3" and sg2["num_held_out"] == 8
  # The up-sampling modulated convolution blurs: its own tap is the one most centred.
  assert sg2["spec"]["taps"] == "own"
  assert sg2["paste_l1"]["memedit"][1] < sg2["paste_l1"]["memedit"][0]
  assert np.asarray(Image.open(out / "demo-stylegan2.png")).shape[1] > 4 * 64
  report = json.load(open(out / "demo.json"))
  assert report["model"]["licence"] == "MIT" and report["spec"]["layer"] == "convt2"
  assert report["held_out_imgnums"] == [6000, 6007] and report["num_held_out"] == 8
  assert not set(range(6000, 6008)) & set(report["spec"]["imgnums_used"])
  assert set(report["by_quantile"]) == set(report["goals"]) == {"0.999", "0.99"}
  # The bundled spec edits the own taps; the same spec with all taps is measured beside it.
  assert report["spec"]["taps"] == "own"
  assert report["taps_comparison"] == {"edit": "memedit_taps_all", "taps": "all"}
  for q, at in report["by_quantile"].items():
    assert set(at) == {"memedit", "memedit_taps_all", "overfit"}
    m, o = at["memedit"], at["overfit"]
    assert m["num_latents"] == 8 and m["quantile"] == float(q)
    assert m["threshold"] == o["threshold"] == at["memedit_taps_all"]["threshold"]
    assert report["goals"][q]["specificity_ratio_at_least_5"] == (
        m["specificity"]["ratio"] >= 5)
  sweep = {s["quantile"]: s["ratio"] for s in report["specificity_by_quantile"]}
  assert sweep[0.99] == report["by_quantile"]["0.99"]["memedit"]["specificity"]["ratio"]
  assert report["paste_l1"]["memedit"][1] < report["paste_l1"]["memedit"][0]
  img = np.asarray(Image.open(out / "demo.png"))
  assert img.shape[0] > 64 and img.shape[1] > 4 * 64
  # Pictured: the held-out images whose keys match the edit's D best, from the layer's
  # scores computed here again.
  gen = gens.generator_from_converted(tmp_path / "work" / "faces-dcgan")
  held = list(range(6000, 6008))
  scores = gens.layer_scores(gen, "convt2", memedit.load_edit(out / "demo.edit").D, held)
  best = scores.reshape(len(held), -1).max(-1)
  assert report["pictured_imgnums"] == [held[i] for i in np.argsort(-best, kind="stable")[:4]]
  assert "wrote" in capsys.readouterr().out
  # A held-out count that measures nothing is refused before any work.
  assert main(["demo", "--weights", str(weights), "--out", str(out), "--held-out", "0"]) == 1
  assert "expected a positive count" in capsys.readouterr().err


def test_repeated_image_numbers_are_refused(tiny, tmp_path, capsys):
  _, model, spec = tiny
  edit = _nan_edit(model, tmp_path / "e.edit", nan=False)
  for argv in (["evaluate", model, spec, "--edit", edit, "--images", "100-103,102,100"],
               ["sample", model, "--edit", edit, "--images", "7,7", "--out",
                str(tmp_path / "s.png")]):
    assert main(argv) == 1, argv
    err = _one_line_error(capsys, argv[0])
    assert "--images: expected distinct image numbers, got [" in err, err
    assert ("[100, 102] more than once in '100-103,102,100'" in err
            or "[7] more than once in '7,7'" in err), err
  assert sorted(os.listdir(tmp_path)) == ["e.edit"]
