"""The `slms` command line: a table of commands (slms.commands, one module each) and the error
boundary. User mistakes print one line (`slms: error: ...`) and exit with status 2; SLMS_DEBUG=1
shows the traceback instead."""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
from pathlib import Path
from types import ModuleType

from slms import __version__
from slms.commands import (
    bench,
    chat,
    corpus,
    demo,
    eval_instruct,
    evaluate,
    experts,
    export,
    finetune,
    generate,
    import_seed,
    info,
    plot,
    prepare,
    serve,
    study,
    tokenizer,
    train,
    tune,
    upcycle,
)

# name -> module with HELP, add_arguments(parser) and run(args); `slms --help` lists this order
COMMANDS: dict[str, ModuleType] = {
    "demo": demo, "corpus": corpus, "tokenizer": tokenizer, "prepare": prepare, "train": train,
    "plot": plot, "info": info, "generate": generate, "eval": evaluate, "bench": bench,
    "chat": chat, "experts": experts, "import-seed": import_seed, "export": export,
    "upcycle": upcycle,
    "study": study,
    "serve": serve,
    "tune": tune,
    "finetune": finetune,
    "eval-instruct": eval_instruct,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = getattr(args, "command", None)
    if command is None:
        parser.print_help()
        return 2
    try:
        return command.run(args) or 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        if os.environ.get("SLMS_DEBUG"):
            raise
        if isinstance(e, OSError):
            out = getattr(args, "out", None) or getattr(args, "hf", None)
            line = os_error_line(e, out, getattr(command, "DISK_FULL_NOTE", ""))
        else:
            line = str(e)
        print(f"slms: error: {line}", file=sys.stderr)
        return 2


class _Parser(argparse.ArgumentParser):
    """A parser whose mistakes are one line, as every other user mistake: `slms: error: ...`
    with the command's --help to turn to, exit status 2 (argparse's usage block is in --help)."""

    def error(self, message: str):  # noqa: ANN201
        self.exit(2, f"slms: error: {message} (see `{self.prog} --help`)\n")


class _IntermixedParser(_Parser):
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
    p = _Parser(
        prog="slms", description="Train, run and analyse small GPT language models, dense and "
        "Mixture-of-Experts, on TinyStories-style text.")
    p.add_argument("--version", action="version", version=f"slms {__version__}")
    sub = p.add_subparsers(title="commands", metavar="COMMAND", parser_class=_IntermixedParser)
    for name, module in COMMANDS.items():
        c = sub.add_parser(name, help=module.HELP)
        module.add_arguments(c)
        c.set_defaults(command=module)
    return p


# a crash-safe write's temporary sibling (slms.fsutil): `.NAME.tmp-*` stands for NAME
_TEMP = re.compile(r"^\.(.+)\.(?:tmp|old)-[\w-]+$")
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_WRITING = {*_DISK_FULL, errno.EROFS, errno.EFBIG}


def meant_path(filename: str | bytes | os.PathLike) -> Path:
    """The path the user knows for a path in an error: a temporary sibling's target."""
    parts = Path(os.fsdecode(filename)).parts
    for i, part in enumerate(parts):
        if m := _TEMP.match(part):
            return Path(*parts[:i], m.group(1))
    return Path(*parts)


def os_error_line(e: OSError, out: str | None = None, disk_full_note: str = "") -> str:
    """One line for a file system error: the path (the command's output `out` when the error is
    about it), and the reason; for a full disk, `disk_full_note` (what is still intact)."""
    if not e.strerror:  # raised by slms with its own message
        return str(e)
    named = isinstance(e.filename, (str, bytes, os.PathLike))
    path = meant_path(e.filename) if named else None
    target = Path(out) if out else None
    if target is not None and (path in {target, *target.parents} - {Path(".")} or
                               (path is not None and target in path.parents) or
                               (path is None and e.errno in _WRITING)):
        line = f"cannot create {out}: {e.strerror}"
        if path is not None and path != target:
            line = f"cannot create {out} ({path}: {e.strerror})"
    elif path is not None:
        line = f"{path}: {e.strerror}"
    else:
        line = e.strerror
    if e.errno in _DISK_FULL and disk_full_note:
        line += f"; {disk_full_note}"
    return line


if __name__ == "__main__":
    raise SystemExit(main())
