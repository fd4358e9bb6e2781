"""The factored per-step function of Λ equals f(K0 + ΔK(Λ, D), keys), skips the full kernel
where f only contracts it with the keys, and gives the same solves."""

from __future__ import annotations

import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import memedit
from memedit._factored import factored_forward


def _np(x):
  return np.asarray(x, np.float64)


def overlap_add(kernel, x):
  """A stride-2 transposed convolution written with the kernel reversed, split into its
  phases, transposed and reshaped, then one matmul (the shape of an overlap-add port)."""
  kh, kw, cin, cout = kernel.shape
  k = lax.rev(kernel, (0, 1)).reshape(2, kh // 2, 2, kw // 2, cin, cout)
  k = jnp.transpose(k, (4, 0, 1, 2, 3, 5)).reshape(cin, -1)
  return jnp.tanh(x.reshape(-1, cin) @ k)


def demod_conv(kernel, keys):
  x_mod, style = keys
  y = lax.conv_general_dilated(x_mod, kernel * 0.5, (1, 1), "SAME",
                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
  w = kernel[None] * style[:, None, None, :, None]
  return y * lax.rsqrt(jnp.sum(w * w, axis=(1, 2, 3)) + 1e-8)[:, None, None, :]


CONV = nn.Conv(5, (3, 3))
CONVT = nn.ConvTranspose(5, (4, 4), strides=(2, 2))


def flax_layer(layer):
  def f(kernel, x):
    return layer.apply({"params": {"kernel": kernel, "bias": jnp.full((5,), 0.1)}}, x)
  return f


# (name, f, kernel shape, kind, in_ndim, keys shape or builder, splits the full kernel out)
CASES = [
    ("dense", lambda K, k: jnp.tanh(k @ K), (6, 4), "dense", 1, (5, 6), True),
    ("dense_kernel_first", lambda K, k: jnp.einsum("io,ni->on", K, k), (6, 4), "dense", 1,
     (5, 6), True),
    ("dense_two_key_axes", lambda K, k: jnp.einsum("nab,abo->no", k, K), (2, 3, 4), "dense", 2,
     (5, 2, 3), True),
    ("matrix", lambda W, k: k @ W.T * 2.0, (4, 6), "matrix", 1, (5, 6), True),
    ("conv", flax_layer(CONV), (3, 3, 6, 5), "conv", 1, (2, 7, 7, 6), True),
    ("conv_transpose", flax_layer(CONVT), (4, 4, 6, 5), "conv", 1, (2, 5, 5, 6), True),
    ("overlap_add", overlap_add, (4, 4, 6, 5), "conv", 1, (2, 3, 3, 6), True),
    # The kernel's square (a demodulation) needs the full kernel: only the conv splits.
    ("demodulated", demod_conv, (3, 3, 6, 5), "conv", 1, "demod", False),
    # Uses the factoring cannot split: a reshape mixing key and value axes, a grouped conv.
    ("mixed_reshape", lambda K, k: k @ K.reshape(-1)[:24].reshape(6, 4), (6, 4), "dense", 1,
     (5, 6), False),
    ("grouped", lambda K, x: lax.conv_general_dilated(
        x, K, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=2), (3, 3, 3, 4), "conv", 1, (2, 6, 6, 6), False),
]


def _case(name):
  _, f, kshape, kind, in_ndim, kspec, splits = next(c for c in CASES if c[0] == name)
  # A seed that is the same in every process (str hashes are salted per process).
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  K0 = jnp.asarray(rng.standard_normal(kshape), jnp.float32)
  if kspec == "demod":
    style = rng.uniform(0.5, 1.5, (2, kshape[2])).astype(np.float32)
    x = rng.standard_normal((2, 6, 6, kshape[2])).astype(np.float32)
    keys = (jnp.asarray(x * style[:, None, None, :]), jnp.asarray(style))
  else:
    keys = jnp.asarray(rng.standard_normal(kspec), jnp.float32)
  d = memedit.key_dim(kshape, kind, in_ndim)
  D = jnp.asarray(np.linalg.qr(rng.standard_normal((d, 2)))[0].T, jnp.float32)
  lam = jnp.asarray(rng.standard_normal(memedit.lambda_shape(kshape, 2, kind, in_ndim)),
                    jnp.float32)
  return f, K0, D, keys, lam, kind, in_ndim, splits


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_values_and_gradients_match_the_full_kernel(name):
  f, K0, D, keys, lam, kind, in_ndim, splits = _case(name)

  def delta(lam):
    return memedit.kernel_delta(lam, D, K0.shape, kind, in_ndim)

  fwd = factored_forward(f, K0, D, keys, kind, in_ndim, delta=delta)
  full = lambda lam: f(K0 + delta(lam), keys)
  np.testing.assert_allclose(_np(fwd(lam)), _np(full(lam)), rtol=2e-5, atol=2e-5)
  # The gradient with respect to Λ, eagerly and under jit (the form a solve uses).
  g_full = jax.grad(lambda l: jnp.sum(jnp.sin(full(l))))(lam)
  g_fac = jax.jit(jax.grad(lambda l: jnp.sum(jnp.sin(fwd(l)))))(lam)
  np.testing.assert_allclose(_np(g_fac), _np(g_full), rtol=1e-4, atol=1e-4)
  # With patches (the CPU form of the convolutions left in the step).
  fwd_p = factored_forward(f, K0, D, keys, kind, in_ndim, delta=delta, patch=True)
  np.testing.assert_allclose(_np(fwd_p(lam)), _np(full(lam)), rtol=2e-5, atol=2e-5)
  # Where f only contracts the kernel with the keys, the step never forms the kernel.
  step = jax.make_jaxpr(fwd)(lam)
  shapes = {tuple(v.aval.shape) for e in step.jaxpr.eqns for v in e.outvars}
  assert (tuple(K0.shape) not in shapes) == splits, shapes


def test_a_kernel_that_is_also_f_s_output_and_a_keys_only_output():
  K0 = jnp.arange(6.0).reshape(3, 2)
  D = jnp.array([[1.0, 0.0, 0.0]])
  keys = jnp.ones((4, 3))
  f = lambda K, k: {"scaled": 2.0 * K, "keys": jnp.sum(k), "out": k @ K}
  delta = lambda lam: memedit.kernel_delta(lam, D, K0.shape)
  fwd = factored_forward(f, K0, D, keys, "dense", 1, delta=delta)
  lam = jnp.array([[1.5], [-2.0]])
  got, want = fwd(lam), f(K0 + delta(lam), keys)
  for key in want:
    np.testing.assert_allclose(_np(got[key]), _np(want[key]), rtol=1e-6)


def test_bfloat16_kernel_and_keys():
  rng = np.random.default_rng(3)
  K0 = jnp.asarray(rng.standard_normal((8, 4)), jnp.bfloat16)
  keys = jnp.asarray(rng.standard_normal((5, 8)), jnp.bfloat16)
  D = jnp.asarray(np.eye(8)[:1], jnp.float32)
  f = lambda K, k: k @ K
  delta = lambda lam: memedit.kernel_delta(lam, D, K0.shape).astype(K0.dtype)
  lam = jnp.asarray(rng.standard_normal((4, 1)), jnp.float32)
  got = factored_forward(f, K0, D, keys, "dense", 1, delta=delta)(lam)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(_np(got), _np(f(K0 + delta(lam), keys)), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("optimizer,steps", [("adam", 300), ("gauss_newton", 8)])
def test_solves_agree_with_and_without_factoring(optimizer, steps):
  f, K0, D, keys, lam, kind, in_ndim, _ = _case("demodulated")
  targets = f(K0 + memedit.kernel_delta(0.3 * lam, D, K0.shape, kind), keys)
  kw = dict(kind=kind, optimizer=optimizer, steps=steps, loss="l2")
  a = memedit.solve_lambda(f, K0, D, keys, targets, factored=True, **kw)
  b = memedit.solve_lambda(f, K0, D, keys, targets, factored=False, **kw)
  np.testing.assert_allclose(_np(a.losses), _np(b.losses), rtol=1e-3, atol=1e-7)
  np.testing.assert_allclose(_np(a.lam), _np(b.lam), rtol=1e-3, atol=1e-4)
  outs = [f(K0 + memedit.kernel_delta(r.lam, D, K0.shape, kind), keys) for r in (a, b)]
  np.testing.assert_allclose(_np(outs[0]), _np(outs[1]), rtol=1e-4, atol=1e-5)
  assert float(a.final_loss) < 1e-3 * float(a.losses[0])


def test_lambda_loss_fn_is_the_same_loss_either_way():
  f, K0, D, keys, lam, kind, in_ndim, _ = _case("overlap_add")
  targets = jnp.zeros(jax.eval_shape(f, K0, keys).shape)
  fns = [memedit.lambda_loss_fn(f, K0, D, keys, targets, kind=kind, factored=fac)
         for fac in (True, False)]
  vals = [float(fn(lam)) for fn in fns]
  grads = [jax.grad(fn)(lam) for fn in fns]
  assert abs(vals[0] - vals[1]) <= 1e-5 * abs(vals[1])
  np.testing.assert_allclose(_np(grads[0]), _np(grads[1]), rtol=1e-4, atol=1e-5)
