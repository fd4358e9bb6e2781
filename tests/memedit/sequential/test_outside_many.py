"""Many edits kept apart, tried from outside: long logs over several layers of a small
model, damaged log files, complex inputs to the null-space projection, unusual masks and
mask budgets of edit specs."""

from __future__ import annotations

import base64
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import memedit
from memedit import sequential as sq
from memedit import specs
from memedit.tree import get_leaf

FC = ("enc", "fc", "kernel")     # a Dense kernel (in 6, out 4)
CONV = ("enc", "conv", "kernel")  # a Conv kernel (3, 3, in 3, out 2)


def small_model():
  """Parameters of a small two-layer model, as a Linen variables dict."""
  rng = np.random.default_rng(7)
  return {"enc": {"fc": {"kernel": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32),
                         "bias": jnp.zeros((4,), jnp.float32)},
                  "conv": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 3, 2)),
                                                 jnp.float32)}}}


def long_log(n, seed=0):
  """n rank-1 or rank-2 edits alternating between the Dense and the Conv kernel."""
  rng = np.random.default_rng(seed)
  params = small_model()
  log = sq.log_init()
  for i in range(n):
    path, kind = (FC, "dense") if i % 2 == 0 else (CONV, "conv")
    shape = np.shape(get_leaf(params, path))
    rank = 1 + i % 3 // 2
    D = rng.standard_normal((rank, memedit.key_dim(shape, kind))).astype(np.float32)
    lam = 0.1 * rng.standard_normal(memedit.lambda_shape(shape, rank, kind))
    edit = memedit.make_edit(path, lam.astype(np.float32), D, kind=kind, label=f"e{i:02d}")
    log = sq.log_append(log, edit, rng.standard_normal((2, D.shape[1])),
                        rng.standard_normal((2, 3)))
  return params, log


def same_bits(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(
      np.asarray(x).dtype == np.asarray(y).dtype
      and np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
      for x, y in zip(la, lb))


def test_applying_a_long_log_computes_each_leaf_once_with_apply_edits_bits(monkeypatch):
  params, log = long_log(40)
  log = sq.log_revert(log, "e17")
  # memedit.apply_edit of each active edit in turn, the reference of the bits
  want, history = params, None
  for entry in log.entries:
    if entry.active:
      want, history = memedit.apply_edit(want, entry.edit, history)
  calls = []
  real = memedit.edit_value.kernel_delta

  def counting(*args, **kwargs):
    calls.append(1)
    return real(*args, **kwargs)

  monkeypatch.setattr(memedit.edit_value, "kernel_delta", counting)
  got, got_history = sq.log_history(params, log)
  assert same_bits(got, want)
  assert got_history.names == history.names
  for path in history.fingerprints:
    assert np.array_equal(got_history.fingerprints[path], history.fingerprints[path])
  # Each active edit's ΔK is formed a bounded number of times (39 active edits), not once
  # per later edit on its leaf (about 20²/2 per leaf).
  assert len(calls) <= 2 * len(log.active)
  monkeypatch.undo()
  # The history continues as memedit's own: reverting through it gives the log's bits.
  back, _ = memedit.revert_edit(got, "e20", got_history)
  assert same_bits(back, sq.log_apply(params, sq.log_revert(log, "e20")))
  # The float64 sum K0 + Σ ΔK over the active edits.
  for path in (FC, CONV):
    k0 = np.asarray(get_leaf(params, path), np.float64)
    ref = k0 + sum(np.asarray(memedit.edit_delta(e.edit, k0.shape), np.float64)
                   for e in log.entries if e.active and e.edit.path == path)
    np.testing.assert_allclose(np.asarray(get_leaf(got, path)), ref, rtol=0,
                               atol=1e-5)


def test_a_log_applied_to_a_model_of_other_shapes_names_the_entry():
  params, log = long_log(3)
  other = jax.tree_util.tree_map(lambda x: x, params)
  other["enc"]["conv"]["kernel"] = jnp.zeros((3, 3, 5, 2), jnp.float32)
  with pytest.raises(ValueError, match=r"params: expected parameters the log's edits fit, "
                     r"got edits\[1\] \('e01', at \('enc', 'conv', 'kernel'\)\): D: "
                     r"expected shape .* for a kernel of shape \(3, 3, 5, 2\).*is the log "
                     r"of another model\?"):
    sq.log_apply(other, log)
  # A model of the same shapes takes the log (the log holds factors, not weights).
  same = jax.tree_util.tree_map(lambda x: x + 1, params)
  assert same_bits(sq.log_apply(same, log)["enc"]["fc"]["bias"], same["enc"]["fc"]["bias"])


def _rewrite(src, dst, arrays=None, meta=None):
  with np.load(src) as z:
    data = {k: z[k] for k in z.files}
  record = json.loads(bytes(data.pop("meta")).decode())
  if meta:
    meta(record)
  if arrays:
    arrays(data)
  data["meta"] = np.frombuffer(json.dumps(record).encode(), np.uint8)
  np.savez(dst, **data)
  return dst


def test_a_log_file_with_big_endian_arrays_loads_and_text_arrays_are_named(tmp_path):
  params, log = long_log(3)
  f = sq.save_log(tmp_path / "log.npz", log)

  def swap(data):
    for name in list(data):
      if name != "meta":
        data[name] = data[name].astype(data[name].dtype.newbyteorder(">"))

  back = sq.load_log(_rewrite(f, tmp_path / "big.npz", arrays=swap))
  assert back.names == log.names
  for a, b in zip(back.entries, log.entries):
    assert np.array_equal(np.asarray(a.keys), np.asarray(b.keys))
    assert a.edit.fingerprint == b.edit.fingerprint
  assert same_bits(sq.log_apply(params, back), sq.log_apply(params, log))

  def text(data):
    data["e1_values"] = np.array(["a", "b"])

  with pytest.raises(ValueError, match=r"entry 1 \('e01'\): e1_values: expected an array "
                     r"of numbers .*got dtype <U1; the file is damaged"):
    sq.load_log(_rewrite(f, tmp_path / "text.npz", arrays=text))


def test_a_log_file_whose_records_and_arrays_disagree_is_refused(tmp_path):
  _, log = long_log(4)
  f = sq.save_log(tmp_path / "log.npz", log)
  cases = {
      "fewer": (lambda m: m.__setitem__("entries", m["entries"][:2]), None,
                r"expected only the arrays its 2 entries' records name, got 8 more "
                r"\(e2_D, e2_keys, e2_lam, e2_values, e3_D, …\)"),
      "values flag": (lambda m: m["entries"][1].__setitem__("values", False), None,
                      r"got 1 more \(e1_values\)"),
      "stray": (None, lambda a: a.__setitem__("e9_keys", a["e0_keys"]),
                r"got 1 more \(e9_keys\)"),
      "name": (lambda m: m["entries"][2].__setitem__("name", "e03"), None,
               r"entry 2: expected the name 'e02' its label and factors give, got 'e03'"),
  }
  for label, (meta, arrays, match) in cases.items():
    bad = _rewrite(f, tmp_path / f"{label}.npz", arrays=arrays, meta=meta)
    with pytest.raises(ValueError, match=match + ".*the file is damaged"):
      sq.load_log(bad)
  assert sq.load_log(f).names == log.names


def test_the_null_space_refuses_complex_inputs_instead_of_dropping_their_imaginary_part():
  C = np.diag([1.0, 1e-4, 1e-4])
  Cc = C + np.array([[0, 0.5j, 0], [-0.5j, 0, 0], [0, 0, 0]])  # Hermitian, not PSD
  key = np.array([[0.0, 1.0, 0.0]])
  calls = (
      ("C", lambda: sq.null_space(Cc)),
      ("keys", lambda: sq.null_space(C, key * 1j)),
      ("weights", lambda: sq.null_space(C, key, np.array([1j]))),
      ("keys", lambda: sq.key_moment(key + 1j)),
      ("D", lambda: sq.project_directions(key + 1j, np.eye(3))),
      ("values", lambda: sq.insert_null_space(np.zeros((2, 3)), key, np.ones((1, 2)) * 1j,
                                              np.eye(3))),
      ("C", lambda: sq.sequential_directions(sq.log_init(), Cc, key, ("k",))),
      (r"params at \('k',\)", lambda: sq.sequential_insert(
          {"k": np.zeros((3, 2), np.complex64)}, sq.log_init(), C, key, np.ones((1, 2)),
          ("k",), l2=1e-3)),
  )
  for name, call in calls:
    with pytest.raises(ValueError, match=name + r": expected real numbers \(float, int or "
                       r"bool\), got dtype complex"):
      call()


def _png_url(image):
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  return specs.masks.PNG_DATA_URL + base64.b64encode(buf.getvalue()).decode()


def test_a_sixteen_bit_grey_mask_is_scaled_not_clipped():
  from PIL import Image

  levels = np.array([[0, 128, 257 * 64, 32768, 65535, 1000]], np.uint16)
  url = _png_url(Image.fromarray(levels))
  got = specs.data_url_to_mask(url)
  want = np.round(levels.astype(np.float64) * 255.0 / 65535.0)
  np.testing.assert_array_equal(got, want.astype(np.uint8))
  assert got.dtype == np.uint8


def test_a_mask_outside_zero_one_is_refused_not_clipped():
  soft = np.zeros((8, 8))
  soft[2:5, 2:6] = [64.0, 128.0, 255.0, 255.0]  # a 0..255 mask as floats
  for mask, shown in ((soft, r"\[0, 255\]"), (-soft / 255.0, r"\[-1, 0\]"),
                      (soft.astype(np.uint16) * 257, r"\[0, 65535\]")):
    with pytest.raises(ValueError, match=r"key\[0\] mask: expected numbers in \[0, 1\] "
                       r"\(or a uint8 mask of 0..255\), got values in " + shown):
      specs.make_spec(key=[(0, mask)], object=(1, soft / 255), paste=(2, soft / 255),
                      layer="fc")
  with pytest.raises(ValueError, match=r"mask: expected numbers in \[0, 1\]"):
    specs.mask_to_data_url(soft)
  spec = specs.make_spec(key=[(0, soft / 255)], object=(1, soft.astype(np.uint8)),
                         paste=(2, soft > 0), layer="fc")
  assert spec.key[0][1].tolist() == spec.object[1].tolist()


def test_the_masks_of_a_spec_are_counted_before_any_is_decoded(monkeypatch):
  m = np.zeros((8, 8), np.uint8)
  m[2:4, 2:4] = 255
  url = specs.mask_to_data_url(m)
  data = {"key": [[i, url] for i in range(4)], "object": [5, url], "paste": [6, url],
          "layer": "fc", "canvas": 8}
  monkeypatch.setattr(specs, "MAX_MASK_PIXELS", 6 * 8 * 8)
  assert len(specs.spec_from_json(data).key) == 4  # 6 masks: at the limit

  def decoded(*args, **kwargs):
    raise AssertionError("a mask was decoded")

  monkeypatch.setattr(specs, "data_url_to_mask", decoded)
  data["key"].append([4, url])
  with pytest.raises(ValueError, match=r"key: expected at most 4 \[imgnum, mask\] pairs at "
                     r"canvas 8 \(at most 384 mask pixels in a spec\), got 5; no mask was "
                     r"decoded"):
    specs.spec_from_json(data)


def test_an_edit_of_another_log_with_the_same_name_is_not_reverted_in_its_place():
  params, log = long_log(3)
  mine = log.entries[1].edit
  other = memedit.make_edit(mine.path, 2 * np.asarray(mine.lam), mine.D, kind=mine.kind,
                            label=mine.name)
  for op in (sq.log_revert, sq.log_entry):
    with pytest.raises(ValueError, match=r"edit: expected the log's edit 'e01' \(fingerprint "
                       r"[0-9a-f]{16}\), got another edit of that name \(fingerprint "
                       r"[0-9a-f]{16}\)"):
      op(log, other)
  reverted = sq.log_revert(log, mine)  # the log's own edit, by value
  assert reverted.active == ("e00", "e02")
  same = memedit.make_edit(mine.path, mine.lam, mine.D, kind=mine.kind, label=mine.name)
  assert sq.log_replay(reverted, same).active == log.active
