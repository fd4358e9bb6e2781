"""`memedit lm-*` from the command line: lm-edit's saved edits appear all at once or not at
all, and options and facts files that cannot work are refused when they are read, before
the model is opened."""

from __future__ import annotations

import argparse
import errno
import os

import jax.numpy as jnp
import pytest

import memedit
import memedit.lm.cli as cli
from memedit.lm.cli import add_subcommands


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="memedit")
  add_subcommands(parser.add_subparsers(dest="command", required=True))
  return parser


def _run(*argv) -> int:
  args = _parser().parse_args([str(a) for a in argv])
  return args.run(args)


def _no_model(args):
  raise AssertionError("the model was opened")


def _tree(folder) -> dict:
  """Every entry under ``folder`` (hidden ones too): relative path -> bytes, or None for
  a folder."""
  out = {}
  for root, dirs, files in os.walk(folder):
    for d in dirs:
      out[os.path.relpath(os.path.join(root, d), folder)] = None
    for f in files:
      path = os.path.join(root, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, folder)] = fh.read()
  return out


def _earlier_edit(path, label: str) -> None:
  memedit.save_edit(path, memedit.make_edit(("k",), jnp.ones((1, 1)), jnp.ones((1, 3)),
                                            method="demo", label=label))


def test_lm_edit_saves_its_edits_all_at_once_or_not_at_all(tiny, tmp_path, monkeypatch,
                                                           capsys):
  """Two ROME edits (one per fact of the file) and a stale edit-2 removed by --force: when
  the second save fails (a full disk), or the second rename into place, --out is exactly
  as before, hidden entries included; a new --out is not created; the run that succeeds
  replaces both edits and removes edit-2, leaving the user's other files."""
  world = tiny.world
  monkeypatch.setattr(cli, "_open", lambda args: (tiny.module, tiny.variables, world, {}))
  rel = world.relations[0]
  lines = []
  for s in (0, 1):
    old = world.object_of(s, 0)
    new = next(o for o in rel.objects if o != old)
    lines.append(f"{world.subjects[s]},{rel.train_templates[0]},{new},{old}\n")
  facts = tmp_path / "facts.csv"
  facts.write_text("subject,prompt,target_new,target_true\n" + "".join(lines))
  out = tmp_path / "edits"
  for i in range(3):
    _earlier_edit(out / f"edit-{i}", f"earlier-{i}")
  (out / "notes.txt").write_text("mine")
  before = _tree(out)
  argv = ["lm-edit", "--facts", facts, "--layer", "0", "--cache-dir", tmp_path / "cache",
          "--tokens", "2000", "--contexts", "0", "--value-steps", "2", "--force"]

  save = memedit.save_edit
  calls = []

  def second_fails(path, edit, **kw):
    calls.append(path)
    if len(calls) == 2:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))
    return save(path, edit, **kw)

  monkeypatch.setattr(memedit, "save_edit", second_fails)
  with pytest.raises(ValueError, match="--out: expected a place you may write to, got "
                                       ".*No space left on device"):
    _run(*argv, "--out", out)
  assert len(calls) == 2
  assert _tree(out) == before
  new_out = tmp_path / "new" / "edits"
  calls.clear()
  with pytest.raises(ValueError, match="No space left on device"):
    _run(*argv, "--out", new_out)
  assert len(calls) == 2 and not new_out.exists() and os.listdir(new_out.parent) == []

  monkeypatch.setattr(memedit, "save_edit", save)

  # Every edit saved, the renaming of the second into place fails: the first is moved back.
  rename, failed = os.rename, []

  def second_move_fails(src, dst, *args, **kw):
    if os.fspath(dst) == str(out / "edit-1") and not failed:
      failed.append(src)
      raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(src), None, os.fspath(dst))
    return rename(src, dst, *args, **kw)

  monkeypatch.setattr(os, "rename", second_move_fails)
  with pytest.raises(ValueError, match="--out: expected a place you may write to, got "
                                       ".*Input/output error"):
    _run(*argv, "--out", out)
  assert failed and _tree(out) == before
  monkeypatch.setattr(os, "rename", rename)

  assert _run(*argv, "--out", out) == 0
  assert "2 edit(s) saved" in capsys.readouterr().out
  assert sorted(os.listdir(out)) == ["edit-0", "edit-1", "notes.txt"]
  assert (out / "notes.txt").read_text() == "mine"
  assert [memedit.load_edit(out / f"edit-{i}").method for i in (0, 1)] == ["rome", "rome"]


@pytest.mark.parametrize("command", ["lm-edit --out x", "lm-eval", "lm-demo"])
@pytest.mark.parametrize("value", ["2,1", "1,1", "0,2,1"])
def test_layers_out_of_order_are_refused_when_parsed(command, value, capsys):
  with pytest.raises(SystemExit):
    _parser().parse_args([*command.split(), "--layers", value])
  assert (f"argument --layers: expected block numbers in increasing order, each once "
          f"(e.g. 0,1,2), got '{value}'") in capsys.readouterr().err
  assert _parser().parse_args([*command.split(), "--layers", "0, 2"]).layers == [0, 2]


@pytest.mark.parametrize("flag", ["--penalty", "--value-lr"])
@pytest.mark.parametrize("value, want", [
    ("-0.5", "a positive finite number"), ("0", "a positive finite number"),
    ("nan", "a positive finite number"), ("-inf", "a positive finite number"),
    ("1e400", "a positive finite number"), ("fast", "a positive number")])
def test_rates_and_penalties_that_are_not_positive_are_refused_when_parsed(flag, value, want,
                                                                         capsys):
  for command in ("lm-edit --out x", "lm-eval", "lm-demo"):
    with pytest.raises(SystemExit):
      _parser().parse_args([*command.split(), f"{flag}={value}"])
    assert f"argument {flag}: expected {want}, got '{value}'" in capsys.readouterr().err
  args = _parser().parse_args(["lm-eval", flag, "2.5e-1"])
  assert getattr(args, flag[2:].replace("-", "_")) == 0.25


@pytest.mark.parametrize("command", ["lm-edit --out x", "lm-eval", "lm-stats"])
def test_a_negative_block_is_refused_when_parsed(command, capsys):
  with pytest.raises(SystemExit):
    _parser().parse_args([*command.split(), "--layer", "-1"])
  assert "argument --layer: expected an integer in [0, 10000000], got -1" in (
      capsys.readouterr().err)


@pytest.mark.parametrize("name, data, match", [
    ("facts.csv", b"subject,prompt,target_new\nA,{} x,y\nB\x00C,{} x,y\n",
     r"facts.csv: line 3: subject: expected text without NUL characters, got 'B\\x00C'"),
    ("facts.csv", b'subject,prompt,target_new\n"A,\nB",{} x\x00,y\n',
     r"facts.csv: lines 2-3: prompt: expected text without NUL characters"),
    ("facts.json", b'[{"subject": "A", "prompt": "{} x", "target_new": "y"}, '
                   b'{"subject": "B", "prompt": "{} x", "target_new": "y\\u0000"}]',
     r"facts.json: fact 1: target_new: expected text without NUL characters, got "
     r"'y\\x00'"),
])
@pytest.mark.parametrize("method", ["rome", "memit", "ft"])
def test_a_nul_in_a_facts_field_is_refused_when_the_file_is_read(tmp_path, monkeypatch,
                                                                 name, data, match, method):
  monkeypatch.setattr(cli, "_open", _no_model)
  facts = tmp_path / name
  facts.write_bytes(data)
  with pytest.raises(ValueError, match=match) as info:
    _run("lm-edit", "--method", method, "--facts", facts, "--out", tmp_path / "edits")
  assert str(facts) in str(info.value)
  assert not (tmp_path / "edits").exists()


def test_the_library_reader_refuses_a_nul_in_a_field(tmp_path):
  from memedit.lm.prompts import read_facts

  facts = tmp_path / "facts.csv"
  facts.write_bytes(b"subject,prompt,target_new,target_true\nA,{} x,y,z\x00\n")
  with pytest.raises(ValueError, match=r"facts.csv: line 2: target_true: expected text "
                                       r"without NUL characters, got 'z\\x00'"):
    read_facts(str(facts))
