"""Instruction fine-tuning: the chat template with a loss mask, conversation sources, the
embedded instruction corpus, `slms finetune` and `slms eval-instruct`."""
