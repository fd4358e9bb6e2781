"""What every session of one UI server shares: the generator, its statistics, its images.

A :class:`Workspace` holds the generator, each layer's second moment C = E[k kᵀ] (read
from the statistics cache that ``memedit stats`` writes, or collected on demand in a
background thread with its progress readable by every session), a byte-bounded cache of
rendered images keyed by the set of active edits, and the match scores of a fixed image
sample that set heat-map thresholds.

Limits keep one request from asking for unbounded work: :func:`grid_limit` images per
grid, :func:`search_limit` per Search and :func:`tray_limit` context examples per
session, shrinking with the square of the resolution.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import Counter, OrderedDict
from typing import Any, Sequence

import numpy as np

from memedit import specs
from memedit.stream import Stopped, stop_when
from memedit.ui import workflow as wf
from memedit.ui.jobs import error_text, stderr_progress

__all__ = ["THRESHOLD_IMAGES", "Workspace", "grid_limit", "parse_imgnums", "scaled_limit",
           "search_limit", "tray_limit"]

THRESHOLD_IMAGES = 256  # images whose match scores set the heat-map threshold quantile
_CACHE_BYTES = 256 << 20


def scaled_limit(limit: int, resolution: int, lo: int) -> int:
  """``limit`` at up to 64 px, shrinking with the square of the resolution, at least lo.

  Example:
    >>> scaled_limit(1024, 256, 16)
    64
  """
  return max(lo, limit * 64 ** 2 // max(int(resolution), 64) ** 2)


def grid_limit(resolution: int) -> int:
  """Most images one grid request may render (256 at 64 px, 16 at 256 px and above)."""
  return min(256, scaled_limit(256, resolution, 16))


def search_limit(resolution: int) -> int:
  """Most images one Search may rank (10000 at 64 px, 625 at 256 px, at least 256)."""
  return scaled_limit(10000, resolution, 256)


def tray_limit(resolution: int) -> int:
  """Most context examples one session's tray holds (256 at 64 px, 32 at 181 px and
  above): each is a canvas-sized mask kept in memory and a thumbnail in every answer
  that shows the tray, so that adding one costs as much as the tray holds."""
  return min(256, scaled_limit(256, resolution, 32))


def parse_imgnums(value: Any, limit: int, where: str = "images") -> list[int]:
  """Image numbers from text like ``"200-231,5"`` or a JSON list of integers.

  Raises:
    ValueError: malformed text, numbers outside [0, MAX_IMAGES), a descending range, a
      number given twice, or more than ``limit`` images (counted before any list is
      built).

  Example:
    >>> parse_imgnums("3-5,9", 10)
    [3, 4, 5, 9]
  """
  if isinstance(value, list):
    if len(value) > limit:
      raise ValueError(f"{where}: expected at most {limit} images, got {len(value)}")
    for n in value:
      if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < specs.MAX_IMAGES:
        raise ValueError(f"{where}: expected image numbers in [0, {specs.MAX_IMAGES}), got "
                         f"{specs.shown(n)}")
    if not value:
      raise ValueError(f"{where}: expected image numbers, got an empty list")
    repeated = sorted(n for n, c in Counter(value).items() if c > 1)
    if repeated:
      raise ValueError(f"{where}: expected distinct image numbers, got {repeated[:8]} more "
                       f"than once")
    return [int(n) for n in value]
  if not isinstance(value, str) or len(value) > 2000:
    raise ValueError(f"{where}: expected numbers or ranges like '200-231,5', got "
                     f"{specs.shown(value)}")
  # Imported here: memedit.cli's package imports the ui's subcommand.
  from memedit.cli.checks import imgnums

  return imgnums(value, limit, flag=where)


def _digest(a) -> str:
  a = np.ascontiguousarray(np.asarray(a))
  return hashlib.sha256(str((a.shape, a.dtype)).encode() + a.tobytes()).hexdigest()[:24]


class Workspace:
  """The generator and what every session of a server shares.

  Args:
    gen: the generator (from :func:`memedit.ui.workflow.open_generator`).
    name: the model's name (written into specs).
    stats_dir: statistics cache folder (as ``memedit stats --cache-dir``), or None.
    samples, batch_size: the latent sample C is collected from (as ``memedit stats``).
    work_dir: folder for the sessions' files (edits written for download).
  """

  def __init__(self, gen, *, name: str, stats_dir: str | None, samples: int = 1000,
               batch_size: int = 50, work_dir: str):
    self.gen = gen
    about = wf.describe(gen)
    self.layers = about["layers"]
    self.resolution = about["resolution"]
    self.architecture = about["architecture"]
    self.params = about["params"]
    self.name = name
    self.stats_dir = stats_dir
    self.samples = int(samples)
    self.batch_size = int(batch_size)
    self.work_dir = os.path.abspath(work_dir)
    self.solve_seconds: dict = {}
    self._lock = threading.Lock()
    self._layer_locks = {n: threading.Lock() for n in self.layers}
    self._C: dict[str, np.ndarray] = {}
    self._status: dict[str, dict] = {}
    self._images: OrderedDict = OrderedDict()
    self._image_bytes = 0
    self._scores: OrderedDict = OrderedDict()
    self._closing = threading.Event()
    self._collectors: set[threading.Thread] = set()

  @classmethod
  def open(cls, model: str, *, truncation: float | None = None, **kwargs) -> "Workspace":
    """A workspace on a converted checkpoint directory (as ``memedit rewrite`` takes)."""
    name = os.path.basename(os.path.normpath(model))
    return cls(wf.open_generator(model, truncation), name=name, **kwargs)

  def check_layer(self, layer: Any) -> str:
    """``layer`` if it is one of the generator's layers, else ValueError naming them."""
    if not isinstance(layer, str) or layer not in self.layers:
      raise ValueError(f"layer: expected one of {self.layers}, got {specs.shown(layer)}")
    return layer

  # -- statistics --------------------------------------------------------------------------

  def stats_status(self, layer: str) -> dict:
    """{"layer", "state": ready | running | missing | error, "fraction", "message"}."""
    with self._lock:
      if layer in self._C:
        return {"layer": layer, "state": "ready", "fraction": 1.0, "message": ""}
      return {"layer": layer, "state": "missing", "fraction": 0.0, "message": "",
              **self._status.get(layer, {})}

  def ensure_statistics(self, layer: str) -> dict:
    """Starts reading or collecting the layer's statistics in a background thread unless
    they are ready or on their way (or the workspace is closed); returns
    :meth:`stats_status`."""
    with self._lock:
      start = (layer not in self._C and self._status.get(layer, {}).get("state") != "running"
               and not self._closing.is_set())
      if start:
        self._status[layer] = {"state": "running", "fraction": 0.0, "message": ""}
    if start:
      def run():
        try:
          self.statistics(layer)
        except Exception:  # noqa: BLE001 - statistics() records it in the status
          pass
        finally:
          with self._lock:
            self._collectors.discard(thread)

      thread = threading.Thread(target=run, name=f"memedit-ui-stats-{layer}", daemon=True)
      with self._lock:
        self._collectors.add(thread)
      thread.start()
    return self.stats_status(layer)

  def close(self, timeout: float = 30.0) -> bool:
    """Stops the statistics being collected (at the end of their current group of
    batches; the cache keeps what was saved, marked incomplete, and a later run resumes
    from it) and waits up to ``timeout`` seconds for their threads; True when they have
    all ended. Statistics asked for afterwards stop at once (:class:`memedit.stream.
    Stopped`). A server stopping calls it: the process exiting while a collection is
    inside a compiled computation would abort it (SIGABRT).
    """
    self._closing.set()
    t_end = time.time() + timeout
    with self._lock:
      threads = list(self._collectors)
    for t in threads:
      t.join(max(0.0, t_end - time.time()))
    return not any(t.is_alive() for t in threads)

  def statistics(self, layer: str, report=None) -> np.ndarray:
    """C (C_in, C_in) float32 of ``layer``: from memory, the cache, or collected now;
    ``report(fraction)`` is called as batches are folded.

    Raises:
      memedit.stream.Stopped: the workspace was closed (:meth:`close`) before the
        collection ended; the layer's status is "missing" again.
    """
    self.check_layer(layer)
    with self._layer_locks[layer]:
      with self._lock:
        if layer in self._C:
          return self._C[layer]
        self._status[layer] = {"state": "running", "fraction": 0.0, "message": ""}

      def progress(done, total):
        with self._lock:
          self._status[layer]["fraction"] = done / max(total, 1)
        if report is not None:
          report(done / max(total, 1))

      try:
        if self._closing.is_set():
          raise Stopped(f"statistics of {layer}: not collected, the workspace is closed")
        with stderr_progress(progress), stop_when(self._closing.is_set):
          C = wf.collect_statistics(self.gen, layer, self.samples, self.batch_size,
                                    self.stats_dir)
      except Stopped:
        with self._lock:
          self._status[layer] = {"state": "missing", "fraction": 0.0, "message": "stopped"}
        raise
      except Exception as e:
        message = error_text(e) if isinstance(e, OSError) else " ".join(str(e).split())
        with self._lock:
          self._status[layer] = {"state": "error", "fraction": 0.0, "message": message}
        raise
      with self._lock:
        self._C[layer] = C
      return C

  def ready_statistics(self, layer: str) -> np.ndarray:
    """C of ``layer`` if it is in memory; else starts it and raises a ValueError saying
    how far it is."""
    with self._lock:
      if layer in self._C:
        return self._C[layer]
    status = self.ensure_statistics(layer)
    raise ValueError(f"statistics: the statistics of layer {layer!r} are not ready yet "
                     f"({status['state']}, {100 * status['fraction']:.0f}%); try again when "
                     "the progress bar is full")

  # -- images and scores -------------------------------------------------------------------

  def render(self, key: tuple, params: Any, imgnums: Sequence[int]) -> list[np.ndarray]:
    """uint8 (R, R, C) images of ``imgnums`` with ``params`` (which ``key`` names),
    rendering those not cached in one batch."""
    with self._lock:
      have = {n: self._images.get((key, n)) for n in imgnums}
    todo = sorted(n for n, im in have.items() if im is None)
    if todo:
      images = wf.render(self.gen, todo, params)
      with self._lock:
        for n, im in zip(todo, images):
          have[n] = im
          if (key, n) not in self._images:
            self._images[(key, n)] = im
            self._image_bytes += im.nbytes
        while self._image_bytes > _CACHE_BYTES and self._images:
          _, old = self._images.popitem(last=False)
          self._image_bytes -= old.nbytes
    return [have[n] for n in imgnums]

  def scores(self, layer: str, D: np.ndarray, imgnums: Sequence[int]) -> np.ndarray:
    """Match scores ‖D k‖ (N, h, h) of the images' keys at ``layer``."""
    return wf.match_scores(self.gen, layer, D, imgnums)

  def threshold(self, layer: str, D: np.ndarray, quantile: float) -> float:
    """The heat-map threshold: the ``quantile`` of match scores over the keys of images
    0..THRESHOLD_IMAGES-1 (their scores are cached per D)."""
    key = (layer, _digest(D))
    with self._lock:
      s = self._scores.get(key)
    if s is None:
      s = self.scores(layer, D, range(THRESHOLD_IMAGES))
      with self._lock:
        self._scores[key] = s
        while len(self._scores) > 8:
          self._scores.popitem(last=False)
    return wf.match_threshold(s, quantile)
