"""Model definitions. Nothing here imports from train/, infer/ or analysis/."""

from slms.model.gpt import GPT, IGNORE_INDEX, Output, eval_mode, pads_at_end
from slms.model.info import count_params, flops_per_token, model_info

__all__ = ["GPT", "IGNORE_INDEX", "Output", "count_params", "eval_mode", "flops_per_token",
           "model_info", "pads_at_end"]
