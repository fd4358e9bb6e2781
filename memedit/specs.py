"""Edit specifications: the reference's JSON edit format, validated, with solver settings.

The reference's rewriting UI saves an edit as JSON with

- ``"key"``: a list of ``[imgnum, mask]`` context examples,
- ``"object"``: ``[imgnum, mask]``, the copied region (absent for an erase),
- ``"paste"``: ``[imgnum, mask]``, where it goes (for an erase: the region to erase),
- ``"query"``: optional ``[imgnum, mask]``,

where a mask is a PNG data URL (``data:image/png;base64,...``) at canvas resolution whose
alpha channel (or grey level, for images without alpha) marks the region and imgnum
indexes the deterministic latent sample. memedit adds ``"model"``, ``"layer"``,
``"method"`` (zca, svd, mean, unit), ``"rank"``, ``"shrinkage"`` (of C towards a multiple
of the identity before the directions are computed), ``"taps"`` (all: every kernel tap is
edited, as in the reference; own: only the taps that write a key's own output cell),
``"kind"`` (insert or erase),
``"erase_units"``, ``"canvas"`` (the resolution), ``"num_images"`` (the size of the
image sample imgnums index) and ``"solver"`` (optimizer, steps, learning_rate, loss).

Masks are held as uint8 arrays (canvas, canvas) so that save → load gives identical
masks and therefore an identical edit.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import os
from typing import Any, Sequence

import numpy as np

from memedit import _io

_PREFIX = "data:image/png;base64,"
KINDS = ("insert", "erase")
METHODS = ("zca", "svd", "mean", "unit")
TAPS = ("all", "own")
OPTIMIZERS = ("adam", "gauss_newton")
LOSSES = ("l1", "l2")
DEFAULT_SOLVER = {"optimizer": "adam", "steps": 2001, "learning_rate": 0.05, "loss": "l1"}


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
      moment (1 − α) C + α (tr C / C_in) I (see :func:`memedit.rewrite.directions`).
    taps: "all" (every kernel tap has its own Λ, the reference) or "own" (only the taps
      that write a key's own output cell, see :func:`memedit.rewrite.own_taps`).
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


def mask_to_data_url(mask: Any) -> str:
  """A (H, W) mask (uint8, or float in [0, 1]) as a PNG data URL: white RGBA with the
  mask in the alpha channel, as the reference's paint widget writes it."""
  from PIL import Image

  m = np.asarray(mask)
  if m.ndim != 2:
    raise ValueError(f"mask: expected a 2-D array, got shape {m.shape}")
  if m.dtype != np.uint8:
    m = np.clip(np.round(np.asarray(m, np.float64) * 255.0), 0, 255).astype(np.uint8)
  rgba = np.empty(m.shape + (4,), np.uint8)
  rgba[..., :3] = 255
  rgba[..., 3] = m
  buf = io.BytesIO()
  Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
  return _PREFIX + base64.b64encode(buf.getvalue()).decode("ascii")


def data_url_to_mask(url: Any, where: str = "mask") -> np.ndarray:
  """Decodes a PNG data URL to a uint8 (H, W) mask: the alpha channel, or the grey level
  of an image without alpha.

  Raises:
    ValueError: not a PNG data URL, bad base64, or bytes that are not a PNG image.
  """
  from PIL import Image, UnidentifiedImageError

  if not isinstance(url, str) or not url.startswith(_PREFIX):
    shown = url[:40] if isinstance(url, str) else type(url).__name__
    raise ValueError(f"{where}: expected a PNG data URL starting with {_PREFIX!r}, got "
                     f"{shown!r}")
  try:
    raw = base64.b64decode(url[len(_PREFIX):], validate=True)
  except (binascii.Error, ValueError) as e:
    raise ValueError(f"{where}: expected base64 data after {_PREFIX!r}, got invalid base64 "
                     f"({e})") from None
  try:
    img = Image.open(io.BytesIO(raw))
    if img.format != "PNG":
      raise ValueError(f"{where}: expected a PNG image, got {img.format}")
    img.load()
  except (UnidentifiedImageError, OSError, SyntaxError) as e:
    raise ValueError(f"{where}: expected PNG image data, got bytes that are not a PNG "
                     f"({e})") from None
  if "A" in img.getbands():
    return np.asarray(img.getchannel("A"), np.uint8)
  return np.asarray(img.convert("L"), np.uint8)


def _pair(value, where, canvas, num_images):
  if not isinstance(value, (list, tuple)) or len(value) != 2:
    raise ValueError(f"{where}: expected an [imgnum, mask] pair, got {str(value)[:60]!r}")
  num, url = value
  if isinstance(num, bool) or not isinstance(num, (int, np.integer)):
    raise ValueError(f"{where}: expected an integer image number, got {num!r}")
  if not 0 <= int(num) < num_images:
    raise ValueError(f"{where}: expected an image number in [0, {num_images}), got {num}")
  mask = url if isinstance(url, np.ndarray) else data_url_to_mask(url, f"{where} mask")
  if mask.shape != (canvas, canvas):
    raise ValueError(f"{where} mask: expected size {canvas}x{canvas} (the canvas), got "
                     f"{mask.shape[1]}x{mask.shape[0]}")
  if mask.dtype != np.uint8:
    mask = np.clip(np.round(np.asarray(mask, np.float64) * 255.0), 0, 255).astype(np.uint8)
  if not (mask > 0).any():
    raise ValueError(f"{where} mask: expected a non-empty mask, got one with no marked pixel")
  return int(num), mask


def _positive_int(value, where):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{where}: expected a positive integer, got {value!r}")
  return int(value)


def check_shrinkage(shrinkage: Any, method: str) -> float:
  """``shrinkage`` as a float after checking it is a number in [0, 1), and 0 for the
  "unit" method (shrinkage applies to the zca, svd and mean directions)."""
  if (isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float))
      or not 0.0 <= shrinkage < 1.0):
    raise ValueError(f"shrinkage: expected a number in [0, 1), got {shrinkage!r}")
  if method == "unit" and shrinkage:
    raise ValueError(f"shrinkage: expected 0 with method 'unit' (it applies to zca, svd "
                     f"and mean), got {shrinkage!r}")
  return float(shrinkage)


def spec_from_json(data: Any, *, layers: Sequence[str] | None = None,
                   canvas: int | None = None, num_images: int | None = None) -> EditSpec:
  """Validates a JSON object (dict) as an :class:`EditSpec`.

  Args:
    data: the parsed JSON.
    layers: the layer names the model has; an unknown ``"layer"`` raises.
    canvas: the model's canvas resolution (overrides and checks the spec's ``canvas``).
    num_images: size of the image sample (imgnums must be below it).

  Raises:
    ValueError: a missing field, bad base64 or PNG, an empty mask, a mask whose size is
      not the canvas, an image number out of range, an unknown layer, or a bad setting.
  """
  if not isinstance(data, dict):
    raise ValueError(f"spec: expected a JSON object, got {type(data).__name__}")
  kind = data.get("kind", "insert")
  if kind not in KINDS:
    raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
  required = ["key", "paste", "layer"] + (["object"] if kind == "insert" else [])
  missing = [f for f in required if f not in data or data[f] is None]
  if missing:
    raise ValueError(f"spec: expected fields {required}, missing {missing}")
  if canvas is None:
    canvas = data.get("canvas")
    if canvas is None:
      p = data["paste"]
      if not isinstance(p, (list, tuple)) or len(p) != 2:
        raise ValueError(f"paste: expected an [imgnum, mask] pair, got {str(p)[:60]!r}")
      m = p[1] if isinstance(p[1], np.ndarray) else data_url_to_mask(p[1], "paste mask")
      canvas = int(m.shape[0])
  elif "canvas" in data and data["canvas"] != canvas:
    raise ValueError(f"canvas: expected {canvas} (the model's resolution), got {data['canvas']}")
  canvas = _positive_int(canvas, "canvas")
  n_img = num_images if num_images is not None else data.get("num_images", 10000)
  n_img = _positive_int(n_img, "num_images")
  layer = data["layer"]
  if not isinstance(layer, str) or not layer:
    raise ValueError(f"layer: expected a layer name, got {layer!r}")
  if layers is not None and layer not in layers:
    raise ValueError(f"layer: expected one of {sorted(layers)}, got {layer!r}")
  keys = data["key"]
  if not isinstance(keys, (list, tuple)) or not keys:
    raise ValueError(f"key: expected a non-empty list of [imgnum, mask] pairs, got "
                     f"{str(keys)[:60]!r}")
  key = tuple(_pair(k, f"key[{i}]", canvas, n_img) for i, k in enumerate(keys))
  paste = _pair(data["paste"], "paste", canvas, n_img)
  obj = _pair(data["object"], "object", canvas, n_img) if data.get("object") is not None else None
  query = _pair(data["query"], "query", canvas, n_img) if data.get("query") is not None else None
  method = data.get("method", "zca")
  if method not in METHODS:
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
  rank = _positive_int(data.get("rank", 1), "rank")
  if method == "mean" and rank != 1:
    raise ValueError(f"rank: method 'mean' gives rank 1, got {rank}")
  shrinkage = check_shrinkage(data.get("shrinkage", 0.0), method)
  taps = data.get("taps", "all")
  if taps not in TAPS:
    raise ValueError(f"taps: expected one of {TAPS}, got {taps!r}")
  erase_units = _positive_int(data.get("erase_units", 30), "erase_units")
  solver = dict(DEFAULT_SOLVER)
  given = data.get("solver", {})
  if not isinstance(given, dict):
    raise ValueError(f"solver: expected an object, got {type(given).__name__}")
  unknown = sorted(set(given) - set(DEFAULT_SOLVER))
  if unknown:
    raise ValueError(f"solver: expected fields among {sorted(DEFAULT_SOLVER)}, got {unknown}")
  solver.update(given)
  if solver["optimizer"] not in OPTIMIZERS:
    raise ValueError(f"solver.optimizer: expected one of {OPTIMIZERS}, got "
                     f"{solver['optimizer']!r}")
  if solver["loss"] not in LOSSES:
    raise ValueError(f"solver.loss: expected one of {LOSSES}, got {solver['loss']!r}")
  solver["steps"] = _positive_int(solver["steps"], "solver.steps")
  lr = solver["learning_rate"]
  if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
    raise ValueError(f"solver.learning_rate: expected a positive number, got {lr!r}")
  solver["learning_rate"] = float(lr)
  model = data.get("model")
  if model is not None and not isinstance(model, str):
    raise ValueError(f"model: expected a string or null, got {type(model).__name__}")
  return EditSpec(key=key, paste=paste, object=obj, query=query, layer=layer, model=model,
                  kind=kind, method=method, rank=rank, shrinkage=shrinkage, taps=taps,
                  erase_units=erase_units, canvas=canvas, num_images=n_img, solver=solver)


def spec_to_json(spec: EditSpec) -> dict:
  """The JSON object of a spec (masks as PNG data URLs), loadable by :func:`spec_from_json`."""
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
  """Reads and validates a JSON edit spec (keyword arguments as :func:`spec_from_json`).

  Raises:
    ValueError: the file is not JSON, or the spec is invalid (see :func:`spec_from_json`).
  """
  with open(path) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{os.fspath(path)}: expected a JSON edit spec, got invalid JSON ({e})"
                       ) from None
  return spec_from_json(data, **kwargs)


def save_spec(path: str | os.PathLike, spec: EditSpec) -> str:
  """Writes a spec as JSON atomically; returns the absolute path."""
  text = json.dumps(spec_to_json(spec), indent=1)
  _io.atomic_write_bytes(path, text.encode())
  return os.path.abspath(os.fspath(path))


def make_spec(*, key: Sequence[tuple[int, Any]], paste: tuple[int, Any], layer: str,
              object: tuple[int, Any] | None = None, query: tuple[int, Any] | None = None,
              **settings) -> EditSpec:
  """Builds and validates a spec from masks (uint8 or float arrays in [0, 1]).

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
