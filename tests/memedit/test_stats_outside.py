"""Collecting statistics as a user's own pipeline does: streams, caches, layer statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memedit
import memedit.layers as ml
from memedit.layers.model import as_model
from memedit.layers.stats import _structure_text


def _moment(batches) -> np.ndarray:
  keys = np.concatenate([np.asarray(b, np.float64).reshape(-1, b.shape[-1]) for b in batches])
  return keys.T @ keys / len(keys)


def _c(state) -> np.ndarray:
  return np.asarray(memedit.second_moment(state), np.float64)


def test_drivers_under_jit_vmap_or_grad_say_they_are_eager():
  x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
  model = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))

  def stream(b):
    return memedit.second_moment(memedit.stream_covariance([b], progress=False))

  cases = [
      lambda: jax.jit(stream)(x),                                  # traced batch
      lambda: jax.vmap(stream)(np.stack([x, x])),                  # batched batch
      lambda: jax.jit(lambda: stream(x))(),                        # concrete batch, traced call
      lambda: jax.grad(lambda p: memedit.stream_covariance(
          [x], key_fn=lambda p, b: b * p, params=p, progress=False).sum.sum())(2.0),
      lambda: jax.jit(lambda b: memedit.layer_covariance(model, ("layers", 0), [b]).sum)(x),
      lambda: jax.jit(lambda: memedit.layer_covariance(model, ("layers", 0), [x]).sum)(),
      lambda: nnx.jit(lambda m: memedit.layer_covariance(m, ("layers", 0), [x]).sum)(model),
  ]
  for case in cases:
    with pytest.raises(ValueError, match="expected (concrete arrays|an eager call).*eager "
                                         "driver.*jax.jit"):
      case()
  # Called eagerly, the same stream folds.
  np.testing.assert_allclose(np.asarray(stream(x), np.float64), _moment([x]), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("dim", ["4", -1, 0, True, 4.0])
def test_stream_covariance_refuses_a_dim_that_is_no_positive_int(dim):
  with pytest.raises(ValueError, match=f"dim: expected a positive int, got {dim!r}"):
    memedit.stream_covariance([np.ones((2, 4), np.float32)], dim=dim, progress=False)


def test_a_finished_cache_of_other_keys_is_not_returned_for_this_stream(tmp_path):
  rng = np.random.default_rng(1)
  four = [rng.normal(size=(6, 4)).astype(np.float32) for _ in range(3)]
  five = [rng.normal(size=(6, 5)).astype(np.float32) for _ in range(3)]
  kw = dict(cache_dir=tmp_path, cache_key="shared", progress=False)
  first = memedit.stream_covariance(four, **kw)
  with pytest.raises(ValueError, match=r"expected the statistics of keys of dimension 5 "
                                       r"\(the stream's first batch\), got those of "
                                       r"dimension 4"):
    memedit.stream_covariance(five, **kw)
  # The stream that wrote it still reads it back, unchanged.
  again = memedit.stream_covariance(four, **kw)
  np.testing.assert_array_equal(_c(again), _c(first))
  np.testing.assert_allclose(_c(again), _moment(four), rtol=1e-5, atol=1e-6)


def test_layer_statistics_of_models_that_differ_only_in_structure_are_cached_apart(tmp_path):
  rng = np.random.default_rng(2)
  xs = [rng.normal(size=(8, 3)).astype(np.float32) for _ in range(2)]

  def make(act):
    return nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), act,
                          nnx.Linear(4, 2, rngs=nnx.Rngs(1)))

  relu, tanh = make(nnx.relu), make(nnx.tanh)
  address = ("layers", 2)
  keys = [ml.layer_cache_key(m, ml.memory_view(m, address), {"n": 2}) for m in (relu, tanh)]
  assert keys[0] != keys[1]
  # Deterministic: the same for a model built again, and for its split form.
  assert keys[0] == ml.layer_cache_key(make(nnx.relu), ml.memory_view(relu, address),
                                       {"n": 2})
  assert keys[0] == ml.layer_cache_key(nnx.split(relu), ml.memory_view(relu, address),
                                       {"n": 2})
  assert " at 0x" not in _structure_text(as_model(relu).definition)
  twice, thrice = make(lambda h: h * 2), make(lambda h: h * 3)
  assert (ml.layer_cache_key(twice, ml.memory_view(twice, address), {"n": 2})
          != ml.layer_cache_key(thrice, ml.memory_view(thrice, address), {"n": 2}))
  w = np.asarray(relu.layers[0].kernel[...], np.float64)
  b = np.asarray(relu.layers[0].bias[...], np.float64)
  for model, act in ((relu, lambda h: np.maximum(h, 0)), (tanh, np.tanh)):
    st = memedit.layer_covariance(model, address, xs, cache_dir=tmp_path)
    want = _moment([act(np.asarray(x, np.float64) @ w + b) for x in xs])
    np.testing.assert_allclose(_c(st), want, rtol=1e-5, atol=1e-6)


def test_a_stream_that_raises_midway_resumes_from_its_cache_without_loss_or_double_count(
    tmp_path):
  rng = np.random.default_rng(3)
  xs = [(rng.normal(size=(5, 3)) + 10).astype(np.float32) for _ in range(7)]

  def stream(fail_at):
    for i, x in enumerate(xs):
      if i == fail_at:
        raise RuntimeError("read error")
      yield x

  kw = dict(group=2, cache_dir=tmp_path, cache_key="k", progress=False)
  with pytest.raises(RuntimeError, match="read error"):
    memedit.stream_covariance(stream(5), **kw)
  st = memedit.stream_covariance(stream(-1), **kw)
  assert memedit.key_count(st) == 35
  np.testing.assert_allclose(_c(st), _moment(xs), rtol=1e-6)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]  # no temporaries left


def test_a_single_batch_passed_as_the_stream_is_refused_by_name():
  x = np.random.default_rng(4).normal(size=(6, 4)).astype(np.float32)
  for single, what in ((x, r"an array of shape \(6, 4\)"), (jnp.asarray(x), r"an array of "
                       r"shape \(6, 4\)"), ({"k": x}, "dict")):
    with pytest.raises(ValueError, match=r"batches: expected an iterable of batches.*got a "
                                         r"single batch: " + what + "; pass \\[batch\\]"):
      memedit.stream_covariance(single, progress=False)
  # One array of stacked batches (n, B, d) is a stream; with a key_fn, so is (n, L).
  st = memedit.stream_covariance(np.stack([x, x]), progress=False)
  np.testing.assert_allclose(_c(st), _moment([x, x]), rtol=1e-5, atol=1e-6)
  rows = x.reshape(3, 8)
  st = memedit.stream_covariance(rows, key_fn=lambda r: jnp.stack([r, 2 * r], -1),
                                 progress=False)
  np.testing.assert_allclose(_c(st), _moment([np.stack([rows, 2 * rows], -1)]), rtol=1e-5,
                             atol=1e-6)
  model = nnx.Sequential(nnx.Linear(4, 2, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="inputs: expected an iterable of batches.*got a "
                                       r"single dict; pass \[batch\]"):
    memedit.layer_covariance(model, ("layers", 0), {"x": x})


@pytest.mark.parametrize("dtype", [jnp.int32, "bool", "nonsense"])
def test_layer_statistics_refuse_a_key_dtype_that_is_not_floating(dtype):
  model = nnx.Sequential(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
  x = np.full((2, 3), 0.4, np.float32)  # keys 0.4 would be folded as int 0
  with pytest.raises(ValueError, match="dtype: expected a floating dtype for the keys"):
    memedit.layer_covariance(model, ("layers", 0), [x], dtype=dtype)
  with pytest.raises(ValueError, match="dtype: expected a floating dtype for the keys"):
    ml.layer_key_fn(model, ml.memory_view(model, ("layers", 0)), dtype=dtype)


@pytest.mark.parametrize("total", ["10", -1, 2.5, True])
def test_stream_covariance_refuses_a_bad_total_before_folding(total, tmp_path):
  x = np.ones((2, 3), np.float32)
  with pytest.raises(ValueError, match=f"total: expected None or a non-negative int.*got "
                                       f"{total!r}"):
    memedit.stream_covariance([x, x], total=total, cache_dir=tmp_path, cache_key="k")
  assert not list(tmp_path.iterdir())  # nothing was folded or saved


def test_a_users_folder_under_the_cache_key_is_named_and_left_alone(tmp_path):
  (tmp_path / "k").mkdir()
  (tmp_path / "k" / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match=r"statistics cache .*k: expected a folder saved by "
                                       r"stream_covariance \(arrays/ and meta.json\), got a "
                                       r"folder holding notes.txt"):
    memedit.stream_covariance([np.ones((2, 3), np.float32)], cache_dir=tmp_path,
                              cache_key="k", progress=False)
  assert [p.name for p in (tmp_path / "k").iterdir()] == ["notes.txt"]
  assert (tmp_path / "k" / "notes.txt").read_text() == "mine"
