"""Hostile files a user could hand memedit: converted checkpoints whose arrays do not fit
their config, caches edited by hand or written by another program, specs with numbers
Python cannot read, and GPT-2 variables of other dtypes. Nothing here compiles a model:
variables are built from shapes alone."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ports
from memedit import _io, specs
from memedit.cli import main
from memedit.moments import covariance_init
from memedit.stream_cache import StreamCache
from ports.dcgan import variables_from_state_dict
from ports.dcgan.convert import expected_shapes


def _dcgan(path, edit=None, config_edit=None):
  """A DCGAN checkpoint (z_dim 8, ngf 1) saved as a converter would, after ``edit``
  changes its variables and ``config_edit`` its config."""
  sd = {k: np.full(s, 0.5, np.float32) for k, s in expected_shapes(8, 1, 3).items()}
  variables, config = variables_from_state_dict(sd)
  if edit:
    edit(variables)
  if config_edit:
    config_edit(config)
  return _io.save_tree(path, variables, config, kind="converted")


def test_converted_arrays_that_do_not_fit_the_config_are_refused_by_name(tmp_path, capsys):
  ok = _dcgan(tmp_path / "ok")
  _, variables, _ = ports.load_converted(ok)
  assert variables["params"]["convt2"]["kernel"].shape == (4, 4, 4, 2)
  cases = [
      (lambda v: v["params"]["convt2"].update(kernel=np.zeros((4, 4, 4, 3), np.float32)),
       None, "params/convt2/kernel: expected shape (4, 4, 4, 2) and dtype float32 (from its "
       "config), got shape (4, 4, 4, 3) and dtype float32"),
      (lambda v: v["params"]["convt2"].update(kernel=np.zeros((4, 4, 4, 2), np.int32)),
       None, "params/convt2/kernel: expected shape (4, 4, 4, 2) and dtype float32 (from its "
       "config), got shape (4, 4, 4, 2) and dtype int32"),
      (lambda v: v.pop("batch_stats"), None,
       "expected the variables its config describes, got 8 missing ['batch_stats/bn0/mean', "
       "'batch_stats/bn0/var', 'batch_stats/bn1/mean', 'batch_stats/bn1/var']"),
      (lambda v: v["params"].update(extra={"w": np.zeros(2, np.float32)}), None,
       "expected the variables its config describes, got 1 unexpected ['params/extra/w']"),
      # A config naming a latent size of 10^12 is refused before anything is allocated.
      (None, lambda c: c.update(z_dim=10 ** 12),
       "params/convt0/kernel: expected shape (4, 4, 1000000000000, 8)"),
  ]
  for i, (edit, config_edit, message) in enumerate(cases):
    path = _dcgan(tmp_path / f"bad{i}", edit, config_edit)
    with pytest.raises(ValueError) as e:
      ports.load_converted(path)
    assert str(e.value).startswith(f"{path}: "), e.value
    assert message in str(e.value)
    assert str(e.value).endswith("the checkpoint is damaged: convert it again")
  # On the command line: one line on stderr, exit status 1 (was a Flax traceback).
  assert main(["stats", path, "--layer", "convt2", "--cache-dir", str(tmp_path / "c")]) == 1
  err = capsys.readouterr().err
  assert err.startswith(f"memedit stats: error: {path}: params/convt0/kernel: expected shape")
  assert err.count("\n") == 1
  assert not (tmp_path / "c").exists()


def test_stylegan2_arrays_that_do_not_fit_the_config_are_refused(tmp_path):
  from ports.stylegan2 import model as model_lib

  config = {"architecture": "stylegan2", "resolution": 8, "z_dim": 4, "w_dim": 4, "n_mlp": 1,
            "channels": [4, 2], "num_layers": 3}
  module = model_lib.generator_from_config(config)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 4)))
  variables = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  ok = _io.save_tree(tmp_path / "ok", variables, config, kind="converted")
  assert ports.load_converted(ok)[2]["resolution"] == 8
  variables["buffers"]["latent_avg"] = np.zeros(5, np.float32)
  bad = _io.save_tree(tmp_path / "bad", variables, config, kind="converted")
  with pytest.raises(ValueError, match=r"bad: buffers/latent_avg: expected shape \(4,\) and "
                     r"dtype float32 \(from its config\), got shape \(5,\)"):
    ports.load_converted(bad)


def test_save_gpt2_stores_float32_and_refuses_integers(tmp_path):
  from ports import gpt2

  cfg = gpt2.GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)
  shapes = jax.eval_shape(lambda: gpt2.GPT2LMHeadModel(cfg).init(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  half = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.25, np.float16), shapes)
  out = gpt2.save_gpt2(tmp_path / "m", cfg, half)
  _, variables, _ = ports.load_converted(out)  # as load_gpt2 checks them: float32
  leaves = jax.tree_util.tree_leaves(variables)
  assert {str(x.dtype) for x in leaves} == {"float32"}
  assert all(float(x.ravel()[0]) == 0.25 for x in leaves)
  ints = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.int32), shapes)
  with pytest.raises(ValueError, match=r"variables: \['params'\]\['h_0'\]\['attn'\]"
                     r"\['c_attn'\]\['bias'\]: expected floating-point weights, got int32"):
    gpt2.save_gpt2(tmp_path / "i", cfg, ints)
  assert not (tmp_path / "i").exists()


def _cache(root, tree=None, **meta):
  """A statistics cache of dimension 3 at ``root/key``, as StreamCache.save writes it,
  with ``tree`` and ``meta`` changed."""
  state = {k: np.asarray(v) for k, v in covariance_init(3)._asdict().items()}
  state.update(tree or {})
  saved = {"batches": 2, "complete": False, "dim": 3}
  saved.update(meta)
  _io.save_tree(os.path.join(root, "key"), {k: v for k, v in state.items() if v is not None},
                {k: v for k, v in saved.items() if v is not None})
  return StreamCache(root, "key", 1)


def test_damaged_statistics_caches_are_refused_by_name(tmp_path):
  states, consumed, complete = _cache(tmp_path / "ok").load()
  assert consumed == [2] and complete is False and states[0].sum_sq.shape == (3, 3)
  cases = [
      ({}, {"batches": None}, "'batches' in meta.json: a non-negative integer, got None"),
      ({}, {"batches": [2]}, "'batches' in meta.json: a non-negative integer, got [2]"),
      ({}, {"batches": -1}, "'batches' in meta.json: a non-negative integer, got -1"),
      ({}, {"complete": "no"}, "'complete' in meta.json: true or false, got 'no'"),
      ({}, {"processes": "1"}, "'processes' in meta.json: a positive integer, got '1'"),
      ({"sum_sq": None}, {}, "the arrays ['count', 'has_shift', 'nonfinite', 'shift', 'sum', "
       "'sum_sq', 'weight'], got ['count', 'has_shift', 'nonfinite', 'shift', 'sum', "
       "'weight']"),
      ({"sum_sq": np.zeros((2, 2), np.float32)}, {},
       "sum_sq of shape (3, 3) and dtype float32 (key dimension 3), got shape (2, 2) and "
       "dtype float32"),
      ({"count": np.zeros(2, np.float32)}, {},
       "count of shape (2,) and dtype uint32 (key dimension 3), got shape (2,) and dtype "
       "float32"),
      ({"sum_sq": np.zeros((3, 3), np.int32)}, {},
       "weight, shift, sum and sum_sq of one dtype, float32 or float64, got the dtypes "
       "['float32', 'int32']"),
  ]
  for i, (tree, meta, message) in enumerate(cases):
    cache = _cache(tmp_path / f"bad{i}", tree, **meta)
    with pytest.raises(ValueError) as e:
      cache.load()
    assert str(e.value) == (f"statistics cache {cache.path}: expected {message}; the cache "
                            "is damaged: remove it to collect the statistics again")


def test_spec_numbers_python_cannot_read_are_errors_naming_the_file(tmp_path):
  m = np.zeros((8, 8), np.uint8)
  m[2:4, 2:6] = 255
  spec = specs.make_spec(key=[(0, m)], object=(1, m), paste=(2, m), layer="convt2")
  path = specs.save_spec(tmp_path / "s.json", spec)
  text = open(path).read()
  bad = tmp_path / "bad.json"
  bad.write_text(text.replace('"learning_rate": 0.05', '"learning_rate": 1' + "0" * 400))
  with pytest.raises(ValueError) as e:  # was OverflowError: int too large to convert to float
    specs.load_spec(bad)
  assert str(e.value) == (f"{bad}: solver.learning_rate: expected a finite positive number, "
                          "got 100000000000000000...0000000000000000000")
  bad.write_text(text.replace('"rank": 1', '"rank": 1' + "0" * 5000))
  with pytest.raises(ValueError) as e:  # was a message without the file's name
    specs.load_spec(bad)
  assert str(e.value) == (f"{bad}: expected a JSON edit spec, got a number too long to read "
                          "(Exceeds the limit (4300 digits) for integer string conversion: "
                          "value has 5001 digits)")
