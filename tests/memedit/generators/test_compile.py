"""Compiled programs take the parameters as arguments: one model structure, one compile."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import memedit
from memedit import generators as gens

from compilations import Compilations
from toy import box, toy_generator

def _workflow(gen):
  """Statistics, capture (context, copy, paste), an own-taps Λ solve, scores and images."""
  state = gens.collect_statistics(gen, "up2", 32, batch_size=16, progress=False)
  C = np.asarray(memedit.second_moment(state))
  keys, weights = gens.context_keys(gen, "up2", [(1, box(4, 10, 4, 12))])
  D = gens.directions(C, keys, weights)
  copied = gens.copy_values(gen, "up2", 3, box(4, 10, 4, 12))
  target = gens.paste_target(gen, "up2", copied, 1, box(4, 10, 4, 12))
  res = gens.insert(gen, "up2", D, target, steps=30, taps="own")
  scores = gens.layer_scores(gen, "up2", D, 4)
  gens.generate_images(gen, gen.latents([2]))
  return res, scores


def test_a_second_parameter_set_reuses_every_compiled_program():
  first, second = toy_generator(seed=0), toy_generator(seed=1)
  res1, _ = _workflow(first)
  with Compilations() as counter:
    res2, scores = _workflow(second)
    jax.block_until_ready(res2.edit.lam)
  assert counter.count == 0
  # ... and the second run used the second parameters.
  assert not np.array_equal(np.asarray(res1.edit.lam), np.asarray(res2.edit.lam))
  keys = gens.run_layer(second, "up2", second.latents(4)).keys
  np.testing.assert_allclose(scores, np.abs(keys @ res2.D[0]), rtol=1e-5, atol=1e-6)
  # An edited copy of the generator shares them too.
  edited, _ = gens.edited(second, res2.edit)
  with Compilations() as counter:
    gens.run_layer(edited, "up2", edited.latents([1]))
    gens.generate_images(edited, edited.latents([2]))
  assert counter.count == 0


@pytest.mark.parametrize("which", ["pass", "keys", "crop"])
def test_program_text_does_not_grow_with_the_parameters(which):
  texts = []
  for width in (4, 256):  # 64× the hidden width (4096× the transposed convolutions' size)
    gen = toy_generator(width)
    z = jnp.asarray(gen.latents(2))
    if which == "pass":
      text = gens.pass_program(gen, "up2").lower(gen.params, z, None, None).as_text()
    elif which == "keys":
      text = gens.keys_fn(gen, "up2").lower(gen.params, z).as_text()
    else:
      copied = gens.copy_values(gen, "up2", 0, box(4, 10, 4, 12))
      target = gens.paste_target(gen, "up2", copied, 1, box(4, 10, 4, 12))
      f, keys = gens.crop_problem(gen, "up2", target)
      text = jax.jit(f).lower(gens.layer_kernel(gen, "up2"), keys).as_text()
    texts.append(len(text))
  assert texts[1] <= 1.1 * texts[0], texts
