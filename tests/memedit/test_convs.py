"""Convolutions as patch matmuls compute what the native convolutions compute."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from memedit._convs import conv_as_matmul

LAYERS = [
    nn.Conv(5, (3, 3)),
    nn.Conv(5, (3, 3), strides=2, padding="VALID"),
    nn.Conv(5, (3, 2), kernel_dilation=2),
    nn.ConvTranspose(5, (4, 4), strides=(2, 2)),
    nn.ConvTranspose(5, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), transpose_kernel=True),
]


@pytest.mark.parametrize("layer", LAYERS,
                         ids=[f"{type(m).__name__}{i}" for i, m in enumerate(LAYERS)])
def test_values_and_kernel_gradients_match(layer):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 9, 6)), jnp.float32)
  v = layer.init(jax.random.key(0), x)
  f = lambda k, x: layer.apply({"params": {"kernel": k, "bias": v["params"]["bias"]}}, x)
  k = v["params"]["kernel"]
  np.testing.assert_allclose(conv_as_matmul(f)(k, x), f(k, x), rtol=1e-5, atol=1e-5)
  g = lambda fn: jax.grad(lambda k: jnp.sum(fn(k, x) ** 2))(k)
  np.testing.assert_allclose(g(conv_as_matmul(f)), g(f), rtol=1e-4, atol=1e-4)


def test_other_layouts_and_untouched_primitives():
  rng = np.random.default_rng(1)
  k = jnp.asarray(rng.standard_normal((5, 6, 3, 3)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((2, 6, 9, 9)), jnp.float32)
  f = lambda k, x: jnp.tanh(lax.conv_general_dilated(x, k, (1, 1), "SAME", rhs_dilation=(2, 1)))
  np.testing.assert_allclose(conv_as_matmul(f)(k, x), f(k, x), rtol=1e-5, atol=1e-5)
  # Grouped convolutions are left as they are.
  kg = jnp.asarray(rng.standard_normal((6, 3, 3, 3)), jnp.float32)
  fg = lambda k, x: lax.conv_general_dilated(x, k, (1, 1), "SAME", feature_group_count=2)
  np.testing.assert_allclose(conv_as_matmul(fg)(kg, x), fg(kg, x), rtol=1e-5, atol=1e-5)
