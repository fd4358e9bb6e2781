"""Shared test set-up: makes tests/ importable (peers.py, helpers) and fixes seeds."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax

# Exactness checks compare float32 results at 1e-5: full-precision matmuls everywhere
# (a no-op on the CPU; on GPUs the default would be TF32).
jax.config.update("jax_default_matmul_precision", "highest")
