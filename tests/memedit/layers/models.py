"""Small Flax models written the way a third party would, used by the layer tests."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
import flax.linen as nn

D = 16  # model width


# ----------------------------------------------------------------------------- NNX


class Block(nnx.Module):
  def __init__(self, d, *, rngs):
    self.fc1 = nnx.Linear(d, 2 * d, rngs=rngs)
    self.fc2 = nnx.Linear(2 * d, d, rngs=rngs)

  def __call__(self, x):
    return x + self.fc2(nnx.relu(self.fc1(x)))


class MLP(nnx.Module):
  """Input layer, an nnx.List of residual blocks, a tied projection used twice, a head."""

  def __init__(self, *, rngs, remat=False):
    self.inp = nnx.Linear(6, D, rngs=rngs)
    self.blocks = nnx.List([Block(D, rngs=rngs) for _ in range(2)])
    self.shared = nnx.Linear(D, D, rngs=rngs)
    self.alias = self.shared  # a second reference to the same module
    self.head = nnx.Linear(D, 4, rngs=rngs)
    self.remat = remat

  def __call__(self, x):
    x = nnx.relu(self.inp(x))
    for blk in self.blocks:
      x = nnx.remat(lambda b, h: b(h))(blk, x) if self.remat else blk(x)
    x = jnp.tanh(self.shared(x))
    x = jnp.tanh(self.alias(x))
    return self.head(x)

  def features(self, x):
    return nnx.relu(self.inp(x))


class ScanMLP(nnx.Module):
  """Three residual blocks with stacked parameters, run with nnx.scan."""

  def __init__(self, *, rngs):
    self.inp = nnx.Linear(6, D, rngs=rngs)

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Block(D, rngs=rngs)
    self.blocks = make(rngs)
    self.head = nnx.Linear(D, 4, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def step(h, blk):
      return blk(h)
    return self.head(step(nnx.relu(self.inp(x)), self.blocks))


class Generator(nnx.Module):
  """DCGAN-like: latent -> 4x4 -> ConvTranspose (x2) -> 3x3 conv -> ConvTranspose (x2) -> 1x1."""

  def __init__(self, *, rngs, z=8, c=16):
    self.c = c
    self.fc = nnx.Linear(z, 4 * 4 * c, rngs=rngs)
    self.up1 = nnx.ConvTranspose(c, c // 2, (4, 4), strides=(2, 2), padding="SAME", rngs=rngs)
    self.mid = nnx.Conv(c // 2, c // 2, (3, 3), padding="SAME", rngs=rngs)
    self.up2 = nnx.ConvTranspose(c // 2, c // 2, (2, 2), strides=(2, 2), rngs=rngs)
    self.rgb = nnx.Conv(c // 2, 3, (1, 1), rngs=rngs)

  def __call__(self, z):
    x = nnx.relu(self.fc(z)).reshape(z.shape[0], 4, 4, self.c)
    x = nnx.relu(self.up1(x))
    x = nnx.relu(self.mid(x))
    x = nnx.relu(self.up2(x))
    return jnp.tanh(self.rgb(x))


class Transformer(nnx.Module):
  """Embedding, one pre-norm block with nnx.MultiHeadAttention and an MLP."""

  def __init__(self, *, rngs, vocab=11):
    self.embed = nnx.Embed(vocab, D, rngs=rngs)
    self.ln1 = nnx.LayerNorm(D, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=D, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(D, rngs=rngs)
    self.mlp = Block(D, rngs=rngs)
    self.out = nnx.Linear(D, vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    x = x + self.attn(self.ln1(x))
    x = self.mlp(self.ln2(x))
    return self.out(x)


class StyleMemory(nnx.Module):
  """A custom layer with an extra call argument and a kernel named ``w``."""

  def __init__(self, d, *, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (d, d)) / jnp.sqrt(d))

  def __call__(self, x, style):
    return (x * style) @ self.w[...]


class Styled(nnx.Module):
  def __init__(self, *, rngs):
    self.inp = nnx.Linear(6, D, rngs=rngs)
    self.style = nnx.Linear(3, D, rngs=rngs)
    self.memory = StyleMemory(D, rngs=rngs)

  def __call__(self, x, s):
    return self.memory(jnp.tanh(self.inp(x)), 1.0 + self.style(s))


class DropMLP(nnx.Module):
  """Dropout with its own RNG stream: every call advances an RNG counter in the state."""

  def __init__(self, *, rngs):
    self.fc = nnx.Linear(6, D, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(D, 4, rngs=rngs)

  def __call__(self, x):
    return self.head(self.drop(self.fc(x)))


# ----------------------------------------------------------------------------- Linen


class LBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(2 * D, name="fc1")(x))
    return x + nn.Dense(D, name="fc2")(h)


class LMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(D, name="inp")(x))
    x = LBlock()(x)
    x = LBlock()(x)
    return nn.Dense(4, name="head")(x)


class LScanBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return LBlock(name="blk")(x), None


class LScanMLP(nn.Module):
  with_intermediates: bool = True

  @nn.compact
  def __call__(self, x):
    axes = {"params": 0, "intermediates": 0} if self.with_intermediates else {"params": 0}
    x = nn.relu(nn.Dense(D, name="inp")(x))
    stack = nn.scan(LScanBlock, variable_axes=axes, split_rngs={"params": True}, length=3)
    x, _ = stack(name="stack")(x, None)
    return nn.Dense(4, name="head")(x)


class LRematMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(D, name="inp")(x))
    x = nn.remat(LBlock)(name="blk")(x)
    return nn.Dense(4, name="head")(x)


class LGenerator(nn.Module):
  c: int = 16

  @nn.compact
  def __call__(self, z):
    c = self.c
    x = nn.relu(nn.Dense(4 * 4 * c, name="fc")(z)).reshape(z.shape[0], 4, 4, c)
    x = nn.relu(nn.ConvTranspose(c // 2, (4, 4), strides=(2, 2), padding="SAME", name="up1")(x))
    x = nn.relu(nn.Conv(c // 2, (3, 3), padding="SAME", name="mid")(x))
    x = nn.relu(nn.ConvTranspose(c // 2, (2, 2), strides=(2, 2), name="up2")(x))
    return jnp.tanh(nn.Conv(3, (1, 1), name="rgb")(x))


class LTransformer(nn.Module):
  vocab: int = 11

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, D, name="embed")(tokens)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(nn.LayerNorm()(x))
    x = LBlock(name="mlp")(nn.LayerNorm()(x))
    return nn.Dense(self.vocab, name="out")(x)


# ----------------------------------------------------------------------------- builders


@functools.lru_cache(maxsize=None)
def build(cls, seed: int = 0, **kwargs):
  """An NNX model, initialised in one compiled program (cached; tests never mutate it)."""
  return nnx.jit(lambda: cls(rngs=nnx.Rngs(seed), **kwargs))()


def linen_init(module: nn.Module, *inputs, seed: int = 0):
  """Linen variables, initialised in one compiled program."""
  return jax.jit(module.init)(jax.random.key(seed), *inputs)
