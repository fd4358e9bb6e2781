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
    ("ui_latency", ["--model", "/nonexistent/model"], "--model"),
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


@pytest.mark.parametrize("script", ["ports_dcgan", "ports_stylegan2"])
def test_a_smoke_run_does_not_write_over_the_full_runs_results(script, results):
  module = importlib.import_module(f"benchmarks.{script}")
  full, quick = module.default_out(False), module.default_out(True)
  assert full == results / f"{script}.json"
  assert quick == results / f"{script}_quick.json"


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
  path = results / "covariance_fold.json"
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
  data = _strict_load((results / "gram_kernels.json").read_text())
  assert len(data["agreement"]) == 8 and "syrk, 2 chunks per program" in data["agreement"]
  assert max(data["agreement"].values()) < 1e-5
  base = np.median(data["seconds"]["gemm (XLA full GEMM)"])
  for name, ts in data["seconds"].items():
    assert f"| {name}" in printed and f"{base / np.median(ts):.2f}x" in printed
