"""Routing statistics of one MoE layer: what it accumulates between two log lines.

The counts stay where the routing ran (device tensors once anything is added, no host sync per
step); `summary` reads them, once per log interval.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

Number = torch.Tensor | int | float


@dataclass
class MoEStats:
    """Counts since the last summary. Tokens are real tokens (the padded layout's pads are left
    out); assignments are (token, expert) pairs, K per token."""

    top_k: int  # K: assignments per token (not saved: it is the model's config)
    tokens_E: torch.Tensor  # kept assignments per expert (int64)
    tokens: Number = 0  # tokens routed
    dropped: Number = 0  # assignments over an expert's capacity (training only)
    entropy_token_sum: Number = 0.0  # router entropy (noise-free probabilities), summed
    aux_sum: Number = 0.0  # load-balancing loss (unweighted), summed over loss_calls
    z_sum: Number = 0.0  # router z-loss (unweighted), summed over loss_calls
    calls: int = 0  # forward calls recorded
    loss_calls: int = 0  # of which computed the router losses (training)

    @classmethod
    def zeros(cls, n_experts: int, top_k: int) -> MoEStats:
        return cls(top_k, torch.zeros(n_experts, dtype=torch.long))

    def add(self, counts_E: torch.Tensor, n_tokens: torch.Tensor | int,
            entropy_sum: torch.Tensor, dropped: torch.Tensor | None = None,
            balance: torch.Tensor | None = None, z: torch.Tensor | None = None) -> None:
        """Count one forward call: kept assignments per expert, tokens routed, their summed
        router entropy, dropped assignments (None: dropless), and the router losses (None: not
        computed). Out of place, without host syncs."""
        self.tokens_E = self.tokens_E.to(counts_E.device) + counts_E
        self.tokens = self.tokens + n_tokens
        if dropped is not None:
            self.dropped = self.dropped + dropped
        self.entropy_token_sum = self.entropy_token_sum + entropy_sum
        if balance is not None:
            assert z is not None
            self.aux_sum = self.aux_sum + balance.detach()
            self.z_sum = self.z_sum + z.detach()
            self.loss_calls += 1
        self.calls += 1

    def summary(self) -> dict[str, Any]:
        """Plain Python numbers: tokens_per_expert, share, max_over_mean, entropy (mean per
        token), dropped_share (of the assignments), aux_loss and z_loss (means over the
        loss_calls; 0.0 when there were none), loss_calls."""
        tokens_E = self.tokens_E.tolist()
        total = max(sum(tokens_E), 1)
        mean = total / len(tokens_E)
        loss_calls = max(self.loss_calls, 1)
        return {
            "tokens_per_expert": tokens_E,
            "share": [n / total for n in tokens_E],
            "max_over_mean": max(tokens_E) / mean if sum(tokens_E) else 0.0,
            "entropy": float(self.entropy_token_sum) / max(int(self.tokens), 1),
            "dropped_share": int(self.dropped) / max(int(self.tokens) * self.top_k, 1),
            "aux_loss": float(self.aux_sum) / loss_calls,
            "z_loss": float(self.z_sum) / loss_calls,
            "loss_calls": self.loss_calls,
        }

    def state_dict(self) -> dict[str, Number]:
        """The counts, as tensors and numbers (trainer.pt is loaded with weights_only=True)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "top_k"}

    @classmethod
    def from_state_dict(cls, state: dict[str, Number], top_k: int) -> MoEStats:
        """The inverse of `state_dict`; also reads the checkpoints written before statistics
        had a type (the same dict, without loss_calls, when every call computed the losses,
        or without entropy_token_sum: entropy then reads 0)."""
        state = dict(state)
        state.setdefault("loss_calls", state["calls"])
        state.setdefault("entropy_token_sum", 0.0)
        names = {f.name for f in fields(cls)} - {"top_k"}
        return cls(top_k, **{k: v for k, v in state.items() if k in names})
