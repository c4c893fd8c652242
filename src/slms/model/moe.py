"""Mixture-of-Experts feed-forward: router, grouped experts, sorted dispatch, balancing losses.

Shape legend (tensor names end with their shape):
    T  tokens in the layer (batch and time flattened)     D  model width (n_embd)
    E  experts                                            H  expert hidden width
    K  experts chosen per token (top-k)                   N  kept (token, expert) assignments
Router maths (logits, softmax, top-k) runs in fp32 whatever the autocast dtype.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from slms.config import MoEConfig
from slms.model import native, tune
from slms.model.activations import activate, ffn_hidden, first_width
from slms.model.moe_decode import native_decode, one_token, small_combine
from slms.model.moe_kernels import (
    NATIVE_ACTIVATIONS,
    Dispatch,
    SlicedMoE,
    combine,
    experts_forward,
)
from slms.model.moe_stats import MoEStats


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


class DispatchPath(enum.Enum):
    """The ways the MoE layer runs: `choose_path` picks one, `PATHS` runs it."""

    DECODE = "decode"  # the C++ decode kernel (moe_decode.native_decode)
    ONE_TOKEN = "one_token"  # one token's K experts one after another (moe_decode.one_token)
    SMALL_COMBINE = "small_combine"  # few assignments, rows by slices, one (T, N) matmul
    SMALL_COMBINE_GROUPED = "small_combine_grouped"  # the same, rows by torch._grouped_mm
    GROUPED_MM = "grouped_mm"  # sorted by expert, torch._grouped_mm, combine
    NATIVE_AUTOGRAD = "native_autograd"  # sorted, SlicedMoE with the C++ expert loop
    NATIVE = "native"  # sorted, the C++ expert loop + combine, no autograd
    SLICED_AUTOGRAD = "sliced_autograd"  # sorted, SlicedMoE with the Python expert loop
    SLICED = "sliced"  # sorted, the Python expert loop + combine, no autograd
    REFERENCE = "reference"  # the per-expert loop (reference_dispatch)


# How the experts run: the C++ kernels (decode kernel, expert loop), the plain torch loop, or
# torch._grouped_mm. Experts.impl forces one; "auto" takes the fastest (slms.model.tune).
KERNELS = ("native", tune.PLAIN, "grouped_mm")


class Situation(NamedTuple):
    """What decides how the MoE layer runs (`describe` measures it; a NamedTuple: decoding
    builds one per layer per step)."""

    device: str  # device type: "cpu", "cuda", ...
    dtype: torch.dtype  # the compute dtype (`compute_dtype`: autocast's where it is on)
    capability: tuple[int, int] | None  # CUDA compute capability; None elsewhere
    grad_mode: bool  # torch.is_grad_enabled()
    needs_grad: bool  # grad mode and x, the gate weights or the experts require grad
    kernels: bool  # the C++ kernels are built and know the activation (CPU)
    tokens: int  # T
    assignments: int  # T * K
    capacity: bool  # a per-expert capacity may drop assignments
    pads: bool  # real_T given: pads are routed but skip the experts
    impl: str = "auto"  # Experts.impl: auto, or one of KERNELS
    reference: bool = False  # MoE.reference: the per-expert loop
    measured: str | None = None  # the kernel slms.model.tune timed fastest for this shape


def decoding(s: Situation) -> bool:
    """The decode paths' situation: no grad mode, at most SMALL_N assignments, and neither
    capacity nor pads (they keep every assignment)."""
    return not s.grad_mode and s.assignments <= SMALL_N and not (s.capacity or s.pads)


def candidates(s: Situation) -> tuple[str, ...]:
    """The kernels that can run in `s`, the plain torch loop first. The C++ decode kernel
    needs fp32; the C++ expert loop takes any dtype; torch._grouped_mm runs on CPU (fp32,
    bf16) and on Hopper+ GPUs in bf16."""
    out = [tune.PLAIN]
    if s.kernels and (not decoding(s) or s.dtype == torch.float32):
        out.append("native")
    if hasattr(torch, "_grouped_mm") and (
            (s.device == "cpu" and s.dtype in (torch.float32, torch.bfloat16))
            or grouped_mm_pays(torch.device(s.device), s.dtype, s.capability)):
        out.append("grouped_mm")
    return tuple(out)


def kernel(s: Situation) -> str:
    """The kernel to run: as forced by `impl` (the plain loop where the forced one cannot
    run), else the measured fastest, else the rule: the C++ kernels where they run,
    torch._grouped_mm where it pays, the plain loop elsewhere."""
    can = candidates(s)
    if s.impl != "auto":
        return s.impl if s.impl in can else tune.PLAIN
    if s.measured in can:
        return s.measured
    if "native" in can:
        return "native"
    if "grouped_mm" in can and grouped_mm_pays(torch.device(s.device), s.dtype, s.capability):
        return "grouped_mm"
    return tune.PLAIN


def choose_path(s: Situation) -> DispatchPath:
    """The one place that decides how the MoE layer runs (pure; reads SMALL_N when called):
    the decode paths where `decoding(s)`, the sorted paths elsewhere, each by `kernel(s)`."""
    if s.reference:
        return DispatchPath.REFERENCE
    k = kernel(s)
    if decoding(s):
        if k == "native":
            return DispatchPath.DECODE
        if k == "grouped_mm":
            return DispatchPath.SMALL_COMBINE_GROUPED
        return DispatchPath.ONE_TOKEN if s.tokens == 1 else DispatchPath.SMALL_COMBINE
    if k == "grouped_mm":
        return DispatchPath.GROUPED_MM
    if k == "native":
        return DispatchPath.NATIVE_AUTOGRAD if s.needs_grad else DispatchPath.NATIVE
    return DispatchPath.SLICED_AUTOGRAD if s.needs_grad else DispatchPath.SLICED


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


class Experts(nn.Module):
    """E feed-forward networks with stacked weights, so they can run as one grouped matmul.

    No forward: `choose_path` picks how they run and `PATHS` calls `decode`, `grouped`,
    `sliced`, `rows` (moe_decode) or `expert` (the reference loop).
    """

    def __init__(self, n_embd: int, hidden: int, n_experts: int, activation: str):
        super().__init__()
        hidden = ffn_hidden(activation, hidden)
        first = first_width(activation, hidden)  # SwiGLU: gate and up side by side
        self.w1_EDH = nn.Parameter(torch.empty(n_experts, n_embd, first))
        self.b1_EH = nn.Parameter(torch.zeros(n_experts, first))
        self.w2_EHD = nn.Parameter(torch.empty(n_experts, hidden, n_embd))
        self.b2_ED = nn.Parameter(torch.zeros(n_experts, n_embd))
        self.activation = activation
        self.impl = "auto"  # auto: the fastest measured; or one of KERNELS (tests, benchmarks)
        nn.init.normal_(self.w1_EDH, std=0.02)
        nn.init.normal_(self.w2_EHD, std=0.02)

    def expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens: the reference every fast path is tested against."""
        h = activate(self.activation, x_ND @ self.w1_EDH[e] + self.b1_EH[e])
        return h @ self.w2_EHD[e] + self.b2_ED[e]

    def decode(self, x_TD: torch.Tensor, r: Routing) -> torch.Tensor:
        """y_TD for a few tokens without autograd, by the C++ decode kernel
        (`moe_decode.native_decode`; the DECODE path runs it through here)."""
        return native_decode(x_TD, r, self)

    def grouped(self, x_TD: torch.Tensor, w_TK: torch.Tensor, order_N: torch.Tensor,
                pos_S: torch.Tensor, counts_E: torch.Tensor, dropped: bool) -> torch.Tensor:
        """y_TD by torch._grouped_mm: for each token, its kept experts' outputs weighted by
        w_TK and summed.

        order_N: the kept (token, slot) assignments as slot ids t*K + k, sorted by expert
        (counts_E per expert); pos_S: the inverse, each slot's row in that order (N where
        `dropped`, and w_TK is 0 there).
        """
        K = w_TK.size(1)
        with self._manual_autocast(x_TD) as dt:  # training's autocast: the bf16 path
            token_N = order_N // K
            x_TD = x_TD.to(dt)
            x_ND = (Dispatch.apply(x_TD, token_N, pos_S, dropped, K)
                    if torch.is_grad_enabled() and x_TD.requires_grad
                    else x_TD.index_select(0, token_N))
            h_ND = self._grouped(x_ND, counts_E)
            # as Mixtral: gate weights in the activations' dtype
            return combine(h_ND, pos_S, w_TK.to(h_ND.dtype), dropped)

    def sliced(self, x_TD: torch.Tensor, w_TK: torch.Tensor, order_N: torch.Tensor,
               pos_S: torch.Tensor, counts_E: torch.Tensor, dropped: bool, autograd: bool,
               native_loop: bool) -> torch.Tensor:
        """y_TD as `grouped` (same arguments) by a matmul per non-empty expert on its rows, in
        C++ with `native_loop`: with `autograd`, as one SlicedMoE (hand-written backward);
        else experts_forward and combine, no autograd graph."""
        # One host sync for the group sizes; no boolean masks, no per-token work.
        counts = counts_E.tolist()
        with self._manual_autocast(x_TD) as dt:
            x_TD, w_TK, params = x_TD.to(dt), w_TK.to(dt), self._params(dt)
            if autograd:
                return SlicedMoE.apply(x_TD, w_TK, *params, order_N, pos_S, counts, dropped,
                                       self.activation, native_loop)
            y_ND = experts_forward(x_TD, order_N // w_TK.size(1), *params, counts,
                                   self.activation, native_loop)[1]
            return combine(y_ND, pos_S, w_TK, dropped)

    def rows(self, x_TD: torch.Tensor, token_N: torch.Tensor, counts_E: torch.Tensor,
             grouped: bool) -> torch.Tensor:
        """y_ND, no autograd: each expert on its rows x_TD[token_N] (sorted by expert, counts_E
        each), by torch._grouped_mm when `grouped`, else by slices in Python."""
        with self._manual_autocast(x_TD) as dt:
            if grouped:
                return self._grouped(x_TD.to(dt).index_select(0, token_N), counts_E)
            return experts_forward(x_TD.to(dt), token_N, *self._params(dt), counts_E.tolist(),
                                   self.activation, native_loop=False)[1]

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
        h_NH = activate(self.activation, h_NH)
        return (torch._grouped_mm(h_NH, w2, offs=offs)
                + self.b2_ED[expert_N].to(x_ND.dtype)).contiguous()


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
        y_TD, kept_TK, counts_E = _dispatch(x_TD, r, self.experts, cap, real_T, self.reference)
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


Dispatched = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
Runner = Callable[[torch.Tensor, Routing, Experts, int | None, torch.Tensor | None], Dispatched]


def _dispatch(x_TD: torch.Tensor, r: Routing, experts: Experts, cap: int | None,
              real_T: torch.Tensor | None = None, reference: bool = False) -> Dispatched:
    """(y_TD, kept_TK, counts_E) as sorted_dispatch (the per-expert loop with `reference`),
    by the path `choose_path` picks from `describe` and `PATHS` runs. counts_E, the kept
    assignments per expert, is None where a path does not count them (DECODE, ONE_TOKEN,
    REFERENCE)."""
    path = choose_path(describe(x_TD, r, experts, cap, real_T, reference))
    return PATHS[path](x_TD, r, experts, cap, real_T)


def describe(x_TD: torch.Tensor, r: Routing, experts: Experts, cap: int | None,
             real_T: torch.Tensor | None = None, reference: bool = False) -> Situation:
    """The situation of one call of the layer, for `choose_path`, with the kernel measured
    fastest for its shapes (a few microseconds once measured: it runs per layer per decoding
    step)."""
    dev = x_TD.device.type
    autocast = torch.is_autocast_enabled(dev)
    dtype = (torch.get_autocast_dtype(dev) if autocast and x_TD.dtype == torch.float32
             else x_TD.dtype)  # compute_dtype(x_TD), reusing `autocast`
    grad_mode = torch.is_grad_enabled()
    needs_grad = grad_mode and (x_TD.requires_grad or r.weights_TK.requires_grad
                                or experts.w1_EDH.requires_grad)
    # native.ops() only on CPU: a GPU run must not build the CPU kernels
    kernels = (dev == "cpu" and experts.activation in NATIVE_ACTIVATIONS
               and native.ops() is not None)
    capability = torch.cuda.get_device_capability(x_TD.device) if x_TD.is_cuda else None
    T, K = r.experts_TK.shape
    s = Situation(dev, dtype, capability, grad_mode, needs_grad, kernels, T, T * K,
                  cap is not None, real_T is not None, experts.impl, reference)
    if s.impl == "auto" and not reference and tune.enabled() and len(candidates(s)) > 1:
        s = s._replace(measured=_measured(s, experts, x_TD))
    return s


def shape_class(s: Situation, experts: Experts) -> tuple:
    """What a kernel's speed depends on: decoding or not, device, compute and weight dtypes,
    gradients, the experts' shape and activation, top-k, capacity and pads (they change which
    kernels run and what they move) and the tokens rounded up to a power of two."""
    E, D, H = experts.w1_EDH.shape
    tokens = 1 << max(s.tokens - 1, 0).bit_length()
    return ("decode" if decoding(s) else "sorted", s.device, str(s.dtype)[6:],
            f"w{str(experts.w1_EDH.dtype)[6:]}", "grad" if s.needs_grad else "nograd",
            f"E{E}", f"D{D}", f"H{H}", f"K{s.assignments // s.tokens}", experts.activation,
            *(("cap",) if s.capacity else ()), *(("pads",) if s.pads else ()), f"T{tokens}")


def _measured(s: Situation, experts: Experts, x_TD: torch.Tensor) -> str | None:
    """The fastest kernel for s's shapes (slms.model.tune), measured at its first call; never
    measured while torch.compile traces or gradient checkpointing replays a forward."""
    cls = shape_class(s, experts)
    if native.forced() and "native" in candidates(s):
        return "native"
    if torch.compiler.is_compiling() or recomputing():
        return tune.known(cls)
    tokens = int(cls[-1][1:])  # timed on the class's tokens (still a decoding shape)
    if decoding(s):
        tokens = min(tokens, SMALL_N // (s.assignments // s.tokens))
    dev = x_TD.device.type
    autocast = torch.is_autocast_enabled(dev)

    def context() -> contextlib.ExitStack:  # the caller's grad mode and autocast
        stack = contextlib.ExitStack()
        stack.enter_context(torch.set_grad_enabled(s.grad_mode))
        if autocast:
            stack.enter_context(torch.autocast(dev, dtype=s.dtype))
        return stack
    return tune.fastest(cls, lambda: _timers(s, experts, x_TD, tokens), context)


def _timers(s: Situation, experts: Experts, x_TD: torch.Tensor, T: int
            ) -> dict[str, Callable[[], None]]:
    """A call of each candidate kernel of `s` on T synthetic tokens (random routing, a local
    generator: the global random state is left alone), with a backward where `s` needs grad
    (into a copy of the experts' weights: their gradients are not touched)."""
    K = s.assignments // s.tokens
    E, D = experts.w1_EDH.shape[:2]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=g).to(x_TD.device, x_TD.dtype)
    r = Routing(torch.rand(T, E, generator=g).argsort(-1)[:, :K].to(x.device),
                torch.rand(T, K, generator=g).softmax(-1).to(x.device), x.new_zeros(T, E))
    ex = experts
    if s.needs_grad:
        ex = copy.copy(experts)
        ex._parameters = {n: nn.Parameter(p.detach().clone())
                          for n, p in experts._parameters.items()}
        x.requires_grad_(True)
        gy = torch.randn(T, D, generator=g).to(x.device, x.dtype)

    def timer(k: str) -> Callable[[], None]:
        run = PATHS[choose_path(s._replace(impl=k, tokens=T, assignments=T * K))]
        if not s.needs_grad:
            return lambda: run(x, r, ex, None, None)
        return lambda: run(x, r, ex, None, None)[0].backward(gy)
    return {k: timer(k) for k in candidates(s)}


def _sorted(x_TD: torch.Tensor, r: Routing, experts: Experts, cap: int | None,
            real_T: torch.Tensor | None, run: Callable[..., torch.Tensor]) -> Dispatched:
    """The sorted paths: the kept assignments in expert order (`_kept_order`) and its inverse
    pos_S, then `run` (Experts.grouped or Experts.sliced) on them."""
    T, K = r.experts_TK.shape
    order_N, kept_TK, counts_E = _kept_order(r, experts.w1_EDH.size(0), cap, real_T)
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
    y_TD = run(x_TD, w_TK, order_N, pos_S, counts_E, dropped)
    return y_TD.to(x_TD.dtype), kept_TK, counts_E


def _kept_order(r: Routing, E: int, cap: int | None, real_T: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(order_N, kept_TK, counts_E): the kept slot ids t*K + k sorted by expert, which slots
    were kept (None: all), and the kept assignments per expert."""
    T, K = r.experts_TK.shape
    flat_e = r.experts_TK.reshape(-1)
    real_S = None if real_T is None else real_T.repeat_interleave(K)
    order_N = _expert_order(flat_e, real_S, T, K, choice_major=cap is not None)
    counts_E = torch.bincount(flat_e, minlength=E)
    if cap is None and real_S is None:
        return order_N, None, counts_E
    # Dropped: assignments past an expert's capacity, and every pad's (no real token attends
    # to a pad: its output would only serve pad predictions, which are not scored).
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
    return order_N[keep_N], kept_TK, count_experts(r.experts_TK, E, kept_TK=kept_TK)


def _small(x_TD: torch.Tensor, r: Routing, experts: Experts, grouped: bool) -> Dispatched:
    """The few-assignments combine (`moe_decode.small_combine`): every assignment kept."""
    y_TD, counts_E = small_combine(x_TD, r, experts, grouped)
    return y_TD, None, counts_E


def _sliced_runner(autograd: bool, native_loop: bool) -> Runner:
    """A sorted path by Experts.sliced: with or without autograd, the C++ or the Python loop."""
    return lambda x_TD, r, ex, cap, real_T: _sorted(x_TD, r, ex, cap, real_T, functools.partial(
        ex.sliced, autograd=autograd, native_loop=native_loop))


# The one table of how each path runs: (x_TD, r, experts, cap, real_T) -> Dispatched.
PATHS: dict[DispatchPath, Runner] = {
    DispatchPath.DECODE:
        lambda x_TD, r, ex, cap, real_T: (ex.decode(x_TD, r), None, None),
    DispatchPath.ONE_TOKEN:
        lambda x_TD, r, ex, cap, real_T: (one_token(x_TD, r, ex), None, None),
    DispatchPath.SMALL_COMBINE:
        lambda x_TD, r, ex, cap, real_T: _small(x_TD, r, ex, grouped=False),
    DispatchPath.SMALL_COMBINE_GROUPED:
        lambda x_TD, r, ex, cap, real_T: _small(x_TD, r, ex, grouped=True),
    DispatchPath.GROUPED_MM:
        lambda x_TD, r, ex, cap, real_T: _sorted(x_TD, r, ex, cap, real_T, ex.grouped),
    DispatchPath.NATIVE_AUTOGRAD: _sliced_runner(autograd=True, native_loop=True),
    DispatchPath.NATIVE: _sliced_runner(autograd=False, native_loop=True),
    DispatchPath.SLICED_AUTOGRAD: _sliced_runner(autograd=True, native_loop=False),
    DispatchPath.SLICED: _sliced_runner(autograd=False, native_loop=False),
    DispatchPath.REFERENCE:
        lambda x_TD, r, ex, cap, real_T: (*reference_dispatch(x_TD, r, ex, cap, real_T), None),
}


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
