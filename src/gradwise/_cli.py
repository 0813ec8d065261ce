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


def _cmd_run(args: argparse.Namespace) -> int:
    """Run a script under gw.trace() with its own sys.argv; print the report at exit, even when it raises."""
    import os
    import runpy
    import traceback

    from gradwise._trace import trace

    script = args.script
    if not os.path.isfile(script):
        print(f"gradwise run: no such script: {script}", file=sys.stderr)
        return 2
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [script, *args.script_args, *args.rest]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    status = 0
    try:
        with trace() as report:
            try:
                runpy.run_path(script, run_name="__main__")
            except SystemExit as exc:  # the script's own exit status
                status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if exc.code is not None and not isinstance(exc.code, int):
                    print(exc.code, file=sys.stderr)
            except BaseException:  # report what was traced before the crash, then exit like Python does
                traceback.print_exc()
                status = 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    print(file=sys.stderr)
    report.print()
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json())
    return status


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradwise",
        description="gradwise: trustworthy PyTorch gradients at kinks and next to unused NaN/Inf values.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="show strong zeros on a built-in example (Linear + slice with NaN rows)")
    demo.set_defaults(func=_cmd_demo)
    run = sub.add_parser(
        "run", help="run SCRIPT.py under gw.trace() and explain every NaN/Inf gradient and every kink",
        description="Run a Python script under gw.trace(): record its forward and backward passes and print a "
        "report at exit (also when the script raises) that explains every NaN/Inf (where it was born, whether it "
        "is contamination from values the output never used or genuine, which parameters it reaches) and every "
        "kink. The script sees its own sys.argv; the exit status is the script's.",
        epilog="example: gradwise run train.py --epochs 1   |   gradwise run --json report.json train.py")
    run.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    run.add_argument("script", metavar="SCRIPT.py", help="the script to run")
    run.add_argument("script_args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments passed to the script")
    run.set_defaults(func=_cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    args.rest = rest
    return args.func(args)
