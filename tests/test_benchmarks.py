"""The benchmark scripts (benchmarks/*.py) from outside: bad options are refused by name
before any work, results files are written whole (or not at all) as standard JSON without
machine paths, a smoke run never writes over a full run's file, and the cheapest scripts
run end to end at tiny sizes with a table that agrees with their JSON."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402


@pytest.fixture
def results(tmp_path, monkeypatch):
  """benchmarks/results redirected to a temporary folder."""
  folder = tmp_path / "results"
  monkeypatch.setattr(common, "RESULTS", folder)
  return folder


def _strict_load(text: str):
  def refuse(name):
    raise AssertionError(f"non-standard JSON constant {name}")
  return json.loads(text, parse_constant=refuse)


# --- common.write -------------------------------------------------------------------------


def test_write_standard_json_without_machine_paths(results):
  payload = {"nan": float("nan"), "inf": np.float32("inf"), "ninf": -np.inf,
             "array": np.array([1.5, np.nan]), "flag": np.bool_(True), "n": np.int64(3),
             "load": (0.5, 1.0)}
  path = common.write("probe", payload, "_quick")
  assert path == results / "probe_quick.json"
  data = _strict_load(path.read_text())
  assert data["nan"] is None and data["inf"] == "inf" and data["ninf"] == "-inf"
  assert data["array"] == [1.5, None] and data["flag"] is True and data["n"] == 3
  assert data["load"] == [0.5, 1.0] and "jax" in data["machine"]
  assert str(ROOT) not in path.read_text()
  assert sorted(p.name for p in results.iterdir()) == ["probe_quick.json"]


@pytest.mark.parametrize("name,suffix", [("probe", "/../../escaped"), ("../probe", ""),
                                         ("probe", "_a/b")])
def test_write_refuses_names_that_leave_the_results_folder(results, name, suffix):
  with pytest.raises(ValueError, match="expected letters, digits"):
    common.write(name, {"x": 1}, suffix)
  assert not results.exists() or not any(results.iterdir())


def test_interrupted_write_keeps_the_previous_results_and_no_temporary_file(results,
                                                                           monkeypatch):
  first = common.write("probe", {"run": 1})
  before = first.read_text()

  def interrupted(src, dst):
    raise KeyboardInterrupt

  with monkeypatch.context() as m:
    m.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
      common.write("probe", {"run": 2})
  assert first.read_text() == before
  assert _strict_load(before)["run"] == 1
  assert sorted(p.name for p in results.iterdir()) == ["probe.json"]


def test_write_leaves_another_runs_temporary_file_alone(results):
  # Two runs of one benchmark at the same time must not write through one temporary name.
  results.mkdir()
  other = results / "probe.json.tmp"
  other.write_text('{"run": "other, half written')
  path = common.write("probe", {"run": 1})
  assert other.read_text() == '{"run": "other, half written'
  assert _strict_load(path.read_text())["run"] == 1


def test_write_json_to_a_bare_file_name(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  common.write_json("bare.json", {"x": float("nan")})
  assert _strict_load((tmp_path / "bare.json").read_text()) == {"x": None}


# --- argument checks ----------------------------------------------------------------------


def test_argument_types_name_expected_and_received():
  import argparse

  assert common.positive_int("3") == 3 and common.nonnegative_int("0") == 0
  assert common.positive_float("1e-4") == 1e-4 and common.nonnegative_float("0") == 0.0
  assert common.number_list(common.positive_float)("1,2.5") == [1.0, 2.5]
  assert common.suffix_tag("_inner4096") == "_inner4096"
  for parse, text in ((common.positive_int, "0"), (common.positive_int, "1.5"),
                      (common.nonnegative_int, "-1"), (common.positive_float, "nan"),
                      (common.positive_float, "inf"), (common.nonnegative_float, "-0.5"),
                      (common.number_list(), ""), (common.number_list(), "1,,2"),
                      (common.suffix_tag, "../x"), (common.suffix_tag, "a/b")):
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected .*got '"):
      parse(text)


TINY_COV = ["--keys", "128", "--chunk", "64", "--dim", "4", "--group", "1"]
REFUSED = [
    ("gram_kernels", ["--chunks", "0", "--chunk", "8", "--dim", "4"], "--chunks"),
    ("gram_kernels", ["--rounds", "-1", "--chunks", "1", "--chunk", "8", "--dim", "4"],
     "--rounds"),
    ("covariance_fold", TINY_COV + ["--rounds", "0"], "--rounds"),
    ("covariance_fold", ["--keys", "10", "--chunk", "64", "--dim", "4"], "--keys"),
    ("covariance_fold", TINY_COV + ["--dim", "four"], "--dim"),
    ("lambda_solve", ["--channels", "4", "--steps", "3", "--repeats", "0"], "--repeats"),
    ("lambda_solve", ["--channels", "4", "--steps", "3", "--size", "1"], "--size"),
    ("lambda_solve", ["--channels", "4", "--steps", "3", "--size", "4", "--rank", "9"],
     "--rank"),
    ("layer_stats", ["--batches", "2", "--batch", "1"], "--group"),
    ("layer_stats", ["--batches", "2", "--group", "2", "--eager-batches", "4"],
     "--eager-batches"),
    ("layer_stats", ["--repeats", "0"], "--repeats"),
    ("multihost_stats", ["--keys", "10", "--dim", "2"], "--keys"),
    ("stats_memory", ["--samples", "10", "0"], "--samples"),
    ("ports_dcgan", ["--batches", "4", "-2"], "--batches"),
    ("ports_stylegan2", ["--sizes", "48"], "--sizes"),
    ("ports_stylegan2", ["--repeats", "0"], "--repeats"),
    ("ports_stylegan2", ["--out", "."], "--out"),
    ("ports_dcgan", ["--out", "results"], "--out"),
    ("layer_stats_peers", ["--sg2-resolution", "48"], "--sg2-resolution"),
    ("layer_stats_peers", ["--dcgan-n", "0"], "--dcgan-n"),
    ("lm_edit", ["--tokens", "100"], "--tokens"),
    ("lm_edit", ["--memit", "0"], "--memit"),
    ("lm_sequential", ["--tag", "/../../elsewhere"], "--tag"),
    ("lm_sequential", ["--batch", "0"], "--batch"),
    ("lm_sequential", ["--threshold", "nan"], "--threshold"),
    ("lm_memit_sweep", ["--last", ""], "--last"),
    ("lm_memit_sweep", ["--last", "9"], "--last"),
    ("lm_memit_sweep", ["--last", "1,3", "--first", "5"], "--first"),
    ("lm_memit_sweep", ["--penalties", "100,-1"], "--penalties"),
    ("sequential_edits", ["--preserve", "-1"], "--preserve"),
    ("sequential_edits", ["--preserve", "nan", "--only-preserve"], "--preserve"),
    ("full_edit", ["--rows", "dcgan,nope"], "--rows"),
    ("ui_latency", ["--model", "/nonexistent/model", "--out-dir", "."], "--model"),
    ("ui_latency", ["--model", os.sep], "--out-dir"),
    ("ui_latency", ["--stats", "/some/stats"], "--out-dir"),
    ("stats_memory", ["--model", os.sep], "--out-dir"),
    ("lm_edit", ["--model", "/nonexistent/model"], "--out-dir"),
    ("lm_sequential", ["--model", "/nonexistent/model"], "--out-dir"),
    ("sequential_edits", ["--stats", "/nonexistent/stats"], "--out-dir"),
    ("sequential_edits", ["--stylegan2", "--model", "/some/dcgan"], "--model"),
    ("sequential_edits", ["--anchor", "before"], "--anchor"),
    ("ports_dcgan", ["--out", "x.json", "--out-dir", "."], "--out-dir"),
    ("make_demo_spec", ["--bogus"], "--bogus"),
]


@pytest.mark.parametrize("script,argv,option", REFUSED,
                         ids=[f"{s}:{' '.join(a)}" for s, a, _ in REFUSED])
def test_bad_options_are_refused_by_name_before_any_work(script, argv, option, results,
                                                         capsys):
  module = importlib.import_module(f"benchmarks.{script}")
  with pytest.raises(SystemExit) as exc:
    module.main(argv)
  assert exc.value.code == 2
  err = capsys.readouterr().err
  assert option in err, err
  assert "expected" in err or "unrecognized arguments" in err, err
  assert not results.exists()


def test_full_edit_rerun_names_damaged_results_before_running(results, capsys):
  from benchmarks import full_edit

  results.mkdir()
  damaged = results / "full_edit.json"
  damaged.write_text('{"rows": [{"model": "dcgan-fa')
  with pytest.raises(SystemExit) as exc:
    full_edit.main(["--rows", "dcgan"])
  assert exc.value.code == 2
  err = capsys.readouterr().err
  assert "--rows" in err and "full_edit.json" in err and "expected" in err, err
  assert damaged.read_text() == '{"rows": [{"model": "dcgan-fa'


def test_stats_memory_output_names_the_model_without_its_path(tmp_path):
  from benchmarks import stats_memory

  model = tmp_path / "models" / "faces-dcgan"
  text = f"stats {model} layer convt2: 64 keys; cached in {ROOT}{os.sep}.cache/x"
  out = stats_memory._without_paths(text, str(model))
  assert out == "stats faces-dcgan layer convt2: 64 keys; cached in .cache/x"
  inside = ROOT / ".cache" / "demo" / "faces-dcgan"  # the default: kept relative to the repo
  assert stats_memory._without_paths(f"stats {inside} layer convt2", str(inside)) == (
      "stats .cache/demo/faces-dcgan layer convt2")


def test_make_demo_spec_writes_where_asked(tmp_path):
  from benchmarks import make_demo_spec

  out = tmp_path / "spec.json"
  make_demo_spec.main(["--out", str(out)])
  bundled = json.loads((ROOT / "memedit" / "data" / "demo_spec.json").read_text())
  assert json.loads(out.read_text()) == bundled


def test_layer_stats_first_call_timing_compiles_every_time():
  # memedit keeps its fold programs between calls: a timing "including compilation" must
  # not reuse the programs of a warm-up call (or of the previous repeat).
  import jax

  from benchmarks import layer_stats

  traces = []

  @jax.jit
  def f(x):
    traces.append(1)
    return x + 1

  f(1.0)
  seconds = layer_stats.first_call_seconds(lambda: f(1.0), 2)
  assert len(traces) == 3 and seconds > 0


# --- tiny end-to-end runs -----------------------------------------------------------------


def test_covariance_fold_tiny_run_table_agrees_with_json(results, capsys):
  from benchmarks import covariance_fold

  covariance_fold.main(TINY_COV + ["--rounds", "2"])
  printed = capsys.readouterr().out
  # Not the committed default run's file: named after the options changed.
  path = results / "covariance_fold_keys128_dim4_chunk64_group1_rounds2.json"
  assert sorted(p.name for p in results.iterdir()) == [path.name]
  data = _strict_load(path.read_text())
  assert str(ROOT) not in path.read_text()
  assert data["keys"] == 128 and data["dim"] == 4 and data["rounds"] == 2
  times = data["seconds"]
  assert all(len(ts) == 2 and min(ts) > 0 for ts in times.values())
  ours = next(k for k in times if k.startswith("memedit"))
  for name, ts in times.items():
    row = next(line for line in printed.splitlines() if line.startswith(f"| {name} "))
    ratio = float(row.rstrip(" |").rsplit("|", 1)[1].strip().rstrip("x"))
    assert ratio == pytest.approx(np.median(times[ours]) / np.median(ts), abs=0.006)
  assert data["summary"]["old_over_memedit_median_of_rounds"] == pytest.approx(
      np.median(np.array(times["old fold (XLA GEMM)"]) / np.array(times[ours])))
  assert data["accuracy"]["second_moment"] < 1e-5
  assert data["accuracy"]["centered"] < 1e-4


def test_gram_kernels_tiny_run_every_kernel_agrees(results, capsys):
  from benchmarks import gram_kernels

  gram_kernels.main(["--chunks", "2", "--chunk", "16", "--dim", "8", "--rounds", "1"])
  printed = capsys.readouterr().out
  data = _strict_load((results / "gram_kernels_chunks2_chunk16_dim8_rounds1.json").read_text())
  assert len(data["agreement"]) == 8 and "syrk, 2 chunks per program" in data["agreement"]
  assert max(data["agreement"].values()) < 1e-5
  base = np.median(data["seconds"]["gemm (XLA full GEMM)"])
  for name, ts in data["seconds"].items():
    assert f"| {name}" in printed and f"{base / np.median(ts):.2f}x" in printed


# --- where results go ---------------------------------------------------------------------

SCRIPTS = ["covariance_fold", "full_edit", "gram_kernels", "lambda_solve", "layer_stats",
           "layer_stats_peers", "lm_edit", "lm_memit_sweep", "lm_sequential",
           "multihost_stats", "ports_dcgan", "ports_stylegan2", "sequential_edits",
           "stats_memory", "ui_latency"]


def _unwritable_folder(tmp_path) -> Path:
  if Path("/proc/self").is_dir():  # refuses new files whoever runs the tests
    return Path("/proc/self")
  folder = tmp_path / "locked"
  folder.mkdir()
  folder.chmod(0o500)
  return folder


def test_out_dir_type_names_what_is_wrong(tmp_path):
  import argparse

  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  new = tmp_path / "new" / "deeper"
  assert common.out_dir(str(new)) == new and not new.exists()  # made when written
  assert common.out_dir(str(tmp_path)) == tmp_path
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # the probe is gone
  locked = _unwritable_folder(tmp_path)
  for text, why in ((str(a_file), "which is not a folder"),
                    (str(a_file / "sub"), "lies under"), ("", "expected a folder, got ''"),
                    (str(locked / "sub"), "can write into"), (str(locked), "can write into")):
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected a folder") as exc:
      common.out_dir(text)
    assert why in str(exc.value) and repr(text) in str(exc.value), exc.value


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_checks_out_dir_before_any_work(script, tmp_path, results, capsys):
  module = importlib.import_module(f"benchmarks.{script}")
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  with pytest.raises(SystemExit) as exc:
    module.main(["--out-dir", str(a_file / "results")])
  assert exc.value.code == 2
  err = capsys.readouterr().err
  assert "--out-dir" in err and "expected a folder" in err and str(a_file) in err, err
  assert not results.exists()


class _Decided(Exception):
  pass


PATHS = [
    ("covariance_fold", [], "covariance_fold.json"),
    ("covariance_fold", ["--keys", "1000", "--dim", "512"], "covariance_fold_keys1000.json"),
    ("covariance_fold", ["--quick", "--keys", "1000"], "covariance_fold_quick.json"),
    ("gram_kernels", ["--dim", "8"], "gram_kernels_dim8.json"),
    ("lambda_solve", ["--steps", "11", "--rank", "2"], "lambda_solve_rank2_steps11.json"),
    ("layer_stats", ["--eager-batches", "4"], "layer_stats_eager-batches4.json"),
    ("layer_stats_peers", ["--sg2-resolution", "64"], "layer_stats_peers_sg2-resolution64.json"),
    ("lm_edit", ["--tokens", "200000"], "lm_edit_tokens200000.json"),
    ("lm_edit", ["--cache-dir", "elsewhere"], "lm_edit.json"),
    ("lm_memit_sweep", ["--facts", "100", "--inner", "512"],
     "lm_memit_sweep_facts100_inner512.json"),
    ("lm_memit_sweep", ["--penalties", "100,1e4"], "lm_memit_sweep_penalties100-10000.json"),
    ("lm_memit_sweep", ["--quick", "--seed", "1"], "lm_memit_sweep_quick_seed1.json"),
    ("lm_sequential", ["--threshold", "1e-5"], "lm_sequential_threshold1e-05.json"),
    ("lm_sequential", ["--edits", "500", "--tag", "_mine"], "lm_sequential_mine.json"),
    ("lm_sequential", ["--model", "/some/demo", "--tag", "_inner512"],
     "lm_sequential_inner512.json"),
    ("multihost_stats", ["--dim", "64"], "multihost_stats_dim64.json"),
    ("ports_dcgan", ["--batches", "8"], "ports_dcgan_batches8.json"),
    # A smoke run never writes over the full run's results.
    ("ports_dcgan", ["--quick"], "ports_dcgan_quick.json"),
    ("ports_stylegan2", ["--quick"], "ports_stylegan2_quick.json"),
    ("ports_stylegan2", [], "ports_stylegan2.json"),
    ("ports_stylegan2", ["--sizes", "64", "--batches", "4", "16"],
     "ports_stylegan2_sizes64.json"),
    ("sequential_edits", ["--quick"], "sequential_edits_quick.json"),
    # An extra arm is another experiment: not over the committed three-arm run.
    ("sequential_edits", ["--preserve", "10"], "sequential_edits_with_preserve10.json"),
    ("sequential_edits", ["--stylegan2", "--preserve", "10", "--only-preserve", "--anchor",
                          "before"], "sequential_edits_stylegan2_preserve10_before.json"),
    ("full_edit", ["--quick"], "full_edit_quick.json"),
    ("full_edit", [], "full_edit.json"),
]


@pytest.mark.parametrize("script,argv,name", PATHS,
                         ids=[f"{s}:{' '.join(a)}" for s, a, _ in PATHS])
def test_runs_at_other_settings_get_a_results_file_of_their_own(script, argv, name, results,
                                                                monkeypatch):
  monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
  module = importlib.import_module(f"benchmarks.{script}")
  decided, real = [], common.results_path

  def deciding(*args, **kwargs):
    decided.append(real(*args, **kwargs))
    raise _Decided  # stop before any work

  monkeypatch.setattr(module, "results_path", deciding, raising=False)
  monkeypatch.setattr(common, "results_path", deciding)  # through common.output_file
  with pytest.raises(_Decided):
    module.main(argv)
  assert decided == [results / name]


def test_out_dir_takes_the_results_and_the_model_it_allows(tmp_path, results, monkeypatch):
  from benchmarks import stats_memory

  mine = tmp_path / "mine"
  decided = []

  def deciding(*args, **kwargs):
    decided.append(common.results_path(*args, **kwargs))
    raise _Decided

  monkeypatch.setattr(stats_memory, "results_path", deciding)
  for argv in (["--model", str(tmp_path)], ["--model", str(tmp_path), "--samples", "10"]):
    with pytest.raises(_Decided):
      stats_memory.main(argv + ["--out-dir", str(mine)])
  # Another model is allowed in a folder of one's own; sizes still name the file, and the
  # values of a list option are joined by "-".
  assert decided == [mine / "stats_memory.json", mine / "stats_memory_samples10.json"]
  decided.clear()
  with pytest.raises(_Decided):
    stats_memory.main(["--model", str(tmp_path), "--samples", "100", "1000", "--out-dir",
                       str(mine), "--layer", "convt3"])
  assert decided == [mine / "stats_memory_layerconvt3_samples100-1000.json"]
  assert not results.exists() and not mine.exists()  # nothing made before the run
  # Naming the default folder does not make it one's own.
  decided.clear()
  with pytest.raises(SystemExit) as exc:
    stats_memory.main(["--model", str(tmp_path), "--out-dir", str(results)])
  assert exc.value.code == 2 and decided == []


def test_sequential_quick_and_variant_runs_keep_their_own_edit_logs(tmp_path, monkeypatch):
  from benchmarks import sequential_edits as se

  decided = []

  def deciding(*args, **kwargs):
    decided.append(common.results_path(*args, **kwargs))
    raise _Decided

  monkeypatch.setattr(se, "results_path", deciding)

  def log(*argv):
    with pytest.raises(_Decided):
      se.main(list(argv))
    return se.log_name(decided[-1], "projected")

  names = [log(), log("--quick"), log("--stylegan2"), log("--stylegan2", "--quick"),
           log("--stylegan2", "--demo-settings"),
           log("--stylegan2", "--preserve", "3", "--only-preserve"),
           log("--stylegan2", "--preserve", "10", "--only-preserve")]
  assert len(set(names)) == len(names), names
  # The full runs' logs keep their names; a smoke run's are files of their own.
  assert names[:3] == ["projected.npz", "quick_projected.npz", "stylegan2_projected.npz"]
  assert se.log_folder(None) == ROOT / ".cache" / "sequential"
  assert se.log_folder(tmp_path) == tmp_path / "sequential_logs"


def test_paths_outside_the_working_folder_are_shown_whole(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert common.shown(tmp_path / "a" / "b.json") == os.path.join("a", "b.json")
  elsewhere = Path(os.path.abspath(os.sep)) / "elsewhere" / "b.json"
  assert common.shown(elsewhere) == str(elsewhere)
