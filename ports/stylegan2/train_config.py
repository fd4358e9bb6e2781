"""The configuration of a distillation run of :mod:`ports.stylegan2.train`.

:class:`TrainConfig` holds everything that decides the trained weights (architecture,
optimiser, loss, EMA, noise and seed; a resumed run must match it, and ``run.json``
stores it as :meth:`TrainConfig.to_json`); :func:`student_module` builds the student
generator it describes. Both are re-exported by :mod:`ports.stylegan2.train`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

from ports.stylegan2 import model as model_lib

__all__ = ["MAX_SEED", "MAX_STEPS", "TrainConfig", "student_module"]

#: Largest ``steps``: the step counter is an int32 (and so is the schedule's step count).
MAX_STEPS = 2 ** 31 - 1
#: Largest ``seed``: the initialisation draws from ``numpy.random.RandomState(seed)``.
MAX_SEED = 2 ** 32 - 1


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
    steps: total steps of the run (the learning-rate schedule spans them; at most
      :data:`MAX_STEPS`).
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
    seed: seed of the initialisation and of every step's latents and noise (in [0,
      :data:`MAX_SEED`]).

  Integer fields must be integers (not bool, not float), the others finite numbers; a
  ValueError names the first field that is not.
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
    _check_types(self)
    log2 = model_lib.log2_resolution(self.resolution)
    checks = [
        (len(self.channels) == log2 - 1, "channels",
         f"{log2 - 1} widths (4..{self.resolution} px)", self.channels),
        (all(c > 0 for c in self.channels), "channels", "positive widths", self.channels),
        (self.style_dim > 0 and self.n_mlp > 0, "style_dim, n_mlp", "positive integers",
         (self.style_dim, self.n_mlp)),
        (self.batch_size > 0 and 0 < self.steps <= MAX_STEPS, "batch_size, steps",
         f"positive integers, steps at most {MAX_STEPS} (the int32 step counter)",
         (self.batch_size, self.steps)),
        (0 <= self.seed <= MAX_SEED, "seed", f"an integer in [0, {MAX_SEED}]", self.seed),
        (self.lr_mlp > 0, "lr_mlp", "a positive number", self.lr_mlp),
        (self.eps > 0, "eps", "a positive number", self.eps),
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
    return cls(**{k: tuple(v) if k == "channels" and isinstance(v, list) else v
                  for k, v in d.items()})


_INT_FIELDS = ("resolution", "style_dim", "n_mlp", "batch_size", "steps", "seed")
_FLOAT_FIELDS = ("lr_mlp", "mapping_lr_scale", "learning_rate", "beta1", "beta2", "eps",
                 "warmup_fraction", "final_lr_fraction", "l1_weight", "pyramid_weight",
                 "ema_half_life_images")


def _is_int(x: Any) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_types(cfg: TrainConfig) -> None:
  """Integers where the run needs whole numbers, finite reals where it needs numbers (a
  ValueError naming the field, before any other check)."""
  def fail(name, want, got):
    raise ValueError(f"TrainConfig.{name}: expected {want}, got {got!r}")

  for name in _INT_FIELDS:
    if not _is_int(getattr(cfg, name)):
      fail(name, "an integer", getattr(cfg, name))
    object.__setattr__(cfg, name, int(getattr(cfg, name)))  # numpy integers → int (JSON)
  channels = _iterable(cfg.channels)
  if isinstance(cfg.channels, (str, bytes)) or not all(_is_int(c) for c in channels):
    fail("channels", "a sequence of integers", cfg.channels)
  object.__setattr__(cfg, "channels", tuple(int(c) for c in channels))
  if cfg.pyramid_levels is not None:
    if not _is_int(cfg.pyramid_levels):
      fail("pyramid_levels", "None or an integer", cfg.pyramid_levels)
    object.__setattr__(cfg, "pyramid_levels", int(cfg.pyramid_levels))
  for name in _FLOAT_FIELDS + ("ema_rampup",):
    x = getattr(cfg, name)
    if name == "ema_rampup" and x is None:
      continue
    if (isinstance(x, bool) or not isinstance(x, numbers.Real)
        or not math.isfinite(float(x))):
      fail(name, "a finite number" + (" or None" if name == "ema_rampup" else ""), x)
    object.__setattr__(cfg, name, float(x))


def _iterable(x: Any) -> tuple:
  try:
    return tuple(x)
  except TypeError:
    return (None,)


def student_module(cfg: TrainConfig) -> model_lib.StyleGAN2Generator:
  """The student generator (rosinality layout: z_dim = w_dim = style_dim)."""
  return model_lib.StyleGAN2Generator(resolution=cfg.resolution, channels=cfg.channels,
                             z_dim=cfg.style_dim, w_dim=cfg.style_dim, n_mlp=cfg.n_mlp,
                             lr_mlp=cfg.lr_mlp)
