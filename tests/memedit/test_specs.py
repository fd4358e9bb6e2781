"""Edit specs: the reference's JSON format, validation errors, and save → load round trips."""

from __future__ import annotations

import base64
import copy
import importlib.resources
import io
import json
import struct
import zlib

import jax
import numpy as np
import pytest
from PIL import Image

import memedit
from memedit import generators as gens, specs
from ports.dcgan import DCGANGenerator, memedit_generator, variables_from_state_dict
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
  gen = memedit_generator(module, variables, config)
  C = memedit.second_moment(gens.collect_statistics(gen, "convt2", 64, batch_size=32,
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
  e1 = gens.edit_from_spec(gen, spec, C).result.edit
  e2 = gens.edit_from_spec(gen, again, C).result.edit
  assert e1.name == e2.name
  assert np.array_equal(np.asarray(e1.lam), np.asarray(e2.lam))
  assert np.array_equal(np.asarray(e1.D), np.asarray(e2.D))


def test_reference_format_masks():
  # Grey-level PNGs (no alpha) are read by their grey level.
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


def _bad_png_url(data=b"not a png at all"):
  return "data:image/png;base64," + base64.b64encode(data).decode()


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
    "png without header": (lambda d: d["paste"].__setitem__(1, _bad_png_url(
        b"\x89PNG\r\n\x1a\n" + b"0" * 40)), "with its header chunk \\(IHDR\\) first, got the "
        "PNG signature followed by b'0000"),
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
    "infinite learning rate": (lambda d: d["solver"].__setitem__("learning_rate", float("inf")),
                               "solver.learning_rate: expected a finite positive number, got inf"),
    "NaN learning rate": (lambda d: d["solver"].__setitem__("learning_rate", float("nan")),
                          "solver.learning_rate: expected a finite positive number, got nan"),
    "negative learning rate": (lambda d: d["solver"].__setitem__("learning_rate", -0.05),
                               "solver.learning_rate: expected a finite positive number"),
    "string learning rate": (lambda d: d["solver"].__setitem__("learning_rate", "0.05"),
                             "got the str '0.05'"),
    "steps beyond the limit": (lambda d: d["solver"].__setitem__("steps", 1_000_000_000),
                               r"solver.steps: expected an integer in \[1, 100000\], "
                               "got 1000000000"),
    "misspelt field": (lambda d: d.__setitem__("shrinkge", 0.2),
                       r"spec: expected fields among \['key', 'object', 'paste', 'query', "
                       r"'model', .*got unknown field \['shrinkge'\] \(did you mean "
                       r"'shrinkage'"),
    "misspelt solver field": (lambda d: d["solver"].__setitem__("step", 10),
                              r"solver: expected fields among .*got \['step'\]"),
    "canvas as a string": (lambda d: d.__setitem__("canvas", "64"),
                           r"canvas: expected 64 \(the model's resolution\), got the str '64'"),
    "mask not a string": (lambda d: d["key"][0].__setitem__(1, 5),
                          "key\\[0\\] mask: expected a PNG data URL .*got the int 5"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_specs_raise_clear_errors(case):
  mutate, message = INVALID[case]
  data = _edit(mutate)
  with pytest.raises(ValueError, match=message):
    specs.spec_from_json(copy.deepcopy(data), layers=LAYERS, canvas=64)


def test_reference_fields_alone_load():
  # The reference saves "key", "object", "paste" and "query" only; memedit needs "layer".
  data = {k: v for k, v in _valid_json().items() if k in ("key", "object", "paste")}
  data.update(query=data["paste"], layer="convt2")
  spec = specs.spec_from_json(data, layers=LAYERS)
  assert spec.query[0] == spec.paste[0] == 9 and spec.kind == "insert"
  assert set(specs.FIELDS) >= set(_valid_json()) | {"query"}


def _reference_mask(url):
  """The reference's reading of a mask: the red channel, marked where above zero."""
  raw = base64.b64decode(url[len("data:image/png;base64,"):])
  return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))[:, :, 0] > 0


def _png_url(array, mode):
  buf = io.BytesIO()
  Image.fromarray(array, mode).save(buf, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_saved_masks_read_the_same_in_the_reference(tmp_path):
  soft = _box(20, 40, 8, 56)
  soft[20:22] = 128  # a soft edge survives the round trip as it is
  spec = _spec(query=(13, soft))
  path = specs.save_spec(tmp_path / "spec.json", spec)
  data = json.load(open(path))
  pairs = data["key"] + [data["object"], data["paste"], data["query"]]
  want = [m for _, m in spec.key] + [spec.object[1], spec.paste[1], spec.query[1]]
  for (_, url), mask in zip(pairs, want):
    assert np.array_equal(_reference_mask(url), mask > 0)
    assert np.array_equal(specs.data_url_to_mask(url), mask)
  assert specs.load_spec(path) == spec


def test_masks_in_every_encoding_load_to_the_same_array():
  m = _box(2, 5, 1, 7, canvas=8)
  m[2, 1] = 77
  rgb = np.repeat(m[:, :, None], 3, axis=2)  # the reference's way: RGB, no alpha
  white = np.full(m.shape + (4,), 255, np.uint8)
  white[:, :, 3] = m  # memedit's earlier way: white, the mask in alpha
  painted = np.zeros(m.shape + (4,), np.uint8)
  painted[m > 0] = 255
  painted[:, :, 3] = m  # the reference's paint widget: white strokes, coverage in alpha
  for url in (_png_url(rgb, "RGB"), _png_url(white, "RGBA"), _png_url(painted, "RGBA"),
              specs.mask_to_data_url(m)):
    assert np.array_equal(specs.data_url_to_mask(url), m)
  # The bundled demo spec reads the same in the reference as in memedit.
  text = importlib.resources.files("memedit").joinpath("data/demo_spec.json").read_text()
  data = json.loads(text)
  for _, url in data["key"] + [data["object"], data["paste"], data["query"]]:
    assert np.array_equal(_reference_mask(url), specs.data_url_to_mask(url) > 0)


def _chunk(tag, body):
  return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def _huge_png_url(side):
  """A PNG whose header declares side × side pixels (its data is never reached)."""
  header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
  png = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b""))
         + _chunk(b"IEND", b""))
  return "data:image/png;base64," + base64.b64encode(png).decode()


def test_huge_masks_are_refused_before_decoding(tmp_path):
  data = _valid_json()
  data["key"][1][1] = _huge_png_url(20000)
  path = tmp_path / "huge.json"
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match=r"huge.json: key\[1\] mask: expected size 64x64 \(the "
                     r"canvas\), got 20000x20000"):
    specs.load_spec(path)
  # Without a canvas to compare with, the size is bounded all the same.
  del data["canvas"]
  data["paste"][1] = _huge_png_url(20000)
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match=r"huge.json: paste mask: expected a mask of at most "
                     r"4096x4096 pixels, got 20000x20000"):
    specs.load_spec(path)
  data["canvas"] = 20000
  path.write_text(json.dumps(data))
  with pytest.raises(ValueError, match=r"canvas: expected an integer in \[1, 4096\], got 20000"):
    specs.load_spec(path)


def test_deeply_nested_spec_file_is_refused(tmp_path):
  path = tmp_path / "deep.json"
  path.write_text('{"layer": "convt2", "key": ' + "[" * 100_000 + "]" * 100_000 + "}")
  with pytest.raises(ValueError, match=r"deep.json: expected a JSON edit spec, got lists or "
                     r"objects nested deeper than the parser allows .* in field 'key'"):
    specs.load_spec(path)


def test_non_utf8_spec_file_names_the_file_and_field(tmp_path):
  text = json.dumps(_valid_json()).replace('"convt2"', '"convt\\u00e92"')
  path = tmp_path / "latin1.json"
  path.write_bytes(text.encode().replace(b"\\u00e9", b"\xe9"))
  with pytest.raises(ValueError, match=r"latin1.json: expected UTF-8 text, got the byte 0xe9 "
                     r"at offset \d+ \(in field 'layer'\), which is not UTF-8"):
    specs.load_spec(path)
  path.write_bytes(b"\xff\xfe" + text.encode("utf-16-le"))
  with pytest.raises(ValueError, match=r"latin1.json: expected UTF-8 text, got the byte 0xff "
                     r"at offset 0"):
    specs.load_spec(path)


def test_invalid_json_file(tmp_path):
  p = tmp_path / "broken.json"
  p.write_text("{not json")
  with pytest.raises(ValueError, match="invalid JSON"):
    specs.load_spec(p)
  # A field named twice would keep only its last value: refused, naming the field.
  p.write_text('{"layer": "up1", "rank": 1, "layer": "up2"}')
  with pytest.raises(ValueError, match="expected each field of an object once, got 'layer' "
                                       "more than once"):
    specs.load_spec(p)


def test_spec_must_fit_the_model(tiny):
  gen, C = tiny
  spec = specs.make_spec(key=[(0, _box(1, 3, 1, 3, canvas=8))], object=(1, _box(1, 3, 1, 3, 8)),
                         paste=(2, _box(1, 3, 1, 3, 8)), layer="convt2")
  with pytest.raises(ValueError, match="canvas: expected 64"):
    gens.edit_from_spec(gen, spec, C)


def test_truncated_png_masks_are_refused_and_complete_ones_decode():
  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

  def png(rows, interlace=0):
    header = struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, interlace)
    data = zlib.compress(b"".join(b"\x00" + bytes(r) for r in rows))
    return ("data:image/png;base64," + base64.b64encode(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data)
        + chunk(b"IEND", b"")).decode())

  # Three of eight rows: a decoder would give zeros for the rest without a word.
  with pytest.raises(ValueError, match=r"paste mask: expected PNG image data of 8x8 pixels "
                                       r"\(72 bytes once inflated\), got 27 bytes"):
    specs.data_url_to_mask(png([[255] * 8] * 3), "paste mask", size=8)
  full = np.arange(64, dtype=np.uint8).reshape(8, 8)
  np.testing.assert_array_equal(specs.data_url_to_mask(png(full), size=8), full)
  # Interlaced (Adam7): seven passes of sub-images, the smaller total counted as complete.
  passes = [full[y0::dy, x0::dx] for x0, y0, dx, dy in
            ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
             (0, 1, 1, 2))]
  url = png([row for p in passes for row in p], interlace=1)
  np.testing.assert_array_equal(specs.data_url_to_mask(url, size=8), full)
  with pytest.raises(ValueError, match="a truncated image"):
    specs.data_url_to_mask(png([row for p in passes[:6] for row in p], interlace=1), size=8)
