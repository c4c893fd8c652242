"""Option groups shared by several commands, each declared once, and the small helpers that turn
parsed options into the objects the commands use."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slms.data.sources import Source
    from slms.infer.generate import Sampling

CHECKPOINT_HELP = "run or checkpoint directory"


def add_checkpoint(p: argparse.ArgumentParser, help: str = CHECKPOINT_HELP) -> None:
    p.add_argument("checkpoint", help=help)


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu")


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


def add_generation(p: argparse.ArgumentParser, max_new_tokens: int | None) -> None:
    """The generation length and the sampling options of `generate` and `chat`."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = off")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def sampling_of(args: argparse.Namespace, max_new_tokens: int) -> Sampling:
    """The Sampling the options of `add_generation` ask for (it checks their values)."""
    from slms.infer.generate import Sampling

    return Sampling(max_new_tokens, args.temperature, args.top_k or None, args.top_p,
                    args.repetition_penalty, args.seed)


def add_source(p: argparse.ArgumentParser) -> None:
    """Options of every command that reads a SOURCE."""
    p.add_argument("--separator", choices=["eot", "blank-line", "newline"], default="eot",
                   help=".txt story separator: <|endoftext|> lines (default), blank lines, or "
                   "single line breaks (paragraphs then separated by blank lines)")
    p.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet/hub data")
    p.add_argument("--streaming", action="store_true",
                   help="stream a hub dataset instead of downloading it first")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="validation share carved out of a source without a validation split")
    p.add_argument("--seed", type=int, default=0)


def source_of(name: str, args: argparse.Namespace) -> Source:
    from slms.data.sources import Source, SourceOptions

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
