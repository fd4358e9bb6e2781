"""The rewriting UI end to end in headless Chromium (selenium) on the DCGAN face weights:
paint with mouse drags, copy, paste, add context, execute, check where the images changed,
toggle, revert to the original bits, replay the saved spec through `memedit rewrite`, and
cancel a running solve."""

from __future__ import annotations

import os
import shutil
import threading
import urllib.request

import numpy as np
import peers
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait
from ui_helpers import decode

import memedit
from memedit.cli import main as cli_main
from memedit.ui.server import create_app, start_server
from memedit.ui.workspace import Workspace
from ports.dcgan import convert_dcgan

SAMPLES, BATCH = 200, 100
GRID = "9,13,15,29,24,25,31,100-108"
EYES = [(30, 14, 50)]  # strokes (y, x0, x1) on the 64-px canvas with brush radius 6
GLASSES = [(26, 14, 50), (34, 14, 50)]
PASTE = [(28, 14, 50), (36, 14, 50)]


def _chrome():
  chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
  assert chromium and driver, "Chromium and chromedriver are needed: run `make browser`"
  opts = Options()
  opts.binary_location = chromium
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1600,1200"):
    opts.add_argument(arg)
  return webdriver.Chrome(service=Service(driver), options=opts)


def _images(driver) -> dict:
  pairs = driver.execute_script(
      "return [...document.querySelectorAll('.cell')].map(c => "
      "[Number(c.dataset.imgnum), c.querySelector('img.base').src])")
  return {n: decode(src)[..., :3] for n, src in pairs}


def _paint(driver, n, strokes):
  canvas = driver.find_element(By.CSS_SELECTOR, f'.cell[data-imgnum="{n}"] canvas.paint')
  size = canvas.size["width"]
  f = size / 64
  for y, x0, x1 in strokes:
    ActionChains(driver).move_to_element_with_offset(
        canvas, round(x0 * f - size / 2), round(y * f - size / 2)).click_and_hold().move_by_offset(
            round((x1 - x0) * f), 0).release().perform()


def _mask(driver, n) -> np.ndarray:
  return np.asarray(driver.execute_script(f"return Array.from(S.masks.get({n}) || [])"),
                    np.uint8).reshape(64, 64)


def _wait(driver, condition, timeout=120):
  return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d))


def _message(driver, text):
  _wait(driver, lambda d: text in d.find_element(By.ID, "message").text
        or "error" in d.find_element(By.ID, "message").get_attribute("class"))
  msg = driver.find_element(By.ID, "message")
  assert text in msg.text, msg.text


@pytest.mark.parity
def test_browser_rewrite_session(tmp_path):
  _, weights = peers.gan_face_generate()
  model = str(convert_dcgan(weights, tmp_path / "faces-dcgan"))
  stats = str(tmp_path / "stats")
  ws = Workspace.open(model, stats_dir=stats, samples=SAMPLES, batch_size=BATCH,
                      work_dir=str(tmp_path / "work"))
  app = create_app(ws, layer="convt2")
  server, url = start_server(app)
  driver = _chrome()
  shots = tmp_path / "screenshots"
  shots.mkdir()
  try:
    driver.get(url)
    box = driver.find_element(By.ID, "images")
    box.clear()
    box.send_keys(GRID)
    driver.find_element(By.ID, "show").click()
    nums = [9, 13, 15, 29, 24, 25, 31] + list(range(100, 109))
    _wait(driver, lambda d: d.execute_script(
        "return [...document.querySelectorAll('.cell')].map(c => Number(c.dataset.imgnum))")
        == nums)
    original = _images(driver)
    driver.execute_script("const b = document.getElementById('brush-size'); b.value = 6; "
                          "b.dispatchEvent(new Event('input'));")

    # Copy the glasses of image 29: two drags with a round brush of radius 6 paint rows
    # 20-39 along columns 14-50, and nothing farther than the radius from the strokes.
    _paint(driver, 29, GLASSES)
    m = _mask(driver, 29)
    assert m[20:40, 14:51].all() and not m[:19].any() and not m[41:].any()
    assert not m[:, :7].any() and not m[:, 57:].any()
    driver.find_element(By.ID, "copy").click()
    _message(driver, "Copied the region of image 29")
    # Paste them over the eyes of image 9: a live preview with its box.
    _paint(driver, 9, PASTE)
    driver.find_element(By.ID, "paste").click()
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, '.cell[data-imgnum="9"] .badge'))
    preview = _images(driver)[9]
    assert np.abs(preview.astype(int) - original[9]).max() > 20
    # Two context examples: the eyes of images 13 and 15.
    for i, n in enumerate((13, 15)):
      _paint(driver, n, EYES)
      driver.find_element(By.ID, "add-context").click()
      _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#tray img")) == i + 1)
    Select(driver.find_element(By.ID, "optimizer")).select_by_value("gauss_newton")
    assert driver.find_element(By.ID, "steps").get_attribute("value") == "20"
    Select(driver.find_element(By.ID, "taps")).select_by_value("own")
    shrink = driver.find_element(By.ID, "shrinkage")
    shrink.clear()
    shrink.send_keys("0.2")
    driver.save_screenshot(str(shots / "01-marked.png"))

    driver.find_element(By.ID, "execute").click()
    _message(driver, "e1: insert done")
    edited = _images(driver)
    assert sorted(edited) == sorted(nums), sorted(edited)
    assert len(driver.find_elements(By.CSS_SELECTOR, "#edits li")) == 1
    driver.save_screenshot(str(shots / "02-executed.png"))
    if os.environ.get("MEMEDIT_UI_SCREENSHOT"):
      shutil.copy(shots / "02-executed.png", os.environ["MEMEDIT_UI_SCREENSHOT"])

    # Where the context matches (heat maps at the 0.99 quantile) the images changed; not
    # elsewhere.
    q = driver.find_element(By.ID, "quantile")
    q.clear()
    q.send_keys("0.99")
    driver.find_element(By.ID, "show-matches").click()
    _message(driver, "Matches above the 0.99 quantile")
    heat = driver.execute_script(
        "return [...document.querySelectorAll('.cell')].map(c => c.querySelector('img.heat').src)")
    matched = np.stack([decode(h)[..., 3] >= 190 for h in heat])  # score ≥ threshold
    driver.save_screenshot(str(shots / "03-matches.png"))
    diff = np.stack([np.abs(edited[n].astype(float) - original[n]).mean(-1) for n in nums])
    cell = 64 // 8  # one key of convt2 covers 8×8 canvas pixels
    keys = matched.reshape(len(nums), 8, cell, 8, cell).any((2, 4))
    near = keys.copy()  # the matched keys and their neighbours (the kernel's reach)
    for dy in (-1, 0, 1):
      for dx in (-1, 0, 1):
        near |= np.roll(np.roll(keys, dy, 1), dx, 2)
    up = lambda k: k.repeat(cell, 1).repeat(cell, 2)
    inside, far = diff[up(keys)].mean(), diff[~up(near)].mean()
    assert keys.any() and (~near).any()
    assert inside > 3 * far, (inside, far)
    # Toggle: the same latents with the original model, bit for bit, and back.
    driver.find_element(By.ID, "toggle-view").click()
    _wait(driver, lambda d: all(np.array_equal(a, original[n]) for n, a in _images(d).items()))
    driver.save_screenshot(str(shots / "04-original.png"))
    driver.find_element(By.ID, "toggle-view").click()
    _wait(driver, lambda d: all(np.array_equal(a, edited[n]) for n, a in _images(d).items()))

    # The saved spec replays through `memedit rewrite` to the identical edit.
    href = driver.find_element(By.CSS_SELECTOR, "#edits li a.edit-spec").get_attribute("href")
    spec = tmp_path / "spec.json"
    spec.write_bytes(urllib.request.urlopen(href, timeout=60).read())
    assert cli_main(["rewrite", model, str(spec), "--out", str(tmp_path / "replayed.edit"),
                     "--samples", str(SAMPLES), "--batch-size", str(BATCH), "--cache-dir",
                     stats, "--no-progress"]) == 0
    made = app.config["MEMEDIT_STORE"].get(
        driver.execute_script("return S.sid")).state.edits[0].edit
    replayed = memedit.load_edit(tmp_path / "replayed.edit")
    assert replayed.name == made.name
    assert np.array_equal(np.asarray(replayed.lam), np.asarray(made.lam))

    # Revert: the original images, bit for bit.
    driver.find_element(By.ID, "revert-all").click()
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#edits li.off"))
    _wait(driver, lambda d: all(np.array_equal(a, original[n]) for n, a in _images(d).items()))
    driver.find_element(By.CSS_SELECTOR, "#edits li .edit-revert").click()
    _wait(driver, lambda d: not d.find_elements(By.CSS_SELECTOR, "#edits li"))
    assert not driver.find_element(By.ID, "message").get_attribute("class") == "error"

    # Cancel: a long Adam solve stops when the Cancel button (shown while a job runs) is
    # pressed, and changes nothing.
    cancel = driver.find_element(By.ID, "cancel-job")
    assert not cancel.is_displayed()
    Select(driver.find_element(By.ID, "optimizer")).select_by_value("adam")
    steps = driver.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys("50000")
    driver.find_element(By.ID, "execute").click()
    _wait(driver, lambda d: cancel.is_displayed()
          and "step " in d.find_element(By.ID, "job-status").text)
    cancel.click()
    _message(driver, "execute: cancelled; nothing was changed")
    assert not cancel.is_displayed()
    assert "cancelled" in driver.find_element(By.ID, "job-status").text
    assert not driver.find_elements(By.CSS_SELECTOR, "#edits li")
    assert not app.config["MEMEDIT_STORE"].get(driver.execute_script("return S.sid")).state.edits
  finally:
    driver.quit()
    server.shutdown()
    # Nothing of this test goes on in the background: the tests after it in this process
    # count the programs they compile, and compilation events are process-wide.
    assert app.config["MEMEDIT_STORE"].close(timeout=120)
    for t in threading.enumerate():
      if t.name.startswith("memedit-ui-"):
        t.join(timeout=120)
