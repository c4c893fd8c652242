"""The MoE layer's kernels: experts on contiguous row groups, with hand-written autograd.

Shape legend as in slms.model.moe (T tokens, D width, E experts, H expert hidden, K top-k,
N kept (token, expert) assignments, sorted by expert; F = E*H, every expert's hidden units).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sliced_forward(x_ND: torch.Tensor, w1_EDH: torch.Tensor, b1_EH: torch.Tensor,
                    w2_EHD: torch.Tensor, b2_ED: torch.Tensor, counts: list[int], gelu: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts on contiguous row groups, written in place into one buffer per layer.

    Returns (pre_NH, y_ND): pre_NH is the hidden layer before gelu, after relu (in place).
    Both matmuls of an expert run back to back, while its hidden rows are still in cache.
    """
    N = x_ND.size(0)
    pre_NH = x_ND.new_empty(N, w1_EDH.size(-1))
    y_ND = x_ND.new_empty(N, w2_EHD.size(-1))
    for e, a, b in spans(counts):
        h = torch.addmm(b1_EH[e], x_ND[a:b], w1_EDH[e], out=pre_NH[a:b])
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


class SlicedExperts(torch.autograd.Function):
    """Autograd for the sliced experts: every gradient is written once into one buffer.

    Autograd through per-expert slices and `w[e]` selects would allocate a zero-filled
    full-size gradient per expert and sum them, O(E) times the work (dominant with many experts).
    """

    @staticmethod
    def forward(ctx, x_ND, w1_EDH, b1_EH, w2_EHD, b2_ED, counts, gelu):  # noqa: ANN001
        pre_NH, y_ND = sliced_forward(x_ND, w1_EDH, b1_EH, w2_EHD, b2_ED, counts, gelu)
        ctx.save_for_backward(x_ND, pre_NH, w1_EDH, w2_EHD)
        ctx.counts, ctx.gelu = counts, gelu
        return y_ND

    @staticmethod
    def backward(ctx, gy_ND):  # noqa: ANN001
        x_ND, pre_NH, w1_EDH, w2_EHD = ctx.saved_tensors
        gy_ND = gy_ND.contiguous()
        gw1, gb1 = torch.empty_like(w1_EDH), w1_EDH.new_empty(w1_EDH.shape[::2])
        gw2, gb2 = torch.empty_like(w2_EHD), w2_EHD.new_empty(w2_EHD.shape[::2])
        for e, n in enumerate(ctx.counts):
            if not n:  # experts without tokens get zero gradients
                for g in (gw1, gb1, gw2, gb2):
                    g[e].zero_()
        need_gx = ctx.needs_input_grad[0]
        # Slice by slice while the slice is in cache; per-slice temporaries stay small, and the
        # input gradient overwrites x_ND's rows once they are used (no new (N, D) buffer: fresh
        # large buffers cost page faults).
        for e, a, b in spans(ctx.counts):
            gy, x, pre = gy_ND[a:b], x_ND[a:b], pre_NH[a:b]
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
                torch.mm(gp, w1_EDH[e].t(), out=x)
        return x_ND if need_gx else None, gw1, gb1, gw2, gb2, None, None


class Dispatch(torch.autograd.Function):
    """x_ND = x_TD[token_N]; the backward sums each token's K rows with one embedding_bag.

    Autograd's own backward is a scatter-add (slow on CPU) into the (T, D) gradient.
    pos_S: the row of each (token, slot) in x_ND, token-major; N (= dropped) when `dropped`.
    """

    @staticmethod
    def forward(ctx, x_TD, token_N, pos_S, dropped, K):  # noqa: ANN001
        ctx.save_for_backward(pos_S)
        ctx.dropped, ctx.K = dropped, K
        return x_TD.index_select(0, token_N)

    @staticmethod
    def backward(ctx, g_ND):  # noqa: ANN001
        (pos_S,) = ctx.saved_tensors
        N = g_ND.size(0)
        g_ND = F.pad(g_ND, (0, 0, 0, 1)) if ctx.dropped else g_ND
        g_TD = F.embedding_bag(pos_S.view(-1, ctx.K), g_ND, mode="sum",
                               padding_idx=N if ctx.dropped else None)
        return g_TD, None, None, None, None


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
