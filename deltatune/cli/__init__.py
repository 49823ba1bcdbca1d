"""`deltatune <verb>`: each verb parses its flags and makes one short call into the library.

The verbs live next to what they drive: ``files`` (info, merge, combine, targets), ``generate``,
``serve``, ``deltatune.training.commands`` (train, eval, chat) and ``deltatune.advisor.commands``
(plan, doctor). The console script is ``deltatune.cli:main``.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every verb registered."""
    from deltatune.advisor import commands as advisor_commands  # plan, doctor
    from deltatune.cli import files, generate, serve
    from deltatune.training import commands as training_commands  # train, eval, chat

    parser = argparse.ArgumentParser(prog="deltatune", description="Parameter-efficient fine-tuning.")
    sub = parser.add_subparsers(dest="verb", required=True)
    for module in (files, generate, serve, training_commands, advisor_commands):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``deltatune`` command."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
