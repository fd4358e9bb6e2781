"""The demo language model: a small GPT-2 trained with optax on the generated world.

Nothing is downloaded: the world (:mod:`memedit.lm.world`) is generated from a seed, its
vocabulary is the tokenizer, and the model is :class:`ports.gpt2.GPT2LMHeadModel` with a
small config, trained from a seeded initialisation on the world's training sentences
(AdamW, warm-up then cosine decay; the loss skips the subjects' names, which nothing
predicts; the token embedding learns at a larger rate). Training starts on a few
subjects only (``warm_subjects`` for ``warm_steps`` steps), so that the circuit that
recalls a subject's facts forms on a small set before every subject comes in (the
plateau before facts are learnt grows with their number). The result is cached: a folder
holding the checkpoint (readable by :func:`ports.gpt2.load_gpt2`), ``world.json`` and
``train.json`` (settings, time, accuracies), named by a hash of the settings, so a second
call returns it at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from memedit.lm.evaluate import top1_accuracy, world_facts
from memedit.lm.world import World, load_world, make_world, training_batches
from ports import gpt2

__all__ = ["DEMO_MEMIT_LAYERS", "DEMO_PENALTY", "DEMO_ROME_LAYER", "DemoConfig", "load_demo",
           "train_demo"]

#: The demo model's edit settings (``memedit lm-eval`` and the benchmarks' defaults): ROME
#: and fine-tuning at block 1; MEMIT spread over all four blocks with λ = 1,000, chosen by
#: ``benchmarks/lm_memit_sweep.py`` on 1,000 facts and checked on 1,000 others (the
#: README's MEMIT section). MEMIT's 15,000 for GPT-J writes few facts into this model's small
#: keys (λ = 10,000 reaches 13 % of 1,000 facts).
DEMO_ROME_LAYER = 1
DEMO_MEMIT_LAYERS = (0, 1, 2, 3)
DEMO_PENALTY = 1000.0


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Settings of the demo world, model and training (all part of the cache key).

  Attributes:
    seed: seed of the world, the initialisation and the data order.
    n_subjects, n_relations, n_objects, names, n_given: the world
      (:func:`make_world`; ``n_given`` 0: its default).
    n_embd, n_layer, n_head, n_inner: the GPT-2 config (``n_positions`` = ``length``;
      ``n_inner`` 0: 4 ``n_embd``). The MLPs' width is the key dimension of the memories:
      MEMIT writes many facts into several of them at once; the demo's 1,024 (8 ``n_embd``)
      lets 1,000 facts in one batch reach their targets (4 ``n_embd``: 76 % by
      P(new) > P(old)).
    length: tokens per training row. batch: rows per step. steps: optimiser steps.
    learning_rate: peak learning rate. warmup: warm-up steps. weight_decay: AdamW's.
    warm_subjects, warm_steps: the first ``warm_steps`` steps train on the first
      ``warm_subjects`` subjects only (0: no such phase).
    embedding_lr_scale: the token embedding's learning rate over the others' (a subject's
      row is trained only in the few steps that show it; a larger rate there learns the
      facts several times faster).
    eval_facts: (fact, template) pairs of the accuracy measured after training.
  """

  seed: int = 0
  n_subjects: int = 2000
  n_relations: int = 3
  n_objects: int = 20
  names: str = "surname"
  n_given: int = 0
  n_embd: int = 128
  n_layer: int = 4
  n_head: int = 4
  n_inner: int = 1024
  length: int = 32
  batch: int = 64
  steps: int = 400
  learning_rate: float = 3e-3
  warmup: int = 50
  weight_decay: float = 0.0
  warm_subjects: int = 200
  warm_steps: int = 150
  embedding_lr_scale: float = 10.0
  eval_facts: int = 4000

  def __post_init__(self):
    if not 0 <= self.warmup < self.steps:
      raise ValueError(f"warmup: expected 0 <= warmup < steps = {self.steps}, got "
                       f"{self.warmup}")
    if self.n_inner < 0:
      raise ValueError(f"n_inner: expected 0 (4 n_embd) or a positive MLP width, got "
                       f"{self.n_inner}")
    if not 0 <= self.warm_steps <= self.steps:
      raise ValueError(f"warm_steps: expected 0 <= warm_steps <= steps = {self.steps}, got "
                       f"{self.warm_steps}")

  def key(self) -> str:
    """A 16-hex-digit hash of the settings."""
    text = json.dumps(dataclasses.asdict(self), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

  def world(self) -> World:
    return make_world(self.seed, self.n_subjects, self.n_relations, self.n_objects,
                      names=self.names, n_given=self.n_given or None)

  def model_config(self, vocab_size: int) -> "gpt2.GPT2Config":
    return gpt2.GPT2Config(vocab_size=vocab_size, n_positions=self.length,
                           n_embd=self.n_embd, n_layer=self.n_layer, n_head=self.n_head,
                           n_inner=self.n_inner or None)


def _make_step(module, opt):
  @jax.jit
  def step(variables, opt_state, ids, mask):
    def loss_fn(v):
      logits = module.apply(v, ids[:, :-1])
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
      w = mask[:, 1:]
      return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)
    loss, grads = jax.value_and_grad(loss_fn)(variables)
    updates, opt_state = opt.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss
  return step


def load_demo(folder: str | os.PathLike) -> tuple[Any, dict, World, dict]:
  """Reads a folder written by :func:`train_demo`.

  Returns:
    ``(module, variables, world, info)`` (``info``: the contents of ``train.json``).

  Raises:
    ValueError / FileNotFoundError: the folder is not a complete demo model.
  """
  folder = os.fspath(folder)
  for name in ("model", "world.json", "train.json"):
    if not os.path.exists(os.path.join(folder, name)):
      raise FileNotFoundError(f"{folder}: expected a demo model folder with {name} (run "
                              f"`memedit lm-train`)")
  module, variables, _ = gpt2.load_gpt2(os.path.join(folder, "model"))
  world = load_world(os.path.join(folder, "world.json"))
  with open(os.path.join(folder, "train.json")) as f:
    info = json.load(f)
  return module, variables, world, info


def train_demo(config: DemoConfig = DemoConfig(), cache_dir: str | os.PathLike | None = None,
               *, progress: bool = True, log=None) -> tuple[Any, dict, World, dict]:
  """Trains (or reads from the cache) the demo model of ``config``.

  Args:
    config: the :class:`DemoConfig`.
    cache_dir: folder of cached demo models (None: train, keep nothing).
    progress: print the loss every 100 steps.
    log: where progress goes (default stderr).

  Returns:
    ``(module, variables, world, info)``; ``info`` holds the settings, the training time
    and the top-1 accuracies on training and held-out (paraphrase) templates.
  """
  log = log or sys.stderr
  folder = None
  if cache_dir is not None:
    folder = os.path.join(os.fspath(cache_dir), f"lm-demo-{config.key()}")
    if os.path.exists(os.path.join(folder, "train.json")):
      return load_demo(folder)
  world = config.world()
  module = gpt2.GPT2LMHeadModel(config.model_config(world.vocab_size))
  variables = module.init(jax.random.key(config.seed),
                          jnp.zeros((1, config.length), jnp.int32))
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, config.warmup,
                                                config.steps, 0.05 * config.learning_rate)
  adamw = lambda lr: optax.adamw(lr, b2=0.98, weight_decay=config.weight_decay)
  labels = jax.tree_util.tree_map_with_path(
      lambda kp, _: "embedding" if "wte" in jax.tree_util.keystr(kp) else "other", variables)
  opt = optax.multi_transform(
      {"embedding": adamw(lambda i: schedule(i) * config.embedding_lr_scale),
       "other": adamw(schedule)}, labels)
  opt_state = opt.init(variables)
  step = _make_step(module, opt)
  batches = training_batches(world, config.batch, config.length, seed=config.seed)
  few = min(config.warm_subjects, len(world.subjects))
  first = training_batches(
      World(world.seed, world.subjects[:few], world.relations, world.objects[:few],
            world.vocab), config.batch, config.length, seed=config.seed) if few else None
  t0 = time.perf_counter()
  losses = []
  for i in range(1, config.steps + 1):
    ids, mask = next(first if first is not None and i <= config.warm_steps else batches)
    variables, opt_state, loss = step(variables, opt_state, ids, mask)
    if progress and (i % 100 == 0 or i == config.steps):
      losses.append(float(loss))
      print(f"lm-train: step {i}/{config.steps} loss {float(loss):.4f} "
            f"({time.perf_counter() - t0:.0f} s)", file=log, flush=True)
  jax.block_until_ready(variables)
  seconds = time.perf_counter() - t0
  model = (module, variables)
  train_acc = top1_accuracy(model, world.tokenize,
                            world_facts(world, config.eval_facts, seed=config.seed + 1))
  para_acc = top1_accuracy(model, world.tokenize,
                           world_facts(world, config.eval_facts, seed=config.seed + 2,
                                       split="paraphrase"))
  info = {"config": dataclasses.asdict(config), "train_seconds": round(seconds, 1),
          "load_average": [round(x, 2) for x in os.getloadavg()],
          "accuracy_train_templates": train_acc, "accuracy_paraphrases": para_acc,
          "final_loss": float(loss), "vocab_size": world.vocab_size,
          "parameters": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(variables)))}
  if folder is not None:
    os.makedirs(folder, exist_ok=True)
    gpt2.save_gpt2(os.path.join(folder, "model"), module.config, variables,
                   source={"format": "memedit-lm-demo", "config": dataclasses.asdict(config)},
                   force=True)
    world.save(os.path.join(folder, "world.json"))
    tmp = os.path.join(folder, "train.json.tmp")
    with open(tmp, "w") as f:
      json.dump(info, f, indent=2)
    os.replace(tmp, os.path.join(folder, "train.json"))
  return module, variables, world, info
