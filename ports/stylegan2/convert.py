"""Converters from rosinality ``.pt`` and NVIDIA ``.pkl`` StyleGAN2 checkpoints.

Both write one directory (atomically, through :func:`memedit._io.save_tree`): the Flax
variables of :class:`ports.stylegan2.model.StyleGAN2Generator` as an orbax checkpoint, plus a JSON
config describing the architecture and the source file (name, sha256). Neither needs
torch: files are read by :mod:`ports.torchfile`.

Weight layouts. Torch conv weights (C_out, C_in, kh, kw) (rosinality adds a leading 1)
become HWIO (kh, kw, C_in, C_out); torch linear weights (out, in) become Flax (in, out);
the constant input (C, 4, 4) becomes (4, 4, C); noise buffers become (H, W). Neither
flavour flips kernels: NVIDIA's up-sampling ``conv2d_resample`` (``flip_weight=False``
with a transposed convolution) computes the same transposed convolution as rosinality's.

Differences handled by config switches of the one module:
  * NVIDIA's ``conv_clamp`` (clamp conv and ToRGB outputs to ±conv_clamp);
  * NVIDIA's separate z_dim / w_dim / mapping width;
  * channel widths are stored explicitly (rosinality's table or NVIDIA's
    min(channel_base / res, channel_max)).
NVIDIA's FP16 execution of the highest-resolution blocks is a CUDA-only speed option;
the port (like NVIDIA's code on CPU) runs float32 throughout. Unsupported NVIDIA
variants (conditional generators, 'orig' or 'resnet' architectures, other filters or
activations) raise ValueError.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from memedit import _io
from ports import check_finite, shown_keys, validate_state_dict
from ports.stylegan2 import model as model_lib
from ports.torchfile import brief_repr

__all__ = ["FORMAT_VERSION", "convert_nvidia", "convert_rosinality", "infer_nvidia_config",
           "infer_rosinality_config", "load_stylegan2", "state_dict_to_params_nvidia",
           "state_dict_to_params_rosinality"]

FORMAT_VERSION = 1
_BLUR = (1.0, 3.0, 3.0, 1.0)


def _np(value: Any) -> np.ndarray:
  """A float32 numpy copy of an array-like (numpy or anything with ``.detach()``)."""
  if hasattr(value, "detach"):  # a torch tensor handed in by a caller
    value = value.detach().cpu().numpy()
  return np.array(value, dtype=np.float32)


def _blur_2d(gain: float) -> np.ndarray:
  k = np.asarray(_BLUR, np.float64)
  k2 = np.outer(k, k)
  return (k2 / k2.sum() * gain).astype(np.float32)


def _shape(flavour: str, sd: Mapping[str, Any], key: str, ndim: int, what: str
           ) -> tuple[int, ...]:
  """The shape of ``sd[key]`` after checking it exists and has ``ndim`` axes."""
  if key not in sd:
    raise ValueError(f"{flavour} StyleGAN2 state dict: expected {key!r} ({what}), not found "
                     f"among {shown_keys(sd)}")
  shape = tuple(int(n) for n in np.shape(sd[key]))
  if len(shape) != ndim:
    raise ValueError(f"{flavour} StyleGAN2 state dict: {key}: expected a {ndim}-d tensor "
                     f"({what}), got shape {shape}")
  return shape


def _check_finite(flavour: str, sd: Mapping[str, Any], keys) -> None:
  for k in keys:
    check_finite(k, sd[k], f"{flavour} StyleGAN2 state dict")


def _check_keys(flavour: str, sd: Mapping[str, Any], expected: dict[str, tuple[int, ...]],
                ignore: tuple[str, ...] = ()) -> None:
  """Raises ValueError listing missing/unexpected keys and shape mismatches."""
  problems = []
  missing = [k for k in expected if k not in sd]
  unexpected = [k for k in sd if k not in expected and not k.startswith(ignore)]
  if missing:
    problems.append(f"missing {len(missing)} keys (e.g. {missing[:6]})")
  if unexpected:
    problems.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:6]})")
  bad = [f"{k}: expected {expected[k]}, got {tuple(np.shape(sd[k]))}"
         for k in expected if k in sd and tuple(np.shape(sd[k])) != tuple(expected[k])]
  if bad:
    problems.append(f"{len(bad)} shape mismatches (e.g. {bad[:4]})")
  if problems:
    raise ValueError(f"{flavour} StyleGAN2 state dict: architecture not recognised: "
                     + "; ".join(problems))


def _check_filters(flavour: str, sd: Mapping[str, Any], keys: list[str], gain: float):
  want = _blur_2d(gain)
  for k in keys:
    got = _np(sd[k])
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-6, atol=1e-7):
      raise ValueError(f"{flavour} StyleGAN2: {k}: expected the [1,3,3,1] filter "
                       f"{want.round(5).tolist()}, got {got.round(5).tolist()}")


def _count(sd: Mapping[str, Any], pattern: str) -> int:
  rx = re.compile(pattern)
  return len({m.group(1) for k in sd if (m := rx.fullmatch(k))})


# ----------------------------------------------------------------------------------------
# rosinality.


def infer_rosinality_config(sd: Mapping[str, Any]) -> dict:
  """Architecture of a rosinality ``g_ema`` state dict, from its keys and shapes.

  Returns:
    Config dict (resolution, z_dim = w_dim = style_dim, n_mlp, channels,
    channel_multiplier or None, img_channels, ...).

  Raises:
    ValueError: the state dict is not a rosinality StyleGAN2 generator this port covers.
  """
  validate_state_dict(sd, "rosinality StyleGAN2 state dict")
  if "style.1.weight" not in sd or "input.input" not in sd or "conv1.conv.weight" not in sd:
    raise ValueError("rosinality StyleGAN2 state dict: expected keys 'style.1.weight', "
                     f"'input.input', 'conv1.conv.weight', got {shown_keys(sd)}")
  n_mlp = _count(sd, r"style\.(\d+)\.weight")
  style_dim = _shape("rosinality", sd, "style.1.weight", 2, "(style_dim, style_dim)")[1]
  input_shape = _shape("rosinality", sd, "input.input", 4, "(1, C, 4, 4)")
  n_convs = _count(sd, r"convs\.(\d+)\.conv\.weight")
  if n_convs % 2:
    raise ValueError(f"rosinality StyleGAN2 state dict: expected an even number of "
                     f"'convs.N' layers, got {n_convs}")
  log2 = 2 + n_convs // 2
  resolution = 2 ** log2
  channels = [input_shape[1]]
  for j in range(0, n_convs, 2):
    key = f"convs.{j}.conv.weight"
    channels.append(_shape("rosinality", sd, key, 5, "(1, C_out, C_in, 3, 3)")[1])
  img_channels = (_shape("rosinality", sd, "to_rgb1.conv.weight", 5, "(1, 3, C_in, 1, 1)")[1]
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
      "use_noise": True, "conv_clamp": None, "blur_kernel": list(_BLUR),
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


def _dense(weight: Any) -> np.ndarray:
  """torch (out, in) → Flax (in, out)."""
  return np.ascontiguousarray(_np(weight).T)


def _conv(weight: Any) -> np.ndarray:
  """torch (C_out, C_in, kh, kw) (optionally with a leading 1) → HWIO."""
  w = _np(weight)
  if w.ndim == 5:
    w = w[0]
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def state_dict_to_params_rosinality(sd: Mapping[str, Any], latent_avg: Any,
                                    config: dict | None = None) -> dict:
  """Maps a rosinality ``g_ema`` state dict onto Flax variables.

  Args:
    sd: state dict name → array (numpy or torch tensors).
    latent_avg: (style_dim,) (any shape of that size) truncation centre, or None to use
      zeros (:func:`convert_rosinality` estimates it instead).
    config: from :func:`infer_rosinality_config` (inferred when None).

  Returns:
    ``{'params': ..., 'buffers': ...}`` for :class:`ports.stylegan2.model.StyleGAN2Generator`.

  Raises:
    ValueError: keys or shapes differ from the architecture the config describes, or the
      blur filters are not [1,3,3,1].
  """
  config = config or infer_rosinality_config(sd)
  validate_state_dict(sd, "rosinality StyleGAN2 state dict")
  with_noise = any(k.startswith("noises.") for k in sd)
  exp = _rosinality_expected(config, with_noise)
  _check_keys("rosinality", sd, exp)
  _check_finite("rosinality", sd, exp)
  _check_filters("rosinality", sd, [k for k in exp if k.endswith((".blur.kernel",
                                                                  ".upsample.kernel"))], 4.0)
  mapping = {f"fc_{l - 1}": {"kernel": _dense(sd[f"style.{l}.weight"]),
                             "bias": _np(sd[f"style.{l}.bias"])}
             for l in range(1, config["n_mlp"] + 1)}

  def styled(prefix):
    return {"modulation": {"kernel": _dense(sd[f"{prefix}.conv.modulation.weight"]),
                           "bias": _np(sd[f"{prefix}.conv.modulation.bias"])},
            "memory": {"kernel": _conv(sd[f"{prefix}.conv.weight"])},
            "noise_strength": _np(sd[f"{prefix}.noise.weight"]).reshape(()),
            "bias": _np(sd[f"{prefix}.activate.bias"])}

  def torgb(prefix):
    return {"modulation": {"kernel": _dense(sd[f"{prefix}.conv.modulation.weight"]),
                           "bias": _np(sd[f"{prefix}.conv.modulation.bias"])},
            "memory": {"kernel": _conv(sd[f"{prefix}.conv.weight"])},
            "bias": _np(sd[f"{prefix}.bias"]).reshape(-1)}

  synth: dict[str, Any] = {"const": np.ascontiguousarray(_np(sd["input.input"])[0]
                                                          .transpose(1, 2, 0)),
                           "conv_0": styled("conv1"), "torgb_0": torgb("to_rgb1")}
  for j in range(1, len(config["channels"])):
    synth[f"conv_{2 * j - 1}"] = styled(f"convs.{2 * j - 2}")
    synth[f"conv_{2 * j}"] = styled(f"convs.{2 * j - 1}")
    synth[f"torgb_{j}"] = torgb(f"to_rgbs.{j - 1}")
  if with_noise:
    noise = {f"noise_{i}": _np(sd[f"noises.noise_{i}"])[0, 0]
             for i in range(config["num_layers"])}
  else:
    noise = _generated_noise(config["num_layers"])
  if latent_avg is None:
    avg = np.zeros((config["w_dim"],), np.float32)
  else:
    if not (hasattr(latent_avg, "detach") or (isinstance(latent_avg, (np.ndarray, np.generic))
                                              and latent_avg.dtype.kind in "iuf")):
      raise ValueError(f"latent_avg: expected a tensor of {config['w_dim']} values, got "
                       f"{type(latent_avg).__name__} {brief_repr(latent_avg)}")
    avg = _np(latent_avg).reshape(-1)
    if avg.shape != (config["w_dim"],):
      raise ValueError(f"latent_avg: expected {config['w_dim']} values, got shape "
                       f"{np.shape(latent_avg)}")
    check_finite("latent_avg", avg, "rosinality checkpoint")
  return {"params": {"mapping": mapping, "synthesis": synth},
          "buffers": {"latent_avg": avg, "synthesis": noise}}


# ----------------------------------------------------------------------------------------
# NVIDIA.


def _get(obj: Any, key: str, default: Any = None) -> Any:
  if obj is None:
    return default
  if isinstance(obj, Mapping):
    return obj.get(key, default)
  return getattr(obj, key, default)


def _kwargs(value: Any, name: str) -> dict:
  """Keyword arguments recorded in a pickle: a dict with str keys (None: empty)."""
  if value is None:
    return {}
  if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
    raise ValueError(f"NVIDIA StyleGAN2: {name}: expected a dict of keyword arguments, got "
                     f"{type(value).__name__} {brief_repr(value)}")
  return dict(value)


def _number(value: Any, name: str, *, optional: bool = False, positive: bool = False
            ) -> float | None:
  """A setting that must be a finite (positive) number, or None when ``optional``."""
  if value is None and optional:
    return None
  ok = (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        and np.isfinite(value) and (value > 0 or not positive))
  if not ok:
    want = "a finite positive number" if positive else "a finite number"
    raise ValueError(f"NVIDIA StyleGAN2: {name}: expected {want}{' or None' if optional else ''}"
                     f", got {type(value).__name__} {brief_repr(value)}")
  return float(value)


def _integer(value: Any, name: str, *, optional: bool = False) -> int | None:
  """A setting that must be a non-negative int, or None when ``optional``."""
  if value is None and optional:
    return None
  if isinstance(value, (float, np.floating)) and np.isfinite(value) and float(value).is_integer():
    value = int(value)
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
    raise ValueError(f"NVIDIA StyleGAN2: {name}: expected a non-negative integer"
                     f"{' or None' if optional else ''}, got {type(value).__name__} "
                     f"{brief_repr(value)}")
  return int(value)


def infer_nvidia_config(sd: Mapping[str, Any], init_kwargs: Mapping[str, Any] | None = None,
                        attributes: Mapping[str, Any] | None = None) -> dict:
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
  init_kwargs = _kwargs(init_kwargs, "init_kwargs")
  mk = _kwargs(init_kwargs.get("mapping_kwargs"), "mapping_kwargs")
  sk = _kwargs(init_kwargs.get("synthesis_kwargs"), "synthesis_kwargs")
  for k, v in init_kwargs.items():  # synthesis kwargs passed flat (**synthesis_kwargs2)
    if k not in ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels",
                 "mapping_kwargs", "synthesis_kwargs", "resize") and k not in sk:
      sk[k] = v
  if attributes:
    if not isinstance(attributes, Mapping) or not all(isinstance(k, str) for k in attributes):
      raise ValueError(f"NVIDIA StyleGAN2: attributes: expected a dict of named settings, got "
                       f"{type(attributes).__name__} {brief_repr(attributes)}")
    _settings_from_attributes(attributes, mk, sk)
  validate_state_dict(sd, "NVIDIA StyleGAN2 state dict")
  if "mapping.fc0.weight" not in sd or "synthesis.b4.const" not in sd:
    raise ValueError("NVIDIA StyleGAN2 state dict: expected 'mapping.fc0.weight' and "
                     f"'synthesis.b4.const', got {shown_keys(sd)}")
  c_dim = _integer(init_kwargs.get("c_dim", 0) or 0, "c_dim")
  if c_dim or any(k.startswith("mapping.embed.") for k in sd):
    raise ValueError(f"NVIDIA StyleGAN2: expected an unconditional generator (c_dim 0), "
                     f"got c_dim {c_dim}")
  arch = sk.get("architecture", "skip")
  if arch != "skip" or any(re.fullmatch(r"synthesis\.b\d+\.skip\.weight", k) for k in sd):
    raise ValueError(f"NVIDIA StyleGAN2: expected architecture 'skip', got {arch!r}")
  act = mk.get("activation", "lrelu")
  if act != "lrelu":
    raise ValueError(f"NVIDIA StyleGAN2: expected mapping activation 'lrelu', got {brief_repr(act)}")
  filt = sk.get("resample_filter", _BLUR)
  if not isinstance(filt, (list, tuple)) or list(filt) != list(_BLUR):
    raise ValueError(f"NVIDIA StyleGAN2: expected resample_filter [1, 3, 3, 1], "
                     f"got {brief_repr(filt)}")
  if sk.get("kernel_size", 3) != 3:
    raise ValueError(f"NVIDIA StyleGAN2: expected kernel_size 3, got "
                     f"{brief_repr(sk.get('kernel_size'))}")
  n_mlp = _count(sd, r"mapping\.fc(\d+)\.weight")
  fc_shapes = [_shape("NVIDIA", sd, f"mapping.fc{l}.weight", 2, "(out, in)")
               for l in range(n_mlp)]
  _shape("NVIDIA", sd, "synthesis.b4.const", 3, "(C, 4, 4)")
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
    raise ValueError(f"NVIDIA StyleGAN2: expected blocks b4..b{resolution}, got {res_list}")
  channels = [_shape("NVIDIA", sd, f"synthesis.b{r}.conv1.weight", 4, "(C_out, C_in, 3, 3)")[0]
              for r in res_list]
  use_noise = "synthesis.b4.conv1.noise_strength" in sd
  conv_clamp = _number(sk.get("conv_clamp"), "conv_clamp", optional=True, positive=True)
  img_channels = (_shape("NVIDIA", sd, "synthesis.b4.torgb.weight", 4, "(C_out, C_in, 1, 1)")[0]
                  if "synthesis.b4.torgb.weight" in sd
                  else _integer(init_kwargs.get("img_channels", 3), "img_channels"))
  return {
      "architecture": "stylegan2", "flavour": "nvidia", "format_version": FORMAT_VERSION,
      "resolution": resolution, "z_dim": z_dim, "w_dim": w_dim, "style_dim": w_dim,
      "n_mlp": n_mlp, "mapping_hidden": hidden,
      "lr_mlp": _number(mk.get("lr_multiplier", 0.01), "lr_multiplier", positive=True),
      "channels": channels,
      "channel_base": _integer(sk.get("channel_base"), "channel_base", optional=True),
      "channel_max": _integer(sk.get("channel_max"), "channel_max", optional=True),
      "img_channels": img_channels, "use_noise": use_noise, "conv_clamp": conv_clamp,
      "blur_kernel": list(_BLUR), "num_layers": model_lib.num_conv_layers(resolution),
      "num_ws": 2 * log2 - 2, "noise_buffers": "checkpoint",
      "has_w_avg": "mapping.w_avg" in sd,
      "precision": "float32 (NVIDIA runs FP16 blocks only on CUDA)",
  }


def _settings_from_attributes(attributes: Mapping[str, Any], mk: dict, sk: dict) -> None:
  """Overrides kwargs ``mk`` (mapping) and ``sk`` (synthesis) with the built layers' values."""
  clamps = {name: _number(attributes[name], name, optional=True, positive=True)
            for name in attributes
            if re.fullmatch(r"synthesis\.b\d+\.(conv0|conv1|torgb)\.conv_clamp", name)}
  if clamps:
    values = set(clamps.values())
    if len(values) != 1:
      raise ValueError(f"NVIDIA StyleGAN2: expected one conv_clamp for all layers, got "
                       f"{dict(sorted(clamps.items())[:6])}")
    sk["conv_clamp"] = values.pop()
  if "synthesis.b4.architecture" in attributes:
    sk["architecture"] = attributes["synthesis.b4.architecture"]
  if "mapping.fc0.activation" in attributes:
    mk["activation"] = attributes["mapping.fc0.activation"]
  if "mapping.fc0.bias_gain" in attributes:
    mk["lr_multiplier"] = _number(attributes["mapping.fc0.bias_gain"], "mapping.fc0.bias_gain",
                                  positive=True)
  acts = [attributes[n] for n in attributes
          if re.fullmatch(r"synthesis\.b\d+\.conv[01]\.activation", n)]
  other = [a for a in acts if a != "lrelu"]
  if other:
    raise ValueError(f"NVIDIA StyleGAN2: expected synthesis activation 'lrelu', got "
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


def state_dict_to_params_nvidia(sd: Mapping[str, Any], config: dict) -> dict:
  """Maps an NVIDIA ``G_ema`` state dict onto Flax variables (latent_avg = mapping.w_avg).

  Raises:
    ValueError: keys or shapes differ from the architecture ``config`` describes, or the
      resample filters are not [1,3,3,1].
  """
  validate_state_dict(sd, "NVIDIA StyleGAN2 state dict")
  exp = _nvidia_expected(config)
  _check_keys("NVIDIA", sd, exp)
  _check_finite("NVIDIA", sd, exp)
  _check_filters("NVIDIA", sd, [k for k in exp if k.endswith(".resample_filter")], 1.0)
  mapping = {f"fc_{l}": {"kernel": _dense(sd[f"mapping.fc{l}.weight"]),
                         "bias": _np(sd[f"mapping.fc{l}.bias"])}
             for l in range(config["n_mlp"])}
  noise = {}

  def layer(prefix, i):
    out = {"modulation": {"kernel": _dense(sd[f"{prefix}.affine.weight"]),
                          "bias": _np(sd[f"{prefix}.affine.bias"])},
           "memory": {"kernel": _conv(sd[f"{prefix}.weight"])},
           "bias": _np(sd[f"{prefix}.bias"])}
    if config["use_noise"]:
      out["noise_strength"] = _np(sd[f"{prefix}.noise_strength"]).reshape(())
      noise[f"noise_{i}"] = _np(sd[f"{prefix}.noise_const"])
    return out

  def torgb(prefix):
    return {"modulation": {"kernel": _dense(sd[f"{prefix}.affine.weight"]),
                           "bias": _np(sd[f"{prefix}.affine.bias"])},
            "memory": {"kernel": _conv(sd[f"{prefix}.weight"])},
            "bias": _np(sd[f"{prefix}.bias"])}

  synth: dict[str, Any] = {
      "const": np.ascontiguousarray(_np(sd["synthesis.b4.const"]).transpose(1, 2, 0)),
      "conv_0": layer("synthesis.b4.conv1", 0), "torgb_0": torgb("synthesis.b4.torgb")}
  for j in range(1, len(config["channels"])):
    b = f"synthesis.b{4 * 2 ** j}"
    synth[f"conv_{2 * j - 1}"] = layer(f"{b}.conv0", 2 * j - 1)
    synth[f"conv_{2 * j}"] = layer(f"{b}.conv1", 2 * j)
    synth[f"torgb_{j}"] = torgb(f"{b}.torgb")
  avg = _np(sd["mapping.w_avg"]) if "mapping.w_avg" in sd else np.zeros((config["w_dim"],),
                                                                        np.float32)
  buffers: dict[str, Any] = {"latent_avg": avg}
  if noise:
    buffers["synthesis"] = noise
  return {"params": {"mapping": mapping, "synthesis": synth}, "buffers": buffers}


# ----------------------------------------------------------------------------------------
# Files.


def _source_info(src_path: str | os.PathLike) -> dict:
  return {"file": os.path.basename(os.fspath(src_path)),
          "sha256": _io.sha256_file(src_path), "bytes": os.path.getsize(src_path)}


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
    ValueError: the file holds no 'g_ema' generator or one of another architecture.
  """
  from ports import torchfile

  _io.check_output(out_dir, "converted", force=force, protect=(src_path,))
  ckpt = torchfile.load_torch(src_path)
  if not isinstance(ckpt, Mapping) or "g_ema" not in ckpt:
    keys = shown_keys(ckpt) if isinstance(ckpt, Mapping) else type(ckpt).__name__
    raise ValueError(f"rosinality checkpoint: expected a dict with 'g_ema', got {keys}")
  sd = validate_state_dict(ckpt["g_ema"], "rosinality checkpoint: 'g_ema'")
  config = infer_rosinality_config(sd)
  latent_avg = ckpt.get("latent_avg")
  variables = state_dict_to_params_rosinality(sd, latent_avg, config)
  if latent_avg is None:
    module = model_lib.generator_from_config(config)
    variables["buffers"]["latent_avg"] = model_lib.mean_latent(module, variables, 4096, 0)
    config["latent_avg_source"] = "mean of 4096 mapped latents (RandomState(0))"
  else:
    config["latent_avg_source"] = "checkpoint"
  config["source"] = _source_info(src_path)
  return _io.save_tree(out_dir, variables, config, kind="converted", force=force,
                       protect=(src_path,))


def convert_nvidia(src_path: str | os.PathLike, out_dir: str | os.PathLike,
                   key: str = "G_ema", *, force: bool = False) -> str:
  """Converts an NVIDIA stylegan2-ada / stylegan3-repo pickle ({'G_ema': Generator, ...}).

  ``out_dir`` and ``force`` as for :func:`convert_rosinality`.

  Returns:
    The absolute path of the written checkpoint directory.

  Raises:
    ValueError: no ``key`` network in the pickle, or an architecture the port does not
      cover.
  """
  from ports import torchfile

  _io.check_output(out_dir, "converted", force=force, protect=(src_path,))
  data = torchfile.load_nvidia_pickle(src_path)
  if not isinstance(data, Mapping) or key not in data:
    keys = shown_keys(data) if isinstance(data, Mapping) else type(data).__name__
    raise ValueError(f"NVIDIA pickle: expected a dict with {key!r}, got {keys}")
  net = data[key]
  sd = _get(net, "state_dict")
  if not isinstance(sd, Mapping):
    raise ValueError(f"NVIDIA pickle: {key!r}: expected a network with a state dict, "
                     f"got {type(net).__name__}")
  class_name = str(_get(net, "class_name", ""))
  if class_name and not class_name.endswith("Generator"):
    raise ValueError(f"NVIDIA pickle: {key!r}: expected a Generator, got {class_name}")
  init_kwargs = _kwargs(_get(net, "init_kwargs"), "init_kwargs")
  config = infer_nvidia_config(sd, init_kwargs, _get(net, "attributes"))
  variables = state_dict_to_params_nvidia(sd, config)
  if config["has_w_avg"]:
    config["latent_avg_source"] = "checkpoint (mapping.w_avg)"
  else:  # built with w_avg_beta=None: no tracked average
    module = model_lib.generator_from_config(config)
    variables["buffers"]["latent_avg"] = model_lib.mean_latent(module, variables, 4096, 0)
    config["latent_avg_source"] = "mean of 4096 mapped latents (RandomState(0))"
  config["source"] = _source_info(src_path) | {"network": key, "class_name": class_name}
  return _io.save_tree(out_dir, variables, config, kind="converted", force=force,
                       protect=(src_path,))


def load_stylegan2(path: str | os.PathLike):
  """Loads a converted checkpoint.

  Returns:
    ``(module, variables, config)``: the :class:`ports.stylegan2.model.StyleGAN2Generator`, its
    Flax variables (numpy arrays) and the JSON config.

  Raises:
    FileNotFoundError: ``path`` is not a complete checkpoint.
    ValueError: the checkpoint is not a StyleGAN2 conversion.
  """
  variables, config = _io.load_tree(path)
  if config.get("architecture") != "stylegan2":
    raise ValueError(f"{os.fspath(path)}: expected architecture 'stylegan2', "
                     f"got {config.get('architecture')!r}")
  return model_lib.generator_from_config(config), variables, config
