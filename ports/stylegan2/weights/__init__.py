"""The project's trained StyleGAN2: 64×64 faces distilled from the DCGAN face generator.

``faces64.pt`` is a rosinality checkpoint (``{'g_ema': state_dict, 'latent_avg': w̄}``,
the torch zip layout, written without torch by :func:`ports.stylegan2.save_rosinality`):
a :class:`ports.stylegan2.StyleGAN2Generator` at 64 px, style_dim 100, 4 mapping layers,
channels 256, 192, 128, 64, 32 (2.1 M parameters). It loads in rosinality's PyTorch
``Generator(64, 100, 4)`` with those channel widths and in memedit through
``memedit convert`` / :func:`ports.stylegan2.convert_rosinality`.

Licence: MIT, derived from the MIT-licensed DCGAN weights of gan-face-generate==1.1.1 (its
teacher: the student regresses the teacher's image of each latent, see
:mod:`ports.stylegan2.train`). Reproduce it with::

  pip download --no-deps gan-face-generate==1.1.1 -d .cache/demo
  memedit demo --weights .cache/demo --no-stylegan2   # converts the teacher
  python -m ports.stylegan2.train train --teacher .cache/demo/faces-dcgan \\
      --run-dir .cache/sg2-faces --steps 10000
  python -m ports.stylegan2.train export --run-dir .cache/sg2-faces --out faces64.pt
"""

from __future__ import annotations

import os

__all__ = ["FACES64", "FACES64_SHA256", "FACES64_STEPS"]

#: Path of the shipped checkpoint.
FACES64 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faces64.pt")
#: Its sha256.
FACES64_SHA256 = "8da76b66c1998af607e77c7ed4f92a2bb8d449ab9ef72f152f64bb52a1850986"
#: Training steps (batch 16) of the run it was exported from.
FACES64_STEPS = 10000
