"""From an edit spec to an edit: context → D, copy → paste (or erase) → insert."""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple

import numpy as np

from memedit.generators.context import context_keys, top_units
from memedit.generators.context import directions as context_directions
from memedit.generators.edit import EditResult, insert
from memedit.checks import check_positive_int
from memedit.generators.generator import (Generator, kernel_digest, layer_info,
                                          recorded_call_kwargs)
from memedit.generators.paste import Copied, copy_values, erase_target, paste_target

__all__ = ["SpecEdit", "edit_from_spec"]


class SpecEdit(NamedTuple):
  """The result of :func:`edit_from_spec`.

  Attributes:
    result: the :class:`memedit.generators.EditResult`.
    copied: the :class:`memedit.generators.Copied` object values (None for an erase).
    units: the zeroed units of an erase (None for an insert).
  """

  result: EditResult
  copied: Copied | None
  units: np.ndarray | None


def edit_from_spec(gen: Generator, spec, C: Any, *, steps: int | None = None,
                   optimizer: str | None = None, directions: Any = None,
                   progress: Callable[[int, float], Any] | None = None) -> SpecEdit:
  """Runs a validated :class:`memedit.specs.EditSpec` on ``gen`` with second moment C.

  Context keys (spec.key) give D (spec.method, spec.rank, spec.shrinkage); an insert
  copies spec.object and pastes it at spec.paste; an erase zeroes the spec.erase_units
  most active context units inside spec.paste. Λ is solved on spec.taps with the spec's
  solver settings.

  Args:
    gen: the generator. spec: the edit spec (its layer and canvas must be the model's).
    C: (C_in, C_in) second moment of the layer's keys.
    steps, optimizer: override the spec's solver settings.
    directions: optional (spec.rank, C_in) D of this spec's context with this C, computed
      before by :func:`memedit.generators.directions` (e.g. cached by a caller that showed
      its matches); used as given instead of being computed again.
    progress: optional ``progress(step, loss)`` hook of the Λ solve
      (:func:`memedit.solve_lambda`).

  Returns:
    :class:`SpecEdit`.

  Raises:
    TypeError: ``spec`` not an :class:`memedit.specs.EditSpec` (e.g. its JSON dict: validate
      it with :func:`memedit.specs.spec_from_json` first).
    ValueError: a layer or canvas that is not the model's, a C that is not (C_in, C_in)
      of the spec's layer, ``steps`` not a positive int, ``directions`` of another shape,
      and what the workflow's steps refuse.

  Example:
    >>> from flax import nnx
    >>> from memedit import specs
    >>> class Toy(nnx.Module):
    ...   def __init__(self):
    ...     self.up = nnx.ConvTranspose(3, 2, (4, 4), strides=(2, 2), rngs=nnx.Rngs(0))
    ...   def __call__(self, z):
    ...     return self.up(z.reshape(-1, 4, 4, 3))
    >>> gen = Generator(Toy(), 48, 8, {"up": ("up",)})
    >>> box = np.zeros((8, 8)); box[2:4, 2:6] = 1
    >>> spec = specs.make_spec(key=[(2, box)], object=(0, box), paste=(1, box), layer="up",
    ...                        canvas=8, solver={"steps": 100})
    >>> out = edit_from_spec(gen, spec, np.eye(3))
    >>> out.result.loss_after < out.result.loss_before, out.result.edit.rank
    (True, 1)
  """
  from memedit.specs import EditSpec

  if not isinstance(spec, EditSpec):
    raise TypeError(f"spec: expected an EditSpec (from memedit.specs.spec_from_json, "
                    f"load_spec or make_spec), got {type(spec).__name__}")
  gen.layer_address(spec.layer)
  if spec.canvas != gen.resolution:
    raise ValueError(f"canvas: expected {gen.resolution} (the model's resolution), got "
                     f"{spec.canvas}")
  C = np.asarray(C, np.float32)
  key_dim = layer_info(gen, spec.layer).key_dim
  if C.shape != (key_dim, key_dim):
    raise ValueError(f"C: expected the second moment of the keys of layer {spec.layer!r}, of shape "
                     f"({key_dim}, {key_dim}) (C_in = {key_dim}), got {C.shape}")
  if steps is not None:
    steps = check_positive_int(steps, "steps")
  if directions is None or spec.kind != "insert":
    keys, weights = context_keys(gen, spec.layer, spec.masks("key"))
  if directions is None:
    D = context_directions(C, keys, weights, rank=spec.rank, method=spec.method,
                           shrinkage=spec.shrinkage)
  else:
    D = np.asarray(directions, np.float32)
    if D.shape != (spec.rank, C.shape[0]):
      raise ValueError(f"directions: expected shape ({spec.rank}, {C.shape[0]}) (the "
                       f"spec's rank, C_in), got {D.shape}")
  solver = dict(spec.solver)
  if steps is not None:
    solver["steps"] = steps
  if optimizer is not None:
    solver["optimizer"] = optimizer
  (pnum, pmask), = spec.masks("paste")
  settings = {"spec_kind": spec.kind, "context_method": spec.method,
              "shrinkage": spec.shrinkage,
              "key_imgnums": [int(i) for i, _ in spec.key], "paste_imgnum": pnum}
  made_with = recorded_call_kwargs(gen)
  if made_with:
    settings["call_kwargs"] = made_with
  settings["base_kernel"] = kernel_digest(gen.params, gen.weight_path(spec.layer))
  copied, units = None, None
  if spec.kind == "insert":
    (onum, omask), = spec.masks("object")
    copied = copy_values(gen, spec.layer, onum, omask)
    target = paste_target(gen, spec.layer, copied, pnum, pmask)
    settings["object_imgnum"] = onum
  else:
    if spec.erase_units >= C.shape[0]:
      warnings.warn(f"erase_units: {spec.erase_units} is at least the {C.shape[0]} units of "
                    f"layer {spec.layer!r}: every unit is erased at the context",
                    UserWarning, stacklevel=2)
    units = top_units(C, keys, weights, min(spec.erase_units, C.shape[0]))
    target = erase_target(gen, spec.layer, pnum, pmask, units)
    settings["erased_units"] = [int(u) for u in units]
  result = insert(gen, spec.layer, D, target, optimizer=solver["optimizer"],
                  steps=solver["steps"], learning_rate=solver["learning_rate"],
                  loss=solver["loss"], taps=spec.taps, method=f"{spec.kind}/{spec.method}",
                  settings=settings, progress=progress)
  return SpecEdit(result, copied, units)
