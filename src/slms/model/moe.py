"""Mixture-of-Experts feed-forward: router, grouped experts, sorted dispatch, balancing losses.

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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slms.config import MoEConfig
from slms.model import native
from slms.model.moe_kernels import Dispatch, SlicedMoE, combine, experts_forward


@dataclass
class Routing:
    experts_TK: torch.Tensor  # int64 expert ids, best first
    weights_TK: torch.Tensor  # fp32 gate weights of the chosen experts
    logits_TE: torch.Tensor  # fp32 router logits (noise included when training noisy_topk)
    probs: torch.Tensor | None = None  # probs_TE when already computed
    clean: torch.Tensor | None = None  # the logits before noise; None: logits_TE has none
    clean_probs: torch.Tensor | None = None  # clean_probs_TE when already computed

    @property
    def probs_TE(self) -> torch.Tensor:
        """fp32 softmax over all experts of logits_TE, computed when first asked for (decoding
        with renormalised top-k weights and no statistics never needs it)."""
        if self.probs is None:
            self.probs = self.logits_TE.softmax(dim=-1)
        return self.probs

    @property
    def clean_logits_TE(self) -> torch.Tensor:
        """The router's logits without the training noise: what the router losses and the
        statistics see (the noise only chooses experts; a loss on it would push it down)."""
        return self.logits_TE if self.clean is None else self.clean

    @property
    def clean_probs_TE(self) -> torch.Tensor:
        if self.clean is None:
            return self.probs_TE
        if self.clean_probs is None:
            self.clean_probs = self.clean.softmax(dim=-1)
        return self.clean_probs


SMALL_N = 64  # at most this many (token, expert) assignments: the decoding combine


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's matmuls run in: autocast's where it is on for x's device (an fp32 residual
    stream under bf16 autocast computes in bf16), else x's own."""
    dev = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def grouped_mm_pays(device: torch.device, dtype: torch.dtype,
                    capability: tuple[int, int] | None) -> bool:
    """Whether the experts run as torch._grouped_mm: on Hopper+ GPUs (capability >= 9.0) in
    bf16, where it is the fast path; on CPU a loop over contiguous slices is faster
    (docs/benchmarks.md)."""
    return (hasattr(torch, "_grouped_mm") and device.type == "cuda" and dtype == torch.bfloat16
            and capability is not None and capability >= (9, 0))


def recomputing() -> bool:
    """True while autograd runs a backward pass, i.e. when gradient checkpointing replays a
    forward: statistics must not count those tokens twice."""
    return torch._C._current_graph_task_id() != -1


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


def count_experts(experts_TK: torch.Tensor, E: int, real_T: torch.Tensor | None = None,
                  kept_TK: torch.Tensor | None = None) -> torch.Tensor:
    """Routing slots per expert (int64): only the tokens in real_T and the slots in kept_TK
    count when given (a weighted bincount: no host sync)."""
    if real_T is None and kept_TK is None:
        return torch.bincount(experts_TK.flatten(), minlength=E)
    w_TK = torch.ones(experts_TK.shape, device=experts_TK.device)
    if real_T is not None:
        w_TK = w_TK * real_T[:, None]
    if kept_TK is not None:
        w_TK = w_TK * kept_TK
    return torch.bincount(experts_TK.flatten(), weights=w_TK.flatten(), minlength=E).round().long()


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

    def forward(self, x_TD: torch.Tensor, real_T: torch.Tensor | None = None) -> Routing:
        """real_T (bool): the tokens whose load the bias router balances (pads are routed but
        not counted)."""
        # Entering autocast(enabled=False) costs microseconds that matter when decoding.
        off = torch.is_autocast_enabled(x_TD.device.type)
        with torch.autocast(x_TD.device.type, enabled=False) if off else contextlib.nullcontext():
            return self._route(x_TD.float(), real_T)

    def _route(self, x_TD: torch.Tensor, real_T: torch.Tensor | None) -> Routing:
        logits_TE = F.linear(x_TD, self.gate.weight.float(), self.gate.bias.float())
        clean_TE = None
        if self.noise is not None and self.training:
            # The seed's noisy gate, but only in training: evaluation and generation are
            # deterministic.
            std_TE = F.softplus(F.linear(x_TD, self.noise.weight.float(), self.noise.bias.float()))
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


class Experts(nn.Module):
    """E feed-forward networks with stacked weights, so they can run as one grouped matmul."""

    def __init__(self, n_embd: int, hidden: int, n_experts: int, activation: str):
        super().__init__()
        self.w1_EDH = nn.Parameter(torch.empty(n_experts, n_embd, hidden))
        self.b1_EH = nn.Parameter(torch.zeros(n_experts, hidden))
        self.w2_EHD = nn.Parameter(torch.empty(n_experts, hidden, n_embd))
        self.b2_ED = nn.Parameter(torch.zeros(n_experts, n_embd))
        self.gelu = activation != "relu"
        self.act = F.gelu if self.gelu else F.relu
        self.impl = "auto"  # auto | grouped_mm | slices (tests and benchmarks force one)
        nn.init.normal_(self.w1_EDH, std=0.02)
        nn.init.normal_(self.w2_EHD, std=0.02)

    def expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens: the reference every fast path is tested against."""
        h = self.act(x_ND @ self.w1_EDH[e] + self.b1_EH[e])
        return h @ self.w2_EHD[e] + self.b2_ED[e]

    def one_token(self, x_1D: torch.Tensor, experts: list[int]) -> torch.Tensor:
        """The experts `experts` on one token, no autograd: (K, D), in the order given."""
        w1, b1, w2, b2 = self.w1_EDH, self.b1_EH, self.w2_EHD, self.b2_ED
        return torch.cat([torch.addmm(b2[e], self.act(torch.addmm(b1[e], x_1D, w1[e])), w2[e])
                          for e in experts])

    def can_decode(self, x_TD: torch.Tensor) -> bool:
        """Whether `decode` may run: fp32 on CPU outside autocast, with the C++ kernels."""
        return (self.impl == "auto" and x_TD.device.type == "cpu"
                and x_TD.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
                and self.w1_EDH.dtype == self.b1_EH.dtype == self.w2_EHD.dtype
                == self.b2_ED.dtype == torch.float32
                and native.ops() is not None)

    def decode(self, x_TD: torch.Tensor, r: Routing) -> torch.Tensor:
        """y_TD for a few tokens without autograd (decoding), by the C++ kernel: each chosen
        expert's weights are read once for all its tokens, split across the CPU threads."""
        w1, b1, w2, b2 = (p.contiguous() for p in (self.w1_EDH, self.b1_EH, self.w2_EHD,
                                                   self.b2_ED))
        return native.ops().experts_decode(x_TD.contiguous(), r.experts_TK,
                                           r.weights_TK.float().contiguous(), w1, b1, w2, b2,
                                           self.gelu)

    def _use_grouped_mm(self, x_ND: torch.Tensor) -> bool:
        if self.impl != "auto":
            return self.impl == "grouped_mm"
        capability = torch.cuda.get_device_capability(x_ND.device) if x_ND.is_cuda else None
        return grouped_mm_pays(x_ND.device, compute_dtype(x_ND), capability)

    def forward(self, x_TD: torch.Tensor, w_TK: torch.Tensor, order_N: torch.Tensor,
                pos_S: torch.Tensor, counts_E: torch.Tensor, dropped: bool = False
                ) -> torch.Tensor:
        """y_TD: for each token, its kept experts' outputs weighted by w_TK and summed.

        order_N: the kept (token, slot) assignments as slot ids t*K + k, sorted by expert
        (counts_E per expert); pos_S: the inverse, each slot's row in that order (N where
        `dropped`, and w_TK is 0 there).
        """
        K = w_TK.size(1)
        if self._use_grouped_mm(x_TD):
            with self._manual_autocast(x_TD) as dt:  # training's autocast: the bf16 path
                token_N = order_N // K
                x_TD = x_TD.to(dt)
                x_ND = (Dispatch.apply(x_TD, token_N, pos_S, dropped, K)
                        if torch.is_grad_enabled() and x_TD.requires_grad
                        else x_TD.index_select(0, token_N))
                h_ND = self._grouped(x_ND, counts_E)
                # as Mixtral: gate weights in the activations' dtype
                return combine(h_ND, pos_S, w_TK.to(h_ND.dtype), dropped)
        # One host sync for the group sizes; then a matmul per non-empty expert on its rows
        # (no boolean masks, no per-token work).
        counts = counts_E.tolist()
        with self._manual_autocast(x_TD) as dt:
            return self._sliced(x_TD.to(dt), w_TK.to(dt), order_N, pos_S, counts, dropped)

    def rows(self, x_TD: torch.Tensor, token_N: torch.Tensor, counts_E: torch.Tensor
             ) -> torch.Tensor:
        """y_ND, no autograd: each expert on its rows x_TD[token_N] (grouped, counts_E each)."""
        if self._use_grouped_mm(x_TD):
            with self._manual_autocast(x_TD) as dt:
                return self._grouped(x_TD.to(dt).index_select(0, token_N), counts_E)
        with self._manual_autocast(x_TD) as dt:
            return experts_forward(x_TD.to(dt), token_N, *self._params(dt), counts_E.tolist(),
                                   self.gelu)[1]

    @contextlib.contextmanager
    def _manual_autocast(self, x_TD: torch.Tensor) -> Iterator[torch.dtype]:
        """The dtype to compute in, with autocast off: addmm(out=) has no autocast rule, so the
        sliced experts cast by hand to the dtype autocast would use."""
        dev = x_TD.device.type
        if not torch.is_autocast_enabled(dev):  # entering autocast costs microseconds
            yield x_TD.dtype
            return
        with torch.autocast(dev, enabled=False):
            yield torch.get_autocast_dtype(dev)

    def _params(self, dt: torch.dtype) -> list[torch.Tensor]:
        params = [self.w1_EDH, self.b1_EH, self.w2_EHD, self.b2_ED]
        return params if self.w1_EDH.dtype == dt else [p.to(dt) for p in params]

    def _grouped(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        x_ND = x_ND.contiguous()
        expert_N = torch.repeat_interleave(torch.arange(counts_E.numel(), device=x_ND.device),
                                           counts_E, output_size=x_ND.size(0))
        offs = torch.cumsum(counts_E, 0).to(torch.int32)
        w1, w2 = self.w1_EDH.to(x_ND.dtype), self.w2_EHD.to(x_ND.dtype)
        h_NH = torch._grouped_mm(x_ND, w1, offs=offs) + self.b1_EH[expert_N].to(x_ND.dtype)
        h_NH = self.act(h_NH)
        return (torch._grouped_mm(h_NH, w2, offs=offs)
                + self.b2_ED[expert_N].to(x_ND.dtype)).contiguous()

    def _sliced(self, x_TD: torch.Tensor, w_TK: torch.Tensor, order_N: torch.Tensor,
                pos_S: torch.Tensor, counts: list[int], dropped: bool) -> torch.Tensor:
        params = self._params(x_TD.dtype)
        if torch.is_grad_enabled() and (x_TD.requires_grad or w_TK.requires_grad
                                        or params[0].requires_grad):
            return SlicedMoE.apply(x_TD, w_TK, *params, order_N, pos_S, counts, dropped,
                                   self.gelu)
        token_N = order_N // w_TK.size(1)
        y_ND = experts_forward(x_TD, token_N, *params, counts, self.gelu)[1]
        return combine(y_ND, pos_S, w_TK, dropped)


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
        self.track_stats = True  # generation turns this off: statistics cost per-token time
        self.reset_stats()

    def reset_stats(self) -> None:
        E = self.cfg.n_experts
        self.stats = {"tokens_E": torch.zeros(E, dtype=torch.long), "tokens": 0, "dropped": 0,
                      "entropy_token_sum": 0.0, "aux_sum": 0.0, "z_sum": 0.0, "calls": 0,
                      "loss_calls": 0}

    def pop_stats(self) -> dict:
        """Expert statistics accumulated since the last call (plain Python numbers).

        aux_loss and z_loss are means over training calls (evaluation skips the losses);
        loss_calls says how many there were (0: the losses read 0.0).
        """
        s = self.stats
        tokens_E = s["tokens_E"].tolist()
        total = max(sum(tokens_E), 1)
        mean = total / len(tokens_E)
        loss_calls = max(s.get("loss_calls", s["calls"]), 1)
        out = {
            "tokens_per_expert": tokens_E,
            "share": [n / total for n in tokens_E],
            "max_over_mean": max(tokens_E) / mean if sum(tokens_E) else 0.0,
            "entropy": float(s.get("entropy_token_sum", 0.0)) / max(int(s["tokens"]), 1),
            "dropped_share": int(s["dropped"]) / max(int(s["tokens"]) * self.cfg.top_k, 1),
            "aux_loss": float(s["aux_sum"]) / loss_calls,
            "z_loss": float(s["z_sum"]) / loss_calls,
            "loss_calls": s.get("loss_calls", s["calls"]),
        }
        if self.cfg.router == "bias":
            out["expert_bias"] = self.router.expert_bias.tolist()
        self.reset_stats()
        return out

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
        counts_E = None
        if self.reference:
            y_TD, kept_TK = reference_dispatch(x_TD, r, self.experts, cap, real_T)
        else:
            y_TD, kept_TK, counts_E = _dispatch(x_TD, r, self.experts, cap, real_T)
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
        # Tensors stay on the device; pop_stats syncs once per log interval. A new dict each
        # call, so that a caller holding the old one (the trainer around evaluation) keeps it.
        s = dict(self.stats)
        T, K = r.experts_TK.shape
        if counts_E is None:  # the kept slots of the real tokens, per expert
            counts_E = count_experts(r.experts_TK, self.cfg.n_experts, real_T, kept_TK)
        n_real = T if real_T is None else real_T.sum()
        s["tokens_E"] = s["tokens_E"].to(counts_E.device) + counts_E
        s["tokens"] = s["tokens"] + n_real
        if kept_TK is not None:
            s["dropped"] = s["dropped"] + (n_real * K - counts_E.sum())
        entropy_T = torch.special.entr(r.clean_probs_TE.detach()).sum(-1)
        if real_T is not None:
            entropy_T = entropy_T * real_T
        s["entropy_token_sum"] = s.get("entropy_token_sum", 0.0) + entropy_T.sum()
        if bal is not None:
            s["aux_sum"] = s["aux_sum"] + bal.detach()
            s["z_sum"] = s["z_sum"] + z.detach()
            s["loss_calls"] = s.get("loss_calls", 0) + 1
        s["calls"] += 1
        self.stats = s


def sorted_dispatch(x_TD: torch.Tensor, r: Routing, experts: Experts, cap: int | None,
                    real_T: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sort the T*K assignments by expert, run the experts on contiguous groups, scatter back.

    Returns (y_TD, kept_TK): kept_TK is None when every assignment ran, else which did: those
    of real tokens (real_T; all when None) that fit the capacity (choice-major priority, as in
    GShard and Switch: every token's first choice before any second choice; within a choice,
    earlier tokens first). Dropped
    ones contribute nothing; the residual carries their tokens.
    """
    y_TD, kept_TK, _ = _dispatch(x_TD, r, experts, cap, real_T)
    return y_TD, kept_TK


def _dispatch(x_TD: torch.Tensor, r: Routing, experts: Experts, cap: int | None,
              real_T: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """sorted_dispatch, also returning the kept assignments per expert (counts_E)."""
    T, K = r.experts_TK.shape
    E = experts.w1_EDH.size(0)
    few = cap is None and T * K <= SMALL_N and not torch.is_grad_enabled()
    if few and real_T is None and experts.can_decode(x_TD):
        # Decoding on CPU: the C++ kernel; no sort, no gathers.
        return experts.decode(x_TD, r), None, None
    if T == 1 and few and not experts._use_grouped_mm(x_TD):
        # Batch-1 decoding otherwise: the token's K experts one after another.
        h_KD = experts.one_token(x_TD, r.experts_TK[0].tolist())
        y_1D = torch.mm(r.weights_TK.to(h_KD.dtype), h_KD).to(x_TD.dtype)
        return y_1D, None, None
    flat_e = r.experts_TK.reshape(-1)
    real_S = None if real_T is None else real_T.repeat_interleave(K)
    order_N = _expert_order(flat_e, real_S, T, K, choice_major=cap is not None)
    counts_E = torch.bincount(flat_e, minlength=E)
    if cap is None and real_S is None and T * K <= SMALL_N and not torch.is_grad_enabled():
        return _combine_small(x_TD, r, experts, order_N, counts_E), None, counts_E
    kept_TK = None
    if cap is not None or real_S is not None:
        # Dropped: assignments past an expert's capacity, and every pad's (no real token
        # attends to a pad: its output would only serve pad predictions, which are not scored).
        keep_N = torch.ones(T * K, dtype=torch.bool, device=flat_e.device)
        if cap is not None:
            starts_E = torch.cumsum(counts_E, 0) - counts_E
            rank_N = torch.arange(T * K, device=flat_e.device) - starts_E[flat_e[order_N]]
            keep_N = rank_N < cap
        if real_S is not None:
            keep_N = keep_N & real_S[order_N]
        kept = torch.zeros(T * K, dtype=torch.bool, device=flat_e.device)
        kept[order_N[keep_N]] = True
        kept_TK = kept.view(T, K)
        order_N = order_N[keep_N]
        counts_E = count_experts(r.experts_TK, E, kept_TK=kept_TK)
    N = order_N.numel()
    dropped = N < T * K
    # pos_S: where each of the T*K slots (token-major) sits in expert order; N = dropped.
    pos_S = order_N.new_full((T * K,), N) if dropped else torch.empty_like(order_N)
    pos_S.scatter_(0, order_N, torch.arange(N, device=order_N.device))
    w_TK = r.weights_TK
    if dropped:
        if N == 0:
            return torch.zeros_like(x_TD), kept_TK, counts_E
        w_TK = w_TK * kept_TK  # a dropped slot contributes nothing
    y_TD = experts(x_TD, w_TK, order_N, pos_S, counts_E, dropped)
    return y_TD.to(x_TD.dtype), kept_TK, counts_E


def _expert_order(flat_e: torch.Tensor, real_S: torch.Tensor | None, T: int, K: int,
                  choice_major: bool) -> torch.Tensor:
    """order_N: the T*K slot ids (t*K + k) sorted by expert. Pads sort after each expert's real
    assignments, so that capacity ranks real ones only; with `choice_major` (capacity), an
    expert's slots are ranked by choice k, then token t."""
    key_S = flat_e if real_S is None else flat_e * 2 + (~real_S)
    if not choice_major:  # dropless: any order within an expert; token-major reads x in order
        return torch.argsort(key_S, stable=True)
    slot_S = torch.arange(T * K, device=flat_e.device)
    choice_then_token_S = (slot_S % K) * T + slot_S // K
    return torch.argsort(key_S * (T * K) + choice_then_token_S)


def _combine_small(x_TD: torch.Tensor, r: Routing, experts: Experts, order_N: torch.Tensor,
                   counts_E: torch.Tensor) -> torch.Tensor:
    """Few assignments, no autograd (decoding): gate-weight and sum the outputs with one (T, N)
    matmul.

    Fewer small ops than building the inverse permutation, and no scatter-add.
    """
    T, K = r.experts_TK.shape
    w_N = r.weights_TK.reshape(-1).index_select(0, order_N)
    token_N = order_N // K if K > 1 else order_N
    h_ND = experts.rows(x_TD, token_N, counts_E)
    # combine_TN[t, n] = gate weight of assignment n if it belongs to token t, else 0
    combine_TN = h_ND.new_zeros(T, w_N.numel()).scatter_(0, token_N[None],
                                                         w_N[None].to(h_ND.dtype))
    return torch.mm(combine_TN, h_ND).to(x_TD.dtype)


def reference_dispatch(x_TD: torch.Tensor, r: Routing, experts: Experts, cap: int | None,
                       real_T: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The plain per-expert loop; same rules (real tokens only, the first `cap` assignments
    in choice-major order: first choices, then second choices, each in token order)."""
    T, K = r.experts_TK.shape
    y_TD = torch.zeros_like(x_TD)
    kept_TK = (None if cap is None and real_T is None
               else torch.zeros(T, K, dtype=torch.bool, device=x_TD.device))
    for e in range(experts.w1_EDH.size(0)):
        chosen_TK = r.experts_TK == e
        if real_T is not None:
            chosen_TK = chosen_TK & real_T[:, None]
        slot, tok = chosen_TK.t().nonzero(as_tuple=True)  # choice-major
        if cap is not None:
            tok, slot = tok[:cap], slot[:cap]
        if kept_TK is not None:
            kept_TK[tok, slot] = True
        if len(tok):
            out = experts.expert(e, x_TD[tok]) * r.weights_TK[tok, slot, None]
            y_TD = y_TD.index_add(0, tok, out.to(x_TD.dtype))
    return y_TD, kept_TK
