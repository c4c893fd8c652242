"""Mixture-of-Experts feed-forward: the router, the balancing losses, and the layer.

The layer routes (`Router` -> `Routing`), hands the routing to the dispatch engine, which
runs the experts the way measured fastest, and records the statistics. Its modules
(slms.model), each importing only those below it:
    moe           this module: Router, the balancing losses, MoE; re-exports Routing, Experts
    moe_dispatch  the engine: a call's Situation, `choose_path` (the one decision), PATHS (the
                  one table of the ways to run), and the timers slms.model.tune measures with
    moe_decode    the decode-only paths (a few tokens, no autograd)
    moe_experts   Routing, Experts (stacked weights and the ways to run them), compute_dtype
    moe_kernels   the experts' loops over row groups, with hand-written autograd
and moe_stats, the statistics between two log lines.

Shape legend (tensor names end with their shape):
    T  tokens in the layer (batch and time flattened)     D  model width (n_embd)
    E  experts                                            H  expert hidden width
    K  experts chosen per token (top-k)                   N  kept (token, expert) assignments
Router maths (logits, softmax, top-k) runs in fp32 whatever the autocast dtype.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from slms.config import MoEConfig
from slms.model.dropout import Dropout
from slms.model.moe_dispatch import SMALL_N, dispatch
from slms.model.moe_experts import Experts, Routing, count_experts, recomputing
from slms.model.moe_stats import MoEStats

__all__ = ["Experts", "MoE", "Router", "Routing", "capacity", "load_balancing_loss",
           "router_z_loss", "token_mean"]


def load_balancing_loss(probs_TE: torch.Tensor, experts_TK: torch.Tensor,
                        real_T: torch.Tensor | None = None) -> torch.Tensor:
    """Switch loss E * sum_e f_e * P_e: f_e share of the T*K routing slots, P_e mean probability.

    1.0 at perfect balance; at most E / K, when every token goes to the same K experts with all
    its probability on them.
    real_T (bool): only these tokens count (the padded layout's pads do not).
    """
    E = probs_TE.size(-1)
    f_E = count_experts(experts_TK, E, real_T).to(probs_TE.dtype)
    return E * (f_E / f_E.sum().clamp(min=1) * token_mean(probs_TE, real_T)).sum()


def router_z_loss(logits_TE: torch.Tensor, real_T: torch.Tensor | None = None) -> torch.Tensor:
    """mean over tokens (those in real_T) of logsumexp(logits)^2 (ST-MoE): keeps router logits
    small."""
    return token_mean(torch.logsumexp(logits_TE, dim=-1).pow(2), real_T)


def token_mean(v_T: torch.Tensor, real_T: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over dim 0 (tokens), over the tokens in real_T when given."""
    if real_T is None:
        return v_T.mean(0)
    w_T = real_T.to(v_T.dtype).view(-1, *[1] * (v_T.dim() - 1))
    return (v_T * w_T).sum(0) / w_T.sum().clamp(min=1)


def capacity(cfg: MoEConfig, n_tokens: int) -> int | None:
    """Per-expert capacity floor(cf * K * T / E), or None when dropless."""
    if cfg.capacity_factor <= 0:
        return None
    return math.floor(cfg.capacity_factor * cfg.top_k * n_tokens / cfg.n_experts)


def fp32_linear(x_TD: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """`layer` applied in fp32 (the router's maths), with or without its bias."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x_TD, layer.weight.float(), bias)


class Router(nn.Module):
    """`noisy_topk` (the seed's), `topk`, or `bias` (auxiliary-loss-free, DeepSeek-V3 style)."""

    def __init__(self, n_embd: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(n_embd, cfg.n_experts, bias=cfg.bias)
        self.noise = (nn.Linear(n_embd, cfg.n_experts, bias=cfg.bias)
                      if cfg.router == "noisy_topk" else None)
        if cfg.router == "bias":
            self.register_buffer("expert_bias", torch.zeros(cfg.n_experts))
            self.register_buffer("load_E", torch.zeros(cfg.n_experts), persistent=False)

    def forward(self, x_TD: torch.Tensor, real_T: torch.Tensor | None = None) -> Routing:
        """real_T (bool): the tokens whose load the bias router balances (pads are routed but
        not counted)."""
        # Entering autocast(enabled=False) costs microseconds that matter when decoding.
        off = torch.is_autocast_enabled(x_TD.device.type)
        with torch.autocast(x_TD.device.type, enabled=False) if off else contextlib.nullcontext():
            return self._route(x_TD.float(), real_T)

    def _route(self, x_TD: torch.Tensor, real_T: torch.Tensor | None) -> Routing:
        logits_TE = fp32_linear(x_TD, self.gate)
        clean_TE = None
        if self.noise is not None and self.training:
            # The seed's noisy gate, but only in training: evaluation and generation are
            # deterministic.
            std_TE = F.softplus(fp32_linear(x_TD, self.noise))
            clean_TE, logits_TE = logits_TE, logits_TE + torch.randn_like(logits_TE) * std_TE
        needed = self.cfg.router == "bias" or not self.cfg.renormalize
        probs_TE = logits_TE.softmax(dim=-1) if needed else None  # else computed when asked
        K = self.cfg.top_k
        if self.cfg.router == "bias":
            # The bias only chooses the experts; the weights stay the unbiased scores.
            experts_TK = (probs_TE + self.expert_bias).topk(K, dim=-1).indices
            top_TK = logits_TE.gather(-1, experts_TK)
        else:
            top_TK, experts_TK = logits_TE.topk(K, dim=-1)
        # Renormalised top-k probabilities are the softmax of the top-k logits: one op, no gather.
        weights_TK = (top_TK.softmax(-1) if self.cfg.renormalize
                      else probs_TE.gather(-1, experts_TK))
        if self.cfg.router == "bias" and self.training:
            with torch.no_grad():
                if not recomputing():  # a checkpointed forward replayed in backward
                    self.load_E += count_experts(experts_TK, self.cfg.n_experts, real_T)
        return Routing(experts_TK, weights_TK, logits_TE, probs_TE, clean_TE)

    @torch.no_grad()
    def update_bias(self) -> None:
        """After an optimizer step: b_e += u * sign(mean load - load_e), then re-centre."""
        if self.cfg.router != "bias":
            return
        load_E = self.load_E
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load_E)
        self.expert_bias += self.cfg.bias_update_rate * torch.sign(load_E.mean() - load_E)
        self.expert_bias -= self.expert_bias.mean()
        load_E.zero_()

    @torch.no_grad()
    def after_optimizer_step(self, skipped: bool) -> None:
        """The bias router's load since the last step moves the bias (`update_bias`), or, when
        the step was skipped (non-finite), is discarded: no bias update from a diverged step.
        A collective under torch.distributed: every rank calls it with the same `skipped`."""
        if self.cfg.router != "bias":
            return
        if skipped:
            self.load_E.zero_()
        else:
            self.update_bias()

    def reset_load(self) -> None:
        """The bias router's load back to zeros beside expert_bias (a model built on the meta
        device and loaded from saved tensors has none: the load is not saved)."""
        if self.cfg.router == "bias":
            self.load_E = torch.zeros_like(self.expert_bias)


class MoE(nn.Module):
    """Router + experts + dispatch (moe_dispatch). forward returns (y, weighted auxiliary loss).

    Switches for tests and benchmarks (the defaults are what runs): `impl` forces a kernel
    (`Experts`), `reference` runs the per-expert loop, `small_n` moves the decode paths'
    threshold (the most assignments they take)."""

    def __init__(self, n_embd: int, cfg: MoEConfig, hidden: int, activation: str,
                 dropout: float = 0.0, *, impl: str = "auto", reference: bool = False,
                 small_n: int = SMALL_N):
        super().__init__()
        self.cfg = cfg
        self.router = Router(n_embd, cfg)
        self.experts = Experts(n_embd, hidden, cfg.n_experts, activation, impl, cfg.bias)
        self.dropout = Dropout(dropout)
        self.reference = reference
        self.small_n = small_n
        self.track_stats = True  # off inside paused_stats(): generation, evaluation in training
        self.reset_stats()

    def reset_stats(self) -> None:
        self.stats = MoEStats.zeros(self.cfg.n_experts, self.cfg.top_k)

    def pop_stats(self) -> dict:
        """Expert statistics accumulated since the last call (plain Python numbers:
        `MoEStats.summary`, and the bias router's expert_bias).

        aux_loss and z_loss are means over training calls (evaluation skips the losses);
        loss_calls says how many there were (0: the losses read 0.0).
        """
        out = self.stats.summary()
        if self.cfg.router == "bias":
            out["expert_bias"] = self.router.expert_bias.tolist()
        self.reset_stats()
        return out

    @contextlib.contextmanager
    def paused_stats(self) -> Iterator[None]:
        """Nothing recorded inside (statistics cost per-token time in generation, and
        evaluation would mix into the training statistics); the held statistics are kept."""
        tracked = self.track_stats
        self.track_stats = False
        try:
            yield
        finally:
            self.track_stats = tracked

    def forward(self, x_BTD: torch.Tensor, real_BT: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """real_BT (bool, optional): the real tokens; pads (the padded layout) are routed but
        skip the experts (output 0) and are left out of the router losses, the bias router's
        load and the statistics."""
        shape = x_BTD.shape
        x_TD = x_BTD.reshape(-1, shape[-1])
        real_T = None if real_BT is None else real_BT.reshape(-1)
        r = self.router(x_TD, real_T)
        cap = self._capacity(x_TD, real_T)
        y_TD, kept_TK, counts_E = dispatch(x_TD, r, self.experts, cap, real_T, self.reference,
                                           self.small_n)
        aux = x_TD.new_zeros((), dtype=torch.float32)
        bal = z = None
        if self.training:  # evaluation skips the losses: they would only feed the statistics
            bal = load_balancing_loss(r.clean_probs_TE, r.experts_TK, real_T)
            z = router_z_loss(r.clean_logits_TE, real_T)
            aux = self.cfg.balance_coef * bal + self.cfg.z_loss_coef * z
        if self.track_stats:
            self._record(r, kept_TK, None if real_T is not None else counts_E, bal, z, real_T)
        y_BTD = y_TD.view(shape)
        return (self.dropout(y_BTD) if self.dropout.p > 0 else y_BTD), aux

    def _capacity(self, x_TD: torch.Tensor, real_T: torch.Tensor | None) -> int | None:
        """Per-expert capacity in training (of the real tokens: pads neither take slots nor
        enlarge them); None (dropless) in evaluation and generation, where a capacity from the
        call's tokens would make results depend on the batch and starve cached decoding."""
        if not self.training or self.cfg.capacity_factor <= 0:
            return None
        return capacity(self.cfg, x_TD.size(0) if real_T is None else int(real_T.sum()))

    def _record(self, r: Routing, kept_TK: torch.Tensor | None, counts_E: torch.Tensor | None,
                bal: torch.Tensor | None, z: torch.Tensor | None,
                real_T: torch.Tensor | None = None) -> None:
        if recomputing():
            return  # gradient checkpointing replays this forward: it was counted already
        # Tensors stay on the device; pop_stats syncs once per log interval.
        T, K = r.experts_TK.shape
        if counts_E is None:  # the kept slots of the real tokens, per expert
            counts_E = count_experts(r.experts_TK, self.cfg.n_experts, real_T, kept_TK)
        n_real = T if real_T is None else real_T.sum()
        dropped = None if kept_TK is None else n_real * K - counts_E.sum()
        entropy_T = torch.special.entr(r.clean_probs_TE.detach()).sum(-1)
        if real_T is not None:
            entropy_T = entropy_T * real_T
        self.stats.add(counts_E, n_real, entropy_T.sum(), dropped, bal, z)

