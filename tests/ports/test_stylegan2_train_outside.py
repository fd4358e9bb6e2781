"""ports.stylegan2.train used as an outsider would: hostile settings and command-line
values, a run directory that is the user's own folder, damaged checkpoints, a diverging
run, outputs aimed at the run's own files, Ctrl-C in the middle of a save. A tiny student
and a tiny random DCGAN teacher written as a torch checkpoint without torch."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from ports.stylegan2 import convert, distilled, runs, train_cli
from ports.stylegan2 import train as tr
from ports.stylegan2.teacher import load_teacher

from tiny_training import CFG, CLI_ARGS, write_teacher


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
  return write_teacher(tmp_path_factory.mktemp("teacher"), seed=1)


@pytest.fixture(scope="module")
def teacher(teacher_file, tmp_path_factory):
  return load_teacher(teacher_file, tmp_path_factory.mktemp("work"))


@pytest.fixture(scope="module")
def straight(teacher, tmp_path_factory):
  """The uninterrupted run of CFG (8 steps)."""
  return tr.train(CFG, teacher, tmp_path_factory.mktemp("straight") / "run", log=None)


def _assert_same(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _tree_files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, files in os.walk(root) for f in files)


@pytest.mark.parametrize("field, value, want", [
    ("steps", 2 ** 31, r"steps at most 2147483647"),
    ("steps", 8.5, r"TrainConfig.steps: expected an integer, got 8.5"),
    ("steps", True, r"TrainConfig.steps: expected an integer, got True"),
    ("batch_size", 2.5, r"TrainConfig.batch_size: expected an integer"),
    ("style_dim", "10", r"TrainConfig.style_dim: expected an integer, got '10'"),
    ("channels", (16, 12.7, 8), r"TrainConfig.channels: expected a sequence of integers"),
    ("pyramid_levels", 1.5, r"TrainConfig.pyramid_levels: expected None or an integer"),
    ("seed", -1, r"TrainConfig.seed: expected an integer in \[0, 4294967295\], got -1"),
    ("seed", 2 ** 40, r"TrainConfig.seed: expected an integer in \[0, 4294967295\]"),
    ("learning_rate", float("inf"), r"TrainConfig.learning_rate: expected a finite number"),
    ("mapping_lr_scale", float("inf"), r"TrainConfig.mapping_lr_scale: expected a finite"),
    ("l1_weight", float("inf"), r"TrainConfig.l1_weight: expected a finite number"),
    ("ema_half_life_images", float("inf"), r"TrainConfig.ema_half_life_images: expected a"),
    ("eps", 0.0, r"TrainConfig.eps: expected a positive number, got 0.0"),
    ("eps", float("nan"), r"TrainConfig.eps: expected a finite number, got nan"),
    ("lr_mlp", 0.0, r"TrainConfig.lr_mlp: expected a positive number, got 0.0"),
    ("lr_mlp", float("nan"), r"TrainConfig.lr_mlp: expected a finite number, got nan"),
])
def test_config_refuses_what_cannot_train(field, value, want):
  with pytest.raises(ValueError, match=want):
    dataclasses.replace(CFG, **{field: value})


def test_config_takes_numpy_scalars_as_json_numbers():
  cfg = dataclasses.replace(CFG, steps=np.int64(8), seed=np.uint32(3),
                            learning_rate=np.float32(0.5), channels=np.array([16, 12, 8]))
  d = json.loads(json.dumps(cfg.to_json()))
  assert (d["steps"], d["seed"], d["learning_rate"], d["channels"]) == (8, 3, 0.5, [16, 12, 8])
  assert tr.TrainConfig.from_json(d) == cfg


@pytest.mark.parametrize("extra, want", [
    (["--channels", "16,x,8"], r"--channels: expected comma-separated integers.*'16,x,8'"),
    (["--stop-after", "-3"], r"--stop-after: expected a non-negative integer, got -3"),
    (["--steps", str(10 ** 12)], r"steps at most 2147483647"),
    (["--seed", "-1"], r"TrainConfig.seed: expected an integer in"),
    (["--lr", "inf"], r"TrainConfig.learning_rate: expected a finite number, got inf"),
    (["--checkpoint-every", "0"], r"--checkpoint-every, --log-every: expected positive"),
])
def test_command_line_refuses_bad_values_before_writing(teacher_file, tmp_path, capsys,
                                                        extra, want):
  run = tmp_path / "run"
  assert train_cli.main(["train", "--teacher", teacher_file, "--run-dir", str(run),
                         *CLI_ARGS, *extra]) == 1
  assert re.search(want, capsys.readouterr().err)
  assert not run.exists()


def test_train_refuses_negative_stop_after(teacher, tmp_path):
  with pytest.raises(ValueError, match=r"stop_after: expected None or a non-negative "
                                       r"integer, got -1"):
    tr.train(CFG, teacher, tmp_path / "run", stop_after=-1, log=None)
  assert not (tmp_path / "run").exists()


def test_a_users_folder(teacher, teacher_file, tmp_path, capsys):
  """A folder of the user's own: other files stay as they are; the run's own names
  (a non-empty checkpoints/, log.jsonl) without a run.json are refused untouched."""
  mine = tmp_path / "mine"
  (mine / "checkpoints" / "7").mkdir(parents=True)
  (mine / "notes.txt").write_text("precious")
  (mine / "checkpoints" / "7" / "x.txt").write_text("also precious")
  before = _tree_files(mine)
  with pytest.raises(ValueError, match=r"expected a training run \(with run.json\) or a "
                                       r"directory free of a run's files, got no run.json "
                                       r"but checkpoints/7"):
    tr.train(CFG, teacher, mine, stop_after=0, log=None)
  assert _tree_files(mine) == before
  assert train_cli.main(["train", "--teacher", teacher_file, "--run-dir", str(mine),
                         *CLI_ARGS]) == 1
  assert "no run.json but checkpoints/7" in capsys.readouterr().err
  assert _tree_files(mine) == before  # not even the teacher converted into it

  other = tmp_path / "other"
  other.mkdir()
  (other / runs.LOG_FILE).write_text("my own log\n")
  with pytest.raises(ValueError, match=r"no run.json but log.jsonl"):
    tr.train(CFG, teacher, other, stop_after=0, log=None)
  assert (other / runs.LOG_FILE).read_text() == "my own log\n"

  # Files of other names are left alone by a run started there (0 steps: no compilation).
  shutil.rmtree(mine / "checkpoints")
  state = tr.train(CFG, teacher, mine, stop_after=0, log=None)
  assert int(state["step"]) == 0 and (mine / "notes.txt").read_text() == "precious"
  assert tr.restore(mine)[1]["step"] == 0


def test_damaged_checkpoint_is_named_and_the_run_recovers(teacher, straight, tmp_path,
                                                           capsys):
  run = tmp_path / "run"
  tr.train(CFG, teacher, run, stop_after=3, checkpoint_every=2, log=None)
  assert sorted(int(s) for s in os.listdir(run / runs.CHECKPOINTS)) == [2, 3]
  for root, _, files in os.walk(run / runs.CHECKPOINTS / "3"):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  damaged = r"checkpoints/3: expected a complete checkpoint .* other checkpoints: steps \[2\]"
  with pytest.raises(ValueError, match=damaged):
    tr.restore(run)
  with pytest.raises(ValueError, match=damaged):
    tr.train(CFG, teacher, run, log=None)
  assert train_cli.main(["export", "--run-dir", str(run), "--out", str(tmp_path / "a.pt")]) == 1
  assert "checkpoints/3: expected a complete checkpoint" in capsys.readouterr().err
  assert tr.restore(run, 2)[1]["step"] == 2
  # Moved aside, the run resumes from step 2 and ends where the uninterrupted one did.
  os.rename(run / runs.CHECKPOINTS / "3", tmp_path / "damaged-3")
  _assert_same(straight, tr.train(CFG, teacher, run, log=None))


def test_a_diverging_run_keeps_its_finite_checkpoints(teacher, tmp_path, monkeypatch):
  """NaN parameters (a learning rate too large for the model) stop the run: nothing
  non-finite is saved, and the finite checkpoints are not rotated out."""
  step_fn = tr.train_step

  def diverging(cfg, teacher, state):
    state, metrics = step_fn(cfg, teacher, state)
    if int(state["step"]) >= 3:
      state = dict(state, params=jax.tree_util.tree_map(lambda x: x * np.nan,
                                                        state["params"]))
    return state, metrics

  monkeypatch.setattr(tr, "train_step", diverging)
  run = tmp_path / "run"
  with pytest.raises(ValueError, match=r"training state at step 3: expected finite values, "
                                       r"got NaN or infinite ones in \['params'\].*the last "
                                       r"checkpoint is step 2"):
    tr.train(CFG, teacher, run, checkpoint_every=1, log_every=100, log=None)
  assert sorted(int(s) for s in os.listdir(run / runs.CHECKPOINTS)) == [1, 2]
  assert all(np.all(np.isfinite(np.asarray(x)))
             for x in jax.tree_util.tree_leaves(tr.restore(run)[1]))
  # Caught at the log line too, before any further save.
  def poisoned(cfg, teacher, state):
    if int(state["step"]) == 3:
      state = dict(state, params=jax.tree_util.tree_map(lambda x: x * np.nan,
                                                        state["params"]))
    return step_fn(cfg, teacher, state)

  monkeypatch.setattr(tr, "train_step", poisoned)
  with pytest.raises(ValueError, match=r"loss of steps 4–4: expected finite values.*its "
                                       r"last checkpoint, step 0, is kept"):
    tr.train(CFG, teacher, tmp_path / "run2", checkpoint_every=100, log_every=1, log=None)
  assert os.listdir(tmp_path / "run2" / runs.CHECKPOINTS) == ["0"]


def test_outputs_never_overwrite_the_run(teacher, teacher_file, tmp_path, capsys):
  run = tmp_path / "run"
  tr.train(CFG, teacher, run, stop_after=0, log=None)
  record = (run / runs.RUN_FILE).read_bytes()
  for target in (run / runs.RUN_FILE, run / runs.LOG_FILE, run / runs.CHECKPOINTS / "0" / "x",
                 run / runs.CHECKPOINTS):
    with pytest.raises(ValueError, match=r"out: expected a .*, got"):
      distilled.export(run, target)
  assert train_cli.main(["export", "--run-dir", str(run), "--out",
                         str(run / runs.RUN_FILE)]) == 1
  assert "expected a path outside the run's own files" in capsys.readouterr().err
  assert train_cli.main(["evaluate", "--teacher", teacher_file, "--run-dir", str(run),
                         "--images", "2", "--out", str(run / runs.RUN_FILE)]) == 1
  capsys.readouterr()
  with pytest.raises(ValueError, match=r"out: expected a file path, got the directory"):
    distilled.export(run, tmp_path)
  assert (run / runs.RUN_FILE).read_bytes() == record
  tr.restore(run)

  # A path of its own: the rosinality file converts back to the run's g_ema exactly.
  info = distilled.export(run, tmp_path / "g.pt")
  _, variables, _, _ = distilled.generator(run)
  _, converted, _ = convert.load_stylegan2(convert.convert_rosinality(info["path"],
                                                                     tmp_path / "c"))
  _assert_same(converted, variables)


def test_ctrl_c_in_the_middle_of_a_save(teacher, straight, tmp_path, monkeypatch):
  """A KeyboardInterrupt while orbax finalises the periodic checkpoint: the step reached
  is saved by the interrupt handler, the earlier ones stay, and the resumed run is the
  uninterrupted one bit for bit."""
  from orbax.checkpoint._src.path import atomicity

  finalize = atomicity.AtomicRenameTemporaryPath.finalize
  calls = []

  async def interrupted(self):
    calls.append(self)
    if len(calls) == 4:  # the step-2 checkpoint's final rename (step 0 made calls 1, 2)
      raise KeyboardInterrupt
    return await finalize(self)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", interrupted)
  run = tmp_path / "run"
  with pytest.raises(KeyboardInterrupt):
    tr.train(CFG, teacher, run, checkpoint_every=2, log=None)
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
  assert sorted(os.listdir(run / runs.CHECKPOINTS)) == ["0", "2"]
  assert tr.restore(run)[1]["step"] == 2
  _assert_same(straight, tr.train(CFG, teacher, run, log=None))


def test_run_dir_that_is_a_file_or_holds_a_damaged_record(teacher, tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("mine")
  with pytest.raises(ValueError, match=r"afile: expected a run directory \(new or "
                                       r"existing\), got a file"):
    tr.train(CFG, teacher, afile, stop_after=0, log=None)
  assert afile.read_text() == "mine"
  run = tmp_path / "run"
  run.mkdir()
  for record in ({"format": 1, "config": {"steps": 3}},
                 {"format": 1, "config": [1, 2], "teacher": 3}):
    (run / runs.RUN_FILE).write_text(json.dumps(record))
    for call in (lambda: tr.train(CFG, teacher, run, stop_after=0, log=None),
                 lambda: tr.restore(run)):
      with pytest.raises(ValueError, match=r"run.json: expected a training run record of "
                                           r"format 1 \(a 'config' object and a 'teacher'"):
        call()


def _snapshot(root):
  """Every path under ``root`` with its bytes (None for directories)."""
  out = {}
  for d, dirs, files in os.walk(root):
    for name in dirs:
      out[os.path.relpath(os.path.join(d, name), root)] = None
    for name in files:
      with open(os.path.join(d, name), "rb") as f:
        out[os.path.relpath(os.path.join(d, name), root)] = f.read()
  return out


def test_a_refused_command_leaves_the_folder_as_it_found_it(teacher_file, tmp_path, capsys):
  """A run refused after the teacher is read (a pair that does not fit, settings or a
  teacher other than the run's) writes nothing: no run directory, no teacher/ in the
  user's folder, the run's own converted teacher not replaced."""
  def cli(*extra, run):
    return train_cli.main(["train", "--teacher", str(extra[0]), "--run-dir", str(run),
                           *CLI_ARGS, *extra[1:]])

  new = tmp_path / "new"
  assert cli(teacher_file, "--style-dim", "6", run=new) == 1
  assert "style_dim: expected at least the teacher's z size 8, got 6" in capsys.readouterr().err
  assert not new.exists()

  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("precious")
  assert cli(teacher_file, "--resolution", "128", "--channels", "8,8,8,8,8,8", run=mine) == 1
  assert "resolution: expected a divisor of the teacher's resolution 64, got 128" in (
      capsys.readouterr().err)
  assert _snapshot(mine) == {"notes.txt": b"precious"}

  run = tmp_path / "run"
  assert cli(teacher_file, "--stop-after", "0", run=run) == 0
  capsys.readouterr()
  before = _snapshot(run)
  assert "teacher" in before
  other_file = write_teacher(tmp_path, seed=2)
  for args in ([teacher_file, "--seed", "5"], [other_file]):
    assert cli(*args, run=run) == 1
    assert "expected the configuration and teacher the run was started with" in (
        capsys.readouterr().err)
    assert _snapshot(run) == before
  for command in (["evaluate", "--images", "2"], ["preview", "--out", str(tmp_path / "p.png")]):
    assert train_cli.main([command[0], "--teacher", other_file, "--run-dir", str(run),
                           *command[1:]]) == 1
    assert "--teacher: expected the teacher the run was trained with" in (
        capsys.readouterr().err)
    assert _snapshot(run) == before
    assert train_cli.main([command[0], "--teacher", teacher_file, "--run-dir",
                           str(tmp_path / "none"), *command[1:]]) == 1
    assert "none: not a training run (expected run.json inside it)" in (
        capsys.readouterr().err)
    assert not (tmp_path / "none").exists()


def _log(run):
  with open(run / runs.LOG_FILE) as f:
    return [json.loads(line) for line in f]


def test_a_resumed_run_logs_each_step_once(teacher, straight, tmp_path):
  """A crash after steps logged past the last checkpoint (and in the middle of writing a
  row): the resumed run drops those rows and the torn line, and logs each step once,
  with the losses the crashed run had logged for them."""
  class Crash(Exception):
    pass

  def crash_at_6(step, state):
    if step == 6:
      raise Crash

  run = tmp_path / "run"
  with pytest.raises(Crash):
    tr.train(CFG, teacher, run, checkpoint_every=4, log_every=1, log=None,
             on_step=crash_at_6)
  crashed = _log(run)
  assert [r["step"] for r in crashed] == [1, 2, 3, 4, 5]  # step 6 crashed before its row
  with open(run / runs.LOG_FILE, "a") as f:
    f.write('{"step": 6, "loss": 0.')  # torn by the crash
  assert tr.restore(run)[1]["step"] == 4
  _assert_same(straight, tr.train(CFG, teacher, run, checkpoint_every=4, log_every=1,
                                  log=None))
  rows = _log(run)
  assert [r["step"] for r in rows] == list(range(1, 9))
  assert rows[:4] == crashed[:4]
  for key in ("loss", "l1", "pyramid", "grad_norm"):
    np.testing.assert_allclose(rows[4][key], crashed[4][key], rtol=1e-6)


def test_resume_from_an_older_checkpoint_drops_the_later_rows(teacher, tmp_path,
                                                              monkeypatch):
  """The newest checkpoint moved away: rows after the older one go; the log is replaced
  through a temporary file, so a crash while it is written keeps the old log whole."""
  from memedit import _io

  run = tmp_path / "run"
  tr.train(CFG, teacher, run, stop_after=0, log=None)
  (run / runs.LOG_FILE).write_text("".join(
      json.dumps({"step": s, "loss": 0.1 * s}) + "\n" for s in (1, 3, 5, 8)))
  original = (run / runs.LOG_FILE).read_bytes()

  def crash(path, data):
    raise OSError("disk full")

  monkeypatch.setattr(_io, "atomic_write_bytes", crash)
  with pytest.raises(OSError, match="disk full"):
    runs.truncate_log(str(run), 3)
  assert (run / runs.LOG_FILE).read_bytes() == original
  monkeypatch.undo()
  runs.truncate_log(str(run), 3)
  assert [r["step"] for r in _log(run)] == [1, 3]
  runs.truncate_log(str(run), 0)
  assert (run / runs.LOG_FILE).read_text() == ""


def test_ctrl_c_logs_the_steps_its_checkpoint_holds(teacher, straight, tmp_path):
  """Ctrl-C between two log rows: the interrupt's checkpoint holds steps that no row
  covered yet; they get their row (the mean of their losses), so the resumed log has
  every step, none twice."""
  def interrupt_at_3(step, state):
    if step == 3:
      raise KeyboardInterrupt

  run = tmp_path / "run"
  with pytest.raises(KeyboardInterrupt):
    tr.train(CFG, teacher, run, checkpoint_every=1, log_every=4, keep_checkpoints=4,
             log=None, on_step=interrupt_at_3)
  rows = _log(run)
  assert [r["step"] for r in rows] == [1, 3]  # step 1 alone (it compiles), then 2–3
  assert tr.restore(run)[1]["step"] == 3
  # The row's losses: the float64 means of steps 2 and 3, rerun from their checkpoints.
  reruns = [tr.train_step(CFG, teacher, tr.restore(run, s)[1])[1] for s in (1, 2)]
  for key in ("loss", "l1", "pyramid", "grad_norm"):
    want = np.mean([np.float64(m[key]) for m in reruns])
    np.testing.assert_allclose(rows[1][key], want, rtol=1e-6)
  _assert_same(straight, tr.train(CFG, teacher, run, log_every=4, log=None))
  assert [r["step"] for r in _log(run)] == [1, 3, 4, 8]


@pytest.mark.parametrize("bad, want", [
    ({"channels": 5}, r"TrainConfig.channels: expected a sequence of integers, got 5"),
    ({"channels": None}, r"TrainConfig.channels: expected a sequence of integers, got None"),
    ({"steps": "8"}, r"TrainConfig.steps: expected an integer, got '8'"),
])
def test_an_edited_run_record_is_named(teacher, tmp_path, bad, want):
  """A run.json whose configuration was edited by hand: a ValueError naming the file
  and the field (a non-list channels was a bare TypeError of tuple())."""
  with pytest.raises(ValueError, match=want):
    tr.TrainConfig.from_json({**CFG.to_json(), **bad})
  run = tmp_path / "run"
  run.mkdir()
  record = runs.run_record(CFG, teacher)
  record["config"].update(bad)
  (run / runs.RUN_FILE).write_text(json.dumps(record))
  with pytest.raises(ValueError, match=r"run.json: " + want):
    tr.restore(run)


def test_ctrl_c_before_checkpoint_0_leaves_no_run_to_resume(teacher, teacher_file, tmp_path,
                                                            monkeypatch, capsys):
  """Ctrl-C (or a kill) after run.json is written but before checkpoint 0 exists: no
  run to resume, so a start with other settings begins a new run there (it was refused
  as a mismatched resume), as does one with the same settings; orbax's unfinished save
  of step 0 goes, the user's other files stay, and a run.json that is not a run record
  is still refused untouched."""
  def interrupted(cfg):
    raise KeyboardInterrupt

  run = tmp_path / "run"
  run.mkdir()
  (run / "notes.txt").write_text("precious")
  other = dataclasses.replace(CFG, learning_rate=1e-3)
  monkeypatch.setattr(tr, "init_state", interrupted)
  with pytest.raises(KeyboardInterrupt):
    tr.train(other, teacher, run, stop_after=0, log=None)
  monkeypatch.undo()
  assert (run / runs.RUN_FILE).is_file() and os.listdir(run / runs.CHECKPOINTS) == []
  assert runs.read_run(run)["config"]["learning_rate"] == 1e-3

  assert int(tr.train(CFG, teacher, run, stop_after=0, log=None)["step"]) == 0
  assert tr.restore(run)[0] == CFG and (run / "notes.txt").read_text() == "precious"

  # Interrupted in the middle of saving checkpoint 0: a start with the same settings.
  from orbax.checkpoint._src.path import atomicity

  async def interrupted_save(self):
    raise KeyboardInterrupt

  run2 = tmp_path / "run2"
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", interrupted_save)
  with pytest.raises(KeyboardInterrupt):
    tr.train(CFG, teacher, run2, stop_after=0, log=None)
  monkeypatch.undo()
  assert [name.startswith("0.") for name in os.listdir(run2 / runs.CHECKPOINTS)] == [True]
  assert int(tr.train(CFG, teacher, run2, stop_after=0, log=None)["step"]) == 0
  assert os.listdir(run2 / runs.CHECKPOINTS) == ["0"] and tr.restore(run2)[0] == CFG

  # The command line takes the same folder as a new run (other settings, other teacher).
  run3 = tmp_path / "run3"
  monkeypatch.setattr(tr, "init_state", interrupted)
  with pytest.raises(KeyboardInterrupt):
    tr.train(other, teacher, run3, stop_after=0, log=None)
  monkeypatch.undo()
  other_file = write_teacher(tmp_path, seed=2)
  assert train_cli.main(["train", "--teacher", other_file, "--run-dir", str(run3),
                         *CLI_ARGS, "--stop-after", "0"]) == 0
  capsys.readouterr()
  assert tr.restore(run3)[0] == CFG
  assert runs.read_run(run3)["teacher"]["digest"] != teacher.digest

  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / runs.RUN_FILE).write_text('{"my": "settings"}')
  with pytest.raises(ValueError, match=r"run.json: expected a training run record"):
    tr.train(CFG, teacher, mine, stop_after=0, log=None)
  assert _snapshot(mine) == {runs.RUN_FILE: b'{"my": "settings"}'}


def test_ctrl_c_while_a_log_line_is_shown(teacher, straight, tmp_path):
  """A Ctrl-C while a progress line is printed, after its row was written: the
  interrupt's checkpoint is saved and the steps are not logged a second time."""
  def log(line):
    if line.startswith("step 4/"):
      raise KeyboardInterrupt

  run = tmp_path / "run"
  with pytest.raises(KeyboardInterrupt):
    tr.train(CFG, teacher, run, log_every=2, log=log)
  assert [r["step"] for r in _log(run)] == [1, 2, 4]
  assert tr.restore(run)[1]["step"] == 4
  _assert_same(straight, tr.train(CFG, teacher, run, log_every=2, log=None))
  assert [r["step"] for r in _log(run)] == [1, 2, 4, 5, 6, 8]  # 5: the resumed first step


@pytest.mark.parametrize("kind, want", [
    ("dangling", r"dangling: expected a run directory \(new or existing\), got a symbolic "
                 r"link to nothing"),
    ("record_dir", r"run.json: expected the run's record \(a file\) or nothing, got a "
                   r"directory"),
])
def test_run_dir_that_is_a_dangling_link_or_whose_record_is_a_directory(
    teacher, tmp_path, kind, want):
  if kind == "dangling":
    run = tmp_path / "dangling"
    os.symlink(tmp_path / "nowhere", run)
  else:
    run = tmp_path / "run"
    (run / runs.RUN_FILE).mkdir(parents=True)
  before = sorted(os.listdir(tmp_path)), os.path.isdir(run) and _snapshot(run)
  with pytest.raises(ValueError, match=want):
    tr.train(CFG, teacher, run, stop_after=0, log=None)
  assert (sorted(os.listdir(tmp_path)), os.path.isdir(run) and _snapshot(run)) == before


def test_an_empty_run_dir_is_refused(teacher, teacher_file, tmp_path, monkeypatch, capsys):
  """An empty run directory (an unset shell variable) is not the working directory: it
  was taken for it, and the run's files written there."""
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match=r"run_dir: expected a directory path, got ''"):
    tr.train(CFG, teacher, "", stop_after=0, log=None)
  for command in (["train", "--teacher", teacher_file, *CLI_ARGS, "--stop-after", "0"],
                  ["export", "--out", str(tmp_path / "g.pt")]):
    assert train_cli.main([*command, "--run-dir", ""]) == 1
    assert "--run-dir: expected a directory path, got ''" in capsys.readouterr().err
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name, chars", [("x\\y", "\\"), ("r[0]", "[ ]")])
def test_a_run_dir_the_checkpoint_store_misreads_is_refused(teacher, teacher_file, tmp_path,
                                                            capsys, name, chars):
  """A backslash in the path made the checkpoint's arrays land in another directory
  (x/y/... beside the run) and brackets made it unrestorable; both were accepted."""
  want = f"expected a run directory path without {chars} "
  with pytest.raises(ValueError, match=re.escape(want)):
    tr.train(CFG, teacher, tmp_path / name, stop_after=0, log=None)
  assert train_cli.main(["train", "--teacher", teacher_file, "--run-dir",
                         str(tmp_path / name), *CLI_ARGS, "--stop-after", "0"]) == 1
  assert want in capsys.readouterr().err
  assert os.listdir(tmp_path) == []


_HOLD_THE_LOCK = """
import sys, time
from ports.stylegan2 import runs
with runs.lock(sys.argv[1]):
  print("locked", flush=True)
  time.sleep(300)
"""


def test_one_trainer_per_run_and_a_killed_ones_lock_goes(teacher, teacher_file, tmp_path,
                                                         capsys):
  """A second start in a run another process trains (a second terminal) is refused at
  once, by the API and the command line, writing nothing; the run can still be read.
  Killed (SIGKILL, no clean-up), the trainer's lock goes with it and the run resumes."""
  run = tmp_path / "run"
  tr.train(CFG, teacher, run, stop_after=0, log=None)
  before = _snapshot(run)
  assert runs.LOCK_FILE not in before  # let go at the end of the run
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.Popen([sys.executable, "-c", _HOLD_THE_LOCK, str(run)], cwd=root,
                          stdout=subprocess.PIPE)
  try:
    assert proc.stdout.readline() == b"locked\n"
    want = (re.escape(str(run)) + r": expected a run directory no other process is "
            r"training in, got one in which another process \(pid " + str(proc.pid) +
            r"\) is training")
    with pytest.raises(runs.RunInUseError, match=want):
      tr.train(CFG, teacher, run, log=None)
    assert train_cli.main(["train", "--teacher", teacher_file, "--run-dir", str(run),
                           *CLI_ARGS]) == 1
    assert re.search(want, capsys.readouterr().err)
    after = _snapshot(run)
    assert after.pop(runs.LOCK_FILE) == f"{proc.pid}\n".encode()
    assert after == before
    assert int(tr.restore(run)[1]["step"]) == 0  # reading the run takes no lock
  finally:
    proc.kill()
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert (run / runs.LOCK_FILE).exists()  # left by the killed process, its lock released
  assert int(tr.train(CFG, teacher, run, stop_after=1, log=None)["step"]) == 1
  assert not (run / runs.LOCK_FILE).exists()


def test_the_lock_in_one_process(teacher, tmp_path):
  """A second train of the same run from this process (a callback of the first, another
  thread) is refused; a folder holding only a stale lock file is a fresh run folder, and
  an output aimed at the lock file is refused."""
  run = tmp_path / "run"
  refused = []

  def nested(step, state):
    for path in (run, tmp_path / "." / "run"):
      with pytest.raises(runs.RunInUseError, match=r"got one in which this process \(pid "
                                                   + str(os.getpid()) + r"\) is training"):
        tr.train(CFG, teacher, path, log=None)
    worker = threading.Thread(target=lambda: refused.append(_refusal(run)))
    worker.start()
    worker.join()

  def _refusal(path):
    try:
      with runs.lock(path):
        return None
    except runs.RunInUseError as e:
      return str(e)

  tr.train(CFG, teacher, run, stop_after=1, log=None, on_step=nested)
  assert len(refused) == 1 and "another process" not in refused[0]
  assert "this process" in refused[0]
  assert runs.last_logged_step(run) == 1 and tr.restore(run)[1]["step"] == 1
  assert runs.LOCK_FILE not in os.listdir(run)

  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / runs.LOCK_FILE).write_text("4194305\n")  # a crashed trainer's, no one holds it
  (mine / ".lock").write_text("another tool's")
  runs.check_fresh(str(mine))
  assert not runs.resumable(str(mine))
  assert int(tr.train(CFG, teacher, mine, stop_after=0, log=None)["step"]) == 0
  assert sorted(os.listdir(mine)) == [".lock", runs.CHECKPOINTS, runs.RUN_FILE]
  assert (mine / ".lock").read_text() == "another tool's"
  with pytest.raises(ValueError, match=r"expected a path outside the run's own files"):
    distilled.export(mine, mine / runs.LOCK_FILE)


class _InterruptedLoss:
  """A loss whose reading is interrupted: a Ctrl-C while the step it waits for runs."""

  def __float__(self):
    raise KeyboardInterrupt


def test_ctrl_c_around_a_calls_first_step_keeps_log_and_checkpoint_together(
    teacher, straight, tmp_path, monkeypatch):
  """The first step of a call reads its loss at once (waiting for the step): a Ctrl-C
  meanwhile saved that step with no row for it, and the resumed log never had one. Now
  the interrupted step is dropped (rerun on resume); one that comes after its row was
  written keeps the step. Either way the log's rows end at the checkpoint's step, each
  step logged once."""
  step_fn = tr.train_step
  run = tmp_path / "run"
  tr.train(CFG, teacher, run, stop_after=2, log=None)

  def interrupted_reading(cfg, teacher, state):
    state, metrics = step_fn(cfg, teacher, state)
    return state, dict(metrics, loss=_InterruptedLoss())

  monkeypatch.setattr(tr, "train_step", interrupted_reading)
  with pytest.raises(KeyboardInterrupt):
    tr.train(CFG, teacher, run, log=None)
  monkeypatch.undo()
  assert [r["step"] for r in _log(run)] == [1, 2]
  assert tr.restore(run)[1]["step"] == 2

  log_row = runs.log_row

  def interrupted_after_the_row(run_dir, row):
    log_row(run_dir, row)
    raise KeyboardInterrupt

  monkeypatch.setattr(runs, "log_row", interrupted_after_the_row)
  with pytest.raises(KeyboardInterrupt):
    tr.train(CFG, teacher, run, log=None)
  monkeypatch.undo()
  assert [r["step"] for r in _log(run)] == [1, 2, 3]
  assert tr.restore(run)[1]["step"] == 3

  # Interrupted once the row of steps 5–6 is written, before they leave the pending
  # list: the handler logged them a second time.
  def interrupted_after_row_6(run_dir, row):
    log_row(run_dir, row)
    if row["step"] == 6:
      monkeypatch.undo()
      raise KeyboardInterrupt

  monkeypatch.setattr(runs, "log_row", interrupted_after_row_6)
  with pytest.raises(KeyboardInterrupt):
    tr.train(CFG, teacher, run, log_every=2, log=None)
  monkeypatch.undo()
  assert [r["step"] for r in _log(run)] == [1, 2, 3, 4, 6]
  assert tr.restore(run)[1]["step"] == 6
  _assert_same(straight, tr.train(CFG, teacher, run, log=None))
  assert [r["step"] for r in _log(run)] == [1, 2, 3, 4, 6, 7, 8]


def test_reading_a_run_this_process_may_not_write(teacher, teacher_file, tmp_path,
                                                  monkeypatch):
  """A run on read-only media (an archive, a shared mount): preview with the torch
  teacher converted it into the run folder, and failed there; it is converted aside."""
  run = tmp_path / "run"
  tr.train(CFG, teacher, run, stop_after=0, log=None)
  before = _snapshot(run)
  access = os.access

  def read_only(path, mode, *args, **kwargs):
    if mode & os.W_OK and os.path.abspath(path) == str(run):
      return False
    return access(path, mode, *args, **kwargs)

  monkeypatch.setattr(os, "access", read_only)
  args = train_cli._parser().parse_args(["preview", "--teacher", teacher_file, "--run-dir",
                                         str(run), "--out", str(tmp_path / "p.png")])
  assert train_cli._run_teacher(args).digest == teacher.digest
  assert _snapshot(run) == before
