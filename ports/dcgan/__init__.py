"""DCGAN generator (PyTorch tutorial architecture) in Flax, and its torch converter."""

from __future__ import annotations

from ports.dcgan.convert import convert_dcgan, load_dcgan, variables_from_state_dict
from ports.dcgan.editing import memedit_generator
from ports.dcgan.model import DCGANGenerator, OverlapAddConvTranspose

__all__ = ["DCGANGenerator", "OverlapAddConvTranspose", "convert_dcgan", "load_dcgan",
           "memedit_generator", "variables_from_state_dict"]
