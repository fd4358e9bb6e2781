"""A generator for the copy–paste–context workflow: any Flax image model with a latent sample.

A :class:`Generator` is an NNX ``(graphdef, state)`` or Linen ``(module, variables)``
model mapping latents ``z (N, z_dim)`` (plus fixed keyword arguments) to NHWC images
``(N, R, R, C)`` in about [-1, 1], the names of its editable layers, and a deterministic
latent sample: image number i has the latent :func:`reference_latents` gives (row i of
``RandomState(seed).standard_normal``, as the reference draws them) or a custom sampler's.

An editable layer maps a per-pixel key map ``k (N, h, w, C_in)`` (its first call
argument; further arguments, e.g. StyleGAN2's style, are kept) to a value map
``v (N, s·h, s·w, C_out)`` (s ≥ 1): any layer :func:`memedit.layers.memory_view` knows
(built-in Conv / ConvTranspose / Dense, or a kind a port registers). Capture, statistics
and cache keys come from :mod:`memedit.layers`.

Compiled programs (:mod:`memedit.generators.forward`) take the parameters as arguments
and are cached by :func:`structure_key` and the input shapes, so every parameter set of a
model (e.g. an edited copy) reuses them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memedit.generators._checks import image_numbers
from memedit.layers import hooks as layer_hooks
from memedit.layers.conv import as_tuple
from memedit.layers.model import as_model
from memedit.layers.view import MemoryView, memory_view
from memedit.specs import got

__all__ = ["Generator", "LayerInfo", "generator_from_converted", "kernel_digest", "layer_info",
           "layer_kernel", "layer_view", "recorded_call_kwargs", "reference_latents", "structure_key"]


def reference_latents(imgnums: Sequence[int] | int, z_dim: int, seed: int = 1) -> np.ndarray:
  """The reference's latent sample: image i is row i of ``RandomState(seed)``'s standard
  normals drawn as one (n, z_dim) block, whatever n > i.

  Args:
    imgnums: an int n >= 0 (images 0..n-1) or a sequence of integer image numbers
      i >= 0 (the block drawn grows with the largest).
    z_dim: latent size.
    seed: RandomState seed (the reference's is 1).

  Returns:
    (len(imgnums), z_dim) float32.

  Raises:
    ValueError: an image number that is not an integer (a float, a bool) or negative.

  Example:
    >>> z = reference_latents([2, 0], 3)
    >>> ref = np.random.RandomState(1).standard_normal((3, 3)).astype(np.float32)
    >>> bool((z == ref[[2, 0]]).all()), z.shape
    (True, (2, 3))
  """
  nums = image_numbers(imgnums)
  n = int(nums.max()) + 1 if nums.size else 0
  rs = np.random.RandomState(seed)
  z = rs.standard_normal(n * z_dim).reshape(n, z_dim).astype(np.float32)
  return z[nums]


@dataclasses.dataclass(frozen=True, eq=False)
class Generator:
  """An image generator with the editable layers and the latent sample the workflow needs.

  Attributes:
    model: NNX ``(graphdef, state)`` or Linen ``(module, variables)`` (an ``nnx.Module`` is
      split on construction and not kept); called as ``model(z, **call_kwargs)`` it gives
      images (N, R, R, C) in about [-1, 1].
    z_dim: latent size.
    resolution: canvas resolution R.
    layers: a mapping name → address of each editable layer (e.g. ``{'convt2':
      ('convt2',)}``), an address as :func:`memedit.layers.memory_view` takes it; anything
      else (e.g. a list of names) is refused.
    call_kwargs: keyword arguments of every model call (e.g. a truncation), as sorted
      (name, value) pairs (a dict or a sequence of pairs is accepted); Python values stay
      static.
    seed: seed of the reference latent sample.
    sampler: optional ``imgnums (n,) int64 -> z (n, z_dim)`` replacing the reference
      sample (its latents must be finite once in float32).
    architecture: free-text name of the architecture.

  Example:
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(4, 12, rngs=nnx.Rngs(0)),
    ...                        lambda x: x.reshape(-1, 2, 2, 3))
    >>> gen = Generator(model, z_dim=4, resolution=2, layers={"fc": ("layers", 0)})
    >>> gen.framework, gen.latents([0, 5]).shape
    ('nnx', (2, 4))
  """

  model: Any
  z_dim: int
  resolution: int
  layers: Mapping[str, Any]
  call_kwargs: tuple = ()
  seed: int = 1
  sampler: Callable[[np.ndarray], np.ndarray] | None = None
  architecture: str = ""

  def __post_init__(self):
    m = as_model(self.model)
    object.__setattr__(self, "model", (m.definition, m.params))
    kw = self.call_kwargs
    if not isinstance(kw, Mapping):
      if isinstance(kw, (str, bytes)) or not isinstance(kw, Sequence) or any(
          isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) != 2
          for p in kw):
        raise ValueError(f"call_kwargs: expected a dict name -> value or (name, value) pairs, "
                         f"got {got(kw)}")
    kw = tuple(sorted(dict(kw).items())) if isinstance(kw, Mapping) else tuple(
        (str(k), v) for k, v in kw)
    object.__setattr__(self, "call_kwargs", kw)
    if not isinstance(self.layers, Mapping):
      # dict(["up"]) would give {"u": "p"}: a list of names is not a mapping.
      raise ValueError(f"layers: expected a mapping name -> address of each editable layer "
                       f"(e.g. {{'up': ('up',)}}), got {got(self.layers)}")
    if not self.layers:
      raise ValueError("layers: expected at least one editable layer (name -> address), "
                       "got none")
    object.__setattr__(self, "layers", {str(k): v for k, v in dict(self.layers).items()})
    for name, value in (("z_dim", self.z_dim), ("resolution", self.resolution)):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")

  @property
  def framework(self) -> str:
    """``'nnx'`` or ``'linen'``."""
    return "nnx" if isinstance(self.model[0], nnx.GraphDef) else "linen"

  @property
  def definition(self) -> Any:
    """The NNX GraphDef or the Linen module."""
    return self.model[0]

  @property
  def params(self) -> Any:
    """The NNX State or the Linen variables."""
    return self.model[1]

  def latents(self, imgnums: Sequence[int] | int) -> np.ndarray:
    """Latents (len(imgnums), z_dim) float32 of image numbers (an int n: 0..n-1).

    Image numbers are integers i >= 0 (an int n >= 0); others (a float, a bool, a
    negative number) raise a ValueError before any sampling.
    """
    nums = image_numbers(imgnums)
    if self.sampler is None:
      return reference_latents(nums, self.z_dim, self.seed)
    z = np.asarray(self.sampler(nums), np.float32)
    if z.shape != (len(nums), self.z_dim):
      raise ValueError(f"sampler: expected latents of shape {(len(nums), self.z_dim)}, got "
                       f"{z.shape}")
    bad = int(z.size - np.isfinite(z).sum())
    if bad:
      raise ValueError(f"sampler: expected finite latents, got {bad} NaN or infinite of "
                       f"{z.size} (in float32)")
    return z

  def layer_address(self, name: str) -> Any:
    """The address of layer ``name``; ValueError naming the known layers."""
    if name not in self.layers:
      raise ValueError(f"layer: expected one of {sorted(self.layers)}, got {name!r}")
    return self.layers[name]

  def weight_path(self, name: str) -> tuple:
    """Path of layer ``name``'s kernel leaf in :attr:`params`."""
    return layer_view(self, name).weight_path

  def with_params(self, params: Any) -> "Generator":
    """The same generator with other parameters (e.g. an edited copy)."""
    return dataclasses.replace(self, model=(self.definition, params))


def kernel_digest(params: Any, path: Sequence) -> str:
  """A short content hash (16 hex digits of sha256 over shape, dtype and bytes) of the
  kernel leaf at ``path``: what an edit records of the model it was made on.

  Args:
    params: the parameter pytree. path: the kernel leaf's path (e.g. ``edit.path``).

  Returns:
    16 hex digits.

  Example:
    >>> import numpy as np
    >>> kernel_digest({"k": np.zeros((2, 3), np.float32)}, ("k",))
    '4aa8afb0381a2c0a'
  """
  from memedit import _io
  from memedit.tree import get_leaf

  return _io.tree_hash(get_leaf(params, tuple(path)))[:16]


def recorded_call_kwargs(gen: Generator) -> dict:
  """The generator's call keywords that an edit records in its settings: those whose
  values are JSON scalars (numbers, strings, booleans, None), e.g. StyleGAN2's truncation.

  Args:
    gen: the generator.

  Returns:
    A dict name -> value (empty when the model takes no such keywords).

  Example:
    >>> from flax import nnx
    >>> gen = Generator(nnx.Linear(2, 4, rngs=nnx.Rngs(0)), 2, 2, {"l": ()},
    ...                 (("truncation", 0.7), ("table", [1, 2])))
    >>> recorded_call_kwargs(gen)
    {'truncation': 0.7}
  """
  out = {}
  for name, value in gen.call_kwargs:
    if isinstance(value, np.generic):
      value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
      out[str(name)] = value
  return out


def generator_from_converted(path, *, truncation: float | None = None) -> Generator:
  """Opens a checkpoint converted by ``memedit convert`` (DCGAN or StyleGAN2).

  DCGAN layers are ``convt1`` .. ``convt4`` (transposed convolutions, keys at 4..32 px);
  StyleGAN2 layers are ``conv_0`` .. (the modulated convolutions' memories in the
  reference's numbering; keys x·s).

  Args:
    path: the converted checkpoint directory.
    truncation: StyleGAN2's truncation ψ (default 1); DCGAN has none.

  Returns:
    The :class:`Generator`.

  Raises:
    ValueError: an architecture without a workflow generator, or a damaged checkpoint.

  Example:
    >>> import tempfile
    >>> from memedit import _io
    >>> from ports.dcgan import variables_from_state_dict
    >>> from ports.dcgan.convert import expected_shapes
    >>> sd = {k: np.full(s, 0.5, np.float32) for k, s in expected_shapes(100, 2, 3).items()}
    >>> path = _io.save_tree(tempfile.mkdtemp() + "/m", *variables_from_state_dict(sd))
    >>> gen = generator_from_converted(path)
    >>> sorted(gen.layers), gen.resolution, gen.weight_path("convt2")
    (['convt1', 'convt2', 'convt3', 'convt4'], 64, ('params', 'convt2', 'kernel'))
  """
  import ports

  module, variables, config = ports.load_converted(path)
  variables = jax.tree_util.tree_map(jnp.asarray, variables)
  arch = config.get("architecture")
  if arch == "dcgan":
    from ports.dcgan import memedit_generator
    if truncation is not None:
      raise ValueError(f"truncation: expected None for a DCGAN (it has none), got "
                       f"{truncation!r}")
    return memedit_generator(module, variables, config)
  if arch == "stylegan2":
    from ports.stylegan2 import memedit_generator
    return memedit_generator(module, variables, config, truncation=truncation)
  raise ValueError(f"architecture: expected 'dcgan' or 'stylegan2', got {arch!r}")


# ----------------------------------------------------------------------------------------
# Views and geometry.

_VIEWS: "weakref.WeakKeyDictionary[Generator, dict]" = weakref.WeakKeyDictionary()


def layer_view(gen: Generator, layer: str) -> MemoryView:
  """The :class:`memedit.layers.MemoryView` of layer ``layer`` (made once per generator).

  Args:
    gen: the generator.
    layer: the layer's name.

  Returns:
    The view (its ``layer`` holds this generator's copy of the layer).

  Raises:
    ValueError: an unknown layer name, a layer memedit cannot view (unregistered kind,
      a whole scanned stack), or a model that cannot run on latents (1, z_dim) with the
      generator's call keywords.

  Example:
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(4, 12, rngs=nnx.Rngs(0)),
    ...                        lambda x: x.reshape(-1, 2, 2, 3))
    >>> gen = Generator(model, z_dim=4, resolution=2, layers={"fc": ("layers", 0)})
    >>> layer_view(gen, "fc").weight_path
    ('layers', 0, 'kernel')
  """
  views = _VIEWS.setdefault(gen, {})
  if layer not in views:
    address = gen.layer_address(layer)
    z = jnp.zeros((1, gen.z_dim), jnp.float32)
    with _calling(gen):
      try:
        view = memory_view(gen.model, address, z, **dict(gen.call_kwargs))
      except Exception as e:
        _check_model_runs(gen, e)
        raise
    view.require_unstacked()
    views[layer] = view
  return views[layer]


def _model_call_error(gen: Generator, kind: str, message: str) -> ValueError:
  first = message.splitlines()[0] if message else ""
  return ValueError(
      f"model: expected model(z, **call_kwargs) to run on latents z of shape "
      f"(1, {gen.z_dim}) (z_dim={gen.z_dim}, call_kwargs {sorted(dict(gen.call_kwargs))}), "
      f"got {kind}: {first or '(no message)'}; the workflow calls the model on latents "
      f"(N, z_dim): wrap a model taking latents of another shape (e.g. (N, 4, 4, C)) in one "
      f"that reshapes them")


def _check_model_runs(gen: Generator, error: BaseException) -> None:
  """After ``error`` while viewing a layer: when the model itself (no hooks, a shape-only
  trace) cannot run on latents (1, z_dim) with the generator's call keywords, raises the
  ValueError that says so (e.g. a model taking latents (N, 4, 4, C), whose own error is an
  AssertionError or a shape error deep inside JAX); otherwise returns, and ``error`` (one
  of memedit's own about the layer) stands."""
  from memedit.layers.model import merge

  definition, params = gen.model
  kwargs = dict(gen.call_kwargs)
  if gen.framework == "nnx":
    call = lambda p, z: merge(definition, p)(z, **kwargs)
  else:
    call = lambda p, z: definition.apply(p, z, **kwargs)
  try:
    jax.eval_shape(call, params, jax.ShapeDtypeStruct((1, gen.z_dim), jnp.float32))
  except Exception as e:  # the model's own failure, whatever its type
    raise _model_call_error(gen, type(e).__name__, str(e)) from error


@contextlib.contextmanager
def _calling(gen: Generator):
  """Names the call when the model cannot run on latents (N, z_dim) with the generator's
  call keywords: a wrong ``z_dim`` or a misspelt keyword raise a TypeError inside it."""
  try:
    yield
  except TypeError as e:
    raise _model_call_error(gen, "TypeError", str(e)) from e


class LayerInfo(NamedTuple):
  """Geometry of an editable layer.

  Attributes:
    name: layer name. module_path: where its calls run. weight_path: its kernel leaf.
    kind, in_ndim: the kernel's memory layout (``'conv'`` per-tap HWIO or ``'dense'``).
    kernel_shape: the kernel's shape.
    key_res: h, the key map's size. value_res: s·h. scale: s.
    key_dim: C_in. value_dim: C_out.
    margin: key pixels of context a crop needs for exact outputs (half the dilated
      kernel's extent (k − 1)·d + 1, plus 1).
    key_padding: how a crop's keys are padded beyond the key map, as the layer pads its
      input: ``np.pad``'s ``'constant'`` (zeros; 'SAME' and explicit padding), ``'wrap'``
      ('CIRCULAR') or ``'reflect'`` ('REFLECT').
  """

  name: str
  module_path: tuple
  weight_path: tuple
  kind: str
  in_ndim: int
  kernel_shape: tuple
  key_res: int
  value_res: int
  scale: int
  key_dim: int
  value_dim: int
  margin: int
  key_padding: str = "constant"


_KEY_PADDING = {"CIRCULAR": "wrap", "REFLECT": "reflect"}


def _crop_geometry(view: MemoryView) -> tuple[int, str]:
  """(margin, key padding) of a layer's crops: a dilated kernel reaches (k − 1)·d + 1 key
  pixels, and a layer padding its input circularly or by reflection sees those keys
  beyond the map's edge, not zeros."""
  if view.kind != "conv":
    return 1, "constant"
  mod = view.layer_module
  taps = tuple(view.kernel_shape[view.stacked:-2])
  dilation = as_tuple(getattr(mod, "kernel_dilation", 1), len(taps))
  margin = max((t - 1) * int(d) + 1 for t, d in zip(taps, dilation)) // 2 + 1
  padding = getattr(mod, "padding", None)
  return margin, _KEY_PADDING.get(padding, "constant") if isinstance(padding, str) else "constant"


def layer_kernel(gen: Generator, layer: str, params: Any = None) -> Any:
  """The kernel of layer ``layer`` in ``params`` (default: the generator's).

  Args:
    gen: the generator. layer: the layer's name. params: the model's parameters.

  Returns:
    The kernel array (e.g. HWIO (kh, kw, C_in, C_out)).

  Example:
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(4, 12, rngs=nnx.Rngs(0)),
    ...                        lambda x: x.reshape(-1, 2, 2, 3))
    >>> gen = Generator(model, z_dim=4, resolution=2, layers={"fc": ("layers", 0)})
    >>> layer_kernel(gen, "fc").shape
    (4, 12)
  """
  return layer_view(gen, layer).read_kernel(gen.params if params is None else params)


def structure_key(gen: Generator, layer: str) -> tuple | None:
  """A hashable description of what a compiled program of this layer depends on.

  Args:
    gen: the generator. layer: the layer's name.

  Returns:
    (framework, model definition, the layer's module path, call kwargs, z_dim): no
    parameters, so every parameter set of a model has the same key; ``None`` when the
    model cannot be hashed (a Linen module with array attributes: nothing is shared).

  Example:
    >>> from flax import nnx
    >>> class Toy(nnx.Module):
    ...   def __init__(self, seed):
    ...     self.up = nnx.ConvTranspose(3, 2, (4, 4), strides=(2, 2), rngs=nnx.Rngs(seed))
    ...   def __call__(self, z):
    ...     return self.up(z.reshape(-1, 2, 2, 3))
    >>> a, b = (Generator(Toy(seed), 12, 4, {"up": ("up",)}) for seed in (0, 1))
    >>> structure_key(a, "up") == structure_key(b, "up")
    True
  """
  key = (gen.framework, gen.definition, layer_view(gen, layer).module_path, gen.call_kwargs,
         gen.z_dim)
  try:
    hash(key)
  except TypeError:
    return None
  return key


_INFO: dict = {}


def check_model_output(gen: Generator, out: Any) -> None:
  """Refuses a model output that is not one image batch (N, R, R, C) of floats.

  Args:
    gen: the generator (R = ``gen.resolution``).
    out: what ``model(z, **call_kwargs)`` gave (arrays or their ``jax.ShapeDtypeStruct``).

  Raises:
    ValueError: a tuple, dict or other pytree, an array that is not 4-d, whose height
      and width are not the generator's resolution, or that is not floating point.

  Example:
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(4, 12, rngs=nnx.Rngs(0)),
    ...                        lambda x: x.reshape(-1, 2, 2, 3))
    >>> gen = Generator(model, z_dim=4, resolution=4, layers={"fc": ("layers", 0)})
    >>> check_model_output(gen, jax.ShapeDtypeStruct((1, 2, 2, 3), jnp.float32))
    Traceback (most recent call last):
    ...
    ValueError: model: expected model(z) to give images (N, 4, 4, C) (NHWC floats at the generator's resolution 4), got an array of shape (1, 2, 2, 3) (float32)
  """
  R = gen.resolution
  if hasattr(out, "shape") and hasattr(out, "dtype"):
    shape = tuple(int(d) for d in out.shape)
    if (len(shape) == 4 and shape[1:3] == (R, R) and shape[3] >= 1
        and jnp.issubdtype(out.dtype, jnp.floating)):
      return
    what = f"an array of shape {shape} ({np.dtype(out.dtype).name})"
  else:
    leaves = jax.tree_util.tree_leaves(out)
    what = (f"a {type(out).__name__} holding arrays of shapes "
            f"{[tuple(np.shape(a)) for a in leaves]}")
  raise ValueError(f"model: expected model(z) to give images (N, {R}, {R}, C) (NHWC floats "
                   f"at the generator's resolution {R}), got {what}")


def layer_info(gen: Generator, layer: str) -> LayerInfo:
  """The geometry of layer ``layer`` (from a shape-only trace, no compute).

  Args:
    gen: the generator. layer: the layer's name.

  Returns:
    :class:`LayerInfo`.

  Raises:
    ValueError: a layer whose keys and values are not square (N, h, h, ·) maps with an
      output resolution that is a multiple of the input's, or whose key or value size
      does not divide the canvas resolution R (masks map to its pixels by whole cells);
      a model whose output is not an image batch (N, R, R, C)
      (:func:`check_model_output`).

  Example:
    >>> from flax import nnx
    >>> class Toy(nnx.Module):
    ...   def __init__(self):
    ...     self.up = nnx.ConvTranspose(3, 2, (4, 4), strides=(2, 2), rngs=nnx.Rngs(0))
    ...   def __call__(self, z):
    ...     return self.up(z.reshape(-1, 2, 2, 3))
    >>> info = layer_info(Generator(Toy(), 12, 4, {"up": ("up",)}), "up")
    >>> info.key_res, info.value_res, info.scale, info.key_dim, info.value_dim, info.margin
    (2, 4, 2, 3, 2, 3)
  """
  key = structure_key(gen, layer)
  if key is not None and (key, layer) in _INFO:
    info, out = _INFO[key, layer]
  else:
    view = layer_view(gen, layer)
    z = jax.ShapeDtypeStruct((1, gen.z_dim), jnp.float32)
    fn = layer_hooks.forward_with_layer(gen.model, view)
    with _calling(gen):
      out, cap = jax.eval_shape(lambda p, z: fn(p, z, **dict(gen.call_kwargs)), gen.params, z)
    kshape, vshape = tuple(cap.keys.shape), tuple(cap.values.shape)
    if len(kshape) != 4 or len(vshape) != 4 or kshape[1] != kshape[2] \
        or vshape[1] % kshape[1] or vshape[1] != vshape[2]:
      raise ValueError(f"layer {layer!r}: expected one call with square key and value maps "
                       f"(N, h, h, C) and an output resolution that is a multiple of the "
                       f"input's, got keys {kshape} and values {vshape}")
    margin, key_padding = _crop_geometry(view)
    info = LayerInfo(layer, view.module_path, view.weight_path, view.kind, view.in_ndim,
                     tuple(view.kernel_shape), kshape[1], vshape[1], vshape[1] // kshape[1],
                     view.key_dim, int(vshape[-1]), margin, key_padding)
    if key is not None:
      _INFO[key, layer] = info, out
  # The canvas is the generator's, not the structure's: checked on every call.
  check_model_output(gen, out)
  R = gen.resolution
  if R % info.key_res or R % info.value_res:
    raise ValueError(f"layer {layer!r}: expected key and value maps whose sizes divide the "
                     f"canvas resolution {R}, got keys {info.key_res}x{info.key_res} and "
                     f"values {info.value_res}x{info.value_res}")
  return info
