"""The rewriting UI's server as an attacker or a careless client uses it: Host names
(loopback over IPv6, DNS rebinding), sessions pushed out while their job runs, a server
stopped while a job runs, this machine's paths in answers, and huge values echoed back."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from ui_helpers import box, url

from memedit.ui import server as ui_server
from memedit.ui import session as ui_session
from memedit.ui import workspace as ui_workspace
from memedit.ui.server import create_app

SECRET = "/home/someone/private/work"


def _slow(job):
  """A job's function that runs until cancelled (or 60 s), checking as real jobs do."""
  t_end = time.time() + 60
  while time.time() < t_end:
    job.check()
    time.sleep(0.01)
  return "not cancelled"


def test_loopback_hosts_over_ipv6_are_answered_and_others_refused(client):
  http = client.http
  # A server on ::1 is reached as http://[::1]:PORT/: Werkzeug's TRUSTED_HOSTS cut
  # "[::1]" at its first colon and refused every request.
  for host in ("[::1]:8000", "[::1]", "127.0.0.1:8000", "localhost:5000", "localhost"):
    r = http.get("/api/statistics", headers={"Host": host})
    assert r.status_code == 200, (host, r.get_json())
    assert r.get_json()["convt2"]["state"] == "ready"
  # A DNS-rebinding page sends its own name; refused before routing (no 404 or redirect
  # tells it which paths exist) and before any body is read.
  for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example",
               "[::1].evil.example", "localhost:80@evil.example", "[::2]:8000", ""):
    for method, path in (("GET", "/"), ("GET", "/nowhere"), ("GET", "/static//app.js"),
                         ("POST", f"/api/s/{client.sid}/revert_all")):
      r = http.open(path, method=method, json={}, headers={"Host": host})
      assert r.status_code == 400, (host, path, r.status_code)
      assert "is not trusted" in r.get_json()["error"] and "--host" in r.get_json()["error"]
  long = http.get("/", headers={"Host": "a" * 5000}).get_json()["error"]
  assert len(long) < 300, long
  # With --host given (not loopback), any Host is answered.
  app = create_app(client.session.ws, layer="convt2", loopback_only=False)
  assert app.test_client().get("/api/statistics",
                               headers={"Host": "evil.example"}).status_code == 200


def test_a_session_pushed_out_has_its_running_job_cancelled(client):
  app = create_app(client.session.ws, layer="convt2", sessions=2)
  http, store = app.test_client(), app.config["MEMEDIT_STORE"]
  first = http.post("/api/sessions", json={}).get_json()["session"]
  job = store.get(first).jobs.start("slow", _slow)
  http.post("/api/sessions", json={})
  assert job.status == "running"  # within the limit: kept, still working
  http.post("/api/sessions", json={})  # the first one goes
  assert http.get(f"/api/s/{first}/state").status_code == 404
  assert job.wait(10), "the job of a session that went kept running"
  assert job.status == "cancelled"


def test_stopping_the_server_cancels_running_jobs_and_waits_for_them(client, monkeypatch):
  # Ctrl-C with a job inside a compiled computation aborted the process (SIGABRT) when
  # the interpreter exited under the job's thread.
  app = create_app(client.session.ws, layer="convt2", sessions=1)
  store = app.config["MEMEDIT_STORE"]
  gone = store.create()
  gone_job = gone.jobs.start("slow", _slow)
  kept_job = store.create().jobs.start("slow", _slow)  # the first session goes here
  seen = {}

  class Interrupted:
    server_port = 0

    def serve_forever(self):
      seen["running"] = (gone_job.status, kept_job.status)
      raise KeyboardInterrupt

    def server_close(self):
      pass

  monkeypatch.setattr(ui_server, "_make_server", lambda *a: Interrupted())
  t0 = time.time()
  ui_server.serve(app, "127.0.0.1", 0)
  assert seen["running"][1] == "running"
  assert (gone_job.status, kept_job.status) == ("cancelled", "cancelled")
  assert time.time() - t0 < 10
  assert store.close(timeout=1)  # nothing left running: at once


def test_answers_do_not_carry_this_machine_s_paths(client, monkeypatch):
  def denied(*a, **k):
    raise PermissionError(13, "Permission denied", SECRET + "/sessions")

  # A request failing on a file: 500 with what went wrong, not where.
  monkeypatch.setattr(ui_workspace.wf, "render", denied)
  r = client.post("grid", {"images": "90-91"})
  assert r.status_code == 500
  error = r.get_json()["error"]
  assert "PermissionError: [Errno 13] Permission denied" in error and SECRET not in error
  # A job failing on a file.
  job = client.session.jobs.start("failing", denied)
  assert job.wait(10)
  assert job.snapshot()["error"] == "PermissionError: [Errno 13] Permission denied"
  # Statistics failing on a file (the page shows the layer's status message).
  monkeypatch.setattr(ui_workspace.wf, "collect_statistics", denied)
  assert client.post("layer", {"layer": "convt3"}).status_code == 200
  t_end = time.time() + 10
  while client.session.ws.stats_status("convt3")["state"] == "running":
    assert time.time() < t_end
    time.sleep(0.01)
  status = client.get("state").get_json()["statistics"]["convt3"]
  assert status["state"] == "error" and "Permission denied" in status["message"]
  assert SECRET not in status["message"]
  # A ValueError's message is the library's own and is kept whole.
  r = client.post("layer", {"layer": "convt9"})
  assert r.status_code == 400 and "got 'convt9'" in r.get_json()["error"]


@pytest.mark.parametrize("path, body", [
    ("layer", {"layer": "x" * 200_000}),
    ("layer", {"layer": [[[[[[["deep"] * 5000]]]]]]}),
    ("grid", {"images": "0", "which": "y" * 200_000}),
    ("grid", {"images": ["z" * 200_000]}),
    ("grid", {"images": {"a" * 200_000: 1}}),
    ("context/remove", {"id": "c" * 200_000}),
    ("copy", {"imgnum": list(range(50_000)), "mask": url(box(8, 24, 8, 24))}),
    ("matches", {"images": "0", "quantile": "q" * 200_000}),
    ("matches", {"images": "0", "settings": {"k" * 200_000: 1}}),
    ("overfit", {"steps": "s" * 200_000}),
    ("search", {"count": [0] * 50_000}),
    ("evaluate", {"edit": "e" * 200_000, "images": "0"}),
    ("edits/e1/active", {"active": "t" * 200_000}),
])
def test_messages_show_a_bounded_part_of_what_was_received(client, path, body):
  before = client.session.state
  r = client.post(path, body)
  assert r.status_code == 400, r.get_json()
  error = r.get_json()["error"]
  assert len(error) < 400, (path, len(error), error[:200])
  assert "expected" in error and "got" in error, error
  assert client.session.state is before


def test_server_limits_must_be_positive_integers(client):
  # 0 sessions let go of each session as it was made (every request then 404), a
  # negative number failed every new session with a 500, 0 bytes refused every request.
  ws = client.session.ws
  for kw, message in (({"sessions": 0}, "sessions: expected a positive integer, got 0"),
                      ({"sessions": -3}, "got -3"),
                      ({"sessions": 2.5}, "got the float 2.5"),
                      ({"sessions": True}, "got the bool True"),
                      ({"max_request_bytes": 0}, "max_request_bytes: expected a positive "
                       "integer, got 0"),
                      ({"max_request_bytes": "16"}, "got the str '16'")):
    with pytest.raises(ValueError, match=message):
      create_app(ws, layer="convt2", **kw)
  with pytest.raises(ValueError, match="limit: expected a positive number of sessions"):
    ui_session.SessionStore(ws, "convt2", limit=0)
  app = create_app(ws, layer="convt2", sessions=np.int64(1), max_request_bytes=np.int64(4096))
  http = app.test_client()
  sid = http.post("/api/sessions", json={}).get_json()["session"]
  assert http.get(f"/api/s/{sid}/state").status_code == 200
  r = http.post(f"/api/s/{sid}/grid", json={"images": "0", "which": "x" * 5000})
  assert r.status_code == 413 and "at most 4096 bytes" in r.get_json()["error"]


def test_the_context_tray_is_bounded(client, monkeypatch):
  # Each answer that shows the tray carries every example's thumbnail: a script adding
  # examples in a loop made each addition slower than the last (600 took 155 s, the
  # last answers 10 MB) and held every mask, without a limit.
  assert [ui_workspace.tray_limit(r) for r in (64, 128, 256, 1024)] == [256, 64, 32, 32]
  assert client.get("state").get_json()["limits"]["context"] == 256
  monkeypatch.setattr(ui_session, "tray_limit", lambda resolution: 3)
  m = url(box(24, 40, 16, 48))
  for n in (1, 2, 3):
    assert client.post("context", {"imgnum": n, "mask": m}).status_code == 200
  before = client.session.state
  r = client.post("context", {"imgnum": 4, "mask": m})
  assert r.status_code == 400
  error = r.get_json()["error"]
  assert "context: expected at most 3 examples in the tray, got one more" in error
  assert client.session.state is before
  # Removing one makes room again.
  assert client.post("context/remove", {"id": "c1"}).status_code == 200
  assert client.post("context", {"imgnum": 4, "mask": m}).get_json()["id"] == "c4"
  # A spec whose context would fill the tray past it is refused before a job starts.
  spec = {"key": [[n, m] for n in range(4)], "paste": [5, m], "object": [6, m],
          "layer": "convt2"}
  before = client.session.state
  r = client.post("replay", {"spec": json.dumps(spec)})
  assert r.status_code == 400, r.get_json()
  assert "spec: expected at most 3 context regions ('key')" in r.get_json()["error"]
  assert "got 4" in r.get_json()["error"]
  assert client.session.jobs.get() is None and client.session.state is before
