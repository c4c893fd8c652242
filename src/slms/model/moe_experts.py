"""What the MoE layer routes and runs: a routing decision (`Routing`) and the experts it picks
(`Experts`), with the one rule for the dtype they compute in (`compute_dtype`).

Experts has no forward: the dispatch engine (slms.model.moe_dispatch) picks how they run and
calls their methods. The layout of the MoE modules is in slms.model.moe's docstring; shape
legend as there (T tokens, D width, E experts, H expert hidden, K top-k, N kept (token,
expert) assignments, sorted by expert).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from slms.model import tune
from slms.model.activations import activate, ffn_hidden, first_width
from slms.model.moe_kernels import (
    Dispatch,
    SlicedMoE,
    affine,
    bias_of,
    combine,
    experts_forward,
)

# How the experts run: the C++ kernels (decode kernel, expert loop), the plain torch loop, or
# torch._grouped_mm. Experts(impl=...) forces one; "auto" takes the fastest (slms.model.tune).
KERNELS = ("native", tune.PLAIN, "grouped_mm")


@dataclass
class Routing:
    """The router's decision for T tokens: each token's K experts, best first, and their gate
    weights, with the logits (and probabilities, once computed) they came from."""

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


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's matmuls run in: autocast's where it is on for x's device (an fp32 residual
    stream under bf16 autocast computes in bf16), else x's own."""
    dev = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def recomputing() -> bool:
    """True while autograd runs a backward pass, i.e. when gradient checkpointing replays a
    forward: statistics must not count those tokens twice."""
    return torch._C._current_graph_task_id() != -1


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


class Experts(nn.Module):
    """E feed-forward networks with stacked weights, so they can run as one grouped matmul.

    No forward: `moe_dispatch.choose_path` picks how they run and its table PATHS calls
    `grouped`, `sliced`, `rows` (through moe_decode) or `expert` (the reference loop); the C++
    decode kernel reads the weights itself (`moe_decode.native_decode`).
    impl: "auto" (the kernel measured fastest), or one of KERNELS to force it (tests,
    benchmarks). bias=False: no b1_EH, b2_ED (None), as the stock MoE classes of other tools
    have none.
    """

    def __init__(self, n_embd: int, hidden: int, n_experts: int, activation: str,
                 impl: str = "auto", bias: bool = True):
        super().__init__()
        if impl != "auto" and impl not in KERNELS:
            raise ValueError(f"Experts impl must be 'auto' or one of {KERNELS}, not {impl!r}")
        hidden = ffn_hidden(activation, hidden)
        first = first_width(activation, hidden)  # SwiGLU: gate and up side by side
        self.w1_EDH = nn.Parameter(torch.empty(n_experts, n_embd, first))
        self.b1_EH = nn.Parameter(torch.zeros(n_experts, first)) if bias else None
        self.w2_EHD = nn.Parameter(torch.empty(n_experts, hidden, n_embd))
        self.b2_ED = nn.Parameter(torch.zeros(n_experts, n_embd)) if bias else None
        self.activation = activation
        self.impl = impl
        nn.init.normal_(self.w1_EDH, std=0.02)
        nn.init.normal_(self.w2_EHD, std=0.02)

    def expert(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens: the reference every fast path is tested against."""
        h = activate(self.activation, affine(x_ND, self.w1_EDH[e], bias_of(self.b1_EH, e)))
        return affine(h, self.w2_EHD[e], bias_of(self.b2_ED, e))

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
        """The dtype to compute in (`compute_dtype`), with autocast off: addmm(out=) has no
        autocast rule, so the sliced experts cast by hand to the dtype autocast would use."""
        dev, dt = x_TD.device.type, compute_dtype(x_TD)
        if not torch.is_autocast_enabled(dev):  # entering autocast costs microseconds
            yield dt
            return
        with torch.autocast(dev, enabled=False):
            yield dt

    def _params(self, dt: torch.dtype) -> list[torch.Tensor | None]:
        params = [self.w1_EDH, self.b1_EH, self.w2_EHD, self.b2_ED]
        return params if self.w1_EDH.dtype == dt else [p if p is None else p.to(dt)
                                                       for p in params]

    def _grouped(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        x_ND = x_ND.contiguous()
        expert_N = torch.repeat_interleave(torch.arange(counts_E.numel(), device=x_ND.device),
                                           counts_E, output_size=x_ND.size(0))
        offs = torch.cumsum(counts_E, 0).to(torch.int32)
        w1, w2 = self.w1_EDH.to(x_ND.dtype), self.w2_EHD.to(x_ND.dtype)
        h_NH = self._add_bias(torch._grouped_mm(x_ND, w1, offs=offs), self.b1_EH, expert_N)
        h_NH = activate(self.activation, h_NH)
        return self._add_bias(torch._grouped_mm(h_NH, w2, offs=offs), self.b2_ED,
                              expert_N).contiguous()

    @staticmethod
    def _add_bias(h_NX: torch.Tensor, b_EX: torch.Tensor | None, expert_N: torch.Tensor
                  ) -> torch.Tensor:
        """h_NX plus each row's expert bias (none without biases)."""
        return h_NX if b_EX is None else h_NX + b_EX[expert_N].to(h_NX.dtype)

