"""The chunked cross entropy against F.cross_entropy: value and gradient, fp32 and bf16 logits,
ignored targets, row counts that are not a multiple of the chunk."""

import pytest
import torch
import torch.nn.functional as F

from slms.model.loss import ChunkedCrossEntropy, cross_entropy

IGNORE = -100


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 64, 1000])
def test_equals_torch_cross_entropy_with_ignored_targets(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    logits = (3 * torch.randn(37, 50, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (37,), generator=g)
    targets[[0, 5, 36]] = IGNORE
    ref = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE)
    (ref_grad,) = torch.autograd.grad(ref * 1.7, logits)
    ours = ChunkedCrossEntropy.apply(logits, targets, IGNORE, rows)
    (grad,) = torch.autograd.grad(ours * 1.7, logits)
    assert ours.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 4e-3  # bf16: the gradient's own rounding
    torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=tol)
    assert not grad[[0, 5, 36]].any()  # ignored rows get no gradient


def test_all_targets_ignored_is_nan_as_in_torch():
    logits = torch.randn(4, 10, requires_grad=True)
    targets = torch.full((4,), IGNORE)
    assert torch.isnan(cross_entropy(logits, targets, IGNORE))
    assert torch.isnan(F.cross_entropy(logits, targets, ignore_index=IGNORE))


def test_model_loss_is_the_mean_over_real_targets():
    """GPT.forward's loss: the mean cross entropy of its logits over the targets it scores."""
    from conftest import tiny_config
    from slms.model import GPT, IGNORE_INDEX

    torch.manual_seed(0)
    model = GPT(tiny_config(moe=True)).eval()
    x = torch.randint(0, 300, (2, 16))
    y = torch.randint(0, 300, (2, 16))
    y[1, 10:] = IGNORE_INDEX
    out = model(x, y)
    ref = F.cross_entropy(out.logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, ref)
