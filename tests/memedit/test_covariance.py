"""Streaming covariance against float64 numpy on 1e6 keys of dim 128 whose mean is 10σ, and
the Gram kernels of the fold against float64 at dim 520."""

from __future__ import annotations

import collections.abc
import json
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

import memedit
from compilations import Compilations
from memedit import fold_programs, gram

D = 128
CHUNK = 62_500
N_CHUNKS = 16  # 1e6 keys


@pytest.fixture(scope="module", autouse=True)
def _syrk_kernel():
  """The CPU Gram kernel is BLAS syrk here, whatever the machine's load (``auto`` picks
  XLA's GEMM on a busy CPU); tests that need the GEMM set it themselves."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(gram, "CPU_GRAM", "syrk")
    yield


def rel(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


LEVELS = np.array([0.0, 0.25, 0.5, 1.0], np.float32)  # a quantised soft mask
POOL = 8192  # distinct keys the 1e6 keys are drawn from


class _Chunks(collections.abc.Sequence):
  """Chunk i of the keys (or of their weights), gathered from the pool when asked for."""

  def __init__(self, table, index):
    self.table, self.index = table, index

  def __len__(self):
    return N_CHUNKS

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(N_CHUNKS))]
    if not -N_CHUNKS <= i < N_CHUNKS:
      raise IndexError(i)
    i %= N_CHUNKS
    return self.table[self.index[i * CHUNK:(i + 1) * CHUNK]]


@pytest.fixture(scope="module")
def big():
  """1e6 keys (mean 10σ, anisotropic) with per-key weights and float64 reference sums.

  The keys are drawn with replacement from a pool of 8,192 keys and the weights from four
  levels, so the float64 references are sums over the pool with counts: with c_jv the
  number of keys equal to pool key x_j with weight level v,
  Σ xxᵀ = Σ_j (Σ_v c_jv) x_j x_jᵀ and Σ w xxᵀ = Σ_j (Σ_v v c_jv) x_j x_jᵀ. The fold itself
  sees 1e6 keys in random order, exactly as it would a fresh sample.
  """
  rng = np.random.default_rng(1234)
  mean = (10.0 * rng.standard_normal(D)).astype(np.float32)
  scales = np.exp(rng.uniform(-1, 1, D)).astype(np.float32)
  pool = rng.standard_normal((POOL, D), dtype=np.float32) * scales + mean
  n = N_CHUNKS * CHUNK
  idx = rng.integers(0, POOL, n).astype(np.int32)
  level = rng.integers(0, len(LEVELS), n).astype(np.int32)
  counts = np.bincount(idx * len(LEVELS) + level, minlength=POOL * len(LEVELS))
  counts = counts.reshape(POOL, len(LEVELS)).astype(np.float64)
  c = counts.sum(1)
  cw = counts @ LEVELS.astype(np.float64)
  x64 = pool.astype(np.float64)
  s1, s2 = c @ x64, (x64 * c[:, None]).T @ x64
  w1, w2 = cw @ x64, (x64 * cw[:, None]).T @ x64
  wsum = float(cw.sum())
  mu = s1 / n
  wmu = w1 / wsum
  return dict(
      chunks=_Chunks(pool, idx), weights=_Chunks(LEVELS, level),
      C=s2 / n, mean=mu, cov=s2 / n - np.outer(mu, mu),
      wC=w2 / wsum, wmean=wmu, wcov=w2 / wsum - np.outer(wmu, wmu), wsum=wsum,
      n_weighted=int(counts[:, 1:].sum()))


def test_streamed_uncentered_and_centered(big):
  st = memedit.stream_covariance(big["chunks"], group=4, progress=False)
  assert memedit.key_count(st) == N_CHUNKS * CHUNK
  assert rel(memedit.second_moment(st), big["C"]) <= 1e-6
  assert rel(memedit.centered_covariance(st), big["cov"]) <= 1e-6
  assert rel(memedit.key_mean(st), big["mean"]) <= 1e-6


def test_weighted_and_merged(big):
  update = jax.jit(memedit.covariance_update)
  halves = []
  for part in (slice(0, N_CHUNKS // 2), slice(N_CHUNKS // 2, N_CHUNKS)):
    st = memedit.covariance_init(D)
    for x, w in zip(big["chunks"][part], big["weights"][part]):
      st = update(st, x, w)
    halves.append(st)
  merged = memedit.covariance_merge(*halves)
  assert memedit.key_count(merged) == big["n_weighted"]  # zero-weight keys are not counted
  assert abs(float(memedit.total_weight(merged)) - big["wsum"]) / big["wsum"] <= 1e-6
  assert rel(memedit.second_moment(merged), big["wC"]) <= 1e-6
  assert rel(memedit.centered_covariance(merged), big["wcov"]) <= 1e-6
  assert rel(memedit.key_mean(merged), big["wmean"]) <= 1e-6


class _Interrupted(Exception):
  pass


def test_resumed_after_interruption(big, tmp_path):
  def stream(fail_at=None):
    for i, x in enumerate(big["chunks"]):
      if fail_at is not None and i == fail_at:
        raise _Interrupted
      yield x

  key = memedit.covariance_cache_key("test-content", {"n": N_CHUNKS, "chunk": CHUNK}, jnp.float32)
  with pytest.raises(_Interrupted):
    memedit.stream_covariance(stream(fail_at=9), group=4, progress=False, cache_dir=tmp_path,
                              cache_key=key, total=N_CHUNKS)
  # Two groups of 4 were folded and saved before the interruption.
  partial, meta = memedit._io.load_tree(tmp_path / key)
  assert meta["batches"] == 8 and not meta["complete"]
  calls = []
  make = fold_programs.make_group_fn

  def counting_make(*args):
    fn = make(*args)

    def counted(*a):
      calls.append(1)
      return fn(*a)

    return counted

  import unittest.mock
  with unittest.mock.patch.object(fold_programs, "make_group_fn", counting_make):
    st = memedit.stream_covariance(stream(), group=4, progress=False, cache_dir=tmp_path,
                                   cache_key=key, key_fn=lambda x: x)
  # Only the 8 batches not folded before were folded now: 2 groups of 4.
  assert len(calls) == 2
  assert memedit.key_count(st) == N_CHUNKS * CHUNK
  assert rel(memedit.second_moment(st), big["C"]) <= 1e-6
  assert rel(memedit.centered_covariance(st), big["cov"]) <= 1e-6
  # A finished run is served from the cache without touching the stream.
  again = memedit.stream_covariance(iter(()), progress=False, cache_dir=tmp_path, cache_key=key)
  np.testing.assert_array_equal(np.asarray(again.sum_sq), np.asarray(st.sum_sq))


def test_cache_key_depends_on_content_spec_and_dtype():
  k = memedit.covariance_cache_key("abc", {"seed": 1, "n": 10}, jnp.float32)
  assert k == memedit.covariance_cache_key("abc", {"n": 10, "seed": 1}, "float32")
  assert k != memedit.covariance_cache_key("abd", {"seed": 1, "n": 10}, jnp.float32)
  assert k != memedit.covariance_cache_key("abc", {"seed": 2, "n": 10}, jnp.float32)
  assert k != memedit.covariance_cache_key("abc", {"seed": 1, "n": 10}, jnp.bfloat16)


def test_key_fn_masks_progress_and_no_retrace(capsys):
  rng = np.random.default_rng(0)
  proj = rng.standard_normal((6, 4)).astype(np.float32)
  batches = [rng.standard_normal((5, 3, 6)).astype(np.float32) for _ in range(7)]
  masks = [rng.uniform(size=(5, 3)).astype(np.float32) for _ in range(7)]

  def key_fn(b):
    x, m = b
    return jnp.tanh(x @ proj), m

  st = memedit.stream_covariance(list(zip(batches, masks)), key_fn=key_fn, group=3, progress=True)
  err = capsys.readouterr().err
  assert "7/7 batches" in err
  keys = np.concatenate([np.tanh(b.astype(np.float64) @ proj).reshape(-1, 4) for b in batches])
  w = np.concatenate([m.reshape(-1) for m in masks]).astype(np.float64)
  ref = (keys * w[:, None]).T @ keys / w.sum()
  assert rel(memedit.second_moment(st), ref) <= 1e-6

  # Eager and jit agree; the same shapes never compile twice.
  x = batches[0].reshape(-1, 6)
  eager = memedit.covariance_update(memedit.covariance_init(6), x)
  jitted = jax.jit(memedit.covariance_update)(memedit.covariance_init(6), x)
  np.testing.assert_allclose(eager.sum_sq, jitted.sum_sq, rtol=1e-6, atol=1e-6)
  s = memedit.covariance_update(memedit.covariance_init(6), x + 1.0)
  with Compilations() as comp:
    for b in batches:
      s = memedit.covariance_update(s, b.reshape(-1, 6) + 1.0)
  assert comp.count == 0


def test_exact_counts_past_2_to_the_32():
  st = memedit.covariance_init(2)
  st = st._replace(count=jnp.array([2**32 - 10, 0], jnp.uint32))
  st = memedit.covariance_update(st, np.ones((20, 2), np.float32))
  assert memedit.key_count(st) == 2**32 + 10
  big = st._replace(count=jnp.array([2**32 - 1, 7], jnp.uint32))
  merged = memedit.covariance_merge(big, big)
  assert memedit.key_count(merged) == 2 * (7 * 2**32 + 2**32 - 1)


def test_bad_input_errors():
  st = memedit.covariance_init(4)
  with pytest.raises(ValueError, match=r"expected shape \(\.\.\., 4\), got \(3, 5\)"):
    memedit.covariance_update(st, np.ones((3, 5), np.float32))
  with pytest.raises(ValueError, match="weights: expected a shape that broadcasts"):
    memedit.covariance_update(st, np.ones((3, 4), np.float32), np.ones((4,)))
  bad = np.ones((3, 4), np.float32)
  bad[1, 2] = np.nan
  st2 = memedit.covariance_update(st, bad)
  with pytest.raises(ValueError, match=r"expected finite keys, got 1 key\(s\)"):
    memedit.second_moment(st2)
  with pytest.raises(ValueError, match="at least one key"):
    memedit.second_moment(st)
  with pytest.raises(ValueError, match="dim: expected a positive int"):
    memedit.covariance_init(0)
  with pytest.raises(ValueError, match="same dimension"):
    memedit.covariance_merge(st, memedit.covariance_init(3))
  with pytest.raises(ValueError, match="keys: expected last dimension 3, got 4"):
    memedit.stream_covariance([np.ones((2, 4), np.float32)], dim=3, progress=False)
  with pytest.raises(ValueError, match="expected every batch to have shape"):
    memedit.stream_covariance([np.ones((2, 4), np.float32), np.ones((2, 3), np.float32)],
                              progress=False)
  with pytest.raises(ValueError, match="group: expected a positive int, got 0"):
    memedit.stream_covariance([np.ones((2, 4), np.float32)], group=0, progress=False)
  with pytest.raises(ValueError, match="empty stream"):
    memedit.stream_covariance([], progress=False)


SHARDED = textwrap.dedent("""
    import json, sys
    import numpy as np, jax
    import memedit
    assert len(jax.local_devices()) == 4, jax.local_devices()
    rng = np.random.default_rng(7)
    mean = 10 * rng.standard_normal(64).astype(np.float32)
    batches = [(rng.standard_normal((1001, 64)).astype(np.float32) + mean) for _ in range(9)]
    proj = rng.standard_normal((64, 48)).astype(np.float32)
    key_fn = lambda b: b @ proj
    one = memedit.stream_covariance(batches, key_fn=key_fn, group=4, devices=1, progress=False)
    four = memedit.stream_covariance(batches, key_fn=key_fn, group=4, devices=4, progress=False)
    keys = np.concatenate([b.astype(np.float64) @ proj for b in batches])
    ref = keys.T @ keys / len(keys)
    # covariance_update on keys sharded over the 4 devices: a partitioned program.
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.array(jax.local_devices()), ("data",))
    k32 = np.concatenate([b @ proj for b in batches])[:9000]
    upd = memedit.covariance_update(memedit.covariance_init(48),
                                    jax.device_put(k32, NamedSharding(mesh, P("data"))))
    k64 = k32.astype(np.float64)
    rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))
    print(json.dumps(dict(
        n1=memedit.key_count(one), n4=memedit.key_count(four),
        one_ref=rel(memedit.second_moment(one), ref),
        four_ref=rel(memedit.second_moment(four), ref),
        update_ref=rel(memedit.second_moment(upd), k64.T @ k64 / len(k64)),
        four_one=rel(memedit.second_moment(four), np.asarray(memedit.second_moment(one), np.float64)),
        cov_four_one=rel(memedit.centered_covariance(four),
                         np.asarray(memedit.centered_covariance(one), np.float64)))))
""")


def test_sharded_over_four_host_devices_equals_single_device():
  env = dict(os.environ,
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", MEMEDIT_CPU_GRAM="syrk")
  proc = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["n1"] == out["n4"] == 9 * 1001
  assert out["one_ref"] <= 1e-6 and out["four_ref"] <= 1e-6 and out["update_ref"] <= 1e-6
  assert out["four_one"] <= 1e-6 and out["cov_four_one"] <= 1e-6


def test_nonfinite_rows_are_left_out_exactly():
  # Rows holding NaN or ±inf (weighted or not) are counted and skipped; the finite rows
  # fold exactly as if they were alone, including the shift taken from the first batch.
  rng = np.random.default_rng(5)
  keys = (rng.standard_normal((2, 6, 3)) + 4.0).astype(np.float32)
  weights = rng.uniform(0.5, 2.0, (2, 6)).astype(np.float32)
  weights[1, 4] = 0.0
  bad = keys.copy()
  bad[0, 1, 2], bad[1, 3, 0], bad[1, 4, 1] = np.nan, np.inf, -np.inf  # last one unweighted
  keep = np.isfinite(bad).all(-1)
  for update in (memedit.covariance_update, jax.jit(memedit.covariance_update)):
    st_bad, st_ref = memedit.covariance_init(3), memedit.covariance_init(3)
    for b in range(2):
      st_bad = update(st_bad, bad[b], weights[b])
      st_ref = update(st_ref, keys[b][keep[b]], weights[b][keep[b]])
    assert int(st_bad.nonfinite) == 2
    assert memedit.key_count(st_bad) == memedit.key_count(st_ref) == int(keep.sum()) == 9
    for field in ("shift", "sum", "sum_sq"):
      np.testing.assert_allclose(getattr(st_bad, field), getattr(st_ref, field), rtol=1e-6,
                                 atol=1e-6)
    np.testing.assert_allclose(memedit.total_weight(st_bad), memedit.total_weight(st_ref),
                               rtol=1e-7)


def _moment64(keys, weights):
  k = np.asarray(keys, np.float64).reshape(-1, np.shape(keys)[-1])
  w = np.asarray(weights, np.float64).reshape(-1)
  return (w[:, None] * k).T @ k / w.sum()


def test_nonfinite_weights_refuse_their_key():
  # A NaN or ±inf weight refuses its key like a NaN key does: counted, not folded, and
  # the result functions raise (NaN under jit), instead of an all-NaN C.
  rng = np.random.default_rng(11)
  keys = (rng.standard_normal((8, 3)) + 2.0).astype(np.float32)
  weights = rng.uniform(0.5, 2.0, 8).astype(np.float32)
  bad = weights.copy()
  bad[2], bad[5] = np.nan, np.inf
  keep = np.isfinite(bad)
  for update in (memedit.covariance_update, jax.jit(memedit.covariance_update)):
    st = update(memedit.covariance_init(3), keys, bad)
    ref = update(memedit.covariance_init(3), keys[keep], weights[keep])
    assert int(st.nonfinite) == 2
    assert memedit.key_count(st) == 6
    for field in ("shift", "sum", "sum_sq"):
      np.testing.assert_allclose(getattr(st, field), getattr(ref, field), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"second_moment: expected finite keys, got 2 key\(s\)"):
      memedit.second_moment(st)
    assert np.isnan(np.asarray(jax.jit(memedit.second_moment)(st))).all()
    np.testing.assert_allclose(memedit.second_moment(ref), _moment64(keys[keep], weights[keep]),
                               rtol=1e-5)


def test_large_finite_keys_are_not_counted_as_nonfinite_and_overflow_raises():
  rng = np.random.default_rng(12)
  keys = rng.standard_normal((6, 4)).astype(np.float32)
  big = keys.copy()
  big[3] = 3e38  # finite, but its row sum and its square overflow float32
  st = memedit.covariance_update(memedit.covariance_init(4), big)
  assert int(st.nonfinite) == 0
  assert memedit.key_count(st) == 6
  with pytest.raises(ValueError, match="second_moment: expected finite accumulated sums"):
    memedit.second_moment(st)
  with pytest.raises(ValueError, match="key_mean: expected finite accumulated sums"):
    memedit.key_mean(st)
  assert np.isnan(np.asarray(jax.jit(memedit.second_moment)(st))).all()
  # Keys near 1e20: the shifted sums stay finite (so Σ does) but C = E[k kᵀ] overflows.
  huge = (1e20 * (1.0 + 0.01 * keys)).astype(np.float32)
  st = memedit.covariance_update(memedit.covariance_init(4), huge)
  cov = np.asarray(memedit.centered_covariance(st), np.float64)
  np.testing.assert_allclose(cov, np.cov(huge.T.astype(np.float64), bias=True), rtol=1e-3)
  with pytest.raises(ValueError, match="second_moment: expected a finite result.*overflows"):
    memedit.second_moment(st)
  assert np.isnan(np.asarray(jax.jit(memedit.second_moment)(st))).all()


def test_weights_align_with_the_keys_leading_axes():
  rng = np.random.default_rng(13)
  keys = rng.standard_normal((5, 5, 5, 3)).astype(np.float32)
  per_image = np.array([1.0, 0.0, 2.0, 0.5, 0.0], np.float32)
  full = np.broadcast_to(per_image[:, None, None], (5, 5, 5))
  ref = _moment64(keys, full)
  for w in (per_image, per_image[:, None], per_image[:, None, None]):
    for update in (memedit.covariance_update, jax.jit(memedit.covariance_update)):
      st = update(memedit.covariance_init(3), keys, w)
      assert memedit.key_count(st) == 75
      np.testing.assert_allclose(memedit.second_moment(st), ref, rtol=1e-5, atol=1e-6)
  rows = rng.uniform(size=(5, 5)).astype(np.float32)  # per image and row
  st = memedit.covariance_update(memedit.covariance_init(3), keys, rows)
  np.testing.assert_allclose(memedit.second_moment(st),
                             _moment64(keys, np.broadcast_to(rows[:, :, None], (5, 5, 5))),
                             rtol=1e-5, atol=1e-6)
  # A shape that only fits the trailing axes is refused rather than applied there.
  with pytest.raises(ValueError, match=r"weights: expected a shape that broadcasts to a "
                                       r"leading part of the keys' leading shape \(2, 5\).*"
                                       r"got \(5,\)"):
    memedit.covariance_update(memedit.covariance_init(3), keys[:2, 0], np.ones(5, np.float32))


def test_float64_keys_are_folded_in_float64_under_x64():
  rng = np.random.default_rng(14)
  keys = rng.standard_normal((300, 6)) * 1e-3 + 1.0  # mean 1000σ: float32 loses C's spread
  w = rng.uniform(0.5, 1.5, 300)
  with enable_x64():
    st = memedit.covariance_update(memedit.covariance_init(6), keys, w)
    assert st.sum_sq.dtype == jnp.float64 and st.weight.dtype == jnp.float64
    C = memedit.second_moment(st)
    cov = memedit.centered_covariance(st)
    assert C.dtype == cov.dtype == jnp.float64
    ref = _moment64(keys, w)
    mu = (w[:, None] * keys).sum(0) / w.sum()
    assert rel(C, ref) <= 1e-13
    assert rel(cov, _moment64(keys - mu, w)) <= 1e-9
    st64 = memedit.covariance_update(memedit.covariance_init(6, dtype=jnp.float64), keys, w)
    np.testing.assert_array_equal(memedit.second_moment(st64), C)
    # Float32 keys keep a float32 state, and a merge widens to the wider of the two.
    st32 = memedit.covariance_update(memedit.covariance_init(6), keys.astype(np.float32))
    assert st32.sum_sq.dtype == jnp.float32
    merged = memedit.covariance_merge(st32, st)
    assert merged.sum_sq.dtype == jnp.float64
    assert memedit.key_count(merged) == 600


def test_negative_weights_under_jit_are_refused_like_nonfinite_ones():
  keys = np.arange(12, dtype=np.float32).reshape(4, 3)
  w = np.array([1.0, -1.0, 1.0, 1.0], np.float32)
  with pytest.raises(ValueError, match="weights: expected non-negative weights"):
    memedit.covariance_update(memedit.covariance_init(3), keys, w)
  st = jax.jit(memedit.covariance_update)(memedit.covariance_init(3), keys, w)
  assert int(st.nonfinite) == 1
  assert memedit.key_count(st) == 3
  with pytest.raises(ValueError, match=r"expected finite keys, got 1 key\(s\).*negative weight"):
    memedit.second_moment(st)
  assert np.isnan(np.asarray(jax.jit(memedit.centered_covariance)(st))).all()
  assert np.isnan(np.asarray(jax.jit(memedit.key_mean)(st))).all()


# ----------------------------------------------------------------------------------------
# The Gram kernels of the fold.


def test_gram_kernels_match_float64_eagerly_under_jit_vmap_and_grad():
  # d = 520: above the BLAS's blocking and not a multiple of the XLA block size.
  rng = np.random.default_rng(21)
  x = (rng.standard_normal((3000, 520)) + 0.5).astype(np.float32)
  ref = x.astype(np.float64).T @ x.astype(np.float64)
  kernels = {"gram": gram.gram, "blas": gram.gram_blas, "xla": gram.gram_xla,
             "blocked": lambda a: gram.gram_blocked(a, block=128)}
  for name, fn in kernels.items():
    for run in (fn, jax.jit(fn)):
      out = np.asarray(run(x))
      assert out.dtype == np.float32 and rel(out, ref) <= 1e-6, name
      if name != "xla":  # computed from one triangle: symmetric to the bit
        np.testing.assert_array_equal(out, out.T)
  # A batch of chunks (vmap) and the derivative d(XᵀX) = TᵀX + XᵀT.
  small = x[:40, :6]
  both = np.stack([small, 2 * small])
  np.testing.assert_allclose(jax.vmap(gram.gram)(both), [small.T @ small, 4 * small.T @ small],
                             rtol=1e-5)
  t = rng.standard_normal(small.shape).astype(np.float32)
  _, tangent = jax.jvp(gram.gram, (small,), (t,))
  np.testing.assert_allclose(tangent, t.T @ small + small.T @ t, rtol=1e-4, atol=1e-4)
  g = jax.grad(lambda a: jnp.sum(gram.gram(a) ** 2))(small)
  g_ref = jax.grad(lambda a: jnp.sum(gram.gram_xla(a) ** 2))(small)
  np.testing.assert_allclose(g, g_ref, rtol=1e-4)
  with enable_x64():
    x64 = rng.standard_normal((200, 7))
    out = jax.jit(gram.gram)(x64)
    assert out.dtype == jnp.float64 and rel(out, x64.T @ x64) <= 1e-14


def test_gram_kernel_is_chosen_per_platform_and_setting(monkeypatch):
  x = np.ones((8, 3), np.float32)

  def lowered(fn, platform="cpu"):
    return jax.jit(fn).trace(x).lower(lowering_platforms=(platform,)).as_text()

  monkeypatch.setattr(gram, "CPU_GRAM", "syrk")
  assert gram.cpu_kernel() == "syrk"
  cpu = lowered(gram.gram)
  assert "python_cpu_callback" in cpu and "dot_general" not in cpu
  # The fold itself runs the chosen kernel.
  fold = jax.jit(memedit.covariance_update).lower(memedit.covariance_init(3), x).as_text()
  assert "python_cpu_callback" in fold
  # SPMD-partitioned programs, GPUs and TPUs use XLA's GEMM (no host callback).
  part = lowered(lambda a: gram.gram(a, partitioned=True))
  assert "callback" not in part and "dot_general" in part
  for platform in ("cuda", "tpu"):
    text = lowered(gram.gram, platform)
    assert "callback" not in text and "dot_general" in text, platform
  monkeypatch.setattr(gram, "CPU_GRAM", "gemm")
  gemm = lowered(lambda a: gram.gram(a))  # a new function: traced anew
  assert "callback" not in gemm and "dot_general" in gemm
  monkeypatch.setattr(gram, "CPU_GRAM", "syrk-ish")
  with pytest.raises(ValueError, match=r"MEMEDIT_CPU_GRAM: expected one of \('auto', 'syrk', "
                                       r"'gemm'\), got 'syrk-ish'"):
    gram.gram(x)
  # auto: syrk when BLAS runs one thread or the CPU has one core, else XLA's GEMM.
  assert gram.auto_kernel(2, False) == "gemm"
  assert gram.auto_kernel(2, True) == gram.auto_kernel(1, False) == "syrk"


def test_fewer_keys_than_dimensions_warn_that_c_is_singular():
  k = np.random.default_rng(6).standard_normal((5, 8)).astype(np.float32)
  state = memedit.covariance_update(memedit.covariance_init(8), k)
  with pytest.warns(UserWarning, match="C from 5 keys of dimension 8 has rank at most 5"):
    C = memedit.second_moment(state)
  np.testing.assert_allclose(C, k.T.astype(np.float64) @ k / 5, rtol=1e-5, atol=1e-6)
  assert np.linalg.matrix_rank(np.asarray(C, np.float64), tol=1e-5) == 5
  more = memedit.covariance_update(state, np.ones((3, 8), np.float32))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    memedit.second_moment(more)  # 8 keys of dimension 8: no warning
    jax.jit(memedit.second_moment)(state)  # traced: the count is not known, no warning


def test_non_states_and_non_finite_shifts_are_refused():
  with pytest.raises(TypeError, match="second_moment: expected a CovarianceState .*got ndarray"):
    memedit.second_moment(np.eye(2))
  with pytest.raises(TypeError, match="state: expected a CovarianceState .*got ndarray"):
    memedit.covariance_update(np.zeros(2), np.ones((3, 2)))
  with pytest.raises(TypeError, match="covariance_merge: b: expected a CovarianceState"):
    memedit.covariance_merge(memedit.covariance_init(2), np.ones(2))
  with pytest.raises(TypeError, match="state: expected a CovarianceState .*got tuple"):
    memedit.key_count((1, 2))
  with pytest.raises(ValueError, match="shift: expected finite values, got NaN or inf"):
    memedit.covariance_init(2, shift=np.array([np.nan, 0.0]))


def test_an_empty_state_with_an_explicit_shift_takes_the_merged_states_shift():
  # Keys of mean 1e4 folded about their own mean, merged into an empty state made with
  # shift 0: re-expressed about 0 in float32, their centered covariance was lost (relative
  # error 16); an empty state has nothing to keep, so it takes the other state's shift.
  rng = np.random.default_rng(0)
  k = (rng.normal(size=(50, 4)) + 1e4).astype(np.float32)
  b = memedit.covariance_update(memedit.covariance_init(4), k)
  merged = memedit.covariance_merge(memedit.covariance_init(4, shift=np.zeros(4)), b)
  ref = np.cov(k.astype(np.float64).T, bias=True)
  assert rel(memedit.centered_covariance(merged), ref) <= 1e-5
  assert memedit.key_count(merged) == 50


def test_cache_key_specs_holding_a_memory_address_are_refused():
  with pytest.raises(ValueError, match="spec: expected a JSON-serialisable description"):
    memedit.covariance_cache_key("h", {"fn": object()})
  import pathlib
  assert memedit.covariance_cache_key("h", {"p": pathlib.Path("/a")}) == \
      memedit.covariance_cache_key("h", {"p": "/a"})


def test_single_blas_thread_sets_one_thread_and_restores_the_count_after_the_last_user():
  import threading

  fns = gram._blas_thread_functions()
  if fns is None:  # numpy's BLAS is not an OpenBLAS: the block runs as it is
    with gram.single_blas_thread():
      pass
    assert gram.auto_kernel(2, False, side_by_side=False) == "gemm"
    return
  set_fn, get_fn = fns
  before = get_fn()
  try:
    set_fn(2)
    with gram.single_blas_thread():
      assert get_fn() == 1
      with gram.single_blas_thread():
        assert get_fn() == 1
      assert get_fn() == 1
    assert get_fn() == 2
    # Overlapping users from two threads: the count comes back only after both.
    inside, leave = threading.Barrier(2), threading.Event()
    seen = []

    def user():
      with gram.single_blas_thread():
        inside.wait()
        leave.wait()

    t = threading.Thread(target=user)
    t.start()
    with gram.single_blas_thread():
      inside.wait()
    seen.append(get_fn())
    leave.set()
    t.join()
    seen.append(get_fn())
    assert seen == [1, 2]
  finally:
    set_fn(before)
  assert gram.auto_kernel(2, False, side_by_side=True) == "syrk"


def test_fold_keys_adds_known_sums_of_preshifted_keys_and_refuses_them_otherwise():
  # Pre-shifted keys with their column sums known (as staged on the host) fold like the
  # same keys summed in the program; a non-finite row still shows through the Gram
  # matrix and is left out, masked. Sums are refused where they cannot be used as they are.
  from memedit.moments import fold_keys

  rng = np.random.default_rng(31)
  c = rng.standard_normal(5).astype(np.float32)
  x = (rng.standard_normal((20, 5)) + 1.0).astype(np.float32)
  st = memedit.covariance_init(5, shift=c)
  fold = jax.jit(fold_keys, static_argnames=("preshifted",))
  for keys in (x, np.where(np.arange(20)[:, None] == 3, np.nan, x).astype(np.float32)):
    summed = fold(st, keys, preshifted=True)
    known = fold(st, keys, preshifted=True,
                 sums=np.sum(keys.astype(np.float64), axis=0).astype(np.float32))
    for field in memedit.CovarianceState._fields:
      np.testing.assert_allclose(getattr(known, field), getattr(summed, field), rtol=1e-6,
                                 atol=1e-6, err_msg=field)
  assert int(known.nonfinite) == 1 and int(known.count[0]) == 19
  with pytest.raises(ValueError, match="sums: expected only with preshifted keys"):
    fold_keys(st, x, sums=x.sum(axis=0))
  with pytest.raises(ValueError, match="and no weights, got preshifted=True and weights given"):
    fold_keys(st, x, np.ones(20, np.float32), preshifted=True, sums=x.sum(axis=0))


def test_boolean_keys_fold_as_zeros_and_ones():
  """Indicator keys (bool) were refused as 'not a real dtype'."""
  k = np.random.RandomState(0).rand(50, 4) > 0.5
  ref = k.astype(np.float64).T @ k.astype(np.float64) / 50
  for state in (memedit.covariance_update(memedit.covariance_init(4), k),
                memedit.stream_covariance([k[:20], k[20:]], progress=False)):
    np.testing.assert_allclose(np.asarray(memedit.second_moment(state)), ref, atol=3e-7)
    assert memedit.key_count(state) == 50


def test_results_are_read_by_one_program_with_the_bits_of_the_jitted_read():
  # Eagerly each result is one compiled program per dimension (not a dozen op-by-op
  # ones), computing what the same function computes under the user's jax.jit.
  rng = np.random.default_rng(7)
  x = (rng.standard_normal((300, 13)) * 3 + 40).astype(np.float32)
  st = memedit.covariance_update(memedit.covariance_init(13), x, rng.uniform(0, 2, 300))
  ref = np.asarray(x, np.float64)
  for name in ("second_moment", "centered_covariance", "key_mean"):
    fn = getattr(memedit, name)
    with Compilations() as comp:
      eager = np.asarray(fn(st))
      again = np.asarray(fn(st))
    assert comp.count == 1, (name, comp.events)
    np.testing.assert_array_equal(eager, again)
    np.testing.assert_array_equal(eager, np.asarray(jax.jit(fn)(st)))
  unweighted = memedit.covariance_update(memedit.covariance_init(13), x)
  np.testing.assert_allclose(memedit.second_moment(unweighted), ref.T @ ref / len(ref),
                             rtol=2e-6)
  mu = ref.mean(0)
  np.testing.assert_allclose(memedit.centered_covariance(unweighted),
                             (ref - mu).T @ (ref - mu) / len(ref), atol=2e-5)


def test_an_empty_state_is_one_program_and_can_be_donated():
  # A key dimension no other test uses: an earlier empty state of the same dimension in
  # this process (e.g. a layer's statistics) would leave its program in memory, and none
  # would be counted. This thread's programs only: a full run once counted a second
  # program here, compiled meanwhile by another thread of the process.
  dim = 41
  with Compilations(this_thread=True) as comp:
    st = memedit.covariance_init(dim)
  assert comp.count == 1, comp.events  # one program for the zeros, not one per field
  x = np.random.default_rng(2).standard_normal((64, dim)).astype(np.float32)
  want = np.asarray(memedit.second_moment(memedit.covariance_update(st, x)))
  # Distinct buffers: the whole state can be donated to the user's jitted update.
  update = jax.jit(memedit.covariance_update, donate_argnums=0)
  got = np.asarray(memedit.second_moment(update(memedit.covariance_init(dim), x)))
  np.testing.assert_array_equal(got, want)
