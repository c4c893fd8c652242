"""Option groups shared by several commands, each declared once, and the small helpers that turn
parsed options into the objects the commands use."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from slms.config import MAX_THREADS
from slms.data.sources import SEPARATORS, Source, SourceOptions
from slms.infer.sampling import Sampling
from slms.ranges import Range, numeric_type, range_of, refusal

CHECKPOINT_HELP = "run or checkpoint directory"


def number(kind: type, lo: float | None = None, hi: float | None = None, *,
           lo_open: bool = False, hi_open: bool = False, note: str = "") -> Callable[[str], Any]:
    """An argparse type for an option that takes a number: an int (kind int) or a finite float
    in the Range given; anything else is refused with the rule (`slms: error: argument
    --batch-size: must be an integer >= 1, got 0`)."""
    return _number_type(kind, Range(lo, hi, lo_open, hi_open, note))


def _number_type(kind: type, rng: Range) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value: Any = kind(text)
        except (ValueError, OverflowError):
            value = text
        if (why := refusal(value, rng, kind is int)) is not None:
            raise argparse.ArgumentTypeError(why)
        return value

    parse.__name__ = kind.__name__
    return parse


POSITIVE = number(int, 1)  # a count of things that must be at least one
THREADS = number(int, 0, MAX_THREADS, note="0 = torch's default")


def add_checkpoint(p: argparse.ArgumentParser, help: str = CHECKPOINT_HELP) -> None:
    p.add_argument("checkpoint", help=help)


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=device_name, default="cpu",
                   help="cpu (default), cuda, cuda:N, mps or auto (the best this machine has)")


def device_name(text: str) -> str:
    """--device: a device this machine has (checked here, so that a missing GPU is never blamed
    on the files a command reads); auto becomes the best one."""
    if text == "cpu":
        return text  # without importing torch
    from slms.devices import resolve_device

    try:
        return str(resolve_device(text, "--device"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--device ")) from None


def add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32",
                   help="weights for generation: bf16 halves their memory traffic; auto: bf16 "
                   "where measured probes find bf16 matmuls fast, one-row ones (decoding) "
                   "included (default fp32)")


def load_model(args: argparse.Namespace):  # noqa: ANN201
    """(model, tokenizer) of args.checkpoint on args.device in args.precision."""
    import torch

    import slms
    from slms.precision import inference_dtype

    model, tok = slms.load(args.checkpoint, device=args.device)
    return model.to(inference_dtype(args.precision, torch.device(args.device))), tok


def add_overrides(p: argparse.ArgumentParser, help: str | None = None) -> None:
    """Dotted KEY=VALUE config overrides, taken in any order with the options."""
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=help)


def add_field(p: argparse._ActionsContainer, cls: type, name: str,
              *flags: str, help: str | None = None, **kwargs: Any) -> argparse.Action:
    """An option for field `name` of dataclass `cls` (flag --NAME-WITH-DASHES unless `flags`
    are given), its default and type the field's, so that a default is written once: a
    Literal's values are its choices, `X | None` takes an X, a tuple is taken as the comma-
    separated text of its items (its default written so; the command parses it). `%(default)s`
    in `help` shows the default; `kwargs` go to add_argument (a command's own default among
    them)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    tp = typing.get_type_hints(cls)[name]
    kind, rng = numeric_type(tp), range_of(cls, name)
    checked = {"type": _number_type(kind, rng)} if kind and rng else {}
    kwargs = {"default": _option_text(default), **_option_type(tp), **checked, **kwargs}
    return p.add_argument(*(flags or (f"--{name.replace('_', '-')}",)), help=help, **kwargs)


def _option_type(tp: Any) -> dict[str, Any]:
    """add_argument's type (or choices) for a field of type `tp`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        (tp,) = (a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is Literal:
        return {"choices": typing.get_args(tp)}
    if tp in (int, float):
        return {"type": tp}
    if tp is str or typing.get_origin(tp) is tuple:
        return {}
    raise TypeError(f"no command-line option for a field of type {tp}")


def _option_text(value: Any) -> Any:
    """A default as its option takes it: a tuple as comma-separated items."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else value


def add_generation(p: argparse.ArgumentParser, default_length: bool = True) -> None:
    """The generation length and the sampling options of `generate` and `chat`, defaults
    Sampling's; without default_length, --max-new-tokens is None unless given (the command
    chooses)."""
    if default_length:
        add_field(p, Sampling, "max_new_tokens", help="default %(default)s")
    else:
        add_field(p, Sampling, "max_new_tokens", default=None)
    add_field(p, Sampling, "temperature", help="0 = greedy (default %(default)s)")
    add_field(p, Sampling, "top_k", help="0 = off (default %(default)s)")
    add_field(p, Sampling, "top_p")
    add_field(p, Sampling, "repetition_penalty", help="1 = off (default %(default)s)")
    add_field(p, Sampling, "seed")


def sampling_of(args: argparse.Namespace, max_new_tokens: int) -> Sampling:
    """The Sampling the options of `add_generation` ask for (it checks their values)."""
    return Sampling(max_new_tokens, args.temperature, args.top_k or None, args.top_p,
                    args.repetition_penalty, args.seed)


def add_source(p: argparse.ArgumentParser) -> None:
    """Options of every command that reads a SOURCE."""
    add_field(p, SourceOptions, "separator", choices=SEPARATORS,
              help=".txt story separator: <|endoftext|> lines (default), blank lines, or "
              "single line breaks (paragraphs then separated by blank lines)")
    add_field(p, SourceOptions, "text_field", help="text field of .jsonl/.parquet/hub data")
    p.add_argument("--streaming", action="store_true",
                   help="stream a hub dataset instead of downloading it first")
    add_field(p, SourceOptions, "val_fraction",
              help="validation share carved out of a source without a validation split")
    add_field(p, SourceOptions, "seed")


def source_of(name: str, args: argparse.Namespace) -> Source:
    return Source(name, SourceOptions(separator=args.separator, text_field=args.text_field,
                                      streaming=args.streaming, val_fraction=args.val_fraction,
                                      seed=args.seed))


def resolve_config_path(name: str) -> Path:
    """A config path, or a preset name looked up in ./configs and the source tree's configs/."""
    path = Path(name)
    if path.suffix == ".toml" or path.exists():
        return path
    for root in (Path("configs"), Path(__file__).resolve().parents[3] / "configs"):
        if (root / f"{name}.toml").is_file():
            return root / f"{name}.toml"
    return path  # load_config reports it missing


def config_file(name: str) -> Path:
    """resolve_config_path, refusing a directory with a line that says what to give instead."""
    path = resolve_config_path(name)
    if path.is_dir():
        from slms.rundir import RUN_CONFIG

        if (path / RUN_CONFIG).is_file():
            raise ValueError(f"{path} is a run directory, not a config file: continue the run "
                             f"with `slms train --resume {path}`")
        raise ValueError(f"{path} is a directory; give a TOML config file or a preset name "
                         "(configs/NAME.toml)")
    return path


def split_config(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """(config, overrides) where a KEY=VALUE in the config position (`slms train key=value`
    without a config) is the first override."""
    if config is not None and "=" in config:
        return None, [config, *overrides]
    return config, list(overrides)
