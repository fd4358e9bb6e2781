"""The UI session's state as a value: pure operations, and edits switched on and off in
any order giving the same bits (and the original ones with none on)."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

import memedit
from memedit.tree import get_leaf
from memedit.ui import state as st
from memedit.ui.workspace import grid_limit, parse_imgnums, search_limit


def _record(edit, kind="insert"):
  return st.EditRecord("", kind, "convt2", edit, None, None, None, np.zeros(3), 1.0, 0.5, 0.1)


def _edits(n, shape=(6, 5)):
  rs = np.random.RandomState(0)
  return [memedit.make_edit(("params", "w"), rs.standard_normal((shape[0], 1)),
                            rs.standard_normal((1, shape[1])), kind="matrix",
                            method=f"test{i}") for i in range(n)]


def test_regions_and_context_tray_are_pure():
  m = np.zeros((8, 8), np.uint8)
  m[2:4, 2:5] = 255
  s0 = st.new_state("convt2", 8, {"params": {"w": jnp.zeros((6, 5))}})
  r = st.make_region(3, m, 8)
  s1 = st.with_copy(s0, r)
  s2, c1 = st.add_context(s1, st.make_region(4, m, 8))
  s3, c2 = st.add_context(s2, st.make_region(5, m, 8))
  s4 = st.remove_context(s3, c1)
  assert s0.copy is None and s1.copy is r and s1.context == ()
  assert [c for c, _ in s3.context] == [c1, c2] and [c for c, _ in s4.context] == [c2]
  assert st.with_layer(s4, "convt3").layer == "convt3" and s4.layer == "convt2"
  with pytest.raises(ValueError, match="expected one of the tray's entries"):
    st.remove_context(s4, c1)
  with pytest.raises(ValueError, match="empty mask"):
    st.make_region(3, np.zeros((8, 8), np.uint8), 8)
  with pytest.raises(ValueError, match=r"uint8 \(8, 8\) mask"):
    st.make_region(3, m[:4], 8)
  with pytest.raises(ValueError, match="image number in"):
    st.make_region(10 ** 6, m, 8)
  with pytest.raises(ValueError, match="integer image number"):
    st.make_region(True, m, 8)


def test_edits_toggle_in_any_order_bit_exactly():
  w0 = np.random.RandomState(1).standard_normal((6, 5)).astype(np.float32)
  s = st.new_state("convt2", 8, {"params": {"w": jnp.asarray(w0)}})
  edits = _edits(3)
  for e in edits:
    s = st.add_edit(s, _record(e))
  assert [r.id for r in s.edits] == ["e1", "e2", "e3"] and all(r.active for r in s.edits)
  leaf = lambda s: np.asarray(get_leaf(s.params, ("params", "w")))
  # Against float64: W0 + Σ ΔK.
  ref = w0.astype(np.float64) + sum(np.asarray(memedit.edit_delta(e, w0.shape), np.float64)
                                    for e in edits)
  np.testing.assert_allclose(leaf(s), ref, rtol=1e-6, atol=1e-6)
  full = leaf(s)
  # Every order of switching all off gives the original bits; switching back on in any
  # order gives the same bits as before.
  for order in itertools.permutations(["e1", "e2", "e3"]):
    t = s
    for i, eid in enumerate(order):
      t = st.set_active(t, eid, False)
      assert not st.find_edit(t, eid).active
    assert np.array_equal(leaf(t), w0)
    assert t.params is t.original
    for eid in reversed(order):
      t = st.set_active(t, eid, True)
    assert np.array_equal(leaf(t), full)
  # One off: the other two, whatever the order they were made in.
  only = st.set_active(s, "e2", False)
  t = st.new_state("convt2", 8, {"params": {"w": jnp.asarray(w0)}})
  for e in (edits[2], edits[0]):
    t = st.add_edit(t, _record(e))
  assert np.array_equal(leaf(only), leaf(t))
  assert st.active_key(only) == st.active_key(t)
  dropped = st.drop_edit(s, "e1")
  assert [r.id for r in dropped.edits] == ["e2", "e3"]
  assert np.array_equal(leaf(st.revert_all(dropped)), w0)
  assert np.array_equal(leaf(s), full)  # s itself never changed
  with pytest.raises(ValueError, match="already in this session as e1"):
    st.add_edit(s, _record(edits[0]))


def test_image_numbers_and_limits():
  assert parse_imgnums("200-203, 7", 10) == [200, 201, 202, 203, 7]
  assert parse_imgnums([5, 1], 10) == [5, 1]
  for bad, msg in (("5-3", "low to high"), ("x", "numbers or ranges"), ("", "expected image"),
                   ("1,,2", "empty entry"), ("3,", "empty entry"),
                   ([1.5], "image numbers in"), ([True], "image numbers in"),
                   ("0-10", "at most 10"), ([], "empty list"), (7, "numbers or ranges"),
                   ("3-5,4", r"expected distinct image numbers, got \[4\] more than once"),
                   ([5, 1, 5], r"expected distinct image numbers, got \[5\] more than once")):
    with pytest.raises(ValueError, match=msg):
      parse_imgnums(bad, 10)
  assert (grid_limit(64), grid_limit(256), grid_limit(1024)) == (256, 16, 16)
  assert (search_limit(64), search_limit(256), search_limit(1024)) == (10000, 625, 256)
