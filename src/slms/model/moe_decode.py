"""The MoE layer's decode-only paths: a few tokens, no autograd, no capacity, no pads.

Generation's steps route a handful of tokens; sorting them, building the inverse permutation
and scattering back would cost more than the experts themselves.
`slms.model.moe_dispatch.choose_path` decides when these run; each returns y_TD in x_TD's dtype.
Shape legend as in slms.model.moe (T tokens, D width, E experts, K top-k, N assignments).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from slms.model import native
from slms.model.activations import activate
from slms.model.moe_kernels import affine, bias_of, native_activation

if TYPE_CHECKING:
    from slms.model.moe_experts import Experts, Routing


def native_decode(x_TD: torch.Tensor, r: Routing, experts: Experts) -> torch.Tensor:
    """y_TD by the C++ kernel (CPU, fp32 input and parameters, `native.ops()` built): each
    chosen expert's weights are read once for all its tokens, split across the CPU threads."""
    w1, b1, w2, b2 = (None if p is None else p.contiguous()
                      for p in (experts.w1_EDH, experts.b1_EH, experts.w2_EHD, experts.b2_ED))
    return native.ops().experts_decode(x_TD.contiguous(), r.experts_TK,
                                       r.weights_TK.float().contiguous(), w1, b1, w2, b2,
                                       native_activation(experts.activation))


def one_token(x_TD: torch.Tensor, r: Routing, experts: Experts) -> torch.Tensor:
    """y_1D for a single token (T == 1): its K experts one after another, then one (1, K) x
    (K, D) matmul with the gate weights."""
    w1, b1, w2, b2 = experts.w1_EDH, experts.b1_EH, experts.w2_EHD, experts.b2_ED
    act = experts.activation
    h_KD = torch.cat([affine(activate(act, affine(x_TD, w1[e], bias_of(b1, e))), w2[e],
                             bias_of(b2, e))
                      for e in r.experts_TK[0].tolist()])
    return torch.mm(r.weights_TK.to(h_KD.dtype), h_KD).to(x_TD.dtype)


def small_combine(x_TD: torch.Tensor, r: Routing, experts: Experts, grouped: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_TD, counts_E) for few assignments: the experts on their rows (by torch._grouped_mm
    when `grouped`, else by slices), gate-weighted and summed with one (T, N) matmul.

    Fewer small ops than building the inverse permutation, and no scatter-add.
    """
    T, K = r.experts_TK.shape
    flat_e = r.experts_TK.reshape(-1)
    order_N = torch.argsort(flat_e, stable=True)  # every assignment kept, sorted by expert
    counts_E = torch.bincount(flat_e, minlength=experts.w1_EDH.size(0))
    w_N = r.weights_TK.reshape(-1).index_select(0, order_N)
    token_N = order_N // K if K > 1 else order_N
    h_ND = experts.rows(x_TD, token_N, counts_E, grouped)
    # combine_TN[t, n] = gate weight of assignment n if it belongs to token t, else 0
    combine_TN = h_ND.new_zeros(T, w_N.numel()).scatter_(0, token_N[None],
                                                         w_N[None].to(h_ND.dtype))
    return torch.mm(combine_TN, h_ND).to(x_TD.dtype), counts_E
