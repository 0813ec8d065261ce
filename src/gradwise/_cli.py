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
    """Run a script (or ``-m module``) under gw.trace() with its own sys.argv; print the report at exit, even
    when it raises."""
    import os
    import runpy

    from gradwise._trace import trace

    if args.rest:
        print(f"gradwise run: unrecognized option(s) before the script: {' '.join(args.rest)} "
              "(options for the script go after it)", file=sys.stderr)
        return 2
    json_path = os.path.abspath(args.json) if args.json else None  # before the script can chdir
    if json_path is not None and not os.access(os.path.dirname(json_path), os.W_OK):
        print(f"gradwise run: cannot write the JSON report to {args.json}: its folder does not exist or is not "
              "writable", file=sys.stderr)
        return 2
    if args.module is None and args.script is None:
        print("gradwise run: give a script (gradwise run train.py) or a module (gradwise run -m pkg.train)",
              file=sys.stderr)
        return 2
    if args.module is not None:
        target, script_args = args.module, args.script_args
    else:
        target, script_args = args.script, args.script_args
        if not os.path.isfile(target):
            print(f"gradwise run: no such script: {target}", file=sys.stderr)
            return 2
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [target, *script_args]
    sys.path.insert(0, os.getcwd() if args.module is not None else os.path.dirname(os.path.abspath(target)))
    status = 0
    try:
        with trace() as report:
            try:
                if args.module is not None:
                    runpy.run_module(target, run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(target, run_name="__main__")
            except SystemExit as exc:  # the script's own exit status
                status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if exc.code is not None and not isinstance(exc.code, int):
                    print(exc.code, file=sys.stderr)
            except BaseException as exc:  # report what was traced before the crash, then exit like Python does
                _print_user_traceback(exc, runpy.__file__, "<frozen runpy>")
                status = 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    print(file=sys.stderr)
    report.print()
    if json_path is not None:
        try:
            with open(json_path, "w") as f:
                f.write(report.to_json())
        except OSError as exc:
            print(f"gradwise run: could not write the JSON report: {exc}", file=sys.stderr)
    return status


def _print_user_traceback(exc: BaseException, *internal: str) -> None:
    """The script's traceback as Python prints it, without gradwise's and runpy's frames on top."""
    import traceback

    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, *internal):
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb)


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
        epilog="example: gradwise run train.py --epochs 1   |   gradwise run --json report.json train.py   |   "
        "gradwise run -m pkg.train --epochs 1")
    run.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    run.add_argument("-m", dest="module", metavar="MODULE",
                     help="run a module as `python -m MODULE` does (relative imports work); its arguments follow")
    run.add_argument("script", metavar="SCRIPT.py", nargs="?", help="the script to run")
    run.add_argument("script_args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments passed to the script")
    run.set_defaults(func=_cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    tail = None
    if argv[:1] == ["run"]:  # `-m MODULE` before the script position: everything after MODULE is the module's
        i = 1
        while i < len(argv) and argv[i].startswith("-") and argv[i] != "-m":
            i += 2 if argv[i] == "--json" else 1
        if i < len(argv) and argv[i] == "-m":
            argv, tail = argv[: i + 2], argv[i + 2:]
    args, rest = parser.parse_known_args(argv)
    if tail is not None:
        args.script, args.script_args = None, tail
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    args.rest = rest
    return args.func(args)
