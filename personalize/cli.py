"""`personalize` command line: a thin shell that finds its subcommands and handles errors.

Subcommands are registered by the modules that implement them, through the
`personalize.commands` entry-point group (see pyproject.toml): each entry point is a
`register(subparsers)` function that adds one subparser and sets `run=<function(args)>`.
The shell itself never imports the trainers or pipelines, so `--help` stays fast.

Exit codes: 0 success, 2 user error (one `error: ...` line), 1 unexpected failure (the
traceback is shown with `--debug`), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from importlib.metadata import entry_points

from personalize import __version__
from personalize.errors import UserError

COMMAND_GROUP = "personalize.commands"
LIBRARY_LOGGERS = (
    "transformers",
    "diffusers",
    "bitsandbytes",
    "accelerate",
    "huggingface_hub",
    "kernels",
    "peft",
    "torch",
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus where to look), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="personalize",
        description="Personalize diffusion models, LLMs and VLMs from a handful of examples.",
        epilog="Add --verbose anywhere to see what the libraries log, --debug for the full traceback of a failure.",
    )
    parser.add_argument("--version", action="version", version=f"personalize {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for entry in sorted(entry_points(group=COMMAND_GROUP), key=lambda item: item.name):
        entry.load()(subparsers)
    return parser


def quiet_libraries() -> None:
    """Keep the terminal for our own progress and errors: libraries log only real errors.

    Runs before any subcommand module is imported, so that what dependencies log while they load
    (bitsandbytes' backend probes, transformers' advisories) stays out of a one-line user error.
    `--verbose` or `--debug` leaves every library's logging and warnings as they are.
    """
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # Read by transformers and diffusers when they configure their loggers (at first import).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # Warnings raised inside other packages are theirs to fix; ours still show.
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module="personalize")


def subcommand_options(parser: argparse.ArgumentParser, command: str) -> list[str]:
    """Every option string (--steps, -o, ...) of one subcommand."""
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        sub = getattr(action, "choices", {}).get(command)
        if sub is not None:
            return [option for item in sub._actions for option in item.option_strings]
    return []


def unknown_arguments(unknown: Sequence[str], options: Sequence[str]) -> str:
    """One line for arguments argparse did not take, with the nearest real flag (--stpes -> --steps)."""
    from personalize.config import nearest_name

    flags = [arg.split("=", 1)[0] for arg in unknown if arg.startswith("-")]
    keys = {option.lstrip("-").replace("-", "_"): option for option in options if option.startswith("--")}
    if not flags:
        return f"unexpected argument(s) {' '.join(unknown)} (see --help)"
    match = nearest_name(flags[0].lstrip("-").replace("-", "_"), keys)
    hint = f"; did you mean {keys[match]}?" if match else ""
    return f"unknown flag {flags[0]}{hint} (see --help)"


def _describe(error: BaseException) -> str:
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0][:300]}" if message else type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list or os.environ.get("PERSONALIZE_DEBUG") == "1"
    verbose = debug or "--verbose" in args_list
    args_list = [arg for arg in args_list if arg not in ("--debug", "--verbose")]
    if not verbose:
        quiet_libraries()
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(args_list)
    except SystemExit as exit_:  # --help, --version, usage errors: argparse already printed
        return int(exit_.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    if unknown:
        print(f"error: {unknown_arguments(unknown, subcommand_options(parser, args.command))}", file=sys.stderr)
        return UserError.exit_code
    try:
        return int(args.run(args) or 0)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt as interrupt:  # a training run says what it saved and how to continue
        print(str(interrupt) or "interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if type(error).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch
            print(
                "error: not enough memory; try --batch-size 1, --gradient-checkpointing, "
                "--mixed-precision bf16 or --quantize nf4",
                file=sys.stderr,
            )
            return UserError.exit_code
        if debug:
            raise
        print(
            f"error: unexpected failure ({_describe(error)}); rerun with --debug for the traceback",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
