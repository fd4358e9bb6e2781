"""Capture from several threads, views as pytrees, and capture's compiled program."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import models
from compilations import Compilations
from memedit.layers import capture, layer_forward, memory_view
from memedit.layers.hooks import CaptureProgram, capture_program
from memedit.layers.intercept import hide_static
from memedit.layers.model import as_model

X = jax.random.normal(jax.random.key(5), (3, 6))


def _concurrent_captures(model, addresses, calls=3):
  """Every address captured ``calls`` times, each address from its own thread, all
  threads started together; returns {(address, i): (keys, values)} and errors."""
  out, errors = {}, []
  barrier = threading.Barrier(len(addresses))

  def work(address):
    try:
      barrier.wait()
      for i in range(calls):
        c = capture(model, address, X + i, single=True)
        out[(address, i)] = (np.asarray(c.keys), np.asarray(c.values))
    except Exception as e:  # pylint: disable=broad-except
      errors.append((address, e))

  threads = [threading.Thread(target=work, args=(a,)) for a in addresses]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return out, errors


def _check_concurrent(model, addresses):
  expected = {}
  for address in addresses:  # one thread first
    for i in range(3):
      c = capture(model, address, X + i, single=True)
      expected[(address, i)] = (np.asarray(c.keys), np.asarray(c.values))
  got, errors = _concurrent_captures(model, addresses)
  assert not errors, errors
  assert set(got) == set(expected)
  for key, (k, v) in expected.items():
    np.testing.assert_array_equal(got[key][0], k, err_msg=str(key))
    np.testing.assert_array_equal(got[key][1], v, err_msg=str(key))
  # Each layer's keys are its own: different layers have different key / value shapes or
  # values.
  shapes = {a: expected[(a, 0)][0].shape + expected[(a, 0)][1].shape for a in addresses}
  assert len(set(shapes.values())) > 1


def test_threads_capture_layers_of_one_nnx_model_concurrently():
  m = models.build(models.MLP, 0)
  graphdef, state = nnx.split(m)
  before = jax.tree_util.tree_map(np.asarray, state)
  classes = {p: type(mod) for p, mod in nnx.iter_modules(m)}
  addresses = [("inp",), ("blocks", 0, "fc1"), ("blocks", 1, "fc2"), ("head",)]
  _check_concurrent(m, addresses)
  # The caller's model is unchanged: structure, classes, parameters.
  assert nnx.graphdef(m) == graphdef
  assert {p: type(mod) for p, mod in nnx.iter_modules(m)} == classes
  jax.tree_util.tree_map(np.testing.assert_array_equal, before,
                         jax.tree_util.tree_map(np.asarray, nnx.state(m)))
  # The keys of blocks[1].fc2 by hand: relu(fc1(h)) where h is block 1's input.
  h = m.blocks[0](nnx.relu(m.inp(X)))
  c = capture(m, ("blocks", 1, "fc2"), X, single=True)
  np.testing.assert_allclose(c.keys, nnx.relu(m.blocks[1].fc1(h)), rtol=1e-6, atol=1e-6)


def test_threads_capture_layers_of_one_linen_model_concurrently():
  module = models.LMLP()
  variables = models.linen_init(module, X)
  before = jax.tree_util.tree_map(np.asarray, variables)
  model = (module, variables)
  addresses = [("inp",), ("LBlock_0", "fc1"), ("LBlock_1", "fc2"), ("head",)]
  _check_concurrent(model, addresses)
  jax.tree_util.tree_map(np.testing.assert_array_equal, before,
                         jax.tree_util.tree_map(np.asarray, variables))


def test_memory_view_is_a_pytree_and_a_jit_argument():
  m = models.build(models.MLP, 0)
  module = models.LMLP()
  variables = models.linen_init(module, X)
  views = [memory_view(m, ("blocks", 1, "fc1")),
           memory_view((module, variables), ("LBlock_0", "fc1"), X)]
  for view in views:
    leaves, treedef = jax.tree_util.tree_flatten(view)
    # The layer's kernel and bias are the leaves; everything else is static.
    assert sorted(np.shape(x) for x in leaves) == [(16, 32), (32,)]
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert type(again) is type(view)
    for name in ("framework", "address", "weight_path", "layer_type", "kind", "in_ndim",
                 "patch", "kernel_shape", "key_dim", "value_dim", "key_axes", "stacked",
                 "groups", "index", "stack_size", "module_path"):
      assert getattr(again, name) == getattr(view, name), name
    np.testing.assert_array_equal(again.kernel(), view.kernel())
    # Through jax.jit as an argument: the leaves are traced, the rest is static.
    lam, D = jnp.ones((32, 1)), jnp.eye(16)[:1]
    x = X[:, :1] * jnp.ones((3, 16))
    eager = layer_forward(view, lam, D, x)
    traces = []

    def f(v, lam, x):
      traces.append(1)
      return layer_forward(v, lam, D, x)
    jf = jax.jit(f)
    np.testing.assert_allclose(jf(view, lam, x), eager, rtol=1e-6, atol=1e-6)
    scaled = jax.tree_util.tree_map(lambda a: 2 * a, view)  # new leaves, same structure
    np.testing.assert_allclose(jf(scaled, lam, x), layer_forward(scaled, lam, D, x),
                               rtol=1e-6, atol=1e-6)
    assert len(traces) == 1


def _small(seed, hidden):
  return nnx.Sequential(nnx.Linear(5, hidden, rngs=nnx.Rngs(seed)), nnx.relu,
                        nnx.Linear(hidden, 3, rngs=nnx.Rngs(seed + 1)))


def test_capture_compiles_once_per_structure_and_takes_parameters_as_arguments():
  x = jnp.ones((2, 5))
  m0, m1 = _small(0, 11), _small(7, 11)  # two parameter sets of one model
  with Compilations() as compiles:
    c0 = capture(m0, ("layers", 2), x, single=True)
    c1 = capture(m1, ("layers", 2), x, single=True)
  assert compiles.count == 1, compiles.events
  np.testing.assert_allclose(c0.keys, nnx.relu(m0.layers[0](x)), rtol=1e-6)
  np.testing.assert_allclose(c1.keys, nnx.relu(m1.layers[0](x)), rtol=1e-6)
  assert not np.allclose(c0.keys, c1.keys)

  # The parameters are arguments of the program: its text does not grow with them.
  def hlo_size(hidden):
    m = as_model(_small(0, hidden))
    program = CaptureProgram(m.framework, m.definition, m.form, ("layers", 2), None, None,
                             None)
    return len(capture_program.lower(program, m.params, hide_static(((x,), {}))).as_text())
  small, large = hlo_size(4), hlo_size(4096)
  assert large <= 1.1 * small, (small, large)
