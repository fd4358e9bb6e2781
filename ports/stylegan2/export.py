"""Flax StyleGAN2 → rosinality checkpoint: the inverse of the rosinality converter.

:func:`state_dict_rosinality` maps the variables of a
:class:`ports.stylegan2.model.Generator` onto the ``g_ema`` state dict of rosinality's
``stylegan2-pytorch`` ``Generator`` (same names, order, shapes and layouts), undoing
:func:`ports.stylegan2.convert.state_dict_to_params_rosinality` exactly:

  params/mapping/fc_{l}/kernel (in, out)         → style.{l+1}.weight (out, in)
  params/synthesis/const (4, 4, C)               → input.input (1, C, 4, 4)
  conv_0, conv_{2j−1}, conv_{2j}                 → conv1, convs.{2j−2}, convs.{2j−1}:
    memory/kernel (3, 3, C_in, C_out) HWIO        → .conv.weight (1, C_out, C_in, 3, 3)
    modulation/kernel (w_dim, C_in)               → .conv.modulation.weight (C_in, w_dim)
    noise_strength (), bias (C_out,)              → .noise.weight (1,), .activate.bias
  torgb_0, torgb_j                               → to_rgb1, to_rgbs.{j−1} (bias (1, 3, 1, 1))
  buffers/synthesis/noise_{i} (H, W)             → noises.noise_{i} (1, 1, H, W)
  buffers/latent_avg (w_dim,)                    → the checkpoint's 'latent_avg'

plus the blur filters rosinality keeps as buffers (``convs.{2j−2}.conv.blur.kernel`` and
``to_rgbs.{j−1}.upsample.kernel``: outer([1,3,3,1])/64 · 4). :func:`save_rosinality`
writes ``{'g_ema': state_dict, 'latent_avg': tensor}`` with :mod:`ports.torchwrite`, a
file ``torch.load`` reads (``weights_only=True`` too) and memedit converts back to the
same parameters.

rosinality's generator takes one latent size (z_dim = w_dim = style_dim), the [1,3,3,1]
filter, noise inputs and no output clamp; other generators raise ValueError. A checkpoint
does not record the mapping's learning-rate multiplier, which scales the mapping weights
at run time (rosinality's ``Generator`` and the converter take ``lr_mlp`` 0.01): a
generator with another ``lr_mlp`` (e.g. converted from an NVIDIA pickle with
``lr_multiplier`` 0.1) has its mapping kernels and biases written times
``lr_mlp / 0.01``, the same layers at ``lr_mlp`` 0.01. rosinality's
``Generator`` builds its widths from a fixed table (512 at 4–32 px, then
256·channel_multiplier, ...): a checkpoint of other widths (the small trained
generators) carries rosinality's names and layouts, loads into that class once its
``channels`` table holds the checkpoint's widths (the table is read in ``__init__``), and
converts with ``ports.stylegan2.convert_rosinality`` as it is.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Mapping

import numpy as np

from ports import check_finite
from ports.stylegan2 import model as model_lib

__all__ = ["rosinality_channel_table", "save_rosinality", "state_dict_rosinality"]

_BLUR = (1.0, 3.0, 3.0, 1.0)
_LR_MLP = 0.01  # the mapping learning-rate multiplier rosinality's Generator builds


def _blur_kernel_2d() -> np.ndarray:
  k = np.outer(_BLUR, _BLUR)
  return (k / k.sum() * 4.0).astype(np.float32)


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> np.ndarray:
  node: Any = tree
  for i, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      raise ValueError(f"variables: expected {'/'.join(path)}, missing at "
                       f"{'/'.join(path[:i + 1])}")
    node = node[key]
  a = np.asarray(node, dtype=np.float32)
  check_finite("/".join(path), a, "StyleGAN2 variables")
  return a


def _check_module(module: model_lib.StyleGAN2Generator) -> None:
  problems = []
  if module.z_dim != module.w_dim:
    problems.append(f"z_dim == w_dim (one style_dim), got {module.z_dim} and {module.w_dim}")
  if module.mapping_hidden not in (None, module.w_dim):
    problems.append(f"mapping_hidden None (= w_dim), got {module.mapping_hidden}")
  if not module.use_noise:
    problems.append("use_noise True, got False")
  if module.conv_clamp is not None:
    problems.append(f"conv_clamp None, got {module.conv_clamp}")
  if tuple(float(k) for k in module.blur_kernel) != _BLUR:
    problems.append(f"blur_kernel {list(_BLUR)}, got {list(module.blur_kernel)}")
  if problems:
    raise ValueError("rosinality StyleGAN2 export: expected " + "; ".join(problems))


def state_dict_rosinality(module: model_lib.StyleGAN2Generator, variables: Mapping[str, Any]
                          ) -> tuple[collections.OrderedDict, np.ndarray]:
  """The rosinality ``g_ema`` state dict and ``latent_avg`` of a Flax generator.

  Args:
    module: the :class:`ports.stylegan2.model.Generator` (its architecture).
    variables: its ``{'params': ..., 'buffers': ...}`` (numpy or jax arrays).

  Returns:
    ``(state_dict, latent_avg)``: an OrderedDict name → float32 array in the order of
    rosinality's ``Generator.state_dict()``, and the (w_dim,) truncation centre.

  Raises:
    ValueError: the generator is not one rosinality's class can express, or the
      variables lack an entry or hold NaN / infinite values (the message names it).
  """
  _check_module(module)
  params = variables.get("params") if isinstance(variables, Mapping) else None
  buffers = variables.get("buffers") if isinstance(variables, Mapping) else None
  if not isinstance(params, Mapping) or not isinstance(buffers, Mapping):
    got = (sorted(map(str, variables)) if isinstance(variables, Mapping)
           else type(variables).__name__)
    raise ValueError(f"variables: expected a dict with 'params' and 'buffers', got {got}")
  channels = tuple(int(c) for c in module.channels)
  log2 = model_lib.log2_resolution(module.resolution)
  if len(channels) != log2 - 1:
    raise ValueError(f"module.channels: expected {log2 - 1} widths (4..{module.resolution}), "
                     f"got {len(channels)}")
  sd: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()

  def put(name: str, value: np.ndarray, shape: tuple[int, ...]) -> None:
    value = np.ascontiguousarray(value, dtype=np.float32)
    if value.shape != shape:
      raise ValueError(f"variables: {name}: expected shape {shape} for this architecture, "
                       f"got {value.shape}")
    sd[name] = value

  w_dim = module.w_dim
  # The mapping computes x (A lr / √in) + b lr: stored for rosinality's lr 0.01.
  rescale = float(module.lr_mlp) / _LR_MLP
  for l in range(module.n_mlp):
    fc = ("params", "mapping", f"fc_{l}")
    kernel, bias = _get(variables, fc + ("kernel",)), _get(variables, fc + ("bias",))
    if rescale != 1.0:
      kernel = (kernel.astype(np.float64) * rescale).astype(np.float32)
      bias = (bias.astype(np.float64) * rescale).astype(np.float32)
      check_finite(f"params/mapping/fc_{l} (times lr_mlp / {_LR_MLP})",
                   np.concatenate([kernel.ravel(), bias.ravel()]), "StyleGAN2 variables")
    put(f"style.{l + 1}.weight", kernel.T, (w_dim, w_dim))
    put(f"style.{l + 1}.bias", bias, (w_dim,))
  put("input.input", _get(variables, ("params", "synthesis", "const")).transpose(2, 0, 1)[None],
      (1, channels[0], 4, 4))

  def modulation(prefix: str, layer: str, c_in: int) -> None:
    base = ("params", "synthesis", layer, "modulation")
    put(f"{prefix}.conv.modulation.weight", _get(variables, base + ("kernel",)).T,
        (c_in, w_dim))
    put(f"{prefix}.conv.modulation.bias", _get(variables, base + ("bias",)), (c_in,))

  def styled(prefix: str, layer: str, c_in: int, c_out: int, up: bool) -> None:
    kernel = _get(variables, ("params", "synthesis", layer, "memory", "kernel"))
    put(f"{prefix}.conv.weight", kernel.transpose(3, 2, 0, 1)[None], (1, c_out, c_in, 3, 3))
    if up:
      sd[f"{prefix}.conv.blur.kernel"] = _blur_kernel_2d()
    modulation(prefix, layer, c_in)
    put(f"{prefix}.noise.weight",
        _get(variables, ("params", "synthesis", layer, "noise_strength")).reshape(-1), (1,))
    put(f"{prefix}.activate.bias", _get(variables, ("params", "synthesis", layer, "bias")),
        (c_out,))

  def torgb(prefix: str, layer: str, c_in: int, up: bool) -> None:
    rgb = module.img_channels
    put(f"{prefix}.bias",
        _get(variables, ("params", "synthesis", layer, "bias")).reshape(1, -1, 1, 1),
        (1, rgb, 1, 1))
    if up:
      sd[f"{prefix}.upsample.kernel"] = _blur_kernel_2d()
    kernel = _get(variables, ("params", "synthesis", layer, "memory", "kernel"))
    put(f"{prefix}.conv.weight", kernel.transpose(3, 2, 0, 1)[None], (1, rgb, c_in, 1, 1))
    modulation(prefix, layer, c_in)

  styled("conv1", "conv_0", channels[0], channels[0], False)
  torgb("to_rgb1", "torgb_0", channels[0], False)
  for j in range(1, len(channels)):
    styled(f"convs.{2 * j - 2}", f"conv_{2 * j - 1}", channels[j - 1], channels[j], True)
    styled(f"convs.{2 * j - 1}", f"conv_{2 * j}", channels[j], channels[j], False)
  for j in range(1, len(channels)):
    torgb(f"to_rgbs.{j - 1}", f"torgb_{j}", channels[j], True)
  for i in range(model_lib.num_conv_layers(module.resolution)):
    r = model_lib.layer_resolution(i)
    put(f"noises.noise_{i}", _get(variables, ("buffers", "synthesis", f"noise_{i}"))[None, None],
        (1, 1, r, r))
  latent_avg = _get(variables, ("buffers", "latent_avg"))
  if latent_avg.shape != (w_dim,):
    raise ValueError(f"variables: buffers/latent_avg: expected shape ({w_dim},), got "
                     f"{latent_avg.shape}")
  return sd, latent_avg


def rosinality_channel_table(module: model_lib.StyleGAN2Generator) -> dict[int, int]:
  """The ``channels`` table (resolution → width) rosinality's ``Generator`` needs to build
  this generator's layers (its own table when the widths are rosinality's)."""
  return {2 ** (k + 2): int(c) for k, c in enumerate(module.channels)}


def save_rosinality(path: str | os.PathLike, module: model_lib.StyleGAN2Generator,
                    variables: Mapping[str, Any], *, latent_avg: Any = None) -> str:
  """Writes a rosinality checkpoint ``{'g_ema': state_dict, 'latent_avg': (w_dim,)}``.

  Args:
    path: destination ``.pt`` file, written atomically (see
      :func:`ports.torchwrite.save_torch`).
    module, variables: the generator, as for :func:`state_dict_rosinality`.
    latent_avg: (w_dim,) truncation centre to store instead of ``buffers/latent_avg``
      (e.g. :func:`ports.stylegan2.model.mean_latent` of a freshly trained generator).

  Returns:
    The absolute path written.
  """
  from ports.torchwrite import save_torch

  sd, avg = state_dict_rosinality(module, variables)
  if latent_avg is not None:
    avg = np.asarray(latent_avg, np.float32).reshape(-1)
    if avg.shape != (module.w_dim,):
      raise ValueError(f"latent_avg: expected {module.w_dim} values, got shape "
                       f"{np.shape(latent_avg)}")
    check_finite("latent_avg", avg, "rosinality StyleGAN2 export")
  return save_torch(path, {"g_ema": sd, "latent_avg": avg})
