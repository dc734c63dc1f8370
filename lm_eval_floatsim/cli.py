"""The `lm-eval-floatsim` command. Each subcommand lives in the module named after it; every
module offers `add_arguments(parser)` and `run(args) -> exit code`.

Exit codes, for every subcommand: 0 all good, 1 a check failed (or a regression gate tripped),
2 unusable input. A user error prints one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import FloatSimError

SUBCOMMANDS = {
    "check": ("checks", "run the user's checks over the dump files in a folder"),
    "dump": ("dump_command", "calibrate, run one forward pass per mode, write the dumps and check them"),
    "compare": ("compare", "compare runs (results + dumps): accuracy per mode, errors per layer"),
    "sweep": ("sweep", "evaluate several modes and divisors in one process, then compare"),
    "sensitivity": ("sensitivity", "evaluate a mode in each block alone, in one process: which blocks matter"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lm-eval-floatsim", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(f"lm_eval_floatsim.{module_name}")
        sub = commands.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(module=module)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.module.run(args)
    except (FloatSimError, OSError) as error:
        print(f"lm-eval-floatsim {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
