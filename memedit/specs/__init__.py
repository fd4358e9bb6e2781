"""Edit specifications: the reference's JSON edit format, validated, with solver settings.

The reference's rewriting UI saves an edit as JSON with

- ``"key"``: a list of ``[imgnum, mask]`` context examples,
- ``"object"``: ``[imgnum, mask]``, the copied region (absent for an erase),
- ``"paste"``: ``[imgnum, mask]``, where it goes (for an erase: the region to erase),
- ``"query"``: optional ``[imgnum, mask]``,

where a mask is a PNG data URL (``data:image/png;base64,...``) at canvas resolution and
imgnum indexes the deterministic latent sample. The reference's paint widget draws white
on a transparent canvas, and its readers take the red channel (a pixel is marked where it
is above zero). memedit writes masks the same way: the mask in the red, green, blue and
alpha channels, all zero where the mask is off. It reads a pixel's mask value as the
smaller of its red and alpha channels (the red channel of an image without alpha), so the
reference's masks, RGB or grey masks, and the white masks with the region in alpha that
earlier memedit versions wrote all decode to the region that was painted.

memedit adds ``"model"``, ``"layer"``, ``"method"`` (zca, svd, mean, unit), ``"rank"``,
``"shrinkage"`` (of C towards a multiple of the identity before the directions are
computed), ``"taps"`` (all: every kernel tap is edited, as in the reference; own: only the
taps that write a key's own output cell), ``"kind"`` (insert or erase),
``"erase_units"``, ``"canvas"`` (the resolution), ``"num_images"`` (the size of the
image sample imgnums index) and ``"solver"`` (optimizer, steps, learning_rate, loss).
Any other top-level field is refused (:data:`FIELDS` lists the allowed ones), so that a
misspelt setting is not dropped without a word.

Limits keep a mistaken or hostile spec from taking unbounded memory or time: masks of at
most :data:`MAX_CANVAS` pixels a side (read from the PNG header before anything is
decoded), at most :data:`MAX_MASK_PIXELS` mask pixels in all (counted before any
mask is decoded, so that a long list of small PNGs of a large canvas cannot take
gigabytes), at most :data:`MAX_IMAGES` images in the sample and :data:`MAX_STEPS` solver
steps; the learning rate must be a finite positive number.

Masks are held as uint8 arrays (canvas, canvas) so that save → load gives identical
masks and therefore an identical edit. :mod:`memedit.specs.masks` encodes and decodes
them, :mod:`memedit.specs.text` reads a spec file's bytes.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from typing import Any, Sequence

import numpy as np

from memedit import _io
from memedit.directions import METHODS as _SUBSPACE_METHODS
from memedit.optim import LOSSES, OPTIMIZERS
from memedit.specs.masks import (MAX_CANVAS, data_url_to_mask, got, mask_to_data_url,
                                 mask_uint8, shown)
from memedit.specs.text import parse_spec_text

__all__ = ["DEFAULT_SOLVER", "EDIT_KINDS", "EditSpec", "FIELDS", "MAX_CANVAS", "MAX_IMAGES",
           "MAX_MASK_PIXELS", "MAX_STEPS", "METHODS", "TAPS", "check_shrinkage",
           "check_solver", "data_url_to_mask", "load_spec", "make_spec", "mask_to_data_url",
           "parse_spec_text", "save_spec", "spec_from_json", "spec_to_json"]

#: What an edit does: insert a copied object, or erase the most active context units.
EDIT_KINDS = ("insert", "erase")
#: Context methods: the subspace methods of :func:`memedit.context_directions` and unit
#: selection.
METHODS = _SUBSPACE_METHODS + ("unit",)
#: Kernel taps an insert edits: every tap (the reference's) or a key's own cell's.
TAPS = ("all", "own")
DEFAULT_SOLVER = {"optimizer": "adam", "steps": 2001, "learning_rate": 0.05, "loss": "l1"}
# The reference's fields, then memedit's.
FIELDS = ("key", "object", "paste", "query", "model", "layer", "kind", "method", "rank",
          "shrinkage", "taps", "erase_units", "canvas", "num_images", "solver")
MAX_IMAGES = 100_000
MAX_STEPS = 100_000
#: The most mask pixels a spec may hold in all (its masks are decoded to uint8 canvas ×
#: canvas arrays: 256 MiB; 16 masks at the largest canvas, 65,536 at 64 × 64).
MAX_MASK_PIXELS = 2**28


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _int_in(value: Any, where: str, lo: int = 1, hi: int | None = None) -> int:
  """``value`` as an int after checking it is an integer in [lo, hi]."""
  if not _is_int(value) or value < lo or (hi is not None and value > hi):
    want = (f"an integer in [{lo}, {hi}]" if hi is not None
            else "a positive integer" if lo == 1 else f"an integer of at least {lo}")
    raise ValueError(f"{where}: expected {want}, got {got(value, (int, np.integer))}")
  return int(value)


@dataclasses.dataclass(frozen=True, eq=False)
class EditSpec:
  """A validated edit specification.

  Attributes:
    key: tuple of (imgnum, mask) context examples; masks uint8 (canvas, canvas).
    paste: (imgnum, mask) target location (insert) or region to erase.
    object: (imgnum, mask) copied region, None for an erase.
    query: optional (imgnum, mask).
    layer: layer name.
    model: free text naming the model (e.g. a checkpoint name) or None.
    kind: "insert" or "erase".
    method: context method, "zca", "svd", "mean" or "unit".
    rank: rank r of the edit subspace.
    shrinkage: α in [0, 1); the zca, svd and mean directions use the shrunk second
      moment (1 − α) C + α (tr C / C_in) I (see :func:`memedit.generators.directions`).
    taps: "all" (every kernel tap has its own Λ, the reference) or "own" (only the taps
      that write a key's own output cell, or most of their output into it where the layer
      blurs after up-sampling; see :func:`memedit.generators.own_taps`).
    erase_units: number of most active context units zeroed by an erase.
    canvas: canvas resolution of the masks.
    num_images: number of images in the sample that imgnums index.
    solver: dict with optimizer, steps, learning_rate, loss.
  """

  key: tuple
  paste: tuple
  object: tuple | None = None
  query: tuple | None = None
  layer: str = ""
  model: str | None = None
  kind: str = "insert"
  method: str = "zca"
  rank: int = 1
  shrinkage: float = 0.0
  taps: str = "all"
  erase_units: int = 30
  canvas: int = 64
  num_images: int = 10000
  solver: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_SOLVER))

  def masks(self, which: str) -> list[tuple[int, np.ndarray]]:
    """[(imgnum, float mask in [0, 1])] of ``'key'``, or one entry for ``'object'``,
    ``'paste'`` or ``'query'`` (empty when absent)."""
    if which == "key":
      items = list(self.key)
    else:
      item = getattr(self, which)
      items = [] if item is None else [item]
    return [(int(i), m.astype(np.float32) / 255.0) for i, m in items]

  def imgnums(self) -> set[int]:
    """Every image number the spec uses."""
    items = list(self.key) + [x for x in (self.paste, self.object, self.query) if x]
    return {int(i) for i, _ in items}

  def __eq__(self, other):
    if not isinstance(other, EditSpec):
      return NotImplemented
    return spec_to_json(self) == spec_to_json(other)


def _pair(value, where, canvas, num_images):
  if not isinstance(value, (list, tuple)) or len(value) != 2:
    raise ValueError(f"{where}: expected an [imgnum, mask] pair, got "
                     f"{got(value, (list, tuple))}")
  num, url = value
  if not _is_int(num):
    raise ValueError(f"{where}: expected an integer image number, got {got(num)}")
  if not 0 <= int(num) < num_images:
    raise ValueError(f"{where}: expected an image number in [0, {num_images}), got {num}")
  if isinstance(url, np.ndarray):
    mask = url
    if mask.shape != (canvas, canvas):
      raise ValueError(f"{where} mask: expected size {canvas}x{canvas} (the canvas), got "
                       + (f"{mask.shape[1]}x{mask.shape[0]}" if mask.ndim == 2
                          else f"an array of shape {mask.shape}"))
    if mask.dtype != np.uint8:
      mask = mask_uint8(mask, f"{where} mask")
  else:
    mask = data_url_to_mask(url, f"{where} mask", size=canvas)
  if not (mask > 0).any():
    raise ValueError(f"{where} mask: expected a non-empty mask, got one with no marked pixel")
  return int(num), mask


def check_shrinkage(shrinkage: Any, method: str) -> float:
  """``shrinkage`` as a float after checking it is a number in [0, 1) (and 0 for the
  "unit" method: shrinkage applies to the zca, svd and mean directions).

  Args:
    shrinkage: α of (1 − α) C + α (tr C / C_in) I. method: the context method.

  Returns:
    α as a float.

  Raises:
    ValueError: not a number in [0, 1), or non-zero with method "unit".

  Example:
    >>> check_shrinkage(0.2, "zca")
    0.2
    >>> check_shrinkage(0.2, "unit")
    Traceback (most recent call last):
    ...
    ValueError: shrinkage: expected 0 with method 'unit' (it applies to zca, svd and mean), got 0.2
  """
  if not _is_number(shrinkage) or not 0.0 <= shrinkage < 1.0:
    raise ValueError(f"shrinkage: expected a number in [0, 1), got "
                     f"{got(shrinkage, (int, float, np.integer, np.floating))}")
  if method == "unit" and shrinkage:
    raise ValueError(f"shrinkage: expected 0 with method 'unit' (it applies to zca, svd "
                     f"and mean), got {shrinkage!r}")
  return float(shrinkage)


def _choice(value: Any, choices: tuple, where: str) -> str:
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f"{where}: expected one of {choices}, got {got(value, str)}")
  return value


def check_solver(given: Any) -> dict:
  """The solver settings of a spec, defaults filled in, after checking each.

  Args:
    given: the spec's ``"solver"`` object: any of ``optimizer`` (adam, gauss_newton),
      ``steps`` (1 to :data:`MAX_STEPS`), ``learning_rate`` (a finite positive number)
      and ``loss`` (l1, l2).

  Returns:
    A dict with all four settings.

  Raises:
    ValueError: ``given`` is not an object, has other fields, or a setting is invalid.

  Example:
    >>> check_solver({"steps": 300})
    {'optimizer': 'adam', 'steps': 300, 'learning_rate': 0.05, 'loss': 'l1'}
  """
  if not isinstance(given, dict):
    raise ValueError(f"solver: expected an object, got {got(given)}")
  unknown = [k for k in given if k not in DEFAULT_SOLVER]
  if unknown:
    raise ValueError(f"solver: expected fields among {sorted(DEFAULT_SOLVER)}, got "
                     f"{shown(unknown)}{_did_you_mean(unknown, DEFAULT_SOLVER)}")
  solver = {**DEFAULT_SOLVER, **given}
  _choice(solver["optimizer"], OPTIMIZERS, "solver.optimizer")
  _choice(solver["loss"], LOSSES, "solver.loss")
  solver["steps"] = _int_in(solver["steps"], "solver.steps", 1, MAX_STEPS)
  lr = solver["learning_rate"]
  try:
    finite = _is_number(lr) and math.isfinite(lr)
  except OverflowError:  # an integer beyond float's range
    finite = False
  if not finite or not lr > 0:
    raise ValueError(f"solver.learning_rate: expected a finite positive number, got "
                     f"{got(lr, (int, float, np.integer, np.floating))}")
  solver["learning_rate"] = float(lr)
  return solver


def _did_you_mean(unknown: list, known) -> str:
  for name in unknown:
    if isinstance(name, str):
      close = difflib.get_close_matches(name, list(known), n=1)
      if close:
        return f" (did you mean {close[0]!r} for {name!r}?)"
  return ""


def spec_from_json(data: Any, *, layers: Sequence[str] | None = None,
                   canvas: int | None = None, num_images: int | None = None) -> EditSpec:
  """Validates a JSON object (dict) as an :class:`EditSpec`.

  Args:
    data: the parsed JSON.
    layers: the layer names the model has; an unknown ``"layer"`` raises.
    canvas: the model's canvas resolution (overrides and checks the spec's ``canvas``).
    num_images: size of the image sample (imgnums must be below it).

  Returns:
    The :class:`EditSpec`.

  Raises:
    ValueError: a missing or unknown field, bad base64 or PNG, an empty mask, a mask
      whose size is not the canvas, more masks than :data:`MAX_MASK_PIXELS` allows, an
      image number out of range, an unknown layer, or a bad setting; the message names
      the field.

  Example:
    >>> m = np.zeros((8, 8)); m[2:4, 2:6] = 1
    >>> url = mask_to_data_url(m)
    >>> spec = spec_from_json({"key": [[0, url]], "object": [1, url], "paste": [2, url],
    ...                        "layer": "convt2", "rank": 1})
    >>> spec.canvas, spec.kind, spec.solver["steps"]
    (8, 'insert', 2001)
    >>> spec_from_json({"key": [[0, url]], "paste": [2, url], "layer": "convt2",
    ...                 "rnak": 2})
    Traceback (most recent call last):
    ...
    ValueError: spec: expected fields among [...], got unknown field ['rnak'] (did you ...)
  """
  if not isinstance(data, dict):
    raise ValueError(f"spec: expected a JSON object, got {got(data)}")
  unknown = [k for k in data if k not in FIELDS]
  if unknown:
    raise ValueError(f"spec: expected fields among {list(FIELDS)}, got unknown "
                     f"{'field' if len(unknown) == 1 else 'fields'} {shown(unknown)}"
                     f"{_did_you_mean(unknown, FIELDS)}")
  kind = _choice(data.get("kind", "insert"), EDIT_KINDS, "kind")
  required = ["key", "paste", "layer"] + (["object"] if kind == "insert" else [])
  missing = [f for f in required if f not in data or data[f] is None]
  if missing:
    raise ValueError(f"spec: expected fields {required}, missing {missing}")
  given_canvas = data.get("canvas")
  if canvas is None:
    canvas = given_canvas
    if canvas is None:
      p = data["paste"]
      if not isinstance(p, (list, tuple)) or len(p) != 2:
        raise ValueError(f"paste: expected an [imgnum, mask] pair, got "
                         f"{got(p, (list, tuple))}")
      m = p[1] if isinstance(p[1], np.ndarray) else data_url_to_mask(p[1], "paste mask")
      canvas = int(m.shape[0])
  elif given_canvas is not None and (not _is_int(given_canvas) or given_canvas != canvas):
    raise ValueError(f"canvas: expected {canvas} (the model's resolution), got "
                     f"{got(given_canvas, (int, np.integer))}")
  canvas = _int_in(canvas, "canvas", 1, MAX_CANVAS)
  n_img = num_images if num_images is not None else data.get("num_images", 10000)
  n_img = _int_in(n_img, "num_images", 1, MAX_IMAGES)
  layer = data["layer"]
  if not isinstance(layer, str) or not layer:
    raise ValueError(f"layer: expected a layer name, got {got(layer, str)}")
  if layers is not None and layer not in layers:
    raise ValueError(f"layer: expected one of {sorted(layers)}, got {layer!r}")
  keys = data["key"]
  if not isinstance(keys, (list, tuple)) or not keys:
    raise ValueError(f"key: expected a non-empty list of [imgnum, mask] pairs, got "
                     f"{got(keys, (list, tuple))}")
  others = sum(data.get(f) is not None for f in ("paste", "object", "query"))
  if (len(keys) + others) * canvas * canvas > MAX_MASK_PIXELS:
    most = max(MAX_MASK_PIXELS // (canvas * canvas) - others, 0)
    raise ValueError(f"key: expected at most {most} [imgnum, mask] pairs at canvas {canvas} "
                     f"(at most {MAX_MASK_PIXELS} mask pixels in a spec), got {len(keys)}; "
                     f"no mask was decoded")
  key = tuple(_pair(k, f"key[{i}]", canvas, n_img) for i, k in enumerate(keys))
  paste = _pair(data["paste"], "paste", canvas, n_img)
  obj = _pair(data["object"], "object", canvas, n_img) if data.get("object") is not None else None
  query = _pair(data["query"], "query", canvas, n_img) if data.get("query") is not None else None
  method = _choice(data.get("method", "zca"), METHODS, "method")
  rank = _int_in(data.get("rank", 1), "rank")
  if method == "mean" and rank != 1:
    raise ValueError(f"rank: method 'mean' gives rank 1, got {rank}")
  shrinkage = check_shrinkage(data.get("shrinkage", 0.0), method)
  taps = _choice(data.get("taps", "all"), TAPS, "taps")
  erase_units = _int_in(data.get("erase_units", 30), "erase_units")
  solver = check_solver(data.get("solver", {}))
  model = data.get("model")
  if model is not None and not isinstance(model, str):
    raise ValueError(f"model: expected a string or null, got {got(model)}")
  return EditSpec(key=key, paste=paste, object=obj, query=query, layer=layer, model=model,
                  kind=kind, method=method, rank=rank, shrinkage=shrinkage, taps=taps,
                  erase_units=erase_units, canvas=canvas, num_images=n_img, solver=solver)


def spec_to_json(spec: EditSpec) -> dict:
  """The JSON object of a spec (masks as PNG data URLs), loadable by :func:`spec_from_json`.

  Args:
    spec: the :class:`EditSpec`.

  Returns:
    A JSON-serialisable dict.

  Example:
    >>> m = np.zeros((8, 8)); m[2:4, 2:6] = 1
    >>> spec = make_spec(key=[(0, m)], paste=(2, m), layer="convt2", kind="erase")
    >>> data = spec_to_json(spec)
    >>> data["kind"], "object" in data, spec_from_json(data) == spec
    ('erase', False, True)
  """
  def pair(p):
    return None if p is None else [int(p[0]), mask_to_data_url(p[1])]

  out = {"key": [pair(k) for k in spec.key], "paste": pair(spec.paste),
         "layer": spec.layer, "model": spec.model, "kind": spec.kind, "method": spec.method,
         "rank": spec.rank, "shrinkage": spec.shrinkage, "taps": spec.taps,
         "erase_units": spec.erase_units,
         "canvas": spec.canvas, "num_images": spec.num_images, "solver": dict(spec.solver)}
  if spec.object is not None:
    out["object"] = pair(spec.object)
  if spec.query is not None:
    out["query"] = pair(spec.query)
  return out


def load_spec(path: str | os.PathLike, **kwargs) -> EditSpec:
  """Reads and validates a JSON edit spec.

  Args:
    path: the JSON file.
    **kwargs: as :func:`spec_from_json` (layers, canvas, num_images).

  Returns:
    The :class:`EditSpec`.

  Raises:
    ValueError: the file is not UTF-8 JSON, or the spec is invalid (see
      :func:`spec_from_json`); the message starts with the file's name.
    OSError: the file cannot be read.

  Example:
    >>> import os, tempfile
    >>> m = np.zeros((8, 8)); m[2:4, 2:6] = 1
    >>> path = os.path.join(tempfile.mkdtemp(), "spec.json")
    >>> spec = make_spec(key=[(0, m)], object=(1, m), paste=(2, m), layer="convt2")
    >>> load_spec(save_spec(path, spec), layers=["convt2"]) == spec
    True
  """
  source = os.fspath(path)
  with open(path, "rb") as f:
    raw = f.read()
  data = parse_spec_text(raw, source)
  try:
    return spec_from_json(data, **kwargs)
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from None


def save_spec(path: str | os.PathLike, spec: EditSpec) -> str:
  """Writes a spec as JSON atomically.

  Args:
    path: the file to write. spec: the :class:`EditSpec`.

  Returns:
    The file's absolute path.

  Example:
    >>> import os, tempfile
    >>> m = np.zeros((8, 8)); m[2:4, 2:6] = 1
    >>> spec = make_spec(key=[(0, m)], paste=(2, m), layer="convt2", kind="erase")
    >>> os.path.isabs(save_spec(os.path.join(tempfile.mkdtemp(), "s.json"), spec))
    True
  """
  text = json.dumps(spec_to_json(spec), indent=1)
  _io.atomic_write_bytes(path, text.encode())
  return os.path.abspath(os.fspath(path))


def make_spec(*, key: Sequence[tuple[int, Any]], paste: tuple[int, Any], layer: str,
              object: tuple[int, Any] | None = None, query: tuple[int, Any] | None = None,
              **settings) -> EditSpec:
  """Builds and validates a spec from masks (uint8 or float arrays in [0, 1]).

  Args:
    key: (imgnum, mask) context examples. paste: (imgnum, mask). layer: the layer name.
    object: (imgnum, mask) of an insert. query: optional (imgnum, mask).
    **settings: any other spec field (kind, method, rank, shrinkage, taps, erase_units,
      canvas, num_images, solver, model).

  Returns:
    The validated :class:`EditSpec`.

  Example:
    >>> import numpy as np
    >>> m = np.zeros((8, 8)); m[2:4, 2:6] = 1
    >>> s = make_spec(key=[(0, m)], object=(1, m), paste=(2, m), layer="convt2", canvas=8)
    >>> s.rank, float(s.masks("paste")[0][1].sum())
    (1, 8.0)
  """
  data = {"key": [[int(i), np.asarray(m)] for i, m in key], "paste": [int(paste[0]),
                                                                      np.asarray(paste[1])],
          "layer": layer, **settings}
  if object is not None:
    data["object"] = [int(object[0]), np.asarray(object[1])]
  if query is not None:
    data["query"] = [int(query[0]), np.asarray(query[1])]
  return spec_from_json(data)
