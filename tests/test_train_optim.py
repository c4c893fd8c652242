"""Parameter groups of the optimizer: weight decay by role."""

import torch

from conftest import tiny_config
from slms.config import TrainConfig
from slms.model import GPT
from slms.train.optim import build_optimizer


def test_weight_decay_by_role_not_by_dimension():
    """Matmul and embedding weights (the experts' stacked w1/w2 too) are decayed; biases (the
    experts' stacked 2-D ones too) and norms are not, in MoE and dense models alike."""
    for moe in (False, True):
        model = GPT(tiny_config(moe=moe))
        opt = build_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
        groups = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
        names = {id(p): n for n, p in model.named_parameters()}
        decayed = sorted(names[i] for i, wd in groups.items() if wd > 0)
        kept = sorted(names[i] for i, wd in groups.items() if wd == 0)
        assert len(groups) == len(names)  # every parameter once (tied weight once)
        assert all(n.endswith(("weight", "w1_EDH", "w2_EHD")) for n in decayed)
        assert not any(n.startswith("ln") or ".ln" in n for n in decayed)
        assert all(n.endswith(("bias", "b1_EH", "b2_ED")) or "ln" in n for n in kept)
        if moe:
            assert "blocks.0.ffn.experts.b1_EH" in kept and "blocks.0.ffn.experts.b2_ED" in kept
            assert "blocks.0.ffn.experts.w1_EDH" in decayed
            assert "blocks.0.ffn.router.gate.weight" in decayed
        assert "wte.weight" in decayed and "wpe.weight" in decayed
