"""Layers whose parameters carry metadata, low-precision dtypes or shardings: Linen
parameters boxed by ``nn.with_partitioning`` / ``nn.with_logical_partitioning`` (also in
an ``nn.scan`` stack), layers computing in bfloat16 / float16, and NNX models whose
parameters live on a ``jax.make_mesh`` mesh (explicit axes, in a subprocess with four
host devices). Numbers against float64 numpy references."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import memedit
from memedit.layers import capture, insert_through_view, layer_covariance, memory_view
from memedit.tree import get_leaf


def _same_bits(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(
      lambda x, y: np.asarray(x).dtype == np.asarray(y).dtype
      and np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8)), a, b)))


def _box_types(tree):
  return jax.tree.map(lambda a: type(a).__name__, tree,
                      is_leaf=lambda a: isinstance(a, nn.meta.AxisMetadata))


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
    return x + nn.tanh(nn.Dense(6, kernel_init=init, name="fc")(x)), None


class _BoxedNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(6, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(),
                                                     ("a", "b")), name="fc1")(x)
    stack = nn.scan(_Block, variable_axes={"params": 0, "intermediates": 0},
                    split_rngs={"params": True}, length=2,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = stack(name="stack")(nn.gelu(x), None)
    init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed"))
    return nn.Dense(3, kernel_init=init, name="fc2")(x)


def test_linen_boxed_params_view_stats_insert_keep_their_boxes():
  # Before the fix memory_view raised AttributeError ('Partitioned' object has no
  # attribute 'shape') from inside the interceptor for a boxed layer, and refused one
  # layer of a boxed nn.scan stack as "not stacked" (the boxes' shapes read as ()).
  rng = np.random.default_rng(0)
  xs = [jnp.asarray(rng.normal(size=(12, 4)), jnp.float32) for _ in range(2)]
  mod = _BoxedNet()
  variables = mod.init(jax.random.key(0), xs[0])
  assert _box_types(variables)["params"]["stack"]["fc"]["kernel"] == "LogicallyPartitioned"
  model = (mod, variables)
  plain = nn.unbox(variables)
  x64 = np.concatenate([np.asarray(x, np.float64) for x in xs])

  def dense(p, x):
    return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)

  def gelu(x):
    return np.asarray(nn.gelu(jnp.asarray(x, jnp.float32)), np.float64)

  h = gelu(dense(plain["params"]["fc1"], x64))
  layer0 = {k: v[0] for k, v in plain["params"]["stack"]["fc"].items()}
  keys1 = h + np.tanh(dense(layer0, h))  # the keys of layer 1 of the stack
  for address, want, box in ((("stack", 1, "fc"), keys1, "LogicallyPartitioned"),
                             (("fc1",), x64, "Partitioned")):
    view = memory_view(model, address, xs[0])
    if address[0] == "stack":  # statistics and keys through the boxed model
      C = memedit.second_moment(layer_covariance(model, view, xs))
      assert np.abs(np.asarray(C, np.float64) - want.T @ want / len(want)).max() < 1e-6
      k = capture(model, view, xs[0][:2], single=True).keys
      kernel = lambda v: v["params"]["stack"]["fc"]["kernel"]
    else:
      C = jnp.asarray(want.T @ want / len(want), jnp.float32)
      k = xs[0][:2]
      kernel = lambda v: v["params"]["fc1"]["kernel"]
    targets = jnp.asarray(rng.normal(size=(2, view.value_dim)), jnp.float32)
    edit = insert_through_view(view, C, k, targets)
    edited, history = memedit.apply_edit(variables, edit)
    assert _box_types(edited) == _box_types(variables)
    assert type(kernel(edited)).__name__ == box
    assert kernel(edited).names == kernel(variables).names
    k1 = np.asarray(kernel(variables).value, np.float64)
    k1 = k1 + np.asarray(memedit.edit_delta(edit, k1.shape), np.float64)
    if view.index is not None:
      k1 = k1[view.index]
    bias = np.asarray(get_leaf(plain, view.weight_path[:-1] + ("bias",)), np.float64)
    bias = bias if view.index is None else bias[view.index]
    err = np.abs(np.asarray(k, np.float64) @ k1 + bias - np.asarray(targets)).max()
    assert err < 1e-4, (address, err)
    restored, _ = memedit.revert_edit(edited, edit, history)
    assert _same_bits(restored, variables)
  sub = memedit.substitute(model, view, jnp.zeros(view.kernel_shape))
  assert _box_types(sub[1]) == _box_types(variables)


def test_low_precision_layer_insert_takes_its_output_unrounded():
  # A layer computing in bfloat16 / float16 rounded f(W0, k*) to its dtype, and the
  # insert's targets carried that rounding: W0 + ΔW missed v* by 7e-3 (bfloat16) before
  # the edit was even written into the kernel.
  rng = np.random.default_rng(1)
  xs = [jnp.asarray(rng.normal(size=(16, 8)), jnp.float32) for _ in range(2)]
  x64 = np.concatenate([np.asarray(x, np.float64) for x in xs])
  C = jnp.asarray(x64.T @ x64 / len(x64), jnp.float32)
  for dt, tol in ((jnp.bfloat16, 1e-5), (jnp.float16, 1e-5)):
    model = nnx.Sequential(nnx.Linear(8, 6, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0)))
    model.layers[0].bias[...] = jnp.asarray(rng.normal(size=6), dt)
    view = memory_view(model, "layers/0")
    keys = xs[0][:3].astype(dt).astype(jnp.float32)  # what the layer itself reads
    targets = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
    edit = insert_through_view(view, C, keys, targets)
    k0 = np.asarray(view.kernel().astype(jnp.float32), np.float64)
    b0 = np.asarray(model.layers[0].bias[...].astype(jnp.float32), np.float64)
    k1 = k0 + np.asarray(memedit.edit_delta(edit, k0.shape), np.float64)
    err = np.abs(np.asarray(keys, np.float64) @ k1 + b0 - np.asarray(targets)).max()
    assert err < tol, (dt, err)
    graphdef, state = nnx.split(model)
    state1, history = memedit.apply_edit(state, edit)
    written = state1["layers"][0]["kernel"][...]
    assert written.dtype == dt
    # Rounded once, from the float32 sum: as base + ΔK summed in float32.
    once = (jnp.asarray(k0, jnp.float32) + memedit.edit_delta(edit, k0.shape)).astype(dt)
    assert _same_bits(written, once)
    restored, _ = memedit.revert_edit(state1, edit, history)
    assert _same_bits(restored, state)


SCRIPT = textwrap.dedent("""
    import json
    import numpy as np, jax, jax.numpy as jnp
    from flax import nnx
    import memedit
    from memedit.edits import _fingerprint
    from memedit.layers import capture, insert_through_view, layer_covariance, memory_view
    from memedit.tree import get_leaf
    assert len(jax.devices()) == 4
    out = {}
    rng = np.random.default_rng(2)
    part = lambda init, names: nnx.with_partitioning(init, names)
    lecun, zeros = nnx.initializers.lecun_normal(), nnx.initializers.zeros_init()

    class Net(nnx.Module):
      def __init__(self, rngs):
        self.fc1 = nnx.Linear(6, 8, kernel_init=part(lecun, (None, "b")),
                              bias_init=part(zeros, ("b",)), rngs=rngs)
        self.fc2 = nnx.Linear(8, 4, kernel_init=part(lecun, (None, "a")),
                              bias_init=part(zeros, ("a",)), rngs=rngs)
      def __call__(self, x):
        return self.fc2(nnx.gelu(self.fc1(x)))

    mesh = jax.make_mesh((2, 2), ("a", "b"))  # explicit axes by default
    out["explicit"] = all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
    with jax.set_mesh(mesh):
      model = Net(nnx.Rngs(0))
    xs = [jnp.asarray(rng.normal(size=(8, 6)), jnp.float32) for _ in range(3)]
    x64 = np.concatenate([np.asarray(x, np.float64) for x in xs])
    h = np.asarray(nnx.gelu(jnp.asarray(
        x64 @ np.asarray(model.fc1.kernel[...], np.float64)
        + np.asarray(model.fc1.bias[...], np.float64), jnp.float32)), np.float64)
    view = memory_view(model, "fc2")
    C = memedit.second_moment(layer_covariance(model, view, xs))
    out["c_err"] = float(np.abs(np.asarray(C, np.float64) - h.T @ h / len(h)).max())
    keys = capture(model, view, xs[0][:2], single=True).keys
    targets = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)
    edit = insert_through_view(view, C, keys, targets)
    graphdef, state = nnx.split(model)
    state1, history = memedit.apply_edit(state, edit)
    before, after = state["fc2"]["kernel"][...], state1["fc2"]["kernel"][...]
    out["spec"] = [str(before.sharding.spec), str(after.sharding.spec)]
    k1 = (np.asarray(before, np.float64)
          + np.asarray(memedit.edit_delta(edit, before.shape), np.float64))
    out["insert_err"] = float(np.abs(np.asarray(keys, np.float64) @ k1
                                     + np.asarray(model.fc2.bias[...], np.float64)
                                     - np.asarray(targets)).max())
    restored, _ = memedit.revert_edit(state1, edit, history)
    out["revert"] = bool(np.array_equal(np.asarray(restored["fc2"]["kernel"][...]),
                                        np.asarray(before)))
    out["fingerprint"] = [np.asarray(_fingerprint(after)).tolist(),
                          np.asarray(_fingerprint(np.asarray(after))).tolist()]

    # One layer of a stack (nnx.vmap + nnx.scan), its kernel sharded 4 ways.
    mesh4 = jax.make_mesh((4,), ("m",))
    class Blk(nnx.Module):
      def __init__(self, rngs):
        self.fc = nnx.Linear(8, 8, kernel_init=part(lecun, ("m", None)), rngs=rngs)
      def __call__(self, x):
        return x + nnx.tanh(self.fc(x))
    class Stack(nnx.Module):
      def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
          return Blk(rngs)
        self.stack = make(rngs)
      def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def run(blk, x):
          return blk(x)
        return run(self.stack, x)
    with jax.set_mesh(mesh4):
      model = Stack(nnx.Rngs(1))
    xs = [jnp.asarray(rng.normal(size=(8, 8)), jnp.float32) for _ in range(2)]
    x64 = np.concatenate([np.asarray(x, np.float64) for x in xs])
    w = np.asarray(model.stack.fc.kernel[...], np.float64)
    b = np.asarray(model.stack.fc.bias[...], np.float64)
    k64 = x64 + np.tanh(x64 @ w[0] + b[0])
    view = memory_view(model, ("stack", 1, "fc"), xs[0])
    C = memedit.second_moment(layer_covariance(model, view, xs))
    out["stack_c_err"] = float(np.abs(np.asarray(C, np.float64) - k64.T @ k64 / len(k64)).max())
    keys = capture(model, view, xs[0][:2], single=True).keys
    targets = jnp.asarray(rng.normal(size=(2, 8)), jnp.float32)
    edit = insert_through_view(view, C, keys, targets)
    graphdef, state = nnx.split(model)
    state1, history = memedit.apply_edit(state, edit)
    before, after = state["stack"]["fc"]["kernel"][...], state1["stack"]["fc"]["kernel"][...]
    out["stack_spec"] = [str(before.sharding.spec), str(after.sharding.spec)]
    out["stack_others"] = bool(np.array_equal(np.asarray(after)[[0, 2]],
                                              np.asarray(before)[[0, 2]]))
    k1 = np.asarray(before, np.float64)[1] + np.asarray(
        memedit.edit_delta(edit, before.shape), np.float64)[1]
    out["stack_insert_err"] = float(np.abs(np.asarray(keys, np.float64) @ k1 + b[1]
                                           - np.asarray(targets)).max())
    restored, _ = memedit.revert_edit(state1, edit, history)
    out["stack_revert"] = bool(np.array_equal(
        np.asarray(restored["stack"]["fc"]["kernel"][...]), np.asarray(before)))

    # Data parallel: parameters replicated and batches sharded over the explicit mesh.
    from jax.sharding import NamedSharding, PartitionSpec as P
    model = nnx.Sequential(nnx.Linear(6, 8, rngs=nnx.Rngs(2)), nnx.gelu,
                           nnx.Linear(8, 4, rngs=nnx.Rngs(3)))
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.device_put(state, NamedSharding(mesh4, P())))
    xs = [jax.device_put(jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
                         NamedSharding(mesh4, P("m"))) for _ in range(2)]
    x64 = np.concatenate([np.asarray(x, np.float64) for x in xs])
    w = np.asarray(model.layers[0].kernel[...], np.float64)
    b = np.asarray(model.layers[0].bias[...], np.float64)
    h = np.asarray(nnx.gelu(jnp.asarray(x64 @ w + b, jnp.float32)), np.float64)
    C = memedit.second_moment(layer_covariance(model, "layers/2", xs))
    out["dp_c_err"] = float(np.abs(np.asarray(C, np.float64) - h.T @ h / len(h)).max())
    print(json.dumps(out))
""")


def test_nnx_params_on_an_explicit_mesh_stats_insert_apply_revert():
  # Before the fix, on jax.make_mesh's mesh (explicit axes): layer_covariance raised
  # JAX's ShardingTypeError from the fold's Gram (keys sharded along their dims),
  # insert_through_view one from its QR, and apply_edit one from the fingerprint's
  # reshape of the sharded leaf; with batches sharded over the mesh it raised "Mesh for
  # all inputs should be equal" (batches viewed with automatic axes, parameters not).
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
             + " --xla_force_host_platform_device_count=4")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                        env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["explicit"], out
  assert max(out["c_err"], out["stack_c_err"], out["dp_c_err"]) < 1e-6, out
  assert out["insert_err"] < 1e-4 and out["stack_insert_err"] < 1e-4, out
  # The edited leaves keep their shardings; reverts give the original bits back.
  assert out["spec"] == ["P(None, 'a')"] * 2, out
  assert out["stack_spec"] == ["P(None, 'm', None)"] * 2, out
  assert out["revert"] and out["stack_revert"] and out["stack_others"], out
  # The fingerprint of a sharded leaf is that of its gathered bits.
  assert out["fingerprint"][0] == out["fingerprint"][1], out
