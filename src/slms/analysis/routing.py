"""Which experts each token was routed to, captured without touching the MoE code: a forward
hook on every MoE layer's router reads `Routing.experts_TK`.

Shapes: B batch, T time, K experts per token, L MoE layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from slms.model import GPT, eval_mode


class RoutingCapture:
    """Expert ids chosen per token, per MoE layer, for every forward while active."""

    def __init__(self, model: GPT):
        self.layers = model.moe_block_indices()
        self.calls: list[list[torch.Tensor]] = [[] for _ in self.layers]  # per layer: (N, K)

    def experts(self, layer: int) -> torch.Tensor:
        """(N, K) expert ids of MoE layer number `layer` (0-based among MoE layers), all calls
        concatenated in order."""
        return torch.cat(self.calls[layer]) if self.calls[layer] else torch.zeros(0, 0)

    def clear(self) -> None:
        for c in self.calls:
            c.clear()


@contextmanager
def capture_routing(model: GPT) -> Iterator[RoutingCapture]:
    cap = RoutingCapture(model)
    handles = []
    for j, moe in enumerate(model.moe_layers()):
        def hook(_mod, _inp, out, j=j):
            cap.calls[j].append(out.experts_TK.detach().cpu())
        handles.append(moe.router.register_forward_hook(hook))
    try:
        yield cap
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def route_tokens(model: GPT, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """(model layer indices of the MoE layers, (L, T, K) expert ids) for one sequence, from a
    single forward in eval mode (no routing noise). Sequences longer than the context are
    scored in consecutive windows."""
    device = model.device
    bs = model.cfg.block_size
    with eval_mode(model), capture_routing(model) as cap:
        for s in range(0, len(ids), bs):
            model(torch.tensor([ids[s:s + bs]], device=device))
    if not cap.layers:
        return [], torch.zeros(0, len(ids), 0, dtype=torch.long)
    return cap.layers, torch.stack([cap.experts(j) for j in range(len(cap.layers))])
