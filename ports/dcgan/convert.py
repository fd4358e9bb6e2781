"""Converting a PyTorch DCGAN generator checkpoint to a Flax checkpoint.

The torch generator is ``nn.Sequential`` ``main``: ConvTranspose2d at indices 0, 3, 6, 9, 12
(weights ``(C_in, C_out, 4, 4)``, no bias) and BatchNorm2d at 1, 4, 7, 10 (``weight``,
``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``).

A torch transposed convolution scatters each input pixel through the kernel:
``out[o, s y + a - p, s x + b - p] += in[i, y, x] w[i, o, a, b]``. Flax's
``ConvTranspose`` (``transpose_kernel=False``) dilates the input by the stride, pads it
with ``k - 1 - p`` and cross-correlates with an HWIO kernel, which is the same map when
``kernel[a, b, i, o] = w[i, o, k - 1 - a, k - 1 - b]`` (spatial flip, in/out kept).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from memedit import _io
from ports import (check_finite, check_variables, find_generator_entry, shown_keys, to_numpy,
                   validate_state_dict)
from ports.dcgan.model import (BN_EPSILON, KERNEL, NUM_LAYERS, RESOLUTION, DCGANGenerator,
                               layer_channels)

__all__ = ["ARCHITECTURE", "BN_FIELDS", "BN_INDICES", "CONV_INDICES", "check_state_dict",
           "convert_dcgan", "expected_shapes", "find_state_dict", "find_state_dict_entry",
           "flax_kernel_to_torch",
           "load_dcgan", "torch_convt_to_flax", "variables_from_state_dict"]

ARCHITECTURE = "dcgan"
CONV_INDICES = (0, 3, 6, 9, 12)
BN_INDICES = (1, 4, 7, 10)
BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


def _is_generator(sd: Any) -> bool:
  check_state_dict(sd)
  return True


def find_state_dict_entry(obj: Any, where: str = "DCGAN checkpoint"
                          ) -> tuple[dict[str, np.ndarray], str | None]:
  """The generator state dict inside a loaded checkpoint, and the entry that held it.

  Accepts ``{'netG_state_dict': sd, ...}`` (the format of the tutorial's training
  script), ``sd`` itself, or a training checkpoint with exactly one complete DCGAN
  generator state dict among its entries (``{'state_dict': sd}``, ``{'model': sd,
  'optimizer': ..., 'epoch': 3}``, ``{'generator': sd}``, a Lightning
  ``{'state_dict': {'generator.main.0.weight': ...}}``; see
  :func:`ports.find_generator_entry`). ``module.`` prefixes left by ``DataParallel`` and
  ``_orig_mod.`` prefixes left by ``torch.compile`` are removed.

  Returns:
    ``(sd, entry)``: ``entry`` names where ``sd`` was found (None: ``obj`` itself, or
    nothing found, in which case ``obj`` is returned for :func:`check_state_dict` to
    describe).

  Raises:
    ValueError: ``obj`` is not a dict, or two entries hold DCGAN generators.
  """
  if not isinstance(obj, dict):
    raise ValueError(f"{where}: expected a dict, got {type(obj).__name__}")
  return find_generator_entry(obj, _is_generator, preferred=("netG_state_dict", "state_dict"),
                              what="DCGAN generator state dict", where=where)


def find_state_dict(obj: Any, where: str = "DCGAN checkpoint") -> dict[str, np.ndarray]:
  """The generator state dict inside a loaded checkpoint (:func:`find_state_dict_entry`
  without the entry)."""
  return find_state_dict_entry(obj, where)[0]


def expected_shapes(z_dim: int, ngf: int, channels: int) -> dict[str, tuple]:
  """Torch state-dict names and shapes of a DCGAN generator (BN step counters excluded)."""
  sizes = layer_channels(z_dim, ngf, channels)
  shapes = {}
  for layer, idx in enumerate(CONV_INDICES):
    shapes[f"main.{idx}.weight"] = (sizes[layer], sizes[layer + 1], KERNEL, KERNEL)
  for layer, idx in enumerate(BN_INDICES):
    for field in BN_FIELDS:
      shapes[f"main.{idx}.{field}"] = (sizes[layer + 1],)
  return shapes


def _as_arrays(sd: Any) -> Any:
  """A state dict's torch tensors (handed in by a caller) as numpy arrays."""
  if isinstance(sd, dict) and any(hasattr(v, "detach") for v in sd.values()):
    return {k: to_numpy(v) for k, v in sd.items()}
  return sd


def check_state_dict(sd: dict[str, Any], where: str = "DCGAN checkpoint"
                     ) -> tuple[int, int, int]:
  """Validates a torch DCGAN state dict (numpy arrays or torch tensors) and returns
  ``(z_dim, ngf, channels)``.

  Raises:
    ValueError: keys are missing, unexpected or not strings, values are not numeric
      tensors, shapes do not fit the architecture, a weight is not floating-point (e.g.
      the int8 of a quantised checkpoint), holds NaN or infinite values, or a batch
      norm's running variance is negative (the message names it and ``where``).
  """
  sd = _as_arrays(sd)
  if not isinstance(sd, dict):
    validate_state_dict(sd, where)  # raises: names what was received
  first, last = sd.get("main.0.weight"), sd.get("main.12.weight")
  if not (isinstance(first, np.ndarray) and first.ndim == 4 and isinstance(last, np.ndarray)
          and last.ndim == 4):
    got = ", ".join(
        f"{k} " + ("missing" if v is None else f"of shape {tuple(np.shape(v))}"
                   if isinstance(v, np.ndarray) else f"a {type(v).__name__}")
        for k, v in (("main.0.weight", first), ("main.12.weight", last)))
    raise ValueError(f"{where}: expected 4-d tensors 'main.0.weight' and "
                     f"'main.12.weight', found keys {shown_keys(sd)} ({got})")
  validate_state_dict(sd, where)
  z_dim, ngf8 = first.shape[:2]
  if min(first.shape) < 1 or min(last.shape) < 1:
    raise ValueError(f"{where}: expected non-empty tensors, got main.0.weight of "
                     f"shape {first.shape} and main.12.weight of shape {last.shape}")
  if ngf8 % 8:
    raise ValueError(f"{where}: main.0.weight: expected output channels divisible by 8 "
                     f"(8 ngf), got {ngf8}")
  ngf, channels = ngf8 // 8, last.shape[1]
  shapes = expected_shapes(z_dim, ngf, channels)
  counters = {f"main.{i}.num_batches_tracked" for i in BN_INDICES}
  missing = sorted(set(shapes) - set(sd), key=str)
  extra = sorted(set(sd) - set(shapes) - counters, key=str)
  if missing or extra:
    raise ValueError(f"{where}: missing keys {missing}, unexpected keys {extra}")
  for name, shape in shapes.items():
    got = tuple(np.shape(sd[name]))
    if got != shape:
      raise ValueError(f"{where}: {name}: expected shape {shape} "
                       f"(z_dim {z_dim}, ngf {ngf}, channels {channels}), got {got}")
    dtype = np.asarray(sd[name]).dtype
    if not (dtype.kind == "f" or dtype.kind == "V"):  # 'V': bfloat16 and float8
      raise ValueError(f"{where}: {name}: expected floating-point weights, got {dtype} "
                       "(quantised or damaged checkpoints are not supported)")
    check_finite(name, sd[name], where)
    if name.endswith(".running_var"):
      negative = int((np.asarray(sd[name], np.float32) < 0).sum())
      if negative:
        raise ValueError(f"{where}: {name}: expected non-negative variances, got "
                         f"{negative} negative of {np.size(sd[name])} values (batch norm "
                         "would give NaN)")
  return int(z_dim), int(ngf), int(channels)


def torch_convt_to_flax(weight: np.ndarray) -> np.ndarray:
  """Torch ``ConvTranspose2d`` weight ``(C_in, C_out, kh, kw)`` -> Flax HWIO kernel.

  ``kernel[a, b, i, o] = weight[i, o, kh - 1 - a, kw - 1 - b]``.
  """
  return np.ascontiguousarray(np.transpose(weight[:, :, ::-1, ::-1], (2, 3, 0, 1)))


def flax_kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
  """Inverse of :func:`torch_convt_to_flax`: HWIO kernel -> ``(C_in, C_out, kh, kw)``."""
  return np.ascontiguousarray(np.transpose(kernel, (2, 3, 0, 1))[:, :, ::-1, ::-1])


def variables_from_state_dict(sd: dict[str, np.ndarray], where: str = "DCGAN checkpoint"
                              ) -> tuple[dict, dict]:
  """Torch DCGAN state dict (numpy arrays or torch tensors) -> ``(variables, config)`` for
  :class:`DCGANGenerator`.

  Returns:
    variables: ``{'params': {'convt0': {'kernel'}, ..., 'bn0': {'scale', 'bias'}, ...},
      'batch_stats': {'bn0': {'mean', 'var'}, ...}}`` as float32 numpy arrays.
    config: ``architecture``, ``resolution``, ``z_dim``, ``ngf``, ``image_channels``,
      ``channels`` (sizes along the network), ``bn_epsilon``.
  """
  sd = _as_arrays(sd)
  z_dim, ngf, channels = check_state_dict(sd, where)
  f32 = lambda a: np.asarray(a, dtype=np.float32)
  params, stats = {}, {}
  for layer, idx in enumerate(CONV_INDICES):
    params[f"convt{layer}"] = {"kernel": f32(torch_convt_to_flax(sd[f"main.{idx}.weight"]))}
  for layer, idx in enumerate(BN_INDICES):
    params[f"bn{layer}"] = {"scale": f32(sd[f"main.{idx}.weight"]),
                            "bias": f32(sd[f"main.{idx}.bias"])}
    stats[f"bn{layer}"] = {"mean": f32(sd[f"main.{idx}.running_mean"]),
                           "var": f32(sd[f"main.{idx}.running_var"])}
  config = {
      "architecture": ARCHITECTURE,
      "resolution": RESOLUTION,
      "z_dim": z_dim,
      "ngf": ngf,
      "image_channels": channels,
      "channels": layer_channels(z_dim, ngf, channels),
      "num_layers": NUM_LAYERS,
      "bn_epsilon": BN_EPSILON,
  }
  return {"params": params, "batch_stats": stats}, config


def convert_dcgan(src_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                  force: bool = False) -> str:
  """Converts a torch DCGAN generator checkpoint into a Flax checkpoint directory.

  The source is read with :func:`ports.torchfile.load_torch` (no torch, no code run).
  The destination is written atomically: an interrupted conversion leaves no partial
  checkpoint and keeps any earlier one at ``out_dir``.

  Args:
    src_path: torch checkpoint (zip or legacy ``torch.save``) holding the generator's
      state dict, e.g. ``{'netG_state_dict': ...}``.
    out_dir: destination directory (an orbax checkpoint plus JSON config). An existing
      one is replaced only when it is a converted checkpoint (or empty), and never when
      it holds the source (see :func:`memedit._io.check_output`).
    force: replace an existing ``out_dir`` of another kind.

  Returns:
    ``out_dir`` as an absolute path.

  Raises:
    ValueError: the checkpoint is not a DCGAN generator, or holds two (the message names
      the file and lists what was found), or the file is unsafe / corrupt
      (``ports.torchfile`` errors).
  """
  from ports.torchfile import load_torch

  src = os.fspath(src_path)
  _io.check_output(out_dir, "converted", force=force, protect=(src,))
  where = f"{src}: DCGAN checkpoint"
  sd, entry = find_state_dict_entry(load_torch(src), where)
  variables, config = variables_from_state_dict(sd, where)
  config.update(source_file=os.path.basename(src), source_sha256=_io.sha256_file(src),
                source_format="torch")
  if entry is not None:
    config["source_entry"] = entry
  return _io.save_tree(out_dir, variables, config, kind="converted", force=force,
                       protect=(src,))


def load_dcgan(path: str | os.PathLike) -> tuple[DCGANGenerator, dict, dict]:
  """Loads a checkpoint written by :func:`convert_dcgan`.

  Returns:
    ``(module, variables, config)``; ``module.apply(variables, z)`` maps ``(N, z_dim)``
    latents to ``(N, 64, 64, channels)`` images in [-1, 1].

  Raises:
    ValueError: the checkpoint is not a DCGAN conversion, or its arrays do not fit its
      config (see :func:`ports.check_variables`).
  """
  import jax
  import jax.numpy as jnp

  tree, config = _io.load_tree(path)
  if config.get("architecture") != ARCHITECTURE:
    raise ValueError(f"{os.fspath(path)}: architecture: expected {ARCHITECTURE!r}, "
                     f"got {config.get('architecture')!r}")
  module = DCGANGenerator(z_dim=config["z_dim"], ngf=config["ngf"],
                          channels=config["image_channels"])
  check_variables(module, tree, (jax.ShapeDtypeStruct((1, config["z_dim"]), jnp.float32),),
                  os.fspath(path))
  return module, jax.tree_util.tree_map(jnp.asarray, tree), config
