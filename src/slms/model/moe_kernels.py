"""The MoE layer's kernels: experts on contiguous row groups, with hand-written autograd.

The expert loops run in C++ (`slms.model.native`) where the layer chose that kernel
(`slms.model.moe_dispatch.choose_path`), else in Python here (`sliced_forward`, `experts_backward`):
the same ATen calls either way.
Shape legend as in slms.model.moe (T tokens, D width, E experts, H expert hidden, K top-k,
N kept (token, expert) assignments, sorted by expert).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slms.model import activations, native

NATIVE_ACTIVATIONS = ("relu", "gelu", "relu2")  # what the C++ kernels implement, in their numbering


def native_activation(activation: str) -> int:
    """The C++ kernels' number for `activation` (one of NATIVE_ACTIVATIONS)."""
    return NATIVE_ACTIVATIONS.index(activation)


def affine(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w + b (b None: x @ w, experts without biases), into `out` when given."""
    if b is None:
        return torch.mm(x, w, out=out)
    return torch.addmm(b, x, w, out=out)


def bias_of(b_E: torch.Tensor | None, e: int | torch.Tensor) -> torch.Tensor | None:
    """Expert e's bias (each row's, for a tensor of expert ids); None without biases."""
    return None if b_E is None else b_E[e]


def sliced_forward(x_TD: torch.Tensor, token_N: torch.Tensor, w1_EDH: torch.Tensor,
                   b1_EH: torch.Tensor | None, w2_EHD: torch.Tensor, b2_ED: torch.Tensor | None,
                   counts: list[int], activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert on its group of rows x_TD[token_N[a:b]], written into one buffer per layer.

    Returns (pre_NH, y_ND): pre_NH is the first matmul's output as the backward needs it
    (`activations.forward_saving`: after relu for relu and relu2, in place; else before).
    A group's rows are gathered inside the loop into a small reused buffer, so they are still in
    cache for the matmul, and no (N, D) copy of the input is made (with top-k routing it would
    be K times the input). Both matmuls of an expert run back to back.
    """
    N = token_N.numel()
    pre_NH = x_TD.new_empty(N, w1_EDH.size(-1))
    y_ND = x_TD.new_empty(N, w2_EHD.size(-1))
    x_buf = x_TD.new_empty(max(counts, default=0), x_TD.size(-1))
    for e, a, b in spans(counts):
        x = torch.index_select(x_TD, 0, token_N[a:b], out=x_buf[:b - a])
        h = affine(x, w1_EDH[e], bias_of(b1_EH, e), out=pre_NH[a:b])
        h = activations.forward_saving(activation, h)
        affine(h, w2_EHD[e], bias_of(b2_ED, e), out=y_ND[a:b])
    return pre_NH, y_ND


def spans(counts: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of each non-empty group."""
    out, start = [], 0
    for e, n in enumerate(counts):
        if n:
            out.append((e, start, start + n))
            start += n
    return out


def sum_slots(g_ND: torch.Tensor, pos_S: torch.Tensor, K: int, dropped: bool) -> torch.Tensor:
    """g_TD: each token's K rows of g_ND summed, by one embedding_bag (CPU scatter-add is slow).

    pos_S: the row of each (token, slot) in g_ND, token-major; N (= dropped) when `dropped`.
    """
    N = g_ND.size(0)
    g_ND = F.pad(g_ND, (0, 0, 0, 1)) if dropped else g_ND
    return F.embedding_bag(pos_S.view(-1, K), g_ND, mode="sum",
                           padding_idx=N if dropped else None)


def combine(y_ND: torch.Tensor, pos_S: torch.Tensor, w_TK: torch.Tensor, dropped: bool
            ) -> torch.Tensor:
    """y_TD: each token's K expert outputs, gate-weighted and summed by one embedding_bag (no
    (T, K, D) intermediate). A dropped slot reads any row; its weight in w_TK must be 0."""
    T, K = w_TK.shape
    slot_TK = pos_S.view(T, K)
    if dropped:
        slot_TK = slot_TK.clamp(max=y_ND.size(0) - 1)
    return F.embedding_bag(slot_TK, y_ND, per_sample_weights=w_TK, mode="sum")


def experts_forward(x_TD: torch.Tensor, token_N: torch.Tensor, w1_EDH: torch.Tensor,
                    b1_EH: torch.Tensor | None, w2_EHD: torch.Tensor, b2_ED: torch.Tensor | None,
                    counts: list[int], activation: str, native_loop: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`sliced_forward`, by the C++ kernel with `native_loop` (CPU, an activation it knows, the
    kernels built: the caller checks), else in Python: the same ATen calls."""
    if not native_loop:
        return sliced_forward(x_TD, token_N, w1_EDH, b1_EH, w2_EHD, b2_ED, counts, activation)
    return native.ops().experts_fwd(x_TD, token_N, w1_EDH, b1_EH, w2_EHD, b2_ED, counts,
                                    native_activation(activation))


def experts_backward(g_TD: torch.Tensor, x_TD: torch.Tensor, token_N: torch.Tensor,
                     w_N: torch.Tensor, pre_NH: torch.Tensor, y_ND: torch.Tensor,
                     w1_EDH: torch.Tensor, w2_EHD: torch.Tensor, counts: list[int], activation: str,
                     need_gx: bool, native_loop: bool) -> tuple[torch.Tensor, ...]:
    """The experts' backward, expert by expert (see `SlicedMoE`); by the C++ kernel with
    `native_loop`.

    Returns (gw_N, gw1, gb1, gw2, gb2): the gradients of the gate weights w_N (before the
    gate weighting: the rows' dot products with the output rows) and of the expert
    parameters; with `need_gx`, each input-gradient row overwrites its row of y_ND.
    """
    if native_loop:
        return native.ops().experts_bwd(g_TD, x_TD, token_N, w_N, pre_NH, y_ND, w1_EDH, w2_EHD,
                                        counts, native_activation(activation), need_gx)
    gw_N = w_N.new_empty(w_N.shape)
    gw1, gb1 = torch.empty_like(w1_EDH), w1_EDH.new_empty(w1_EDH.shape[::2])
    gw2, gb2 = torch.empty_like(w2_EHD), w2_EHD.new_empty(w2_EHD.shape[::2])
    for e, n in enumerate(counts):
        if not n:  # experts without tokens get zero gradients
            for g in (gw1, gb1, gw2, gb2):
                g[e].zero_()
    rows = max(counts, default=0)
    g_buf, x_buf = g_TD.new_empty(rows, g_TD.size(-1)), x_TD.new_empty(rows, x_TD.size(-1))
    for e, a, b in spans(counts):
        y, pre = y_ND[a:b], pre_NH[a:b]
        gy = torch.index_select(g_TD, 0, token_N[a:b], out=g_buf[:b - a])
        torch.linalg.vecdot(gy, y, out=gw_N[a:b])
        gy.mul_(w_N[a:b, None])
        x = torch.index_select(x_TD, 0, token_N[a:b], out=x_buf[:b - a])
        ga = torch.mm(gy, w2_EHD[e].t())
        act, gp = activations.backward(activation, ga, pre)
        torch.mm(act.t(), gy, out=gw2[e])
        torch.sum(gy, 0, out=gb2[e])
        torch.mm(x.t(), gp, out=gw1[e])
        torch.sum(gp, 0, out=gb1[e])
        if need_gx:
            torch.mm(gp, w1_EDH[e].t(), out=y)
    return gw_N, gw1, gb1, gw2, gb2


class SlicedMoE(torch.autograd.Function):
    """The experts and the gate-weighted combine as one autograd function.

    forward: `experts_forward`, then `combine`. backward, expert by expert while its rows are in
    cache: each row's output gradient is gathered from the (T, D) gradient, its gate weight's
    gradient is a dot product with the saved output row, and every weight gradient is written
    once into one buffer (autograd through per-expert slices and `w[e]` selects would allocate
    a zero-filled full-size gradient per expert and sum them, O(E) times the work). Saved:
    x_TD, the hidden and output rows; no (T*K, D) gradient buffer is made: each input-gradient
    row overwrites its output row once that is used (so the graph cannot be run backward twice:
    autograd then reports the in-place change).
    """

    @staticmethod
    def forward(ctx, x_TD, w_TK, w1_EDH, b1_EH, w2_EHD, b2_ED, order_N, pos_S, counts,  # noqa: ANN001
                dropped, activation, native_loop):  # noqa: ANN001
        K = w_TK.size(1)
        token_N = order_N // K
        pre_NH, y_ND = experts_forward(x_TD, token_N, w1_EDH, b1_EH, w2_EHD, b2_ED, counts,
                                       activation, native_loop)
        ctx.save_for_backward(x_TD, w_TK, order_N, pos_S, pre_NH, y_ND, w1_EDH, w2_EHD)
        ctx.counts, ctx.dropped, ctx.activation = counts, dropped, activation
        ctx.native_loop, ctx.bias = native_loop, b1_EH is not None
        return combine(y_ND, pos_S, w_TK, dropped)

    @staticmethod
    def backward(ctx, g_TD):  # noqa: ANN001
        x_TD, w_TK, order_N, pos_S, pre_NH, y_ND, w1_EDH, w2_EHD = ctx.saved_tensors
        g_TD = g_TD.contiguous()
        T, K = w_TK.shape
        token_N = order_N // K
        w_N = w_TK.reshape(-1).index_select(0, order_N)
        need_gx = ctx.needs_input_grad[0]
        gw_N, gw1, gb1, gw2, gb2 = experts_backward(g_TD, x_TD, token_N, w_N, pre_NH, y_ND,
                                                    w1_EDH, w2_EHD, ctx.counts, ctx.activation,
                                                    need_gx, ctx.native_loop)
        gx_TD = sum_slots(y_ND, pos_S, K, ctx.dropped) if need_gx else None
        gw_TK = None
        if ctx.needs_input_grad[1]:  # dropped slots: 0
            gw_TK = gw_N.new_zeros(T * K).index_copy_(0, order_N, gw_N).view(T, K)
        if not ctx.bias:  # experts without biases: the kernels' bias sums are not wanted
            gb1 = gb2 = None
        return gx_TD, gw_TK, gw1, gb1, gw2, gb2, None, None, None, None, None, None


class Dispatch(torch.autograd.Function):
    """x_ND = x_TD[token_N] (the grouped-matmul path); backward: `sum_slots`, not autograd's
    scatter-add (slow on CPU)."""

    @staticmethod
    def forward(ctx, x_TD, token_N, pos_S, dropped, K):  # noqa: ANN001
        ctx.save_for_backward(pos_S)
        ctx.dropped, ctx.K = dropped, K
        return x_TD.index_select(0, token_N)

    @staticmethod
    def backward(ctx, g_ND):  # noqa: ANN001
        (pos_S,) = ctx.saved_tensors
        return sum_slots(g_ND, pos_S, ctx.K, ctx.dropped), None, None, None, None
