"""Helpers of the rewriting UI's tests: a tiny DCGAN with random weights (64 px, ngf 4),
masks as the page sends them, and a Flask test client bound to a session."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
from PIL import Image

from memedit import _io, specs
from ports.dcgan import variables_from_state_dict
from ports.dcgan.convert import expected_shapes

SAMPLES, BATCH = 64, 16


def tiny_checkpoint(path):
  """A converted DCGAN checkpoint (z 100, ngf 4, 3 channels) with seeded random weights."""
  rs = np.random.RandomState(0)
  sd = {}
  for name, shape in expected_shapes(100, 4, 3).items():
    if name.endswith("running_var"):
      sd[name] = (1.0 + 0.1 * np.abs(rs.standard_normal(shape))).astype(np.float32)
    elif name.endswith(".weight") and len(shape) == 1:
      sd[name] = (1.0 + 0.1 * rs.standard_normal(shape)).astype(np.float32)
    else:
      sd[name] = (0.2 * rs.standard_normal(shape)).astype(np.float32)
  variables, config = variables_from_state_dict(sd)
  return _io.save_tree(path, variables, config)


def box(y0, y1, x0, x1, size=64):
  """A uint8 mask with the box [y0, y1) × [x0, x1) marked."""
  m = np.zeros((size, size), np.uint8)
  m[y0:y1, x0:x1] = 255
  return m


def url(mask):
  """A mask as a PNG data URL, as the page sends it."""
  return specs.mask_to_data_url(mask)


def decode(data_url):
  """The pixels of a PNG data URL as a uint8 array."""
  raw = base64.b64decode(data_url.split(",", 1)[1])
  return np.asarray(Image.open(io.BytesIO(raw)))


class Client:
  """A test client bound to one session, with helpers for jobs."""

  def __init__(self, app, sid):
    self.app, self.sid, self.http = app, sid, app.test_client()

  @property
  def session(self):
    return self.app.config["MEMEDIT_STORE"].get(self.sid)

  def post(self, path, body=None, **kw):
    return self.http.post(f"/api/s/{self.sid}/{path}", json={} if body is None else body, **kw)

  def get(self, path):
    return self.http.get(f"/api/s/{self.sid}/{path}")

  def job(self, path, body=None, timeout=300):
    """Starts a job and waits for it; returns its final snapshot."""
    r = self.post(path, body)
    assert r.status_code == 202, r.get_json()
    jid = r.get_json()["id"]
    t_end = time.time() + timeout
    while time.time() < t_end:
      j = self.get(f"job?id={jid}").get_json()
      if j["status"] != "running":
        return j
      time.sleep(0.02)
    raise AssertionError(f"job {path} did not finish in {timeout} s")

  def grid(self, images, which="current"):
    r = self.post("grid", {"images": images, "which": which})
    assert r.status_code == 200, r.get_json()
    return [decode(u) for u in r.get_json()["urls"]]
