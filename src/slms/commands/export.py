"""`slms export`: write a Hugging Face transformers model directory."""

from __future__ import annotations

import argparse

from slms.commands import options

HELP = "write a Hugging Face transformers model directory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_checkpoint(p)
    p.add_argument("--hf", required=True, metavar="OUT",
                   help="directory for save_pretrained (safetensors) and the tokenizer")


def run(args: argparse.Namespace) -> int:
    from importlib.util import find_spec

    if find_spec("transformers") is None:
        raise ValueError("export --hf needs transformers: pip install 'slms[hf]'")
    import slms
    from slms.hf import export_hf

    model, tok = slms.load(args.checkpoint)
    out = export_hf(model, tok, args.hf)
    print(f"wrote {out} (load with `import slms.hf` then "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0
