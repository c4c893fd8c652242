"""The MoE layer's kernels: experts on contiguous row groups, with hand-written autograd.

Shape legend as in slms.model.moe (T tokens, D width, E experts, H expert hidden, K top-k,
N kept (token, expert) assignments, sorted by expert; F = E*H, every expert's hidden units).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sliced_forward(x_TD: torch.Tensor, token_N: torch.Tensor, w1_EDH: torch.Tensor,
                   b1_EH: torch.Tensor, w2_EHD: torch.Tensor, b2_ED: torch.Tensor,
                   counts: list[int], gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert on its group of rows x_TD[token_N[a:b]], written into one buffer per layer.

    Returns (pre_NH, y_ND): pre_NH is the hidden layer before gelu, after relu (in place).
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
        h = torch.addmm(b1_EH[e], x, w1_EDH[e], out=pre_NH[a:b])
        h = F.gelu(h) if gelu else h.relu_()
        torch.addmm(b2_ED[e], h, w2_EHD[e], out=y_ND[a:b])
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


class SlicedMoE(torch.autograd.Function):
    """The experts and the gate-weighted combine as one autograd function.

    forward: `sliced_forward`, then `combine`. backward, expert by expert while its rows are in
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
                dropped, gelu):  # noqa: ANN001
        K = w_TK.size(1)
        token_N = order_N // K
        pre_NH, y_ND = sliced_forward(x_TD, token_N, w1_EDH, b1_EH, w2_EHD, b2_ED, counts, gelu)
        ctx.save_for_backward(x_TD, w_TK, order_N, pos_S, pre_NH, y_ND, w1_EDH, w2_EHD)
        ctx.counts, ctx.dropped, ctx.gelu = counts, dropped, gelu
        return combine(y_ND, pos_S, w_TK, dropped)

    @staticmethod
    def backward(ctx, g_TD):  # noqa: ANN001
        x_TD, w_TK, order_N, pos_S, pre_NH, y_ND, w1_EDH, w2_EHD = ctx.saved_tensors
        g_TD = g_TD.contiguous()
        T, K = w_TK.shape
        token_N = order_N // K
        w_N = w_TK.reshape(-1).index_select(0, order_N)
        gw_N = w_N.new_empty(w_N.shape)
        gw1, gb1 = torch.empty_like(w1_EDH), w1_EDH.new_empty(w1_EDH.shape[::2])
        gw2, gb2 = torch.empty_like(w2_EHD), w2_EHD.new_empty(w2_EHD.shape[::2])
        for e, n in enumerate(ctx.counts):
            if not n:  # experts without tokens get zero gradients
                for g in (gw1, gb1, gw2, gb2):
                    g[e].zero_()
        need_gx = ctx.needs_input_grad[0]
        rows = max(ctx.counts, default=0)
        g_buf, x_buf = g_TD.new_empty(rows, g_TD.size(-1)), x_TD.new_empty(rows, x_TD.size(-1))
        for e, a, b in spans(ctx.counts):
            y, pre = y_ND[a:b], pre_NH[a:b]
            gy = torch.index_select(g_TD, 0, token_N[a:b], out=g_buf[:b - a])
            torch.linalg.vecdot(gy, y, out=gw_N[a:b])
            gy.mul_(w_N[a:b, None])
            x = torch.index_select(x_TD, 0, token_N[a:b], out=x_buf[:b - a])
            ga = torch.mm(gy, w2_EHD[e].t())
            if ctx.gelu:
                act, gp = F.gelu(pre), torch.ops.aten.gelu_backward(ga, pre)
            else:  # pre_NH holds the relu output
                act, gp = pre, torch.ops.aten.threshold_backward(ga, pre, 0)
            torch.mm(act.t(), gy, out=gw2[e])
            torch.sum(gy, 0, out=gb2[e])
            torch.mm(x.t(), gp, out=gw1[e])
            torch.sum(gp, 0, out=gb1[e])
            if need_gx:
                torch.mm(gp, w1_EDH[e].t(), out=y)
        gx_TD = sum_slots(y_ND, pos_S, K, ctx.dropped) if need_gx else None
        gw_TK = None
        if ctx.needs_input_grad[1]:  # dropped slots: 0
            gw_TK = gw_N.new_zeros(T * K).index_copy_(0, order_N, gw_N).view(T, K)
        return gx_TD, gw_TK, gw1, gb1, gw2, gb2, None, None, None, None, None


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


def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's prepacked linear (CPU builds with mkldnn)."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


def pack_all_experts(w1_EDH: torch.Tensor, b1_EH: torch.Tensor, w2_EHD: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every expert side by side as one wide FFN, weights prepacked for oneDNN.

    Returns (w1, b1, w2): w1 the (E*H, D) first layer, w2 the (D, E*H) second, in nn.Linear's
    (out, in) layout and oneDNN's blocked format; b1 the (E*H,) bias.
    """
    E, D, H = w1_EDH.shape
    with torch.no_grad():
        w1 = w1_EDH.transpose(1, 2).reshape(E * H, D).contiguous()
        w2 = w2_EHD.reshape(E * H, D).t().contiguous()
        reorder = torch.ops.mkldnn._reorder_linear_weight
        return reorder(w1), b1_EH.reshape(E * H).clone(), reorder(w2)


def all_experts_forward(x_TD: torch.Tensor, g_TE: torch.Tensor,
                        packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                        b2_ED: torch.Tensor, gelu: bool) -> torch.Tensor:
    """sum_e g_TE[:, e] * expert_e(x_TD) with every expert on every token: two wide matmuls.

    For decoding a few tokens on CPU, where g_TE is zero but for each token's K experts: the
    experts chosen get a row or two each, and a matmul of one or two rows costs nearly what one
    of many rows does, so computing all E experts at once is faster than the K*T it needs.
    Zero gates make the other experts' terms exact zeros.
    """
    w1, b1, w2 = packed
    T, E = g_TE.shape
    linear = torch.ops.mkldnn._linear_pointwise
    h_TF = linear(x_TD, w1, b1, "gelu", [], "none") if gelu else linear(x_TD, w1, b1, "relu",
                                                                         [], "")
    h_TF.view(T, E, -1).mul_(g_TE[:, :, None])
    return linear(h_TF, w2, None, "none", [], "").addmm_(g_TE, b2_ED)
