"""Pictures for the rewriting UI: PNG data URLs of images, heat-map overlays and crops.

Images travel to the page as PNG data URLs (lossless, so the page shows, and a test can
read back, the generator's exact uint8 pixels).
"""

from __future__ import annotations

import base64
import io

import numpy as np

__all__ = ["heat_overlay", "png_data_url"]

_PREFIX = "data:image/png;base64,"


def png_data_url(array) -> str:
  """A uint8 (H, W), (H, W, 3) or (H, W, 4) array as a PNG data URL.

  Example:
    >>> png_data_url(np.zeros((2, 2, 3), np.uint8)).startswith("data:image/png;base64,")
    True
  """
  from PIL import Image

  a = np.asarray(array)
  if a.dtype != np.uint8:
    raise ValueError(f"array: expected uint8 pixels, got {a.dtype}")
  if a.ndim == 3 and a.shape[2] == 1:
    a = a[:, :, 0]
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format="PNG", compress_level=1)
  return _PREFIX + base64.b64encode(buf.getvalue()).decode("ascii")


def heat_overlay(heat, color=(255, 40, 40), opacity: float = 0.75) -> np.ndarray:
  """An RGBA uint8 (H, W, 4) overlay of a heat map (H, W) in [0, 1] (score / threshold):
  ``color`` with alpha ``opacity · clip(2·heat − 1, 0, 1)``, i.e. clear below half the
  threshold and 255 · opacity where the match reaches it.

  Example:
    >>> heat_overlay(np.array([[0.0, 0.5, 0.75, 1.0]]))[0, :, 3].tolist()
    [0, 0, 96, 191]
  """
  h = np.clip(2.0 * np.asarray(heat, np.float64) - 1.0, 0.0, 1.0)
  out = np.zeros(h.shape + (4,), np.uint8)
  out[..., :3] = np.asarray(color, np.uint8)
  out[..., 3] = np.round(255.0 * opacity * h).astype(np.uint8)
  return out
