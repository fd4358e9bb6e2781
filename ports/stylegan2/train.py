"""Training a small StyleGAN2 generator by distilling the DCGAN face generator.

The student is the port's own :class:`ports.stylegan2.model.Generator` (rosinality's
architecture, so it ships as a rosinality checkpoint through
:func:`ports.stylegan2.export.save_rosinality`); the teacher is the converted DCGAN face
generator (:mod:`ports.dcgan`, 64×64, z of 100 dims). Every batch is drawn on the fly:
teacher latents from the step's key, teacher images from the teacher in JAX.

Objective: regression distillation on paired latents.
  For a teacher latent z_T ~ N(0, I_100) the student gets z_S = z_T when style_dim = 100
  (the default: the student answers the teacher's latents with the teacher's faces), or
  z_S = [z_T, ε] with ε ~ N(0, I_{d−100}) fresh for a wider style_dim d: either way z_S is
  exactly N(0, I_d), the latent rosinality's code and
  :func:`ports.stylegan2.model.sample_latents` draw at generation time. The loss compares
  G_S(z_S) with G_T(z_T) pixel by pixel:

    L = λ₁ · mean|G_S − G_T| + λ_lap · Σ_k mean|Lap_k(G_S) − Lap_k(G_T)|

  with Lap_k the levels of a Laplacian pyramid (:func:`ports.stylegan2.swd.laplacian_pyramid`,
  the binomial filter of the SWD metric; at 64 px four levels: 64, 32, 16 px band-passes
  and the 8 px low-pass). Each band's mean counts once, so coarse structure (face layout,
  colour) and fine detail weigh alike, where a plain pixel loss is dominated by the
  finest band.

  Why regression rather than adversarial training: the teacher is a deterministic
  function of z, so the paired target has no spread and the regression optimum is the
  teacher itself (regression blurs only when one input has many targets); every pixel of
  every sample gives a gradient, where a discriminator gives one judgement per image; no
  discriminator network doubles the step time (the whole budget goes to the generator),
  and the run is stable and reproducible. StyleGAN2's own adversarial runs see millions of
  images; the 2.5-hour CPU budget here is about 3·10⁵. What regression cannot give is
  detail the student fails to fit: underfitting shows as blur, which the pyramid term
  penalises and the sliced Wasserstein distance (:mod:`ports.stylegan2.swd`) measures.

Noise inputs are drawn at random in training (``noise_mode='random'``): the teacher has
none, so the student learns noise strengths that do no harm, and rosinality's default
``randomize_noise=True`` gives the trained images. The generator of record is the
exponential moving average g_ema (half-life ``ema_half_life_images`` images, ramped up
over the first steps as in StyleGAN2-ADA: half-life min(h, 0.05 · images seen)).

Optimiser: Adam, β = (0.9, 0.99), learning rate 5·10⁻³ on the port's equalized-learning-rate
parameters, warmed up linearly over the first 2 % of the steps, then cosine-decayed to
5 % at the last step. The mapping layers keep rosinality's lr_mlp = 0.01 as architecture
(their stored weights are scaled by it, so checkpoints load as rosinality's) but take
Adam steps 100 times larger (``mapping_lr_scale``), which undoes the slowdown in
training. Measured at 32 px (batch 16, L1 on 128 held-out pairs after 600 steps; the
teacher's median image scores 0.337): 0.331 with the mapping's steps unscaled at lr
2·10⁻³, 0.287 scaled, 0.259 scaled at 5·10⁻³, 0.245 scaled at 10⁻²; an L2 loss in place
of L1 gave 0.339 (unscaled, 2·10⁻³).

Default architecture: 64×64 output, widths (256, 192, 128, 64, 32) at 4, 8, 16, 32, 64
px, style_dim 100, a 4-layer mapping network: 2,118,856 parameters, an 8.5 MB float32
rosinality checkpoint. Compute is dominated by the 32 and 64 px layers, kept narrow;
parameters by the 4 and 8 px layers, which cost little time (widths 128 or 256 at 4 and
8 px gave the same step time, 1.3–1.4 s on the shared machine, but 256 at both passes
10 MB). The convolutions run
through an im2col matrix product during training (:func:`fast_convolutions`, the same
function as the model's own to float32 rounding, checked by the tests): on XLA:CPU its
gradients are about five times faster than those of ``lax.conv_general_dilated``
(2.4 s against 12.5 s a step for five 64-channel levels, batch 16, on a shared machine).

Step time, batch 16, 2-core x86_64 CPU: 0.41–0.57 s (means of 0.46 and 0.51 s over two
smoke runs of 400–600 steps) with the machine otherwise nearly idle, 1.0–1.6 s while
other jobs shared it (load average 6–9); compilation takes 20–70 s more. The default
18000 steps (288k images) take 2.3–2.6 hours on the idle machine.

Resumption: the whole state (step, parameters, Adam state, g_ema, buffers) is saved as
an orbax checkpoint every ``checkpoint_every`` steps, at the end, and when the run is
interrupted (Ctrl-C, SIGTERM). Each step's randomness is a function of (seed, step) only,
so a run resumed from any checkpoint continues bit-identically. The run directory holds
``run.json`` (the configuration and the teacher's content hash, checked on resume),
``log.jsonl`` (losses per logging interval) and ``checkpoints/``.

Command line (run directories belong under the git-ignored ``.cache/``)::

  python -m ports.stylegan2.train train --teacher .cache/demo/faces-dcgan \\
      --run-dir .cache/sg2-faces
  python -m ports.stylegan2.train evaluate --teacher .cache/demo/faces-dcgan \\
      --run-dir .cache/sg2-faces --images 1024
  python -m ports.stylegan2.train preview --teacher ... --run-dir ... --out grid.png
  python -m ports.stylegan2.train export --run-dir .cache/sg2-faces --out faces-sg2-64.pt

``--teacher`` is a converted DCGAN directory (``memedit convert weights.tar DIR``) or
the torch file itself (converted into the run directory).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ports.stylegan2 import model as model_lib
from ports.stylegan2.swd import laplacian_pyramid

__all__ = ["TrainConfig", "Teacher", "distillation_loss", "ema_beta", "evaluate",
           "export", "fast_convolutions", "init_state", "load_teacher", "main",
           "paired_latents", "preview", "restore", "student_module", "train",
           "train_step"]

RUN_FORMAT = 1
RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
CHECKPOINTS = "checkpoints"


# ----------------------------------------------------------------------------------------
# Configuration.


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that decides the trained weights (a resumed run must match it).

  Attributes:
    resolution: student output size (≤ the teacher's; teacher images are box-filtered
      down to it).
    channels: student widths at 4, 8, ..., resolution.
    style_dim: z and w size (≥ the teacher's z size).
    n_mlp: mapping layers.
    lr_mlp: mapping learning-rate multiplier of the architecture (rosinality's 0.01: the
      stored mapping weights are scaled by it in the forward pass).
    mapping_lr_scale: Adam step of the mapping parameters relative to the others. 100
      undoes lr_mlp = 0.01 in training (the mapping's effective weights move as fast as
      the synthesis's) while the checkpoint keeps rosinality's parametrisation.
    batch_size: images per step.
    steps: total steps of the run (the learning-rate schedule spans them).
    learning_rate: peak Adam learning rate.
    beta1, beta2, eps: Adam settings.
    warmup_fraction: share of the steps with a linear warm-up.
    final_lr_fraction: learning rate at the last step, relative to the peak.
    l1_weight: weight of the pixel L1 term.
    pyramid_weight: weight of the Laplacian-pyramid L1 term.
    pyramid_levels: levels of that pyramid (None: down to an 8 px low-pass, 4 levels at
      64 px).
    ema_half_life_images: g_ema half-life in images.
    ema_rampup: half-life at most this fraction of the images seen (None: no ramp-up).
    noise_mode: the student's noise inputs in training ('random', 'const' or 'none').
    seed: seed of the initialisation and of every step's latents and noise.
  """
  resolution: int = 64
  channels: tuple[int, ...] = (256, 192, 128, 64, 32)
  style_dim: int = 100
  n_mlp: int = 4
  lr_mlp: float = 0.01
  mapping_lr_scale: float = 100.0
  batch_size: int = 16
  steps: int = 18000
  learning_rate: float = 5e-3
  beta1: float = 0.9
  beta2: float = 0.99
  eps: float = 1e-8
  warmup_fraction: float = 0.02
  final_lr_fraction: float = 0.05
  l1_weight: float = 1.0
  pyramid_weight: float = 1.0
  pyramid_levels: int | None = None
  ema_half_life_images: float = 10_000.0
  ema_rampup: float | None = 0.05
  noise_mode: str = "random"
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
    log2 = model_lib.log2_resolution(self.resolution)
    checks = [
        (len(self.channels) == log2 - 1, "channels",
         f"{log2 - 1} widths (4..{self.resolution} px)", self.channels),
        (all(c > 0 for c in self.channels), "channels", "positive widths", self.channels),
        (self.style_dim > 0 and self.n_mlp > 0, "style_dim, n_mlp", "positive integers",
         (self.style_dim, self.n_mlp)),
        (self.batch_size > 0 and self.steps > 0, "batch_size, steps", "positive integers",
         (self.batch_size, self.steps)),
        (self.learning_rate > 0 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
         "learning_rate, beta1, beta2", "lr > 0 and betas in [0, 1)",
         (self.learning_rate, self.beta1, self.beta2)),
        (self.mapping_lr_scale > 0, "mapping_lr_scale", "a positive number",
         self.mapping_lr_scale),
        (0 <= self.warmup_fraction < 1 and 0 <= self.final_lr_fraction <= 1,
         "warmup_fraction, final_lr_fraction", "values in [0, 1)",
         (self.warmup_fraction, self.final_lr_fraction)),
        (self.l1_weight >= 0 and self.pyramid_weight >= 0
         and self.l1_weight + self.pyramid_weight > 0, "l1_weight, pyramid_weight",
         "non-negative weights, not both 0", (self.l1_weight, self.pyramid_weight)),
        (self.pyramid_levels is None or 1 <= self.pyramid_levels <= log2 - 1,
         "pyramid_levels", f"None or an integer in [1, {log2 - 1}]", self.pyramid_levels),
        (self.ema_half_life_images > 0, "ema_half_life_images", "a positive number",
         self.ema_half_life_images),
        (self.ema_rampup is None or self.ema_rampup > 0, "ema_rampup",
         "None or a positive number", self.ema_rampup),
        (self.noise_mode in model_lib.NOISE_MODES, "noise_mode",
         f"one of {model_lib.NOISE_MODES}", self.noise_mode),
    ]
    for ok, name, want, got in checks:
      if not ok:
        raise ValueError(f"TrainConfig.{name}: expected {want}, got {got!r}")

  @property
  def levels(self) -> int:
    """Levels of the loss's Laplacian pyramid (``pyramid_levels`` resolved)."""
    if self.pyramid_levels is not None:
      return self.pyramid_levels
    return max(1, model_lib.log2_resolution(self.resolution) - 2)

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["channels"] = list(self.channels)
    return d

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "TrainConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"TrainConfig: expected fields among {sorted(names)}, got unknown "
                       f"{unknown}")
    return cls(**{k: tuple(v) if k == "channels" else v for k, v in d.items()})


def student_module(cfg: TrainConfig) -> model_lib.Generator:
  """The student generator (rosinality layout: z_dim = w_dim = style_dim)."""
  return model_lib.Generator(resolution=cfg.resolution, channels=cfg.channels,
                             z_dim=cfg.style_dim, w_dim=cfg.style_dim, n_mlp=cfg.n_mlp,
                             lr_mlp=cfg.lr_mlp)


# ----------------------------------------------------------------------------------------
# The teacher.


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A generator of target images: ``module.apply(variables, z)`` → (N, R, R, C) in [-1, 1].

  Attributes:
    module: a Flax module taking (N, z_dim) latents.
    variables: its variables.
    z_dim: latent size.
    resolution: output size.
    digest: content hash of the variables (:func:`memedit._io.tree_hash`), recorded in
      the run and checked on resume.
  """
  module: Any
  variables: Any
  z_dim: int
  resolution: int
  digest: str


def load_teacher(path: str | os.PathLike, work_dir: str | os.PathLike | None = None
                 ) -> Teacher:
  """The DCGAN teacher from a converted directory or from its torch checkpoint.

  Args:
    path: a directory written by :func:`ports.dcgan.convert_dcgan` (``memedit convert``),
      or the torch file (e.g. gan-face-generate's ``weights.tar``), then converted into
      ``work_dir/teacher``.
    work_dir: where a torch file is converted (required for one).

  Raises:
    ValueError: a torch file without ``work_dir``, or not a DCGAN checkpoint.
  """
  from memedit import _io
  from ports.dcgan import convert_dcgan, load_dcgan

  path = os.fspath(path)
  if os.path.isfile(path):
    if work_dir is None:
      raise ValueError(f"teacher: expected a converted DCGAN directory, or a work "
                       f"directory to convert the file {path!r} into, got neither")
    path = convert_dcgan(path, os.path.join(os.fspath(work_dir), "teacher"))
  module, variables, config = load_dcgan(path)
  return Teacher(module, variables, int(config["z_dim"]), int(config["resolution"]),
                 _io.tree_hash(variables))


# ----------------------------------------------------------------------------------------
# Fast convolutions for training (same function as the model's, different XLA program).


def _conv3_same(x: jax.Array, w: jax.Array) -> jax.Array:
  """'Same' 3×3 cross-correlation as one matrix product over 9 shifted copies (im2col).

  x (N, H, W, C), w (3, 3, C, O) → (N, H, W, O).
  """
  n, h, wd, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  patches = jnp.concatenate([xp[:, a:a + h, b:b + wd] for a in range(3) for b in range(3)],
                            axis=-1)
  return (patches.reshape(-1, 9 * c) @ w.reshape(9 * c, -1)).reshape(n, h, wd, -1)


def _interleave_taps(t: jax.Array, axis: int) -> jax.Array:
  """u[2i + a] = Σ t[i, tap a] along ``axis`` (tap axis 3, 3 taps): length 2L + 1."""
  length = t.shape[axis]

  def pad(v, lo, hi):
    return jnp.pad(v, [(lo, hi) if d == axis else (0, 0) for d in range(v.ndim)])

  tap = [jnp.take(t, a, axis=3) for a in range(3)]
  even = pad(tap[0], 0, 1) + pad(tap[2], 1, 0)   # positions 2m: taps 0 (i = m), 2 (i = m − 1)
  odd = pad(tap[1], 0, 1)                         # positions 2m + 1: tap 1 (i = m)
  u = jnp.stack([even, odd], axis=axis + 1)
  shape = list(even.shape)
  shape[axis] = 2 * (length + 1)
  return jax.lax.slice_in_dim(u.reshape(shape), 0, 2 * length + 1, axis=axis)


def _conv3_transposed_up(x: jax.Array, w: jax.Array) -> jax.Array:
  """Stride-2 transposed 3×3 convolution, out[2i + a, 2j + b] += x[i, j] · w[a, b].

  x (N, H, W, C), w (3, 3, C, O) → (N, 2H + 1, 2W + 1, O): one matrix product, then the
  nine taps interleaved (rosinality's ``conv_transpose2d(stride=2, padding=0)``).
  """
  n, h, wd, c = x.shape
  o = w.shape[-1]
  y = x.reshape(-1, c) @ w.transpose(2, 0, 1, 3).reshape(c, 9 * o)
  y = y.reshape(n, h, wd, 3, 3, o)
  y = _interleave_taps(y, axis=1)     # (N, 2H + 1, W, 3, O)
  return _interleave_taps(y, axis=2)  # (N, 2H + 1, 2W + 1, O)


def _fast_memory(mod: model_lib.ModulatedConvMemory, x_mod: jax.Array,
                 style: jax.Array) -> jax.Array:
  """:meth:`ModulatedConvMemory.__call__` with matrix-product convolutions."""
  kernel = mod.get_variable("params", "kernel")
  ks, c_in = mod.kernel_size, x_mod.shape[-1]
  w = kernel * (1.0 / math.sqrt(c_in * ks * ks))
  n, h, wd, _ = x_mod.shape
  if ks == 1:
    out = (x_mod.reshape(-1, c_in) @ w[0, 0]).reshape(n, h, wd, -1)
  elif mod.up:
    out = _conv3_transposed_up(x_mod, w)
    p = (len(mod.blur_kernel) - 2) - (ks - 1)
    out = model_lib.upfirdn2d(out, mod.blur_kernel, pad=((p + 1) // 2 + 1, p // 2 + 1),
                              gain=4.0)
  else:
    out = _conv3_same(x_mod, w)
  if mod.demodulate:
    out = out * model_lib.demodulation(kernel, style)[:, None, None, :]
  return out


def _interceptor(next_fun, args, kwargs, context):
  mod = context.module
  if (isinstance(mod, model_lib.ModulatedConvMemory) and context.method_name == "__call__"
      and mod.kernel_size in (1, 3) and not kwargs and len(args) == 2
      and mod.has_variable("params", "kernel")):
    return _fast_memory(mod, *args)
  return next_fun(*args, **kwargs)


def fast_convolutions():
  """Context manager: the generator's modulated convolutions as im2col matrix products.

  Inside it, ``Generator.apply`` computes the same images (to float32 rounding) through
  a different XLA program whose gradients run several times faster on CPU. Needs
  initialised parameters (use it around ``apply``, not ``init``).
  """
  return nn.intercept_methods(_interceptor)


# ----------------------------------------------------------------------------------------
# Objective, schedules, state.


def paired_latents(key: jax.Array, batch: int, teacher_z_dim: int, style_dim: int
                   ) -> tuple[jax.Array, jax.Array]:
  """Teacher latents and the student's paired latents for one batch.

  Returns:
    ``(z_teacher (batch, teacher_z_dim), z_student (batch, style_dim))`` with
    ``z_student[:, :teacher_z_dim] == z_teacher`` and the rest fresh N(0, 1).
  """
  if style_dim < teacher_z_dim:
    raise ValueError(f"style_dim: expected at least the teacher's z size {teacher_z_dim}, "
                     f"got {style_dim}")
  k_t, k_x = jax.random.split(key)
  z_t = jax.random.normal(k_t, (batch, teacher_z_dim))
  extra = jax.random.normal(k_x, (batch, style_dim - teacher_z_dim))
  return z_t, jnp.concatenate([z_t, extra], axis=1)


def distillation_loss(student: jax.Array, teacher: jax.Array, *, l1_weight: float = 1.0,
                      pyramid_weight: float = 1.0, pyramid_levels: int = 4
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Pixel L1 plus Laplacian-pyramid L1 between two image batches.

  Args:
    student, teacher: (N, R, R, C) images.
    l1_weight, pyramid_weight: weights of the two terms.
    pyramid_levels: levels of the pyramid (the mean |difference| of each level counts
      once).

  Returns:
    ``(loss, {"loss", "l1", "pyramid"})``, scalars.
  """
  if student.shape != teacher.shape:
    raise ValueError(f"student, teacher: expected images of one shape, got {student.shape} "
                     f"and {teacher.shape}")
  diff = student - teacher
  l1 = jnp.mean(jnp.abs(diff))
  # The pyramid is linear: the pyramid of the difference is the difference of pyramids.
  pyramid = sum(jnp.mean(jnp.abs(level)) for level in laplacian_pyramid(diff, pyramid_levels))
  loss = l1_weight * l1 + pyramid_weight * pyramid
  return loss, {"loss": loss, "l1": l1, "pyramid": pyramid}


def ema_beta(step: jax.Array, cfg: TrainConfig) -> jax.Array:
  """g_ema decay after step ``step`` (0-based): 0.5 ** (batch / half-life in images)."""
  half_life = jnp.asarray(cfg.ema_half_life_images, jnp.float32)
  if cfg.ema_rampup is not None:
    seen = (jnp.asarray(step, jnp.float32) + 1.0) * cfg.batch_size
    half_life = jnp.minimum(half_life, seen * cfg.ema_rampup)
  return jnp.power(0.5, cfg.batch_size / jnp.maximum(half_life, 1e-8))


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warm-up, then cosine decay to ``final_lr_fraction`` at the last step."""
  warmup = int(cfg.warmup_fraction * cfg.steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else cfg.learning_rate, peak_value=cfg.learning_rate,
      warmup_steps=warmup, decay_steps=max(cfg.steps, warmup + 1),
      end_value=cfg.learning_rate * cfg.final_lr_fraction)


def _optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  return optax.adam(learning_rate_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps)


def _initial_value(name: str, shape: tuple[int, ...], rs: np.random.RandomState,
                   lr_mlp: float) -> np.ndarray:
  """rosinality's initialisation of one variable, by its path in the Flax tree."""
  if name.endswith("/modulation/bias"):
    return np.ones(shape, np.float32)
  if name.endswith(("/bias", "/noise_strength")) or name == "buffers/latent_avg":
    return np.zeros(shape, np.float32)
  scale = 1.0 / lr_mlp if name.startswith("params/mapping/") else 1.0
  if name.endswith("/kernel") or name.endswith("/const") or name.startswith(
      "buffers/synthesis/noise_"):
    return (scale * rs.standard_normal(shape)).astype(np.float32)
  raise ValueError(f"init_state: no initialisation rule for the variable {name!r}")


def _state_shapes(cfg: TrainConfig) -> dict:
  """The state's structure, shapes and dtypes (no computation)."""
  module = student_module(cfg)
  variables = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                             jax.ShapeDtypeStruct((1, cfg.style_dim), jnp.float32))
  params = variables["params"]
  return {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
          "opt_state": jax.eval_shape(_optimizer(cfg).init, params), "ema": params,
          "buffers": variables["buffers"]}


def init_state(cfg: TrainConfig) -> dict:
  """The state at step 0: ``{step, params, opt_state, ema, buffers}`` (g_ema = params).

  rosinality's initialisation, drawn on the host from ``RandomState(seed)`` leaf by leaf
  in the tree's order: kernels and the constant input N(0, 1) (mapping kernels N(0, 1/lr_mlp²),
  as equalized learning rate scales them by lr_mlp), modulation biases 1, other biases and
  noise strengths 0, noise buffers N(0, 1), latent_avg 0; the Adam state of those. Host
  draws need no compilation (a jitted Flax init takes tens of seconds to compile on CPU)
  and are the same on every platform.
  """
  shapes = _state_shapes(cfg)
  rs = np.random.RandomState(cfg.seed)

  def init(tree, prefix):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = [_initial_value(prefix + "/" + "/".join(str(k.key) for k in path), leaf.shape,
                             rs, cfg.lr_mlp) for path, leaf in flat]
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in leaves])

  params = init(shapes["params"], "params")
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          "opt_state": _init_optimizer(cfg)(params),
          "ema": jax.tree_util.tree_map(jnp.copy, params),
          "buffers": init(shapes["buffers"], "buffers")}


@functools.lru_cache(maxsize=8)
def _init_optimizer(cfg: TrainConfig) -> Callable:
  return jax.jit(_optimizer(cfg).init)


def _downsample(images: jax.Array, factor: int) -> jax.Array:
  if factor == 1:
    return images
  n, h, w, c = images.shape
  return images.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def teacher_images(teacher: Teacher, z: jax.Array, resolution: int) -> jax.Array:
  """Teacher images for latents z, box-filtered to ``resolution``."""
  images = teacher.module.apply(teacher.variables, z)
  return _downsample(images, teacher.resolution // resolution)


def _check_pair(cfg: TrainConfig, teacher: Teacher) -> None:
  if cfg.style_dim < teacher.z_dim:
    raise ValueError(f"TrainConfig.style_dim: expected at least the teacher's z size "
                     f"{teacher.z_dim}, got {cfg.style_dim}")
  if cfg.resolution > teacher.resolution or teacher.resolution % cfg.resolution:
    raise ValueError(f"TrainConfig.resolution: expected a divisor of the teacher's "
                     f"resolution {teacher.resolution}, got {cfg.resolution}")


@functools.lru_cache(maxsize=8)
def _compiled_step(cfg: TrainConfig, teacher_module: Any, teacher_z_dim: int,
                   teacher_resolution: int) -> Callable:
  """The jitted step for a configuration and teacher architecture (compiled once)."""
  student = student_module(cfg)
  optimizer = _optimizer(cfg)
  teacher = Teacher(teacher_module, None, teacher_z_dim, teacher_resolution, "")

  def step(state, teacher_variables):
    t = state["step"]
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), t)
    k_z, k_noise = jax.random.split(key)
    z_t, z_s = paired_latents(k_z, cfg.batch_size, teacher_z_dim, cfg.style_dim)
    target = teacher_images(dataclasses.replace(teacher, variables=teacher_variables), z_t,
                            cfg.resolution)
    target = jax.lax.stop_gradient(target)

    def loss_fn(params):
      with fast_convolutions():
        images = student.apply({"params": params, "buffers": state["buffers"]}, z_s,
                               noise_mode=cfg.noise_mode, rngs={"noise": k_noise})
      return distillation_loss(images, target, l1_weight=cfg.l1_weight,
                               pyramid_weight=cfg.pyramid_weight,
                               pyramid_levels=cfg.levels)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    updates = {**updates, "mapping": jax.tree_util.tree_map(
        lambda u: u * cfg.mapping_lr_scale, updates["mapping"])}
    params = optax.apply_updates(state["params"], updates)
    beta = ema_beta(t, cfg)
    ema = jax.tree_util.tree_map(lambda e, p: p + (e - p) * beta, state["ema"], params)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)))
    metrics = dict(metrics, grad_norm=grad_norm)
    return ({"step": t + 1, "params": params, "opt_state": opt_state, "ema": ema,
             "buffers": state["buffers"]}, metrics)

  return jax.jit(step)


def train_step(cfg: TrainConfig, teacher: Teacher, state: dict) -> tuple[dict, dict]:
  """One optimisation step: ``(state, metrics)`` → next state and this step's losses."""
  fn = _compiled_step(cfg, teacher.module, teacher.z_dim, teacher.resolution)
  return fn(state, teacher.variables)


# ----------------------------------------------------------------------------------------
# Run directories, checkpoints.


def _manager(run_dir: str, keep: int | None = 2):
  import orbax.checkpoint as ocp

  me = jax.process_index()
  os.makedirs(os.path.join(run_dir, CHECKPOINTS), exist_ok=True)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=False, enable_async_checkpointing=False,
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          primary_host=me, active_processes={me}))
  return ocp.CheckpointManager(os.path.join(run_dir, CHECKPOINTS), options=options)


def _run_record(cfg: TrainConfig, teacher: Teacher) -> dict:
  return {"format": RUN_FORMAT, "config": cfg.to_json(),
          "teacher": {"digest": teacher.digest, "z_dim": teacher.z_dim,
                      "resolution": teacher.resolution}}


def _read_run(run_dir: str) -> dict:
  from memedit import _io

  record = _io.read_json(os.path.join(run_dir, RUN_FILE))
  if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
    raise ValueError(f"{os.path.join(run_dir, RUN_FILE)}: expected a training run record "
                     f"of format {RUN_FORMAT}, got {str(record)[:80]}")
  return record


def _check_resume(run_dir: str, record: dict, cfg: TrainConfig, teacher: Teacher) -> None:
  old = _read_run(run_dir)
  problems = []
  for k, v in record["config"].items():
    if old["config"].get(k) != v:
      problems.append(f"{k}: run has {old['config'].get(k)!r}, asked {v!r}")
  if old["teacher"] != record["teacher"]:
    problems.append(f"teacher: run has {old['teacher']}, given {record['teacher']}")
  if problems:
    raise ValueError(f"{run_dir}: expected the configuration and teacher the run was "
                     f"started with (start a new run directory to change them), got "
                     + "; ".join(problems))


def _log_row(run_dir: str, row: dict) -> None:
  with open(os.path.join(run_dir, LOG_FILE), "a") as f:
    f.write(json.dumps(row) + "\n")


def _to_host(tree):
  return jax.tree_util.tree_map(np.asarray, tree)


def _save(manager, state: dict) -> None:
  import orbax.checkpoint as ocp

  step = int(state["step"])
  if manager.latest_step() == step:
    return
  manager.save(step, args=ocp.args.StandardSave(_to_host(state)), force=True)
  manager.wait_until_finished()


def restore(run_dir: str | os.PathLike, step: int | None = None) -> tuple[TrainConfig, dict]:
  """The configuration and the state saved at ``step`` (the latest when None).

  Raises:
    FileNotFoundError: no run or no checkpoint there.
  """
  import orbax.checkpoint as ocp

  run_dir = os.path.abspath(os.fspath(run_dir))
  if not os.path.isfile(os.path.join(run_dir, RUN_FILE)):
    raise FileNotFoundError(f"{run_dir}: not a training run (expected {RUN_FILE} inside it)")
  cfg = TrainConfig.from_json(_read_run(run_dir)["config"])
  with _manager(run_dir, None) as manager:
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
      raise FileNotFoundError(f"{run_dir}: expected a checkpoint at step "
                              f"{'(latest)' if step is None else step}, found steps "
                              f"{list(manager.all_steps())}")
    target = _state_shapes(cfg)
    state = manager.restore(step, args=ocp.args.StandardRestore(target))
  return cfg, jax.tree_util.tree_map(jnp.asarray, state)


@contextlib.contextmanager
def _sigterm_as_interrupt():
  """Turns SIGTERM into KeyboardInterrupt (main thread only), so a killed run saves."""
  try:
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
  except ValueError:  # not the main thread
    yield
    return
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def train(cfg: TrainConfig, teacher: Teacher, run_dir: str | os.PathLike, *,
          stop_after: int | None = None, checkpoint_every: int = 500, log_every: int = 50,
          keep_checkpoints: int = 2, log: Callable[[str], None] | None = print,
          on_step: Callable[[int, dict], None] | None = None) -> dict:
  """Trains (or resumes) a run until ``cfg.steps`` or ``stop_after`` more steps.

  Args:
    cfg: the run's configuration (a resumed run must have been started with the same).
    teacher: from :func:`load_teacher`.
    run_dir: the run directory (created; resumed from its latest checkpoint if any).
    stop_after: stop after this many steps of this call (the run stays resumable).
    checkpoint_every: save every this many steps (also at the end and on interrupt).
    log_every: log mean losses over this many steps.
    keep_checkpoints: checkpoints kept (the latest ones).
    log: where progress lines go (None: nowhere); they also go to ``log.jsonl``.
    on_step: called as ``on_step(step, state)`` after each step (monitoring, tests).

  Returns:
    The state after the last step run.

  Raises:
    ValueError: the run directory holds a run of another configuration or teacher.
  """
  from memedit import _io

  _check_pair(cfg, teacher)
  if checkpoint_every < 1 or log_every < 1 or keep_checkpoints < 1:
    raise ValueError(f"checkpoint_every, log_every, keep_checkpoints: expected positive "
                     f"integers, got {checkpoint_every}, {log_every}, {keep_checkpoints}")
  run_dir = os.path.abspath(os.fspath(run_dir))
  record = _run_record(cfg, teacher)
  if os.path.isfile(os.path.join(run_dir, RUN_FILE)):
    _check_resume(run_dir, record, cfg, teacher)
  else:
    os.makedirs(run_dir, exist_ok=True)
    _io.atomic_write_bytes(os.path.join(run_dir, RUN_FILE),
                           json.dumps(record, indent=2, sort_keys=True).encode())
  say = log or (lambda _: None)
  with _manager(run_dir, keep_checkpoints) as manager:
    if manager.latest_step() is not None:
      _, state = restore(run_dir)
      say(f"resumed {run_dir} at step {int(state['step'])}")
    else:
      state = init_state(cfg)
      _save(manager, state)
    start = int(state["step"])
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    pending: list[dict] = []
    t_log = time.perf_counter()
    try:
      with _sigterm_as_interrupt():
        for step in range(start, end):
          state, metrics = train_step(cfg, teacher, state)
          if step == start:  # the first step compiles: time it apart from the others
            m = {k: float(v) for k, v in metrics.items()}
            seconds = time.perf_counter() - t_log
            _log_row(run_dir, {"step": step + 1, **m, "compile_and_step_seconds": seconds})
            say(f"step {step + 1}/{cfg.steps}  loss {m['loss']:.4f}  l1 {m['l1']:.4f}  "
                f"pyramid {m['pyramid']:.4f}  (compiled and ran in {seconds:.1f} s)")
            t_log = time.perf_counter()
          else:
            pending.append(metrics)
          if on_step is not None:
            on_step(step + 1, state)
          if pending and ((step + 1) % log_every == 0 or step + 1 == end):
            means = {k: float(np.mean([float(m[k]) for m in pending])) for k in pending[0]}
            now = time.perf_counter()
            row = {"step": step + 1, **means, "seconds_per_step": (now - t_log) / len(pending),
                   "images_per_second": len(pending) * cfg.batch_size / (now - t_log)}
            _log_row(run_dir, row)
            say(f"step {step + 1}/{cfg.steps}  loss {means['loss']:.4f}  l1 {means['l1']:.4f}"
                f"  pyramid {means['pyramid']:.4f}  {row['seconds_per_step']:.2f} s/step")
            pending, t_log = [], time.perf_counter()
          if (step + 1) % checkpoint_every == 0:
            _save(manager, state)
    except KeyboardInterrupt:
      _save(manager, state)
      say(f"interrupted: saved step {int(state['step'])} in {run_dir}")
      raise
    _save(manager, state)
  return state


# ----------------------------------------------------------------------------------------
# Using a run: export, evaluation, previews.


def _ema_variables(state: dict) -> dict:
  return {"params": state["ema"], "buffers": state["buffers"]}


def generator(run_dir: str | os.PathLike, step: int | None = None
              ) -> tuple[model_lib.Generator, dict, TrainConfig, int]:
  """The run's g_ema as ``(module, variables, config, step)``; its latent_avg is the mean
  w of 4096 latents (``RandomState(0)``)."""
  cfg, state = restore(run_dir, step)
  module = student_module(cfg)
  variables = _to_host(_ema_variables(state))
  variables["buffers"]["latent_avg"] = model_lib.mean_latent(module, variables, 4096, 0)
  return module, variables, cfg, int(state["step"])


def export(run_dir: str | os.PathLike, out_path: str | os.PathLike,
           step: int | None = None) -> dict:
  """Writes the run's g_ema as a rosinality checkpoint ({'g_ema', 'latent_avg'}).

  Returns:
    ``{"path", "bytes", "sha256", "step", "parameters"}``.
  """
  from memedit import _io
  from ports.stylegan2.export import save_rosinality

  module, variables, _, done = generator(run_dir, step)
  path = save_rosinality(out_path, module, variables)
  return {"path": path, "bytes": os.path.getsize(path), "sha256": _io.sha256_file(path),
          "step": done,
          "parameters": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(
              variables["params"])))}


@functools.lru_cache(maxsize=8)
def _pair_fn(module: model_lib.Generator, teacher_module: Any, teacher_z_dim: int,
             teacher_resolution: int, resolution: int, batch: int) -> Callable:
  teacher = Teacher(teacher_module, None, teacher_z_dim, teacher_resolution, "")

  def pair(variables, teacher_variables, key):
    z_t, z_s = paired_latents(key, batch, teacher_z_dim, module.z_dim)
    with fast_convolutions():
      s = module.apply(variables, z_s)
    return s, teacher_images(dataclasses.replace(teacher, variables=teacher_variables), z_t,
                             resolution)

  return jax.jit(pair)


def sample_pairs(module: model_lib.Generator, variables: dict, teacher: Teacher, n: int,
                 seed: int, resolution: int, batch: int = 64
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(student, teacher) images (n, R, R, C) for paired latents, ``batch`` at a time (at
  most n), batch i from ``fold_in(PRNGKey(seed), i)``; the student with its fixed noise
  buffers."""
  if n < 1 or batch < 1:
    raise ValueError(f"n, batch: expected positive integers, got {n}, {batch}")
  batch = min(batch, n)
  pair = _pair_fn(module, teacher.module, teacher.z_dim, teacher.resolution, resolution,
                  batch)
  students, teachers = [], []
  for i in range(math.ceil(n / batch)):
    s, t = pair(variables, teacher.variables, jax.random.fold_in(jax.random.PRNGKey(seed), i))
    students.append(np.asarray(s))
    teachers.append(np.asarray(t))
  return np.concatenate(students)[:n], np.concatenate(teachers)[:n]


def evaluate(run_dir: str | os.PathLike, teacher: Teacher, n_images: int = 1024,
             seed: int = 1, step: int | None = None) -> dict:
  """SWD (×10³ per pyramid level, :func:`ports.stylegan2.swd.swd`) and paired L1 of g_ema
  against the teacher, on ``n_images`` held-out latents (``seed`` ≠ the training seeds'
  stream; the student's own images use its fixed noise buffers).

  Returns:
    ``{"step", "images", "swd": {...}, "paired_l1", "teacher_vs_teacher_swd": {...},
    "random_init_swd": {...}, "random_init_paired_l1", "ratio_to_floor",
    "random_init_ratio_to_floor"}``: ``teacher_vs_teacher_swd`` is the SWD between two
    disjoint teacher sets of the same size (the floor the student's SWD can reach at this
    sample size); ``random_init_*`` the same figures for the run's generator at step 0
    (the same architecture and seed, untrained); the ratios are mean SWDs over the floor's.
  """
  from ports.stylegan2 import swd as swd_lib

  module, variables, cfg, done = generator(run_dir, step)
  _check_pair(cfg, teacher)
  student, target = sample_pairs(module, variables, teacher, n_images, seed, cfg.resolution)
  _, other = sample_pairs(module, variables, teacher, n_images, seed + 1, cfg.resolution)
  untrained = _to_host(_ema_variables(init_state(cfg)))
  untrained["buffers"]["latent_avg"] = model_lib.mean_latent(module, untrained, 4096, 0)
  random_images, _ = sample_pairs(module, untrained, teacher, n_images, seed, cfg.resolution)
  result = {"step": done, "images": n_images,
            "swd": swd_lib.swd(student, target),
            "paired_l1": float(np.mean(np.abs(student - target))),
            "teacher_vs_teacher_swd": swd_lib.swd(other, target),
            "random_init_swd": swd_lib.swd(random_images, target),
            "random_init_paired_l1": float(np.mean(np.abs(random_images - target)))}
  floor = result["teacher_vs_teacher_swd"]["mean"]
  result["ratio_to_floor"] = result["swd"]["mean"] / floor
  result["random_init_ratio_to_floor"] = result["random_init_swd"]["mean"] / floor
  return result


def preview(run_dir: str | os.PathLike, teacher: Teacher, out_path: str | os.PathLike,
            n: int = 8, seed: int = 1, step: int | None = None, columns: int = 8) -> str:
  """A PNG of ``n`` teacher images over the g_ema images of the paired latents: rows of
  ``columns`` images, each teacher row directly above the student's row for the same
  latents."""
  from PIL import Image

  from memedit import _io

  if n < 1 or columns < 1:
    raise ValueError(f"n, columns: expected positive integers, got {n}, {columns}")
  module, variables, cfg, _ = generator(run_dir, step)
  _check_pair(cfg, teacher)
  student, target = sample_pairs(module, variables, teacher, n, seed, cfg.resolution,
                                 batch=min(n, 64))
  pad = (-n) % columns
  blank = np.zeros((pad,) + target.shape[1:], target.dtype)
  rows = []
  for start in range(0, n + pad, columns):
    for images in (target, student):
      row = np.concatenate([images, blank])[start:start + columns]
      rows.append(np.concatenate(list(row), axis=1))
  grid = np.clip(np.rint((np.concatenate(rows, axis=0) + 1) * 127.5), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(grid).save(buf, format="PNG")
  _io.atomic_write_bytes(out_path, buf.getvalue())
  return os.path.abspath(os.fspath(out_path))


# ----------------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m ports.stylegan2.train",
      description="Distil the DCGAN face generator into a small StyleGAN2 (resumable).")
  sub = p.add_subparsers(dest="command", required=True)
  defaults = TrainConfig()

  t = sub.add_parser("train", help="train or resume a run")
  t.add_argument("--teacher", required=True,
                 help="converted DCGAN directory, or its torch checkpoint (weights.tar)")
  t.add_argument("--run-dir", required=True, help="run directory (resumed if it exists)")
  t.add_argument("--steps", type=int, default=defaults.steps)
  t.add_argument("--batch-size", type=int, default=defaults.batch_size)
  t.add_argument("--channels", default=",".join(map(str, defaults.channels)),
                 help="widths at 4, 8, ..., resolution px, comma-separated")
  t.add_argument("--resolution", type=int, default=defaults.resolution)
  t.add_argument("--style-dim", type=int, default=defaults.style_dim)
  t.add_argument("--n-mlp", type=int, default=defaults.n_mlp)
  t.add_argument("--lr", type=float, default=defaults.learning_rate)
  t.add_argument("--seed", type=int, default=defaults.seed)
  t.add_argument("--stop-after", type=int, default=None,
                 help="stop after this many steps of this invocation (resume later)")
  t.add_argument("--checkpoint-every", type=int, default=500)
  t.add_argument("--log-every", type=int, default=50)

  for name, help_ in (("export", "write g_ema as a rosinality .pt checkpoint"),
                      ("evaluate", "SWD and paired L1 of g_ema against the teacher"),
                      ("preview", "PNG of teacher images over the student's")):
    s = sub.add_parser(name, help=help_)
    s.add_argument("--run-dir", required=True)
    s.add_argument("--step", type=int, default=None)
    if name != "export":
      s.add_argument("--teacher", required=True)
    if name == "evaluate":
      s.add_argument("--images", type=int, default=1024)
      s.add_argument("--out", default=None, help="also write the result as JSON")
    elif name == "preview":
      s.add_argument("--images", type=int, default=8, help="number of latents shown")
      s.add_argument("--columns", type=int, default=8)
      s.add_argument("--out", required=True)
    else:
      s.add_argument("--out", required=True)
  return p


def main(argv: list[str] | None = None) -> int:
  """Runs the command line; returns the exit status (1 on a ValueError / OSError)."""
  args = _parser().parse_args(argv)
  try:
    if args.command == "train":
      cfg = TrainConfig(resolution=args.resolution,
                        channels=tuple(int(c) for c in args.channels.split(",")),
                        style_dim=args.style_dim, n_mlp=args.n_mlp,
                        batch_size=args.batch_size, steps=args.steps,
                        learning_rate=args.lr, seed=args.seed)
      teacher = load_teacher(args.teacher, args.run_dir)
      module = student_module(cfg)
      n_params = sum(x.size for x in jax.tree_util.tree_leaves(jax.eval_shape(
          module.init, jax.random.PRNGKey(0), jnp.zeros((1, cfg.style_dim)))["params"]))
      print(f"student: {cfg.resolution} px, channels {list(cfg.channels)}, style_dim "
            f"{cfg.style_dim}, {cfg.n_mlp} mapping layers, {n_params} parameters "
            f"({n_params * 4 / 1e6:.2f} MB float32)")
      try:
        train(cfg, teacher, args.run_dir, stop_after=args.stop_after,
              checkpoint_every=args.checkpoint_every, log_every=args.log_every)
      except KeyboardInterrupt:
        return 130
    elif args.command == "export":
      print(json.dumps(export(args.run_dir, args.out, args.step), indent=2))
    elif args.command == "evaluate":
      result = evaluate(args.run_dir, load_teacher(args.teacher, args.run_dir), args.images,
                        step=args.step)
      text = json.dumps(result, indent=2)
      print(text)
      if args.out:
        from memedit import _io
        _io.atomic_write_bytes(args.out, text.encode())
    else:
      print(preview(args.run_dir, load_teacher(args.teacher, args.run_dir), args.out,
                    n=args.images, step=args.step, columns=args.columns))
  except (ValueError, OSError) as e:
    print(f"{_parser().prog} {args.command}: error: {' '.join(str(e).split())}",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
