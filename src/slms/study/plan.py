"""The variants of a study: the dense base, the MoE variants of equal matmul FLOPs per token,
the upcycled one; and `Study`, the resolved plan its runs fill with results."""

from __future__ import annotations

from dataclasses import dataclass, field

from slms.config import ModelConfig, RunConfig, override_text
from slms.model.info import ffn_matmul_params
from slms.study.options import StudyOptions
from slms.study.results import Result

BIAS_UPDATE_RATE = 0.01  # the modern MoE preset's: the default 0.001 moves too little in a
# few hundred steps (docs/router_study.md)


@dataclass(frozen=True)
class Variant:
    """One run of the study: the base config with its overrides."""

    name: str  # also its run directory's name
    kind: str  # dense | moe | upcycled
    overrides: tuple[str, ...] = ()  # model.* overrides on the base config
    n_experts: int = 0
    top_k: int = 0
    expert_hidden: int = 0


@dataclass
class Study:
    """The resolved plan: base config (data prepared, vocab set) and the budget."""

    opts: StudyOptions
    base: RunConfig
    tokens_per_step: int
    flops: float  # 0 with a minutes budget
    results: list[Result] = field(default_factory=list)  # in the order trained, dense first

    @property
    def dense(self) -> Result:
        """The dense run's result."""
        return next(r for r in self.results if r.kind == "dense")


def expert_width(cfg: ModelConfig, top_k: int) -> int:
    """The expert hidden width whose top_k experts do the matmul FLOPs of the dense FFN
    (mlp_ratio * n_embd): the nearest width to FFN / top_k by slms.model.info's count."""
    C, H = cfg.n_embd, cfg.mlp_ratio * cfg.n_embd
    dense = ffn_matmul_params(cfg.activation, C, H)
    guess = max(1, round(H / top_k))
    return min(range(max(1, guess - 3), guess + 4),
               key=lambda h: abs(top_k * ffn_matmul_params(cfg.activation, C, h) - dense))


def moe_overrides(n_experts: int, top_k: int, hidden: int, router: str) -> tuple[str, ...]:
    out = [f"model.moe.n_experts={n_experts}", f"model.moe.top_k={top_k}",
           f"model.moe.expert_hidden={hidden}", f"model.moe.router={router}",
           # top-1 with renormalised weights gives the router no gradient (its one weight is
           # always 1): top-1 uses Switch Transformer's unnormalised gate probability instead
           f"model.moe.renormalize={override_text(top_k > 1)}"]
    if router == "bias":
        out.append(f"model.moe.bias_update_rate={BIAS_UPDATE_RATE}")
    return tuple(out)


def plan(cfg: ModelConfig, opts: StudyOptions) -> list[Variant]:
    """dense, then moe-eE-kK for each E and K, then the upcycled variant (trained last)."""
    out = [Variant("dense", "dense")]
    for e in opts.experts:
        for k in opts.top_ks:
            h = expert_width(cfg, k)
            out.append(Variant(f"moe-e{e}-k{k}", "moe", moe_overrides(e, k, h, opts.router),
                               e, k, h))
    if opts.upcycle:
        e, k = opts.upcycle
        out.append(Variant(f"upcycled-e{e}-k{k}", "upcycled", (), e, k,
                           cfg.mlp_ratio * cfg.n_embd))
    return out
