"""The language-model loss: cross entropy over the vocabulary, a few rows at a time.

`F.cross_entropy(logits.float(), ...)` makes a float32 copy of the whole (N, V) logits, a float32
(N, V) log-softmax saved for the backward, and in the backward a zero-filled float32 (N, V)
gradient cast back to the logits' dtype: with N = 4,096 tokens and a 2,048-token vocab, 32 MB
each, at or past glibc's limit for reusing freed memory (slms.memory), so they are fresh pages at
every step. Here each chunk of rows is taken to float32 while it is in cache: the forward keeps
one log-sum-exp per row, the backward recomputes the chunk's softmax and writes its gradient
straight into one buffer of the logits' dtype. Same value and gradient (float rounding aside);
measured on a 2-core AMD EPYC (bf16 logits, 4,096 x 2,048, the head's matmuls included): 17 ms
against 30-45 ms for the forward and backward (whole training steps: docs/benchmarks.md).

Shapes: N rows (tokens), V vocabulary.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 1 << 20  # float32 bytes of one chunk of rows: 1 MB stays in a core's L2 cache


def cross_entropy(logits_NV: torch.Tensor, targets_N: torch.Tensor, ignore_index: int
                  ) -> torch.Tensor:
    """Mean cross entropy (nats) over the rows whose target is not `ignore_index` (NaN when
    there are none, as F.cross_entropy), computed in float32 whatever the logits' dtype."""
    rows = max(1, CHUNK_BYTES // (4 * logits_NV.size(-1)))
    return ChunkedCrossEntropy.apply(logits_NV, targets_N, ignore_index, rows)


class ChunkedCrossEntropy(torch.autograd.Function):
    """`cross_entropy` with its hand-written backward (saves the logits, as autograd's matmul
    does anyway, and one float32 log-sum-exp per row)."""

    @staticmethod
    def forward(ctx, logits_NV, targets_N, ignore_index, rows):  # noqa: ANN001
        N = logits_NV.size(0)
        kept_N = targets_N != ignore_index
        safe_N = torch.where(kept_N, targets_N, 0)  # any valid index; their rows count 0
        lse_N = logits_NV.new_empty(N, dtype=torch.float32)
        picked_N = logits_NV.new_empty(N, dtype=torch.float32)
        for a in range(0, N, rows):
            chunk = logits_NV[a:a + rows].float()
            torch.logsumexp(chunk, -1, out=lse_N[a:a + rows])
            picked_N[a:a + rows] = chunk.gather(1, safe_N[a:a + rows, None])[:, 0]
        count = kept_N.sum()
        ctx.save_for_backward(logits_NV, safe_N, kept_N, lse_N, count)
        ctx.rows = rows
        return ((lse_N - picked_N) * kept_N).sum() / count

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001
        logits_NV, safe_N, kept_N, lse_N, count = ctx.saved_tensors
        rows = ctx.rows
        grad_NV = torch.empty_like(logits_NV)
        scale_N = kept_N * (g / count)  # 0 for ignored rows
        for a in range(0, logits_NV.size(0), rows):
            b = a + rows
            p = torch.exp(logits_NV[a:b].float() - lse_N[a:b, None])  # softmax
            p.scatter_add_(1, safe_N[a:b, None], p.new_full((p.size(0), 1), -1.0))
            grad_NV[a:b] = p.mul_(scale_N[a:b, None])
        return grad_NV, None, None, None
