"""The MoE layer's dispatch engine: how one call of the layer runs its experts.

`describe` reads the situation of a call (device, compute dtype, gradients, tokens, capacity,
pads, the kernels built, the kernel measured fastest for its shapes); `choose_path`, the one
place that decides, maps it to a DispatchPath; PATHS, the one table of how each path runs,
runs it. The sorted paths (training, evaluation, prefill) sort the assignments by expert and
run the experts on contiguous row groups (`Experts.grouped`, `Experts.sliced`); the decode
paths (moe_decode) serve a few tokens without autograd; `reference_dispatch`, the per-expert
loop, is what every other path is tested against. Where kernels compete (the C++ kernels, the
plain torch loop, torch._grouped_mm), `_timers` gives slms.model.tune a call of each on
synthetic inputs of the call's shape class, and the fastest is cached per machine.
The layout of the MoE modules and the shape legend are in slms.model.moe (T tokens, D width,
E experts, K top-k, N kept assignments; here also S, the T*K slots, token-major).
"""

from __future__ import annotations

import contextlib
import copy
import enum
import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from slms.model import native, tune
from slms.model.moe_decode import native_decode, one_token, small_combine
from slms.model.moe_experts import Experts, Routing, compute_dtype, count_experts, recomputing
from slms.model.moe_kernels import NATIVE_ACTIVATIONS

SMALL_N = 64  # at most this many (token, expert) assignments: the decode paths (by default)


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
    impl: str = "auto"  # Experts.impl: auto, or one of moe_experts.KERNELS
    reference: bool = False  # MoE.reference: the per-expert loop
    measured: str | None = None  # the kernel slms.model.tune timed fastest for this shape
    small_n: int = SMALL_N  # MoE.small_n: the most assignments the decode paths take


def decoding(s: Situation) -> bool:
    """The decode paths' situation: no grad mode, at most s.small_n assignments, and neither
    capacity nor pads (they keep every assignment)."""
    return not s.grad_mode and s.assignments <= s.small_n and not (s.capacity or s.pads)


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
    """The one place that decides how the MoE layer runs (pure: a function of `s` alone):
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


Dispatched = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
Runner = Callable[[torch.Tensor, Routing, Experts, int | None, torch.Tensor | None], Dispatched]


def dispatch(x_TD: torch.Tensor, r: Routing, experts: Experts, cap: int | None,
             real_T: torch.Tensor | None = None, reference: bool = False,
             small_n: int = SMALL_N) -> Dispatched:
    """(y_TD, kept_TK, counts_E) as sorted_dispatch (the per-expert loop with `reference`;
    the decode paths up to `small_n` assignments), by the path `choose_path` picks from
    `describe` and `PATHS` runs. counts_E, the kept assignments per expert, is None where a
    path does not count them (DECODE, ONE_TOKEN, REFERENCE)."""
    path = choose_path(describe(x_TD, r, experts, cap, real_T, reference, small_n))
    return PATHS[path](x_TD, r, experts, cap, real_T)


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
    y_TD, kept_TK, _ = dispatch(x_TD, r, experts, cap, real_T)
    return y_TD, kept_TK


def describe(x_TD: torch.Tensor, r: Routing, experts: Experts, cap: int | None,
             real_T: torch.Tensor | None = None, reference: bool = False,
             small_n: int = SMALL_N) -> Situation:
    """The situation of one call of the layer, for `choose_path`, with the kernel measured
    fastest for its shapes (a few microseconds once measured: it runs per layer per decoding
    step)."""
    dev = x_TD.device.type
    dtype = compute_dtype(x_TD)
    grad_mode = torch.is_grad_enabled()
    needs_grad = grad_mode and (x_TD.requires_grad or r.weights_TK.requires_grad
                                or experts.w1_EDH.requires_grad)
    # native.ops() only on CPU: a GPU run must not build the CPU kernels
    kernels = (dev == "cpu" and experts.activation in NATIVE_ACTIVATIONS
               and native.ops() is not None)
    capability = torch.cuda.get_device_capability(x_TD.device) if x_TD.is_cuda else None
    T, K = r.experts_TK.shape
    s = Situation(dev, dtype, capability, grad_mode, needs_grad, kernels, T, T * K,
                  cap is not None, real_T is not None, experts.impl, reference,
                  small_n=small_n)
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
        tokens = min(tokens, s.small_n // (s.assignments // s.tokens))
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
        ex._parameters = {n: None if p is None else nn.Parameter(p.detach().clone())
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
        lambda x_TD, r, ex, cap, real_T: (native_decode(x_TD, r, ex), None, None),
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
