"""memedit.lm on a model it was not written for: a tiny Llama-style NNX LM (RMSNorm,
rotary positions, grouped-query attention, a SwiGLU MLP whose down_proj is the memory,
tied embeddings, a BOS-adding tokenizer), and the layouts and models it must refuse."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memedit
from memedit.lm.evaluate import score_targets
from memedit.lm.hooks import LMLayout, run_lm
from memedit.lm.keys import subject_keys
from memedit.lm.memit import memit_edits
from memedit.lm.prompts import Request
from memedit.lm.rome import rome_edits
from memedit.lm.stats import lm_second_moment
from memedit.lm.tracing import causal_trace
from memedit.lm.values import optimize_values

WORDS = "the home of job Ana Bo Cy Rell Dunn oslo lima rome cook poet . is a".split()
BOS = len(WORDS) + 1
VOCAB = BOS + 1
D, INNER = 16, 32


def tokenize(text):
  """A BOS-adding tokenizer (ids 1.. for words, BOS last)."""
  return [BOS] + [WORDS.index(w) + 1 for w in text.split()]


def rope(x):
  t, hd = x.shape[1], x.shape[-1]
  ang = jnp.arange(t)[:, None] / 100.0 ** (jnp.arange(0, hd, 2) / hd)[None]
  cos, sin = jnp.cos(ang)[None, :, None], jnp.sin(ang)[None, :, None]
  a, b = x[..., :hd // 2], x[..., hd // 2:]
  return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], -1)


def attend(q, k, v):
  n, t, h, hd = q.shape
  k, v = (jnp.repeat(a, h // a.shape[2], axis=2) for a in (k, v))  # grouped-query
  s = jnp.einsum("nthd,nshd->nhts", q, k) / np.sqrt(hd)
  s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e30)
  return jnp.einsum("nhts,nshd->nthd", jax.nn.softmax(s, -1), v).reshape(n, t, h * hd)


def rms(x, w):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * w


class Block(nnx.Module):
  def __init__(self, rngs, bias=False):
    lin = lambda i, o, b=False: nnx.Linear(i, o, use_bias=b, rngs=rngs)
    self.ln1, self.ln2 = nnx.Param(jnp.ones((D,))), nnx.Param(jnp.ones((D,)))
    self.q_proj, self.k_proj, self.v_proj, self.o_proj = lin(D, D), lin(D, 8), lin(D, 8), lin(D, D)
    self.gate_proj, self.up_proj = lin(D, INNER), lin(D, INNER)
    self.down_proj = lin(INNER, D, bias)

  def __call__(self, x):
    n, t, _ = x.shape
    h = rms(x, self.ln1[...])
    q = rope(self.q_proj(h).reshape(n, t, 4, 4))
    k = rope(self.k_proj(h).reshape(n, t, 2, 4))
    x = x + self.o_proj(attend(q, k, self.v_proj(h).reshape(n, t, 2, 4)))
    h = rms(x, self.ln2[...])
    return x + self.down_proj(jax.nn.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(nnx.Module):
  """Two blocks in an nnx.List, tied embeddings; ``positions``: a learned position table
  of that many rows (read as NaN past its end, as nnx.Embed does)."""

  def __init__(self, rngs, bias=False, positions=None):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.wpe = None if positions is None else nnx.Embed(positions, D, rngs=rngs)
    self.layers = nnx.List([Block(rngs, bias) for _ in range(2)])

  def __call__(self, ids):
    x = self.embed(ids)
    if self.wpe is not None:
      x = x + self.wpe(jnp.arange(ids.shape[1])[None])
    for b in self.layers:
      x = b(x)
    return self.embed.attend(x)


LAYOUT = LMLayout(memories=[("layers", i, "down_proj") for i in range(2)],
                  blocks=[("layers", i) for i in range(2)], embed="embed")
REQ = Request("the home of {}", "Ana Rell", "oslo", "lima")


@pytest.fixture(scope="module")
def llama():
  model = Llama(nnx.Rngs(0), bias=True)
  graphdef, state = nnx.split(model)
  bias = state["layers"][0]["down_proj"]["bias"]
  bias[...] = jnp.asarray(np.random.default_rng(1).normal(size=bias.shape), jnp.float32)
  return model, graphdef, state


def test_llama_covariance_rome_memit_match_numpy(llama):
  model, graphdef, state = llama
  before = [np.array(a) for a in jax.tree_util.tree_leaves(state)]
  rng = np.random.default_rng(0)
  ids = np.concatenate([np.full((4, 1), BOS), rng.integers(1, BOS, (4, 15))], 1)
  mask = np.ones((4, 16), np.float32)
  mask[1, 9:] = 0
  ids = np.where(mask > 0, ids, 0).astype(np.int32)
  C = lm_second_moment((graphdef, state), LAYOUT.memories[0], [(ids, mask)])
  # The references run the model in one compiled program each (eagerly, every operation of
  # a new shape would compile its own).
  recorded = jax.jit(lambda s, i, record: run_lm(graphdef, s, i, record=record)[1],
                     static_argnames="record")
  rec = recorded(state, jnp.asarray(ids), record=(("layers", 0, "gate_proj"),
                                                  ("layers", 0, "up_proj")))
  g, u = (np.asarray(rec[("layers", 0, p)][1], np.float64) for p in ("gate_proj", "up_proj"))
  keys = (g / (1 + np.exp(-g)) * u)[mask > 0]  # silu(gate(x)) * up(x)
  np.testing.assert_allclose(C, keys.T @ keys / len(keys), rtol=2e-5, atol=1e-6)
  # k* after the BOS: the subject's last token is position 5.
  k = subject_keys((graphdef, state), LAYOUT.memories[0], tokenize, [REQ])
  rec = recorded(state, jnp.asarray([tokenize(REQ.text)]), record=(LAYOUT.memories[0],))
  np.testing.assert_allclose(k[0], np.asarray(rec[LAYOUT.memories[0]][0][0, 5]),
                             rtol=1e-5, atol=1e-5)
  C = C + 0.1 * np.eye(INNER, dtype=np.float32)
  res = rome_edits((graphdef, state), LAYOUT.memories[0], tokenize, [REQ], C,
                   value_options={"steps": 3})[0]
  edited, hist = memedit.apply_edit(state, res.edit)
  layer = edited["layers"][0]["down_proj"]
  out = (np.asarray(res.key, np.float64) @ np.asarray(layer["kernel"][...], np.float64)
         + np.asarray(layer["bias"][...], np.float64))  # bias too
  np.testing.assert_allclose(out, res.value, rtol=1e-5, atol=1e-5)
  back, _ = memedit.revert_edit(edited, res.edit, hist)
  for a, b in zip(jax.tree_util.tree_leaves(back), before):
    np.testing.assert_array_equal(np.asarray(a), b)
  m = memit_edits((graphdef, state), LAYOUT, [0, 1], tokenize, [REQ], {0: C, 1: C},
                  penalty=1e-4, value_options={"steps": 3})
  moved = np.linalg.norm(m.targets - m.values.ref0)
  assert np.linalg.norm(m.reached - m.targets) < 1e-3 * moved
  for a, b in zip(jax.tree_util.tree_leaves(nnx.split(model)[1]), before):
    np.testing.assert_array_equal(np.asarray(a), b)  # the caller's model is untouched


def test_memit_refuses_memories_that_do_not_write_the_hidden_state(llama):
  _, graphdef, state = llama
  gates = LMLayout(memories=[("layers", i, "gate_proj") for i in range(2)],
                   blocks=LAYOUT.blocks, embed="embed")
  eye = np.eye(D, dtype=np.float32)
  with pytest.raises(ValueError, match=r"layout: expected memories that write into the "
                     r"hidden state of block \('layers', 1\) \(width 16\), got \('layers', 0, "
                     r"'gate_proj'\) with outputs of width 32"):
    memit_edits((graphdef, state), gates, [0, 1], tokenize, [REQ], {0: eye, 1: eye})


def test_causal_trace_with_embeddings_narrower_than_the_blocks():
  class Factored(Llama):
    def __init__(self, rngs):
      super().__init__(rngs)
      self.embed = nnx.Embed(VOCAB, 8, rngs=rngs)  # (V, 8), then up to the blocks' 16
      self.up = nnx.Linear(8, D, rngs=rngs)
      self.head = nnx.Linear(D, VOCAB, rngs=rngs)

    def __call__(self, ids):
      x = self.up(self.embed(ids))
      for b in self.layers:
        x = b(x)
      return self.head(x)

  model = Factored(nnx.Rngs(2))
  res = causal_trace(nnx.split(model), LAYOUT, tokenize, REQ.prompt, REQ.subject,
                     target="oslo", samples=2)
  logits = nnx.jit(lambda m, ids: m(ids))(model, jnp.asarray([tokenize(REQ.text)]))
  last = np.asarray(logits[0, -1], np.float64)
  p = np.exp(last - last.max())[WORDS.index("oslo") + 1] / np.exp(last - last.max()).sum()
  np.testing.assert_allclose(res.clean, float(p), rtol=1e-5)
  np.testing.assert_allclose(res.scores[-1, -1], res.clean, rtol=1e-5)
  np.testing.assert_allclose(res.scores[:3], res.corrupted, rtol=1e-5)  # BOS, the, home


def test_prompts_past_a_position_table_are_refused():
  model = nnx.split(Llama(nnx.Rngs(3), positions=4))  # 'the home of Ana Rell' is 6 tokens
  msg = r"expected finite values from the model, got NaN or inf for 'the home of Ana Rell"
  with pytest.raises(ValueError, match="subject_keys: " + msg):
    subject_keys(model, LAYOUT.memories[0], tokenize, [REQ])
  with pytest.raises(ValueError, match="score_targets: " + msg):
    score_targets(model, tokenize, [(REQ.text, "oslo")])
  with pytest.raises(ValueError, match="optimize_values: " + msg):
    optimize_values(model, LAYOUT.memories[0], tokenize, [REQ], steps=1)
  with pytest.raises(ValueError, match="causal_trace: " + msg):
    causal_trace(model, LAYOUT, tokenize, REQ.prompt, REQ.subject, samples=1)


class _Step(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + nn.Dense(D, use_bias=False, name="down_proj")(nn.Dense(INNER, name="up")(x)), None


class _Scanned(nn.Module):
  @nn.compact
  def __call__(self, ids):
    emb = nn.Embed(VOCAB, D, name="embed")
    x, _ = nn.scan(_Step, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=2)(name="layers")(emb(ids), None)
    return emb.attend(x)


def test_scanned_blocks_are_refused():
  module = _Scanned()
  model = (module, module.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  with pytest.raises(ValueError, match=r"address \('layers', 'down_proj'\): expected the MLP "
                     r"projection of one block .*got a layer of a scanned stack of blocks"):
    subject_keys(model, ("layers", "down_proj"), tokenize, [REQ])
  with pytest.raises(ValueError, match=r"address \('layers', 'down_proj'\): expected a module "
                     r"called once per forward pass with its parameters as stored "
                     r"\(\(2, 32, 16\)\), got one that runs inside a lifted transform"):
    optimize_values(model, ("layers", "down_proj"), tokenize, [REQ], ("{}",), steps=1)
  with pytest.raises(ValueError, match=r"address \('layers', 1, 'down_proj'\): expected the "
                     r"MLP projection of one block .*got a layer of a scanned stack of blocks "
                     r"\(kernel \(2, 32, 16\)\)"):
    rome_edits(model, ("layers", 1, "down_proj"), tokenize, [REQ], np.eye(INNER))
  layout = LMLayout(memories=[("layers", "down_proj")] * 2, blocks=[("layers",)] * 2,
                    embed="embed")
  with pytest.raises(ValueError, match=r"address \('layers',\): expected a module called "
                     r"once per forward pass"):
    causal_trace(model, layout, tokenize, REQ.prompt, REQ.subject, samples=1)


def test_subject_keys_refuse_an_address_that_is_not_a_memory(tiny):
  """subject_keys at a whole block (or a norm) returned that module's input silently."""
  from memedit.lm.keys import subject_keys
  from memedit.lm.prompts import Request

  w = tiny.world
  req = Request("we read that {}", w.subjects[0], w.relations[0].objects[1])
  with pytest.raises(ValueError, match=r"layer kind: ports.gpt2.model.Block is not a registered "
                                       r"memory layer"):
    subject_keys(tiny.model, tiny.layout.blocks[0], w.tokenize, [req])
