"""Converter from Hugging Face GPT-2 checkpoints (``save_pretrained`` folders).

A checkpoint folder holds ``config.json`` and the weights as ``model.safetensors``,
``pytorch_model.bin`` or shards listed by ``model.safetensors.index.json`` /
``pytorch_model.bin.index.json``. Neither format is read with torch or the
``safetensors`` package, and nothing in a file is run:

* ``.bin`` files (``torch.save`` zip or legacy format) go through
  :func:`ports.torchfile.load_torch`, whose restricted unpickler refuses any global
  outside its allowlist (:class:`ports.torchfile.UnsafeFileError`);
* ``.safetensors`` files go through :func:`load_safetensors`, which checks every field of
  the header before it reads a byte of tensor data.

Weight layout. Hugging Face's GPT-2 projections are ``Conv1D`` modules computing
``x @ W + b`` with ``W`` stored ``(in, out)``: that is already the Flax ``nn.Dense``
kernel, so ``c_attn``, ``attn.c_proj``, ``c_fc`` and ``mlp.c_proj`` weights are copied
as they are (no transpose). LayerNorm ``weight`` becomes ``scale``; embeddings become
``embedding``. Keys may carry the ``transformer.`` prefix (``GPT2LMHeadModel``) or not
(``GPT2Model`` and OpenAI's original uploads); the causal-mask buffers ``attn.bias`` /
``attn.masked_bias`` of older files are dropped; an ``lm_head.weight`` must equal
``wte.weight`` (GPT-2 ties them). Half-precision weights are widened to float32.

The result is one directory written atomically by :func:`memedit._io.save_tree`: the Flax
variables plus a JSON config (the :class:`ports.gpt2.model.GPT2Config` fields,
``architecture: 'gpt2'`` and the source files' names and sha256).

The file readers (:func:`checkpoint_files`, :func:`locate_checkpoint`,
:func:`load_safetensors`, :func:`read_state_dict`, :func:`read_hf_config`) live in
:mod:`ports.gpt2.hf_files` and are re-exported here.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from memedit import _io
from ports import (check_finite, check_variables, shown_keys, strip_module_prefix, to_numpy,
                   validate_state_dict)
from ports.gpt2.hf_files import (SAFETENSORS_DTYPES, checkpoint_files, load_safetensors,
                                locate_checkpoint, read_hf_config, read_state_dict)
from ports.gpt2.model import GPT2Config, GPT2LMHeadModel

__all__ = ["ARCHITECTURE", "FORMAT_VERSION", "SAFETENSORS_DTYPES", "checkpoint_files",
           "convert_gpt2", "load_gpt2", "load_safetensors", "locate_checkpoint",
           "read_hf_config", "read_state_dict", "save_gpt2", "state_dict_to_params"]

ARCHITECTURE = "gpt2"
FORMAT_VERSION = 1

_BF16 = np.dtype(ml_dtypes.bfloat16)
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


# ----------------------------------------------------------------------------------------
# State dict -> Flax variables.


def _expected(config: GPT2Config) -> dict[str, tuple[int, ...]]:
  d, f = config.n_embd, config.inner_dim
  exp = {"wte.weight": (config.vocab_size, d), "wpe.weight": (config.n_positions, d),
         "ln_f.weight": (d,), "ln_f.bias": (d,)}
  for i in range(config.n_layer):
    p = f"h.{i}"
    exp.update({
        f"{p}.ln_1.weight": (d,), f"{p}.ln_1.bias": (d,),
        f"{p}.attn.c_attn.weight": (d, 3 * d), f"{p}.attn.c_attn.bias": (3 * d,),
        f"{p}.attn.c_proj.weight": (d, d), f"{p}.attn.c_proj.bias": (d,),
        f"{p}.ln_2.weight": (d,), f"{p}.ln_2.bias": (d,),
        f"{p}.mlp.c_fc.weight": (d, f), f"{p}.mlp.c_fc.bias": (f,),
        f"{p}.mlp.c_proj.weight": (f, d), f"{p}.mlp.c_proj.bias": (d,),
    })
  return exp


def _f32(value: Any) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(to_numpy(value), dtype=np.float32))


def state_dict_to_params(sd: Mapping[str, Any], config: GPT2Config, *,
                         where: str = "GPT-2 state dict") -> dict:
  """Maps a Hugging Face GPT-2 state dict onto the variables of
  :class:`ports.gpt2.model.GPT2LMHeadModel`.

  Args:
    sd: name -> array (numpy, or torch tensors), with or without the ``transformer.``
      prefix (and the ``module.`` / ``_orig_mod.`` prefixes of ``DataParallel`` and
      ``torch.compile`` before it); ``Conv1D`` weights ``(in, out)``.
    config: the architecture the weights must match.
    where: what ``sd`` is, for error messages (e.g. the file it was read from).

  Returns:
    ``{'params': ...}`` of float32 numpy arrays; a ``Conv1D`` weight ``W (in, out)``
    becomes the Dense kernel ``W`` unchanged, e.g. ``h.1.mlp.c_proj.weight``
    ``(d_ff, d)`` -> ``params['h_1']['mlp']['c_proj']['kernel']`` ``(d_ff, d)``.

  Raises:
    ValueError: names missing or unexpected, shapes that differ from ``config`` (the
      message lists them), weights that are not floating-point (e.g. the int8 of a
      quantised checkpoint), non-finite weights, or an ``lm_head.weight`` that differs
      from ``wte.weight`` (an untied head).

  Example:
    >>> import numpy as np
    >>> cfg = GPT2Config(vocab_size=5, n_positions=4, n_embd=4, n_layer=1, n_head=2)
    >>> sd = {k: np.zeros(s, np.float32) for k, s in _expected(cfg).items()}
    >>> p = state_dict_to_params(sd, cfg)["params"]
    >>> p["h_0"]["mlp"]["c_proj"]["kernel"].shape, p["ln_f"]["scale"].shape
    ((16, 4), (4,))
  """
  sd = strip_module_prefix(sd)  # saved from a DataParallel or torch.compile wrapper
  if isinstance(sd, Mapping):  # bfloat16 (a numpy 'V' kind) is widened before the checks
    sd = {k: v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype == _BF16 else v
          for k, v in sd.items()}
  validate_state_dict(sd, where)
  flat: dict[str, Any] = {}
  for key, value in sd.items():
    name = key[len("transformer."):] if key.startswith("transformer.") else key
    if name in flat:
      raise ValueError(f"{where}: expected one of {key!r} and {name!r}, got both")
    flat[name] = value
  head = flat.pop("lm_head.weight", None)
  exp = _expected(config)
  missing = [k for k in exp if k not in flat]
  unexpected = [k for k in flat if k not in exp and not _BUFFER.fullmatch(k)]
  bad = [f"{k}: expected {exp[k]}, got {tuple(np.shape(flat[k]))}"
         for k in exp if k in flat and tuple(np.shape(flat[k])) != exp[k]]
  problems = []
  if missing:
    problems.append(f"missing {len(missing)} names (e.g. {missing[:6]})")
  if unexpected:
    problems.append(f"unexpected {len(unexpected)} names (e.g. {unexpected[:6]})")
  if bad:
    problems.append(f"{len(bad)} shape mismatches (e.g. {bad[:4]})")
  if problems:
    raise ValueError(f"{where}: expected the GPT-2 of {config} (names and shapes), got "
                     + "; ".join(problems) + f"; names found: {shown_keys(flat)}")
  for k in [*exp, "lm_head.weight"] if head is not None else exp:
    value = head if k == "lm_head.weight" else flat[k]
    if hasattr(value, "detach"):  # a torch tensor handed in by a caller
      floating, dtype = value.is_floating_point(), value.dtype
    else:  # numpy; kind 'V' is one of the ml_dtypes floats validate_state_dict admits
      dtype = np.asarray(value).dtype
      floating = np.issubdtype(dtype, np.floating) or dtype.kind == "V"
    if not floating:
      raise ValueError(f"{where}: {k}: expected floating-point weights, got {dtype} "
                       "(quantised or damaged checkpoints are not supported)")
  for k in exp:
    check_finite(k, flat[k], where)
  wte = _f32(flat["wte.weight"])
  if head is not None:
    lm_head = _f32(head)
    if lm_head.shape != wte.shape or not np.array_equal(lm_head, wte):
      raise ValueError(f"{where}: lm_head.weight: expected the tied token embedding "
                       f"wte.weight {wte.shape}, got a different matrix of shape "
                       f"{lm_head.shape} (untied heads are not supported)")

  def dense(prefix):
    return {"kernel": _f32(flat[f"{prefix}.weight"]), "bias": _f32(flat[f"{prefix}.bias"])}

  def norm(prefix):
    return {"scale": _f32(flat[f"{prefix}.weight"]), "bias": _f32(flat[f"{prefix}.bias"])}

  params: dict[str, Any] = {"wte": {"embedding": wte},
                            "wpe": {"embedding": _f32(flat["wpe.weight"])},
                            "ln_f": norm("ln_f")}
  for i in range(config.n_layer):
    p = f"h.{i}"
    params[f"h_{i}"] = {
        "ln_1": norm(f"{p}.ln_1"), "ln_2": norm(f"{p}.ln_2"),
        "attn": {"c_attn": dense(f"{p}.attn.c_attn"), "c_proj": dense(f"{p}.attn.c_proj")},
        "mlp": {"c_fc": dense(f"{p}.mlp.c_fc"), "c_proj": dense(f"{p}.mlp.c_proj")},
    }
  return {"params": params}


# ----------------------------------------------------------------------------------------
# Conversion and loading.


def _source_info(path: str) -> dict:
  return {"file": os.path.basename(path), "sha256": _io.sha256_file(path),
          "bytes": os.path.getsize(path)}


def convert_gpt2(src: str | os.PathLike, out_dir: str | os.PathLike, *,
                 force: bool = False) -> str:
  """Converts a Hugging Face GPT-2 checkpoint into a Flax checkpoint directory.

  Args:
    src: a ``save_pretrained`` folder (``config.json`` plus ``model.safetensors``,
      ``pytorch_model.bin`` or sharded weights with their index), or one of its weight
      files (see :func:`checkpoint_files`).
    out_dir: destination directory (an orbax checkpoint plus JSON config), written
      atomically. An existing one is replaced only when it is a converted checkpoint (or
      empty; any kind with ``force``), and never when it holds the source.
    force: replace an existing ``out_dir`` of another kind.

  Returns:
    ``out_dir`` as an absolute path.

  Raises:
    FileNotFoundError: no weights or no ``config.json``.
    ValueError: the config is not GPT-2, the weights do not match it, or a file is unsafe
      (:class:`ports.torchfile.UnsafeFileError`: a pickle naming anything but tensor
      constructors, refused before it runs) or damaged
      (:class:`ports.torchfile.CorruptFileError`, e.g. a safetensors header pointing past
      the end of the file, or shards that disagree with their index).
  """
  src = os.fspath(src)
  _io.check_output(out_dir, "converted", force=force, protect=(src,))
  files, config_file, index = locate_checkpoint(src)
  config = read_hf_config(config_file)
  sd = read_state_dict(files, index=index)
  dtypes = sorted({str(np.asarray(v).dtype) for v in sd.values()})
  variables = state_dict_to_params(sd, config, where=f"{src}: GPT-2 weights")
  meta = {"architecture": ARCHITECTURE, "format_version": FORMAT_VERSION,
          **config.to_dict(), "inner_dim": config.inner_dim,
          "source": {"config": _source_info(config_file),
                     "weights": [_source_info(f) for f in files],
                     "format": "safetensors" if files[0].endswith(".safetensors") else "torch",
                     "dtypes": dtypes}}
  return _io.save_tree(out_dir, variables, meta, kind="converted", force=force,
                       protect=(src,))


def save_gpt2(out_dir: str | os.PathLike, config: GPT2Config, variables: Mapping[str, Any], *,
              source: Mapping[str, Any] | None = None, force: bool = False) -> str:
  """Writes Flax GPT-2 variables (e.g. a model trained in JAX) as a checkpoint that
  :func:`load_gpt2` (and :func:`ports.load_converted`) reads.

  Args:
    out_dir: destination directory, written atomically; an existing one is replaced only
      when it is a converted checkpoint (or empty; any kind with ``force``).
    config: the model's :class:`GPT2Config`.
    variables: ``{'params': ...}`` of :class:`GPT2LMHeadModel` with ``config``.
    source: JSON-serialisable description of where the weights come from.
    force: replace an existing ``out_dir`` of another kind.

  Returns:
    ``out_dir`` as an absolute path.

  Raises:
    ValueError: the variables do not have the shapes ``config`` implies, are not
      floating-point numbers, or are not finite. Other float dtypes are stored as float32.

  Example:
    >>> import os, tempfile, jax, jax.numpy as jnp
    >>> cfg = GPT2Config(vocab_size=11, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    >>> v = GPT2LMHeadModel(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    >>> out = save_gpt2(os.path.join(tempfile.mkdtemp(), "m"), cfg, v)
    >>> load_gpt2(out)[0].config == cfg
    True
  """
  import jax

  want = jax.eval_shape(lambda: GPT2LMHeadModel(config).init(
      jax.random.key(0), np.zeros((1, 1), np.int32)))
  want_shapes = {jax.tree_util.keystr(k): tuple(v.shape)
                 for k, v in jax.tree_util.tree_flatten_with_path(want)[0]}
  got = {jax.tree_util.keystr(k): np.asarray(v)
         for k, v in jax.tree_util.tree_flatten_with_path(dict(variables))[0]}
  if {k: tuple(v.shape) for k, v in got.items()} != want_shapes:
    diff = sorted(set(want_shapes.items()) ^ {(k, tuple(v.shape)) for k, v in got.items()})
    raise ValueError(f"variables: expected the parameters of GPT-2 with {config}, got "
                     f"differences {diff[:4]}")
  for k, v in got.items():
    if not (np.issubdtype(v.dtype, np.floating) or v.dtype == _BF16):
      raise ValueError(f"variables: {k}: expected floating-point weights, got {v.dtype}")
    if not np.all(np.isfinite(v)):
      raise ValueError(f"variables: expected finite weights, got NaN or inf in {k}")
  meta = {"architecture": ARCHITECTURE, "format_version": FORMAT_VERSION,
          **config.to_dict(), "inner_dim": config.inner_dim,
          "source": dict(source or {"format": "flax"})}
  # Stored in float32, as load_gpt2 reads them (and as the converter widens half precision).
  return _io.save_tree(out_dir, jax.tree_util.tree_map(_f32, dict(variables)), meta,
                       kind="converted", force=force)


def load_gpt2(path: str | os.PathLike) -> tuple[GPT2LMHeadModel, dict, dict]:
  """Loads a checkpoint written by :func:`convert_gpt2`.

  Returns:
    ``(module, variables, config)``: the :class:`ports.gpt2.model.GPT2LMHeadModel`, its
    variables ``{'params': ...}`` (jax arrays) and the JSON config;
    ``module.apply(variables, ids)`` maps ``(N, T)`` token ids to ``(N, T, V)`` logits.

  Raises:
    FileNotFoundError: ``path`` is not a complete checkpoint.
    ValueError: the checkpoint is not a GPT-2 conversion, its config is damaged, or its
      arrays do not fit its config (see :func:`ports.check_variables`).
  """
  import jax
  import jax.numpy as jnp

  tree, meta = _io.load_tree(path)
  if meta.get("architecture") != ARCHITECTURE:
    raise ValueError(f"{os.fspath(path)}: architecture: expected {ARCHITECTURE!r}, "
                     f"got {meta.get('architecture')!r}")
  try:
    config = GPT2Config.from_dict(meta)
  except ValueError as e:
    raise ValueError(f"{os.fspath(path)}: {e}; the checkpoint is damaged: convert it "
                     "again") from None
  module = GPT2LMHeadModel(config)
  check_variables(module, tree, (jax.ShapeDtypeStruct((1, 1), jnp.int32),), os.fspath(path))
  return module, jax.tree_util.tree_map(jnp.asarray, tree), meta
