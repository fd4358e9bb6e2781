"""Interference diagnostics: predictions from the factors against the change measured on
the applied kernels (float64 numpy layers, dense and conv), warnings, tables."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import memedit
from memedit import sequential as sq
from memedit.tree import get_leaf

PATH = ("params", "layer", "kernel")


def make_log(rng, kernel_shape, kind, n_edits=3, weights=False):
  d = memedit.key_dim(kernel_shape, kind)
  log = sq.log_init()
  shared = rng.standard_normal((1, d))
  for i in range(n_edits):
    rank = 1 + i % 2
    D = (rng.standard_normal((rank, d)) + shared).astype(np.float32)
    lam = (0.5 * rng.standard_normal(memedit.lambda_shape(kernel_shape, rank, kind))
           ).astype(np.float32)
    edit = memedit.make_edit(PATH, lam, D, kind=kind, label=f"e{i}")
    keys = (rng.standard_normal((3, d)) + shared).astype(np.float32)
    w = rng.uniform(0.2, 1.0, 3).astype(np.float32) if weights else None
    log = sq.log_append(log, edit, keys, weights=w)
  return log


def dense_layer(kernel, keys):
  """float64 reference: a Dense layer (in, out) on keys (n, in)."""
  return np.asarray(keys, np.float64) @ np.asarray(kernel, np.float64)


def conv_alone(kernel, key):
  """float64 reference: a stride-1 'SAME' convolution (HWIO) of a 7×7 map whose only
  non-zero pixel, at the centre, is ``key``; the whole output map."""
  kernel = np.asarray(kernel, np.float64)
  kh, kw, cin, cout = kernel.shape
  x = np.zeros((7 + kh - 1, 7 + kw - 1, cin))
  x[3 + kh // 2, 3 + kw // 2] = key
  out = np.zeros((7, 7, cout))
  for y in range(7):
    for z in range(7):
      out[y, z] = np.einsum("hwi,hwio->o", x[y:y + kh, z:z + kw], kernel)
  return out


def measured(layer, before, after, keys, weights):
  """√(Σ w ‖layer(after, k) − layer(before, k)‖²), each key alone."""
  w = np.ones(len(keys)) if weights is None else np.asarray(weights, np.float64)
  total = 0.0
  for k, wk in zip(np.asarray(keys, np.float64), w):
    diff = layer(after, k) - layer(before, k)
    total += wk * np.sum(diff * diff)
  return np.sqrt(total)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_predicted_interference_matches_the_measured_change(kind):
  rng = np.random.default_rng(0 if kind == "dense" else 1)
  shape = (6, 4) if kind == "dense" else (3, 3, 5, 4)
  layer = (lambda K, k: dense_layer(K, k[None])[0]) if kind == "dense" else conv_alone
  params = {"params": {"layer": {"kernel": rng.standard_normal(shape).astype(np.float32)}}}
  log = make_log(rng, shape, kind, weights=(kind == "conv"))
  n = len(log)
  # The kernels actually applied: after edits 0..i, and the unedited one.
  kernels = [np.asarray(get_leaf(params, PATH), np.float64)]
  for i in range(n):
    kernels.append(np.asarray(get_leaf(sq.log_apply(params, sq.EditLog(log.entries[:i + 1])),
                                      PATH), np.float64))
  for relative_to in ("edit", "output"):
    inter = sq.interference_matrix(log, params=params, relative_to=relative_to)
    for i, ei in enumerate(log.entries):
      own = measured(layer, kernels[i], kernels[i + 1], ei.keys, ei.weights)
      stored = measured(layer, np.zeros(shape), kernels[i + 1], ei.keys, ei.weights)
      for j in range(n):
        # Edit j's change alone, measured on the applied kernels.
        change = measured(layer, kernels[j], kernels[j + 1], ei.keys, ei.weights)
        want = change / (own if relative_to == "edit" else stored)
        np.testing.assert_allclose(inter.matrix[i, j], want, rtol=1e-4)
  # check_edit's row for the last edit is the last column of the matrix.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", sq.InterferenceWarning)
    check = sq.check_edit(sq.EditLog(log.entries[:-1]), log.entries[-1].edit, params=params)
  np.testing.assert_allclose(check.interference,
                             sq.interference_matrix(log).matrix[:-1, -1], rtol=1e-12)
  rows = sq.growth(log, params)
  np.testing.assert_allclose(check.norm, [np.linalg.norm(kernels[-2]),
                                          np.linalg.norm(kernels[-1])], rtol=1e-5)
  np.testing.assert_allclose(rows[-1]["norm"], np.linalg.norm(kernels[-1]), rtol=1e-5)
  m = sq.memory_matrix(kernels[-1], kind)
  s = np.linalg.svd(m, compute_uv=False)
  np.testing.assert_allclose(check.condition[1], s[0] / s[-1], rtol=1e-4)
  np.testing.assert_allclose(rows[-1]["condition"], s[0] / s[-1], rtol=1e-4)


def test_check_edit_warns_past_the_thresholds():
  rng = np.random.default_rng(2)
  d, out = 6, 3
  params = {"k": np.eye(d, out, dtype=np.float32) * 10}
  key = np.eye(d, dtype=np.float32)[:1]
  first = memedit.make_edit(("k",), np.ones((out, 1)), key, label="first")
  log = sq.log_append(sq.log_init(), first, key)
  overlapping = memedit.make_edit(("k",), 0.5 * np.ones((out, 1)), key + np.eye(d)[1:2],
                                  label="overlap")
  with pytest.warns(sq.InterferenceWarning, match="earlier edit 'first' by 0.5"):
    c = sq.check_edit(log, overlapping)
  np.testing.assert_allclose(c.interference, [0.5])
  orthogonal = memedit.make_edit(("k",), 0.01 * np.ones((out, 1)), np.eye(d)[2:3],
                                 label="apart")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    c = sq.check_edit(log, orthogonal, params=params)
  assert c.interference.tolist() == [0.0] and c.warnings == ()
  big = memedit.make_edit(("k",), 10 * rng.standard_normal((out, 1)), np.eye(d)[3:4],
                          label="big")
  with pytest.warns(sq.InterferenceWarning, match="Frobenius norm"):
    c = sq.check_edit(log, big, params=params)
  assert c.norm_growth[1] > 0.1 and not any("earlier edit" in m for m in c.warnings)
  quiet = sq.check_edit(log, big, params=params, warn=False, max_norm_growth=1e9,
                        max_condition_growth=1e9)
  assert quiet.warnings == ()
  text = sq.format_check(sq.check_edit(log, overlapping, warn=False))
  assert "first" in text and "!" in text
  with pytest.raises(ValueError, match="relative_to"):
    sq.check_edit(log, big, relative_to="output")


def test_sequential_insert_warns_before_unprojected_interference():
  rng = np.random.default_rng(3)
  d, out = 8, 3
  data = rng.standard_normal((200, 4)) @ np.linalg.qr(rng.standard_normal((d, 4)))[0].T
  C = (data.T @ data / 200).astype(np.float32)
  params = {"k": rng.standard_normal((d, out)).astype(np.float32)}
  keys = rng.standard_normal((2, d)).astype(np.float32)
  values = rng.standard_normal((2, out)).astype(np.float32)
  log, _ = sq.sequential_insert(params, sq.log_init(), C, keys, values, ("k",), l2=1e-3,
                                label="a")
  p = sq.log_apply(params, log)
  near = keys + 0.1 * rng.standard_normal((2, d)).astype(np.float32)
  with pytest.warns(sq.InterferenceWarning, match="earlier edit 'a'"):
    sq.sequential_insert(p, log, C, near, values[::-1], ("k",), project=False, label="b")
  # Projected, the new edit leaves the earlier keys alone; but keys this close to the
  # preserved span need a large change, and the check says so.
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    log2, e = sq.sequential_insert(p, log, C, near, values[::-1], ("k",), l2=1e-3,
                                   label="b", base_params=params)
  messages = [str(w.message) for w in caught if w.category is sq.InterferenceWarning]
  assert not any("earlier edit" in m for m in messages)
  assert any("Frobenius norm" in m for m in messages)
  assert e.method == "alphaedit" and e.settings["preserved_keys"] == 2
  text = sq.format_log(log2, params=params, relative_to="output")
  assert "growth" in text and "alphaedit" in text
  many = sq.log_init()
  for i in range(14):
    many = sq.log_append(many, memedit.make_edit(("k",), np.ones((out, 1)),
                                                 np.eye(d)[i % d][None], label=f"m{i}"),
                         np.eye(d)[(i + 1) % d][None])
  assert "largest entries above the diagonal" in sq.format_log(many)


def _two_edits(first_lam=1.0):
  a = memedit.make_edit(("k",), first_lam * np.ones((2, 1)), np.array([[1.0, 0.0]]), label="a")
  b = memedit.make_edit(("k",), np.ones((2, 1)), np.array([[1.0, 1.0]]), label="b")
  return sq.log_append(sq.log_append(sq.log_init(), a, np.eye(2)[:1]), b, np.eye(2)[1:] + 1)


def test_an_edit_that_changed_nothing_gives_inf_not_a_huge_number():
  log = _two_edits(first_lam=0.0)  # edit a writes nothing at its keys; b moves them
  inter = sq.interference_matrix(log)
  assert inter.matrix[0, 0] == 0.0 and inter.matrix[0, 1] == np.inf
  text = sq.format_log(log)
  assert "inf  !" in text and "    inf" in text and "e+" not in text
  assert len(max(text.splitlines(), key=len)) < 120
  c = sq.check_edit(sq.EditLog(log.entries[:1]), log.entries[1].edit, warn=False)
  assert c.interference.tolist() == [np.inf] and "by inf" in c.warnings[0]


def test_a_kernel_that_does_not_fit_the_log_is_refused():
  log = _two_edits()  # dense edits of a (2, 2) kernel
  # (2, 1): its memory matrix (1, 2) would broadcast against the edits' (2, 2) changes.
  for kernel in (np.ones((2, 1)), np.ones((3, 2)), np.ones((2, 2, 2))):
    params = {"k": kernel}
    calls = (lambda: sq.growth(log, params),
             lambda: sq.interference_matrix(log, params=params, relative_to="output"),
             lambda: sq.format_log(log, params=params),
             lambda: sq.check_edit(sq.EditLog(log.entries[:1]), log.entries[1].edit,
                                   params=params, warn=False))
    for call in calls:
      with pytest.raises(ValueError, match=r"params: expected the kernel at \('k',\) to fit "
                                           r"edit '[ab]'.*another model"):
        call()
  stacked = memedit.make_edit(("k",), np.ones((2, 1)), np.array([[1.0, 0.0]]), label="s",
                              index=3)
  slog = sq.log_append(sq.log_init(), stacked, np.eye(2))
  with pytest.raises(ValueError, match="stacked over at least 4 layers"):
    sq.growth(slog, {"k": np.ones((2, 2, 2))})
  assert sq.growth(slog, {"k": np.ones((4, 2, 2))})[0]["index"] == 3


def test_edits_of_one_leaf_with_other_key_dimensions_are_named():
  a = memedit.make_edit(("k",), np.ones((2, 1)), np.ones((1, 3)), label="a3")
  b = memedit.make_edit(("k",), np.ones((2, 1)), np.ones((1, 2)), label="b2")
  log = sq.log_append(sq.log_init(), a, np.ones((1, 3)))
  with pytest.raises(ValueError, match="key dimension 3 like the earlier edit 'a3'"):
    sq.check_edit(log, b)
  with pytest.raises(ValueError, match=r"expected key dimension 3 on the leaf \('k',\)"):
    sq.log_append(log, b, np.ones((1, 2)))
  # A log put together by hand (not through log_append) is still named by the diagnostics.
  mixed = sq.EditLog(log.entries + (sq.LogEntry(b, np.ones((1, 2), np.float32)),))
  with pytest.raises(ValueError, match=r"share a key dimension, got \{'a3': 3, 'b2': 2\}"):
    sq.interference_matrix(mixed)
  with pytest.raises(ValueError, match=r"keys: expected shape \(n, 2\)"):
    sq.key_change(np.eye(2), np.ones((1, 3)))


def test_diagnostics_refuse_bad_arguments_by_name():
  log = _two_edits()
  edit = log.entries[1].edit
  first = sq.EditLog(log.entries[:1])
  for bad in ("0.1", None, np.array([0.1, 0.2]), -1.0, float("nan")):
    with pytest.raises(ValueError, match="max_interference: expected a number"):
      sq.check_edit(first, edit, max_interference=bad)
    with pytest.raises(ValueError, match="max_interference: expected a number"):
      sq.format_log(log, max_interference=bad)
  with pytest.raises(ValueError, match="max_columns: expected an int >= 0, got -1"):
    sq.format_log(log, max_columns=-1)
  for call in (lambda: sq.check_edit([], edit), lambda: sq.interference_matrix([]),
               lambda: sq.growth((), {"k": np.eye(2)}), lambda: sq.format_log(None)):
    with pytest.raises(ValueError, match="log: expected an EditLog"):
      call()
  with pytest.raises(ValueError, match="check: expected an EditCheck"):
    sq.format_check(None)


def test_cli_on_a_log_of_another_model_prints_nothing(tmp_path, capsys, monkeypatch):
  import argparse
  import sys
  import types

  from memedit.sequential.cli import run_log

  f = sq.save_log(tmp_path / "log.npz", _two_edits())
  model = tmp_path / "model"
  model.mkdir()
  fake = types.SimpleNamespace(load_converted=lambda d: (None, {"k": np.ones((3, 2))}))
  monkeypatch.setitem(sys.modules, "ports", fake)
  args = argparse.Namespace(log=f, model=str(model), relative_to="edit", threshold=0.1,
                            json=None)
  with pytest.raises(ValueError, match="to fit edit 'a'"):
    run_log(args)
  assert capsys.readouterr().out == ""


def test_the_json_report_is_standard_json_with_inf_as_a_string(tmp_path):
  import argparse
  import json

  from memedit.sequential.cli import run_log

  log = _two_edits(first_lam=0.0)  # I[0, 1] = inf
  other = memedit.make_edit(("j",), np.ones((2, 1)), np.array([[1.0, 0.0]]), label="c")
  log = sq.log_append(log, other, np.eye(2)[:1])  # another leaf: I[0, 2] does not apply
  f = sq.save_log(tmp_path / "log.npz", log)
  out = tmp_path / "r.json"
  args = argparse.Namespace(log=f, model=None, relative_to="edit", threshold=0.1,
                            json=str(out))
  assert run_log(args) == 0

  def refuse(token):
    raise AssertionError(f"non-standard JSON token {token}")

  report = json.loads(out.read_text(), parse_constant=refuse)
  want = sq.interference_matrix(log).matrix
  assert report["interference"][0][:2] == [0.0, "inf"]
  assert report["interference"][0][2] is None and report["interference"][2][0] is None
  assert report["interference"][1][1] == want[1, 1]
