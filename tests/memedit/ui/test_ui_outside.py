"""The rewriting UI driven from outside, over real HTTP on loopback: request bodies a
hostile or broken client sends, image ranges in other scripts' digits, a diverged solve's
answer in standard JSON, and two downloads of one edit at once."""

from __future__ import annotations

import http.client
import io
import json
import socket
import threading
import time
import urllib.parse
import zipfile

import numpy as np
import pytest
from ui_helpers import BATCH, SAMPLES, box, url

import memedit
from memedit.ui.server import create_app, start_server
from memedit.ui.workspace import Workspace

LIMIT = 1 << 20


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
  """(app, host, port) of one threaded server on the tiny model for this module."""
  model, stats = tiny
  ws = Workspace.open(model, stats_dir=stats, samples=SAMPLES, batch_size=BATCH,
                      work_dir=str(tmp_path_factory.mktemp("outside") / "work"))
  ws.statistics("convt2")
  app = create_app(ws, layer="convt2", max_request_bytes=LIMIT)
  srv, base = start_server(app)
  u = urllib.parse.urlparse(base)
  yield app, u.hostname, u.port
  srv.shutdown()


def _strict(text):
  """JSON as a browser parses it: the bare words NaN and Infinity are refused."""
  def refuse(word):
    raise ValueError(f"not standard JSON: {word}")
  return json.loads(text, parse_constant=refuse)


def _request(server, method, path, body=None, raw=None, ctype="application/json"):
  _, host, port = server
  c = http.client.HTTPConnection(host, port, timeout=60)
  data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
  c.request(method, path, body=data, headers={"Content-Type": ctype} if ctype else {})
  r = c.getresponse()
  out = r.status, r.read()
  c.close()
  return out


def _json(server, method, path, body=None, **kw):
  status, data = _request(server, method, path, body, **kw)
  return status, _strict(data.decode())


def _raw_socket(server, data: bytes) -> tuple[int, dict]:
  """Sends ``data`` as it is, closes the sending side, and reads the answer."""
  _, host, port = server
  with socket.create_connection((host, port), timeout=30) as s:
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    out = b""
    while True:
      d = s.recv(65536)
      if not d:
        break
      out += d
  head, _, body = out.partition(b"\r\n\r\n")
  return int(head.split()[1]), _strict(body.decode())


def _new_session(server) -> str:
  status, info = _json(server, "POST", "/api/sessions", {})
  assert status == 200, info
  return f"/api/s/{info['session']}"


def _mark(server, S):
  for path, body in (("copy", {"imgnum": 3, "mask": url(box(16, 32, 16, 48))}),
                     ("paste", {"imgnum": 4, "mask": url(box(24, 40, 16, 48))}),
                     ("context", {"imgnum": 1, "mask": url(box(24, 40, 16, 48))})):
    status, out = _json(server, "POST", f"{S}/{path}", body)
    assert status == 200, out


def _run_job(server, S, path, body):
  status, j = _json(server, "POST", f"{S}/{path}", body)
  assert status == 202, j
  t_end = time.time() + 120
  while j["status"] == "running":
    assert time.time() < t_end, j
    time.sleep(0.02)
    status, j = _json(server, "GET", f"{S}/job?id={j['id']}")
    assert status == 200, j
  return j


def test_request_bodies_get_messages_naming_what_was_received(server):
  app, host, _ = server
  S = _new_session(server)
  store = app.config["MEMEDIT_STORE"]
  sess = store.get(S.rsplit("/", 1)[1])
  before = sess.state
  grid = f"{S}/grid"
  for raw, message in (
      # JSON would keep the last field only: one of two contradicting values, silently.
      (b'{"images": "0", "images": "1-3"}',
       "expected each field of the JSON object once, got 'images' more than once"),
      (b'[{"images": "0"}]', "expected a JSON object body, got a list"),
      (b'"0-3"', "expected a JSON object body, got a string"),
      (b'', "malformed JSON (an empty body)"),
      (b'{"images": "0-3"', "malformed JSON (Expecting ',' delimiter at offset 16)"),
      (b'{"images": "0\xff"}', "the byte 0xff at offset 13 is not UTF-8"),
      (b'{"images": [' + b"9" * 5000 + b']}', "malformed JSON (a number too long to read"),
  ):
    status, out = _json(server, "POST", grid, raw=raw)
    assert status == 400 and message in out["error"], (raw[:40], out)
  status, out = _json(server, "POST", grid, raw=b'{"images": "0"}', ctype="text/plain")
  assert status == 400 and "got Content-Type 'text/plain'" in out["error"], out
  # A misspelt optional field was ignored and its default used: Execute ran with the
  # default settings, Matches at the default quantile.
  for path, body, message in (
      ("execute", {"setting": {"rank": 2}}, "expected fields among ['settings'], got unknown "
       "['setting']"),
      ("matches", {"images": "0-3", "quantle": 0.5}, "expected fields among ['images', "
       "'quantile', 'settings'], got unknown ['quantle']"),
      ("grid", {"images": "0-1", "which": "original", "whcih": 1}, "got unknown ['whcih']"),
      ("revert_all", {"all": True}, "expected fields among [], got unknown ['all']")):
    status, out = _json(server, "POST", f"{S}/{path}", body)
    assert status == 400 and message in out["error"], (path, out)
  assert sess.jobs.get() is None

  # A body shorter than its Content-Length: the connection closes before the rest.
  head = (f"POST {grid} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
          "Content-Length: 100\r\n\r\n").encode()
  status, out = _raw_socket(server, head + b'{"images": "0-1"}')
  assert status == 400, out
  assert "expected a body of 100 bytes (Content-Length), got fewer" in out["error"], out

  # A chunked body (no Content-Length) past the limit: 413, not cut at the limit and
  # then read as malformed JSON (or, padded with spaces, accepted).
  for pad, want in ((LIMIT, 413), (100, 200)):
    body = b'{"images": "0-1"}' + b" " * pad
    head = (f"POST {grid} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()
    status, out = _raw_socket(server, head + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
    assert status == want, out
    if want == 413:
      assert f"at most {LIMIT} bytes" in out["error"], out
    else:
      assert out["images"] == [0, 1]
  assert sess.state is before
  assert _json(server, "GET", f"{S}/state")[0] == 200


def test_image_ranges_refuse_other_scripts_digits(server):
  S = _new_session(server)
  # int() reads '٣' (Arabic-Indic three) as 3, '1_0' as 10 and '+3' as 3.
  for text, odd in (("\u0663", "'\u0663'"), ("1_0", "'_'"), ("+3", "'+'"),
                    ("0-\uff13", "'\uff13'")):
    status, out = _json(server, "POST", f"{S}/grid", {"images": text})
    assert status == 400, (text, out)
    assert "ASCII digits" in out["error"] and odd in out["error"], out
  status, out = _json(server, "POST", f"{S}/grid", {"images": " 1 , 3-4"})
  assert status == 200 and out["images"] == [1, 3, 4], out


def test_a_diverged_solve_answers_in_standard_json(server):
  S = _new_session(server)
  _mark(server, S)
  # Adam with a learning rate this large goes to inf and NaN at its first step: the job
  # fails with the solver's advice, and every answer still parses as JSON in a browser.
  settings = {"solver": {"optimizer": "adam", "steps": 3, "learning_rate": 1e38}}
  j = _run_job(server, S, "execute", {"settings": settings})
  assert j["status"] == "error" and "a smaller learning_rate" in j["error"], j
  assert len(j["losses"]) == 3 and np.isfinite(j["losses"][0])
  assert any(x is None for x in j["losses"]), j["losses"]
  status, info = _json(server, "GET", f"{S}/state")
  assert status == 200 and info["job"]["losses"] == j["losses"] and info["edits"] == []


def test_two_downloads_of_one_edit_do_not_rewrite_it_while_zipped(server, monkeypatch):
  app = server[0]
  S = _new_session(server)
  _mark(server, S)
  j = _run_job(server, S, "execute",
               {"settings": {"solver": {"optimizer": "gauss_newton", "steps": 2}}})
  assert j["status"] == "done", j
  edit = app.config["MEMEDIT_STORE"].get(S.rsplit("/", 1)[1]).state.edits[0].edit

  zipping, go, second_save = threading.Event(), threading.Event(), threading.Event()
  saves = []
  real_write, real_save = zipfile.ZipFile.write, memedit.save_edit

  def slow_write(self, *args, **kwargs):  # the first download pauses inside its zip
    if not zipping.is_set():
      zipping.set()
      go.wait(10)
    return real_write(self, *args, **kwargs)

  def spy_save(*args, **kwargs):
    saves.append(1)
    if len(saves) == 2:
      second_save.set()
    return real_save(*args, **kwargs)

  monkeypatch.setattr(zipfile.ZipFile, "write", slow_write)
  monkeypatch.setattr(memedit, "save_edit", spy_save)
  got = {}

  def download(name):
    got[name] = _request(server, "GET", f"{S}/edits/e1/edit.zip")

  first = threading.Thread(target=download, args=("first",))
  first.start()
  assert zipping.wait(30)
  second = threading.Thread(target=download, args=("second",))
  second.start()
  # The second download must not replace the folder the first is reading.
  rewritten = second_save.wait(1.0)
  go.set()
  first.join(60)
  second.join(60)
  assert not rewritten
  for name in ("first", "second"):
    status, data = got[name]
    assert status == 200, (name, data[:200])
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
      names = zf.namelist()
      top = names[0].split("/")[0]
      assert all(n.startswith(top + "/") for n in names)
      folder = server[0].config["MEMEDIT_STORE"].ws.work_dir + f"/check-{name}"
      zf.extractall(folder)
    loaded = memedit.load_edit(f"{folder}/{top}")  # checks every file's sha256
    assert loaded.name == edit.name
    np.testing.assert_array_equal(np.asarray(loaded.lam), np.asarray(edit.lam))
