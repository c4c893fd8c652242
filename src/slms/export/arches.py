"""Which stock transformers class computes exactly what an slms model computes.

Each `Arch` names a causal-LM class of transformers and the slms options it can express;
`why_not` gives the first option of a model config that it cannot (one line, naming the
option), `choose` the simplest exact class or the reason none is. The weights are mapped by
`slms.export.llama`, `slms.export.moe` and `slms.export.gpt2`.

Options that change nothing at inference are not blockers: dropout (eval has none),
zero_init_proj (an initialisation), qkv_bias (a missing bias is written as zeros), attn_scale
(folded into the q weights), model.moe.capacity_factor (evaluation and generation are
dropless), the noisy_topk router's noise (training only). document_mask is not one either: it
differs only for inputs holding a second document (an <|endoftext|> after the first token),
which generation from a prompt never has, as it stops at <|endoftext|>; `DOCUMENT_MASK_NOTE`
says so where it applies.
"""

from __future__ import annotations

from dataclasses import dataclass

from slms.config import ModelConfig, MoEConfig

SLMS = "slms"  # the custom export (model type slms, needs `import slms.hf`)

DOCUMENT_MASK_NOTE = (
    "model.document_mask: the stock class attends across <|endoftext|>, so only inputs with a "
    "second document after the first token compute differently (generation stops at it)")


@dataclass(frozen=True)
class Arch:
    """A stock transformers causal LM and the slms options it expresses."""

    name: str  # what --arch takes
    cls: str  # the transformers class
    positions: str  # learned | rope
    norm: str  # layernorm | rmsnorm
    qk_norm: bool  # q_norm/k_norm always present (True) or absent (False)
    gated: bool  # the MLP is gate/up/down (SwiGLU) rather than up/down
    mlp_bias: bool  # the MLP can hold biases
    since: str  # the first transformers release that has it (in the layout mapped here)
    routers: tuple[str, ...] = ()  # the model.moe.router choices it computes; () = dense
    any_every: bool = False  # dense layers between MoE ones (model.moe.every > 1)
    any_renormalize: bool = False  # top-k weights left unnormalised (model.moe.renormalize)

    @property
    def moe(self) -> bool:
        """A mixture-of-experts class."""
        return bool(self.routers)

    def why_not(self, cfg: ModelConfig) -> str | None:
        """The first option of `cfg` this class cannot compute exactly, as one line; None
        when it is exact."""
        common = _common_blocker(cfg)
        if common is not None:
            return common
        if (cfg.moe is not None) != self.moe:
            return (f"model.moe: {self.cls} is a dense class" if cfg.moe is not None else
                    f"model.moe absent: {self.cls} is a mixture-of-experts class")
        if cfg.positions != self.positions:
            return (f"model.positions={cfg.positions}: {self.cls} has "
                    f"{'rotary' if self.positions == 'rope' else 'learned'} positions")
        if cfg.norm != self.norm:
            return f"model.norm={cfg.norm}: {self.cls} uses {_NORM_NAMES[self.norm]}"
        if cfg.qk_norm != self.qk_norm:
            has = "always has" if self.qk_norm else "has no"
            return f"model.qk_norm={str(cfg.qk_norm).lower()}: {self.cls} {has} QK-norm"
        if (cfg.activation == "swiglu") != self.gated:
            mlp = "gated (SwiGLU)" if self.gated else "not gated"
            return f"model.activation={cfg.activation}: {self.cls}'s MLP is {mlp}"
        if cfg.bias and not self.mlp_bias:
            return (f"model.bias=true: {self.cls}'s MLP has no biases (train with "
                    "model.bias=false for a native export)")
        return None if cfg.moe is None else self._moe_blocker(cfg.moe)

    def _moe_blocker(self, moe: MoEConfig) -> str | None:
        if moe.bias:
            return (f"model.moe.bias=true: {self.cls}'s routers and experts have no biases "
                    "(train with model.moe.bias=false for a native export)")
        if moe.router not in self.routers:
            routes = " or ".join(self.routers)
            return f"model.moe.router={moe.router}: {self.cls} routes as {routes}"
        if not moe.renormalize and not self.any_renormalize:
            return f"model.moe.renormalize=false: {self.cls} renormalises the top-k weights"
        if moe.every > 1 and not self.any_every:
            return f"model.moe.every={moe.every}: every layer of {self.cls} is mixture-of-experts"
        return None


_NORM_NAMES = {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}

# simplest first: `choose` takes the first exact one
ARCHES = {a.name: a for a in (
    Arch("llama", "LlamaForCausalLM", "rope", "rmsnorm", False, True, True, "4.28"),
    Arch("arcee", "ArceeForCausalLM", "rope", "rmsnorm", False, False, True, "4.53"),
    Arch("qwen3", "Qwen3ForCausalLM", "rope", "rmsnorm", True, True, False, "4.51"),
    Arch("apertus", "ApertusForCausalLM", "rope", "rmsnorm", True, False, False, "4.56"),
    Arch("gpt2", "GPT2LMHeadModel", "learned", "layernorm", False, False, True, "2.0"),
    # transformers 5 stacks the experts (gate_up_proj, down_proj), as slms does
    Arch("mixtral", "MixtralForCausalLM", "rope", "rmsnorm", False, True, False, "5.0",
         routers=("topk", "noisy_topk")),
    Arch("qwen3_moe", "Qwen3MoeForCausalLM", "rope", "rmsnorm", True, True, False, "5.0",
         routers=("topk", "noisy_topk"), any_every=True, any_renormalize=True),
    # chooses by softmax + e_score_correction_bias (the bias router's expert_bias; zeros for
    # topk), weights the renormalised unbiased probabilities
    Arch("ernie4_5_moe", "Ernie4_5_MoeForCausalLM", "rope", "rmsnorm", False, True, False, "5.0",
         routers=("bias", "topk", "noisy_topk"), any_every=True),
)}


def _common_blocker(cfg: ModelConfig) -> str | None:
    """An option no stock class here expresses."""
    if cfg.logit_softcap > 0:
        return (f"model.logit_softcap={cfg.logit_softcap:g}: no stock class here caps the "
                "logits (cap * tanh(logits / cap))")
    if cfg.bias and not cfg.tie_weights:
        return ("model.tie_weights=false with model.bias=true: the untied lm_head has a bias, "
                "which no stock class has")
    return None


def _nearest(cfg: ModelConfig) -> Arch:
    """The class whose layout this model's would be (its reason is the one shown)."""
    if cfg.positions == "learned":
        return ARCHES["gpt2"]
    if cfg.moe is not None:
        if cfg.qk_norm:
            return ARCHES["qwen3_moe"]
        return ARCHES["ernie4_5_moe" if cfg.moe.router == "bias" or cfg.moe.every > 1
                      else "mixtral"]
    gated = cfg.activation == "swiglu"
    if cfg.qk_norm:
        return ARCHES["qwen3" if gated else "apertus"]
    return ARCHES["llama" if gated else "arcee"]


def installed(arch: Arch) -> str | None:
    """None when the installed transformers has the class (in the layout mapped here), else
    why not (one line)."""
    import transformers
    from packaging.version import Version

    if hasattr(transformers, arch.cls) and Version(transformers.__version__) >= Version(arch.since):
        return None
    return (f"transformers {transformers.__version__} has no {arch.cls} (it needs "
            f"transformers >= {arch.since})")


def choose(cfg: ModelConfig) -> tuple[Arch | None, str | None]:
    """(the simplest exact class, None), or (None, the line naming what prevents one)."""
    for arch in ARCHES.values():
        if arch.why_not(cfg) is None:
            missing = installed(arch)
            return (arch, None) if missing is None else (None, missing)
    return None, _nearest(cfg).why_not(cfg)


def forced(cfg: ModelConfig, name: str) -> Arch | None:
    """The class `--arch name` asks for (None: the custom export); ValueError (one line)
    when it is unknown, missing, or would not be exact."""
    key = name.lower()
    if key == SLMS:
        return None
    by_cls = {a.cls.lower(): a for a in ARCHES.values()}
    arch = ARCHES.get(key) or by_cls.get(key)
    if arch is None:
        raise ValueError(f"--arch {name}: unknown; choose one of {', '.join(ARCHES)}, {SLMS}")
    reason = arch.why_not(cfg) or installed(arch)
    if reason is not None:
        raise ValueError(f"--arch {name}: {arch.cls} would not be exact: {reason}")
    return arch
