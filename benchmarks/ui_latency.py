"""Latency of the rewriting UI (``memedit ui``) on the DCGAN faces of ``make demo``.

The server runs in this process on 127.0.0.1 (a free port); requests go over HTTP as the
page sends them. Measured:

- first page load, including compilation: in a fresh process, from asking headless
  Chromium for the page (Chromium already started) until the grid of 32 images shows;
  over HTTP alone (a new session and the grid) when Chromium or selenium is missing;
- grid of 32 images, warm: 32 images not rendered before (compiled programs, no cached
  images), median of 5;
- heat maps for the grid, warm: context matches of 32 images not scored before (the
  threshold sample's scores cached), median of 5; the first call, which scores the
  threshold sample, is reported beside it;
- Execute (Gauss–Newton, the page's 20 steps) to updated grid, warm: from the Execute
  request until the job is done and the 32 edited images are received, median of 3 (the
  edit removed between runs), with the process CPU time of those runs and the seconds
  spent in the workflow's solve; the reference's Adam (2001 steps) is timed once, warm, for
  comparison. The solver steps whose loss the job's progress showed while it ran (polled
  every 20 ms, as the page does every 150 ms) are counted.

The edit is the bundled demo spec's (copy image 29's dark glasses, paste over image 9's
eyes, context = the eyes of six faces, taps own, shrinkage 0.2).

Targets: Execute (Gauss–Newton) ≤ 3 s, grid ≤ 1 s, heat maps ≤ 2 s, first load ≤ 30 s.
Writes benchmarks/results/ui_latency.json with the load average before and after.

Usage: python benchmarks/ui_latency.py [--model DIR] [--stats DIR] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import add_out_dir, results_path, table, write_to  # noqa: E402

TARGETS = {"first_page_load_s": 30.0, "grid_32_s": 1.0, "heatmaps_32_s": 2.0,
           "execute_gauss_newton_to_grid_s": 3.0}


class Http:
  """JSON requests to the UI server, as the page makes them."""

  def __init__(self, url):
    self.url = url.rstrip("/")

  def __call__(self, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(self.url + path, data=data, method="GET" if body is None
                                 else "POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
      return json.loads(r.read())

  def job(self, path, body, seen=None):
    """Starts a job and polls it until it ends; the solver steps its progress showed
    while running are added to ``seen``."""
    j = self(path, body)
    sid = path.split("/")[3]
    while j["status"] == "running":
      if seen is not None and "step" in j:
        seen.add(j["step"])
      time.sleep(0.02)
      j = self(f"/api/s/{sid}/job?id={j['id']}")
    if j["status"] != "done":
      raise RuntimeError(f"{path}: {j.get('error')}")
    return j


def _browser():
  try:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
  except ImportError:
    return None
  chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
  if not (chromium and driver):
    return None
  opts = Options()
  opts.binary_location = chromium
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1600,1000"):
    opts.add_argument(arg)
  return webdriver.Chrome(service=Service(driver), options=opts)


def _loadavg() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default=str(ROOT / ".cache/demo/faces-dcgan"))
  ap.add_argument("--stats", default=str(ROOT / ".cache/demo/stats"))
  add_out_dir(ap)
  args = ap.parse_args(argv)
  if not os.path.isdir(args.model):
    ap.error(f"--model: expected a converted model folder, got {args.model!r} (missing; "
             "`make demo` converts the default)")
  out = results_path(ap, args, "ui_latency", inputs=("--model", "--stats"))
  load_before = _loadavg()

  from memedit.ui.server import create_app, start_server
  from memedit.ui.workspace import Workspace

  work = tempfile.mkdtemp(prefix="memedit-ui-bench-")
  ws = Workspace.open(args.model, stats_dir=args.stats, samples=2000, batch_size=100,
                      work_dir=work)
  ws.statistics("convt2")  # the demo's statistics, read from the cache
  app = create_app(ws, layer="convt2")
  server, url = start_server(app)
  http = Http(url)
  res, notes = {}, {}
  driver = _browser()
  try:
    # First page load, compilation included (nothing was rendered in this process yet).
    if driver is not None:
      t = time.perf_counter()
      driver.get(url)
      while driver.execute_script(
          "return document.querySelectorAll('.cell img.base[src^=\"data:\"]').length") < 32:
        time.sleep(0.02)
      res["first_page_load_s"] = time.perf_counter() - t
      notes["first_page_load_s"] = "headless Chromium: page, session and 32 images"
    else:
      t = time.perf_counter()
      sid0 = http("/api/sessions", {})["session"]
      http(f"/api/s/{sid0}/grid", {"images": "0-31"})
      res["first_page_load_s"] = time.perf_counter() - t
      notes["first_page_load_s"] = "HTTP only (no Chromium): session and 32 images"

    sid = http("/api/sessions", {})["session"]
    s = f"/api/s/{sid}"
    spec = json.loads(importlib.resources.files("memedit").joinpath(
        "data/demo_spec.json").read_text())
    http(f"{s}/copy", {"imgnum": spec["object"][0], "mask": spec["object"][1]})
    http(f"{s}/paste", {"imgnum": spec["paste"][0], "mask": spec["paste"][1]})
    for n, m in spec["key"]:
      http(f"{s}/context", {"imgnum": n, "mask": m})
    settings = {"method": "zca", "rank": 1, "shrinkage": 0.2, "taps": "own",
                "solver": {"optimizer": "gauss_newton", "steps": 20, "learning_rate": 0.05,
                           "loss": "l1"}}
    ranges = iter(f"{a}-{a + 31}" for a in range(1000, 5000, 32))

    def grid():
      return http(f"{s}/grid", {"images": next(ranges)})

    grid()  # compiles the batch of 32 (the first load may have used another session)
    times = []
    for _ in range(5):
      t = time.perf_counter()
      grid()
      times.append(time.perf_counter() - t)
    res["grid_32_s"] = statistics.median(times)

    t = time.perf_counter()
    http(f"{s}/matches", {"images": next(ranges), "quantile": 0.999, "settings": settings})
    res["heatmaps_first_s"] = time.perf_counter() - t
    times = []
    for _ in range(5):
      t = time.perf_counter()
      http(f"{s}/matches", {"images": next(ranges), "quantile": 0.999, "settings": settings})
      times.append(time.perf_counter() - t)
    res["heatmaps_32_s"] = statistics.median(times)

    def execute(solver, seen=None):
      t, c = time.perf_counter(), time.process_time()
      j = http.job(f"{s}/execute", {"settings": {**settings, "solver": solver}}, seen)
      grid()
      total, cpu = time.perf_counter() - t, time.process_time() - c
      http(f"{s}/edits/{j['result']['edit']['id']}/revert", {})
      return total, j["result"]["edit"], cpu

    gn = settings["solver"]
    res["execute_gauss_newton_first_s"] = execute(gn)[0]
    seen = [set() for _ in range(3)]
    runs = [execute(gn, seen[i]) for i in range(3)]
    res["execute_gauss_newton_to_grid_s"] = statistics.median(r[0] for r in runs)
    res["execute_gauss_newton_cpu_s"] = statistics.median(r[2] for r in runs)
    res["execute_gauss_newton_solve_s"] = statistics.median(r[1]["seconds"] for r in runs)
    notes["execute_gauss_newton_cpu_s"] = ("process CPU time (all threads) of the same runs: "
                                           "the work, whatever else the machine runs")
    notes["execute_gauss_newton_solve_s"] = "of which the workflow's edit_from_spec"
    notes["execute_gauss_newton_progress_steps_seen"] = [len(x) for x in seen]
    notes["paste_l1_gauss_newton"] = [runs[0][1]["loss_before"], runs[0][1]["loss_after"]]
    adam = dict(gn, optimizer="adam", steps=2001)
    execute(adam)  # compile
    adam_seen = set()
    res["execute_adam_2001_to_grid_s"], edit, _ = execute(adam, adam_seen)
    notes["paste_l1_adam"] = [edit["loss_before"], edit["loss_after"]]
    notes["execute_adam_progress_steps_seen"] = len(adam_seen)
  finally:
    if driver is not None:
      driver.quit()
    server.shutdown()
    shutil.rmtree(work, ignore_errors=True)

  rows = [{"measure": k, "seconds": f"{v:.3f}",
           "target": f"≤ {TARGETS[k]:g} s" if k in TARGETS else "",
           "met": ("yes" if v <= TARGETS[k] else "no") if k in TARGETS else ""}
          for k, v in res.items()]
  load_after = _loadavg()
  print(table(rows, ["measure", "seconds", "target", "met"]))
  print(f"load average before {load_before}, after {load_after}")
  path = write_to(out, {"seconds": res, "targets_s": TARGETS, "notes": notes,
                              "loadavg_before": load_before, "loadavg_after": load_after,
                              "model": os.path.basename(os.path.normpath(args.model))})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
