"""The command line: ``python -m gradwise`` / ``gradwise``.

Sub-commands are registered in ``_build_parser``; each is a function taking the parsed arguments and
returning an exit status. Conventions: ``--version``; no command prints the usage on stderr and exits 2 (as
argparse does for any usage error); Ctrl-C exits 130 and SIGTERM 143 (128 + the signal), ``gradwise run``
printing the report first.
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from typing import Any

# `gradwise run` options that take a value: the `-m MODULE` pre-scan in `main` must skip their values
_RUN_OPTIONS_WITH_VALUE = {"--json"}


class _Terminated(BaseException):
    """Raised in the main thread by SIGTERM under `gradwise run`, so the script unwinds (its `finally` blocks
    run) and the report is printed before the process exits 143."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated


def _cmd_demo(args: argparse.Namespace) -> int:
    from gradwise._demo import run_demo

    return run_demo()


def _check_run_args(args: argparse.Namespace) -> str | None:
    """The problem with `gradwise run`'s arguments, or None."""
    import os

    if args.rest:
        return (f"unrecognized option(s) before the script: {' '.join(args.rest)} "
                "(options for the script go after it)")
    if args.watch and args.no_report:
        return "--watch produces a report, --no-report turns it off: give one of them"
    if args.no_report and args.json:
        return "--json writes the report, --no-report turns it off: give one of them"
    if args.no_report and not args.strong_zeros:
        return "--no-report without --strong-zeros would run the script unchanged: add --strong-zeros"
    if args.json_path is not None and not os.access(os.path.dirname(args.json_path), os.W_OK):
        return f"cannot write the JSON report to {args.json}: its folder does not exist or is not writable"
    if args.json_path is not None and os.path.isdir(args.json_path):  # known now, not after a whole run
        return f"cannot write the JSON report to {args.json}: it is a folder; give a file name"
    if args.module is None and args.script is None:
        return "give a script (gradwise run train.py) or a module (gradwise run -m pkg.train)"
    if args.module is None and not os.path.isfile(args.script):
        return f"no such script: {args.script}"
    return None


def _enter_run_contexts(args: argparse.Namespace, process: contextlib.ExitStack,
                        script: contextlib.ExitStack) -> Any:
    """Enter what `gradwise run` wraps the script in; returns the trace's report or None. ``script``'s contexts
    close when the script ends, before the report is printed; ``process``'s stay on until the process exits:
    strong zeros are process-wide (every thread the script starts; daemon threads may still run backward
    passes while the report is printed)."""
    if args.strong_zeros:
        from gradwise._strong_zeros import strong_zeros_process_wide

        process.enter_context(strong_zeros_process_wide())
    if args.no_report:
        return None
    if args.watch:
        from gradwise._trace import watch

        return script.enter_context(watch())
    from gradwise._trace import trace

    return script.enter_context(trace())


def _cmd_run(args: argparse.Namespace) -> int:
    """Run a script (or ``-m module``) with its own sys.argv, under gw.trace() and/or process-wide strong zeros;
    print the report at exit, also when it raises, is interrupted (exit 130) or terminated (exit 143)."""
    import os
    import runpy

    args.json_path = os.path.abspath(args.json) if args.json else None  # before the script can chdir
    problem = _check_run_args(args)
    if problem is not None:
        print(f"gradwise run: {problem}", file=sys.stderr)
        return 2
    target = args.module if args.module is not None else args.script
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [target, *args.script_args]
    sys.path.insert(0, os.getcwd() if args.module is not None else os.path.dirname(os.path.abspath(target)))
    status, report, late = 0, None, []  # late: a SIGTERM while the trace settles or the report prints
    process = contextlib.ExitStack()  # never closed: see _enter_run_contexts
    sigterm = signal.getsignal(signal.SIGTERM)
    if sigterm is signal.SIG_DFL:  # the default handler kills the process without a report
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        with contextlib.ExitStack() as script:
            report = _enter_run_contexts(args, process, script)
            try:
                if args.module is not None:
                    runpy.run_module(target, run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(target, run_name="__main__")
                _join_script_threads()
            except SystemExit as exc:  # the script's own exit status
                status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if exc.code is not None and not isinstance(exc.code, int):
                    print(exc.code, file=sys.stderr)
            except KeyboardInterrupt as exc:
                _print_user_traceback(exc, runpy.__file__, "<frozen runpy>")
                status = 130
            except _Terminated:
                print("gradwise run: terminated (SIGTERM)", file=sys.stderr)
                status = 143
            except BaseException as exc:  # report what was traced before the crash, then exit like Python does
                _print_user_traceback(exc, runpy.__file__, "<frozen runpy>")
                status = 1
            if sigterm is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, lambda signum, frame: late.append(signum))
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    if report is not None:
        print(file=sys.stderr)
        report.print()
        if args.json_path is not None:
            try:
                with open(args.json_path, "w") as f:
                    f.write(report.to_json())
            except OSError as exc:
                print(f"gradwise run: could not write the JSON report: {exc}", file=sys.stderr)
    if sigterm is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return 143 if late else status


def _join_script_threads() -> None:
    """Wait for the non-daemon threads the script started, as Python does before it exits, so that their
    backward passes are traced and use strong zeros."""
    import threading

    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()


def _print_user_traceback(exc: BaseException, *internal: str) -> None:
    """The script's traceback as Python prints it, without gradwise's and runpy's frames on top."""
    import traceback

    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, *internal):
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb)


def _add_run_arguments(run: argparse.ArgumentParser) -> None:
    """`gradwise run`'s options. An option taking a value also goes into _RUN_OPTIONS_WITH_VALUE."""
    run.add_argument("--strong-zeros", action="store_true",
                     help="every backward of the script (in every thread it starts) uses strong zeros, as if it "
                     "ran inside gw.strong_zeros(): NaN/Inf values the loss never reads cannot poison gradients")
    run.add_argument("--no-report", action="store_true",
                     help="with --strong-zeros: do not trace, print no report (no tracing cost)")
    run.add_argument("--watch", action="store_true",
                     help="instead of tracing every op, watch at almost no cost (gw.watch()): the first backward "
                     "whose gradients hold NaN/Inf is explained, and the rest of the run is traced in full")
    run.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    run.add_argument("-m", dest="module", metavar="MODULE",
                     help="run a module as `python -m MODULE` does (relative imports work); its arguments follow")
    run.add_argument("script", metavar="SCRIPT.py", nargs="?", help="the script to run")
    run.add_argument("script_args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments passed to the script")


def _build_parser() -> argparse.ArgumentParser:
    import torch

    from gradwise import __version__

    parser = argparse.ArgumentParser(
        prog="gradwise",
        description="gradwise: trustworthy PyTorch gradients at kinks and next to unused NaN/Inf values.",
        epilog="exit status: the command's (run: the script's); 2 on a usage error, 130 on Ctrl-C, 143 on SIGTERM",
    )
    parser.add_argument("--version", action="version", version=f"gradwise {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = sub.add_parser(
        "demo", help="the two seed problems: NaN padding before/after strong zeros, and an IoU loss's gradient at "
        "its minimum (PyTorch's, the subdifferential, the stationarity certificate)")
    demo.set_defaults(func=_cmd_demo)
    run = sub.add_parser(
        "run", help="run SCRIPT.py under gw.trace() (and/or with --strong-zeros) and explain every NaN/Inf "
        "gradient and every kink",
        description="Run a Python script under gw.trace(): record its forward and backward passes and print a "
        "report at exit (also when the script raises, on Ctrl-C and on SIGTERM) that explains every NaN/Inf "
        "(where it was born, whether it is contamination from values the output never used or genuine, which "
        "parameters it reaches) and every kink. With --strong-zeros every backward the script makes uses strong "
        "zeros, without editing it. The script sees its own sys.argv; the exit status is the script's (130 on "
        "Ctrl-C, 143 on SIGTERM). The report covers the main thread's passes.",
        epilog="example: gradwise run train.py --epochs 1   |   gradwise run --json report.json train.py   |   "
        "gradwise run --strong-zeros --no-report train.py   |   gradwise run -m pkg.train --epochs 1")
    _add_run_arguments(run)
    run.set_defaults(func=_cmd_run)
    return parser


def _takes_value(option: str) -> bool:
    """Whether ``option`` (before the script) is one whose value is the next argument: one of
    _RUN_OPTIONS_WITH_VALUE or, as argparse accepts, an abbreviation of one (``--js FILE``)."""
    return option.startswith("--") and len(option) > 2 and "=" not in option and any(
        o.startswith(option) for o in _RUN_OPTIONS_WITH_VALUE)


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    tail = None
    if argv[:1] == ["run"]:
        # everything after SCRIPT (or `-m MODULE`) is the script's, verbatim, as `python SCRIPT ...` gives it:
        # split here, since argparse would take a `--` among them as its own and drop it
        i = 1
        while i < len(argv) and argv[i].startswith("-") and argv[i] not in ("-m", "--"):
            i += 2 if _takes_value(argv[i]) else 1
        at = i + 1 if i < len(argv) and argv[i] in ("-m", "--") else i  # the script's (module's) position
        if at < len(argv):
            argv, tail = argv[: at + 1], argv[at + 1:]
    args, rest = parser.parse_known_args(argv)
    if tail is not None:
        args.script_args = tail
    args.rest = rest
    if rest and args.func is not _cmd_run:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C outside a script (`gradwise run` handles its own): the shell's 130
        print("\ninterrupted", file=sys.stderr)
        return 130
