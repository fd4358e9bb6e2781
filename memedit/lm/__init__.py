"""Fact edits in causal language models with memedit's memory math: ROME and MEMIT.

An MLP's output projection W (GPT-2: ``h_i.mlp.c_proj``, Flax kernel ``(4d, d)``) is a
linear memory from keys k (the MLP activations) to values (what it adds to the residual
stream); a fact (subject, relation, object) is written as a constrained change of W using
the key statistics C = E[k kᵀ]:

- :mod:`memedit.lm.stats`: C over a text stream (memedit's cached streaming fold);
- :mod:`memedit.lm.keys`: k*, the subject's key averaged over random prefixes;
- :mod:`memedit.lm.values`: v*, found by gradient descent on the MLP output;
- :mod:`memedit.lm.rome`, :mod:`memedit.lm.memit`: the rank-one and the multi-layer ridge
  inserts, as ordinary :class:`memedit.Edit` values (apply, revert bit for bit, save);
- :mod:`memedit.lm.finetune`: the fine-tuning baseline;
- :mod:`memedit.lm.tracing`: causal tracing heat maps;
- :mod:`memedit.lm.evaluate`: efficacy, paraphrase, neighbourhood, unedited accuracy;
- :mod:`memedit.lm.world`, :mod:`memedit.lm.train`: a generated world of facts and a small
  GPT-2 trained on it (no download); :mod:`memedit.lm.cli`: the ``lm-*`` commands.

Models enter as Linen ``(module, variables)`` or NNX ``(graphdef, state)`` with a
tokenizer (text -> ids) and an :class:`LMLayout` (where the MLP projections, blocks and
embedding are; :func:`ports.gpt2.lm_layout` for GPT-2).

Example:
  >>> from memedit.lm import LMLayout, Request
  >>> Request("{} lives in", "Tavo Reskin", "kesh").text
  'Tavo Reskin lives in'
"""

from memedit.lm.evaluate import EditCase, evaluate_cases, score_targets, summarize
from memedit.lm.finetune import FinetuneResult, finetune_edit
from memedit.lm.hooks import LMLayout, run_lm, split_model
from memedit.lm.keys import read_states, sample_contexts, subject_keys
from memedit.lm.memit import MemitResult, memit_edits, memit_insert
from memedit.lm.prompts import PromptBatch, Request, encode
from memedit.lm.rome import RomeResult, rome_edits, rome_insert
from memedit.lm.stats import lm_covariance, lm_second_moment
from memedit.lm.tracing import TraceResult, causal_trace, trace_png, trace_summary
from memedit.lm.values import ValueResult, optimize_values

__all__ = [
    "EditCase", "FinetuneResult", "LMLayout", "MemitResult", "PromptBatch", "Request",
    "RomeResult", "TraceResult", "ValueResult", "causal_trace", "encode", "evaluate_cases",
    "finetune_edit", "lm_covariance", "lm_second_moment", "memit_edits", "memit_insert",
    "optimize_values", "read_states", "rome_edits", "rome_insert", "run_lm",
    "sample_contexts", "score_targets", "split_model", "subject_keys", "summarize",
    "trace_png", "trace_summary",
]
