"""The `slms` subcommands, one small module each. Every module has HELP (one line for
`slms --help`), `add_arguments(parser)` and `run(args) -> int`; `slms.cli` builds the parser from
its table of them. Modules import only argparse and `options` at the top, so that parsing stays
fast; the work is imported inside `run`."""
