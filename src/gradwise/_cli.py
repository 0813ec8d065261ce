"""The command line: ``python -m gradwise`` / ``gradwise``.

Sub-commands are registered in ``_build_parser``; each is a function taking the parsed arguments and
returning an exit status.
"""
from __future__ import annotations

import argparse
import sys


def _cmd_demo(args: argparse.Namespace) -> int:
    from gradwise._demo import run_demo

    return run_demo()


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradwise",
        description="gradwise: trustworthy PyTorch gradients at kinks and next to unused NaN/Inf values.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="show strong zeros on a built-in example (Linear + slice with NaN rows)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    args.rest = rest
    return args.func(args)
