"""Using a training run of :mod:`ports.stylegan2.train`: its g_ema as a generator, the
rosinality checkpoint, SWD and paired-L1 evaluation against the teacher, preview grids."""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
from typing import Any, Callable

import jax
import numpy as np

from ports.stylegan2 import model as model_lib
from ports.stylegan2 import runs
from ports.stylegan2.fastconv import fast_convolutions
from ports.stylegan2.runs import to_host
from ports.stylegan2.teacher import Teacher, teacher_images
from ports.stylegan2.train import (TrainConfig, check_pair, init_state, paired_latents,
                                   restore, student_module)

__all__ = ["check_out_path", "ema_variables", "evaluate", "export", "generator", "preview",
           "sample_pairs"]



def check_out_path(run_dir: str | os.PathLike, out_path: str | os.PathLike) -> None:
  """Raises a ValueError if ``out_path`` cannot take an output file of the run: an
  existing directory, or one of the run's own files (``run.json``, ``log.jsonl``, the
  checkpoints, the converted teacher) or a path inside them, which the output would
  destroy."""
  out = os.path.realpath(os.path.abspath(os.fspath(out_path)))
  if os.path.isdir(out):
    raise ValueError(f"out: expected a file path, got the directory {out}")
  for owned in runs.run_files(run_dir):
    owned = os.path.realpath(owned)
    if out == owned or out.startswith(owned + os.sep):
      raise ValueError(f"out: expected a path outside the run's own files, got {out}, "
                       f"which is (inside) the run's {os.path.basename(owned)}")


def ema_variables(state: dict) -> dict:
  """g_ema's variables ``{params, buffers}`` from a training state."""
  return {"params": state["ema"], "buffers": state["buffers"]}


def generator(run_dir: str | os.PathLike, step: int | None = None
              ) -> tuple[model_lib.StyleGAN2Generator, dict, TrainConfig, int]:
  """The run's g_ema as ``(module, variables, config, step)``; its latent_avg is the mean
  w of 4096 latents (``RandomState(0)``)."""
  cfg, state = restore(run_dir, step)
  module = student_module(cfg)
  variables = to_host(ema_variables(state))
  variables["buffers"]["latent_avg"] = model_lib.mean_latent(module, variables, 4096, 0)
  return module, variables, cfg, int(state["step"])


def export(run_dir: str | os.PathLike, out_path: str | os.PathLike,
           step: int | None = None) -> dict:
  """Writes the run's g_ema as a rosinality checkpoint ({'g_ema', 'latent_avg'}).

  Returns:
    ``{"path", "bytes", "sha256", "step", "parameters"}``.

  Raises:
    ValueError: ``out_path`` is a directory or one of the run's own files
      (:func:`check_out_path`).
  """
  from memedit import _io
  from ports.stylegan2.export import save_rosinality

  check_out_path(run_dir, out_path)
  module, variables, _, done = generator(run_dir, step)
  path = save_rosinality(out_path, module, variables)
  return {"path": path, "bytes": os.path.getsize(path), "sha256": _io.sha256_file(path),
          "step": done,
          "parameters": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(
              variables["params"])))}


@functools.lru_cache(maxsize=8)
def _pair_fn(module: model_lib.StyleGAN2Generator, teacher_module: Any, teacher_z_dim: int,
             teacher_resolution: int, resolution: int, batch: int) -> Callable:
  teacher = Teacher(teacher_module, None, teacher_z_dim, teacher_resolution, "")

  def pair(variables, teacher_variables, key):
    z_t, z_s = paired_latents(key, batch, teacher_z_dim, module.z_dim)
    with fast_convolutions():
      s = module.apply(variables, z_s)
    return s, teacher_images(dataclasses.replace(teacher, variables=teacher_variables), z_t,
                             resolution)

  return jax.jit(pair)


def sample_pairs(module: model_lib.StyleGAN2Generator, variables: dict, teacher: Teacher, n: int,
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
  check_pair(cfg, teacher)
  student, target = sample_pairs(module, variables, teacher, n_images, seed, cfg.resolution)
  _, other = sample_pairs(module, variables, teacher, n_images, seed + 1, cfg.resolution)
  untrained = to_host(ema_variables(init_state(cfg)))
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
  check_out_path(run_dir, out_path)
  module, variables, cfg, _ = generator(run_dir, step)
  check_pair(cfg, teacher)
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
