"""Fixtures of the rewriting UI's tests: the tiny DCGAN with its statistics, and a client
with a fresh session."""

from __future__ import annotations

import pytest
from ui_helpers import BATCH, SAMPLES, Client, tiny_checkpoint

from memedit.ui.server import create_app
from memedit.ui.workspace import Workspace


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
  """(model folder, statistics cache folder) with the statistics of convt2 collected."""
  tmp = tmp_path_factory.mktemp("ui")
  model = tiny_checkpoint(tmp / "model")
  ws = Workspace.open(model, stats_dir=str(tmp / "stats"), samples=SAMPLES, batch_size=BATCH,
                      work_dir=str(tmp / "work"))
  ws.statistics("convt2")
  return model, str(tmp / "stats")


@pytest.fixture
def client(tiny, tmp_path):
  """A client with a fresh session on the tiny model (statistics read from the cache)."""
  model, stats = tiny
  ws = Workspace.open(model, stats_dir=stats, samples=SAMPLES, batch_size=BATCH,
                      work_dir=str(tmp_path / "work"))
  ws.statistics("convt2")
  app = create_app(ws, layer="convt2", max_request_bytes=1 << 20)
  sid = app.test_client().post("/api/sessions", json={}).get_json()["session"]
  return Client(app, sid)
