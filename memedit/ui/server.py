"""The rewriting UI's web server: a Flask app over :mod:`memedit.ui.session`.

Why Flask: the work behind every request is synchronous JAX computation (rendering a
grid, solving an edit) that holds a CPU or an accelerator, so an asynchronous framework
(Starlette with uvicorn) would only move it to a thread pool. Flask is the plainest
well-kept framework for that: routing, JSON bodies, request size limits
(``MAX_CONTENT_LENGTH``), trusted ``Host`` names and static files come with it; its test
client needs nothing more; and Werkzeug's threaded server, which Flask depends on,
serves requests concurrently, so the page keeps polling a job's progress while the job
runs in its own thread (:mod:`memedit.ui.jobs`). It is an optional extra,
``memedit[ui]``; the library itself keeps its six dependencies.

The API is JSON over HTTP under ``/api``; a session is created by ``POST /api/sessions``
and addressed as ``/api/s/<id>/...`` (the page keeps its id across reloads). Long
operations answer 202 with a job, polled by ``GET .../job?id=<job>`` (without ``id``:
the session's latest job, which a reloaded page shows again, with its Cancel button
while it runs) and cancelled by ``POST .../job/cancel`` with ``{"id": <job>}`` (202: it
stops at the end of its current chunk of work and ends "cancelled", having changed
nothing). Errors are JSON ``{"error": message}`` with status 400 (bad input; nothing
changed), 404 (unknown session, job or route), 409 (a job is still running, or a job to
cancel has ended), 413 (request too large, chunked bodies included) or 500 (a bug; the
server stays up). Answers are standard JSON: a non-finite number (a diverged solve's
loss) is sent as null. Only JSON object bodies are read (``Content-Type:
application/json``, each field once, none the route does not read), so a page of another
site cannot send requests a browser would not first ask about; on a loopback address
only loopback ``Host`` names are answered (no DNS rebinding). Files are written only
under the session's work folder, under names the server makes, and removed with it when
the session goes or the server stops.
"""

from __future__ import annotations

import ipaddress
import json
import math
import numbers
import os
import re
import threading
from typing import Any

from flask import (Flask, Response, abort, current_app, jsonify, request,
                   send_from_directory)
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import ClientDisconnected, HTTPException, RequestEntityTooLarge

from memedit.specs import got, shown
from memedit.specs.text import DuplicateField, unique_fields
from memedit.ui.blas import limit_blas_threads
from memedit.ui.jobs import Busy, Finished, error_text
from memedit.ui.session import Session, SessionStore
from memedit.ui.workspace import Workspace, grid_limit, parse_imgnums

__all__ = ["MAX_REQUEST_BYTES", "create_app", "is_loopback", "serve", "start_server"]

MAX_REQUEST_BYTES = 16 << 20
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")  # the usual ones; see is_loopback
_PORT = re.compile(r"[0-9]{1,5}")


def is_loopback(host: str) -> bool:
  """Whether ``host`` (an address to listen on, as ``--host`` gives it) names this machine
  only: ``localhost``, or a loopback address written out: any of 127.0.0.0/8, or ``::1``
  or an IPv4-mapped ``::ffff:127.x.y.z`` (an IPv6 address in brackets or not). Other
  names are not looked up: they count as not loopback.

  Example:
    >>> [is_loopback(h) for h in ("127.0.0.2", "[::1]", "localhost", "0.0.0.0", "10.1.2.3")]
    [True, True, True, False, False]
  """
  if not isinstance(host, str):
    return False
  bracketed = host.startswith("[") and host.endswith("]")
  name = host[1:-1] if bracketed else host
  if name.lower() == "localhost" and not bracketed:
    return True
  try:
    address = ipaddress.ip_address(name)
  except ValueError:
    return False
  if bracketed and address.version != 6:
    return False
  mapped = getattr(address, "ipv4_mapped", None)
  return (mapped or address).is_loopback


def _loopback_host(host: str) -> bool:
  """Whether a request's ``Host`` header names this machine by a loopback name: one that
  :func:`is_loopback` accepts (an IPv6 address in brackets, as browsers send it), with a
  port or without. A DNS-rebinding page's Host is its own name, never one of these.
  (Werkzeug's TRUSTED_HOSTS cuts each trusted name at its first colon, so that it could
  never match "[::1]" and refused every request to ::1.)"""
  if host.startswith("["):
    end = host.find("]") + 1
    name, rest = (host[:end], host[end:]) if end else (host, "")
  else:
    name, colon, port = host.partition(":")
    rest = colon + port
  if rest and not (rest[0] == ":" and _PORT.fullmatch(rest[1:])):
    return False
  return is_loopback(name)


def _finite(value: Any) -> Any:
  """``value`` with every non-finite float (a diverged solve's losses) as None."""
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {k: _finite(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite(v) for v in value]
  return value


class _StrictJSON(DefaultJSONProvider):
  """Answers in standard JSON: NaN and ±inf, which Python writes as the bare words NaN
  and Infinity that a browser's JSON parser refuses, are sent as null."""

  def dumps(self, obj: Any, **kwargs: Any) -> str:
    return super().dumps(_finite(obj), allow_nan=False, **kwargs)


def _kind(value: Any) -> str:
  return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
          type(None): "null"}.get(type(value), "a number")


def _raw_body() -> bytes:
  """The request's body; RequestEntityTooLarge when a body without a Content-Length
  (chunked) goes past the limit (the limited stream would stop there silently)."""
  try:
    raw = request.get_data(cache=True)
  except ClientDisconnected:
    raise ValueError(f"request: expected a body of {request.content_length} bytes "
                     "(Content-Length), got fewer before the connection closed") from None
  limit = current_app.config["MAX_CONTENT_LENGTH"]
  if request.content_length is None and limit is not None and len(raw) >= limit:
    if request.environ["wsgi.input"].read(1):
      raise RequestEntityTooLarge()
  return raw


def _body(*fields: str) -> dict:
  """The request's JSON object, whose fields must be among ``fields`` (a misspelt
  optional field would otherwise be ignored, its default used without a word)."""
  if not request.is_json:
    raise ValueError("request: expected a JSON body (Content-Type: application/json), got "
                     f"Content-Type {(request.content_type or 'none')[:60]!r}")
  raw = _raw_body()
  try:
    data = json.loads(raw, object_pairs_hook=unique_fields)
  except DuplicateField as e:
    raise ValueError(f"request: expected each field of the JSON object once, got "
                     f"{shown(e.args[0])} more than once") from None
  except RecursionError:
    raise ValueError("request: expected a JSON object body, got lists or objects nested "
                     "deeper than the parser allows (about 1000 levels)") from None
  except UnicodeDecodeError as e:
    raise ValueError(f"request: expected a JSON object body in UTF-8, got malformed JSON: "
                     f"the byte 0x{raw[e.start]:02x} at offset {e.start} is not UTF-8") from None
  except json.JSONDecodeError as e:
    what = "an empty body" if not raw.strip() else f"{e.msg} at offset {e.pos}"
    raise ValueError(f"request: expected a JSON object body, got malformed JSON ({what})"
                     ) from None
  except ValueError as e:  # an integer literal longer than Python converts (4300 digits)
    raise ValueError(f"request: expected a JSON object body, got malformed JSON (a number "
                     f"too long to read: {str(e).split(';')[0]})") from None
  if not isinstance(data, dict):
    raise ValueError(f"request: expected a JSON object body, got {_kind(data)}")
  unknown = [k for k in data if k not in fields]
  if unknown:
    raise ValueError(f"request: expected fields among {list(fields)}, got unknown "
                     f"{[k[:40] for k in unknown[:8]]}")
  return data


def _need(data: dict, *names: str) -> list[Any]:
  missing = [n for n in names if n not in data]
  if missing:
    raise ValueError(f"request: expected fields {list(names)}, missing {missing}")
  return [data[n] for n in names]


def create_app(workspace: Workspace, *, layer: str, loopback_only: bool = True,
               max_request_bytes: int = MAX_REQUEST_BYTES, sessions: int = 8,
               blas_threads: int | None = 1) -> Flask:
  """The Flask app of the rewriting UI on ``workspace``.

  Args:
    workspace: the shared :class:`memedit.ui.workspace.Workspace`.
    layer: the layer new sessions start on.
    loopback_only: answer only requests whose Host is a loopback name (``localhost``, an
      address of 127.0.0.0/8 or ``[::1]``, with a port or without): a server listening
      on a loopback address (:func:`is_loopback`) is then not reachable by DNS
      rebinding.
    max_request_bytes: the largest request body accepted (413 above).
    sessions: sessions kept at once (the least recently used beyond go).
    blas_threads: OpenBLAS threads of this process (:func:`memedit.ui.blas.
      limit_blas_threads`; its LAPACK calls are small), unless ``OPENBLAS_NUM_THREADS``
      is set; None leaves them as they are.

  Returns:
    The app; ``app.config["MEMEDIT_STORE"]`` is its :class:`SessionStore`.

  Raises:
    ValueError: ``sessions`` or ``max_request_bytes`` is not a positive integer (0
      sessions would let go of each session as it is made; a limit of 0 bytes would
      refuse every request).
  """
  for name, value in (("sessions", sessions), ("max_request_bytes", max_request_bytes)):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
      raise ValueError(f"{name}: expected a positive integer, got "
                       f"{got(value, numbers.Integral)}")
  if blas_threads is not None and "OPENBLAS_NUM_THREADS" not in os.environ:
    limit_blas_threads(blas_threads)
  app = Flask("memedit.ui", static_folder=STATIC, static_url_path="/static")
  app.json = _StrictJSON(app)
  max_request_bytes = int(max_request_bytes)
  app.config["MAX_CONTENT_LENGTH"] = max_request_bytes
  app.json.sort_keys = False
  if loopback_only:
    @app.before_request
    def loopback_host():  # before routing's answers too (404, 405, redirects)
      host = request.headers.get("Host")
      if host is None:  # HTTP/1.0 without one: the address the server listens on
        host = request.host
      if not _loopback_host(host):
        abort(400, description=f"Host {shown(host)} is not trusted: this server answers "
              "only loopback names (localhost, 127.x.y.z, [::1]); start it with --host to "
              "serve others")

  store = SessionStore(workspace, layer, limit=int(sessions))
  app.config["MEMEDIT_STORE"] = store
  R = workspace.resolution

  def session(sid: str) -> Session:
    try:
      return store.get(sid)
    except KeyError:
      abort(404, description="session: unknown or expired session; reload the page")

  @app.errorhandler(ValueError)
  def bad_input(e):
    return jsonify(error=" ".join(str(e).split())), 400

  @app.errorhandler(Busy)
  def busy(e):
    return jsonify(error=str(e)), 409

  @app.errorhandler(Finished)
  def finished(e):
    return jsonify(error=str(e)), 409

  @app.errorhandler(HTTPException)
  def http_error(e):
    if e.code == 413:
      return jsonify(error=f"request: too large; at most {max_request_bytes} bytes are "
                     "accepted"), 413
    return jsonify(error=f"{e.name}: {e.description}"), e.code

  @app.errorhandler(Exception)
  def internal(e):
    app.logger.exception("request failed")
    return jsonify(error=f"internal error: {error_text(e)}"), 500

  @app.get("/")
  def index():
    return send_from_directory(STATIC, "index.html")

  @app.post("/api/sessions")
  def new_session():
    _body()
    return jsonify(store.create().info())

  @app.get("/api/s/<sid>/state")
  def state(sid):
    return jsonify(session(sid).info())

  @app.get("/api/statistics")
  def statistics():
    return jsonify({n: workspace.stats_status(n) for n in workspace.layers})

  @app.post("/api/s/<sid>/grid")
  def grid(sid):
    data = _body("images", "which")
    nums = parse_imgnums(_need(data, "images")[0], grid_limit(R))
    images = session(sid).grid(nums, data.get("which", "current"))
    return jsonify(images=nums, urls=images)

  @app.post("/api/s/<sid>/layer")
  def layer_(sid):
    return jsonify(session(sid).set_layer(*_need(_body("layer"), "layer")))

  @app.post("/api/s/<sid>/copy")
  def copy(sid):
    return jsonify(session(sid).copy(*_need(_body("imgnum", "mask"), "imgnum", "mask")))

  @app.post("/api/s/<sid>/paste")
  def paste(sid):
    return jsonify(session(sid).paste(*_need(_body("imgnum", "mask"), "imgnum", "mask")))

  @app.post("/api/s/<sid>/context")
  def add_context(sid):
    s = session(sid)
    cid = s.add_context(*_need(_body("imgnum", "mask"), "imgnum", "mask"))
    return jsonify(id=cid, context=s.info()["context"])

  @app.post("/api/s/<sid>/context/remove")
  def remove_context(sid):
    s = session(sid)
    s.remove_context(*_need(_body("id"), "id"))
    return jsonify(context=s.info()["context"])

  @app.post("/api/s/<sid>/matches")
  def matches(sid):
    data = _body("images", "quantile", "settings")
    nums = parse_imgnums(_need(data, "images")[0], grid_limit(R))
    out = session(sid).matches(nums, data.get("quantile", 0.999), data.get("settings"))
    return jsonify(images=nums, **out)

  def job_response(job):
    return jsonify(job.snapshot()), 202

  @app.post("/api/s/<sid>/execute")
  def execute(sid):
    return job_response(session(sid).execute(_body("settings").get("settings")))

  @app.post("/api/s/<sid>/erase")
  def erase(sid):
    data = _body("imgnum", "mask", "settings")
    imgnum, mask = _need(data, "imgnum", "mask")
    return job_response(session(sid).erase(imgnum, mask, data.get("settings")))

  @app.post("/api/s/<sid>/overfit")
  def overfit(sid):
    data = _body("steps", "learning_rate", "settings")
    return job_response(session(sid).overfit(data.get("steps", 2000),
                                             data.get("learning_rate", 0.01),
                                             data.get("settings")))

  @app.post("/api/s/<sid>/search")
  def search(sid):
    data = _body("count", "top", "settings", "start")
    return job_response(session(sid).search(data.get("count", 1000), data.get("top", 32),
                                            data.get("settings"), data.get("start", 0)))

  @app.post("/api/s/<sid>/replay")
  def replay(sid):
    return job_response(session(sid).replay(*_need(_body("spec"), "spec")))

  @app.post("/api/s/<sid>/evaluate")
  def evaluate(sid):
    data = _body("edit", "images", "quantile")
    eid, images = _need(data, "edit", "images")
    return job_response(session(sid).evaluate(eid, images, data.get("quantile", 0.99)))

  @app.get("/api/s/<sid>/job")
  def job(sid):
    jid = request.args.get("id")
    j = session(sid).jobs.get(jid)
    if j is None:
      abort(404, description="job: no such job in this session" if jid is not None else
            "job: this session has not started a job")
    return jsonify(j.snapshot())

  @app.post("/api/s/<sid>/job/cancel")
  def cancel_job(sid):
    s = session(sid)
    jid, = _need(_body("id"), "id")
    if not isinstance(jid, str):
      raise ValueError(f"id: expected a job id (a string, as the job's answers give it), got "
                       f"{_kind(jid)}")
    j = s.jobs.get(jid)
    if j is None:
      abort(404, description=f"job: no such job in this session: {jid[:40]!r}")
    j.cancel()
    return jsonify(j.snapshot()), 202

  @app.post("/api/s/<sid>/edits/<eid>/active")
  def set_active(sid, eid):
    s = session(sid)
    s.set_active(eid, *_need(_body("active"), "active"))
    return jsonify(edits=s.info()["edits"])

  @app.post("/api/s/<sid>/edits/<eid>/revert")
  def revert(sid, eid):
    _body()
    s = session(sid)
    s.drop(eid)
    return jsonify(edits=s.info()["edits"])

  @app.post("/api/s/<sid>/revert_all")
  def revert_all(sid):
    _body()
    s = session(sid)
    s.revert_all()
    return jsonify(edits=s.info()["edits"])

  @app.get("/api/s/<sid>/edits/<eid>/spec.json")
  def spec(sid, eid):
    text = json.dumps(session(sid).spec_json(eid), indent=1)
    return Response(text, mimetype="application/json", headers={
        "Content-Disposition": f'attachment; filename="{_safe(eid)}-spec.json"'})

  @app.get("/api/s/<sid>/edits/<eid>/edit.zip")
  def edit_zip(sid, eid):
    data, name = session(sid).edit_archive(eid)
    return Response(data, mimetype="application/zip", headers={
        "Content-Disposition": f'attachment; filename="{_safe(name)}"'})

  return app


def _safe(name: str) -> str:
  return "".join(c for c in str(name) if c.isalnum() or c in "-_.")[:80] or "download"


def _make_server(app: Flask, host: str, port: int):
  from werkzeug.serving import WSGIRequestHandler, make_server

  class Quiet(WSGIRequestHandler):
    """Logs errors only, not every request (the page polls progress several times a second)."""

    def log_request(self, code="-", size="-"):
      if str(code)[:1] == "5":
        super().log_request(code, size)

  return make_server(host, port, app, threaded=True, request_handler=Quiet)


def _url(host: str, port: int) -> str:
  shown = f"[{host}]" if ":" in host else host
  return f"http://{shown}:{port}/"


def start_server(app: Flask, host: str = "127.0.0.1", port: int = 0):
  """Starts ``app`` on a threaded Werkzeug server in a daemon thread.

  Returns:
    (server, url): ``server.shutdown()`` stops it; ``url`` has the bound port (useful
    with ``port=0``, which picks a free one).
  """
  server = _make_server(app, host, port)
  threading.Thread(target=server.serve_forever, name="memedit-ui-server", daemon=True).start()
  return server, _url(host, server.server_port)


def serve(app: Flask, host: str = "127.0.0.1", port: int = 8000, announce=None) -> None:
  """Serves ``app`` on a threaded Werkzeug server until interrupted (Ctrl-C), then
  cancels its sessions' running jobs and waits for them (:meth:`SessionStore.close`);
  ``announce(url)`` is called once the port is bound."""
  server = _make_server(app, host, port)
  if announce is not None:
    announce(_url(host, server.server_port))
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
    store = app.config.get("MEMEDIT_STORE")
    if store is not None:  # running jobs stop at the end of their chunk of work
      store.close()
