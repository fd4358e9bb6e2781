"""Edit specs: the reference's JSON format, validation errors, and save → load round trips."""

from __future__ import annotations

import base64
import copy
import io
import json

import jax
import numpy as np
import pytest
from PIL import Image

import memedit
from memedit import rewrite as rw, specs
from ports.dcgan import DCGANGenerator, variables_from_state_dict
from ports.dcgan.convert import expected_shapes

LAYERS = ["convt1", "convt2", "convt3", "convt4"]


def _box(y0, y1, x0, x1, canvas=64):
  m = np.zeros((canvas, canvas), np.uint8)
  m[y0:y1, x0:x1] = 255
  return m


def _spec(**kw):
  eyes = _box(24, 36, 8, 56)
  return specs.make_spec(key=[(9, eyes), (13, eyes)], object=(29, _box(20, 40, 8, 56)),
                         paste=(9, _box(22, 42, 8, 56)), layer="convt2", canvas=64,
                         solver={"steps": 30}, **kw)


def tiny_dcgan_state_dict(ngf=4, seed=0):
  """A random torch-layout DCGAN state dict (numpy), tutorial architecture, small ngf."""
  rs = np.random.RandomState(seed)
  sd = {}
  for name, shape in expected_shapes(100, ngf, 3).items():
    if name.endswith("running_var"):
      sd[name] = (1.0 + 0.1 * np.abs(rs.standard_normal(shape))).astype(np.float32)
    elif name.endswith(".weight") and len(shape) == 1:
      sd[name] = (1.0 + 0.1 * rs.standard_normal(shape)).astype(np.float32)
    else:
      sd[name] = (0.2 * rs.standard_normal(shape)).astype(np.float32)
  return sd


@pytest.fixture(scope="module")
def tiny():
  variables, config = variables_from_state_dict(tiny_dcgan_state_dict())
  module = DCGANGenerator(z_dim=100, ngf=4)
  variables = jax.tree_util.tree_map(jax.numpy.asarray, variables)
  gen = rw.generator_from_config(module, variables, config)
  C = memedit.second_moment(rw.collect_statistics(gen, "convt2", 64, batch_size=32,
                                                  progress=False))
  return gen, C


def test_round_trip_gives_the_identical_spec_and_edit(tmp_path, tiny):
  gen, C = tiny
  spec = _spec(query=(13, _box(24, 36, 8, 56)), shrinkage=0.2, taps="own")
  path = specs.save_spec(tmp_path / "spec.json", spec)
  loaded = specs.load_spec(path, layers=LAYERS, canvas=64)
  assert loaded == spec and loaded.shrinkage == 0.2 and loaded.taps == "own"
  assert specs.spec_from_json(_valid_json()).taps == "all"  # the reference's default
  for which in ("key", "object", "paste", "query"):
    for (i, a), (j, b) in zip(spec.masks(which), loaded.masks(which)):
      assert i == j and np.array_equal(a, b)
  again = specs.load_spec(specs.save_spec(tmp_path / "again.json", loaded))
  assert json.load(open(tmp_path / "again.json")) == json.load(open(path))
  e1 = rw.edit_from_spec(gen, spec, C).result.edit
  e2 = rw.edit_from_spec(gen, again, C).result.edit
  assert e1.name == e2.name
  assert np.array_equal(np.asarray(e1.lam), np.asarray(e2.lam))
  assert np.array_equal(np.asarray(e1.directions), np.asarray(e2.directions))


def test_reference_format_masks():
  # Grey-level PNGs (no alpha) are read by their grey level, RGBA ones by their alpha.
  m = _box(2, 5, 1, 7, canvas=8)
  buf = io.BytesIO()
  Image.fromarray(m, "L").save(buf, format="PNG")
  url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
  assert np.array_equal(specs.data_url_to_mask(url), m)
  assert np.array_equal(specs.data_url_to_mask(specs.mask_to_data_url(m)), m)
  data = {"key": [[0, url]], "object": [1, url], "paste": [2, url], "layer": "convt2"}
  spec = specs.spec_from_json(data)
  assert spec.canvas == 8 and spec.method == "zca" and spec.rank == 1
  assert spec.solver == specs.DEFAULT_SOLVER and spec.imgnums() == {0, 1, 2}


def _valid_json():
  return specs.spec_to_json(_spec())


def _bad_png_url():
  return "data:image/png;base64," + base64.b64encode(b"not a png at all").decode()


def _edit(fn):
  data = _valid_json()
  fn(data)
  return data


INVALID = {
    "missing field": (lambda d: d.pop("paste"), "missing \\['paste'\\]"),
    "missing object": (lambda d: d.pop("object"), "missing \\['object'\\]"),
    "bad base64": (lambda d: d["key"][0].__setitem__(1, "data:image/png;base64,@@@"),
                   "invalid base64"),
    "not a data url": (lambda d: d["object"].__setitem__(1, "mask.png"), "PNG data URL"),
    "bad png": (lambda d: d["paste"].__setitem__(1, _bad_png_url()), "not a PNG"),
    "empty mask": (lambda d: d["key"][1].__setitem__(
        1, specs.mask_to_data_url(np.zeros((64, 64), np.uint8))), "non-empty mask"),
    "mask size": (lambda d: d["object"].__setitem__(
        1, specs.mask_to_data_url(_box(1, 4, 1, 4, canvas=32))), "expected size 64x64"),
    "imgnum range": (lambda d: d["key"][0].__setitem__(0, 10000), "image number in"),
    "negative imgnum": (lambda d: d["paste"].__setitem__(0, -1), "image number in"),
    "unknown layer": (lambda d: d.__setitem__("layer", "convt7"), "layer: expected one of"),
    "unknown method": (lambda d: d.__setitem__("method", "pca"), "method: expected"),
    "bad solver": (lambda d: d["solver"].__setitem__("optimizer", "sgd"), "solver.optimizer"),
    "shrinkage range": (lambda d: d.__setitem__("shrinkage", 1.0),
                        "shrinkage: expected a number in \\[0, 1\\), got 1.0"),
    "shrinkage type": (lambda d: d.__setitem__("shrinkage", "0.2"), "shrinkage: expected"),
    "shrinkage with units": (lambda d: d.update(method="unit", shrinkage=0.2),
                             "expected 0 with method 'unit'"),
    "unknown taps": (lambda d: d.__setitem__("taps", "centre"),
                     "taps: expected one of \\('all', 'own'\\), got 'centre'"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_specs_raise_clear_errors(case):
  mutate, message = INVALID[case]
  data = _edit(mutate)
  with pytest.raises(ValueError, match=message):
    specs.spec_from_json(copy.deepcopy(data), layers=LAYERS, canvas=64)


def test_invalid_json_file(tmp_path):
  p = tmp_path / "broken.json"
  p.write_text("{not json")
  with pytest.raises(ValueError, match="invalid JSON"):
    specs.load_spec(p)


def test_spec_must_fit_the_model(tiny):
  gen, C = tiny
  spec = specs.make_spec(key=[(0, _box(1, 3, 1, 3, canvas=8))], object=(1, _box(1, 3, 1, 3, 8)),
                         paste=(2, _box(1, 3, 1, 3, 8)), layer="convt2")
  with pytest.raises(ValueError, match="canvas: expected 64"):
    rw.edit_from_spec(gen, spec, C)
