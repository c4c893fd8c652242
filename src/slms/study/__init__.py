"""Compute-matched dense vs MoE (`slms study`): does an MoE beat the dense model for the same
training compute, on this data, at this scale, and does upcycling the dense model help?

Trained in sequence on the same data, batches and recipe (the base config), each to the same
budget:
  dense        the base config (it must be dense)
  moe-eE-kK    each E in `experts` and K in `top_ks`: every FFN an MoE layer of E experts, K
               active per token, each expert of hidden width ~ the dense FFN's / K, so that a
               token's expert matmuls cost what the dense FFN's do (the router's small matmul
               comes on top, and is counted)
  upcycled     the dense run's own checkpoint at about half the budget, upcycled
               (slms.upcycle: experts copied from the dense FFN with a little noise, a new
               router) and trained on from there to the same total budget (train.init_from
               with train.init_step: a fresh optimizer state; the dense run's batches from
               that step on and its learning-rate schedule continued)

The budget is training FLOPs (CONVENTION) or wall-clock minutes of optimizer steps per variant
(train.max_minutes). With FLOPs, a variant trains round(budget / (FLOPs per token x tokens per
step)) steps, so its FLOPs are within half a step of the budget. Scores are the validation bits
per byte of the last evaluation (the whole validation split). Writes study.json and two PNGs
(validation bpb against training FLOPs and against training seconds) into the output directory.

Modules: options (StudyOptions: what to compare, torch-free for the command line), plan (the
variants and their widths), run (training them: run_study), report (the results, study.json,
the table and the plots).
"""

from __future__ import annotations

from slms.study.options import QUICK_DENSE_STEPS, QUICK_OVERRIDES, StudyOptions

__all__ = ["QUICK_DENSE_STEPS", "QUICK_OVERRIDES", "StudyOptions"]
