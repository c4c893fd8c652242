"""Run configuration: frozen dataclasses, TOML loading, dotted overrides, validation.

A run config has three sections, each handed only to the component that needs it:
``[model]`` (with an optional ``[model.moe]`` table; absent = dense), ``[data]`` and ``[train]``.
Unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from slms.ranges import Range, num, numeric_type, refusal, shown


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message is one actionable line (control
    characters of keys and values quoted in it are escaped, so it stays one line)."""

    def __init__(self, message: str):
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in message))


# Upper bounds on model sizes: far above any small model this package trains (the seed's is
# vocab 2048, n_embd 256, 12 layers, block 1080), yet low enough that a typo or a damaged
# config.json / meta.json (vocab_size 10**12) is refused with one line instead of trying to
# allocate terabytes. Between them a model can still be too big for the machine.
# train.early_stop=none under a time budget: evaluations without a new best val loss before
# the run stops (docs/quality.md "At three data sizes" measures what it costs)
EARLY_STOP_AUTO = 5
MAX_VOCAB_SIZE = 2**24  # 16.7M tokens (uint32 ids; the largest real vocabs are ~256k)
MAX_N_EMBD = 2**16
MAX_N_LAYER = 1024
MAX_BLOCK_SIZE = 2**20  # tokens of context
MAX_MLP_RATIO = 64
MAX_EXPERTS = 4096
MAX_EXPERT_HIDDEN = 2**18
MAX_STEPS = 2**40  # steps, intervals and counts of steps: far beyond any run, well inside int64
MAX_SEED = 2**62  # seeds: numpy takes >= 0, torch.manual_seed(seed + rank) < 2**63
MAX_THREADS = 4096


def check_number(value: Any, rng: Range, integer: bool, key: str) -> None:
    """Raise a ConfigError naming `key` unless `value` is a number of the kind and in `rng`."""
    if (why := refusal(value, rng, integer)) is not None:
        raise ConfigError(f"{key} {why}")


def check_numbers(cfg: Any, prefix: str) -> None:
    """Each numeric field of dataclass `cfg` holds a finite number in its Range (None where its
    type allows it). Every numeric field of a config has a Range (a test holds them to it)."""
    hints = _field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        kind = numeric_type(hints[f.name])
        value = getattr(cfg, f.name)
        if kind is None or "range" not in f.metadata or value is None:
            continue
        check_number(value, f.metadata["range"], kind is int, f"{prefix}.{f.name}")


# The choices of a string key, written once: the loader refuses any other value (`_coerce`),
# and the tuples below name them for the CLI and for the code that picks one.
Activation = Literal["relu", "gelu", "relu2", "swiglu"]  # slms.model.activations
Router = Literal["noisy_topk", "topk", "bias"]
ACTIVATIONS: tuple[str, ...] = typing.get_args(Activation)
ROUTERS: tuple[str, ...] = typing.get_args(Router)


@dataclass(frozen=True)
class MoEConfig:
    n_experts: int = num(8, 1, MAX_EXPERTS)
    top_k: int = num(2, 1, MAX_EXPERTS)
    router: Router = "noisy_topk"  # noisy_topk is the seed's
    # default: mlp_ratio * n_embd, as the seed's experts
    expert_hidden: int | None = num(None, 1, MAX_EXPERT_HIDDEN)
    every: int = num(1, 1, MAX_N_LAYER)  # layer i is MoE when i % every == every - 1
    renormalize: bool = True  # top-k weights sum to one (the seed softmaxes the top-k logits)
    # Switch balancing loss weight; None: 0.01, or 0 for the `bias` router, which balances
    # without an auxiliary loss (set it to add the loss on top of the bias)
    aux_loss_coef: float | None = num(None, 0)
    z_loss_coef: float = num(0.001, 0)
    # > 0: in training, each expert takes at most floor(cf * top_k * tokens / n_experts)
    # assignments of a call (first choices first); evaluation and generation are dropless
    capacity_factor: float = num(0.0, 0, 1000, note="0 = dropless")
    bias_update_rate: float = num(0.001, 0, 1)  # the `bias` router's u
    # false: neither the router's linear layers nor the experts have biases (the stock MoE
    # classes of transformers and llama.cpp have none: needed to export to them)
    bias: bool = True

    @property
    def balance_coef(self) -> float:
        """The balancing loss weight in effect (aux_loss_coef resolved)."""
        if self.aux_loss_coef is not None:
            return self.aux_loss_coef
        return 0.0 if self.router == "bias" else 0.01

    def validate(self, n_layer: int) -> None:
        _check_choices(self, "model.moe")
        check_numbers(self, "model.moe")
        _check(self.top_k <= self.n_experts, "model.moe.top_k",
               f"must be between 1 and n_experts ({self.n_experts})")
        _check(self.every <= n_layer, "model.moe.every", f"must be in 1..n_layer ({n_layer})")


@dataclass(frozen=True)
class ModelConfig:
    # None: the vocab of the prepared data's tokenizer
    vocab_size: int | None = num(None, 1, MAX_VOCAB_SIZE)
    block_size: int = num(256, 1, MAX_BLOCK_SIZE)
    n_layer: int = num(4, 1, MAX_N_LAYER)
    n_head: int = num(4, 1, MAX_N_EMBD)
    n_embd: int = num(128, 1, MAX_N_EMBD)
    dropout: float = num(0.0, 0, 1, hi_open=True)  # embedding, residual, MLP and MoE outputs
    # attention probabilities; none: model.dropout. On CPU any rate > 0 takes attention off its
    # fused kernel: a training step ~1.7x slower (docs/benchmarks.md "Dropout on CPU")
    attn_dropout: float | None = num(None, 0, 1, hi_open=True, note="none = model.dropout")
    bias: bool = True  # biases in linear layers
    qkv_bias: bool = True  # the seed's per-head q/k/v projections have none
    tie_weights: bool = True
    # relu (the seed's) | gelu | relu2 (ReLU squared) | swiglu (gated)
    activation: Activation = "relu"
    mlp_ratio: int = num(4, 1, MAX_MLP_RATIO)
    # head_dim: 1/sqrt(head_dim); n_embd: the seed's 1/sqrt(n_embd)
    attn_scale: Literal["head_dim", "n_embd"] = "head_dim"
    # Modern options, all off by default (the seed's and older checkpoints compute as before):
    # learned (a position embedding) | rope (rotary on q and k)
    positions: Literal["learned", "rope"] = "learned"
    rope_base: float = num(10000.0, 1, lo_open=True)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    qk_norm: bool = False  # RMSNorm of q and k per head before attention
    zero_init_proj: bool = False  # output projections (attention, MLP, experts) start at zero
    logit_softcap: float = num(0.0, 0, note="0 = off")  # > 0: logits = cap * tanh(logits / cap)
    # in packed rows a token attends only to earlier tokens of its own document (documents
    # begin at <|endoftext|>, id 0: slms.model.gpt.document_starts); positions stay absolute
    document_mask: bool = False
    moe: MoEConfig | None = None

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def is_moe_layer(self, i: int) -> bool:
        return self.moe is not None and i % self.moe.every == self.moe.every - 1

    def validate(self) -> None:
        _check_choices(self, "model")
        check_numbers(self, "model")
        _check(self.n_embd % self.n_head == 0, "model.n_embd",
               f"must be divisible by model.n_head ({self.n_head})")
        _check(self.positions != "rope" or self.head_dim % 2 == 0, "model.positions",
               "rope needs an even head size (n_embd / n_head)")
        if self.moe is not None:
            self.moe.validate(self.n_layer)


@dataclass(frozen=True)
class DataConfig:
    # A prepared data dir (train.bin/val.bin/meta.json) or any source `slms prepare` accepts.
    # None: the embedded corpus is generated, tokenized and prepared into a cache.
    path: str | None = None
    tokenizer: str | None = None  # tokenizer.json; None: trained (and cached) on the source
    vocab_size: int = num(2048, 1, MAX_VOCAB_SIZE)  # for a tokenizer trained here
    stories: int = num(6000, 1, 10**9)  # embedded corpus size
    seed: int = num(0, 0, MAX_SEED)  # embedded corpus and validation carve-out
    cache_dir: str = ".cache/slms"

    def validate(self) -> None:
        check_numbers(self, "data")


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = num(1000, 1, MAX_STEPS)
    batch_size: int = num(16, 1, 2**24)
    grad_accum: int = num(1, 1, 2**24)
    lr: float = num(1e-3, 0, lo_open=True)
    min_lr_ratio: float = num(0.1, 0, 1)  # cosine floor as a fraction of lr
    # cosine (with warmup) | onecycle (the seed's) | constant
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_steps: int = num(50, 0, MAX_STEPS)
    weight_decay: float = num(0.1, 0)
    # muon: Muon on hidden matrices, AdamW on the rest
    optimizer: Literal["adamw", "muon"] = "adamw"
    # the Muon groups' peak lr; 0 = train.lr (updates are RMS-matched)
    muon_lr: float = num(0.0, 0, note="0 = train.lr")
    muon_momentum: float = num(0.95, 0, 1, hi_open=True)
    # orthogonalise fused matrices (qkv; SwiGLU's gate and up) per block, as separate matrices
    # (docs/quality.md "Muon on fused matrices": better at equal steps; false = whole)
    muon_split: bool = True
    beta1: float = num(0.9, 0, 1, hi_open=True)
    beta2: float = num(0.95, 0, 1, hi_open=True)
    grad_clip: float = num(1.0, 0, note="0 = off")
    eval_every: int = num(200, 1, MAX_STEPS)
    log_every: int = num(10, 1, MAX_STEPS)
    checkpoint_every: int = num(500, 1, MAX_STEPS)
    seed: int = num(1337, 0, MAX_SEED)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # auto: bf16 autocast where bf16 matmuls measure fast (slms.precision), else fp32 | fp32 |
    # bf16 | fp16 (autocast; fp16 with loss scaling)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    threads: int = num(0, 0, MAX_THREADS, note="0 = torch's default")  # torch CPU threads
    keep_freed_memory: bool = True  # on CPU: glibc keeps freed memory for reuse (slms.memory)
    # > 0: sets max_steps to this many epochs: real passes over the rows of padded data; for
    # packed data a budget of as many tokens (windows are drawn at random offsets)
    epochs: float = num(0.0, 0, 10**6, note="0 = use train.max_steps")
    # > 0: train for this many minutes (evaluation excluded): the first steps are timed, then
    # max_steps is fixed to fit (slms.train.budget); overrides max_steps and epochs
    max_minutes: float = num(0.0, 0, 10**7, note="0 = no time budget")
    # stop after this many evaluations without a new best val loss; 0: off; none: auto, which
    # is EARLY_STOP_AUTO evaluations under a time budget (train.max_minutes) and off otherwise
    early_stop: int | None = num(None, 0, MAX_STEPS, note="0 = off, none = auto")
    # choose dropout and weight decay for the passes over the training tokens that the budget
    # allows (slms.train.adapt; docs/quality.md "At three data sizes"); false: the config's
    adapt: bool = False
    keep_checkpoints: int = num(2, 1, 2**20)  # newest step checkpoints kept (best/ is kept apart)
    # auto: continue the --out directory when it holds checkpoints
    resume: Literal["never", "auto"] = "never"
    max_bad_steps: int = num(10, 1, MAX_STEPS)  # this many non-finite steps in a row stop the run
    grad_checkpointing: bool = False  # recompute each block in the backward pass
    compile: bool = False  # torch.compile the model
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun; fsdp: FSDP2 fully_shard per block
    # per device FLOP/s for MFU; 0 = detected for known GPUs
    peak_flops: float = num(0.0, 0, note="0 = detect")
    tensorboard: bool = False  # also write TensorBoard events (needs `tensorboard`)
    # a checkpoint (or run directory) whose weights a NEW run starts from, e.g. one written by
    # `slms upcycle`; its model config must equal this run's (training-only settings aside)
    init_from: str | None = None
    # with init_from: the step of the source run its weights are from. The run continues that
    # run there: the batches of steps init_step.. (batches are a function of seed and step) and
    # its learning-rate schedule, planned over init_total steps (0 = train.max_steps) and
    # continued from init_step over the steps up to train.max_steps (optim.Schedule.refit)
    init_step: int = num(0, 0, MAX_STEPS)
    init_total: int = num(0, 0, MAX_STEPS, note="0 = train.max_steps")

    @property
    def patience(self) -> int:
        """train.early_stop resolved: evaluations without a new best before stopping (0: off)."""
        if self.early_stop is not None:
            return self.early_stop
        return EARLY_STOP_AUTO if self.max_minutes > 0 else 0

    def validate(self) -> None:
        _check_choices(self, "train")
        check_numbers(self, "train")
        _check(DEVICE.fullmatch(self.device) is not None, "train.device",
               f"must be auto, cpu, cuda, cuda:N or mps, got {shown(self.device)}")
        _check(not self.init_step or bool(self.init_from), "train.init_step",
               "continues the run train.init_from names: set train.init_from too")


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        # the name becomes a directory under runs/: it must not lead out of it
        _check(bool(self.name) and not any(c in self.name for c in "/\\")
               and self.name not in (".", "..") and self.name.isprintable()
               and len(self.name) <= 200, "name",
               f"{shown(self.name)} must be a plain name of at most 200 printable characters, "
               "without '/' or '\\' and not '..' (it "
               "names the run directory runs/NAME-TIME; choose the directory itself with --out)")
        self.model.validate()
        self.data.validate()
        self.train.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# the devices a config or --device may name (slms.devices checks that this machine has it)
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d{1,3})?")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}")


def choices_of(cls: type, name: str) -> tuple[Any, ...] | None:
    """The values field `name` of dataclass `cls` allows (its Literal's), or None: any of its
    type."""
    tp = _field_types(cls)[name]
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # resolved: `from __future__ import annotations` above


def _check_choice(value: Any, choices: tuple[Any, ...], key: str) -> Any:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def _check_choices(cfg: Any, prefix: str) -> None:
    """Each Literal field of dataclass `cfg` holds one of its choices (the loader checks them
    too; this catches a config made in code)."""
    for f in dataclasses.fields(cfg):
        choices = choices_of(type(cfg), f.name)
        if choices is not None:
            _check_choice(getattr(cfg, f.name), choices, f"{prefix}.{f.name}")


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass with type checking


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "none")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; returns the (possibly converted) value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if errors else ConfigError(f"{key}: bad value {value!r}")
    if origin is Literal:
        return _check_choice(value, typing.get_args(tp), key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table of settings, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer beyond any float
                raise ConfigError(f"{key} must be a finite number, got {shown(value)}") from None
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key} must be of type {_type_name(tp)}, got {value!r}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a (nested) dict, rejecting unknown keys and wrong types."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key '{full}' (known keys here: {known})")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    """An override's value is a TOML literal (1, 0.5, true, "x", [1, 2]); anything else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides to a nested config dict (returns a new dict)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {shown(item)} must look like section.key=value "
                              "(e.g. train.max_steps=50)")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{dotted}': '{part}' is not a section")
            node = child
        value = _parse_value(text.strip())
        if parts[-1] == "moe" and isinstance(value, str) and value.lower() in ("none", "off"):
            value = None  # model.moe=none turns an MoE config into its dense twin
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a TOML run config (or the defaults when `path` is None) and apply overrides."""
    data: dict[str, Any] = {}
    name = "run"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found (see configs/ for presets)")
        data = parse_toml(path.read_bytes(), path)
        name = path.stem
    data.setdefault("name", name)
    return run_config_from_dict(data, overrides)


def parse_toml(raw: bytes, path: str | Path) -> dict[str, Any]:
    """The table of a TOML document (`raw`, the bytes of file `path`), or a ConfigError that
    names the file and what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                          f"{e.start}): save it as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path} is not a config: its arrays or tables nest too deeply") from None


def run_config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """A validated RunConfig from a config dict (a TOML file's, or a run's resolved
    run_config.json, whose extra `data_dir` entry is ignored) plus overrides."""
    data = {k: v for k, v in data.items() if k != "data_dir"}
    cfg = from_dict(RunConfig, apply_overrides(data, overrides or []))
    cfg.validate()
    return cfg


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    cfg = from_dict(ModelConfig, data, prefix="model")
    cfg.validate()
    return cfg


def override_text(value: Any) -> str:
    """A config value as an override would write it (none, true, 0.1)."""
    if value is None:
        return "none"
    return str(value).lower() if isinstance(value, bool) else str(value)


def model_config_diff(a: ModelConfig, b: ModelConfig, ignore: tuple[str, ...] = ()
                      ) -> list[tuple[str, Any, Any]]:
    """(key, a's value, b's value) of each model key that differs, named as an override
    (model.n_layer, model.moe.top_k) and not in `ignore`; dense against MoE is the one key
    model.moe (none / a table), not each of its fields."""
    flat_a, flat_b = _flat_model(a), _flat_model(b)
    return [(k, flat_a.get(k), flat_b.get(k)) for k in sorted(flat_a.keys() | flat_b.keys())
            if k not in ignore and flat_a.get(k) != flat_b.get(k)]


def _flat_model(cfg: ModelConfig) -> dict[str, Any]:
    out = {f"model.{k}": v for k, v in dataclasses.asdict(cfg).items() if k != "moe"}
    if cfg.moe is None:
        return out | {"model.moe": None}
    return out | {"model.moe": "(a table)"} | {
        f"model.moe.{k}": v for k, v in dataclasses.asdict(cfg.moe).items()}
