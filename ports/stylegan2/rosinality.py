"""The rosinality flavour of the StyleGAN2 converter: ``stylegan2-pytorch`` ``.pt``
checkpoints (``{'g_ema': state dict, 'latent_avg': tensor, ...}``), read without torch.

See :mod:`ports.stylegan2.convert` for the weight layouts and the written directory.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from memedit import _io
from ports import (check_finite, find_generator_entry, shown_keys, strip_module_prefix,
                   validate_state_dict)
from ports.stylegan2 import model as model_lib
from ports.stylegan2.state_dict import (BLUR, FORMAT_VERSION, check_filters,
                                        check_finite_tensors, check_float_tensors, check_keys,
                                        conv_kernel,
                                        count_indices, dense_kernel, source_info, tensor_shape,
                                        to_float32)
from ports.torchfile import brief_repr

__all__ = ["convert_rosinality", "find_rosinality_entry", "infer_rosinality_config",
           "state_dict_to_params_rosinality"]


def _flavour(where: str | None) -> str:
  return f"{where}: rosinality" if where else "rosinality"


def infer_rosinality_config(sd: Mapping[str, Any], *, where: str | None = None) -> dict:
  """Architecture of a rosinality ``g_ema`` state dict, from its keys and shapes.

  ``where`` (e.g. the file it was read from) begins every error message.

  Returns:
    Config dict (resolution, z_dim = w_dim = style_dim, n_mlp, channels,
    channel_multiplier or None, img_channels, ...).

  Raises:
    ValueError: the state dict is not a rosinality StyleGAN2 generator this port covers.
  """
  fl = _flavour(where)
  sd = validate_state_dict(strip_module_prefix(sd), f"{fl} StyleGAN2 state dict")
  if "style.1.weight" not in sd or "input.input" not in sd or "conv1.conv.weight" not in sd:
    raise ValueError(f"{fl} StyleGAN2 state dict: expected keys 'style.1.weight', "
                     f"'input.input', 'conv1.conv.weight', got {shown_keys(sd)}")
  n_mlp = count_indices(sd, r"style\.(\d+)\.weight")
  style_dim = tensor_shape(fl, sd, "style.1.weight", 2, "(style_dim, style_dim)")[1]
  input_shape = tensor_shape(fl, sd, "input.input", 4, "(1, C, 4, 4)")
  n_convs = count_indices(sd, r"convs\.(\d+)\.conv\.weight")
  if n_convs % 2:
    raise ValueError(f"{fl} StyleGAN2 state dict: expected an even number of "
                     f"'convs.N' layers, got {n_convs}")
  log2 = 2 + n_convs // 2
  resolution = 2 ** log2
  channels = [input_shape[1]]
  for j in range(0, n_convs, 2):
    key = f"convs.{j}.conv.weight"
    channels.append(tensor_shape(fl, sd, key, 5, "(1, C_out, C_in, 3, 3)")[1])
  img_channels = (tensor_shape(fl, sd, "to_rgb1.conv.weight", 5,
                               "(1, 3, C_in, 1, 1)")[1]
                  if "to_rgb1.conv.weight" in sd else 3)
  multiplier = None
  if 64 <= resolution <= 1024:  # below 64 px every multiplier gives the same widths
    for m in (1, 2, 4, 8):
      if list(model_lib.rosinality_channels(resolution, m)) == channels:
        multiplier = m
        break
  has_noise = any(k.startswith("noises.") for k in sd)
  return {
      "architecture": "stylegan2", "flavour": "rosinality", "format_version": FORMAT_VERSION,
      "resolution": resolution, "z_dim": style_dim, "w_dim": style_dim,
      "style_dim": style_dim, "n_mlp": n_mlp, "mapping_hidden": None, "lr_mlp": 0.01,
      "channels": channels, "channel_multiplier": multiplier, "img_channels": img_channels,
      "use_noise": True, "conv_clamp": None, "blur_kernel": list(BLUR),
      "num_layers": model_lib.num_conv_layers(resolution), "num_ws": 2 * log2 - 2,
      "noise_buffers": "checkpoint" if has_noise else "generated (RandomState(0))",
  }


def _rosinality_expected(config: dict, with_noise: bool) -> dict[str, tuple[int, ...]]:
  sd_dim, ch, rgb = config["style_dim"], config["channels"], config["img_channels"]
  exp: dict[str, tuple[int, ...]] = {}
  for l in range(1, config["n_mlp"] + 1):
    exp[f"style.{l}.weight"] = (sd_dim, sd_dim)
    exp[f"style.{l}.bias"] = (sd_dim,)
  exp["input.input"] = (1, ch[0], 4, 4)

  def styled(prefix, c_in, c_out, up):
    exp[f"{prefix}.conv.weight"] = (1, c_out, c_in, 3, 3)
    exp[f"{prefix}.conv.modulation.weight"] = (c_in, sd_dim)
    exp[f"{prefix}.conv.modulation.bias"] = (c_in,)
    exp[f"{prefix}.noise.weight"] = (1,)
    exp[f"{prefix}.activate.bias"] = (c_out,)
    if up:
      exp[f"{prefix}.conv.blur.kernel"] = (4, 4)

  def torgb(prefix, c_in, up):
    exp[f"{prefix}.conv.weight"] = (1, rgb, c_in, 1, 1)
    exp[f"{prefix}.conv.modulation.weight"] = (c_in, sd_dim)
    exp[f"{prefix}.conv.modulation.bias"] = (c_in,)
    exp[f"{prefix}.bias"] = (1, rgb, 1, 1)
    if up:
      exp[f"{prefix}.upsample.kernel"] = (4, 4)

  styled("conv1", ch[0], ch[0], False)
  torgb("to_rgb1", ch[0], False)
  for j in range(1, len(ch)):
    styled(f"convs.{2 * j - 2}", ch[j - 1], ch[j], True)
    styled(f"convs.{2 * j - 1}", ch[j], ch[j], False)
    torgb(f"to_rgbs.{j - 1}", ch[j], True)
  if with_noise:
    for i in range(config["num_layers"]):
      r = model_lib.layer_resolution(i)
      exp[f"noises.noise_{i}"] = (1, 1, r, r)
  return exp


def _generated_noise(num_layers: int) -> dict[str, np.ndarray]:
  rs = np.random.RandomState(0)
  out = {}
  for i in range(num_layers):
    r = model_lib.layer_resolution(i)
    out[f"noise_{i}"] = rs.standard_normal((r, r)).astype(np.float32)
  return out


def _is_generator(sd: Mapping[str, Any]) -> bool:
  """Whether ``sd`` is a complete rosinality generator state dict (names and shapes)."""
  config = infer_rosinality_config(sd)
  sd = strip_module_prefix(sd)
  check_keys("rosinality", sd, _rosinality_expected(
      config, any(k.startswith("noises.") for k in sd)))
  return True


def _is_generator_quiet(sd: Any) -> bool:
  try:
    return _is_generator(sd)
  except (ValueError, TypeError):
    return False


def find_rosinality_entry(obj: Any, where: str = "rosinality checkpoint"
                          ) -> tuple[Any, str | None]:
  """The rosinality generator state dict inside a loaded checkpoint, and the entry that
  held it: ``'g_ema'`` when it is one, else ``obj`` itself or the one entry holding a
  complete generator state dict (``{'state_dict': sd}``, ``{'generator': sd}``, ``{'g':
  sd, 'd': ...}``, a Lightning ``{'state_dict': {'generator.style.1.weight': ...}}``;
  see :func:`ports.find_generator_entry`).

  Raises:
    ValueError: two entries hold rosinality generators (the message names them).
  """
  return find_generator_entry(obj, _is_generator, preferred=("g_ema",),
                              what="rosinality generator state dict", where=where)


def state_dict_to_params_rosinality(sd: Mapping[str, Any], latent_avg: Any,
                                    config: dict | None = None, *,
                                    where: str | None = None) -> dict:
  """Maps a rosinality ``g_ema`` state dict onto Flax variables.

  Args:
    sd: state dict name → array (numpy or torch tensors); names may carry the
      ``module.`` / ``_orig_mod.`` prefixes of ``DataParallel`` and ``torch.compile``.
    latent_avg: (style_dim,) (any shape of that size) truncation centre, or None to use
      zeros (:func:`convert_rosinality` estimates it instead).
    config: from :func:`infer_rosinality_config` (inferred when None).
    where: what ``sd`` is (e.g. the file it was read from), to begin error messages.

  Returns:
    ``{'params': ..., 'buffers': ...}`` for :class:`ports.stylegan2.model.StyleGAN2Generator`.

  Raises:
    ValueError: keys or shapes differ from the architecture the config describes, weights
      are not floating-point (e.g. int8) or not finite, or the blur filters are not
      [1,3,3,1].
  """
  fl = _flavour(where)
  sd = validate_state_dict(strip_module_prefix(sd), f"{fl} StyleGAN2 state dict")
  config = config or infer_rosinality_config(sd, where=where)
  with_noise = any(k.startswith("noises.") for k in sd)
  exp = _rosinality_expected(config, with_noise)
  check_keys(fl, sd, exp)
  check_float_tensors(fl, sd, exp)
  check_finite_tensors(fl, sd, exp)
  check_filters(fl, sd, [k for k in exp if k.endswith((".blur.kernel",
                                                                  ".upsample.kernel"))], 4.0)
  mapping = {f"fc_{l - 1}": {"kernel": dense_kernel(sd[f"style.{l}.weight"]),
                             "bias": to_float32(sd[f"style.{l}.bias"])}
             for l in range(1, config["n_mlp"] + 1)}

  def styled(prefix):
    return {"modulation": {"kernel": dense_kernel(sd[f"{prefix}.conv.modulation.weight"]),
                           "bias": to_float32(sd[f"{prefix}.conv.modulation.bias"])},
            "memory": {"kernel": conv_kernel(sd[f"{prefix}.conv.weight"])},
            "noise_strength": to_float32(sd[f"{prefix}.noise.weight"]).reshape(()),
            "bias": to_float32(sd[f"{prefix}.activate.bias"])}

  def torgb(prefix):
    return {"modulation": {"kernel": dense_kernel(sd[f"{prefix}.conv.modulation.weight"]),
                           "bias": to_float32(sd[f"{prefix}.conv.modulation.bias"])},
            "memory": {"kernel": conv_kernel(sd[f"{prefix}.conv.weight"])},
            "bias": to_float32(sd[f"{prefix}.bias"]).reshape(-1)}

  synth: dict[str, Any] = {"const": np.ascontiguousarray(to_float32(sd["input.input"])[0]
                                                          .transpose(1, 2, 0)),
                           "conv_0": styled("conv1"), "torgb_0": torgb("to_rgb1")}
  for j in range(1, len(config["channels"])):
    synth[f"conv_{2 * j - 1}"] = styled(f"convs.{2 * j - 2}")
    synth[f"conv_{2 * j}"] = styled(f"convs.{2 * j - 1}")
    synth[f"torgb_{j}"] = torgb(f"to_rgbs.{j - 1}")
  if with_noise:
    noise = {f"noise_{i}": to_float32(sd[f"noises.noise_{i}"])[0, 0]
             for i in range(config["num_layers"])}
  else:
    noise = _generated_noise(config["num_layers"])
  if latent_avg is None:
    avg = np.zeros((config["w_dim"],), np.float32)
  else:
    lbl = f"{where}: latent_avg" if where else "latent_avg"
    if hasattr(latent_avg, "detach"):
      floating, got = latent_avg.is_floating_point(), f"a tensor of {latent_avg.dtype}"
    elif isinstance(latent_avg, (np.ndarray, np.generic)):
      floating, got = latent_avg.dtype.kind in "fV", f"an array of {latent_avg.dtype}"
    else:
      floating, got = False, f"{type(latent_avg).__name__} {brief_repr(latent_avg)}"
    if not floating:
      raise ValueError(f"{lbl}: expected a tensor of {config['w_dim']} values, got {got} "
                       "(floating-point values are required)")
    avg = to_float32(latent_avg).reshape(-1)
    if avg.shape != (config["w_dim"],):
      raise ValueError(f"{lbl}: expected {config['w_dim']} values, got shape "
                       f"{np.shape(latent_avg)}")
    check_finite("latent_avg", avg, f"{where}: rosinality checkpoint" if where
                 else "rosinality checkpoint")
  return {"params": {"mapping": mapping, "synthesis": synth},
          "buffers": {"latent_avg": avg, "synthesis": noise}}


def convert_rosinality(src_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                       force: bool = False) -> str:
  """Converts a rosinality ``.pt`` ({'g_ema': state dict, 'latent_avg': tensor, ...}).

  Architecture (resolution, style_dim, n_mlp, channels/multiplier) is inferred from
  shapes. Without a stored 'latent_avg' (training checkpoints) the truncation centre is
  estimated as the mean w over 4096 latents (``RandomState(0)``), noted in the config.
  An existing ``out_dir`` is replaced only when it is a converted checkpoint (or empty;
  any kind with ``force``), and never when it holds the source.

  Returns:
    The absolute path of the written checkpoint directory.

  Raises:
    ValueError: the file holds no generator ('g_ema', or the one entry holding a rosinality
      generator state dict, e.g. ``{'state_dict': sd}``), two such entries, or one of
      another architecture; messages begin with the file's name.
  """
  from ports import torchfile

  _io.check_output(out_dir, "converted", force=force, protect=(src_path,))
  where = f"{os.fspath(src_path)}: rosinality checkpoint"
  ckpt = torchfile.load_torch(src_path)
  if not isinstance(ckpt, Mapping):
    raise ValueError(f"{where}: expected a dict with 'g_ema', got {type(ckpt).__name__}")
  if "g_ema" in ckpt:
    sd, entry = validate_state_dict(ckpt["g_ema"], f"{where}: 'g_ema'"), "'g_ema'"
  else:
    sd, entry = find_rosinality_entry(ckpt, where)
    if not (_is_generator_quiet(sd) or (isinstance(sd, Mapping) and "style.1.weight" in sd)):
      raise ValueError(f"{where}: expected a dict with 'g_ema', got {shown_keys(ckpt)} (and "
                       "no entry holding a rosinality generator state dict)")
  config = infer_rosinality_config(sd, where=os.fspath(src_path))
  latent_avg = ckpt.get("latent_avg")
  variables = state_dict_to_params_rosinality(sd, latent_avg, config,
                                              where=os.fspath(src_path))
  if latent_avg is None:
    module = model_lib.generator_from_config(config)
    variables["buffers"]["latent_avg"] = model_lib.mean_latent(module, variables, 4096, 0)
    config["latent_avg_source"] = "mean of 4096 mapped latents (RandomState(0))"
  else:
    config["latent_avg_source"] = "checkpoint"
  config["source"] = source_info(src_path)
  if entry is not None:
    config["source"]["entry"] = entry
  return _io.save_tree(out_dir, variables, config, kind="converted", force=force,
                       protect=(src_path,))
