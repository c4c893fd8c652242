"""`slms export`: write a Hugging Face transformers model directory (a stock class where one
computes exactly the model's function: it then loads without slms; else the custom one)
and/or a GGUF file for llama.cpp."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from slms.commands import options

if TYPE_CHECKING:
    from slms.export.arches import Arch
    from slms.model import GPT
    from slms.tokenizer import Tokenizer

HELP = "write a Hugging Face transformers model directory and/or a GGUF file for llama.cpp"
ARCH_HELP = ("the transformers class to write: llama, arcee, qwen3, apertus, gpt2, mixtral, "
             "qwen3_moe, ernie4_5_moe (an error when it would not be exact), or slms (the "
             "custom class, needs `import slms.hf`); default: the simplest exact stock "
             "class, else slms")
# slms.export.llamacpp.OUTTYPES's keys, without importing torch and gguf to build the parser
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_checkpoint(p)
    p.add_argument("--hf", default=None, metavar="OUT",
                   help="directory for save_pretrained (safetensors), the tokenizer and a "
                   "model card (README.md)")
    p.add_argument("--gguf", default=None, metavar="FILE",
                   help="GGUF file for llama.cpp, Ollama, LM Studio (needs the gguf package)")
    p.add_argument("--outtype", default="f32", choices=OUTTYPES,
                   help="the GGUF file's weight type (default f32; vectors stay f32)")
    p.add_argument("--arch", default=None, metavar="NAME", help=ARCH_HELP)


def run(args: argparse.Namespace) -> int:
    from importlib.util import find_spec

    if args.hf is None and args.gguf is None:
        raise ValueError("export needs --hf DIR (transformers) and/or --gguf FILE (llama.cpp)")
    if args.hf is not None and find_spec("transformers") is None:
        raise ValueError("export --hf needs transformers: pip install 'slms[hf]'")
    if args.gguf is not None and find_spec("gguf") is None:
        raise ValueError("export --gguf needs the gguf package: pip install 'slms[gguf]'")
    import slms
    from slms.export.write import check_gguf_out, check_out, gguf_arch
    from slms.rundir import resolve

    checkpoint = resolve(args.checkpoint)
    if args.hf is not None:
        check_out(Path(args.hf), checkpoint)  # before the model is loaded
    if args.gguf is not None:
        check_gguf_out(Path(args.gguf), checkpoint)
    model, tok = slms.load(checkpoint)
    # before anything is written: a model llama.cpp cannot run is one line
    arch = gguf_arch(model, args.arch) if args.gguf is not None else None
    if args.hf is not None:
        _hf(model, tok, args, checkpoint)
    if arch is not None:
        _gguf(model, tok, args, arch, checkpoint)
    return 0


def _hf(model: GPT, tok: Tokenizer, args: argparse.Namespace, checkpoint: Path) -> None:
    from slms.export import export_model

    gguf = Path(args.gguf).name if args.gguf is not None else None
    result = export_model(model, tok, args.hf, args.arch, checkpoint, gguf=gguf)
    out = str(result.out)
    if result.arch is not None:
        print(f"wrote {out}: {result.arch.cls}, a stock transformers class (logits checked "
              f"against slms's: relative difference {result.max_diff:.1e}); it loads without "
              f"slms: AutoModelForCausalLM.from_pretrained({out!r})")
    else:
        if result.reason is not None:
            print(f"no stock transformers class is exact: {result.reason}")
        print(f"wrote {out} in the custom slms class (load with `import slms.hf` then "
              f"AutoModelForCausalLM.from_pretrained({out!r}))")
    for note in result.notes if result.arch is not None else []:
        print(f"note: {note}")


def _gguf(model: GPT, tok: Tokenizer, args: argparse.Namespace, arch: Arch,
          checkpoint: Path) -> None:
    from slms.export.write import export_gguf

    written = export_gguf(model, tok, args.gguf, arch, args.outtype, checkpoint)
    types = ", ".join(f"{n} {t}" for t, n in sorted(written.types.items()))
    size = written.path.stat().st_size
    print(f"wrote {written.path}: llama.cpp architecture {written.arch}, {size:,} bytes "
          f"({types} tensors); run it: llama-cli -m {written.path}")
    for note in written.notes:
        print(f"note: {note}")
