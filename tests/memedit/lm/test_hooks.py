"""run_lm on Linen and NNX models (outputs rewritten and recorded, the caller's model
untouched), and the ROME workflow on an NNX language model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import memedit
from memedit.lm.hooks import LMLayout, as_path, run_lm, split_model
from memedit.lm.keys import check_memory, subject_keys
from memedit.lm.prompts import Request
from memedit.lm.rome import rome_edits
from memedit.lm.stats import lm_second_moment, token_batches


class Block(nnx.Module):
  """x + causal mean of x (a stand-in for attention) + MLP(x)."""

  def __init__(self, d: int, rngs: nnx.Rngs):
    self.mix = nnx.Linear(d, d, rngs=rngs)
    self.fc = nnx.Linear(d, 4 * d, rngs=rngs)
    self.proj = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x):
    t = x.shape[1]
    mean = jnp.cumsum(x, axis=1) / jnp.arange(1, t + 1)[None, :, None]
    x = x + self.mix(mean)
    return x + self.proj(jax.nn.gelu(self.fc(x)))


class ToyLM(nnx.Module):
  def __init__(self, vocab: int, d: int, n: int, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.blocks = nnx.List([Block(d, rngs) for _ in range(n)])
    self.head = nnx.Linear(d, vocab, rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids)
    for b in self.blocks:
      x = b(x)
    return self.head(x)


VOCAB = {w: i + 1 for i, w in enumerate(
    "Ana Bo Cy Di lives in works as a is rome oslo lima cook poet . it".split())}


def tokenize(text):
  return [VOCAB[w] for w in text.split()]


@pytest.fixture(scope="module")
def toy():
  model = ToyLM(len(VOCAB) + 1, 16, 2, nnx.Rngs(0))
  layout = LMLayout(memories=[("blocks", i, "proj") for i in range(2)],
                    blocks=[("blocks", i) for i in range(2)], embed="embed")
  return nnx.split(model), layout


def test_run_lm_nnx_hooks_records_and_leaves_the_model(toy):
  (graphdef, state), layout = toy
  ids = jnp.asarray([tokenize("Ana lives in rome .")])
  before = jax.tree_util.tree_map(np.asarray, state)
  plain = nnx.merge(graphdef, state)(ids)
  logits, rec = run_lm(graphdef, state, ids, record=[layout.memories[1], layout.blocks[0]])
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(plain))
  keys, values = rec[layout.memories[1]]
  assert keys.shape == (1, 5, 64) and values.shape == (1, 5, 16)
  zeroed, rec = run_lm(graphdef, state, ids, hooks={layout.blocks[1]: lambda x, y: 0 * y},
                       record=[layout.blocks[1]])
  np.testing.assert_array_equal(np.asarray(rec[layout.blocks[1]][1]), 0.0)
  head_bias = np.asarray(state["head"]["bias"][...])
  np.testing.assert_allclose(np.asarray(zeroed[0, 0]), head_bias, atol=1e-6)
  mem = layout.memories[0]
  jitted = jax.jit(lambda s, i: run_lm(graphdef, s, i, record=[mem])[1][mem][1])
  eager = run_lm(graphdef, state, ids, record=[mem])[1][mem][1]
  np.testing.assert_allclose(np.asarray(jitted(state, ids)), np.asarray(eager), rtol=1e-5,
                             atol=1e-6)
  after = jax.tree_util.tree_map(np.asarray, state)
  for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
    np.testing.assert_array_equal(a, b)
  assert type(nnx.merge(graphdef, state).blocks[0]) is Block  # no class left swapped
  with pytest.raises(ValueError, match="'nothing' not found"):
    run_lm(graphdef, state, ids, record=[("head", "nothing")])


def test_run_lm_linen_hook(tiny):
  ids = jnp.asarray([tiny.world.tokenize(tiny.world.relations[0].train_templates[0].format(
      tiny.world.subjects[0]))])
  addr = tiny.layout.memories[0]
  out, rec = run_lm(tiny.module, tiny.variables, ids, hooks={addr: lambda x, y: y + 1.0},
                    record=[addr])
  _, clean = run_lm(tiny.module, tiny.variables, ids, record=[addr])
  np.testing.assert_allclose(np.asarray(rec[addr][1]), np.asarray(clean[addr][1]) + 1.0,
                             rtol=1e-6)
  assert not np.allclose(np.asarray(out), np.asarray(tiny.module.apply(tiny.variables, ids)))
  with pytest.raises(ValueError, match="were not called"):
    run_lm(tiny.module, tiny.variables, ids, record=[("h_9",)])


def test_addresses_and_models():
  assert as_path("h_1.mlp.c_proj") == ("h_1", "mlp", "c_proj")
  assert as_path(["blocks", 0]) == ("blocks", 0)
  with pytest.raises(ValueError, match="expected a module path"):
    as_path(3.5)
  with pytest.raises(ValueError, match="expected Linen"):
    split_model(object())
  with pytest.raises(ValueError, match="expected one per memory"):
    LMLayout(memories=["a.b"], blocks=["a", "c"])


def test_layout_refuses_one_address_for_the_sequence():
  """One address as a string was iterated character by character: memories ('h',), ('_',),
  (0,), () ..., found missing only when the model ran."""
  with pytest.raises(ValueError, match=r"memories: expected a sequence of module addresses, "
                                       r"one per block .*got 'h_0.mlp.c_proj'"):
    LMLayout(memories="h_0.mlp.c_proj")
  with pytest.raises(ValueError, match=r"blocks: expected a sequence of module addresses.*"
                                       r"got 'h_0'"):
    LMLayout(memories=["h_0.mlp.c_proj"], blocks="h_0")
  assert LMLayout(memories=("h_0.mlp.c_proj",)).memories == (("h_0", "mlp", "c_proj"),)


def test_rome_on_an_nnx_model(toy):
  """The workflow takes NNX (graphdef, state): C over a text stream, k*, v*, the rank-one
  Edit of the state; the edited layer maps k* to v*. (The first block: with the subject
  before the prompt's end the last block's MLP cannot reach the prediction.)"""
  (graphdef, state), layout = toy
  model = (graphdef, state)
  addr = layout.memories[0]
  rng = np.random.default_rng(0)
  ids = rng.integers(1, len(VOCAB) + 1, size=(64, 8)).astype(np.int32)
  C = lm_second_moment(model, addr, token_batches(ids, 16))
  req = Request("{} lives in", "Ana", "lima", "rome")
  (res,) = rome_edits(model, addr, tokenize, [req], C, contexts=("{}", "it . {}"),
                      value_options={"steps": 30, "clamp": 50.0})
  view = check_memory(model, addr, np.asarray([tokenize(req.text)]))
  assert res.edit.path == tuple(view.weight_path) and res.edit.rank == 1
  new_state, hist = memedit.apply_edit(state, res.edit)
  layer = nnx.merge(graphdef, new_state).blocks[0].proj
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(res.key))), res.value, rtol=1e-3,
                             atol=1e-4)
  k2 = subject_keys((graphdef, new_state), addr, tokenize, [req], ("{}", "it . {}"))
  np.testing.assert_allclose(k2[0], res.key, rtol=1e-5)  # keys are read before the edit
  back, _ = memedit.revert_edit(new_state, res.edit, hist)
  for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_statistics_refuse_token_ids_outside_the_vocabulary(tiny, tmp_path):
  """Out-of-range ids read NaN from the embedding (and spread through attention): refused
  naming the batch and the vocabulary, before any fold for a list, as the fold reads it
  for an iterator; no cache file is left."""
  V = tiny.config.vocab_size
  addr = tiny.layout.memories[0]
  ids = np.arange(256).reshape(32, 8) % V
  good = token_batches(ids, 4)
  bad = token_batches(np.where(ids == 5, V + 2, ids), 4)
  with pytest.raises(ValueError, match=rf"batches\[0\]: expected token ids 0 <= id < {V} "
                                       rf"\(the model's vocabulary\), got ids from 0 to {V + 2}"):
    lm_second_moment(tiny.model, addr, bad)
  negative = good[:1] + [(good[1][0] - 100, good[1][1])]
  with pytest.raises(ValueError, match=r"batches\[1\]: expected token ids .* got ids from -68 to -37"):
    lm_second_moment(tiny.model, addr, iter(negative), spec={"text": "t"},
                     cache_dir=tmp_path)
  assert not [p for p in tmp_path.rglob("*") if p.is_file()]
  with pytest.raises(ValueError, match=r"batches\[0\]: expected integer token ids, got dtype "
                                       r"float32"):
    lm_second_moment(tiny.model, addr, [(ids.astype(np.float32), good[0][1])])
  C = lm_second_moment(tiny.model, addr, iter(good), spec={"text": "ok"})
  np.testing.assert_array_equal(C, lm_second_moment(tiny.model, addr, good))
