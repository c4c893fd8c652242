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


class GatherExperts(torch.autograd.Function):
    """sliced_forward with autograd: every gradient is written once into one buffer.

    Autograd through per-expert slices and `w[e]` selects would allocate a zero-filled
    full-size gradient per expert and sum them, O(E) times the work (dominant with many experts).
    Only x_TD and the hidden layer are saved; each group's input rows are gathered again.
    """

    @staticmethod
    def forward(ctx, x_TD, w1_EDH, b1_EH, w2_EHD, b2_ED, token_N, pos_S, counts, K,  # noqa: ANN001
                dropped, gelu):  # noqa: ANN001
        pre_NH, y_ND = sliced_forward(x_TD, token_N, w1_EDH, b1_EH, w2_EHD, b2_ED, counts, gelu)
        ctx.save_for_backward(x_TD, token_N, pos_S, pre_NH, w1_EDH, w2_EHD)
        ctx.counts, ctx.K, ctx.dropped, ctx.gelu = counts, K, dropped, gelu
        return y_ND

    @staticmethod
    def backward(ctx, gy_ND):  # noqa: ANN001
        x_TD, token_N, pos_S, pre_NH, w1_EDH, w2_EHD = ctx.saved_tensors
        # y_ND has one consumer (the layer's combine), so this gradient is ours: after each
        # group's rows are used they are overwritten with the input gradient (no new (N, D)
        # buffer: fresh large buffers cost page faults).
        gy_ND = gy_ND.contiguous()
        gw1, gb1 = torch.empty_like(w1_EDH), w1_EDH.new_empty(w1_EDH.shape[::2])
        gw2, gb2 = torch.empty_like(w2_EHD), w2_EHD.new_empty(w2_EHD.shape[::2])
        for e, n in enumerate(ctx.counts):
            if not n:  # experts without tokens get zero gradients
                for g in (gw1, gb1, gw2, gb2):
                    g[e].zero_()
        need_gx = ctx.needs_input_grad[0]
        x_buf = x_TD.new_empty(max(ctx.counts, default=0), x_TD.size(-1))
        for e, a, b in spans(ctx.counts):
            gy, pre = gy_ND[a:b], pre_NH[a:b]
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
                torch.mm(gp, w1_EDH[e].t(), out=gy)
        gx_TD = sum_slots(gy_ND, pos_S, ctx.K, ctx.dropped) if need_gx else None
        return gx_TD, gw1, gb1, gw2, gb2, None, None, None, None, None, None


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
