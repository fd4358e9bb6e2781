"""GPT-2 port for language-model edits (no torch): checkpoints of Flax-trained weights
(save_gpt2 / load_gpt2 / ports.load_converted) and the editors' layout of the model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ports
from ports import gpt2

CFG = gpt2.GPT2Config(vocab_size=13, n_positions=8, n_embd=16, n_layer=2, n_head=2)


@pytest.fixture(scope="module")
def variables():
  return gpt2.GPT2LMHeadModel(CFG).init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))


def test_save_gpt2_round_trip(variables, tmp_path):
  out = gpt2.save_gpt2(tmp_path / "m", CFG, variables, source={"format": "test", "seed": 1})
  module, loaded, meta = gpt2.load_gpt2(out)
  assert module.config == CFG and meta["source"] == {"format": "test", "seed": 1}
  for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  module2, _, config = ports.load_converted(out)
  assert config["architecture"] == "gpt2" and module2.config == CFG
  ids = jnp.array([[1, 2, 3]])
  np.testing.assert_array_equal(np.asarray(module.apply(loaded, ids)),
                                np.asarray(module.apply(variables, ids)))
  # An existing checkpoint is replaced; any other folder is not.
  gpt2.save_gpt2(out, CFG, variables)
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("keep")
  with pytest.raises(ValueError):
    gpt2.save_gpt2(other, CFG, variables)
  assert (other / "notes.txt").read_text() == "keep"


def test_save_gpt2_refuses_wrong_weights(variables, tmp_path):
  wrong = gpt2.GPT2Config(vocab_size=13, n_positions=8, n_embd=16, n_layer=3, n_head=2)
  with pytest.raises(ValueError, match="expected the parameters of GPT-2"):
    gpt2.save_gpt2(tmp_path / "a", wrong, variables)
  bad = jax.tree_util.tree_map(lambda x: x, variables)
  bad["params"]["ln_f"]["bias"] = jnp.full((16,), jnp.nan)
  with pytest.raises(ValueError, match="expected finite weights"):
    gpt2.save_gpt2(tmp_path / "b", CFG, bad)
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_lm_layout_addresses_real_modules(variables):
  from memedit.lm.hooks import run_lm

  layout = gpt2.lm_layout(CFG)
  assert layout == gpt2.lm_layout(2)
  assert layout.memories[1] == gpt2.layer_path(1) and layout.embed == ("wte",)
  module = gpt2.GPT2LMHeadModel(CFG)
  ids = jnp.array([[1, 2, 3, 4]])
  _, rec = run_lm(module, variables, ids,
                  record=list(layout.memories) + list(layout.blocks) + [layout.embed])
  assert rec[layout.memories[0]][0].shape == (1, 4, 64)  # the MLP keys
  assert rec[layout.blocks[1]][1].shape == (1, 4, 16)
  np.testing.assert_allclose(np.asarray(rec[layout.embed][1][0]),
                             np.asarray(variables["params"]["wte"]["embedding"][ids[0]]))
  with pytest.raises(ValueError, match="n_layer: expected a positive integer"):
    gpt2.lm_layout(0)
