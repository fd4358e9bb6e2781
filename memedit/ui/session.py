"""One person's rewriting session: its state behind a lock, and its operations.

A :class:`Session` holds a :class:`memedit.ui.state.State` behind a lock. Each operation
checks its input before it changes anything (a bad request leaves the session as it
was), computes outside the lock, and publishes the new state in one assignment. The
long operations (Execute, Erase, the overfit baseline, Search, replaying a spec,
evaluating an edit) run as background jobs (:mod:`memedit.ui.jobs`) whose progress the
page polls, while other requests are served. A job asked to stop does so at its next
check (between chunks of solver steps, batches of images, or phases), before it
publishes anything, so a cancelled job leaves the session as it was.

Every edit is solved on the *original* generator, exactly as ``memedit rewrite`` solves
the spec the page saves: a saved spec replays to the identical edit. Edits are combined
on the parameters additively (:mod:`memedit.ui.state`), so each can be switched on and
off, or reverted, on its own and in any order.

:class:`SessionStore` keeps a server's sessions by random id. Calls into the workflow go
through :mod:`memedit.ui.workflow`.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import numbers
import os
import secrets
import shutil
import threading
import time
import zipfile
from collections import OrderedDict
from typing import Any

import jax
import numpy as np

import memedit
from memedit import _io
from memedit import generators as gens
from memedit import specs
from memedit.ui import state as st
from memedit.ui import workflow as wf
from memedit.ui.images import heat_overlay, png_data_url
from memedit.ui.jobs import Finished, Job, JobSlot, solve_progress, thin_losses
from memedit.ui.workspace import (Workspace, grid_limit, parse_imgnums, scaled_limit,
                                  search_limit, tray_limit)

__all__ = ["PICTURED", "SETTINGS", "Session", "SessionStore"]

#: Execute settings the page may send; the rest of a spec comes from the session's state.
SETTINGS = ("method", "rank", "shrinkage", "taps", "erase_units", "solver")
PICTURED = 8  # before/after pairs drawn for an evaluation


def _check_quantile(q: Any) -> float:
  if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q < 1:
    raise ValueError(f"quantile: expected a number in (0, 1), got {specs.shown(q)}")
  return float(q)


def _check_settings(settings: Any) -> dict:
  if settings is None:
    return {}
  if not isinstance(settings, dict):
    raise ValueError(f"settings: expected an object, got {type(settings).__name__}")
  unknown = sorted(k for k in settings if k not in SETTINGS)
  if unknown:
    raise ValueError(f"settings: expected fields among {list(SETTINGS)}, got "
                     f"{specs.shown(unknown)}")
  return dict(settings)


class Session:
  """One person's rewriting session on a :class:`Workspace`.

  Args:
    workspace: the shared workspace.
    sid: the session's id.
    layer: the layer to start on.
  """

  def __init__(self, workspace: Workspace, sid: str, layer: str):
    self.ws = workspace
    self.id = sid
    self.lock = threading.RLock()
    self.state = st.new_state(workspace.check_layer(layer), workspace.resolution,
                              workspace.params)
    self.jobs = JobSlot()
    self.last_used = time.time()
    self._directions: OrderedDict = OrderedDict()
    self._files = threading.Lock()  # the work folder: written by downloads, removed by close
    self._closed = False
    workspace.ensure_statistics(layer)

  def close(self) -> None:
    """Asks the session's running job, if any, to stop (:meth:`memedit.ui.jobs.Job.cancel`;
    a job already publishing its result ends as it would) and removes the session's work
    folder. The folder holds only the edits written for a download (the page got them as
    zip files), so nothing a person kept is lost; a download still being written removes
    its files when it ends."""
    job = self.jobs.get()
    if job is not None:
      try:
        job.cancel()
      except Finished:
        pass
    with self._files:
      self._closed = True
      self._remove_folder()

  def _remove_folder(self) -> None:
    """Removes the work folder (held under ``_files``); a failure is logged, not raised:
    the session goes either way."""
    try:
      shutil.rmtree(self.folder)
    except FileNotFoundError:  # never written (no download), or removed already
      pass
    except OSError as e:
      logging.getLogger(__name__).warning("could not remove a session's work folder: %s", e)

  @property
  def folder(self) -> str:
    """The session's work folder (under the workspace's work folder)."""
    return os.path.join(self.ws.work_dir, "sessions", self.id)

  def snapshot(self) -> st.State:
    """The current state (a value: later changes do not affect it)."""
    with self.lock:
      return self.state

  def _commit(self, fn) -> st.State:
    with self.lock:
      self.state = fn(self.state)
      return self.state

  def region(self, imgnum: Any, mask: Any) -> st.Region:
    """A validated region from an image number and a PNG data URL at canvas size."""
    R = self.ws.resolution
    if isinstance(mask, str):
      mask = specs.data_url_to_mask(mask, "mask", size=R)
    elif not isinstance(mask, np.ndarray):  # a JSON number, list or object from the page
      raise ValueError(f"mask: expected a PNG data URL ('data:image/png;base64,...') of the "
                       f"{R}x{R} canvas, got {type(mask).__name__}")
    return st.make_region(imgnum, mask, R)

  # -- views -------------------------------------------------------------------------------

  def _thumb(self, region: st.Region) -> str:
    img = self.ws.render((), self.ws.params, [region.imgnum])[0].astype(np.float32)
    a = region.mask.astype(np.float32)[..., None] / 255.0 * 0.55
    tint = np.array([255.0, 220.0, 0.0], np.float32)
    return png_data_url(np.round(img * (1 - a) + tint * a).astype(np.uint8))

  def info(self) -> dict:
    """Everything the page shows besides images: layers and their statistics, the
    marked regions, the context tray, the edits and the current job."""
    s = self.snapshot()
    R = self.ws.resolution
    job = self.jobs.get()
    return {
        "session": self.id, "model": self.ws.name, "resolution": R,
        "architecture": self.ws.architecture, "layer": s.layer, "layers": self.ws.layers,
        "statistics": {name: self.ws.stats_status(name) for name in self.ws.layers},
        "copy": None if s.copy is None else {"imgnum": s.copy.imgnum,
                                             "thumb": self._thumb(s.copy)},
        "paste": None if s.paste is None else {"imgnum": s.paste.imgnum},
        "context": [{"id": cid, "imgnum": r.imgnum, "thumb": self._thumb(r)}
                    for cid, r in s.context],
        "edits": [self._edit_view(r) for r in s.edits],
        "job": None if job is None else job.snapshot(),
        "limits": {"grid": grid_limit(R), "search": search_limit(R),
                   "context": tray_limit(R),
                   "steps": specs.MAX_STEPS, "images": specs.MAX_IMAGES},
        "defaults": {"method": "zca", "rank": 1, "shrinkage": 0.0, "taps": "all",
                     "erase_units": 30, "solver": dict(specs.DEFAULT_SOLVER),
                     "quantile": 0.999, "overfit_steps": 2000, "overfit_learning_rate": 0.01},
    }

  @staticmethod
  def _edit_view(r: st.EditRecord) -> dict:
    settings = r.edit.settings
    return {"id": r.id, "kind": r.kind, "layer": r.layer, "active": r.active,
            "name": r.edit.name, "method": r.edit.method, "rank": r.edit.rank,
            "optimizer": settings.get("optimizer"), "steps": settings.get("steps"),
            "loss_before": r.loss_before, "loss_after": r.loss_after,
            "seconds": round(r.seconds, 3), "losses": thin_losses(r.losses),
            "has_spec": r.spec is not None, "can_evaluate": r.directions is not None,
            "settings": None if r.spec is None else {
                "method": r.spec.method, "rank": r.spec.rank, "shrinkage": r.spec.shrinkage,
                "taps": r.spec.taps, "erase_units": r.spec.erase_units,
                "solver": dict(r.spec.solver)}}

  def grid(self, imgnums: list[int], which: str = "current") -> list[str]:
    """PNG data URLs of ``imgnums`` with the session's parameters ("current") or the
    original ones ("original")."""
    if which not in ("current", "original"):
      raise ValueError(f"which: expected 'current' or 'original', got {specs.shown(which)}")
    s = self.snapshot()
    if which == "original":
      key, params = (), s.original
    else:
      key, params = st.active_key(s), s.params
    return [png_data_url(im) for im in self.ws.render(key, params, imgnums)]

  # -- marking -----------------------------------------------------------------------------

  def copy(self, imgnum: Any, mask: Any) -> dict:
    """Copy: the region's values at the layer; returns their box on the canvas."""
    region = self.region(imgnum, mask)
    layer = self.snapshot().layer
    box = wf.copy_box(self.ws.gen, layer, (region.imgnum, region.mask))
    self._commit(lambda s: st.with_copy(s, region))
    return {"imgnum": region.imgnum, "box": box, "thumb": self._thumb(region)}

  def paste(self, imgnum: Any, mask: Any) -> dict:
    """Paste: sets the target and returns a preview of image ``imgnum`` with the copied
    values written at the layer (the rule the edit will learn), and the pasted box."""
    region = self.region(imgnum, mask)
    s = self.snapshot()
    if s.copy is None:
      raise ValueError("paste: nothing copied yet; paint an object and press Copy first")
    image, box = wf.paste_preview(self.ws.gen, s.layer, (s.copy.imgnum, s.copy.mask),
                                  (region.imgnum, region.mask))
    self._commit(lambda s: st.with_paste(s, region))
    return {"imgnum": region.imgnum, "preview": png_data_url(image), "box": box}

  def add_context(self, imgnum: Any, mask: Any) -> str:
    """Adds a context example to the tray; returns its id."""
    region = self.region(imgnum, mask)
    most, out = tray_limit(self.ws.resolution), {}

    def add(s):  # checked under the lock: requests at once cannot pass the limit together
      if len(s.context) >= most:
        raise ValueError(f"context: expected at most {most} examples in the tray, got one "
                         "more; remove some (click an example) first")
      s, out["id"] = st.add_context(s, region)
      return s

    self._commit(add)
    return out["id"]

  def remove_context(self, cid: Any) -> None:
    """Removes context example ``cid`` from the tray."""
    self._commit(lambda s: st.remove_context(s, cid))

  def set_layer(self, layer: Any) -> dict:
    """Edits ``layer`` from now on; starts its statistics if needed."""
    layer = self.ws.check_layer(layer)
    self._commit(lambda s: st.with_layer(s, layer))
    return self.ws.ensure_statistics(layer)

  # -- queries -----------------------------------------------------------------------------

  def _spec(self, s: st.State, settings: dict, kind: str = "insert",
            paste: st.Region | None = None):
    if not s.context:
      raise ValueError("context: the context tray is empty; paint the kind of region the "
                       "rule should apply to on a few images and press Add context")
    if kind == "insert" and (s.copy is None or s.paste is None):
      raise ValueError("execute: copy an object and paste it first (Copy, then Paste)")
    paste = paste if paste is not None else s.paste
    nums = [r.imgnum for _, r in s.context] + [paste.imgnum] + (
        [s.copy.imgnum] if kind == "insert" else [])
    n_img = 10000 if max(nums) < 10000 else specs.MAX_IMAGES
    return self._check_rank(specs.make_spec(
        key=[(r.imgnum, r.mask) for _, r in s.context], paste=(paste.imgnum, paste.mask),
        object=(s.copy.imgnum, s.copy.mask) if kind == "insert" else None, layer=s.layer,
        model=self.ws.name, kind=kind, canvas=self.ws.resolution, num_images=n_img,
        **_check_settings(settings)))

  def _check_rank(self, spec):
    """The spec, once its rank is known to fit its layer's keys (refused before a job
    starts rather than failing inside it)."""
    info = gens.layer_info(self.ws.gen, spec.layer)
    if spec.rank > info.key_dim:
      raise ValueError(f"rank: expected at most {info.key_dim} (the key dimension C_in of "
                       f"layer {spec.layer!r}), got {spec.rank}")
    # The context keys with positive weight, from the masks alone (no forward pass).
    covered = sum(int((gens.mask_at(m, info.key_res) > 0).sum())
                  for _, m in spec.masks("key"))
    if spec.rank > covered:
      raise ValueError(f"rank: expected at most the number of context keys the tray's masks "
                       f"cover at layer {spec.layer!r} ({covered}), got {spec.rank}")
    return spec

  @staticmethod
  def _directions_key(s: st.State, spec) -> tuple:
    return (s.layer, tuple(c for c, _ in s.context), spec.method, spec.rank, spec.shrinkage)

  def _keep_directions(self, key: tuple, D: np.ndarray) -> None:
    with self.lock:
      self._directions[key] = D
      while len(self._directions) > 16:
        self._directions.popitem(last=False)

  def directions(self, s: st.State, settings: dict) -> np.ndarray:
    """D (r, C_in) of the context tray with the settings' method, rank and shrinkage
    (cached per tray and settings; Execute reuses it)."""
    if not s.context:
      self._spec(s, settings)  # raises the empty tray's message
    spec = self._spec(s, settings, kind="erase", paste=s.context[0][1])
    C = self.ws.ready_statistics(s.layer)
    key = self._directions_key(s, spec)
    with self.lock:
      D = self._directions.get(key)
    if D is None:
      D = wf.context_directions(self.ws.gen, s.layer, C, [(r.imgnum, r.mask)
                                                          for _, r in s.context],
                                method=spec.method, rank=spec.rank,
                                shrinkage=spec.shrinkage)
      self._keep_directions(key, D)
    return D

  def matches(self, imgnums: list[int], quantile: Any, settings: Any = None) -> dict:
    """Heat maps of where the context matches on ``imgnums``: score / threshold clipped
    to [0, 1], the threshold at ``quantile`` of a sample's scores."""
    q = _check_quantile(quantile)
    s = self.snapshot()
    D = self.directions(s, _check_settings(settings))
    thr = self.ws.threshold(s.layer, D, q)
    scores = self.ws.scores(s.layer, D, imgnums)
    heat = wf.heatmaps(scores, thr, self.ws.resolution)
    return {"threshold": thr, "quantile": q,
            "best": [float(x) for x in scores.reshape(len(imgnums), -1).max(-1)],
            "overlays": [png_data_url(heat_overlay(h)) for h in heat]}

  # -- jobs --------------------------------------------------------------------------------

  def _record(self, job: Job, kind: str, layer: str, out: wf.Outcome, spec, D,
              seconds: float, regions=None) -> dict:
    job.check()
    for a in jax.tree_util.tree_leaves(out.edit):  # Λ and D
      if not np.isfinite(np.asarray(a)).all():
        raise ValueError(f"{kind}: the solve gave non-finite values; no edit was made "
                         "(lower the learning rate or change the regions)")
    rec = st.EditRecord("", kind, layer, out.edit, spec, None if D is None else np.asarray(D),
                        out.target_value, np.asarray(out.losses), out.loss_before,
                        out.loss_after, float(seconds))

    def commit(s):
      if regions:  # a dict, or a function of the state at commit time giving one
        s = dataclasses.replace(s, **(regions(s) if callable(regions) else regions))
      return st.add_edit(s, rec)

    job.seal()  # from here on the job cannot be cancelled: it publishes its edit
    s = self._commit(commit)
    view = self._edit_view(s.edits[-1])
    job.report(phase="done", fraction=1.0, losses=view["losses"])
    return {"edit": view}

  def _statistics_for(self, job: Job, layer: str) -> np.ndarray:
    """C of ``layer``, waiting for the workspace's collection (started if needed) while
    the job may be cancelled; the collection goes on for the next job when it is."""
    job.report(phase="statistics", fraction=0.0, message=f"statistics of {layer}")
    status = self.ws.ensure_statistics(layer)
    while status["state"] == "running":
      job.check()
      job.report(fraction=status["fraction"])
      time.sleep(0.05)
      status = self.ws.stats_status(layer)
    job.check()
    if status["state"] == "error":
      raise ValueError(f"statistics: collecting the statistics of layer {layer!r} failed: "
                       f"{status['message']}")
    return self.ws.ready_statistics(layer)

  def _solve_phase(self, job: Job, key: tuple, message: str) -> float:
    job.check()
    job.report(phase="solving", fraction=None, message=message,
               expected=self.ws.solve_seconds.get(key))
    return time.perf_counter()

  def _run_spec(self, job: Job, spec, regions=None, dkey: tuple | None = None) -> dict:
    """Solves ``spec`` with the solve's progress on ``job``; ``dkey``: the directions
    cache's key of the spec's context (its D is reused when cached, and kept)."""
    C = self._statistics_for(job, spec.layer)
    key = (spec.layer, spec.kind, spec.solver["optimizer"], spec.solver["steps"])
    t0 = self._solve_phase(job, key, f"{spec.kind}: {spec.solver['optimizer']}, "
                                     f"{spec.solver['steps']} steps")
    with self.lock:
      D = None if dkey is None else self._directions.get(dkey)
    out = wf.run_spec(self.ws.gen, spec, C, directions=D,
                      progress=solve_progress(job, spec.solver["steps"]))
    seconds = time.perf_counter() - t0
    self.ws.solve_seconds[key] = seconds
    if dkey is not None and D is None:
      self._keep_directions(dkey, out.directions)
    return self._record(job, spec.kind, spec.layer, out, spec, out.directions, seconds,
                        regions)

  def execute(self, settings: Any = None) -> Job:
    """Execute: solves the insert of the copied object at the paste target for the
    context tray (a background job)."""
    s = self.snapshot()
    spec = self._spec(s, _check_settings(settings))
    dkey = self._directions_key(s, spec)
    return self.jobs.start("execute", lambda job: self._run_spec(job, spec, dkey=dkey))

  def erase(self, imgnum: Any, mask: Any, settings: Any = None) -> Job:
    """Erase: the region's output with the most active context units zeroed becomes the
    target (a background job)."""
    region = self.region(imgnum, mask)
    s = self.snapshot()
    spec = self._spec(s, _check_settings(settings), kind="erase", paste=region)
    dkey = self._directions_key(s, spec)
    return self.jobs.start("erase", lambda job: self._run_spec(job, spec, dkey=dkey))

  def replay(self, text: Any) -> Job:
    """Loads a spec (JSON text in the reference's format) and replays it (a job); on
    success its regions become the session's copy, paste and context tray."""
    if not isinstance(text, str):
      raise ValueError(f"spec: expected the JSON text of a spec, got {type(text).__name__}")
    data = specs.parse_spec_text(text.encode("utf-8", "surrogatepass"), "spec")
    spec = self._check_rank(specs.spec_from_json(data, layers=self.ws.layers,
                                                 canvas=self.ws.resolution))
    most = tray_limit(self.ws.resolution)
    if len(spec.key) > most:  # its context becomes the tray
      raise ValueError(f"spec: expected at most {most} context regions ('key'), as the tray "
                       f"holds, got {len(spec.key)}")

    def regions(s):  # numbered at commit time: context ids are never reused
      ctx, n = [], s.counter
      for i, m in spec.key:
        n += 1
        ctx.append((f"c{n}", st.Region(int(i), m)))
      return {"layer": spec.layer, "context": tuple(ctx), "counter": n,
              "paste": st.Region(*spec.paste),
              "copy": st.Region(*spec.object) if spec.object is not None else s.copy}

    def run(job):
      self.ws.ensure_statistics(spec.layer)
      return self._run_spec(job, spec, regions)

    return self.jobs.start("replay", run)

  def overfit(self, steps: Any, learning_rate: Any, settings: Any = None) -> Job:
    """The paper's overfit baseline on the copy and paste (a background job)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= specs.MAX_STEPS:
      raise ValueError(f"steps: expected an integer in [1, {specs.MAX_STEPS}], got "
                       f"{specs.shown(steps)}")
    if (isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float))
        or not 0 < learning_rate < float("inf")):
      raise ValueError(f"learning_rate: expected a finite positive number, got "
                       f"{specs.shown(learning_rate)}")
    s = self.snapshot()
    if s.copy is None or s.paste is None:
      raise ValueError("overfit: copy an object and paste it first (Copy, then Paste)")
    settings = _check_settings(settings)
    D = self.directions(s, settings) if s.context else None

    def run(job):
      layer = s.layer
      t0 = self._solve_phase(job, (layer, "overfit", steps), f"overfit: adam, {steps} steps")
      out = wf.run_overfit(self.ws.gen, layer, (s.copy.imgnum, s.copy.mask),
                           (s.paste.imgnum, s.paste.mask), steps=steps,
                           learning_rate=float(learning_rate),
                           progress=solve_progress(job, steps))
      seconds = time.perf_counter() - t0
      self.ws.solve_seconds[(layer, "overfit", steps)] = seconds
      return self._record(job, "overfit", layer, out, None, D, seconds)

    return self.jobs.start("overfit", run)

  def search(self, count: Any, top: Any, settings: Any = None, start: Any = 0) -> Job:
    """Search: ranks images start..start+count-1 by their best match (a job); the result
    lists the ``top`` images and their scores."""
    R = self.ws.resolution
    for name, v, lo, hi in (("count", count, 1, search_limit(R)), ("top", top, 1, grid_limit(R)),
                            ("start", start, 0, specs.MAX_IMAGES - 1)):
      if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{name}: expected an integer in [{lo}, {hi}], got {specs.shown(v)}")
    if start + count > specs.MAX_IMAGES:
      raise ValueError(f"count: expected images below {specs.MAX_IMAGES}, got "
                       f"{start}..{start + count - 1}")
    s = self.snapshot()
    D = self.directions(s, _check_settings(settings))

    def run(job):
      nums = list(range(start, start + count))
      parts = []
      job.report(phase="ranking", fraction=0.0, message=f"{count} images")
      for i in range(0, count, 128):
        job.check()
        parts.append(self.ws.scores(s.layer, D, nums[i:i + 128]))
        job.report(fraction=min(i + 128, count) / count)
      ranking = wf.rank_by_match(np.concatenate(parts), nums)[:top]
      return {"images": [n for n, _ in ranking], "scores": [sc for _, sc in ranking]}

    return self.jobs.start("search", run)

  def evaluate(self, eid: Any, images: Any, quantile: Any = 0.99) -> Job:
    """The metrics of ``memedit evaluate`` for edit ``eid`` alone on held-out images, and
    a before/after strip of the first few (a job)."""
    q = _check_quantile(quantile)
    rec = st.find_edit(self.snapshot(), eid)
    if rec.directions is None:
      raise ValueError("evaluate: this baseline was made with an empty context tray, so it "
                       "has no context directions to measure matches with")
    nums = parse_imgnums(images, scaled_limit(1024, self.ws.resolution, 16))
    used = sorted(set(nums) & (rec.spec.imgnums() if rec.spec is not None else set()))
    if used:
      raise ValueError(f"images: expected held-out images the edit's spec does not use, "
                       f"got {used[:8]}")

    def run(job):
      job.check()
      job.report(phase="measuring", fraction=0.0, message=f"{len(nums)} images")

      def progress(done, total):  # between batches: the job may stop there
        job.report(fraction=done / total)
        job.check()

      m, strip = wf.evaluate(self.ws.gen, rec.layer, rec.directions, rec.edit, nums,
                             target_value=rec.target_value, quantile=q, pictured=PICTURED,
                             progress=progress)
      return {"edit": rec.id, "metrics": m, "strip": png_data_url(strip),
              "pictured": nums[:PICTURED]}

    return self.jobs.start("evaluate", run)

  # -- edits -------------------------------------------------------------------------------

  def set_active(self, eid: Any, active: Any) -> None:
    """Applies (``active``) or reverts edit ``eid``, exactly, in any order."""
    if not isinstance(active, bool):
      raise ValueError(f"active: expected true or false, got {specs.shown(active)}")
    self._commit(lambda s: st.set_active(s, eid, active))

  def drop(self, eid: Any) -> None:
    """Reverts edit ``eid`` and removes it from the list."""
    self._commit(lambda s: st.drop_edit(s, eid))

  def revert_all(self) -> None:
    """Reverts every edit (each stays in the list, switched off)."""
    self._commit(st.revert_all)

  def spec_json(self, eid: Any) -> dict:
    """The spec of edit ``eid`` in the reference's JSON format."""
    rec = st.find_edit(self.snapshot(), eid)
    if rec.spec is None:
      raise ValueError(f"edit {eid}: the overfit baseline has no spec in the reference's "
                       "format")
    return specs.spec_to_json(rec.spec)

  def edit_archive(self, eid: Any) -> tuple[bytes, str]:
    """(zip bytes, file name) of edit ``eid`` written by :func:`memedit.save_edit`
    (its factors Λ, D and provenance; never the model)."""
    rec = st.find_edit(self.snapshot(), eid)
    safe = "".join(c for c in f"{rec.id}-{rec.edit.name}" if c.isalnum() or c in "-_")[:80]
    folder = os.path.join(self.folder, "edits", safe)  # a name made here, under the folder
    buf = io.BytesIO()
    base = f"{rec.id}-{rec.kind}-{rec.layer}.edit"
    # Held until the zip is read: a second download of the edit would otherwise replace
    # the folder while this one is walking it, and closing the session remove it.
    with self._files, _io.path_lock(folder):
      try:
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        memedit.save_edit(folder, rec.edit, force=True)
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
          for root, _, files in os.walk(folder):
            for f in sorted(files):
              path = os.path.join(root, f)
              zf.write(path, os.path.join(base, os.path.relpath(path, folder)))
      finally:
        if self._closed:  # the session went while this download was asked for
          self._remove_folder()
    return buf.getvalue(), base + ".zip"


class SessionStore:
  """The sessions of one server by id; the least recently used beyond ``limit`` go."""

  def __init__(self, workspace: Workspace, layer: str, limit: int = 8):
    if isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1:
      raise ValueError(f"limit: expected a positive number of sessions, got "
                       f"{specs.got(limit, numbers.Integral)}")
    self.ws = workspace
    self.layer = workspace.check_layer(layer)
    self.limit = int(limit)
    self._lock = threading.Lock()
    self._sessions: OrderedDict[str, Session] = OrderedDict()
    self._stopping: list[Job] = []  # jobs of sessions that went, cancelled, not yet ended

  def create(self) -> Session:
    """A new session on the store's starting layer; the least recently used sessions
    beyond the limit go (:meth:`Session.close`): a job one of them is running is
    cancelled (nothing could read its result, and each would otherwise hold a thread and
    its memory to the end) and its work folder removed."""
    s = Session(self.ws, secrets.token_hex(8), self.layer)
    with self._lock:
      self._sessions[s.id] = s
      gone = []
      while len(self._sessions) > self.limit:
        gone.append(self._sessions.popitem(last=False)[1])
    for old in gone:
      old.close()
    with self._lock:
      self._stopping = [j for j in self._stopping + [old.jobs.get() for old in gone]
                        if j is not None and j.status == "running"]
    return s

  def close(self, timeout: float = 30.0) -> bool:
    """Cancels every running job (of the sessions kept and of those that went), removes
    the sessions' work folders, stops the workspace's statistics collections
    (:meth:`Workspace.close`) and waits up to ``timeout`` seconds in all for them to end;
    True when they all have. A server stopping calls it: the process exiting while a
    job's or a collection's thread is inside a compiled computation would abort it
    (SIGABRT) instead of ending it.
    """
    with self._lock:
      sessions = list(self._sessions.values())
      jobs = list(self._stopping)
    for s in sessions:
      s.close()
      jobs.append(s.jobs.get())
    t_end = time.time() + timeout
    ended = all(j.wait(max(0.0, t_end - time.time())) for j in jobs if j is not None)
    return self.ws.close(max(0.0, t_end - time.time())) and ended

  def get(self, sid: str) -> Session:
    """Session ``sid``; KeyError when unknown (expired or never made)."""
    with self._lock:
      s = self._sessions[sid]
      self._sessions.move_to_end(sid)
    s.last_used = time.time()
    return s
