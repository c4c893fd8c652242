"""Export to Hugging Face transformers: a stock class (Llama, Qwen3, Arcee, Apertus, GPT-2,
Mixtral, Qwen3-MoE, Ernie 4.5 MoE) where one computes exactly the slms model's function, so
the directory loads without slms; else the custom `slms` class of `slms.hf`. `export_model` is
the entry point."""

from slms.export.write import Exported, export_model

__all__ = ["Exported", "export_model"]
