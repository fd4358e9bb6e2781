"""ports.stylegan2.train: the distillation trainer (exact fast convolutions, loss, EMA,
bit-identical resumption from orbax checkpoints) and its command line, on a tiny student
and a tiny random DCGAN teacher written as a torch checkpoint without torch."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ports.stylegan2 import convert, swd
from ports.stylegan2 import model as sg2_model
from ports.stylegan2 import distilled, runs, train_cli
from ports.stylegan2 import train as tr
from ports.stylegan2.fastconv import fast_convolutions
from ports.stylegan2.teacher import load_teacher

from tiny_training import CFG, CLI_ARGS, write_teacher


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
  return write_teacher(tmp_path_factory.mktemp("teacher"), seed=0)


@pytest.fixture(scope="module")
def teacher(teacher_file, tmp_path_factory):
  return load_teacher(teacher_file, tmp_path_factory.mktemp("work"))


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _assert_same(a, b):
  ta, tb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
  assert ta == tb
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kind", ["up", "same", "torgb"])
def test_fast_convolutions_match_the_layers(kind):
  """Values and gradients of each convolution kind (stride-2 transposed 3×3 and blur,
  'same' 3×3, ToRGB's 1×1 without demodulation) against the model's own layers."""
  rs = np.random.RandomState({"up": 0, "same": 1, "torgb": 2}[kind])
  layer = {"up": sg2_model.ModulatedConv(5, up=True), "same": sg2_model.ModulatedConv(5),
           "torgb": sg2_model.ToRGB()}[kind]
  x = jnp.asarray(rs.standard_normal((2, 6, 6, 4)), jnp.float32)
  w = jnp.asarray(rs.standard_normal((2, 7)), jnp.float32)
  shapes = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x, w)
  params = jax.tree_util.tree_map(
      lambda s: jnp.asarray(1.0 + 0.5 * rs.standard_normal(s.shape), jnp.float32),
      shapes["params"])

  def run(p, x, fast):
    if fast:
      with fast_convolutions():
        return layer.apply({"params": p}, x, w)
    return layer.apply({"params": p}, x, w)

  @functools.partial(jax.jit, static_argnums=2)
  def value_and_grads(p, x, fast):
    return run(p, x, fast), jax.grad(lambda p, x: jnp.sum(jnp.sin(run(p, x, fast))),
                                     argnums=(0, 1))(p, x)

  ref, g_ref = value_and_grads(params, x, False)
  got, g_got = value_and_grads(params, x, True)
  assert got.shape == ref.shape == ((2, 12, 12, 5) if kind == "up" else
                                    (2, 6, 6, 3 if kind == "torgb" else 5))
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=1e-5)
  for a, b in zip(_leaves(g_ref), _leaves(g_got)):
    np.testing.assert_allclose(b, a, atol=1e-5 * max(1.0, np.max(np.abs(a))), rtol=1e-4)


def test_fast_convolutions_in_the_generator():
  cfg = tr.TrainConfig(resolution=8, channels=(6, 4), style_dim=5, n_mlp=1)
  module, state = tr.student_module(cfg), tr.init_state(cfg)
  variables = {"params": state["params"], "buffers": state["buffers"]}
  z = jnp.asarray(np.random.RandomState(3).standard_normal((2, 5)), jnp.float32)

  @functools.partial(jax.jit, static_argnums=0)
  def images(fast):
    if fast:
      with fast_convolutions():
        return module.apply(variables, z)
    return module.apply(variables, z)

  ref, got = np.asarray(images(False)), np.asarray(images(True))
  assert np.max(np.abs(ref)) > 0.1
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_paired_latents_loss_and_schedules():
  z_t, z_s = tr.paired_latents(jax.random.PRNGKey(0), 4, 8, 10)
  assert z_t.shape == (4, 8) and z_s.shape == (4, 10)
  np.testing.assert_array_equal(np.asarray(z_s[:, :8]), np.asarray(z_t))
  assert np.all(np.asarray(z_s[:, 8:]) != 0)
  with pytest.raises(ValueError, match="at least the teacher's z size 8, got 6"):
    tr.paired_latents(jax.random.PRNGKey(0), 4, 8, 6)

  rs = np.random.RandomState(2)
  s = jnp.asarray(rs.standard_normal((2, 16, 16, 3)), jnp.float32)
  t = jnp.asarray(rs.standard_normal((2, 16, 16, 3)), jnp.float32)
  loss, m = jax.jit(functools.partial(tr.distillation_loss, l1_weight=0.5,
                                      pyramid_weight=2.0, pyramid_levels=3))(s, t)

  @jax.jit  # the reference as one program (op by op, each of its ops compiles apart)
  def reference(s, t):
    levels = zip(swd.laplacian_pyramid(s, 3), swd.laplacian_pyramid(t, 3))
    return jnp.mean(jnp.abs(s - t)), [jnp.mean(jnp.abs(a - b)) for a, b in levels]

  l1, level_l1 = reference(s, t)
  pyramid = sum(float(x) for x in level_l1)
  assert float(m["l1"]) == pytest.approx(float(l1), rel=1e-6)
  assert float(m["pyramid"]) == pytest.approx(pyramid, rel=1e-5)
  assert float(loss) == pytest.approx(0.5 * float(m["l1"]) + 2.0 * pyramid, rel=1e-5)
  assert float(jax.jit(tr.distillation_loss)(s, s)[0]) == 0.0

  cfg = tr.TrainConfig(batch_size=16, steps=1000, ema_half_life_images=1000.0)
  # Ramp-up: the half-life is 5 % of the images seen until that reaches 1000 images.
  assert float(tr.ema_beta(0, cfg)) == pytest.approx(0.5 ** (16 / 0.8), rel=1e-5)
  assert float(tr.ema_beta(5000, cfg)) == pytest.approx(0.5 ** (16 / 1000), rel=1e-6)
  lr = tr.learning_rate_schedule(cfg)
  assert float(lr(0)) == 0.0 and float(lr(20)) == pytest.approx(cfg.learning_rate)
  assert float(lr(1000)) == pytest.approx(0.05 * cfg.learning_rate)


def test_config_checks():
  with pytest.raises(ValueError, match=r"TrainConfig.channels: expected 3 widths"):
    tr.TrainConfig(resolution=16, channels=(8, 8))
  with pytest.raises(ValueError, match=r"TrainConfig.noise_mode: expected one of"):
    tr.TrainConfig(noise_mode="fresh")
  with pytest.raises(ValueError, match="unknown"):
    tr.TrainConfig.from_json({"steps": 3, "warmup": 1})
  assert tr.TrainConfig.from_json(json.loads(json.dumps(CFG.to_json()))) == CFG


def test_resume_is_bit_identical(teacher, tmp_path):
  straight = tr.train(CFG, teacher, tmp_path / "straight", log=None)
  assert int(straight["step"]) == 8
  rows = [json.loads(line) for line in open(tmp_path / "straight" / runs.LOG_FILE)]
  assert [r["step"] for r in rows] == [1, 8]
  assert rows[-1]["loss"] < rows[0]["loss"]  # mean of steps 2–8 below the first step's

  # Stopped half-way, resumed in a new call.
  half = tr.train(CFG, teacher, tmp_path / "halves", stop_after=4, log=None)
  assert int(half["step"]) == 4
  assert tr.restore(tmp_path / "halves")[1]["step"] == 4
  resumed = tr.train(CFG, teacher, tmp_path / "halves", log=None)
  _assert_same(straight, resumed)
  _assert_same(tr.restore(tmp_path / "straight")[1], tr.restore(tmp_path / "halves")[1])

  # Killed between checkpoints: the redone steps give the same run.
  def crash(step, state):
    if step == 6:
      raise RuntimeError("killed")

  with pytest.raises(RuntimeError, match="killed"):
    tr.train(CFG, teacher, tmp_path / "killed", checkpoint_every=5, on_step=crash, log=None)
  assert tr.restore(tmp_path / "killed")[1]["step"] == 5
  _assert_same(straight, tr.train(CFG, teacher, tmp_path / "killed", log=None))

  # Interrupted (Ctrl-C / SIGTERM): the step reached is saved.
  def interrupt(step, state):
    if step == 3:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    tr.train(CFG, teacher, tmp_path / "interrupted", on_step=interrupt, log=None)
  assert tr.restore(tmp_path / "interrupted")[1]["step"] == 3
  _assert_same(straight, tr.train(CFG, teacher, tmp_path / "interrupted", log=None))

  # g_ema moved away from the raw parameters, and a different config is refused.
  assert any(np.any(a != b) for a, b in zip(_leaves(straight["ema"]),
                                            _leaves(straight["params"])))
  other = tr.TrainConfig(**{**CFG.to_json(), "channels": CFG.channels,
                            "learning_rate": 1e-3})
  with pytest.raises(ValueError, match=r"learning_rate: run has 0.01, asked 0.001"):
    tr.train(other, teacher, tmp_path / "straight", log=None)


def test_command_line(teacher_file, teacher, tmp_path, capsys):
  run = str(tmp_path / "run")
  assert train_cli.main(["train", "--teacher", teacher_file, "--run-dir", run, "--log-every", "4",
                  *CLI_ARGS]) == 0
  out = capsys.readouterr().out
  assert "step 8/8" in out and "parameters" in out
  assert load_teacher(os.path.join(run, "teacher")).digest == teacher.digest

  pt = str(tmp_path / "student.pt")
  assert train_cli.main(["export", "--run-dir", run, "--out", pt]) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["step"] == 8 and info["bytes"] == os.path.getsize(pt)
  module, variables, cfg, step = distilled.generator(run)
  assert cfg == CFG and step == 8
  _, converted, config = convert.load_stylegan2(convert.convert_rosinality(pt, tmp_path / "c"))
  assert config["channels"] == [16, 12, 8] and config["style_dim"] == 10
  _assert_same(converted, variables)
  assert info["parameters"] == sum(x.size for x in _leaves(variables["params"]))

  result = str(tmp_path / "swd.json")
  assert train_cli.main(["evaluate", "--teacher", teacher_file, "--run-dir", run, "--images", "8",
                  "--out", result]) == 0
  capsys.readouterr()
  metrics = json.load(open(result))
  assert metrics["step"] == 8 and metrics["swd"]["resolutions"] == [16]
  assert metrics["swd"]["mean"] > 0 and metrics["teacher_vs_teacher_swd"]["mean"] > 0
  assert 0 < metrics["paired_l1"] < 10
  assert metrics["random_init_swd"]["mean"] > 0 and 0 < metrics["random_init_paired_l1"] < 10
  floor = metrics["teacher_vs_teacher_swd"]["mean"]
  assert metrics["ratio_to_floor"] == pytest.approx(metrics["swd"]["mean"] / floor)
  assert metrics["random_init_ratio_to_floor"] == pytest.approx(
      metrics["random_init_swd"]["mean"] / floor)

  png = str(tmp_path / "grid.png")
  assert train_cli.main(["preview", "--teacher", teacher_file, "--run-dir", run, "--out", png]) == 0
  from PIL import Image
  assert Image.open(png).size == (8 * 16, 2 * 16)
  # 8 latents (the batch of the previews above, so the same compiled program) in rows of
  # 3: three teacher rows, the last one padded, each above its student row.
  assert train_cli.main(["preview", "--teacher", teacher_file, "--run-dir", run, "--out", png,
                  "--images", "8", "--columns", "3"]) == 0
  assert Image.open(png).size == (3 * 16, 6 * 16)
  assert train_cli.main(["preview", "--teacher", teacher_file, "--run-dir", run, "--out", png,
                  "--columns", "0"]) == 1
  assert "columns" in capsys.readouterr().err

  assert train_cli.main(["export", "--run-dir", str(tmp_path / "nothing"), "--out", pt]) == 1
  assert "not a training run" in capsys.readouterr().err
