"""Shared test set-up: makes tests/ importable (peers.py, helpers) and fixes seeds."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
