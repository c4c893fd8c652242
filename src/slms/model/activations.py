"""Feed-forward activations shared by the dense MLP and the MoE experts, with the hand-written
backward the experts' fused loop needs.

relu | gelu | relu2 (ReLU squared, the nanoGPT speedrun's) | swiglu (silu(gate) * up, the first
layer producing both halves; its width is 2/3 of a two-matrix MLP's, so parameters match).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slms.config import ACTIVATIONS

__all__ = ["ACTIVATIONS", "activate", "backward", "ffn_hidden", "first_width", "forward_saving"]


def ffn_hidden(activation: str, hidden: int) -> int:
    """The hidden width of a feed-forward layer sized like a two-matrix one of `hidden`."""
    return 2 * hidden // 3 if activation == "swiglu" else hidden


def first_width(activation: str, hidden: int) -> int:
    """Output width of the first matmul: both halves for SwiGLU."""
    return 2 * hidden if activation == "swiglu" else hidden


def activate(activation: str, h: torch.Tensor) -> torch.Tensor:
    """The activation of the first matmul's output h (autograd-friendly)."""
    if activation == "relu":
        return F.relu(h)
    if activation == "gelu":
        return F.gelu(h)
    if activation == "relu2":
        return F.relu(h).square()
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def forward_saving(activation: str, pre: torch.Tensor) -> torch.Tensor:
    """The activation of `pre` for the experts' loop, which saves `pre` for the backward:
    relu and relu2 overwrite it with relu(pre) (all their backward needs)."""
    if activation == "relu":
        return pre.relu_()
    if activation == "relu2":
        return pre.relu_().square()
    return activate(activation, pre)


def backward(activation: str, grad: torch.Tensor, saved: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(activation output, gradient w.r.t. the first matmul's output) from the gradient of the
    activation output and what `forward_saving` left in `saved`."""
    if activation == "relu":
        return saved, torch.ops.aten.threshold_backward(grad, saved, 0)
    if activation == "gelu":
        return F.gelu(saved), torch.ops.aten.gelu_backward(grad, saved)
    if activation == "relu2":
        return saved.square(), grad * 2 * saved
    gate, up = saved.chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    d_gate = grad * up * sig * (1 + gate * (1 - sig))
    return silu * up, torch.cat([d_gate, grad * silu], dim=-1)
