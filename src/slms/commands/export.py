"""`slms export`: write a Hugging Face transformers model directory: a stock class where one
computes exactly the model's function (it then loads without slms), else the custom one."""

from __future__ import annotations

import argparse

from slms.commands import options

HELP = "write a Hugging Face transformers model directory"
ARCH_HELP = ("the transformers class to write: llama, arcee, qwen3, apertus, gpt2, mixtral, "
             "qwen3_moe, ernie4_5_moe (an error when it would not be exact), or slms (the "
             "custom class, needs `import slms.hf`); default: the simplest exact stock "
             "class, else slms")


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_checkpoint(p)
    p.add_argument("--hf", required=True, metavar="OUT",
                   help="directory for save_pretrained (safetensors), the tokenizer and a "
                   "model card (README.md)")
    p.add_argument("--arch", default=None, metavar="NAME", help=ARCH_HELP)


def run(args: argparse.Namespace) -> int:
    from importlib.util import find_spec

    if find_spec("transformers") is None:
        raise ValueError("export --hf needs transformers: pip install 'slms[hf]'")
    from pathlib import Path

    import slms
    from slms.export import export_model
    from slms.export.write import check_out
    from slms.rundir import resolve

    checkpoint = resolve(args.checkpoint)
    check_out(Path(args.hf), checkpoint)  # before the model is loaded
    model, tok = slms.load(checkpoint)
    result = export_model(model, tok, args.hf, args.arch, checkpoint)
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
    return 0
