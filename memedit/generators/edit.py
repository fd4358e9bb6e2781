"""Insert: solving the paste for the layer's kernel, and the paper's baselines.

Every solve runs the layer itself on the target's crop (:func:`crop_problem`), so a
layer that is not linear in its kernel (StyleGAN2's demodulation) is solved through its
own non-linearity.

- :func:`insert`: Λ = argmin loss(f(k*; W0 + ΔK(Λ, D)), v*) by
  :func:`memedit.solve_lambda` (Adam or Gauss–Newton over Λ alone).
- :func:`projected_insert`: the reference's default procedure, Adam on the whole kernel
  with its change projected onto span(D) every few steps.
- :func:`overfit` (all weights of the layer) and :func:`overfit_all` (all weights of the
  generator, :mod:`~memedit.generators.finetune`): the paper's "overfit" baseline;
  :func:`unit_zeroing_edit`: zeroing units.

Adam runs are :func:`memedit.optim.adam_scan` (one ``lax.scan``); each compiled program
takes the kernel (or the parameters) as an argument and is cached by the problem's
structure, so it serves every parameter set of the model.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from memedit._convs import patched
from memedit.checks import check_positive_int
from memedit.edits import Edit, EditHistory, apply_edit, edit_delta, make_edit, revert_edit
from memedit.generators._checks import check_learning_rate, check_units
from memedit.generators.crop import Crops, check_target_layer, crop_problem, own_taps
from memedit.generators.finetune import overfit_all
from memedit.generators.forward import cached_program
from memedit.generators.generator import Generator, layer_info, layer_kernel, layer_view
from memedit.generators.paste import Target
from memedit.generators.subspace import subspace_problem
from memedit.optim import LOSSES, adam_scan, check_choice, residual_loss
from memedit.solve import CHUNK_STEPS, solve_lambda
from memedit.specs import TAPS

__all__ = ["EditResult", "edited", "insert", "overfit", "overfit_all", "projected_insert",
           "reverted", "unit_zeroing_edit"]

HIGHEST = lax.Precision.HIGHEST


class EditResult(NamedTuple):
  """An edit with what produced it.

  Attributes:
    edit: the :class:`memedit.Edit`.
    D: (r, C_in) the directions.
    target: the :class:`memedit.generators.Target` it was solved for.
    losses: (steps,) loss before each solver step.
    loss_before: L1 loss at the crop before the edit. loss_after: after it.
  """

  edit: Edit
  D: np.ndarray
  target: Target
  losses: np.ndarray
  loss_before: float
  loss_after: float


@functools.partial(jax.jit, static_argnums=0)
def _l1(f, kernel, keys, targets):
  return jnp.mean(jnp.abs(f(kernel, keys) - targets))


def _crop_loss(f, kernel, keys, target: Target) -> float:
  return float(_l1(f, kernel, keys, jnp.asarray(target.targets)))


_TAPS: "weakref.WeakKeyDictionary[Generator, dict]" = weakref.WeakKeyDictionary()


def _own_taps(gen: Generator, layer: str) -> np.ndarray:
  """:func:`own_taps`, computed once per generator (its parameters do not change)."""
  per_gen = _TAPS.setdefault(gen, {})
  if layer not in per_gen:
    per_gen[layer] = own_taps(gen, layer)
  return per_gen[layer]


def _check_directions(D, key_dim: int) -> jax.Array:
  D = jnp.asarray(D, jnp.float32)
  if D.ndim != 2 or D.shape[1] != key_dim:
    raise ValueError(f"directions: expected shape (r, {key_dim}), got {tuple(D.shape)}")
  _finite_directions(D)
  return D


def _finite_directions(D) -> None:
  bad = int(np.size(D) - np.isfinite(np.asarray(D)).sum())
  if bad:
    raise ValueError(f"directions: expected finite values, got {bad} NaN or infinite of "
                     f"{np.size(D)}")


def _check_target(target, name: str = "target") -> None:
  """Refuses what is not a :class:`Target` (from paste_target or erase_target) before any
  work: its keys, targets and crop are what every solve reads."""
  if not isinstance(target, Target):
    raise TypeError(f"{name}: expected a Target (from paste_target or erase_target), got "
                    f"{type(target).__name__}")


def _check_ungrouped(gen: Generator, layer: str, what: str) -> None:
  """Refuses a grouped convolution (``feature_group_count`` G > 1) for solves over
  directions on its keys: its keys carry all C_in channels, while its kernel's input axis
  holds the C_in / G channels of one group, so a ΔK(Λ, D) with D over the keys has no
  place in that kernel."""
  view = layer_view(gen, layer)
  groups = int(getattr(view, "groups", 1) or 1)
  if groups > 1:
    raise ValueError(
        f"layer {layer!r}: expected a convolution with feature_group_count 1 for {what} "
        f"(directions over its {view.key_dim} key channels), got feature_group_count "
        f"{groups} (kernel {tuple(view.kernel_shape)}, {view.key_dim // groups} input "
        f"channels per group); memedit.insert_through_view solves such a kernel group by "
        f"group (on memedit.memory_view(..., patch=True) for kernels above 1x1), and "
        f"overfit(...) fits it whole")


def _coefficients(delta, X, kind: str, key_dim: int):
  """Λ with ΔK(Λ, D) = the change ``delta`` projected onto span(D), X = (D Dᵀ)⁻¹ D:
  Λ[..., o, d] = Σ_i ΔK[..., i, o] X[d, i] (conv) or Λ = (X ΔK)ᵀ (dense (in, out))."""
  if kind == "conv":
    return jnp.einsum("...io,di->...od", delta, X, precision=HIGHEST)
  return jnp.matmul(X, delta.reshape(key_dim, -1), precision=HIGHEST).T


def _finite(lam, what: str) -> None:
  bad = int(lam.size - jnp.isfinite(lam).sum())
  if bad:
    raise ValueError(f"Λ: expected finite values from {what}, got {bad} NaN or infinite of "
                     f"{lam.size}; no edit was made: lower the learning rate, or check that "
                     "the model, C and the target are finite")


def _check_preserve(preserve, info) -> tuple:
  """``preserve`` as ``((Target, values or None), ...)``, checked."""
  if isinstance(preserve, Target) or not isinstance(preserve, Sequence):
    raise TypeError(f"preserve: expected a sequence of Targets (crops whose outputs to "
                    f"keep), got {type(preserve).__name__}")
  s, m = info.scale, info.margin
  out = []
  for i, item in enumerate(preserve):
    t, values = item, None
    if isinstance(item, tuple) and not isinstance(item, Target) and len(item) == 2:
      t, values = item
    if not isinstance(t, Target):
      raise TypeError(f"preserve[{i}]: expected a Target (from paste_target or "
                      f"erase_target) or a pair (Target, values), got "
                      f"{type(item).__name__}")
    check_target_layer(t, info.name, f"preserve[{i}]")
    shape = np.shape(t.keys)
    if len(shape) != 4 or shape[-1] != info.key_dim:
      raise ValueError(f"preserve[{i}]: expected keys of shape (1, h, w, {info.key_dim}) for "
                       f"this layer, got {shape}")
    # The crop's output is cut to the targets' size (crop_problem): keys and targets must
    # describe one crop of this layer, as paste_target makes them.
    h, w = shape[1] - 2 * m, shape[2] - 2 * m
    want = (1, s * h, s * w, info.value_dim)
    if shape[0] != 1 or h < 1 or w < 1 or tuple(np.shape(t.targets)) != want:
      raise ValueError(
          f"preserve[{i}]: expected a crop of layer {info.name!r}: keys (1, h + {2 * m}, "
          f"w + {2 * m}, {info.key_dim}) with targets (1, {s}·h, {s}·w, {info.value_dim}), "
          f"got keys {shape} and targets {tuple(np.shape(t.targets))}")
    if values is not None:
      values = np.asarray(values)
      if values.shape != want or not np.issubdtype(values.dtype, np.floating):
        raise ValueError(f"preserve[{i}]: expected values of shape {want} (float) to keep "
                         f"on the crop, got {values.dtype} {values.shape}")
    out.append((t, values))
  return tuple(out)


def _same_crop(a: Target, b: Target) -> bool:
  """Whether two Targets are the same crop of the same image: equal keys and extra
  arguments, so the layer computes the same outputs on both."""
  if np.shape(a.keys) != np.shape(b.keys) or not np.array_equal(np.asarray(a.keys),
                                                                 np.asarray(b.keys)):
    return False
  ea, eb = jax.tree.leaves(tuple(a.extra)), jax.tree.leaves(tuple(b.extra))
  return len(ea) == len(eb) and all(
      np.shape(x) == np.shape(y) and np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(ea, eb))


def _check_preserve_weight(w) -> float:
  """μ: a finite real number > 0 (a Python or numpy number, or a 0-d array)."""
  a = None
  if not isinstance(w, (bool, np.bool_, str, bytes)):
    try:
      a = np.asarray(w)
    except Exception:  # noqa: BLE001 - a traced value or an object numpy cannot read
      a = None
  if a is None or a.ndim != 0 or a.dtype.kind not in "iuf" or not np.isfinite(a) or a <= 0:
    raise ValueError(f"preserve_weight: expected a finite number > 0, got {w!r}")
  return float(a)


def insert(gen: Generator, layer: str, D: Any, target: Target, *,
           optimizer: str = "adam", steps: int = 2001, learning_rate: float = 0.05,
           loss: str = "l1", taps: str = "all", method: str = "insert",
           settings: dict | None = None, progress: Callable[[int, float], Any] | None = None,
           project_keys: bool = True, preserve: Sequence[Target] = (),
           preserve_weight: float = 1.0) -> EditResult:
  """Insert: Λ = argmin loss(f(k*; W0 + ΔK(Λ, D)), v*) over the paste crop.

  f is the layer itself on the crop's keys (with a margin of context), so for a
  transposed or a modulated convolution the solve goes through the layer's own
  computation (e.g. StyleGAN2's demodulation, recomputed from the edited kernel). For a
  layer affine in its kernel the solve runs on the keys projected onto D
  (:func:`memedit.generators.subspace.subspace_problem`: the same loss of Λ, C_in / r
  times cheaper to differentiate).

  ``preserve`` adds crops whose outputs the edit should keep: with f_j the layer on
  crop j, u_j the values kept there (by default f_j(W0), its outputs with the kernel W0
  before the edit), Λ minimises

    L(Λ) = [Σ_crop |f(W) − v*| + Σ_j μ (n / n_j) Σ_{crop j} |f_j(W) − u_j|] / Z

  (squares for the L2 loss; n and n_j the crops' numbers of values, μ =
  ``preserve_weight``, Z the sum of the weights), so each kept crop weighs μ times the
  edit's own. This is what projecting D onto the null space of earlier keys does for a
  linear memory (:func:`memedit.sequential.sequential_directions`), through the layer's
  own f: for StyleGAN2's modulated convolution an edit along directions that no earlier
  key sees still changes the demodulation, which divides every output channel by the norm
  of its weights, and so every earlier crop's outputs. Under the L1 loss a kept crop,
  whose residuals start at zero, is an exact penalty: the solve moves it only where that
  gains more on the edit's crop than μ times what it costs there (a small edit may then
  not move at all); under L2 small changes there cost little.

  Args:
    gen, layer: the generator and layer name.
    D: (r, C_in) directions (from :func:`memedit.generators.directions`).
    target: from :func:`memedit.generators.paste_target` or ``erase_target``.
    optimizer, steps, learning_rate, loss: see :func:`memedit.solve_lambda`.
    taps: "all" (the reference: every kernel tap has its own Λ) or "own" (only the taps of
      :func:`memedit.generators.own_taps`, so that a key changes only its own output
      cell, or mostly it where the layer blurs after up-sampling; Λ is zero on the other
      taps).
    method, settings: provenance stored in the edit.
    progress: optional ``progress(step, loss)`` hook of :func:`memedit.solve_lambda`.
    project_keys: solve on the projected keys where that is exact (False: always on
      the layer's own C_in key channels).
    preserve: Targets (e.g. those of earlier edits) whose crops keep the outputs they
      have before this edit (only their keys and extra arguments are used), or pairs
      ``(Target, values)`` that keep the given values there (shaped like its
      ``targets``; e.g. the outputs right after that earlier edit was made, which a
      later edit then also keeps from drifting).
    preserve_weight: μ, the weight of each kept crop relative to the edit's own: a finite
      number > 0 (a Python or numpy number, or a 0-d array).

  Returns:
    :class:`EditResult`.

  Raises:
    ValueError: D of the wrong shape or not finite, an unknown ``taps``, ``steps`` not a
      positive int, a learning rate that is not a finite positive number, a grouped
      convolution (``feature_group_count`` > 1: D over its C_in keys has no place in its
      kernel of C_in / G input channels), kept crops that are not crops of this layer (keys of
      another dimension, or keys and targets of another crop geometry) or are the edit's
      own crop (the same keys and extra arguments as ``target``), or whose kept
      values (given, or the outputs before the edit) are not finite or not the crop's
      shape, a ``preserve_weight`` that is not a finite positive
      number or whose weights (μ·n/n_j per kept value, and their total) float32 cannot
      hold, or a solve ending with non-finite Λ.
    TypeError: ``target`` not a :class:`Target`; ``preserve`` not a sequence of Targets or
      (Target, values) pairs.

  Example:
    >>> import numpy as np
    >>> from flax import nnx
    >>> from memedit.generators import Generator, copy_values, paste_target
    >>> class Toy(nnx.Module):
    ...   def __init__(self):
    ...     self.up = nnx.ConvTranspose(3, 2, (4, 4), strides=(2, 2), rngs=nnx.Rngs(0))
    ...   def __call__(self, z):
    ...     return self.up(z.reshape(-1, 4, 4, 3))
    >>> gen = Generator(Toy(), 48, 8, {"up": ("up",)})
    >>> box = np.zeros((8, 8)); box[2:4, 2:6] = 1
    >>> target = paste_target(gen, "up", copy_values(gen, "up", 0, box), 1, box)
    >>> res = insert(gen, "up", np.eye(3)[:2], target, steps=200)
    >>> res.loss_after < res.loss_before, res.edit.path
    (True, ('up', 'kernel'))
  """
  check_choice(taps, TAPS, "taps")
  learning_rate = check_learning_rate(learning_rate)
  steps = check_positive_int(steps, "steps")
  _check_target(target)
  info = layer_info(gen, layer)
  _check_ungrouped(gen, layer, "insert")
  D = _check_directions(D, info.key_dim)
  preserve = _check_preserve(preserve, info)
  for i, (t, _) in enumerate(preserve):
    if _same_crop(t, target):
      raise ValueError(
          f"preserve[{i}]: expected a crop other than the edit's own, got the crop of "
          f"target (the same keys and extra arguments): keeping its outputs there works "
          f"against the edit's own targets on the same values")
  preserve_weight = _check_preserve_weight(preserve_weight)
  lam_mask = None if taps == "all" else _own_taps(gen, layer)[:, :, None, None]
  f, keys = crop_problem(gen, layer, target)
  kernel0 = jnp.asarray(layer_kernel(gen, layer))
  crops = [(f, keys)] + [crop_problem(gen, layer, t) for t, _ in preserve]
  # The values kept: given, or the crops' outputs before the edit from the layer's own f.
  kept = [jnp.reshape(fc(kernel0, kc) if v is None else jnp.asarray(v, jnp.float32), (-1,))
          for (fc, kc), (_, v) in zip(crops[1:], preserve)]
  for i, v in enumerate(kept):
    if not bool(jnp.all(jnp.isfinite(v))):
      given = preserve[i][1] is not None
      raise ValueError(f"preserve[{i}]: expected finite "
                       f"{'values' if given else 'layer outputs on its crop before the edit'}"
                       f", got NaN or inf"
                       f"{'' if given else '; check its keys and extra arguments'}")
  subs = [subspace_problem(fc, kernel0, D, kc, kind=info.kind, in_ndim=info.in_ndim)
          for fc, kc in crops] if project_keys else [None]
  if all(sub is not None for sub in subs):
    # Every crop's projected problem has the same reduced kernel and directions.
    crops, problem_kernel, problem_D = ([(sub.f, sub.keys) for sub in subs], subs[0].kernel0,
                                        subs[0].D)
  else:
    problem_kernel, problem_D = kernel0, D
  targets, weights = jnp.asarray(target.targets), None
  if preserve:
    n = targets.size
    per_value = [preserve_weight * n / v.size for v in kept]
    # Each value's weight and their total n (1 + μ J) (the loss's divisor) in float32.
    total = n * (1.0 + preserve_weight * len(kept))
    with np.errstate(over="ignore", under="ignore"):
      held = np.float32([total] + per_value)
    if not (np.isfinite(held).all() and (held > 0).all()):
      raise ValueError(
          f"preserve_weight: expected a μ whose weights float32 holds: μ·n/n_j for each kept "
          f"crop and their total n·(1 + μ·{len(kept)}) (n = {n} values on the edit's crop, "
          f"n_j = {sorted({v.size for v in kept})}), got μ = {preserve_weight!r}")
    weights = jnp.concatenate([jnp.ones((n,), jnp.float32)] + [
        jnp.full((v.size,), w, jnp.float32) for v, w in zip(kept, per_value)])
    targets = jnp.concatenate([jnp.reshape(targets, (-1,))] + kept)
    problem = (Crops(tuple(fc for fc, _ in crops)), problem_kernel, problem_D,
               tuple(kc for _, kc in crops))
  else:
    problem = (crops[0][0], problem_kernel, problem_D, crops[0][1])
  res = solve_lambda(*problem, targets, kind=info.kind, in_ndim=info.in_ndim,
                     weights=weights, loss=loss, optimizer=optimizer, steps=int(steps),
                     learning_rate=float(learning_rate), lam_mask=lam_mask, progress=progress)
  _finite(res.lam, f"the {optimizer} solve (learning_rate {learning_rate}, {steps} steps)")
  st = dict(settings or {})
  st.update(layer=layer, optimizer=optimizer, steps=int(steps),
            learning_rate=float(learning_rate), loss=loss, rank=int(D.shape[0]), taps=taps)
  if preserve:
    st.update(preserved_crops=len(preserve), preserve_weight=preserve_weight)
  edit = make_edit(info.weight_path, res.lam, D, kind=info.kind, in_ndim=info.in_ndim,
                   method=method, settings=st)
  kernel1 = kernel0 + edit_delta(edit, kernel0.shape)
  return EditResult(edit, np.asarray(D), target, np.asarray(res.losses),
                    _crop_loss(f, kernel0, keys, target), _crop_loss(f, kernel1, keys, target))


def _projected_program(f, kind: str, key_dim: int, steps: int, project_every: int,
                       loss: str):
  """(kernel0, keys, targets, X, D, lr) → (Λ, losses): Adam on ΔK, projected ΔK ← Λ(ΔK) D
  after step 0, every ``project_every`` steps and after the last (Adam's moments kept)."""
  n_blocks, rest = divmod(steps - 1, project_every)

  def build():
    def run(kernel0, keys, targets, X, D, lr):
      loss_fn = lambda delta: residual_loss(f(kernel0 + delta, keys) - targets, loss)

      def block(delta, opt_state, n):
        delta, opt_state, losses = adam_scan(loss_fn, delta, n, lr, opt_state=opt_state)
        lam = _coefficients(delta, X, kind, key_dim)
        return _delta(lam, D, kernel0.shape, kind, key_dim), opt_state, losses, lam

      # ΔK in float32 whatever the kernel's dtype: each projection gives it in float32
      # (Λ D), so Adam's moments must be float32 from the first step (a bfloat16 kernel).
      delta, st, losses, lam = block(jnp.zeros(kernel0.shape, jnp.float32), None, 1)
      parts = [losses]
      if n_blocks:
        def body(carry, _):
          d, s = carry
          d, s, ls, lm = block(d, s, project_every)
          return (d, s), (ls, lm)
        (delta, st), (lb, lams) = lax.scan(body, (delta, st), None, length=n_blocks)
        parts.append(lb.reshape(-1))
        lam = lams[-1]
      if rest:
        delta, st, lr_, lam = block(delta, st, rest)
        parts.append(lr_)
      return lam, jnp.concatenate(parts)
    return jax.jit(run)

  return cached_program(("projected", f, kind, key_dim, steps, project_every, loss), build)


def _delta(lam, D, shape, kind, key_dim):
  if kind == "conv":
    return jnp.einsum("...od,di->...io", lam, D, precision=HIGHEST)
  return jnp.matmul(lam, D, precision=HIGHEST).T.reshape(shape)


def projected_insert(gen: Generator, layer: str, D: Any, target: Target, *,
                     steps: int = 2001, learning_rate: float = 0.05, project_every: int = 10,
                     loss: str = "l1", method: str = "insert/projected",
                     settings: dict | None = None) -> EditResult:
  """The reference's default insert: Adam on the whole kernel, its change projected onto
  span(D) every ``project_every`` steps.

  Where :func:`insert` optimises Λ alone, this runs the reference's default procedure
  (Bau et al. 2020, their ``insert`` with ``low_rank_insert``): Adam (``learning_rate``,
  optax defaults β = (0.9, 0.999), ε = 1e-8, as torch's) moves every weight of the kernel
  W = W0 + ΔW on the loss at the paste crop, and after step t (t = 0, ..., steps − 1)
  with t % project_every = 0 or t = steps − 1 the change is projected onto the context
  subspace along the key axis, per kernel tap:

    ΔW[y, x, :, o] ← P ΔW[y, x, :, o],  P = Dᵀ (D Dᵀ)⁻¹ D  (C_in × C_in),

  i.e. W ← W0 + P (W − W0), the reference's W ← (W0 − P W0) + P W (the reference writes
  P = Dᵀ D for orthonormal rows; the general projector keeps a D with independent but
  non-orthonormal rows exact). Adam's moments are not projected. After the last
  projection ΔW = ΔK(Λ, D) exactly with Λ = (D Dᵀ)⁻¹ D ΔW per tap, so the result is an
  ordinary :class:`memedit.Edit`. The run is one compiled program: a ``lax.scan`` over
  blocks of ``project_every`` Adam steps (:func:`memedit.optim.adam_scan`).

  Args:
    gen, layer: the generator and layer name.
    D: (r, C_in) directions with linearly independent rows.
    target: from :func:`memedit.generators.paste_target` or ``erase_target``.
    steps: Adam steps (≥ 1; the reference's default 2001).
    learning_rate: Adam's learning rate (the reference's default 0.05).
    project_every: steps between projections (≥ 1; the reference's default 10).
    loss: "l1" (mean |r|, the reference's) or "l2" (mean r²) over the crop's values.
    method, settings: provenance stored in the edit.

  Returns:
    :class:`EditResult`; ``losses`` (steps,) is the loss before each Adam step,
    ``loss_after`` the L1 loss of the edit.

  Raises:
    ValueError: D of the wrong shape, not finite or with dependent rows; steps,
      project_every, learning_rate (a finite positive number) or loss out of range; a
      grouped convolution (as :func:`insert`); a run that ends with non-finite Λ.
    TypeError: ``target`` not a :class:`Target`.

  Example:
    >>> import numpy as np
    >>> from flax import nnx
    >>> from memedit.generators import Generator, copy_values, paste_target
    >>> class Toy(nnx.Module):
    ...   def __init__(self):
    ...     self.up = nnx.ConvTranspose(3, 2, (4, 4), strides=(2, 2), rngs=nnx.Rngs(0))
    ...   def __call__(self, z):
    ...     return self.up(z.reshape(-1, 4, 4, 3))
    >>> gen = Generator(Toy(), 48, 8, {"up": ("up",)})
    >>> box = np.zeros((8, 8)); box[2:4, 2:6] = 1
    >>> target = paste_target(gen, "up", copy_values(gen, "up", 0, box), 1, box)
    >>> res = projected_insert(gen, "up", np.eye(3)[:2], target, steps=101)
    >>> res.loss_after < res.loss_before, res.losses.shape
    (True, (101,))
  """
  check_choice(loss, LOSSES, "loss")
  steps = check_positive_int(steps, "steps")
  learning_rate = check_learning_rate(learning_rate)
  project_every = check_positive_int(project_every, "project_every")
  _check_target(target)
  info = layer_info(gen, layer)
  _check_ungrouped(gen, layer, "projected_insert")
  D64 = np.asarray(D, np.float64)
  if D64.ndim != 2 or D64.shape[1] != info.key_dim:
    raise ValueError(f"directions: expected shape (r, {info.key_dim}), got {D64.shape}")
  _finite_directions(D64)
  r = D64.shape[0]
  if np.linalg.matrix_rank(D64) < r:
    raise ValueError(f"directions: expected {r} linearly independent rows, got rank "
                     f"{np.linalg.matrix_rank(D64)}")
  X = np.linalg.solve(D64 @ D64.T, D64)  # (r, C_in): Λ = ΔW-coefficients, P = Dᵀ X
  f, keys = crop_problem(gen, layer, target)
  kernel0 = jnp.asarray(layer_kernel(gen, layer))
  D32 = jnp.asarray(D64, jnp.float32)
  run = _projected_program(_loop_form(f), info.kind, info.key_dim, steps, project_every,
                           loss)
  lam, losses = run(kernel0, keys, jnp.asarray(target.targets), jnp.asarray(X, jnp.float32),
                    D32, jnp.float32(learning_rate))
  _finite(lam, f"the projected Adam run (learning_rate {learning_rate}, {steps} steps)")
  st = dict(settings or {})
  st.update(layer=layer, optimizer="adam/projected", steps=steps,
            learning_rate=float(learning_rate), project_every=project_every, loss=loss,
            rank=int(r), taps="all")
  edit = make_edit(info.weight_path, lam, D32, kind=info.kind, in_ndim=info.in_ndim,
                   method=method, settings=st)
  kernel1 = kernel0 + edit_delta(edit, kernel0.shape)
  return EditResult(edit, np.asarray(D32), target, np.asarray(losses),
                    _crop_loss(f, kernel0, keys, target), _crop_loss(f, kernel1, keys, target))


def unit_zeroing_edit(gen: Generator, layer: str, units: Sequence[int]) -> Edit:
  """The baseline that zeroes ``units`` of the layer's keys everywhere, as an Edit:
  D = one-hot rows e_u, Λ[..., o, d] = −W[..., u_d, o].

  Args:
    gen, layer: the generator and layer name. units: the distinct key units to zero,
      integers 0 <= u < C_in.

  Returns:
    The :class:`memedit.Edit`.

  Raises:
    ValueError: no units, or a unit that is not an integer 0 <= u < C_in or is repeated;
      a grouped convolution (as :func:`insert`).

  Example:
    >>> import memedit
    >>> from flax import nnx
    >>> from memedit.generators import Generator, layer_kernel
    >>> class Toy(nnx.Module):
    ...   def __init__(self):
    ...     self.up = nnx.ConvTranspose(3, 2, (4, 4), strides=(2, 2), rngs=nnx.Rngs(0))
    ...   def __call__(self, z):
    ...     return self.up(z.reshape(-1, 2, 2, 3))
    >>> gen = Generator(Toy(), 12, 4, {"up": ("up",)})
    >>> e = unit_zeroing_edit(gen, "up", [1])
    >>> new = layer_kernel(gen, "up") + memedit.edit_delta(e, (4, 4, 3, 2))
    >>> float(abs(new[:, :, 1]).max()), bool(abs(new[:, :, 0]).max() > 0)
    (0.0, True)
  """
  info = layer_info(gen, layer)
  _check_ungrouped(gen, layer, "unit_zeroing_edit")
  units = check_units(units, info.key_dim)
  K = jnp.asarray(layer_kernel(gen, layer), jnp.float32)
  E = np.zeros((len(units), info.key_dim), np.float32)
  E[np.arange(len(units)), units] = 1.0
  lam = -_coefficients(K, jnp.asarray(E), info.kind, info.key_dim)
  return make_edit(info.weight_path, lam, E, kind=info.kind, in_ndim=info.in_ndim,
                   method="unit_zeroing",
                   settings={"layer": layer, "units": [int(u) for u in units]})


def _loop_form(f):
  """f for a compiled loop: on the CPU with its convolutions as patch matmuls, since
  XLA:CPU runs kernel-gradient convolutions inside loops on a slow path (memedit._convs)."""
  return patched(f) if jax.default_backend() == "cpu" else f


def _overfit_program(f, steps: int):
  def build():
    def run(kernel0, keys, targets, lr):
      loss_fn = lambda delta: residual_loss(f(kernel0 + delta, keys) - targets, "l1")
      delta, _, losses = adam_scan(loss_fn, jnp.zeros_like(kernel0), steps, lr)
      return delta, losses
    return jax.jit(run)
  return cached_program(("overfit", f, steps), build)


def _overfit_part_program(f, n: int, first: bool):
  """``n`` of the overfit's Adam steps from the start (``first``) or from a carried
  (delta, Adam state): the steps of :func:`_overfit_program`, op for op."""
  def build():
    def run(kernel0, keys, targets, lr, delta, opt_state):
      loss_fn = lambda delta: residual_loss(f(kernel0 + delta, keys) - targets, "l1")
      if first:
        return adam_scan(loss_fn, jnp.zeros_like(kernel0), n, lr)
      return adam_scan(loss_fn, delta, n, lr, opt_state=opt_state)
    return jax.jit(run)
  return cached_program(("overfit-part", f, n, first), build)


def _overfit_in_chunks(f, steps, progress, kernel0, keys, targets, lr):
  """The overfit run as a first part and chunks of ``CHUNK_STEPS["adam"]`` steps (two
  programs, the chunk's shared by every total), calling ``progress(step, loss)`` on the
  host after each; an exception it raises stops the run there."""
  chunk = CHUNK_STEPS["adam"]
  first = steps - chunk * ((steps - 1) // chunk)  # in [1, chunk]
  delta, state, losses = _overfit_part_program(f, first, True)(kernel0, keys, targets, lr,
                                                               None, None)
  parts = [np.asarray(losses)]
  progress(first - 1, float(parts[-1][-1]))
  for t in range(first, steps, chunk):
    delta, state, losses = _overfit_part_program(f, chunk, False)(kernel0, keys, targets, lr,
                                                                  delta, state)
    parts.append(np.asarray(losses))
    progress(t + chunk - 1, float(parts[-1][-1]))
  return delta, np.concatenate(parts)


def overfit(gen: Generator, layer: str, target: Target, *, steps: int = 20001,
            learning_rate: float = 0.01,
            progress: Callable[[int, float], Any] | None = None) -> EditResult:
  """The paper's "overfit" baseline on the layer: every weight of the layer's kernel is
  fine-tuned with Adam on the same L1 loss at the paste crop (no subspace constraint).

  The result is returned as an exact :class:`memedit.Edit` with D = I (rank C_in; for a
  grouped convolution, I over its kernel's C_in / G input channels) and Λ = the change in
  the math layout (Λ[y, x, o, i] = ΔK[y, x, i, o]), so it applies and reverts like any
  edit.

  Args:
    gen, layer: the generator and layer name. target: the paste.
    steps: Adam steps (the paper's 20001). learning_rate: Adam's (the paper's 0.01).
    progress: optional ``progress(step, loss)``: the steps then run in chunks of
      ``memedit.solve.CHUNK_STEPS["adam"]`` (the same steps, the same bits), and after each
      it is called on the host with the chunk's last step t and losses[t] (the loss before
      step t); an exception it raises stops the run (e.g. to cancel it) and is raised.

  Returns:
    :class:`EditResult`.

  Example:
    >>> import numpy as np
    >>> from flax import nnx
    >>> from memedit.generators import Generator, copy_values, paste_target
    >>> class Toy(nnx.Module):
    ...   def __init__(self):
    ...     self.up = nnx.ConvTranspose(3, 2, (4, 4), strides=(2, 2), rngs=nnx.Rngs(0))
    ...   def __call__(self, z):
    ...     return self.up(z.reshape(-1, 4, 4, 3))
    >>> gen = Generator(Toy(), 48, 8, {"up": ("up",)})
    >>> box = np.zeros((8, 8)); box[2:4, 2:6] = 1
    >>> target = paste_target(gen, "up", copy_values(gen, "up", 0, box), 1, box)
    >>> res = overfit(gen, "up", target, steps=100)
    >>> res.loss_after < res.loss_before, res.edit.rank
    (True, 3)
  """
  steps = check_positive_int(steps, "steps")
  learning_rate = check_learning_rate(learning_rate)
  if progress is not None and not callable(progress):
    raise ValueError(f"progress: expected a callable progress(step, loss), got "
                     f"{type(progress).__name__}")
  _check_target(target)
  info = layer_info(gen, layer)
  f, keys = crop_problem(gen, layer, target)
  kernel0 = jnp.asarray(layer_kernel(gen, layer))
  args = (kernel0, keys, jnp.asarray(target.targets), jnp.float32(learning_rate))
  if progress is None:
    delta, losses = _overfit_program(_loop_form(f), steps)(*args)
  else:
    delta, losses = _overfit_in_chunks(_loop_form(f), steps, progress, *args)
  # D = I over the kernel's input axis: C_in, or a grouped convolution's C_in / G.
  rows = info.kernel_shape[-2] if info.kind == "conv" else info.key_dim
  eye = np.eye(rows, dtype=np.float32)
  lam = _coefficients(delta, jnp.asarray(eye), info.kind, rows)
  edit = make_edit(info.weight_path, lam, eye, kind=info.kind, in_ndim=info.in_ndim,
                   method="overfit/layer",
                   settings={"layer": layer, "steps": steps,
                             "learning_rate": float(learning_rate)})
  return EditResult(edit, eye, target, np.asarray(losses), _crop_loss(f, kernel0, keys, target),
                    _crop_loss(f, kernel0 + delta, keys, target))


def edited(gen: Generator, edit: Edit, history: EditHistory | None = None
           ) -> tuple[Generator, EditHistory]:
  """The generator with ``edit`` applied (the caller's generator is not changed).

  Args:
    gen: the generator. edit: the edit. history: the history of edits already applied.

  Returns:
    (edited generator, history).

  Example:
    >>> import memedit
    >>> from flax import nnx
    >>> from memedit.generators import Generator, layer_kernel
    >>> class Toy(nnx.Module):
    ...   def __init__(self):
    ...     self.up = nnx.ConvTranspose(3, 2, (4, 4), strides=(2, 2), rngs=nnx.Rngs(0))
    ...   def __call__(self, z):
    ...     return self.up(z.reshape(-1, 2, 2, 3))
    >>> gen = Generator(Toy(), 12, 4, {"up": ("up",)})
    >>> new, hist = edited(gen, unit_zeroing_edit(gen, "up", [0]))
    >>> back, _ = reverted(new, hist.edits[0], hist)
    >>> bool((layer_kernel(back, "up") == layer_kernel(gen, "up")).all())
    True
  """
  try:
    params, hist = apply_edit(gen.params, edit, history)
  except ValueError as e:
    if not isinstance(edit, Edit):
      raise
    raise ValueError(f"edit {edit.name!r} of {'/'.join(map(str, edit.path))}: expected an edit "
                     f"that fits this generator, got one that does not ({e}); an edit applies "
                     f"to the model it was made on, or to one with the same layer shapes"
                     ) from e
  return gen.with_params(params), hist


def reverted(gen: Generator, edit: Edit | str, history: EditHistory
             ) -> tuple[Generator, EditHistory]:
  """The generator with ``edit`` removed again (bit-exact when it was the last one).

  Args:
    gen: the edited generator. edit: the applied edit or its name.
    history: the history :func:`edited` returned.

  Returns:
    (generator, history).

  Example:
    >>> from flax import nnx
    >>> from memedit.generators import Generator
    >>> class Toy(nnx.Module):
    ...   def __init__(self):
    ...     self.up = nnx.ConvTranspose(3, 2, (4, 4), strides=(2, 2), rngs=nnx.Rngs(0))
    ...   def __call__(self, z):
    ...     return self.up(z.reshape(-1, 2, 2, 3))
    >>> gen = Generator(Toy(), 12, 4, {"up": ("up",)})
    >>> e = unit_zeroing_edit(gen, "up", [0])
    >>> new, hist = edited(gen, e)
    >>> len(reverted(new, e.name, hist)[1].edits)
    0
  """
  params, hist = revert_edit(gen.params, edit, history)
  return gen.with_params(params), hist
