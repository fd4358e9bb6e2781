"""The rewriting UI's server stopped and its sessions let go: Ctrl-C while a layer's
statistics are collected, work folders removed when their session goes, and the Host
check on every loopback address."""

from __future__ import annotations

import glob
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import zipfile

import numpy as np
import pytest
from ui_helpers import BATCH, SAMPLES, box, url

import memedit
from memedit.stream import Stopped, stop_when, stream_covariance
from memedit.ui import server as ui_server
from memedit.ui.__main__ import main as ui_main
from memedit.ui.server import create_app, is_loopback, start_server
from memedit.ui.workspace import Workspace


def _wait_for(predicate, what, timeout=120.0):
  t_end = time.time() + timeout
  while not predicate():
    assert time.time() < t_end, f"{what}: not within {timeout} s"
    time.sleep(0.05)


def _http_json(method, address, body=None):
  data = None if body is None else json.dumps(body).encode()
  req = urllib.request.Request(address, data=data, method=method,
                               headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=60) as r:
    return json.loads(r.read())


def test_stop_when_stops_a_stream_between_groups_and_leaves_the_cache_incomplete(tmp_path):
  batches = [np.full((2, 3), i, np.float32) for i in range(12)]
  seen = []

  def should_stop():  # asked before each group; stops before the third
    seen.append(1)
    return len(seen) > 2

  with stop_when(should_stop), pytest.raises(Stopped, match=r"before group 3 \(4 batches"):
    stream_covariance(batches, group=2, progress=False, cache_dir=str(tmp_path),
                      cache_key="k", prefetch=False)
  (meta,) = glob.glob(str(tmp_path / "**" / "meta.json"), recursive=True)
  with open(meta) as f:
    saved = json.load(f)
  assert saved["complete"] is False and saved["batches"] == 4
  # Outside the block (and in other threads) nothing is checked; the run resumes.
  state = stream_covariance(batches, group=2, progress=False, cache_dir=str(tmp_path),
                            cache_key="k")
  assert memedit.key_count(state) == 24
  with pytest.raises(TypeError, match="should_stop: expected a function"):
    with stop_when(True):
      pass


def test_ctrl_c_while_statistics_are_collected_exits_cleanly(tiny, tmp_path):
  # A collection thread inside a compiled computation when the interpreter exited
  # aborted the process; it now stops at the end of its group and the process exits 0.
  model, _ = tiny
  stats, work = tmp_path / "stats", tmp_path / "work"
  samples = 20000  # one latent per batch: many small groups, each saved in the cache
  err = open(tmp_path / "stderr.txt", "w+")
  proc = subprocess.Popen(
      [sys.executable, "-m", "memedit.ui", model, "--layer", "convt2", "--stats",
       str(stats), "--samples", str(samples), "--batch-size", "1", "--port", "0",
       "--work", str(work)], stdout=subprocess.PIPE, stderr=err, text=True)
  try:
    line = proc.stdout.readline()
    assert "open http://" in line, line
    base = line.split("open ", 1)[1].split()[0]
    _http_json("POST", base + "api/sessions", {})  # starts convt2's statistics

    def folding():
      status = _http_json("GET", base + "api/statistics")["convt2"]
      assert status["state"] == "running", status
      return status["fraction"] > 0

    _wait_for(folding, "the statistics collection")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == 0
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  err.seek(0)
  text = err.read()
  assert "Traceback" not in text and "Fatal" not in text, text[-3000:]
  metas = glob.glob(str(stats / "**" / "meta.json"), recursive=True)
  assert metas, "nothing was saved before the stop"
  for meta in metas:  # what was folded is kept, and not as if it were all
    with open(meta) as f:
      saved = json.load(f)
    assert saved["complete"] is False and 0 < saved["batches"] < samples, saved


def test_a_workspace_closed_stops_its_collection_and_starts_none(tiny, tmp_path):
  model, _ = tiny
  ws = Workspace.open(model, stats_dir=str(tmp_path / "stats"), samples=20000,
                      batch_size=1, work_dir=str(tmp_path / "work"))
  ws.ensure_statistics("convt1")
  _wait_for(lambda: ws.stats_status("convt1")["fraction"] > 0, "the collection")
  assert ws.close(timeout=60)
  assert ws.stats_status("convt1") == {"layer": "convt1", "state": "missing",
                                       "fraction": 0.0, "message": "stopped"}
  assert ws.ensure_statistics("convt3")["state"] == "missing"  # no thread started
  with pytest.raises(Stopped):
    ws.statistics("convt3")


def _marked_session_with_an_edit(http, sid):
  for path, body in (("copy", {"imgnum": 3, "mask": url(box(16, 32, 16, 48))}),
                     ("paste", {"imgnum": 4, "mask": url(box(24, 40, 16, 48))}),
                     ("context", {"imgnum": 1, "mask": url(box(24, 40, 16, 48))})):
    r = http.post(f"/api/s/{sid}/{path}", json=body)
    assert r.status_code == 200, r.get_json()
  r = http.post(f"/api/s/{sid}/execute",
                json={"settings": {"solver": {"optimizer": "gauss_newton", "steps": 2}}})
  assert r.status_code == 202, r.get_json()
  jid = r.get_json()["id"]
  _wait_for(lambda: http.get(f"/api/s/{sid}/job?id={jid}").get_json()["status"] != "running",
            "the execute job")
  assert http.get(f"/api/s/{sid}/job?id={jid}").get_json()["status"] == "done"


def test_work_folders_go_with_their_sessions(tiny, tmp_path, monkeypatch):
  model, stats = tiny
  ws = Workspace.open(model, stats_dir=stats, samples=SAMPLES, batch_size=BATCH,
                      work_dir=str(tmp_path / "work"))
  ws.statistics("convt2")
  app = create_app(ws, layer="convt2", sessions=1)
  store, http = app.config["MEMEDIT_STORE"], app.test_client()
  first = http.post("/api/sessions", json={}).get_json()["session"]
  _marked_session_with_an_edit(http, first)
  r = http.get(f"/api/s/{first}/edits/e1/edit.zip")
  assert r.status_code == 200
  folder = store.get(first).folder
  assert os.listdir(os.path.join(folder, "edits")), "the download wrote nothing"

  # A download still zipping when its session goes: it ends whole, then its files go.
  zipping, go = threading.Event(), threading.Event()
  real_write = zipfile.ZipFile.write

  def slow_write(self, *args, **kwargs):
    if not zipping.is_set():
      zipping.set()
      go.wait(30)
    return real_write(self, *args, **kwargs)

  monkeypatch.setattr(zipfile.ZipFile, "write", slow_write)
  got = {}
  downloading = threading.Thread(target=lambda: got.setdefault(
      "zip", app.test_client().get(f"/api/s/{first}/edits/e1/edit.zip")))
  downloading.start()
  assert zipping.wait(30)
  made = threading.Thread(target=lambda: got.setdefault(
      "second", app.test_client().post("/api/sessions", json={})))
  made.start()  # the first session goes (one is kept)
  made.join(0.5)
  assert made.is_alive(), "the folder was removed while a download was reading it"
  assert os.path.isdir(folder)
  go.set()
  downloading.join(60)
  made.join(60)
  monkeypatch.undo()
  assert got["zip"].status_code == 200
  with zipfile.ZipFile(io.BytesIO(got["zip"].data)) as zf:
    assert zf.testzip() is None and any(n.endswith(".json") for n in zf.namelist())
  assert not os.path.exists(folder)
  assert http.get(f"/api/s/{first}/state").status_code == 404

  # Closing the store (the server stopping) removes the folders of the sessions kept.
  second = store.get(got["second"].get_json()["session"])
  os.makedirs(os.path.join(second.folder, "edits", "e1-x"))
  with open(os.path.join(second.folder, "edits", "e1-x", "lam.npy"), "wb") as f:
    f.write(b"x")
  assert store.close(timeout=30)
  assert not os.path.exists(second.folder)
  assert os.listdir(os.path.join(ws.work_dir, "sessions")) == []


def test_every_loopback_address_is_checked_for_its_host_name(client, monkeypatch, capsys):
  assert [is_loopback(h) for h in ("127.0.0.2", "127.255.255.254", "::1", "[::1]",
                                   "::ffff:127.0.0.9", "LocalHost")] == [True] * 6
  assert [is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "128.0.0.1", "[127.0.0.1]",
                                   "[localhost]", "127.0.0.1.example", "")] == [False] * 8
  # A real bind to 127.0.0.2: its own address is answered, another name is refused.
  app = create_app(client.session.ws, layer="convt2",
                   loopback_only=is_loopback("127.0.0.2"))
  srv, base = start_server(app, "127.0.0.2", 0)
  try:
    port = urllib.parse.urlparse(base).port
    assert _http_json("GET", base + "api/statistics")["convt2"]["state"] == "ready"
    req = urllib.request.Request(base + "api/statistics", headers={"Host": f"evil.example:{port}"})
    with pytest.raises(urllib.error.HTTPError) as e:
      urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 400 and "is not trusted" in json.loads(e.value.read())["error"]
  finally:
    srv.shutdown()
    srv.server_close()
  http = app.test_client()
  for host in ("127.0.0.2:8000", "127.255.255.254", "[::ffff:127.0.0.3]:80", "LOCALHOST:1"):
    assert http.get("/api/statistics", headers={"Host": host}).status_code == 200, host
  for host in ("127.0.0.2.evil.example", "127.0.0.2:80@evil.example", "[127.0.0.2]",
               "127.0.0.2:", "127.0.0.2:123456", "[::1]x", "[::1"):
    assert http.get("/api/statistics", headers={"Host": host}).status_code == 400, host

  # `memedit ui --host ADDRESS` checks the Host on every loopback address, and only there.
  served = {}

  def fake_serve(app, host, port, announce=None):
    served[host] = app

  monkeypatch.setattr(ui_server, "serve", fake_serve)
  monkeypatch.setattr(Workspace, "open", classmethod(lambda cls, *a, **k: client.session.ws))
  for host in ("127.0.0.2", "127.9.9.9", "::1", "0.0.0.0"):
    assert ui_main(["model", "--layer", "convt2", "--host", host, "--port", "0"]) == 0
  printed = capsys.readouterr().out
  assert "listening on 0.0.0.0" in printed and "listening on 127" not in printed
  for host, app in served.items():
    r = app.test_client().get("/api/statistics", headers={"Host": "evil.example"})
    assert r.status_code == (200 if host == "0.0.0.0" else 400), host
