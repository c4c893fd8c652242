"""Mixture-of-Experts feed-forward: router, grouped experts, sorted dispatch, balancing losses.

Shape legend (tensor names end with their shape):
    T  tokens in the layer (batch and time flattened)     D  model width (n_embd)
    E  experts                                            H  expert hidden width
    K  experts chosen per token (top-k)                   N  kept (token, expert) assignments
Router maths (logits, softmax, top-k) runs in fp32 whatever the autocast dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slms.config import MoEConfig


@dataclass
class Routing:
    experts_TK: torch.Tensor  # int64 expert ids, best first
    weights_TK: torch.Tensor  # fp32 gate weights of the chosen experts
    logits_TE: torch.Tensor  # fp32 router logits (noise included when training noisy_topk)
    probs_TE: torch.Tensor  # fp32 softmax over all experts of logits_TE


def load_balancing_loss(probs_TE: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
    """Switch loss E * sum_e f_e * P_e: f_e share of the T*K routing slots, P_e mean probability.

    1.0 at perfect balance, E when every token goes to one expert with all its probability.
    """
    E = probs_TE.size(-1)
    f_E = torch.bincount(experts_TK.flatten(), minlength=E).to(probs_TE.dtype)
    f_E = f_E / experts_TK.numel()
    return E * (f_E * probs_TE.mean(0)).sum()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2 (ST-MoE): keeps router logits small."""
    return torch.logsumexp(logits_TE, dim=-1).pow(2).mean()


def capacity(cfg: MoEConfig, n_tokens: int) -> int | None:
    """Per-expert capacity floor(cf * K * T / E), or None when dropless."""
    if cfg.capacity_factor <= 0:
        return None
    return math.floor(cfg.capacity_factor * cfg.top_k * n_tokens / cfg.n_experts)


class Router(nn.Module):
    """`noisy_topk` (the seed's), `topk`, or `bias` (auxiliary-loss-free, DeepSeek-V3 style)."""

    def __init__(self, n_embd: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(n_embd, cfg.n_experts)
        self.noise = nn.Linear(n_embd, cfg.n_experts) if cfg.router == "noisy_topk" else None
        if cfg.router == "bias":
            self.register_buffer("expert_bias", torch.zeros(cfg.n_experts))
            self.register_buffer("load_E", torch.zeros(cfg.n_experts), persistent=False)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        with torch.autocast(x_TD.device.type, enabled=False):
            x_TD = x_TD.float()
            logits_TE = F.linear(x_TD, self.gate.weight.float(), self.gate.bias.float())
            if self.noise is not None and self.training:
                # The seed's noisy gate, but only in training: evaluation and generation are
                # deterministic.
                std_TE = F.softplus(F.linear(x_TD, self.noise.weight.float(),
                                             self.noise.bias.float()))
                logits_TE = logits_TE + torch.randn_like(logits_TE) * std_TE
            probs_TE = logits_TE.softmax(dim=-1)
            K = self.cfg.top_k
            if self.cfg.router == "bias":
                # The bias only chooses the experts; the weights stay the unbiased scores.
                experts_TK = (probs_TE + self.expert_bias).topk(K, dim=-1).indices
            else:
                experts_TK = logits_TE.topk(K, dim=-1).indices
            weights_TK = probs_TE.gather(-1, experts_TK)
            if self.cfg.renormalize:
                weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
            if self.cfg.router == "bias" and self.training:
                with torch.no_grad():
                    self.load_E += torch.bincount(experts_TK.flatten(),
                                                  minlength=self.cfg.n_experts)
        return Routing(experts_TK, weights_TK, logits_TE, probs_TE)

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


class Experts(nn.Module):
    """E feed-forward networks with stacked weights, so they can run as one grouped matmul."""

    def __init__(self, n_embd: int, hidden: int, n_experts: int, activation: str):
        super().__init__()
        self.w1_EDH = nn.Parameter(torch.empty(n_experts, n_embd, hidden))
        self.b1_EH = nn.Parameter(torch.zeros(n_experts, hidden))
        self.w2_EHD = nn.Parameter(torch.empty(n_experts, hidden, n_embd))
        self.b2_ED = nn.Parameter(torch.zeros(n_experts, n_embd))
        self.act = F.relu if activation == "relu" else F.gelu
        self.impl = "auto"  # auto | grouped_mm | slices (tests and benchmarks force one)
        nn.init.normal_(self.w1_EDH, std=0.02)
        nn.init.normal_(self.w2_EHD, std=0.02)

    def expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens: the reference every fast path is tested against."""
        h = self.act(x_ND @ self.w1_EDH[e] + self.b1_EH[e])
        return h @ self.w2_EHD[e] + self.b2_ED[e]

    def _use_grouped_mm(self, x_ND: torch.Tensor) -> bool:
        if self.impl != "auto":
            return self.impl == "grouped_mm"
        # Fast on Hopper in bf16; on CPU a loop over contiguous slices is faster (docs/benchmarks).
        return (hasattr(torch, "_grouped_mm") and x_ND.is_cuda
                and x_ND.dtype == torch.bfloat16
                and torch.cuda.get_device_capability(x_ND.device) >= (9, 0))

    def forward(self, x_ND: torch.Tensor, expert_N: torch.Tensor, counts_E: torch.Tensor
                ) -> torch.Tensor:
        """x_ND sorted by expert; expert_N its expert ids; counts_E rows per expert."""
        if self._use_grouped_mm(x_ND):
            offs = torch.cumsum(counts_E, 0).to(torch.int32)
            w1, w2 = self.w1_EDH.to(x_ND.dtype), self.w2_EHD.to(x_ND.dtype)
            h_NH = torch._grouped_mm(x_ND, w1, offs=offs) + self.b1_EH[expert_N].to(x_ND.dtype)
            h_NH = self.act(h_NH)
            return (torch._grouped_mm(h_NH, w2, offs=offs)
                    + self.b2_ED[expert_N].to(x_ND.dtype)).contiguous()
        # One host sync for the group sizes; then a matmul per non-empty expert on a contiguous
        # slice (no boolean masks, no per-token work).
        outs = []
        start = 0
        for e, n in enumerate(counts_E.tolist()):
            if n:
                xs = x_ND[start:start + n]
                h = self.act(torch.addmm(self.b1_EH[e], xs, self.w1_EDH[e]))
                outs.append(torch.addmm(self.b2_ED[e], h, self.w2_EHD[e]))
                start += n
        if not outs:
            return x_ND.new_zeros(0, self.w2_EHD.size(-1))
        return torch.cat(outs)


class MoE(nn.Module):
    """Router + experts + sorted dispatch. forward returns (y, weighted auxiliary loss)."""

    def __init__(self, n_embd: int, cfg: MoEConfig, hidden: int, activation: str,
                 dropout: float = 0.0):
        super().__init__()
        self.cfg = cfg
        self.router = Router(n_embd, cfg)
        self.experts = Experts(n_embd, hidden, cfg.n_experts, activation)
        self.dropout = nn.Dropout(dropout)
        self.reference = False  # True: the per-expert loop (tests)
        self.reset_stats()

    def reset_stats(self) -> None:
        E = self.cfg.n_experts
        self.stats = {"tokens_E": torch.zeros(E, dtype=torch.long), "tokens": 0, "dropped": 0,
                      "entropy_sum": 0.0, "aux_sum": 0.0, "z_sum": 0.0, "calls": 0}

    def pop_stats(self) -> dict:
        """Expert statistics accumulated since the last call (plain Python numbers)."""
        s = self.stats
        calls = max(s["calls"], 1)
        tokens_E = s["tokens_E"].tolist()
        total = max(sum(tokens_E), 1)
        mean = total / len(tokens_E)
        out = {
            "tokens_per_expert": tokens_E,
            "share": [n / total for n in tokens_E],
            "max_over_mean": max(tokens_E) / mean if sum(tokens_E) else 0.0,
            "entropy": float(s["entropy_sum"]) / calls,
            "dropped_share": int(s["dropped"]) / max(s["tokens"] * self.cfg.top_k, 1),
            "aux_loss": float(s["aux_sum"]) / calls,
            "z_loss": float(s["z_sum"]) / calls,
        }
        if self.cfg.router == "bias":
            out["expert_bias"] = self.router.expert_bias.tolist()
        self.reset_stats()
        return out

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x_BTD.shape
        x_TD = x_BTD.reshape(-1, shape[-1])
        r = self.router(x_TD)
        cap = capacity(self.cfg, x_TD.size(0))
        dispatch = reference_dispatch if self.reference else sorted_dispatch
        y_TD, kept_TK = dispatch(x_TD, r, self.experts, cap)
        aux = x_TD.new_zeros((), dtype=torch.float32)
        bal = z = None
        if self.training or self.cfg.aux_loss_coef or self.cfg.z_loss_coef:
            bal = load_balancing_loss(r.probs_TE, r.experts_TK)
            z = router_z_loss(r.logits_TE)
            if self.training:
                aux = self.cfg.aux_loss_coef * bal + self.cfg.z_loss_coef * z
        self._record(r, kept_TK, bal, z)
        return self.dropout(y_TD.view(shape)), aux

    @torch.no_grad()
    def _record(self, r: Routing, kept_TK: torch.Tensor | None, bal: torch.Tensor | None,
                z: torch.Tensor | None) -> None:
        # Tensors stay on the device; pop_stats syncs once per log interval.
        s = self.stats
        chosen = r.experts_TK if kept_TK is None else r.experts_TK[kept_TK]
        s["tokens_E"] = s["tokens_E"].to(chosen.device) + torch.bincount(
            chosen.flatten(), minlength=self.cfg.n_experts)
        s["tokens"] += r.experts_TK.size(0)
        if kept_TK is not None:
            s["dropped"] = s["dropped"] + (~kept_TK).sum()
        p = r.probs_TE
        s["entropy_sum"] = s["entropy_sum"] + (-(p * p.clamp_min(1e-20).log()).sum(-1)).mean()
        if bal is not None:
            s["aux_sum"] = s["aux_sum"] + bal.detach()
            s["z_sum"] = s["z_sum"] + z.detach()
        s["calls"] += 1


def sorted_dispatch(x_TD: torch.Tensor, r: Routing, experts: Experts, cap: int | None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sort the T*K assignments by expert, run the experts on contiguous groups, scatter back.

    Returns (y_TD, kept_TK): kept_TK is None when dropless, else which assignments fit the
    capacity (earlier tokens win; dropped ones contribute nothing, the residual carries them).
    """
    T, K = r.experts_TK.shape
    E = experts.w1_EDH.size(0)
    flat_e = r.experts_TK.reshape(-1)
    order_N = torch.argsort(flat_e, stable=True)
    counts_E = torch.bincount(flat_e, minlength=E)
    kept_TK = None
    if cap is not None:
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        rank_N = torch.arange(T * K, device=flat_e.device) - starts_E[flat_e[order_N]]
        keep_N = rank_N < cap
        kept = torch.zeros(T * K, dtype=torch.bool, device=flat_e.device)
        kept[order_N[keep_N]] = True
        kept_TK = kept.view(T, K)
        order_N = order_N[keep_N]
        counts_E = counts_E.clamp(max=cap)
    token_N = order_N // K
    h_ND = experts(x_TD[token_N], flat_e[order_N], counts_E)
    w_N = r.weights_TK.reshape(-1)[order_N]
    y_TD = torch.zeros_like(x_TD)
    y_TD.index_add_(0, token_N, (h_ND * w_N[:, None]).to(x_TD.dtype))
    return y_TD, kept_TK


def reference_dispatch(x_TD: torch.Tensor, r: Routing, experts: Experts, cap: int | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The plain per-expert loop; same capacity rule (first `cap` assignments in token order)."""
    T, K = r.experts_TK.shape
    y_TD = torch.zeros_like(x_TD)
    kept_TK = None if cap is None else torch.zeros(T, K, dtype=torch.bool, device=x_TD.device)
    for e in range(experts.w1_EDH.size(0)):
        tok, slot = (r.experts_TK == e).nonzero(as_tuple=True)
        if cap is not None:
            tok, slot = tok[:cap], slot[:cap]
            kept_TK[tok, slot] = True
        if len(tok):
            out = experts.expert(e, x_TD[tok]) * r.weights_TK[tok, slot, None]
            y_TD = y_TD.index_add(0, tok, out.to(x_TD.dtype))
    return y_TD, kept_TK
