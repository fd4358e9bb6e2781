"""Training a small StyleGAN2 generator by distilling the DCGAN face generator.

The student is the port's own :class:`ports.stylegan2.model.Generator` (rosinality's
architecture, so it ships as a rosinality checkpoint through
:func:`ports.stylegan2.export.save_rosinality`); the teacher is the converted DCGAN face
generator (:mod:`ports.dcgan`, 64×64, z of 100 dims). Every batch is drawn on the fly:
teacher latents from the step's key, teacher images from the teacher in JAX.

Objective: regression distillation on paired latents.
  For a teacher latent z_T ~ N(0, I_100) the student gets z_S = z_T when style_dim = 100
  (the default: the student answers the teacher's latents with the teacher's faces), or
  z_S = [z_T, ε] with ε ~ N(0, I_{d−100}) fresh for a wider style_dim d: either way z_S is
  exactly N(0, I_d), the latent rosinality's code and
  :func:`ports.stylegan2.model.sample_latents` draw at generation time. The loss compares
  G_S(z_S) with G_T(z_T) pixel by pixel:

    L = λ₁ · mean|G_S − G_T| + λ_lap · Σ_k mean|Lap_k(G_S) − Lap_k(G_T)|

  with Lap_k the levels of a Laplacian pyramid (:func:`ports.stylegan2.swd.laplacian_pyramid`,
  the binomial filter of the SWD metric; at 64 px four levels: 64, 32, 16 px band-passes
  and the 8 px low-pass). Each band's mean counts once, so coarse structure (face layout,
  colour) and fine detail weigh alike, where a plain pixel loss is dominated by the
  finest band.

  Why regression rather than adversarial training: the teacher is a deterministic
  function of z, so the paired target has no spread and the regression optimum is the
  teacher itself (regression blurs only when one input has many targets); every pixel of
  every sample gives a gradient, where a discriminator gives one judgement per image; no
  discriminator network doubles the step time (the whole budget goes to the generator),
  and the run is stable and reproducible. StyleGAN2's own adversarial runs see millions of
  images; the 2.5-hour CPU budget here is about 3·10⁵. What regression cannot give is
  detail the student fails to fit: underfitting shows as blur, which the pyramid term
  penalises and the sliced Wasserstein distance (:mod:`ports.stylegan2.swd`) measures.

Noise inputs are drawn at random in training (``noise_mode='random'``): the teacher has
none, so the student learns noise strengths that do no harm, and rosinality's default
``randomize_noise=True`` gives the trained images. The generator of record is the
exponential moving average g_ema (half-life ``ema_half_life_images`` images, ramped up
over the first steps as in StyleGAN2-ADA: half-life min(h, 0.05 · images seen)).

Optimiser: Adam, β = (0.9, 0.99), learning rate 5·10⁻³ on the port's equalized-learning-rate
parameters, warmed up linearly over the first 2 % of the steps, then cosine-decayed to
5 % at the last step. The mapping layers keep rosinality's lr_mlp = 0.01 as architecture
(their stored weights are scaled by it, so checkpoints load as rosinality's) but take
Adam steps 100 times larger (``mapping_lr_scale``), which undoes the slowdown in
training. Measured at 32 px (batch 16, L1 on 128 held-out pairs after 600 steps; the
teacher's median image scores 0.337): 0.331 with the mapping's steps unscaled at lr
2·10⁻³, 0.287 scaled, 0.259 scaled at 5·10⁻³, 0.245 scaled at 10⁻²; an L2 loss in place
of L1 gave 0.339 (unscaled, 2·10⁻³).

Default architecture: 64×64 output, widths (256, 192, 128, 64, 32) at 4, 8, 16, 32, 64
px, style_dim 100, a 4-layer mapping network: 2,118,856 parameters, an 8.5 MB float32
rosinality checkpoint. Compute is dominated by the 32 and 64 px layers, kept narrow;
parameters by the 4 and 8 px layers, which cost little time (widths 128 or 256 at 4 and
8 px gave the same step time, 1.3–1.4 s on the shared machine, but 256 at both passes
10 MB). The convolutions run
through an im2col matrix product during training (:func:`fast_convolutions`, the same
function as the model's own to float32 rounding, checked by the tests): on XLA:CPU its
gradients are about five times faster than those of ``lax.conv_general_dilated``
(2.4 s against 12.5 s a step for five 64-channel levels, batch 16, on a shared machine).

Step time, batch 16, 2-core x86_64 CPU: 0.41–0.57 s (means of 0.46 and 0.51 s over two
smoke runs of 400–600 steps) with the machine otherwise nearly idle, 1.0–1.6 s while
other jobs shared it (load average 6–9); compilation takes 20–70 s more. The default
18000 steps (288k images) take 2.3–2.6 hours on the idle machine.

Resumption: the whole state (step, parameters, Adam state, g_ema, buffers) is saved as
an orbax checkpoint every ``checkpoint_every`` steps, at the end, and when the run is
interrupted (Ctrl-C, SIGTERM). Each step's randomness is a function of (seed, step) only,
so a run resumed from any checkpoint continues bit-identically. The run directory holds
``run.json`` (the configuration and the teacher's content hash, checked on resume),
``log.jsonl`` (losses per logging interval; a resumed run first drops the rows of steps
after its checkpoint, which it runs again, and an interrupted one logs the steps its
checkpoint holds) and ``checkpoints/``. A new run may start in
a folder of the user's own, whose other files it leaves alone, but not in one holding a
``log.jsonl`` or a non-empty ``checkpoints/`` without ``run.json`` (a ValueError: orbax
would take those entries for checkpoints). A ``run.json`` with neither a checkpoint nor a
log is a set-up stopped (Ctrl-C, kill) before checkpoint 0: no run to resume, so a start
there begins a new run, whatever its settings (:func:`ports.stylegan2.runs.resumable`).
A run directory whose path holds a backslash or brackets is refused (the checkpoint
store misreads them). A training process holds an exclusive lock (``flock``) on the run
directory's ``.training.lock`` from its set-up to its end: a second start in the same
directory (another terminal, or ``train`` run twice) is refused at once with a
:class:`ports.stylegan2.runs.RunInUseError` naming the holder's process id; the kernel
releases a killed process's lock, so the next start proceeds. Restoring, evaluating,
previewing and exporting a run take no lock and work while it trains. A damaged
checkpoint is a ValueError naming the run's other steps. A run whose loss or state turns
NaN or infinite (it diverged) stops with a ValueError and saves nothing non-finite, so
its finite checkpoints stay.

The run's configuration, :class:`TrainConfig`, and the student it builds
(:func:`student_module`) live in :mod:`ports.stylegan2.train_config` and are re-exported
here.

Command line (run directories belong under the git-ignored ``.cache/``)::

  python -m ports.stylegan2.train train --teacher .cache/demo/faces-dcgan \\
      --run-dir .cache/sg2-faces
  python -m ports.stylegan2.train evaluate --teacher .cache/demo/faces-dcgan \\
      --run-dir .cache/sg2-faces --images 1024
  python -m ports.stylegan2.train preview --teacher ... --run-dir ... --out grid.png
  python -m ports.stylegan2.train export --run-dir .cache/sg2-faces --out faces-sg2-64.pt

``--teacher`` is a converted DCGAN directory (``memedit convert weights.tar DIR``) or
the torch file itself (converted into the run directory).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import numbers
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ports.stylegan2 import runs
from ports.stylegan2.fastconv import fast_convolutions
from ports.stylegan2.swd import laplacian_pyramid
from ports.stylegan2.teacher import Teacher, teacher_images
from ports.stylegan2.train_config import TrainConfig, student_module

__all__ = ["TrainConfig", "check_pair", "distillation_loss", "ema_beta",
           "init_state", "learning_rate_schedule", "paired_latents", "restore",
           "state_shapes", "student_module", "train", "train_step"]


# ----------------------------------------------------------------------------------------
# Objective, schedules, state.


def paired_latents(key: jax.Array, batch: int, teacher_z_dim: int, style_dim: int
                   ) -> tuple[jax.Array, jax.Array]:
  """Teacher latents and the student's paired latents for one batch.

  Returns:
    ``(z_teacher (batch, teacher_z_dim), z_student (batch, style_dim))`` with
    ``z_student[:, :teacher_z_dim] == z_teacher`` and the rest fresh N(0, 1).
  """
  if style_dim < teacher_z_dim:
    raise ValueError(f"style_dim: expected at least the teacher's z size {teacher_z_dim}, "
                     f"got {style_dim}")
  k_t, k_x = jax.random.split(key)
  z_t = jax.random.normal(k_t, (batch, teacher_z_dim))
  extra = jax.random.normal(k_x, (batch, style_dim - teacher_z_dim))
  return z_t, jnp.concatenate([z_t, extra], axis=1)


def distillation_loss(student: jax.Array, teacher: jax.Array, *, l1_weight: float = 1.0,
                      pyramid_weight: float = 1.0, pyramid_levels: int = 4
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Pixel L1 plus Laplacian-pyramid L1 between two image batches.

  Args:
    student, teacher: (N, R, R, C) images.
    l1_weight, pyramid_weight: weights of the two terms.
    pyramid_levels: levels of the pyramid (the mean |difference| of each level counts
      once).

  Returns:
    ``(loss, {"loss", "l1", "pyramid"})``, scalars.
  """
  if student.shape != teacher.shape:
    raise ValueError(f"student, teacher: expected images of one shape, got {student.shape} "
                     f"and {teacher.shape}")
  diff = student - teacher
  l1 = jnp.mean(jnp.abs(diff))
  # The pyramid is linear: the pyramid of the difference is the difference of pyramids.
  pyramid = sum(jnp.mean(jnp.abs(level)) for level in laplacian_pyramid(diff, pyramid_levels))
  loss = l1_weight * l1 + pyramid_weight * pyramid
  return loss, {"loss": loss, "l1": l1, "pyramid": pyramid}


def ema_beta(step: jax.Array, cfg: TrainConfig) -> jax.Array:
  """g_ema decay after step ``step`` (0-based): 0.5 ** (batch / half-life in images)."""
  half_life = jnp.asarray(cfg.ema_half_life_images, jnp.float32)
  if cfg.ema_rampup is not None:
    seen = (jnp.asarray(step, jnp.float32) + 1.0) * cfg.batch_size
    half_life = jnp.minimum(half_life, seen * cfg.ema_rampup)
  return jnp.power(0.5, cfg.batch_size / jnp.maximum(half_life, 1e-8))


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warm-up, then cosine decay to ``final_lr_fraction`` at the last step."""
  warmup = int(cfg.warmup_fraction * cfg.steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else cfg.learning_rate, peak_value=cfg.learning_rate,
      warmup_steps=warmup, decay_steps=max(cfg.steps, warmup + 1),
      end_value=cfg.learning_rate * cfg.final_lr_fraction)


def _optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  return optax.adam(learning_rate_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps)


def _initial_value(name: str, shape: tuple[int, ...], rs: np.random.RandomState,
                   lr_mlp: float) -> np.ndarray:
  """rosinality's initialisation of one variable, by its path in the Flax tree."""
  if name.endswith("/modulation/bias"):
    return np.ones(shape, np.float32)
  if name.endswith(("/bias", "/noise_strength")) or name == "buffers/latent_avg":
    return np.zeros(shape, np.float32)
  scale = 1.0 / lr_mlp if name.startswith("params/mapping/") else 1.0
  if name.endswith("/kernel") or name.endswith("/const") or name.startswith(
      "buffers/synthesis/noise_"):
    return (scale * rs.standard_normal(shape)).astype(np.float32)
  raise ValueError(f"init_state: no initialisation rule for the variable {name!r}")


def state_shapes(cfg: TrainConfig) -> dict:
  """The state's structure, shapes and dtypes (no computation)."""
  module = student_module(cfg)
  variables = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                             jax.ShapeDtypeStruct((1, cfg.style_dim), jnp.float32))
  params = variables["params"]
  return {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
          "opt_state": jax.eval_shape(_optimizer(cfg).init, params), "ema": params,
          "buffers": variables["buffers"]}


def init_state(cfg: TrainConfig) -> dict:
  """The state at step 0: ``{step, params, opt_state, ema, buffers}`` (g_ema = params).

  rosinality's initialisation, drawn on the host from ``RandomState(seed)`` leaf by leaf
  in the tree's order: kernels and the constant input N(0, 1) (mapping kernels N(0, 1/lr_mlp²),
  as equalized learning rate scales them by lr_mlp), modulation biases 1, other biases and
  noise strengths 0, noise buffers N(0, 1), latent_avg 0; the Adam state of those. Host
  draws need no compilation (a jitted Flax init takes tens of seconds to compile on CPU)
  and are the same on every platform.
  """
  shapes = state_shapes(cfg)
  rs = np.random.RandomState(cfg.seed)

  def init(tree, prefix):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = [_initial_value(prefix + "/" + "/".join(str(k.key) for k in path), leaf.shape,
                             rs, cfg.lr_mlp) for path, leaf in flat]
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in leaves])

  params = init(shapes["params"], "params")
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          "opt_state": _init_optimizer(cfg)(params),
          "ema": jax.tree_util.tree_map(jnp.copy, params),
          "buffers": init(shapes["buffers"], "buffers")}


@functools.lru_cache(maxsize=8)
def _init_optimizer(cfg: TrainConfig) -> Callable:
  return jax.jit(_optimizer(cfg).init)


def check_pair(cfg: TrainConfig, teacher: Teacher) -> None:
  """Raises a ValueError if the teacher cannot train this configuration (its z is wider
  than the student's style_dim, or its resolution is not a multiple of the student's)."""
  if cfg.style_dim < teacher.z_dim:
    raise ValueError(f"TrainConfig.style_dim: expected at least the teacher's z size "
                     f"{teacher.z_dim}, got {cfg.style_dim}")
  if cfg.resolution > teacher.resolution or teacher.resolution % cfg.resolution:
    raise ValueError(f"TrainConfig.resolution: expected a divisor of the teacher's "
                     f"resolution {teacher.resolution}, got {cfg.resolution}")


@functools.lru_cache(maxsize=8)
def _compiled_step(cfg: TrainConfig, teacher_module: Any, teacher_z_dim: int,
                   teacher_resolution: int) -> Callable:
  """The jitted step for a configuration and teacher architecture (compiled once)."""
  student = student_module(cfg)
  optimizer = _optimizer(cfg)
  teacher = Teacher(teacher_module, None, teacher_z_dim, teacher_resolution, "")

  def step(state, teacher_variables):
    t = state["step"]
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), t)
    k_z, k_noise = jax.random.split(key)
    z_t, z_s = paired_latents(k_z, cfg.batch_size, teacher_z_dim, cfg.style_dim)
    target = teacher_images(dataclasses.replace(teacher, variables=teacher_variables), z_t,
                            cfg.resolution)
    target = jax.lax.stop_gradient(target)

    def loss_fn(params):
      with fast_convolutions():
        images = student.apply({"params": params, "buffers": state["buffers"]}, z_s,
                               noise_mode=cfg.noise_mode, rngs={"noise": k_noise})
      return distillation_loss(images, target, l1_weight=cfg.l1_weight,
                               pyramid_weight=cfg.pyramid_weight,
                               pyramid_levels=cfg.levels)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    updates = {**updates, "mapping": jax.tree_util.tree_map(
        lambda u: u * cfg.mapping_lr_scale, updates["mapping"])}
    params = optax.apply_updates(state["params"], updates)
    beta = ema_beta(t, cfg)
    ema = jax.tree_util.tree_map(lambda e, p: p + (e - p) * beta, state["ema"], params)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)))
    metrics = dict(metrics, grad_norm=grad_norm)
    return ({"step": t + 1, "params": params, "opt_state": opt_state, "ema": ema,
             "buffers": state["buffers"]}, metrics)

  return jax.jit(step)


def train_step(cfg: TrainConfig, teacher: Teacher, state: dict) -> tuple[dict, dict]:
  """One optimisation step: ``(state, metrics)`` → next state and this step's losses."""
  fn = _compiled_step(cfg, teacher.module, teacher.z_dim, teacher.resolution)
  return fn(state, teacher.variables)


def restore(run_dir: str | os.PathLike, step: int | None = None) -> tuple[TrainConfig, dict]:
  """The configuration and the state saved at ``step`` (the latest when None).

  Raises:
    FileNotFoundError: no run or no checkpoint there.
    ValueError: the checkpoint is damaged (the message names the run's other steps).
  """
  import orbax.checkpoint as ocp

  run_dir = os.path.abspath(os.fspath(run_dir))
  runs.check_path(run_dir)
  if not os.path.isfile(os.path.join(run_dir, runs.RUN_FILE)):
    raise FileNotFoundError(f"{run_dir}: not a training run (expected {runs.RUN_FILE} "
                            f"inside it)")
  try:
    cfg = TrainConfig.from_json(runs.read_run(run_dir)["config"])
  except ValueError as e:
    raise ValueError(f"{os.path.join(run_dir, runs.RUN_FILE)}: {e}") from None
  with runs.manager(run_dir, None) as manager:
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
      raise FileNotFoundError(f"{run_dir}: expected a checkpoint at step "
                              f"{'(latest)' if step is None else step}, found steps "
                              f"{list(manager.all_steps())}")
    target = state_shapes(cfg)
    try:
      state = manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as e:  # orbax and tensorstore raise many kinds on a damaged checkpoint
      others = [s for s in manager.all_steps() if s != step]
      where = os.path.join(run_dir, runs.CHECKPOINTS, str(step))
      raise ValueError(
          f"{where}: expected a complete checkpoint of this run's configuration, got one "
          f"that does not restore ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
          f"the run's other checkpoints: steps {others} (pass one as the step, or move "
          f"the damaged one out of {runs.CHECKPOINTS}/ to resume from the latest other)"
          ) from e
  return cfg, jax.tree_util.tree_map(jnp.asarray, state)


def _check_loss(metrics: dict, first: int, last: int, manager) -> None:
  """Raises a ValueError if a logged loss is NaN or infinite (the run diverged)."""
  if not all(np.isfinite(v) for v in metrics.values()):
    raise ValueError(f"loss of steps {first}–{last}: expected finite values, got "
                     f"{metrics} (the run diverged; its last "
                     f"checkpoint, step {manager.latest_step()}, is kept; lower the "
                     f"learning rate in a new run)")


def train(cfg: TrainConfig, teacher: Teacher, run_dir: str | os.PathLike, *,
          stop_after: int | None = None, checkpoint_every: int = 500, log_every: int = 50,
          keep_checkpoints: int = 2, log: Callable[[str], None] | None = print,
          on_step: Callable[[int, dict], None] | None = None) -> dict:
  """Trains (or resumes) a run until ``cfg.steps`` or ``stop_after`` more steps.

  Args:
    cfg: the run's configuration (a resumed run must have been started with the same).
    teacher: from :func:`load_teacher`.
    run_dir: the run directory (created; resumed from its latest checkpoint if any).
    stop_after: stop after this many steps of this call (the run stays resumable).
    checkpoint_every: save every this many steps (also at the end and on interrupt).
    log_every: log mean losses over this many steps.
    keep_checkpoints: checkpoints kept (the latest ones).
    log: where progress lines go (None: nowhere); they also go to ``log.jsonl``.
    on_step: called as ``on_step(step, state)`` after each step (monitoring, tests).

  Returns:
    The state after the last step run.

  Raises:
    ValueError: the run directory holds a run of another configuration or teacher, or
      files of a run without its ``run.json`` (a new run never writes over them); the
      loss became NaN or infinite (the run diverged: the last finite checkpoint is kept);
      a checkpoint is damaged.
    ports.stylegan2.runs.RunInUseError: (a ValueError) another process, or this one, is
      training in the run directory (:func:`ports.stylegan2.runs.lock`).
    OSError: the run directory cannot be written (read-only media).
  """
  check_pair(cfg, teacher)
  counts = {"checkpoint_every": checkpoint_every, "log_every": log_every,
            "keep_checkpoints": keep_checkpoints}
  for name, value in counts.items():
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
      raise ValueError(f"{name}: expected a positive integer, got {value!r}")
  if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(
      stop_after, numbers.Integral) or stop_after < 0):
    raise ValueError(f"stop_after: expected None or a non-negative integer, got "
                     f"{stop_after!r}")
  if not os.fspath(run_dir):  # abspath would make it the working directory
    raise ValueError("run_dir: expected a directory path, got ''")
  run_dir = os.path.abspath(os.fspath(run_dir))
  runs.check_path(run_dir)
  with runs.lock(run_dir):  # from the set-up to the last save: one trainer per run
    return _train_locked(cfg, teacher, run_dir, stop_after, checkpoint_every, log_every,
                         keep_checkpoints, log, on_step)


def _train_locked(cfg: TrainConfig, teacher: Teacher, run_dir: str, stop_after: int | None,
                  checkpoint_every: int, log_every: int, keep_checkpoints: int,
                  log: Callable[[str], None] | None,
                  on_step: Callable[[int, dict], None] | None) -> dict:
  """:func:`train` in a checked run directory whose lock this thread holds."""
  from memedit import _io

  record = runs.run_record(cfg, teacher)
  if runs.resumable(run_dir):
    runs.check_resume(run_dir, record)
  else:  # a new run, or one whose set-up stopped before checkpoint 0 (its run.json replaced)
    runs.check_fresh(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    _io.atomic_write_bytes(os.path.join(run_dir, runs.RUN_FILE),
                           json.dumps(record, indent=2, sort_keys=True).encode())
  say = log or (lambda _: None)
  with runs.manager(run_dir, keep_checkpoints) as manager:
    if manager.latest_step() is not None:
      _, state = restore(run_dir)
      say(f"resumed {run_dir} at step {int(state['step'])}")
    else:
      state = init_state(cfg)
      runs.save(manager, state)
    start = int(state["step"])
    runs.truncate_log(run_dir, start)  # the steps after it run (and are logged) again
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    pending: list[tuple[int, dict]] = []  # (step, metrics) of the steps since the last row
    t_log = time.perf_counter()

    def log_pending():
      nonlocal pending, t_log
      first, last = pending[0][0], pending[-1][0]
      means = {k: float(np.mean([float(m[k]) for _, m in pending])) for k in pending[0][1]}
      _check_loss(means, first, last, manager)
      now = time.perf_counter()
      row = {"step": last, **means, "seconds_per_step": (now - t_log) / len(pending),
             "images_per_second": len(pending) * cfg.batch_size / (now - t_log)}
      runs.log_row(run_dir, row)
      # Emptied before the line is shown: a Ctrl-C while it is must not make the
      # interrupt handler log these steps a second time.
      pending, t_log = [], time.perf_counter()
      say(f"step {last}/{cfg.steps}  loss {means['loss']:.4f}  l1 {means['l1']:.4f}"
          f"  pyramid {means['pyramid']:.4f}  {row['seconds_per_step']:.2f} s/step")

    new_state = state  # the latest step's state, before `state` takes it
    try:
      with runs.sigterm_as_interrupt():
        for step in range(start, end):
          new_state, metrics = train_step(cfg, teacher, state)
          if step == start:  # the first step compiles: time it apart from the others
            m = {k: float(v) for k, v in metrics.items()}
            _check_loss(m, step + 1, step + 1, manager)
            seconds = time.perf_counter() - t_log
            runs.log_row(run_dir, {"step": step + 1, **m, "compile_and_step_seconds": seconds})
            say(f"step {step + 1}/{cfg.steps}  loss {m['loss']:.4f}  l1 {m['l1']:.4f}  "
                f"pyramid {m['pyramid']:.4f}  (compiled and ran in {seconds:.1f} s)")
            t_log = time.perf_counter()
          else:
            pending.append((step + 1, metrics))
          # Taken only once the step has its row or pending entry (see the handler).
          state = new_state
          if on_step is not None:
            on_step(step + 1, state)
          if pending and ((step + 1) % log_every == 0 or step + 1 == end):
            log_pending()
          if (step + 1) % checkpoint_every == 0:
            runs.save(manager, state)
    except KeyboardInterrupt:
      # The checkpoint saved holds exactly the steps the log covers. The interrupt may
      # come at any point of a step: while it runs or its first loss is read (no row, and
      # `state` not yet advanced: the step is dropped), after its row or pending entry
      # was written but before `state` took it (it is saved), or while a row is written
      # (the log file says whether it was). Pending steps get their row.
      logged = runs.last_logged_step(run_dir)
      covered = start if logged is None else max(start, logged)
      pending = [(s, m) for s, m in pending if s > covered]
      if pending:
        covered = pending[-1][0]
        log_pending()
      if int(new_state["step"]) == covered:
        state = new_state
      runs.save(manager, state)
      say(f"interrupted: saved step {int(state['step'])} in {run_dir}")
      raise
    runs.save(manager, state)
  return state


if __name__ == "__main__":
  from ports.stylegan2.train_cli import main

  sys.exit(main())
