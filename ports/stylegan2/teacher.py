"""The teacher of :mod:`ports.stylegan2.train`: a converted DCGAN face generator and its
images at the student's resolution."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any, Callable

import jax

__all__ = ["Teacher", "downsample", "load_teacher", "teacher_images"]



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


def load_teacher(path: str | os.PathLike, work_dir: str | os.PathLike | None = None, *,
                 check: Callable[[Teacher], None] | None = None) -> Teacher:
  """The DCGAN teacher from a converted directory or from its torch checkpoint.

  Args:
    path: a directory written by :func:`ports.dcgan.convert_dcgan` (``memedit convert``),
      or the torch file (e.g. gan-face-generate's ``weights.tar``), then converted into
      ``work_dir/teacher``.
    work_dir: where a torch file is converted (required for one).
    check: called with the loaded teacher before anything is written into ``work_dir``;
      an exception it raises refuses the teacher, and ``work_dir`` stays as it was (a
      torch file is first converted into a temporary directory, and into
      ``work_dir/teacher`` only once ``check`` has passed).

  Raises:
    ValueError: a torch file without ``work_dir``, or not a DCGAN checkpoint.
  """
  from ports.dcgan import convert_dcgan

  path = os.fspath(path)
  if not os.path.isfile(path):
    teacher = _load(path)
    if check is not None:
      check(teacher)
    return teacher
  if work_dir is None:
    raise ValueError(f"teacher: expected a converted DCGAN directory, or a work "
                     f"directory to convert the file {path!r} into, got neither")
  with tempfile.TemporaryDirectory(prefix="teacher-") as tmp:
    teacher = _load(convert_dcgan(path, os.path.join(tmp, "teacher")))
  if check is not None:
    check(teacher)
  convert_dcgan(path, os.path.join(os.fspath(work_dir), "teacher"))
  return teacher


def _load(path: str) -> Teacher:
  from memedit import _io
  from ports.dcgan import load_dcgan

  module, variables, config = load_dcgan(path)
  return Teacher(module, variables, int(config["z_dim"]), int(config["resolution"]),
                 _io.tree_hash(variables))


def downsample(images: jax.Array, factor: int) -> jax.Array:
  """Box filter: (N, H, W, C) → (N, H/factor, W/factor, C), means over factor² pixels."""
  if factor == 1:
    return images
  n, h, w, c = images.shape
  return images.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def teacher_images(teacher: Teacher, z: jax.Array, resolution: int) -> jax.Array:
  """Teacher images for latents z, box-filtered to ``resolution``."""
  images = teacher.module.apply(teacher.variables, z)
  return downsample(images, teacher.resolution // resolution)
