"""The NVIDIA flavour of the StyleGAN2 converter: ``stylegan2-ada-pytorch`` / stylegan3
repository network pickles (``{'G_ema': Generator, ...}``), read without torch.

See :mod:`ports.stylegan2.convert` for the weight layouts and the written directory.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from memedit import _io
from ports import shown_keys, validate_state_dict
from ports.stylegan2 import model as model_lib
from ports.stylegan2.state_dict import (BLUR, FORMAT_VERSION, check_filters,
                                        check_finite_tensors, check_float_tensors, check_keys,
                                        conv_kernel,
                                        count_indices, dense_kernel, source_info, tensor_shape,
                                        to_float32)
from ports.torchfile import brief_repr

__all__ = ["convert_nvidia", "infer_nvidia_config", "state_dict_to_params_nvidia"]


def _get(obj: Any, key: str, default: Any = None) -> Any:
  if obj is None:
    return default
  if isinstance(obj, Mapping):
    return obj.get(key, default)
  return getattr(obj, key, default)


def _kwargs(value: Any, name: str, fl: str = "NVIDIA") -> dict:
  """Keyword arguments recorded in a pickle: a dict with str keys (None: empty)."""
  if value is None:
    return {}
  if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
    raise ValueError(f"{fl} StyleGAN2: {name}: expected a dict of keyword arguments, got "
                     f"{type(value).__name__} {brief_repr(value)}")
  return dict(value)


def _number(value: Any, name: str, *, optional: bool = False, positive: bool = False,
            fl: str = "NVIDIA") -> float | None:
  """A setting that must be a finite (positive) number, or None when ``optional``."""
  if value is None and optional:
    return None
  ok = (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        and np.isfinite(value) and (value > 0 or not positive))
  if not ok:
    want = "a finite positive number" if positive else "a finite number"
    raise ValueError(f"{fl} StyleGAN2: {name}: expected {want}{' or None' if optional else ''}"
                     f", got {type(value).__name__} {brief_repr(value)}")
  return float(value)


def _integer(value: Any, name: str, *, optional: bool = False, fl: str = "NVIDIA"
             ) -> int | None:
  """A setting that must be a non-negative int, or None when ``optional``."""
  if value is None and optional:
    return None
  if isinstance(value, (float, np.floating)) and np.isfinite(value) and float(value).is_integer():
    value = int(value)
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
    raise ValueError(f"{fl} StyleGAN2: {name}: expected a non-negative integer"
                     f"{' or None' if optional else ''}, got {type(value).__name__} "
                     f"{brief_repr(value)}")
  return int(value)


def infer_nvidia_config(sd: Mapping[str, Any], init_kwargs: Mapping[str, Any] | None = None,
                        attributes: Mapping[str, Any] | None = None, *,
                        where: str | None = None) -> dict:
  """Architecture of an NVIDIA ``G_ema`` (``training.networks.Generator``).

  Shapes come from the state dict. Settings that leave no trace in it (conv_clamp,
  mapping lr_multiplier and activation, architecture, filter) come from the pickled
  layers' own attributes when given (``attributes``, dotted names such as
  ``'synthesis.b4.conv1.conv_clamp'``; exact, defaults included), else from the
  constructor's keyword arguments ``init_kwargs`` (NVIDIA's defaults otherwise; note
  that the default conv_clamp is None in stylegan2-ada-pytorch and 256 in the
  stylegan3 repository, so pass ``attributes`` when the kwargs do not name it).

  Raises:
    ValueError: an architecture this port does not cover (conditional, 'orig' or
      'resnet', non-lrelu mapping, other filter), or an unrecognised state dict.
  """
  fl = f"{where}: NVIDIA" if where else "NVIDIA"
  init_kwargs = _kwargs(init_kwargs, "init_kwargs", fl)
  mk = _kwargs(init_kwargs.get("mapping_kwargs"), "mapping_kwargs", fl)
  sk = _kwargs(init_kwargs.get("synthesis_kwargs"), "synthesis_kwargs", fl)
  for k, v in init_kwargs.items():  # synthesis kwargs passed flat (**synthesis_kwargs2)
    if k not in ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels",
                 "mapping_kwargs", "synthesis_kwargs", "resize") and k not in sk:
      sk[k] = v
  if attributes:
    if not isinstance(attributes, Mapping) or not all(isinstance(k, str) for k in attributes):
      raise ValueError(f"{fl} StyleGAN2: attributes: expected a dict of named settings, got "
                       f"{type(attributes).__name__} {brief_repr(attributes)}")
    _settings_from_attributes(attributes, mk, sk, fl)
  validate_state_dict(sd, f"{fl} StyleGAN2 state dict")
  if "mapping.fc0.weight" not in sd or "synthesis.b4.const" not in sd:
    raise ValueError(f"{fl} StyleGAN2 state dict: expected 'mapping.fc0.weight' and "
                     f"'synthesis.b4.const', got {shown_keys(sd)}")
  c_dim = _integer(init_kwargs.get("c_dim", 0) or 0, "c_dim", fl=fl)
  if c_dim or any(k.startswith("mapping.embed.") for k in sd):
    raise ValueError(f"{fl} StyleGAN2: expected an unconditional generator (c_dim 0), "
                     f"got c_dim {c_dim}")
  arch = sk.get("architecture", "skip")
  if arch != "skip" or any(re.fullmatch(r"synthesis\.b\d+\.skip\.weight", k) for k in sd):
    raise ValueError(f"{fl} StyleGAN2: expected architecture 'skip', got {arch!r}")
  act = mk.get("activation", "lrelu")
  if act != "lrelu":
    raise ValueError(f"{fl} StyleGAN2: expected mapping activation 'lrelu', got "
                     f"{brief_repr(act)}")
  filt = sk.get("resample_filter", BLUR)
  if not isinstance(filt, (list, tuple)) or list(filt) != list(BLUR):
    raise ValueError(f"{fl} StyleGAN2: expected resample_filter [1, 3, 3, 1], "
                     f"got {brief_repr(filt)}")
  if sk.get("kernel_size", 3) != 3:
    raise ValueError(f"{fl} StyleGAN2: expected kernel_size 3, got "
                     f"{brief_repr(sk.get('kernel_size'))}")
  n_mlp = count_indices(sd, r"mapping\.fc(\d+)\.weight")
  fc_shapes = [tensor_shape(fl, sd, f"mapping.fc{l}.weight", 2, "(out, in)")
               for l in range(n_mlp)]
  tensor_shape(fl, sd, "synthesis.b4.const", 3, "(C, 4, 4)")
  z_dim = fc_shapes[0][1]
  w_dim = fc_shapes[-1][0]
  hidden = fc_shapes[0][0] if n_mlp > 1 else None
  if hidden == w_dim:
    hidden = None
  res_list = sorted(int(m.group(1)) for k in sd
                    if (m := re.fullmatch(r"synthesis\.b(\d+)\.conv1\.weight", k)))
  resolution = res_list[-1]
  log2 = model_lib.log2_resolution(resolution)
  if res_list != [2 ** r for r in range(2, log2 + 1)]:
    raise ValueError(f"{fl} StyleGAN2: expected blocks b4..b{resolution}, got {res_list}")
  channels = [tensor_shape(fl, sd, f"synthesis.b{r}.conv1.weight", 4,
                           "(C_out, C_in, 3, 3)")[0]
              for r in res_list]
  use_noise = "synthesis.b4.conv1.noise_strength" in sd
  conv_clamp = _number(sk.get("conv_clamp"), "conv_clamp", optional=True, positive=True, fl=fl)
  img_channels = (tensor_shape(fl, sd, "synthesis.b4.torgb.weight", 4,
                               "(C_out, C_in, 1, 1)")[0]
                  if "synthesis.b4.torgb.weight" in sd
                  else _integer(init_kwargs.get("img_channels", 3), "img_channels", fl=fl))
  return {
      "architecture": "stylegan2", "flavour": "nvidia", "format_version": FORMAT_VERSION,
      "resolution": resolution, "z_dim": z_dim, "w_dim": w_dim, "style_dim": w_dim,
      "n_mlp": n_mlp, "mapping_hidden": hidden,
      "lr_mlp": _number(mk.get("lr_multiplier", 0.01), "lr_multiplier", positive=True, fl=fl),
      "channels": channels,
      "channel_base": _integer(sk.get("channel_base"), "channel_base", optional=True, fl=fl),
      "channel_max": _integer(sk.get("channel_max"), "channel_max", optional=True, fl=fl),
      "img_channels": img_channels, "use_noise": use_noise, "conv_clamp": conv_clamp,
      "blur_kernel": list(BLUR), "num_layers": model_lib.num_conv_layers(resolution),
      "num_ws": 2 * log2 - 2, "noise_buffers": "checkpoint",
      "has_w_avg": "mapping.w_avg" in sd,
      "precision": "float32 (NVIDIA runs FP16 blocks only on CUDA)",
  }


def _settings_from_attributes(attributes: Mapping[str, Any], mk: dict, sk: dict,
                              fl: str = "NVIDIA") -> None:
  """Overrides kwargs ``mk`` (mapping) and ``sk`` (synthesis) with the built layers' values."""
  clamps = {name: _number(attributes[name], name, optional=True, positive=True, fl=fl)
            for name in attributes
            if re.fullmatch(r"synthesis\.b\d+\.(conv0|conv1|torgb)\.conv_clamp", name)}
  if clamps:
    values = set(clamps.values())
    if len(values) != 1:
      raise ValueError(f"{fl} StyleGAN2: expected one conv_clamp for all layers, got "
                       f"{dict(sorted(clamps.items())[:6])}")
    sk["conv_clamp"] = values.pop()
  if "synthesis.b4.architecture" in attributes:
    sk["architecture"] = attributes["synthesis.b4.architecture"]
  if "mapping.fc0.activation" in attributes:
    mk["activation"] = attributes["mapping.fc0.activation"]
  if "mapping.fc0.bias_gain" in attributes:
    mk["lr_multiplier"] = _number(attributes["mapping.fc0.bias_gain"], "mapping.fc0.bias_gain",
                                  positive=True, fl=fl)
  acts = [attributes[n] for n in attributes
          if re.fullmatch(r"synthesis\.b\d+\.conv[01]\.activation", n)]
  other = [a for a in acts if a != "lrelu"]
  if other:
    raise ValueError(f"{fl} StyleGAN2: expected synthesis activation 'lrelu', got "
                     f"{brief_repr(other[0])}")


def _nvidia_expected(config: dict) -> dict[str, tuple[int, ...]]:
  w_dim, ch, rgb = config["w_dim"], config["channels"], config["img_channels"]
  exp: dict[str, tuple[int, ...]] = {}
  hidden = config["mapping_hidden"] or w_dim
  feats = [config["z_dim"]] + [hidden] * (config["n_mlp"] - 1) + [w_dim]
  for l in range(config["n_mlp"]):
    exp[f"mapping.fc{l}.weight"] = (feats[l + 1], feats[l])
    exp[f"mapping.fc{l}.bias"] = (feats[l + 1],)
  if config.get("has_w_avg", True):
    exp["mapping.w_avg"] = (w_dim,)

  def layer(prefix, c_in, c_out, res):
    exp[f"{prefix}.weight"] = (c_out, c_in, 3, 3)
    exp[f"{prefix}.bias"] = (c_out,)
    exp[f"{prefix}.affine.weight"] = (c_in, w_dim)
    exp[f"{prefix}.affine.bias"] = (c_in,)
    exp[f"{prefix}.resample_filter"] = (4, 4)
    if config["use_noise"]:
      exp[f"{prefix}.noise_strength"] = ()
      exp[f"{prefix}.noise_const"] = (res, res)

  for j, c in enumerate(ch):
    r = 4 * 2 ** j
    b = f"synthesis.b{r}"
    exp[f"{b}.resample_filter"] = (4, 4)
    if j == 0:
      exp[f"{b}.const"] = (c, 4, 4)
    else:
      layer(f"{b}.conv0", ch[j - 1], c, r)
    layer(f"{b}.conv1", c, c, r)
    exp[f"{b}.torgb.weight"] = (rgb, c, 1, 1)
    exp[f"{b}.torgb.bias"] = (rgb,)
    exp[f"{b}.torgb.affine.weight"] = (c, w_dim)
    exp[f"{b}.torgb.affine.bias"] = (c,)
  return exp


def state_dict_to_params_nvidia(sd: Mapping[str, Any], config: dict, *,
                                where: str | None = None) -> dict:
  """Maps an NVIDIA ``G_ema`` state dict onto Flax variables (latent_avg = mapping.w_avg).

  Raises:
    ValueError: keys or shapes differ from the architecture ``config`` describes, or the
      resample filters are not [1,3,3,1].
  """
  fl = f"{where}: NVIDIA" if where else "NVIDIA"
  validate_state_dict(sd, f"{fl} StyleGAN2 state dict")
  exp = _nvidia_expected(config)
  check_keys(fl, sd, exp)
  check_float_tensors(fl, sd, exp)
  check_finite_tensors(fl, sd, exp)
  check_filters(fl, sd, [k for k in exp if k.endswith(".resample_filter")], 1.0)
  mapping = {f"fc_{l}": {"kernel": dense_kernel(sd[f"mapping.fc{l}.weight"]),
                         "bias": to_float32(sd[f"mapping.fc{l}.bias"])}
             for l in range(config["n_mlp"])}
  noise = {}

  def layer(prefix, i):
    out = {"modulation": {"kernel": dense_kernel(sd[f"{prefix}.affine.weight"]),
                          "bias": to_float32(sd[f"{prefix}.affine.bias"])},
           "memory": {"kernel": conv_kernel(sd[f"{prefix}.weight"])},
           "bias": to_float32(sd[f"{prefix}.bias"])}
    if config["use_noise"]:
      out["noise_strength"] = to_float32(sd[f"{prefix}.noise_strength"]).reshape(())
      noise[f"noise_{i}"] = to_float32(sd[f"{prefix}.noise_const"])
    return out

  def torgb(prefix):
    return {"modulation": {"kernel": dense_kernel(sd[f"{prefix}.affine.weight"]),
                           "bias": to_float32(sd[f"{prefix}.affine.bias"])},
            "memory": {"kernel": conv_kernel(sd[f"{prefix}.weight"])},
            "bias": to_float32(sd[f"{prefix}.bias"])}

  synth: dict[str, Any] = {
      "const": np.ascontiguousarray(to_float32(sd["synthesis.b4.const"]).transpose(1, 2, 0)),
      "conv_0": layer("synthesis.b4.conv1", 0), "torgb_0": torgb("synthesis.b4.torgb")}
  for j in range(1, len(config["channels"])):
    b = f"synthesis.b{4 * 2 ** j}"
    synth[f"conv_{2 * j - 1}"] = layer(f"{b}.conv0", 2 * j - 1)
    synth[f"conv_{2 * j}"] = layer(f"{b}.conv1", 2 * j)
    synth[f"torgb_{j}"] = torgb(f"{b}.torgb")
  avg = (to_float32(sd["mapping.w_avg"]) if "mapping.w_avg" in sd
         else np.zeros((config["w_dim"],), np.float32))
  buffers: dict[str, Any] = {"latent_avg": avg}
  if noise:
    buffers["synthesis"] = noise
  return {"params": {"mapping": mapping, "synthesis": synth}, "buffers": buffers}


def convert_nvidia(src_path: str | os.PathLike, out_dir: str | os.PathLike,
                   key: str = "G_ema", *, force: bool = False) -> str:
  """Converts an NVIDIA stylegan2-ada / stylegan3-repo pickle ({'G_ema': Generator, ...}).

  ``out_dir`` and ``force`` as for :func:`ports.stylegan2.convert_rosinality`.

  Returns:
    The absolute path of the written checkpoint directory.

  Raises:
    ValueError: no ``key`` network in the pickle, or an architecture the port does not
      cover.
  """
  from ports import torchfile

  _io.check_output(out_dir, "converted", force=force, protect=(src_path,))
  src = os.fspath(src_path)
  data = torchfile.load_nvidia_pickle(src_path)
  if not isinstance(data, Mapping) or key not in data:
    keys = shown_keys(data) if isinstance(data, Mapping) else type(data).__name__
    raise ValueError(f"{src}: NVIDIA pickle: expected a dict with {key!r}, got {keys}")
  net = data[key]
  sd = _get(net, "state_dict")
  if not isinstance(sd, Mapping):
    raise ValueError(f"{src}: NVIDIA pickle: {key!r}: expected a network with a state dict, "
                     f"got {type(net).__name__}")
  class_name = str(_get(net, "class_name", ""))
  if class_name and not class_name.endswith("Generator"):
    raise ValueError(f"{src}: NVIDIA pickle: {key!r}: expected a Generator, got {class_name}")
  where = f"{src}: {key!r}"
  init_kwargs = _kwargs(_get(net, "init_kwargs"), "init_kwargs", f"{where}: NVIDIA")
  config = infer_nvidia_config(sd, init_kwargs, _get(net, "attributes"), where=where)
  variables = state_dict_to_params_nvidia(sd, config, where=where)
  if config["has_w_avg"]:
    config["latent_avg_source"] = "checkpoint (mapping.w_avg)"
  else:  # built with w_avg_beta=None: no tracked average
    module = model_lib.generator_from_config(config)
    variables["buffers"]["latent_avg"] = model_lib.mean_latent(module, variables, 4096, 0)
    config["latent_avg_source"] = "mean of 4096 mapped latents (RandomState(0))"
  config["source"] = source_info(src_path) | {"network": key, "class_name": class_name}
  return _io.save_tree(out_dir, variables, config, kind="converted", force=force,
                       protect=(src_path,))
