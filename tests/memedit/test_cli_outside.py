"""The `memedit` command line used from the outside with valid but unusual choices: file
outputs named with a trailing separator, statistics caches that cannot be written, and
sample grids with fewer images than columns."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from PIL import Image

import memedit
from memedit import _io
from memedit import generators as gens
from memedit.cli import main
from ports.dcgan import variables_from_state_dict
from ports.dcgan.convert import expected_shapes


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  """A tiny converted DCGAN (4 feature maps, 64 px)."""
  rs = np.random.RandomState(0)
  sd = {name: (0.2 * rs.standard_normal(shape)).astype(np.float32)
        for name, shape in expected_shapes(100, 4, 3).items()}
  for name, shape in expected_shapes(100, 4, 3).items():
    if name.endswith("running_var") or (name.endswith(".weight") and len(shape) == 1):
      sd[name] = (1.0 + 0.1 * np.abs(rs.standard_normal(shape))).astype(np.float32)
  return _io.save_tree(tmp_path_factory.mktemp("outside") / "model",
                       *variables_from_state_dict(sd))


@pytest.fixture(scope="module")
def edit(model, tmp_path_factory):
  """A rank-1 edit of convt2, saved; returns its path."""
  gen = gens.generator_from_converted(model)
  kernel = gens.layer_kernel(gen, "convt2")
  lam = np.full(kernel.shape[:2] + kernel.shape[3:] + (1,), 0.05, np.float32)
  D = np.eye(1, kernel.shape[2], dtype=np.float32)
  e = memedit.make_edit(gen.weight_path("convt2"), lam, D, kind="conv")
  return memedit.save_edit(tmp_path_factory.mktemp("outside") / "e.edit", e)


def _error(capsys, command):
  err = capsys.readouterr().err
  assert err.startswith(f"memedit {command}: error: ") and err.count("\n") == 1, err
  return err


def test_file_outputs_ending_with_a_separator_are_refused(model, edit, tmp_path, capsys):
  # 'new/' names a folder: it was written as a PNG (or JSON) file called 'new'.
  spec = tmp_path / "spec.json"
  spec.write_text("{}")
  for argv in (["sample", model, "--edit", edit, "--images", "0", "--out"],
               ["evaluate", model, str(spec), "--edit", edit, "--images", "0", "--out"]):
    out = os.path.join(tmp_path, "new") + os.sep
    assert main([*argv, out]) == 1
    assert (f"--out: expected a file to write, got {out!r}, a folder's path (it ends with a "
            "separator)") in _error(capsys, argv[0])
    assert not os.path.lexists(tmp_path / "new")


def test_cache_dir_that_cannot_be_written_is_refused_before_any_work(model, tmp_path, capsys,
                                                                     monkeypatch):
  a_file = tmp_path / "a-file"
  a_file.write_text("keep me")
  stats = ["stats", model, "--layer", "convt2", "--samples", "2", "--no-progress"]
  monkeypatch.setattr(gens, "collect_statistics", lambda *a, **k: 1 / 0)
  cases = [(str(a_file), f"--cache-dir: expected a folder, got '{a_file}', which is a file"),
           (str(a_file / "sub"), f"--cache-dir: expected a path inside folders, got "
            f"'{a_file / 'sub'}', whose parent '{a_file}' is a file")]
  for cache, message in cases:
    for argv in (stats, ["rewrite", model, str(a_file), "--out", str(tmp_path / "e")]):
      assert main([*argv, "--cache-dir", cache]) == 1
      assert message in _error(capsys, argv[0])
  assert a_file.read_text() == "keep me" and not os.path.exists(tmp_path / "e")

  # A cache folder that refuses writes later (as /proc does) is named as --cache-dir.
  cache = tmp_path / "cache"

  def refused(gen, layer, n, *, cache_dir, **kw):
    path = os.path.join(cache_dir, "0" * 64)
    raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)

  monkeypatch.setattr(gens, "collect_statistics", refused)
  assert main([*stats, "--cache-dir", str(cache)]) == 1
  assert (f"--cache-dir: expected a place you may write to, got '{cache}': cannot write "
          "there (No such file or directory)") in _error(capsys, "stats")


def test_sample_with_fewer_images_than_columns_is_one_row_of_the_api_images(model, edit,
                                                                          tmp_path, capsys):
  out = tmp_path / "s.png"
  assert main(["sample", model, "--edit", edit, "--images", "3,1", "--columns", "64",
               "--out", str(out)]) == 0
  capsys.readouterr()
  gen = gens.generator_from_converted(model)
  z = gen.latents([3, 1])
  new, _ = gens.edited(gen, memedit.load_edit(edit))
  before, after = gens.generate_images(gen, z), gens.generate_images(new, z)
  assert np.abs(after - before).max() > 1e-3
  want = gens.comparison_grid(before, after, columns=2)
  got = np.asarray(Image.open(out))
  assert got.shape == want.shape  # one row of 2 pairs, not 64 pairs wide with 62 blank
  np.testing.assert_array_equal(got, want)


def test_demo_refuses_files_of_the_users_in_its_output_folder_before_any_work(tmp_path,
                                                                              capsys):
  """The demo replaced demo.json / demo.png in --out whatever they held (and failed on a
  demo.edit folder of the user's only after all its work); it now checks them first (the
  weights here do not even exist), and an --out that is a file is refused."""
  out = tmp_path / "out"
  out.mkdir()
  absent = ["demo", "--weights", str(tmp_path / "no-weights"), "--work", str(tmp_path / "w"),
            "--no-progress", "--out", str(out)]
  (out / "demo.json").write_text('{"mine": 1}')
  assert main(absent) == 1
  assert ("--out: expected a new file or an earlier `memedit demo` JSON report to replace"
          in _error(capsys, "demo"))
  assert (out / "demo.json").read_text() == '{"mine": 1}'
  (out / "demo.json").unlink()
  (out / "demo-stylegan2.png").write_text("not a png")
  assert main(absent) == 1
  assert "--out: expected a new file or a PNG image to replace" in _error(capsys, "demo")
  (out / "demo-stylegan2.png").unlink()
  (out / "demo.edit").mkdir()
  (out / "demo.edit" / "notes.txt").write_text("mine")
  assert main(absent) == 1
  assert "demo.edit: expected a memedit 'edit' output folder to replace" in _error(capsys,
                                                                                  "demo")
  assert (out / "demo.edit" / "notes.txt").read_text() == "mine"
  (tmp_path / "file").write_text("x")
  assert main(absent[:-1] + [str(tmp_path / "file")]) == 1
  assert "--out: expected a folder for the demo's outputs" in _error(capsys, "demo")


@pytest.mark.parametrize("text,odd", [("\u0663", "'\u0663'"), ("1_0", "'_'"), ("+3", "'+'"),
                                      ("1e3", "'e'")])
def test_image_numbers_are_ascii_digits(text, odd):
  """int() read '٣' (Arabic-Indic three) as 3, '1_0' as 10 and '+3' as 3."""
  import re

  from memedit.cli.checks import imgnums

  with pytest.raises(ValueError, match=re.escape(
      f"--images: expected numbers or ranges like '100-115,200' (ASCII digits, '-' and ','), "
      f"got [{odd}]")):
    imgnums(text, 10)
  assert imgnums(" 3 - 5, 7", 10) == [3, 4, 5, 7]
