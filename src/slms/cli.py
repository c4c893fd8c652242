"""The `slms` command line: argument parsing and dispatch only; each subcommand calls one
function. User mistakes print one line (`slms: error: ...`) and exit with status 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from slms import __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        if os.environ.get("SLMS_DEBUG"):
            raise
        print(f"slms: error: {e}", file=sys.stderr)
        return 2


class _IntermixedParser(argparse.ArgumentParser):
    """A subcommand parser that takes options and positionals in any order, so that
    `slms train CONFIG --out DIR key=value` works as well as `slms train CONFIG key=value
    --out DIR` (plain argparse stops filling `overrides` at the first option)."""

    _mixing = False

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201
        if self._mixing:  # parse_known_intermixed_args calls back here for each pass
            return super().parse_known_args(args, namespace)
        self._mixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._mixing = False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slms", description="Train, run and analyse small GPT language models, dense and "
        "Mixture-of-Experts, on TinyStories-style text.")
    p.add_argument("--version", action="version", version=f"slms {__version__}")
    sub = p.add_subparsers(title="commands", metavar="COMMAND", parser_class=_IntermixedParser)

    c = sub.add_parser("demo", help="the whole pipeline on the embedded corpus, on the CPU")
    c.add_argument("config", nargs="?", default="tiny", help="config (default: tiny)")
    c.add_argument("--out", help="run directory (default runs/demo-<time>)")
    c.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    c.set_defaults(func=cmd_demo)

    c = sub.add_parser("corpus", help="write the embedded story corpus as train.txt / val.txt")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--stories", type=int, default=None, help="number of stories (default 6000)")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_corpus)

    c = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a text source")
    c.add_argument("--data", default="synthetic", help="SOURCE (default: the embedded corpus)")
    c.add_argument("--vocab-size", type=int, default=2048)
    c.add_argument("--out", required=True, help="tokenizer.json to write")
    c.add_argument("--max-train-bytes", type=float, default=None,
                   help="train on a seeded sample of about this many bytes (e.g. 2e8)")
    add_source_options(c)
    c.set_defaults(func=cmd_tokenizer)

    c = sub.add_parser("prepare", help="tokenize a source into packed train.bin / val.bin")
    c.add_argument("--source", default="synthetic",
                   help="synthetic | .txt/.jsonl/.parquet file or directory | hub dataset id")
    c.add_argument("--tokenizer", required=True, help="tokenizer.json")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--train-count", type=int, help="use a seeded sample of N training stories")
    c.add_argument("--val-count", type=int, help="use a seeded sample of N validation stories")
    c.add_argument("--num-proc", type=int, default=1, help="tokenizer processes")
    c.add_argument("--fix-text", action="store_true",
                   help="repair mojibake (e.g. \u00e2\u20ac\u2122) and normalise unicode")
    c.add_argument("--dedupe", action="store_true", help="drop duplicate stories")
    c.add_argument("--layout", choices=["packed", "padded"], default="packed",
                   help="packed streams (default) or the seed's one padded story per row")
    c.add_argument("--block-size", type=int, default=1080, help="row width of --layout padded")
    add_source_options(c)
    c.set_defaults(func=cmd_prepare)

    c = sub.add_parser("train", help="train a model from a TOML config")
    c.add_argument("config", nargs="?", help="TOML config or preset name (configs/NAME.toml)")
    c.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. train.max_steps=50 model.n_layer=2")
    c.add_argument("--out", help="run directory (default runs/<config>-<time>)")
    c.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    c.set_defaults(func=cmd_train)

    c = sub.add_parser("plot", help="PNG loss curves (and MoE expert load) of a training run")
    c.add_argument("run_dir", help="run directory (holds metrics.jsonl)")
    c.set_defaults(func=cmd_plot)

    c = sub.add_parser("info", help="parameters (total, active), FLOPs per token, memory")
    c.add_argument("target", help="TOML config, preset name, run or checkpoint directory")
    c.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_info)

    c = sub.add_parser("generate", help="continue a prompt with a trained model")
    c.add_argument("checkpoint", help="run or checkpoint directory")
    c.add_argument("--prompt", default="", help="text to continue (default: a new story)")
    c.add_argument("--max-new-tokens", type=int, default=200)
    add_sampling_options(c)
    c.add_argument("--truncate", choices=["left"], help="keep the end of a too-long prompt")
    c.add_argument("--device", default="cpu")
    c.set_defaults(func=cmd_generate)

    c = sub.add_parser("eval", help="loss, perplexity and bits per byte over a whole split")
    c.add_argument("checkpoint", help="run or checkpoint directory")
    c.add_argument("--data", help="prepared data directory or SOURCE (default: the run's data)")
    c.add_argument("--split", default="val", choices=["train", "val"])
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--device", default="cpu")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_eval)

    c = sub.add_parser("bench", help="training and generation speed, time to first token, memory")
    c.add_argument("targets", nargs="+", metavar="TARGET",
                   help="run / checkpoint directories or configs (random weights); KEY=VALUE "
                   "items override the configs; two targets are printed side by side")
    c.add_argument("--new-tokens", type=int, default=256, help="batch-1 generation length")
    c.add_argument("--b8-new-tokens", type=int, default=64, help="batch-8 generation length")
    c.add_argument("--prompt-tokens", type=int, default=16)
    c.add_argument("--train-batch", type=int, default=8)
    c.add_argument("--train-block", type=int, default=256)
    c.add_argument("--train-steps", type=int, default=3)
    c.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    c.add_argument("--device", default="cpu")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_bench)

    c = sub.add_parser("chat", help="interactive story generation (:help lists the commands)")
    c.add_argument("checkpoint", help="run or checkpoint directory")
    c.add_argument("--max-new-tokens", type=int, default=None)
    add_sampling_options(c)
    c.add_argument("--device", default="cpu")
    c.set_defaults(func=cmd_chat)

    c = sub.add_parser("experts", help="expert load, specialisation, heatmap and HTML map")
    c.add_argument("checkpoint", help="run or checkpoint directory of an MoE model")
    c.add_argument("--data", help="prepared data directory or SOURCE (default: the run's data)")
    c.add_argument("--split", default="val", choices=["train", "val"])
    c.add_argument("--max-tokens", type=int, default=50_000, help="tokens to route")
    c.add_argument("--text", help="text for the HTML page (default: the split's first story)")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--device", default="cpu")
    c.set_defaults(func=cmd_experts)

    c = sub.add_parser("import-seed", help="convert a checkpoint written by the seed's code")
    c.add_argument("seed", help="the seed's .pt checkpoint (loaded with weights_only=True)")
    c.add_argument("--tokenizer", required=True, help="the seed's tokenizer.json")
    c.add_argument("--out", required=True, help="checkpoint directory to write")
    c.set_defaults(func=cmd_import_seed)

    c = sub.add_parser("export", help="write a Hugging Face transformers model directory")
    c.add_argument("checkpoint", help="run or checkpoint directory")
    c.add_argument("--hf", required=True, metavar="OUT",
                   help="directory for save_pretrained (safetensors) and the tokenizer")
    c.set_defaults(func=cmd_export)
    return p


def resolve_config_path(name: str) -> Path:
    """A config path, or a preset name looked up in ./configs and the source tree's configs/."""
    path = Path(name)
    if path.suffix == ".toml" or path.exists():
        return path
    for root in (Path("configs"), Path(__file__).resolve().parents[2] / "configs"):
        if (root / f"{name}.toml").is_file():
            return root / f"{name}.toml"
    return path  # load_config reports it missing


def cmd_demo(args: argparse.Namespace) -> int:
    from slms.demo import run_demo

    run_demo(resolve_config_path(args.config), args.overrides, args.out)
    return 0


def cmd_corpus(args: argparse.Namespace) -> int:
    from slms import corpus

    n = args.stories if args.stories is not None else corpus.DEFAULT_STORIES
    train, val = corpus.write_corpus(args.out, n_stories=n, seed=args.seed)
    print(f"wrote {train} and {val} ({n} stories, seed {args.seed})")
    return 0


def add_sampling_options(c: argparse.ArgumentParser) -> None:
    """Sampling options shared by `generate` and `chat`."""
    c.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    c.add_argument("--top-k", type=int, default=50, help="0 = off")
    c.add_argument("--top-p", type=float, default=None)
    c.add_argument("--repetition-penalty", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=None)


def add_source_options(c: argparse.ArgumentParser) -> None:
    """Options shared by every command that reads a SOURCE."""
    c.add_argument("--separator", choices=["eot", "blank-line", "newline"], default="eot",
                   help=".txt story separator: <|endoftext|> lines (default), blank lines, or "
                   "single line breaks (paragraphs then separated by blank lines)")
    c.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet/hub data")
    c.add_argument("--streaming", action="store_true",
                   help="stream a hub dataset instead of downloading it first")
    c.add_argument("--val-fraction", type=float, default=0.05,
                   help="validation share carved out of a source without a validation split")
    c.add_argument("--seed", type=int, default=0)


def source_of(name: str, args: argparse.Namespace):
    from slms.data.sources import Source, SourceOptions

    return Source(name, SourceOptions(separator=args.separator, text_field=args.text_field,
                                      streaming=args.streaming, val_fraction=args.val_fraction,
                                      seed=args.seed))


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from slms.data.pipeline import train_tokenizer_on

    max_bytes = int(args.max_train_bytes) if args.max_train_bytes else None
    tok, report = train_tokenizer_on(source_of(args.data, args), args.vocab_size, max_bytes)
    tok.save(args.out)
    print(f"wrote {args.out}: {tok.vocab_size} tokens; {report['bytes_per_token']:.2f} bytes per "
          f"token on {report['held_out_stories']} held-out stories")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from slms.data.prepare import PrepareOptions, prepare_source
    from slms.tokenizer import Tokenizer

    tok = Tokenizer.from_file(args.tokenizer)
    opts = PrepareOptions(layout=args.layout, block_size=args.block_size, fix_text=args.fix_text,
                          dedupe=args.dedupe, num_proc=args.num_proc,
                          train_count=args.train_count, val_count=args.val_count, seed=args.seed)
    meta = prepare_source(source_of(args.source, args), tok, args.out, opts)
    for split, c in meta["splits"].items():
        print(f"{split}: {c['stories']:,} stories, {c['tokens']:,} tokens, {c['bytes']:,} bytes "
              f"({c['bytes_per_token']:.2f} bytes/token, "
              f"{c['tokens_per_story']['mean']:.0f} tokens/story)")
        dropped = {k: v for k, v in meta["hygiene"][split].items() if v}
        if dropped:
            print(f"  {split} hygiene: " + ", ".join(f"{k} {v:,}" for k, v in dropped.items()))
    print(f"wrote {args.out}/{{train,val}}.bin ({meta['format']}, {meta['dtype']}) and meta.json")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from slms.config import load_config, run_config_from_dict
    from slms.train.trainer import train

    config = args.config
    if config is not None and "=" in config:  # `slms train key=value ...` without a config
        args.overrides.insert(0, config)
        config = None
    if args.resume:
        from slms.rundir import RunDir

        cfg = run_config_from_dict(RunDir(args.resume).read_config(), args.overrides)
    else:
        cfg = load_config(resolve_config_path(config) if config else None, args.overrides)
    run_dir = train(cfg, out_dir=args.out, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 prints
        print(f"done: {run_dir} (best checkpoint in {run_dir / 'best'})")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from slms.train.plot import plot_run

    for path in plot_run(args.run_dir):
        print(f"wrote {path}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from slms.analysis.info import describe, info_for

    info = info_for(args.target, args.overrides, resolve_config_path)
    print(json.dumps(info, indent=2) if args.json else describe(info))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import slms
    from slms.infer.generate import Sampling, prompt_ids, stream_text

    model, tok = slms.load(args.checkpoint, device=args.device)
    s = Sampling(args.max_new_tokens, args.temperature, args.top_k or None, args.top_p,
                 args.repetition_penalty, args.seed)
    ids = prompt_ids(tok, args.prompt, model.cfg.block_size, s.max_new_tokens, args.truncate)
    print(args.prompt, end="", flush=True)
    for piece in stream_text(model, tok, ids, s):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from slms.analysis.evaluate import eval_checkpoint

    r = eval_checkpoint(args.checkpoint, args.data, args.split, args.batch_size, args.device)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"{r['split']} of {r['data']}: {r['tokens']:,} tokens, {r['bytes']:,} bytes")
        print(f"loss {r['loss']:.4f} nats/token  perplexity {r['perplexity']:.3f}  "
              f"bits/byte {r['bits_per_byte']:.4f}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from slms.analysis.bench import BenchOptions, bench_model, describe, load_target
    from slms.memory import keep_freed_memory

    if args.device == "cpu":
        keep_freed_memory()  # as `slms train` does on the CPU, so that training speeds compare
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [t for t in args.targets if "=" in t]
    targets = [t for t in args.targets if "=" not in t]
    if not targets:
        raise ValueError("give at least one run, checkpoint or config to benchmark")
    o = BenchOptions(args.new_tokens, args.b8_new_tokens, args.prompt_tokens, args.train_batch,
                     args.train_block, args.train_steps, args.device)
    results = []
    for t in targets:
        name, model = load_target(t, overrides, resolve_config_path, args.device)
        r = bench_model(model, name, o, log=lambda m: print(m, file=sys.stderr, flush=True))
        results.append(r | {"threads": torch.get_num_threads()})
        del model
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    else:
        print(describe(results))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    import slms
    from slms.infer.chat import run_chat
    from slms.infer.generate import Sampling

    model, tok = slms.load(args.checkpoint, device=args.device)
    n = args.max_new_tokens or min(200, model.cfg.block_size // 2)
    if not 1 <= n < model.cfg.block_size:
        raise ValueError(f"--max-new-tokens must be in 1..{model.cfg.block_size - 1}")
    s = Sampling(n, args.temperature, args.top_k or None, args.top_p, args.repetition_penalty,
                 args.seed)
    return run_chat(model, tok, s)


def cmd_experts(args: argparse.Namespace) -> int:
    import slms
    from slms.analysis.evaluate import eval_data_dir
    from slms.analysis.experts import analyse, describe, first_story
    from slms.data.loader import PackedData

    model, tok = slms.load(args.checkpoint, device=args.device)
    if not model.moe_layers():
        raise ValueError(f"{args.checkpoint} is a dense model: it has no experts to analyse")
    data = PackedData(eval_data_dir(args.checkpoint, tok, args.data))
    tokens = data.tokens(args.split)
    text = args.text or first_story(tokens, tok)
    report = analyse(model, tok, tokens, args.out, text, args.max_tokens,
                     title=f"experts of {args.checkpoint}")
    print(describe(report))
    print(f"wrote {args.out}/{{experts.json,expert_load.csv,specialisation.csv,heatmap.png,"
          "experts.html}")
    return 0


def cmd_import_seed(args: argparse.Namespace) -> int:
    from slms.model import count_params
    from slms.seed_import import import_seed

    model, _, path = import_seed(args.seed, args.tokenizer, args.out)
    n = count_params(model)
    print(f"wrote {path}: {n['params_total']:,} parameters ({n['params_active']:,} active)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from importlib.util import find_spec

    if find_spec("transformers") is None:
        raise ValueError("export --hf needs transformers: pip install 'slms[hf]'")
    import slms
    from slms.hf import export_hf

    model, tok = slms.load(args.checkpoint)
    out = export_hf(model, tok, args.hf)
    print(f"wrote {out} (load with `import slms` then "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
