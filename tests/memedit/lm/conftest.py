"""A tiny world and a tiny random GPT-2 over its vocabulary, shared by the lm tests (one
model, so the compiled programs are shared too)."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memedit.lm.stats import lm_second_moment
from memedit.lm.world import make_world, text_batches
from ports.gpt2 import GPT2Config, GPT2LMHeadModel, lm_layout


@pytest.fixture(scope="session")
def tiny():
  world = make_world(seed=3, n_subjects=24, n_relations=2, n_objects=4)
  cfg = GPT2Config(vocab_size=world.vocab_size, n_positions=32, n_embd=32, n_layer=2,
                   n_head=2)
  module = GPT2LMHeadModel(cfg)
  variables = module.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  return types.SimpleNamespace(world=world, module=module, variables=variables,
                               model=(module, variables), layout=lm_layout(2), config=cfg)


@pytest.fixture(scope="session")
def tiny_covariances(tiny):
  """C of both blocks' MLP keys over ~6,000 tokens of the tiny world's text."""
  batches = text_batches(tiny.world, 6000, 16, 32)
  return {l: lm_second_moment(tiny.model, tiny.layout.memories[l], batches)
          for l in range(2)}


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))
