"""The lm-* commands end to end on a tiny world (a few training steps): the cached model,
statistics, saved edits that load back, the evaluation JSON and the tracing PNGs."""

from __future__ import annotations

import argparse
import json

import pytest
from PIL import Image

import memedit
from memedit.lm.cli import add_subcommands
from memedit.lm.train import load_demo

TINY = ["--subjects", "24", "--relations", "2", "--objects", "4", "--embd", "32",
        "--blocks", "2", "--heads", "2", "--steps", "20", "--batch", "8", "--warmup", "4",
        "--warm-subjects", "8", "--warm-steps", "5", "--eval-facts", "40", "--inner", "0"]


def _run(*argv) -> int:
  parser = argparse.ArgumentParser(prog="memedit")
  add_subcommands(parser.add_subparsers(dest="command", required=True))
  args = parser.parse_args([str(a) for a in argv])
  return args.run(args)


def test_lm_commands_end_to_end(tmp_path, capsys):
  cache = tmp_path / "cache"
  assert _run("lm-train", "--cache-dir", cache, *TINY) == 0
  out = capsys.readouterr().out
  assert "lm-train:" in out and "24 subjects x 2 relations" in out
  (folder,) = cache.glob("lm-demo-*")
  info = json.loads((folder / "train.json").read_text())
  assert info["config"]["n_subjects"] == 24 and info["train_seconds"] > 0
  assert _run("lm-train", "--cache-dir", cache, *TINY) == 0  # from the cache
  model = ["--cache-dir", cache, "--model", folder]
  assert _run("lm-stats", *model, "--layer", "0", "--tokens", "2000") == 0
  assert "eigenvalues" in capsys.readouterr().out
  common = ["--tokens", "2000", "--contexts", "1", "--value-steps", "5", "--layers", "0,1"]
  for method, n in (("rome", 1), ("memit", 3), ("ft", 2)):
    out_dir = tmp_path / method
    assert _run("lm-edit", *model, "--method", method, "--cases", n, "--layer", "0",
                "--out", out_dir, *common) == 0
    assert f"lm-edit {method}" in capsys.readouterr().out
    edits = sorted(out_dir.glob("edit-*"))
    assert len(edits) == (2 if method == "memit" else 1)
    loaded = memedit.load_edit(edits[0])
    assert loaded.method == {"rome": "rome", "memit": "memit", "ft": "finetune"}[method]
  # A folder of something else where an edit goes: refused (before any work) unless --force.
  foreign = tmp_path / "foreign"
  (foreign / "edit-0").mkdir(parents=True)
  (foreign / "edit-0" / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match="got a folder that is not a memedit output; pass "
                                       "--force to replace it"):
    _run("lm-edit", *model, "--layer", "0", "--out", foreign, *common)
  assert (foreign / "edit-0" / "notes.txt").read_text() == "mine"
  assert _run("lm-edit", *model, "--layer", "0", "--out", foreign, "--force", *common) == 0
  capsys.readouterr()
  assert memedit.load_edit(foreign / "edit-0").method == "rome"
  _, _, world, _ = load_demo(folder)
  rel = world.relations[0]
  old = world.object_of(0, 0)
  new = next(o for o in rel.objects if o != old)
  facts = tmp_path / "facts.csv"
  facts.write_text("subject,prompt,target_new,target_true\n"
                   f"{world.subjects[0]},{rel.train_templates[0]},{new},{old}\n")
  assert _run("lm-edit", *model, "--method", "rome", "--facts", facts, "--layer", "0",
              "--out", tmp_path / "from-file", *common) == 0
  out = capsys.readouterr().out
  text = rel.train_templates[0].format(world.subjects[0])
  assert f"lm-edit rome: 1 fact(s), e.g. '{text}' {old} -> {new}; efficacy" in out
  assert len(list((tmp_path / "from-file").glob("edit-*"))) == 1
  bad = tmp_path / "bad.json"
  bad.write_text('[{"subject": "x", "prompt": "no placeholder", "target_new": "y"}]')
  with pytest.raises(ValueError, match="fact 0: prompt: expected a template with exactly one"):
    _run("lm-edit", *model, "--facts", bad, "--out", tmp_path / "y", *common)
  result = tmp_path / "eval.json"
  # One single edit and MEMIT batches of 3 and 4 reuse the value searches compiled above
  # (ROME: one fact; MEMIT: 3 facts, in a chunk of 4), which dominate the cost.
  assert _run("lm-eval", *model, "--layer", "0", "--single", "1", "--batches", "3,4",
              "--facts", "30", "--out", result, *common) == 0
  table = capsys.readouterr().out
  assert "| ROME | 1 |" in table and "| MEMIT | 3 |" in table and "| FT | 3 |" in table
  rows = json.loads(result.read_text())["rows"]
  assert [r["method"] for r in rows] == ["none", "ROME", "FT", "MEMIT", "FT", "MEMIT", "FT"]
  assert _run("lm-trace", *model, "--facts", "2", "--samples", "2", "--out",
              tmp_path / "trace") == 0
  for name in ("trace_hidden.png", "trace_hidden_average.png"):
    assert Image.open(tmp_path / "trace" / name).format == "PNG"
  with pytest.raises(SystemExit):
    _run("lm-edit", *model, "--method", "nope", "--out", tmp_path / "x")
  with pytest.raises(ValueError, match="--layer: expected a block in \\[0, 2\\)"):
    _run("lm-stats", *model, "--layer", "5")


def test_lm_train_sets_the_mlp_width():
  from memedit.lm.cli import _config
  from memedit.lm.train import DemoConfig

  parser = argparse.ArgumentParser(prog="memedit")
  add_subcommands(parser.add_subparsers(dest="command", required=True))
  assert _config(parser.parse_args(["lm-train", *TINY, "--inner", "48"])).n_inner == 48
  assert _config(parser.parse_args(["lm-train", *TINY])).n_inner == 0
  assert _config(parser.parse_args(["lm-train"])).n_inner == DemoConfig().n_inner == 1024
  assert DemoConfig(n_inner=48).model_config(10).n_inner == 48
  assert DemoConfig(n_inner=0).model_config(10).n_inner is None  # 4 n_embd
  assert _config(parser.parse_args(["lm-demo"])) == DemoConfig()
  with pytest.raises(ValueError, match=r"n_inner: expected 0 \(4 n_embd\) or a positive MLP "
                                       r"width, got -1"):
    DemoConfig(n_inner=-1)


def test_edit_commands_default_to_the_demo_settings():
  from memedit.lm.train import DEMO_MEMIT_LAYERS, DEMO_PENALTY, DEMO_ROME_LAYER

  parser = argparse.ArgumentParser(prog="memedit")
  add_subcommands(parser.add_subparsers(dest="command", required=True))
  for command in ("lm-edit --out x", "lm-eval", "lm-demo"):
    args = parser.parse_args(command.split())
    assert (args.layer, args.layers, args.penalty) == (
        DEMO_ROME_LAYER, list(DEMO_MEMIT_LAYERS), DEMO_PENALTY), command


def test_lm_edit_checks_its_outputs_before_any_work(tmp_path):
  """--out/edit-N of another kind is refused in the command line's words (--force, not
  force=True) before the model is opened (here it does not even exist), and so is an
  --out that is a file; MEMIT writes one edit-N per block."""
  absent = ["--cache-dir", tmp_path / "cache", "--model", tmp_path / "no-model"]
  out = tmp_path / "edits"
  (out / "edit-1").mkdir(parents=True)
  (out / "edit-1" / "notes.txt").write_text("mine")
  want = (r"edit-1: expected a memedit 'edit' output folder to replace, got a folder that is "
          r"not a memedit output; pass --force to replace it")
  with pytest.raises(ValueError, match=want):
    _run("lm-edit", *absent, "--method", "memit", "--layers", "0,1", "--out", out)
  assert (out / "edit-1" / "notes.txt").read_text() == "mine"
  with pytest.raises(ValueError, match=r"expected an output folder apart from the inputs, got "
                                       r"one that holds .*cache'; refusing to replace it "
                                       r"\(even with --force\)"):
    _run("lm-edit", "--cache-dir", out / "edit-0" / "cache", "--out", out, "--force")
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="--out: expected a folder for the saved edits, got "):
    _run("lm-edit", *absent, "--out", tmp_path / "file")
  args = argparse.ArgumentParser(prog="memedit")
  add_subcommands(args.add_subparsers(dest="command", required=True))
  assert args.parse_args(["lm-edit", "--out", "x"]).force is False
  assert args.parse_args(["lm-edit", "--out", "x", "--force"]).force is True


def test_integer_lists_refuse_empty_entries():
  from memedit.lm.cli import _int_list

  assert _int_list("0, 1,3") == [0, 1, 3]
  for bad, msg in (("1,,2", "empty entry"), ("3,", "empty entry"), ("", "empty entry"),
                   ("1,x", "comma-separated integers"), ("-1", "non-negative")):
    with pytest.raises(argparse.ArgumentTypeError, match=msg):
      _int_list(bad)


def test_lm_eval_trace_and_demo_check_their_outputs_before_any_work(tmp_path):
  """lm-eval wrote --out with a plain open() after all its work (a file of the user's
  replaced, or a half-written one left); lm-trace and lm-demo wrote their PNGs into
  whatever --out was. Each is now checked before the model is opened (here it does not
  exist), and an earlier report is replaced."""
  absent = ["--cache-dir", tmp_path / "cache", "--model", tmp_path / "no-model"]
  notes = tmp_path / "notes.json"
  notes.write_text('{"mine": 1}')
  with pytest.raises(ValueError, match=r"--out: expected a new file or an earlier `memedit lm-eval` report to replace"):
    _run("lm-eval", *absent, "--out", notes)
  assert notes.read_text() == '{"mine": 1}'
  (tmp_path / "file").write_text("x")
  for command in ("lm-trace", "lm-demo"):
    with pytest.raises(ValueError, match=r"--out: expected a folder for the heat maps, got "):
      _run(command, *absent, "--out", tmp_path / "file")
  demo = tmp_path / "demo"
  demo.mkdir()
  (demo / "lm_eval.json").write_text("not a report")
  with pytest.raises(ValueError, match=r"--out: expected a new file or an earlier `memedit lm-eval` report to replace"):
    _run("lm-demo", *absent, "--out", demo)
  # An earlier report passes the check (the run then fails on the absent model).
  (demo / "lm_eval.json").write_text('{"rows": [], "model": {}, "settings": {}}')
  with pytest.raises((ValueError, FileNotFoundError)) as err:
    _run("lm-eval", *absent, "--out", demo / "lm_eval.json")
  assert "report" not in str(err.value) and "no-model" in str(err.value)
