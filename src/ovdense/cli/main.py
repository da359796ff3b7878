"""`ovdense`'s entry point: the parser of every command, and the one place that turns failures into exit codes."""
from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import InputError, UsageError
from . import convert, demo, detect, evaluate, export, ground, models, pseudo_label, segment, serve, synth, train
from .console import command_logging, logger, print_error
from .options import Parser

COMMANDS = (demo, serve, segment, detect, ground, pseudo_label, export, evaluate, synth, train, convert, models)  # --help order


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ovdense", description="Open-vocabulary dense prediction with CLIP.")
    parser.add_argument("--version", action="version", version=f"ovdense {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more messages (-vv: also open_clip's); "
                                                                           "tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars or warnings; results and errors remain")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub).set_defaults(func=command.run)
    for command in sub.choices.values():  # -q / -v also after the command; SUPPRESS keeps the top level's value
        command.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="as before the command")
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="as before the command")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with command_logging(-1 if args.quiet else args.verbose):
            return args.func(args)
    except UsageError as error:
        print_error(error)
        return 2
    except (InputError, ValueError, OSError) as error:  # bad data, files, settings; disk and permission errors
        if args.verbose:
            logger.exception("traceback")
        print_error(error)
        return 1
    except KeyboardInterrupt:
        print_error("interrupted")
        return 130
    except Exception as error:  # a bug: one line, the traceback with -v
        if args.verbose:
            logger.exception("traceback")
        print_error(f"unexpected {type(error).__name__}: {error} (run with -v for the traceback, and please report it)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
