"""The rewriting UI's HTTP API on a tiny DCGAN: the happy path against the workflow, exact
toggles and reverts, replay through `memedit rewrite`, and bad input that changes nothing."""

from __future__ import annotations

import io
import json
import threading
import zipfile

import jax
import numpy as np
import pytest
from ui_helpers import BATCH, SAMPLES, box, decode, url

import memedit
from memedit.tree import get_leaf
from memedit import generators as gens
from memedit import metrics, specs
from memedit.cli import main as cli_main
from memedit.ui import add_subcommand, jobs
from memedit.ui.images import heat_overlay


def _images(client, nums, params=None):
  gen = client.session.ws.gen
  return gens.to_uint8(gens.generate_images(gen, gen.latents(nums), params=params))


def _mark(client):
  """Copy from image 3, paste on image 4, context on images 1 and 2."""
  assert client.post("copy", {"imgnum": 3, "mask": url(box(16, 32, 16, 48))}).status_code == 200
  assert client.post("paste", {"imgnum": 4, "mask": url(box(24, 40, 16, 48))}).status_code == 200
  for n in (1, 2):
    assert client.post("context", {"imgnum": n, "mask": url(box(24, 40, 16, 48))}).status_code == 200


def test_grid_copy_paste_preview_context_and_matches(client):
  gen = client.session.ws.gen
  nums = [0, 1, 2, 3, 10]
  np.testing.assert_array_equal(np.stack(client.grid("0-3,10")), _images(client, nums))
  np.testing.assert_array_equal(np.stack(client.grid(nums, "original")), _images(client, nums))

  # Copy and paste: the boxes are the workflow's at value resolution 16, times 4.
  f = lambda m: m.astype(np.float32) / 255
  copied = gens.copy_values(gen, "convt2", 3, f(box(16, 32, 16, 48)))
  target = gens.paste_target(gen, "convt2", copied, 4, f(box(24, 40, 16, 48)))
  r = client.post("copy", {"imgnum": 3, "mask": url(box(16, 32, 16, 48))}).get_json()
  assert r["box"] == [4 * v for v in copied.box]
  r = client.post("paste", {"imgnum": 4, "mask": url(box(24, 40, 16, 48))}).get_json()
  assert r["box"] == [4 * v for v in gens.bbox(target.full_alpha[0])]
  y0, y1, x0, x1 = r["box"]
  assert y0 <= 24 and y1 >= 40 and x0 <= 16 and x1 >= 48
  # The preview is image 4 with the copied values written at the layer's output.
  want = gens.run_layer(gen, "convt2", gen.latents([4]), paste_values=target.full_values,
                           paste_alpha=target.full_alpha).images
  preview = decode(r["preview"])
  np.testing.assert_array_equal(preview, gens.to_uint8(want)[0])
  assert np.abs(preview.astype(int) - _images(client, [4])[0]).max() > 0

  ids = [client.post("context", {"imgnum": n, "mask": url(box(24, 40, 16, 48))}).get_json()["id"]
         for n in (1, 2, 5)]
  r = client.post("context/remove", {"id": ids[2]}).get_json()
  assert [c["imgnum"] for c in r["context"]] == [1, 2]
  s = client.session.state
  assert (s.copy.imgnum, s.paste.imgnum) == (3, 4)

  # Heat maps: score / threshold with the threshold at the quantile of images 0..255's
  # scores; checked against float64 numpy from the layer's keys.
  m = client.post("matches", {"images": "0-7", "quantile": 0.99}).get_json()
  keys, weights = gens.context_keys(gen, "convt2", [(n, f(box(24, 40, 16, 48))) for n in (1, 2)])
  C = client.session.ws.statistics("convt2")
  D = np.asarray(gens.directions(C, keys, weights), np.float64)

  def scores(nums):
    k = gens.run_layer(gen, "convt2", gen.latents(nums)).keys.astype(np.float64)
    return np.sqrt(((k @ D.T) ** 2).sum(-1))

  thr = np.quantile(scores(list(range(256))), 0.99)
  assert m["threshold"] == pytest.approx(thr, rel=1e-5)
  s8 = scores(list(range(8)))
  np.testing.assert_allclose(m["best"], s8.reshape(8, -1).max(-1), rtol=1e-5)
  heat = np.clip(s8 / thr, 0, 1).repeat(8, 1).repeat(8, 2)
  alpha = np.stack([decode(u)[..., 3] for u in m["overlays"]]).astype(int)
  assert np.abs(alpha - heat_overlay(heat)[..., 3]).max() <= 1
  assert (alpha == 191).any()  # some keys reach the threshold


def test_execute_toggle_revert_in_any_order_and_replay(client, tmp_path, tiny):
  model, stats = tiny
  gen = client.session.ws.gen
  _mark(client)
  nums = list(range(8))
  original = _images(client, nums)
  settings = {"solver": {"optimizer": "gauss_newton", "steps": 5}, "taps": "own"}
  j = client.job("execute", {"settings": settings})
  assert j["status"] == "done", j
  e1 = j["result"]["edit"]
  assert e1["id"] == "e1" and e1["loss_after"] < e1["loss_before"] and e1["active"]
  edit1 = client.session.state.edits[0].edit
  edited1 = _images(client, nums, memedit.apply_edit(gen.params, edit1)[0])
  np.testing.assert_array_equal(np.stack(client.grid(nums)), edited1)
  assert np.abs(edited1.astype(int) - original).max() > 0

  # A second edit: erase a region of image 6 with the same context.
  j = client.job("erase", {"imgnum": 6, "mask": url(box(8, 24, 8, 24)),
                           "settings": {"solver": {"optimizer": "gauss_newton", "steps": 5},
                                        "erase_units": 4}})
  assert j["status"] == "done", j
  assert j["result"]["edit"]["kind"] == "erase"
  leaf = lambda: np.asarray(get_leaf(client.session.state.params,
                                             ("params", "convt2", "kernel")))
  both = leaf()
  k0 = np.asarray(get_leaf(gen.params, ("params", "convt2", "kernel")))
  # Each edit switched off and on in either order: the same bits; none: the original.
  for order in (["e1", "e2"], ["e2", "e1"]):
    for eid in order:
      assert client.post(f"edits/{eid}/active", {"active": False}).status_code == 200
    assert np.array_equal(leaf(), k0)
    np.testing.assert_array_equal(np.stack(client.grid(nums)), original)
    for eid in reversed(order):
      client.post(f"edits/{eid}/active", {"active": True})
    assert np.array_equal(leaf(), both)
  client.post("edits/e2/active", {"active": False})
  np.testing.assert_array_equal(np.stack(client.grid(nums)), edited1)
  client.post("revert_all")
  assert np.array_equal(leaf(), k0)
  client.post("edits/e1/active", {"active": True})

  # The saved spec replays through `memedit rewrite` to the identical edit.
  r = client.get("edits/e1/spec.json")
  assert r.status_code == 200 and "attachment" in r.headers["Content-Disposition"]
  spec_path = tmp_path / "spec.json"
  spec_path.write_bytes(r.data)
  assert set(json.loads(r.data)) >= {"key", "object", "paste"}
  assert cli_main(["rewrite", model, str(spec_path), "--out", str(tmp_path / "e.edit"),
                   "--samples", str(SAMPLES), "--batch-size", str(BATCH), "--cache-dir", stats,
                   "--no-progress"]) == 0
  replayed = memedit.load_edit(tmp_path / "e.edit")
  assert replayed.name == edit1.name
  for a, b in zip(jax.tree_util.tree_leaves(replayed), jax.tree_util.tree_leaves(edit1)):
    assert np.array_equal(np.asarray(a), np.asarray(b))  # Λ and D, bit for bit
  # The edit file: the factors, as memedit.save_edit writes them.
  r = client.get("edits/e1/edit.zip")
  with zipfile.ZipFile(io.BytesIO(r.data)) as zf:
    zf.extractall(tmp_path / "zip")
    top = zf.namelist()[0].split("/")[0]
  loaded = memedit.load_edit(tmp_path / "zip" / top)
  assert loaded.name == edit1.name and np.array_equal(np.asarray(loaded.lam),
                                                      np.asarray(edit1.lam))

  # Making the same edit again is refused; removed first, the uploaded spec replays to it.
  j = client.job("replay", {"spec": spec_path.read_text()})
  assert j["status"] == "error" and "already in this session as e1" in j["error"]
  assert client.post("edits/e1/revert").status_code == 200
  j = client.job("replay", {"spec": spec_path.read_text()})
  assert j["status"] == "done", j
  s = client.session.state
  assert s.edits[-1].edit.name == edit1.name and s.edits[-1].active
  assert [r.imgnum for _, r in s.context] == [1, 2] and s.copy.imgnum == 3
  np.testing.assert_array_equal(np.stack(client.grid(nums)), edited1)


def test_execute_shows_the_solve_s_progress_and_reuses_the_shown_directions(client,
                                                                           monkeypatch):
  from memedit.generators import from_spec
  from memedit.ui import session as session_mod
  _mark(client)
  settings = {"solver": {"optimizer": "gauss_newton", "steps": 7}, "taps": "own",
              "shrinkage": 0.1}
  assert client.post("matches", {"images": "0-3", "quantile": 0.99,
                                 "settings": settings}).status_code == 200
  shown = list(client.session._directions.values())
  assert len(shown) == 1
  computed, reports = [], []
  real_directions, real_progress = from_spec.context_directions, session_mod.solve_progress

  def spy_directions(*args, **kwargs):
    computed.append(1)
    return real_directions(*args, **kwargs)

  def spy_progress(job, steps):
    hook = real_progress(job, steps)

    def recorded(step, loss):
      hook(step, loss)
      snap = job.snapshot()
      reports.append((step, loss, snap["fraction"], snap["status"]))

    return recorded

  monkeypatch.setattr(from_spec, "context_directions", spy_directions)
  monkeypatch.setattr(session_mod, "solve_progress", spy_progress)
  j = client.job("execute", {"settings": settings})
  assert j["status"] == "done", j
  edit = j["result"]["edit"]
  # The solve reported every step while it ran, then the final loss, as the page shows.
  assert [r[0] for r in reports] == list(range(8))
  assert all(status == "running" for *_, status in reports)
  assert [r[2] for r in reports] == [t / 7 for t in range(8)]
  assert [r[1] for r in reports[:-1]] == edit["losses"]
  assert reports[-1][1] == pytest.approx(edit["loss_after"], rel=1e-4)
  assert (j["step"], j["steps"]) == (7, 7) and j["loss"] == reports[-1][1]
  # The directions the heat maps showed were used as they were, not computed again, and
  # are those the spec's replay computes.
  assert not computed
  rec = client.session.state.edits[-1]
  np.testing.assert_array_equal(rec.directions, shown[0])
  C = client.session.ws.statistics("convt2")
  keys, weights = gens.context_keys(client.session.ws.gen, "convt2", rec.spec.masks("key"))
  np.testing.assert_array_equal(
      real_directions(C, keys, weights, rank=1, method="zca", shrinkage=0.1), shown[0])


def test_search_overfit_and_evaluate(client):
  gen = client.session.ws.gen
  _mark(client)
  j = client.job("search", {"count": 64, "top": 8})
  assert j["status"] == "done", j
  res = j["result"]
  assert len(res["images"]) == 8 and res["scores"] == sorted(res["scores"], reverse=True)
  D = client.session.directions(client.session.state, {})
  best = gens.layer_scores(gen, "convt2", D, list(range(64))).reshape(64, -1).max(-1)
  assert res["images"][0] == int(np.argmax(best))
  assert res["scores"][0] == pytest.approx(float(best.max()), rel=1e-6)

  j = client.job("overfit", {"steps": 5, "learning_rate": 0.01})
  assert j["status"] == "done", j
  e = j["result"]["edit"]
  assert e["kind"] == "overfit" and e["can_evaluate"] and not e["has_spec"]
  assert client.get(f"edits/{e['id']}/spec.json").status_code == 400

  j = client.job("execute", {"settings": {"solver": {"optimizer": "gauss_newton", "steps": 5}}})
  rec = client.session.state.edits[-1]
  j = client.job("evaluate", {"edit": rec.id, "images": "100-115", "quantile": 0.9})
  assert j["status"] == "done", j
  edited, _ = memedit.apply_edit(gen.params, rec.edit)
  want = metrics.evaluate_edit(gen, "convt2", rec.directions, edited, list(range(100, 116)),
                               target_value=rec.target_value, quantile=0.9)
  assert j["result"]["metrics"] == json.loads(json.dumps(want))
  strip = decode(j["result"]["strip"])
  assert strip.ndim == 3 and strip.shape[1] > strip.shape[0]


def test_layer_switch_collects_statistics(client):
  ws = client.session.ws
  r = client.post("layer", {"layer": "convt3"}).get_json()
  assert r["layer"] == "convt3" and r["state"] in ("running", "ready")
  C = ws.statistics("convt3")  # waits for the background collection
  assert client.http.get("/api/statistics").get_json()["convt3"]["state"] == "ready"
  want = gens.collect_statistics(ws.gen, "convt3", SAMPLES, batch_size=BATCH,
                                    progress=False)
  np.testing.assert_allclose(C, np.asarray(memedit.second_moment(want)), rtol=1e-5, atol=1e-7)
  assert client.session.state.layer == "convt3"


BAD = [
    # (path, body, status, message)
    ("grid", {"images": "99999-100000"}, 400, "image numbers in [0, 100000)"),
    ("grid", {"images": "0-999"}, 400, "at most 256 images"),
    ("grid", {"images": "3-1"}, 400, "from low to high"),
    ("grid", {"images": "a-b"}, 400, "numbers or ranges"),
    ("grid", {"images": "0-3", "which": "both"}, 400, "which: expected"),
    ("copy", {"imgnum": 100000, "mask": url(box(8, 16, 8, 16))}, 400, "imgnum: expected an image"),
    ("copy", {"imgnum": -1, "mask": url(box(8, 16, 8, 16))}, 400, "imgnum: expected an image"),
    ("copy", {"imgnum": "3", "mask": url(box(8, 16, 8, 16))}, 400, "integer image number"),
    ("copy", {"imgnum": 3, "mask": url(box(0, 0, 0, 0))}, 400, "empty mask"),
    ("copy", {"imgnum": 3, "mask": url(box(2, 6, 2, 6, size=32))}, 400, "expected size 64x64"),
    ("copy", {"imgnum": 3, "mask": "data:image/png;base64,@@"}, 400, "invalid base64"),
    ("copy", {"imgnum": 3}, 400, "missing ['mask']"),
    ("copy", {"imgnum": 3, "mask": 7}, 400, "mask: expected a PNG data URL ('data:image/png;"
     "base64,...') of the 64x64 canvas, got int"),
    ("context", {"imgnum": 3, "mask": [[255] * 64] * 64}, 400, "PNG data URL"),
    ("paste", {"imgnum": 4, "mask": url(box(8, 16, 8, 16))}, 400, "nothing copied yet"),
    ("execute", {}, 400, "context tray is empty"),
    ("erase", {"imgnum": 4, "mask": url(box(8, 16, 8, 16))}, 400, "context tray is empty"),
    ("matches", {"images": "0-3"}, 400, "context tray is empty"),
    ("search", {"count": 10 ** 6}, 400, "count: expected an integer"),
    ("overfit", {"steps": 0}, 400, "steps: expected an integer"),
    ("replay", {"spec": "{not json"}, 400, "invalid JSON"),
    ("replay", {"spec": json.dumps({"key": [], "paste": [0, ""], "layer": "convt2"})}, 400,
     "missing ['object']"),
    ("replay", {"spec": json.dumps({"key": [], "paste": [0, ""], "layer": "convt2",
                                     "kind": "erase"})}, 400, "key: expected a non-empty list"),
    ("replay", {"spec": json.dumps({"key": [[1, url(box(8, 16, 8, 16))]],
                                     "paste": [2, url(box(8, 16, 8, 16))],
                                     "object": [3, url(box(8, 16, 8, 16))],
                                     "layer": "convt9"})}, 400, "layer: expected one of"),
    ("replay", {"spec": 3}, 400, "JSON text of a spec"),
    ("replay", {"spec": json.dumps({"key": [[1, url(box(8, 16, 8, 16))]],
                                     "paste": [2, url(box(8, 16, 8, 16))],
                                     "object": [3, url(box(8, 16, 8, 16))],
                                     "layer": "convt2", "rank": 10 ** 9})}, 400,
     "rank: expected at most"),
    ("replay", {"spec": json.dumps({"key": [[1, url(box(8, 16, 8, 16))]],
                                     "paste": [2, url(box(8, 16, 8, 16))],
                                     "object": [3, url(box(8, 16, 8, 16))],
                                     "layer": "convt2", "rank": 12})}, 400,
     "rank: expected at most the number of context keys the tray's masks cover at layer "
     "'convt2' (9), got 12"),
    ("layer", {"layer": "convt9"}, 400, "layer: expected one of"),
    ("context/remove", {"id": "c99"}, 400, "expected one of the tray's entries"),
    ("edits/e9/active", {"active": True}, 400, "this session's edits"),
    ("edits/..%2F..%2Fetc/revert", {}, 404, "Not Found"),
    ("edits/..%5C..%5Cetc/revert", {}, 400, "this session's edits"),
    ("evaluate", {"edit": "e1", "images": "100-103"}, 400, "this session's edits"),
]


def test_bad_input_gets_a_message_and_changes_nothing(client):
  for path, body, status, message in BAD:
    before = client.session.state
    r = client.post(path, body)
    assert r.status_code == status, (path, body, r.get_json())
    assert message in r.get_json()["error"], (path, r.get_json())
    assert client.session.state is before, path
  # With context but settings that do not validate; and after marking, bad settings.
  client.post("context", {"imgnum": 1, "mask": url(box(24, 40, 16, 48))})
  for settings, message in (({"rank": "x"}, "rank: expected a positive integer"),
                            ({"bogus": 1}, "settings: expected fields among"),
                            ({"solver": {"steps": 0}}, "solver.steps: expected an integer"),
                            ({"method": "pca"}, "method: expected one of"),
                            ({"rank": 10 ** 6}, "rank: expected at most")):
    before = client.session.state
    r = client.post("matches", {"images": "0-3", "settings": settings})
    assert r.status_code == 400 and message in r.get_json()["error"], r.get_json()
    assert client.session.state is before
  r = client.post("matches", {"images": "0-3", "quantile": 1.5})
  assert "quantile: expected a number in (0, 1)" in r.get_json()["error"]
  assert client.get("edits/e1/edit.zip").status_code == 400
  # The server is still up and the session unchanged.
  assert len(client.grid("0-1")) == 2
  assert client.get("state").get_json()["edits"] == []


def test_request_size_content_type_hosts_and_unknown_routes(client):
  http = client.http
  r = client.post("copy", {"imgnum": 3, "mask": "data:image/png;base64," + "A" * (2 << 20)})
  assert r.status_code == 413 and "too large" in r.get_json()["error"]
  r = http.post(f"/api/s/{client.sid}/copy", data="imgnum=3", content_type="text/plain")
  assert r.status_code == 400 and "expected a JSON body" in r.get_json()["error"]
  r = http.post(f"/api/s/{client.sid}/copy", data="{", content_type="application/json")
  assert r.status_code == 400 and "malformed JSON" in r.get_json()["error"]
  for deep in ('{"imgnum": ' + "[" * 100000 + "]" * 100000 + "}", "[" * 100000 + "]" * 100000):
    r = http.post(f"/api/s/{client.sid}/copy", data=deep, content_type="application/json")
    assert r.status_code == 400 and "nested deeper" in r.get_json()["error"], r.get_json()
  assert http.get("/api/s/nosuch/state").status_code == 404
  assert "reload the page" in http.get("/api/s/nosuch/state").get_json()["error"]
  assert http.get("/nowhere").status_code == 404
  assert http.get("/", headers={"Host": "evil.example"}).status_code == 400
  page = http.get("/")
  assert page.status_code == 200 and b"/static/app.js" in page.data
  for asset in ("app.js", "style.css"):
    assert http.get(f"/static/{asset}").status_code == 200
  assert http.get("/static/../server.py").status_code == 404


def test_replay_numbers_its_context_when_it_commits(client, monkeypatch):
  # Context added while a replay solves must not share an id with the replay's context
  # (the directions cache is keyed by ids; a reused id would give another mask's D).
  from memedit.ui import session as ui_session

  gate, solve = threading.Event(), ui_session.wf.run_spec
  monkeypatch.setattr(ui_session.wf, "run_spec",
                      lambda *a, **k: gate.wait(60) and solve(*a, **k))
  m = url(box(24, 40, 16, 48))
  spec = {"key": [[1, m]], "paste": [2, m], "object": [3, m], "layer": "convt2",
          "solver": {"optimizer": "gauss_newton", "steps": 2}}
  r = client.post("replay", {"spec": json.dumps(spec)})
  assert r.status_code == 202, r.get_json()
  assert client.post("context", {"imgnum": 7, "mask": url(box(8, 24, 8, 24))}).get_json()["id"] == "c1"
  gate.set()
  assert client.session.jobs.get(r.get_json()["id"]).wait(120)
  s = client.session.state
  assert s.edits and [c for c, _ in s.context] == ["c2"] and s.counter == 2


def test_one_job_at_a_time():
  slot = jobs.JobSlot()
  gate = threading.Event()
  job = slot.start("slow", lambda j: gate.wait(10) and "finished")
  with pytest.raises(jobs.Busy, match="slow is still running"):
    slot.start("other", lambda j: None)
  gate.set()
  assert job.wait(10) and job.snapshot()["result"] == "finished"
  failing = slot.start("failing", lambda j: int("x"))
  failing.wait(10)
  snap = failing.snapshot()
  assert snap["status"] == "error" and "invalid literal" in snap["error"]


def test_subcommand_registration_and_arguments(tmp_path, capsys):
  import argparse

  parser = argparse.ArgumentParser(prog="memedit")
  add_subcommand(parser.add_subparsers(dest="command"))
  args = parser.parse_args(["ui", "model", "--layer", "convt2", "--port", "0"])
  assert (args.host, args.port, args.stats) == ("127.0.0.1", 0, ".cache/stats")
  with pytest.raises(SystemExit):
    parser.parse_args(["ui", "--help"])
  assert "Copy an object" in " ".join(capsys.readouterr().out.split())
  args = parser.parse_args(["ui", "model", "--layer", "convt2", "--port", "70000"])
  with pytest.raises(ValueError, match=r"--port: expected an integer in \[0, 65535\]"):
    args.run(args)
  args = parser.parse_args(["ui", str(tmp_path / "missing"), "--layer", "convt2"])
  with pytest.raises((ValueError, OSError)):
    args.run(args)


def _gated_progress(monkeypatch):
  """Replaces the session's solve hook by one that, at its first call, signals `started`
  and waits for `go`; the steps it sees are listed in `seen`."""
  from memedit.ui import session as session_mod
  started, go, seen = threading.Event(), threading.Event(), []
  real = session_mod.solve_progress

  def gated(job, steps):
    hook = real(job, steps)

    def wrapped(step, loss):
      seen.append(step)
      if not started.is_set():
        started.set()
        go.wait(60)
      hook(step, loss)

    return wrapped

  monkeypatch.setattr(session_mod, "solve_progress", gated)
  return started, go, seen


def test_cancel_stops_a_solve_within_a_chunk_and_changes_nothing(client, monkeypatch):
  from memedit import solve as solve_mod
  _mark(client)
  before, solved = client.session.state, dict(client.session.ws.solve_seconds)
  started, go, seen = _gated_progress(monkeypatch)
  parts, run_part = [], solve_mod._solve_part
  monkeypatch.setattr(solve_mod, "_solve_part",
                      lambda part, *a: parts.append((part, a[5])) or run_part(part, *a))
  chunk = solve_mod.CHUNK_STEPS["gauss_newton"]
  settings = {"solver": {"optimizer": "gauss_newton", "steps": 3 * chunk}}
  r = client.post("execute", {"settings": settings})
  assert r.status_code == 202, r.get_json()
  jid = r.get_json()["id"]
  assert started.wait(120)
  r = client.post("job/cancel", {"id": jid})
  assert r.status_code == 202, r.get_json()
  assert r.get_json()["status"] == "running" and r.get_json()["cancelling"]
  # While it stops, another job is refused with a message saying so.
  busy = client.post("execute", {"settings": settings})
  assert busy.status_code == 409 and "being cancelled" in busy.get_json()["error"]
  go.set()
  assert client.session.jobs.get(jid).wait(120)
  snap = client.get(f"job?id={jid}").get_json()
  assert snap["status"] == "cancelled" and not snap["cancelling"], snap
  assert "result" not in snap and "error" not in snap
  # It stopped at the end of the first chunk (the hook was not called again), and the
  # session is exactly as it was: the same state (no edit, the same parameters).
  assert parts == [("start", 0), ("chunk", chunk)] and seen == [0]
  assert client.session.state is before and not before.edits
  assert client.session.ws.solve_seconds == solved
  # A cancelled or finished job cannot be cancelled; unknown ids and bad bodies get
  # clear answers.
  r = client.post("job/cancel", {"id": jid})
  assert r.status_code == 409 and "already ended (cancelled)" in r.get_json()["error"]
  r = client.post("job/cancel", {"id": "0123456789ab"})
  assert r.status_code == 404 and "no such job" in r.get_json()["error"]
  for body, message in (({}, "missing ['id']"), ({"id": 7}, "got a number"),
                        ({"id": None}, "got null"), ({"id": ["x"]}, "got a list")):
    r = client.post("job/cancel", body)
    assert r.status_code == 400 and message in r.get_json()["error"], (body, r.get_json())
  r = client.http.post("/api/s/nosuchsession/job/cancel", json={"id": jid})
  assert r.status_code == 404 and "unknown or expired session" in r.get_json()["error"]
  r = client.http.post(f"/api/s/{client.sid}/job/cancel", data="id=" + jid)
  assert r.status_code == 400 and "expected a JSON body" in r.get_json()["error"]
  # The next job works, and a finished job cannot be cancelled.
  monkeypatch.undo()
  settings["solver"]["steps"] = 2 * chunk  # its first part is the one compiled above
  j = client.job("execute", {"settings": settings})
  assert j["status"] == "done" and j["step"] == 2 * chunk, j
  assert [e.id for e in client.session.state.edits] == ["e1"]
  r = client.post("job/cancel", {"id": j["id"]})
  assert r.status_code == 409 and "already ended (done)" in r.get_json()["error"]
  # The overfit baseline (every weight of the layer) stops after its first chunk too.
  before = client.session.state
  started, go, seen = _gated_progress(monkeypatch)
  steps = 3 * solve_mod.CHUNK_STEPS["adam"]
  r = client.post("overfit", {"steps": steps, "learning_rate": 0.01})
  assert r.status_code == 202, r.get_json()
  assert started.wait(120)
  assert client.post("job/cancel", {"id": r.get_json()["id"]}).status_code == 202
  go.set()
  job = client.session.jobs.get(r.get_json()["id"])
  assert job.wait(120) and job.status == "cancelled", job.snapshot()
  assert seen == [solve_mod.CHUNK_STEPS["adam"] - 1] and client.session.state is before


def test_cancel_while_waiting_for_statistics(client, monkeypatch):
  ws = client.session.ws
  gate = threading.Event()

  def blocked(*args, **kwargs):
    gate.wait(60)
    raise ValueError("collection stopped")

  from memedit.ui import workspace as workspace_mod
  monkeypatch.setattr(workspace_mod.wf, "collect_statistics", blocked)  # it hangs
  m = url(box(24, 40, 16, 48))
  spec = json.dumps({"key": [[1, m]], "paste": [2, m], "object": [3, m], "layer": "convt3",
                     "solver": {"optimizer": "gauss_newton", "steps": 2}})
  before = client.session.state
  r = client.post("replay", {"spec": spec})
  assert r.status_code == 202, r.get_json()
  jid = r.get_json()["id"]
  assert client.post("job/cancel", {"id": jid}).status_code == 202
  job = client.session.jobs.get(jid)
  assert job.wait(5) and job.status == "cancelled"
  assert client.session.state is before
  # The collection goes on meanwhile; when it fails, the next job says why.
  assert ws.stats_status("convt3")["state"] == "running"
  gate.set()
  j = client.job("replay", {"spec": spec})
  assert j["status"] == "error" and "collection stopped" in j["error"], j
  assert "statistics of layer 'convt3' failed" in j["error"]
  assert client.session.state is before


def test_cancel_races_with_the_end_of_a_job():
  slot = jobs.JobSlot()
  # Asked to stop after its last check: its result is dropped, it ends cancelled.
  gate = threading.Event()
  job = slot.start("quiet", lambda j: gate.wait(10) and "made")
  job.cancel()
  gate.set()
  assert job.wait(10) and job.snapshot()["status"] == "cancelled" and job.result is None
  # Once it publishes its result it cannot be cancelled: the request is refused.
  gate, sealed = threading.Event(), threading.Event()

  def publish(j):
    j.seal()
    sealed.set()
    gate.wait(10)
    return "published"

  job = slot.start("publish", publish)
  assert sealed.wait(10)
  with pytest.raises(jobs.Finished, match="too late to cancel"):
    job.cancel()
  gate.set()
  assert job.wait(10) and job.snapshot()["result"] == "published"
  with pytest.raises(jobs.Finished, match="already ended"):
    job.cancel()


def test_chunked_solve_is_the_single_scan_bit_for_bit_and_compiles_once():
  import jax.numpy as jnp
  from compilations import Compilations

  from memedit import solve as solve_mod
  rs = np.random.RandomState(3)
  f = lambda K, k: jnp.tanh(k @ K)
  K0, D = rs.randn(5, 3).astype(np.float32), rs.randn(2, 5).astype(np.float32)
  keys, v = rs.randn(7, 5).astype(np.float32), (0.3 * rs.randn(7, 3)).astype(np.float32)
  # Adam's total a multiple of the chunk (a start without steps), Gauss-Newton's not (a
  # start running the first step).
  for kw, chunk in ((dict(optimizer="adam", steps=25), 5),
                    (dict(optimizer="gauss_newton", steps=5, cg_steps=3), 2)):
    plain = memedit.solve_lambda(f, K0, D, keys, v, **kw)
    seen = []
    with Compilations() as c:
      chunked = memedit.solve_lambda(f, K0, D, keys, v, **kw, chunk_steps=chunk,
                                     progress=lambda t, l: seen.append(t))
    for a, b in zip(plain, chunked):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert seen == list(range(kw["steps"] + 1))
    assert c.count <= 3, c.events  # a first part, the chunk and the end: not one a chunk
    # Another total with the same first part: no program at all. A multiple of the chunk
    # runs every step in the chunk program, which serves every multiple.
    with Compilations() as c:
      memedit.solve_lambda(f, K0, D, keys, v, **{**kw, "steps": kw["steps"] + 2 * chunk},
                           chunk_steps=chunk, progress=lambda t, l: None)
    assert c.count == 0, c.events
  # A hook that raises stops the solve at the end of its chunk.
  seen = []

  def stop(t, loss):
    seen.append(t)
    if t == 5:
      raise KeyboardInterrupt("stop")

  with pytest.raises(KeyboardInterrupt, match="stop"):
    memedit.solve_lambda(f, K0, D, keys, v, steps=25, chunk_steps=5, progress=stop)
  # Five chunks of 5 steps; step 5 is in the second (5..9).
  assert seen == list(range(6)) and not solve_mod._HOOKS
  with pytest.raises(ValueError, match="chunk_steps: expected a positive int"):
    memedit.solve_lambda(f, K0, D, keys, v, steps=5, chunk_steps=0, progress=print)
  with pytest.raises(ValueError, match="chunk_steps: expected only with a progress hook"):
    memedit.solve_lambda(f, K0, D, keys, v, steps=5, chunk_steps=2)


def test_a_reloaded_page_finds_the_running_job_and_can_cancel_it(client, monkeypatch):
  # The page keeps its session id across reloads and asks for the session's job: the
  # running one comes back with its id, status and progress, and its id cancels it.
  assert client.get("job").status_code == 404
  assert "has not started a job" in client.get("job").get_json()["error"]
  _mark(client)
  ws = client.session.ws
  started, gate, calls, real = threading.Event(), threading.Event(), [], ws.scores

  def scores(*args):
    calls.append(1)
    if len(calls) == 2:  # the second of two chunks of 128 images waits
      started.set()
      gate.wait(60)
    return real(*args)

  monkeypatch.setattr(ws, "scores", scores)
  before = client.session.state
  r = client.post("search", {"count": 256, "top": 4})
  assert r.status_code == 202, r.get_json()
  jid = r.get_json()["id"]
  assert started.wait(60)
  page = client.app.test_client()  # the reloaded page: a new client, the same session
  info = page.get(f"/api/s/{client.sid}/state").get_json()
  j = page.get(f"/api/s/{client.sid}/job").get_json()
  for snap in (info["job"], j):
    assert (snap["id"], snap["kind"], snap["status"]) == (jid, "search", "running"), snap
    assert snap["fraction"] == 0.5 and snap["phase"] == "ranking" and not snap["cancelling"]
  r = page.post(f"/api/s/{client.sid}/job/cancel", json={"id": j["id"]})
  assert r.status_code == 202 and r.get_json()["cancelling"], r.get_json()
  gate.set()
  assert client.session.jobs.get(jid).wait(30)
  j = page.get(f"/api/s/{client.sid}/job").get_json()
  assert j["id"] == jid and j["status"] == "cancelled" and "result" not in j, j
  assert len(calls) == 2 and client.session.state is before
  # The page asks for its stored session first and makes a new one only when it is gone.
  script = client.http.get("/static/app.js").get_data(as_text=True)
  assert "sessionStorage" in script and "resumeJob(info.job)" in script


def test_evaluate_stops_between_batches_when_cancelled(client, monkeypatch):
  from memedit.ui import workflow as wf_mod
  gen = client.session.ws.gen
  _mark(client)
  j = client.job("execute", {"settings": {"solver": {"optimizer": "gauss_newton", "steps": 5},
                                          "taps": "own"}})
  assert j["status"] == "done", j
  rec = client.session.state.edits[-1]
  started, gate, calls, real = threading.Event(), threading.Event(), [], wf_mod.gens.run_layer

  def run_layer(*args, **kwargs):
    calls.append(len(args[2]))
    if len(calls) == 2:  # the original generator's second batch of 64 latents waits
      started.set()
      gate.wait(60)
    return real(*args, **kwargs)

  monkeypatch.setattr(wf_mod.gens, "run_layer", run_layer)
  before = client.session.state
  body = {"edit": rec.id, "images": "100-227", "quantile": 0.9}
  r = client.post("evaluate", body)
  assert r.status_code == 202, r.get_json()
  jid = r.get_json()["id"]
  assert started.wait(60)
  snap = client.get(f"job?id={jid}").get_json()
  assert snap["status"] == "running" and snap["fraction"] == 64 / 256, snap
  assert client.post("job/cancel", {"id": jid}).status_code == 202
  gate.set()
  job = client.session.jobs.get(jid)
  assert job.wait(30) and job.status == "cancelled", job.snapshot()
  # It stopped at the next batch: the edited generator never ran.
  assert calls == [64, 64] and client.session.state is before
  # Uncancelled, the batches give the metrics of one evaluate_edit call.
  j = client.job("evaluate", body)
  assert j["status"] == "done" and calls[2:] == [64] * 4, j
  edited, _ = memedit.apply_edit(gen.params, rec.edit)
  want = metrics.evaluate_edit(gen, "convt2", rec.directions, edited, list(range(100, 228)),
                               target_value=rec.target_value, quantile=0.9)
  assert j["result"]["metrics"] == json.loads(json.dumps(want))


def test_the_first_execute_compiles_the_step_once_for_every_multiple_of_a_chunk(client):
  # The start only makes the solver's state: with steps a multiple of the chunk every step
  # runs in the chunk program, so an Execute with another such number compiles nothing
  # (the step was compiled twice, as the start's and the chunk's, and a first Execute of
  # one chunk's steps left the chunk's program to the next).
  from compilations import Compilations

  from memedit import solve as solve_mod
  _mark(client)
  chunk = solve_mod.CHUNK_STEPS["gauss_newton"]
  results = []
  for n in (1, 3):
    client.post("revert_all")  # only the solve's programs are counted, not the history's
    with Compilations() as c:
      j = client.job("execute", {"settings": {"solver": {"optimizer": "gauss_newton",
                                                         "steps": n * chunk}, "taps": "own"}})
    assert j["status"] == "done" and j["step"] == n * chunk, j
    results.append(c)
  assert results[1].count == 0, results[1].events
