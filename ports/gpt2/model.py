"""GPT-2 (Radford et al., 2019) in Flax Linen, laid out so every block is a named layer.

Architecture (``d`` = n_embd, ``H`` = n_head, ``d_ff`` = n_inner or 4 d)::

  ids (N, T) -> wte(ids) + wpe(positions)                                   (N, T, d)
  h_i, i = 0 .. n_layer - 1 (pre-LN residual blocks):
    x = x + attn.c_proj(causal_attention(split_heads(attn.c_attn(ln_1(x)))))
    x = x + mlp.c_proj(gelu_new(mlp.c_fc(ln_2(x))))
  ln_f, then the tied LM head: logits = x · wteᵀ                            (N, T, V)

Module names follow Hugging Face's ``GPT2LMHeadModel`` (``transformer.h.1.mlp.c_proj``
becomes the Linen path ``('h_1', 'mlp', 'c_proj')``). Blocks are separate submodules
``h_0 .. h_{n-1}`` called in a Python loop (no ``nn.scan``), so any one of them can be
captured, viewed or edited alone. Every projection is a plain ``nn.Dense`` whose kernel is
``(in, out)`` — exactly the weight of Hugging Face's ``Conv1D`` — so ``mlp.c_proj`` is a
linear memory from the MLP keys (the ``d_ff`` activations after ``gelu_new``) to the
``d``-dimensional values it adds to the residual stream.

Parameters (Linen ``params`` collection)::

  wte/embedding (V, d)          wpe/embedding (n_positions, d)
  h_i/ln_1/{scale, bias} (d,)   h_i/attn/c_attn/{kernel (d, 3d), bias (3d,)}
  h_i/attn/c_proj/{kernel (d, d), bias (d,)}
  h_i/ln_2/{scale, bias} (d,)   h_i/mlp/c_fc/{kernel (d, d_ff), bias (d_ff,)}
  h_i/mlp/c_proj/{kernel (d_ff, d), bias (d,)}
  ln_f/{scale, bias} (d,)

Inference only: dropout (``*_pdrop``) is omitted, as in Hugging Face's ``eval()`` mode.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["Attention", "Block", "GPT2Config", "GPT2LMHeadModel", "MLP", "gelu_new",
           "layer_path", "lm_layout"]

# Hugging Face config.json fields the port reads, with the values the port supports for
# fields that change the computation but have no counterpart here.
_HF_FIXED = {
    # 'gelu_pytorch_tanh' is torch's tanh-approximate GELU: the same function as 'gelu_new'.
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "add_cross_attention": (False,),
    "tie_word_embeddings": (True,),
}


# Other names Hugging Face's GPT2Config accepts for fields (its ``attribute_map``).
_HF_ALIASES = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
               "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}


def _positive_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """The architecture of a GPT-2 model (the fields of Hugging Face's ``config.json``).

  Attributes:
    vocab_size: token vocabulary ``V`` (50257 for OpenAI's checkpoints).
    n_positions: the longest sequence the position table covers.
    n_embd: residual width ``d``.
    n_layer: number of blocks.
    n_head: attention heads ``H`` (``d`` must be a multiple of it).
    layer_norm_epsilon: epsilon of every LayerNorm.
    n_inner: MLP width ``d_ff``; ``None`` means ``4 d``.

  Example:
    >>> cfg = GPT2Config.from_hf({"vocab_size": 97, "n_positions": 16, "n_embd": 32,
    ...                           "n_layer": 2, "n_head": 4, "model_type": "gpt2"})
    >>> cfg.inner_dim, cfg.head_dim
    (128, 8)
  """

  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  layer_norm_epsilon: float = 1e-5
  n_inner: int | None = None

  def __post_init__(self):
    for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
      value = getattr(self, name)
      if not _positive_int(value):
        raise ValueError(f"GPT2Config: {name}: expected a positive integer, got {value!r}")
    if self.n_inner is not None and not _positive_int(self.n_inner):
      raise ValueError(f"GPT2Config: n_inner: expected a positive integer or None, "
                       f"got {self.n_inner!r}")
    eps = self.layer_norm_epsilon
    if (not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps)
        or eps <= 0):
      raise ValueError(f"GPT2Config: layer_norm_epsilon: expected a finite positive number, "
                       f"got {eps!r}")
    if self.n_embd % self.n_head:
      raise ValueError(f"GPT2Config: expected n_embd a multiple of n_head, got n_embd "
                       f"{self.n_embd} and n_head {self.n_head}")

  @property
  def inner_dim(self) -> int:
    """The MLP width ``d_ff`` (``n_inner``, or ``4 n_embd`` when unset)."""
    return self.n_inner if self.n_inner is not None else 4 * self.n_embd

  @property
  def head_dim(self) -> int:
    """The width of one attention head, ``n_embd / n_head``."""
    return self.n_embd // self.n_head

  def to_dict(self) -> dict:
    """The fields as a JSON-ready dict (the inverse of :meth:`from_dict`)."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any]) -> "GPT2Config":
    """A config from a dict holding (at least) this class's fields; others are ignored.

    Raises:
      ValueError: a field is missing or has an invalid value.
    """
    if not isinstance(fields, Mapping):
      raise ValueError(f"GPT2Config: expected a dict of fields, got {type(fields).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in fields and n != "n_inner"]
    if missing:
      raise ValueError(f"GPT2Config: expected the fields {names}, missing {missing}")
    return cls(**{n: fields[n] for n in names if n in fields})

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], where: str = "config.json") -> "GPT2Config":
    """The config of a Hugging Face GPT-2 ``config.json`` (its parsed dict).

    Fields the port does not model must keep the values it computes with:
    ``activation_function`` 'gelu_new' (or 'gelu_pytorch_tanh', the same function),
    ``scale_attn_weights`` true, ``scale_attn_by_inverse_layer_idx`` false, no
    cross-attention, tied embeddings.
    Missing fields take Hugging Face's defaults; the aliases Hugging Face accepts
    (``hidden_size``, ``num_attention_heads``, ``num_hidden_layers``,
    ``max_position_embeddings``) stand for their fields.

    Args:
      hf: the parsed ``config.json``.
      where: what ``hf`` is, for error messages (e.g. its path).

    Returns:
      The :class:`GPT2Config`.

    Raises:
      ValueError: ``model_type`` is not 'gpt2', a field is invalid, or a setting the port
        does not compute (e.g. ``activation_function`` 'relu') is requested.
    """
    if not isinstance(hf, Mapping):
      raise ValueError(f"{where}: expected a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
      raise ValueError(f"{where}: model_type: expected 'gpt2', got {model_type!r}")
    for name, allowed in _HF_FIXED.items():
      if name in hf and hf[name] not in allowed:
        raise ValueError(f"{where}: {name}: expected {' or '.join(map(repr, allowed))} (the "
                         f"only setting the GPT-2 port computes), got {hf[name]!r}")
    hf = dict(hf)
    for alias, name in _HF_ALIASES.items():  # e.g. a hand-written "num_attention_heads"
      if alias in hf:
        if name in hf and hf[name] != hf[alias]:
          raise ValueError(f"{where}: expected {name} and its alias {alias} to agree, got "
                           f"{name} {hf[name]!r} and {alias} {hf[alias]!r}")
        hf[name] = hf[alias]
    defaults = cls()
    fields = {f.name: hf.get(f.name, getattr(defaults, f.name))
              for f in dataclasses.fields(cls)}
    try:
      return cls(**fields)
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None


def gelu_new(x: jax.Array) -> jax.Array:
  """GPT-2's GELU, the tanh approximation (Hugging Face's ``gelu_new``).

  ``0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))``, elementwise, any shape.

  Example:
    >>> import jax.numpy as jnp
    >>> [round(float(v), 4) for v in gelu_new(jnp.array([-1.0, 0.0, 1.0]))]
    [-0.1588, 0.0, 0.8412]
  """
  return jax.nn.gelu(x, approximate=True)


class MLP(nn.Module):
  """``c_proj(gelu_new(c_fc(x)))``: ``(..., d)`` -> ``(..., d)`` through ``d_ff`` keys.

  Attributes:
    n_embd: ``d``.
    n_inner: ``d_ff``.
  """

  n_embd: int
  n_inner: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    keys = gelu_new(nn.Dense(self.n_inner, name="c_fc")(x))
    return nn.Dense(self.n_embd, name="c_proj")(keys)


class Attention(nn.Module):
  """Masked multi-head self-attention with GPT-2's fused ``c_attn`` projection.

  ``c_attn`` maps ``(N, T, d)`` to ``[q | k | v]`` (``(N, T, 3d)``, each split into
  ``H`` heads of ``d / H``); scores ``q kᵀ / √(d/H)`` where ``mask`` is false are set to
  the dtype's lowest value before the softmax (float32); ``c_proj`` mixes the heads.

  Attributes:
    n_embd: ``d``.
    n_head: ``H``.
  """

  n_embd: int
  n_head: int

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """Args: x (N, T, d); mask (N, 1, T, T) bool, true where query t may see key s.

    Returns:
      (N, T, d).
    """
    n, t, _ = x.shape
    hd = self.n_embd // self.n_head
    qkv = nn.Dense(3 * self.n_embd, name="c_attn")(x)
    q, k, v = (a.reshape(n, t, self.n_head, hd) for a in jnp.split(qkv, 3, axis=-1))
    scores = jnp.einsum("nqhc,nkhc->nhqk", q, k) / jnp.sqrt(jnp.asarray(hd, qkv.dtype))
    scores = scores.astype(jnp.float32)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("nhqk,nkhc->nqhc", probs, v).reshape(n, t, self.n_embd)
    return nn.Dense(self.n_embd, name="c_proj")(out)


class Block(nn.Module):
  """One pre-LN transformer block: ``x + attn(ln_1(x))``, then ``+ mlp(ln_2(·))``.

  Attributes:
    config: the model's :class:`GPT2Config`.
  """

  config: GPT2Config

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """Args: x (N, T, d); mask (N, 1, T, T) bool. Returns: (N, T, d)."""
    cfg = self.config
    ln = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, use_fast_variance=False,
                                   name=name)
    x = x + Attention(cfg.n_embd, cfg.n_head, name="attn")(ln("ln_1")(x), mask)
    return x + MLP(cfg.n_embd, cfg.inner_dim, name="mlp")(ln("ln_2")(x))


class GPT2LMHeadModel(nn.Module):
  """GPT-2 with its tied language-model head: token ids ``(N, T)`` -> logits ``(N, T, V)``.

  Attributes:
    config: the :class:`GPT2Config`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> cfg = GPT2Config(vocab_size=11, n_positions=8, n_embd=16, n_layer=2, n_head=2)
    >>> model = GPT2LMHeadModel(cfg)
    >>> ids = jnp.array([[1, 2, 3]])
    >>> variables = model.init(jax.random.key(0), ids)
    >>> model.apply(variables, ids).shape
    (1, 3, 11)
    >>> variables["params"]["h_1"]["mlp"]["c_proj"]["kernel"].shape   # (d_ff, d)
    (64, 16)
  """

  config: GPT2Config

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               position_ids: jax.Array | None = None) -> jax.Array:
    """Runs the model.

    Args:
      input_ids: (N, T) integer token ids in ``[0, vocab_size)``, ``T <= n_positions``.
      attention_mask: optional (N, T), 1 (or true) for real tokens and 0 for padding;
        padded keys are hidden from every query (as in Hugging Face). Outputs at padded
        positions are not meaningful.
      position_ids: optional (N, T) or (T,) positions in ``[0, n_positions)``; default
        ``0 .. T-1``. With left padding pass positions that start at each row's first
        real token.

    Returns:
      (N, T, vocab_size) float32 logits.

    Raises:
      ValueError: ``input_ids`` is not (N, T) of integers, ``T`` exceeds
        ``n_positions``, or a mask / positions array has another shape.
    """
    cfg = self.config
    ids = jnp.asarray(input_ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"input_ids: expected an (N, T) array of integer token ids, got "
                       f"shape {ids.shape} of {ids.dtype}")
    n, t = ids.shape
    if t > cfg.n_positions:
      raise ValueError(f"input_ids: expected at most n_positions = {cfg.n_positions} "
                       f"tokens, got {t}")
    if position_ids is None:
      positions = jnp.broadcast_to(jnp.arange(t), (n, t))
    else:
      positions = jnp.asarray(position_ids)
      if positions.shape not in ((t,), (n, t)):
        raise ValueError(f"position_ids: expected shape {(n, t)} or {(t,)}, got "
                         f"{positions.shape}")
      positions = jnp.broadcast_to(positions, (n, t))
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
    if attention_mask is not None:
      keep = jnp.asarray(attention_mask)
      if keep.shape != (n, t):
        raise ValueError(f"attention_mask: expected shape {(n, t)} (like input_ids), got "
                         f"{keep.shape}")
      mask = mask & keep.astype(bool)[:, None, None, :]
    wte = nn.Embed(cfg.vocab_size, cfg.n_embd, name="wte")
    wpe = nn.Embed(cfg.n_positions, cfg.n_embd, name="wpe")
    x = wte(ids) + wpe(positions)
    for i in range(cfg.n_layer):
      x = Block(cfg, name=f"h_{i}")(x, mask)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, use_fast_variance=False, name="ln_f")(x)
    return wte.attend(x)


def layer_path(block: int, layer: str = "mlp.c_proj") -> tuple[str, ...]:
  """The Linen module path of a projection in block ``block``.

  Args:
    block: the block index ``i`` of ``h_i``.
    layer: Hugging Face's name inside the block: 'mlp.c_proj' (the MLP memory),
      'mlp.c_fc', 'attn.c_attn' or 'attn.c_proj'.

  Returns:
    The tuple of module names, e.g. ``('h_1', 'mlp', 'c_proj')``, as
    :func:`memedit.memory_view` takes it.

  Example:
    >>> layer_path(17)
    ('h_17', 'mlp', 'c_proj')
  """
  allowed = ("mlp.c_proj", "mlp.c_fc", "attn.c_attn", "attn.c_proj")
  if layer not in allowed:
    raise ValueError(f"layer: expected one of {allowed}, got {layer!r}")
  if not isinstance(block, int) or isinstance(block, bool) or block < 0:
    raise ValueError(f"block: expected a non-negative integer, got {block!r}")
  return (f"h_{block}",) + tuple(layer.split("."))


def lm_layout(n_layer: int):
  """The :class:`memedit.lm.hooks.LMLayout` of a GPT-2 with ``n_layer`` blocks: the MLP
  memories ``h_i.mlp.c_proj``, the blocks ``h_i`` and the token embedding ``wte``.

  Example:
    >>> lm_layout(2).memories
    (('h_0', 'mlp', 'c_proj'), ('h_1', 'mlp', 'c_proj'))
  """
  from memedit.lm.hooks import LMLayout

  if isinstance(n_layer, GPT2Config):
    n_layer = n_layer.n_layer
  if not _positive_int(n_layer):
    raise ValueError(f"n_layer: expected a positive integer, got {n_layer!r}")
  return LMLayout(memories=tuple(layer_path(i) for i in range(n_layer)),
                  blocks=tuple((f"h_{i}",) for i in range(n_layer)), embed=("wte",))
