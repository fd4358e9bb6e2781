"""Layer kinds the tests register stay local to the test that registers them."""

from __future__ import annotations

import pytest

from memedit.layers import kinds


@pytest.fixture(autouse=True)
def _forget_test_layer_kinds():
  before = set(kinds._KINDS)
  yield
  for cls in set(kinds._KINDS) - before:
    mod = cls.__module__.rsplit(".", 1)[-1]
    if mod == "models" or mod.startswith("test_"):  # test classes; library, port kinds stay
      del kinds._KINDS[cls]
