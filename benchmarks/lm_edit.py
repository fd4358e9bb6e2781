"""Language-model edits on the demo GPT-2: ROME end to end, MEMIT at 1,000 facts, and the
key statistics C over 10⁶ tokens next to the bare forward + fold.

- ROME: one edit end to end (k* over the contexts, the value search, the rank-one insert)
  in a fresh process ("cold": compilation included) and again for another fact of the
  same shape ("warm": the compiled programs reused).
- MEMIT: ``--memit`` facts (default 1,000) in one batch over the demo's MEMIT blocks,
  cold and warm (another set of facts).
- C: ``--tokens`` tokens (default 10⁶) of the world's text through
  ``memedit.layers.layer_covariance`` (memedit.lm.stats.lm_covariance) at the ROME
  layer, against a bare fold: one jitted ``lax.scan`` that runs the GPT-2 blocks by hand
  as far as the layer's keys and adds (mask·K)ᵀK to a sum. Rates are real (unpadded)
  keys per second; both timed after a warm-up compile.

Usage: python benchmarks/lm_edit.py [--model DIR] [--memit N] [--tokens N] [--quick]
       [--out-dir DIR]
Writes benchmarks/results/lm_edit.json (``--quick``: lm_edit_quick.json; other --memit or
--tokens: named after them, e.g. lm_edit_memit100.json; another --model needs --out-dir).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks.common import add_out_dir, positive_int, results_path, table, write_to
from memedit.lm.evaluate import world_cases
from memedit.lm.experiment import demo_contexts, world_covariance
from memedit.lm.memit import memit_edits
from memedit.lm.rome import rome_edits
from memedit.lm.stats import lm_covariance
from memedit.lm.train import (DEMO_MEMIT_LAYERS as MEMIT_LAYERS, DEMO_PENALTY as PENALTY,
                              DEMO_ROME_LAYER as ROME_LAYER, DemoConfig, load_demo, train_demo)
from memedit.lm.world import text_batches
from ports.gpt2 import lm_layout
from ports.gpt2.model import Block


def _bare_fold(module, layer, group):
  """jit(params, ids (G, B, T), mask (G, B, T)) -> Σ (m k)ᵀ k over the group."""
  cfg = module.config

  @jax.jit
  def fold(params, ids, mask):
    p = params["params"]

    def body(S, batch):
      x_ids, m = batch
      t = x_ids.shape[1]
      x = p["wte"]["embedding"][x_ids] + p["wpe"]["embedding"][jnp.arange(t)][None]
      causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
      for i in range(layer):
        x = Block(cfg).apply({"params": p[f"h_{i}"]}, x, causal)
      blk = p[f"h_{layer}"]
      h = x + _attn(cfg, blk, x, causal)
      h = _ln(h, blk["ln_2"], cfg.layer_norm_epsilon)
      keys = jax.nn.gelu(h @ blk["mlp"]["c_fc"]["kernel"] + blk["mlp"]["c_fc"]["bias"],
                         approximate=True).reshape(-1, cfg.inner_dim)
      w = m.reshape(-1, 1)
      return S + jnp.matmul((keys * w).T, keys, precision=lax.Precision.HIGHEST), None

    S, _ = lax.scan(body, jnp.zeros((cfg.inner_dim, cfg.inner_dim), jnp.float32), (ids, mask))
    return S

  return fold


def _ln(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def _attn(cfg, blk, x, causal):
  from ports.gpt2.model import Attention
  h = _ln(x, blk["ln_1"], cfg.layer_norm_epsilon)
  return Attention(cfg.n_embd, cfg.n_head).apply({"params": blk["attn"]}, h, causal)


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  jax.block_until_ready(jax.tree_util.tree_leaves(out))
  return out, time.perf_counter() - t0


BARE_BATCH, BARE_LENGTH, BARE_GROUP = 64, 32, 8


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default=None, help="demo folder (default: the default demo, "
                  "trained into --cache-dir when missing)")
  ap.add_argument("--cache-dir", default=".cache")
  ap.add_argument("--memit", type=positive_int, default=1000, help="facts in one MEMIT batch")
  ap.add_argument("--tokens", type=positive_int, default=1_000_000,
                  help=f"tokens for C (at least {BARE_BATCH * BARE_LENGTH * BARE_GROUP:,})")
  ap.add_argument("--quick", action="store_true",
                  help="100 MEMIT facts, 10⁵ tokens (results in lm_edit_quick.json)")
  add_out_dir(ap)
  args = ap.parse_args(argv)
  out = results_path(ap, args, "lm_edit", variants=("--memit", "--tokens"), inputs=("--model",))
  if args.quick:
    args.memit, args.tokens = min(args.memit, 100), min(args.tokens, 100_000)
  least = BARE_BATCH * BARE_LENGTH * BARE_GROUP
  if args.tokens < least:
    ap.error(f"--tokens: expected at least {least} (one group of {BARE_GROUP} batches of "
             f"{BARE_BATCH} × {BARE_LENGTH} for the bare fold), got {args.tokens}")
  load0 = os.getloadavg()
  module, variables, world, info = (load_demo(args.model) if args.model else
                                    train_demo(DemoConfig(), args.cache_dir))
  model = (module, variables)
  layout = lm_layout(module.config.n_layer)
  stats_dir = os.path.join(args.cache_dir, "lm-stats")
  layers = sorted({ROME_LAYER, *MEMIT_LAYERS})
  covs = {l: world_covariance(model, world, layout.memories[l], cache_dir=stats_dir)
          for l in layers}
  contexts = demo_contexts(model, world)
  cases = world_cases(world, max(2 * args.memit, 2), seed=11)  # edits are not applied
  rows = []

  def rome(i):
    return rome_edits(model, layout.memories[ROME_LAYER], world.tokenize, [cases[i].request],
                      covs[ROME_LAYER], contexts=contexts)[0].edit.lam

  _, cold = _timed(lambda: rome(0))
  _, warm = _timed(lambda: rome(1))
  rows.append({"what": "ROME, 1 edit (k*, v*, insert)", "cold_s": round(cold, 2),
               "warm_s": round(warm, 2)})
  print(table(rows, ["what", "cold_s", "warm_s"]), flush=True)

  def memit(start):
    reqs = [c.request for c in cases[start:start + args.memit]]
    return [e.lam for e in memit_edits(model, layout, MEMIT_LAYERS, world.tokenize, reqs,
                                       covs, penalty=PENALTY, contexts=contexts).edits]

  _, cold = _timed(lambda: memit(0))
  _, warm = _timed(lambda: memit(args.memit))
  rows.append({"what": f"MEMIT, {args.memit} edits in one batch (layers "
                       f"{','.join(map(str, MEMIT_LAYERS))})", "cold_s": round(cold, 2),
               "warm_s": round(warm, 2)})
  print(table(rows, ["what", "cold_s", "warm_s"]), flush=True)

  batch, length = BARE_BATCH, BARE_LENGTH
  text = text_batches(world, args.tokens, batch, length, seed=123)
  n_keys = int(sum(m.sum() for _, m in text))
  addr = layout.memories[ROME_LAYER]
  lm_covariance(model, addr, text[:8])  # compile
  _, mem_s = _timed(lambda: lm_covariance(model, addr, text).sum_sq)
  group = BARE_GROUP
  fold = _bare_fold(module, ROME_LAYER, group)
  ids = np.stack([b[0] for b in text])
  masks = np.stack([b[1] for b in text])
  n_groups = len(text) // group
  fold(variables, jnp.asarray(ids[:group]), jnp.asarray(masks[:group])).block_until_ready()

  def bare():
    S = 0.0
    for g in range(n_groups):
      S = S + fold(variables, jnp.asarray(ids[g * group:(g + 1) * group]),
                   jnp.asarray(masks[g * group:(g + 1) * group]))
    return S

  _, bare_s = _timed(bare)
  bare_keys = int(masks[:n_groups * group].sum())
  stats = [{"what": f"C at block {ROME_LAYER} (memedit lm_covariance)", "keys": n_keys,
            "seconds": round(mem_s, 2), "keys_per_s": round(n_keys / mem_s)},
           {"what": "bare forward + fold (jit scan)", "keys": bare_keys,
            "seconds": round(bare_s, 2), "keys_per_s": round(bare_keys / bare_s)}]
  print(table(stats, ["what", "keys", "seconds", "keys_per_s"]))
  load1 = os.getloadavg()
  path = write_to(out, {"edits": rows, "statistics": stats, "tokens": args.tokens,
                        "memit_facts": args.memit, "model": info,
                        "load_average_before": load0, "load_average_after": load1})
  print(f"load average {load0[0]:.2f} before, {load1[0]:.2f} after; wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
