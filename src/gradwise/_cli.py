"""The command line: ``python -m gradwise`` / ``gradwise``.

Sub-commands are registered in ``_build_parser``; each is a function taking the parsed arguments and
returning an exit status. Conventions: ``--version``; no command prints the usage on stderr and exits 2 (as
argparse does for any usage error); Ctrl-C exits 130 and SIGTERM 143 (128 + the signal), ``gradwise run``
printing the report first. ``gradwise run`` runs the script as python (and coverage run) does: what the script
sees (sys.argv, sys.path[0], ``__file__``, ``__main__``) is what ``python SCRIPT`` / ``python -m MODULE`` gives
it, and nothing to run is python's message and exit status 1.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import importlib.util
import io
import pkgutil
import signal
import sys
import types
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


def _cmd_build_native(args: argparse.Namespace) -> int:
    from gradwise import _native

    try:
        folder = _native.build_dir()
    except RuntimeError as exc:  # (no home directory: Path.home() raises)
        print(f"gradwise build-native: {exc}; set GRADWISE_NATIVE_DIR to a writable folder", file=sys.stderr)
        return 1
    print(f"building gradwise's C++ helper for gw.watch() in {folder} (10-30 s) ...", file=sys.stderr, flush=True)
    try:
        _native.build(folder, verbose=args.verbose)
    except RuntimeError as exc:
        print(f"gradwise build-native: {exc}", file=sys.stderr)
        return 1
    print(f"built: gw.watch() uses it from now on ({folder})")
    return 0


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
    if args.json_path not in (None, "-") and not os.access(os.path.dirname(args.json_path), os.W_OK):
        return f"cannot write the JSON report to {args.json}: its folder does not exist or is not writable"
    if args.json_path not in (None, "-") and os.path.isdir(args.json_path):  # known now, not after a whole run
        return f"cannot write the JSON report to {args.json}: it is a folder; give a file name"
    if args.module is None and args.script is None:
        return "give a script (gradwise run train.py) or a module (gradwise run -m pkg.train)"
    if args.module is None and not os.path.exists(args.script):  # a file, or a folder or zip with __main__.py
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
        process.enter_context(_strong_zeros_in_spawned_processes())
    if args.no_report:
        return None
    from gradwise._trace import _session, trace, watch

    made: list = []  # (the note is added after the report is filled: the callback closes last)
    script.callback(lambda: _note_untraced_threads(*made))
    made.append(script.enter_context(watch() if args.watch else trace()))
    made.append(script.enter_context(_session.untraced_threads()))
    return made[0]


class _WithStrongZeros:
    """A spawned process's target, run with strong zeros process-wide (pickled with the process object, so the
    child imports gradwise when it unpickles it), its own spawn children wrapped in turn (a forked grandchild
    inherited strong zeros, a spawned one ran plain PyTorch)."""

    def __init__(self, target: Any):
        self.target = target

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from gradwise._strong_zeros import strong_zeros_process_wide

        with strong_zeros_process_wide(), _strong_zeros_in_spawned_processes():
            return self.target(*args, **kwargs)


_DATALOADER_WORKER = "torch.utils.data._utils.worker"  # the module of a DataLoader worker's target (_worker_loop)


@contextlib.contextmanager
def _strong_zeros_in_spawned_processes() -> Any:
    """`--strong-zeros` in the processes the script starts: a forked child inherits it with the parent's memory,
    but a `spawn` or `forkserver` one starts a fresh interpreter (torch.multiprocessing.spawn, DDP launched from
    the script), whose backward passes ran as plain PyTorch. Its target is wrapped when it starts (a Process
    subclass that overrides run() has none: it is not covered). A DataLoader worker is not: it runs no backward,
    and importing gradwise (torch._dynamo) in it doubled the time a spawn DataLoader took to start its workers."""
    import multiprocessing
    import multiprocessing.process as mp_process

    start = mp_process.BaseProcess.start

    def start_with_strong_zeros(self: Any) -> None:
        method = type(self)._start_method if hasattr(type(self), "_start_method") else None
        if method is None:  # multiprocessing.Process: the default context's, as its start() will pick
            method = multiprocessing.context._default_context.get_context().get_start_method()
        if method in ("spawn", "forkserver") and self._target is not None \
                and not isinstance(self._target, _WithStrongZeros) \
                and getattr(self._target, "__module__", None) != _DATALOADER_WORKER:
            self._target = _WithStrongZeros(self._target)
        start(self)

    mp_process.BaseProcess.start = start_with_strong_zeros
    try:
        yield
    finally:
        mp_process.BaseProcess.start = start


def _note_untraced_threads(report: Any, untraced: dict) -> None:
    """The report is the main thread's: say which threads of the script ran backward passes it did not see."""
    if untraced:
        calls = sum(untraced.values())
        names = ", ".join(f"{n} ({c})" for n, c in untraced.items())
        report.notes.append(f"{calls} backward call(s) ran in other threads, which this report does not cover "
                            f"(it traces the main thread): {names}; open gw.trace() or gw.watch() in that thread to "
                            "explain them")


class _CannotStart(Exception):
    """The script or module could not be found (python's "No module named ..."): no run, no report."""


def _run_target(args: argparse.Namespace) -> dict:
    """Run the script as ``python SCRIPT`` / ``python -m MODULE`` would; returns its globals, which the caller
    keeps until the report is filled: the trace names parameters through weak references, and the script's
    objects would die with its module (python keeps them until the process exits)."""
    import os
    import runpy

    if args.module is not None:
        sys.argv[0] = "-m"  # as python sets it while it finds the module; runpy then sets the file's path
        try:
            return runpy.run_module(args.module, run_name="__main__", alter_sys=True)
        except ImportError as exc:
            if _raised_by(exc, runpy.__file__, "<frozen runpy>"):  # finding the module failed, nothing ran
                raise _CannotStart(str(exc)) from None
            raise
    path = os.path.abspath(args.script)  # python's __file__ (since 3.9); sys.argv[0] stays as typed
    finder = _main_importer(path)
    if finder is None:
        code = _code_of(path)
        mod = types.ModuleType("__main__")
        mod.__dict__.update(__file__=path, __cached__=None, __package__=None, __spec__=None,
                            __loader__=importlib.machinery.SourceFileLoader("__main__", path))
    else:  # a folder or zip holding __main__.py: python runs that with the folder (zip) as sys.path[0]
        spec = finder.find_spec("__main__") if hasattr(finder, "find_spec") else None
        if spec is None or spec.loader is None:
            raise _CannotStart(f"can't find '__main__' module in {path!r}")
        code, mod = spec.loader.get_code("__main__"), importlib.util.module_from_spec(spec)
    # run in a fresh __main__ module, as python does (pickle and multiprocessing look the script up there); not
    # through runpy.run_path, which sets sys.argv[0] to the path it is given
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = mod
    try:
        exec(code, mod.__dict__)
    finally:
        sys.modules["__main__"] = saved
    return mod.__dict__


def _main_importer(path: str) -> Any:
    """The importer of a folder or zip file given as the script (python then runs its __main__), else None."""
    import os

    return pkgutil.get_importer(os.path.abspath(path)) if os.path.exists(path) else None


def _code_of(path: str) -> types.CodeType:
    """A script's code, as python compiles it (or a .pyc file's)."""
    with io.open_code(path) as f:
        code = pkgutil.read_code(f)
    if code is None:
        with io.open_code(path) as f:
            code = compile(f.read(), path, "exec", dont_inherit=True)
    return code


def _script_sys_path(args: argparse.Namespace) -> None:
    """sys.path[0] as python sets it: the script's folder, the folder or zip itself, or the working folder for
    ``-m``. It replaces gradwise's own entry (``python -m gradwise``'s working folder, the ``gradwise`` command's
    bin folder), as coverage run does; under ``python -P`` there is none, and only a folder or zip is added."""
    import os

    if args.module is not None:
        path0 = os.getcwd()
    elif _main_importer(args.script) is not None:
        path0 = os.path.abspath(args.script)
    elif sys.flags.safe_path:
        return
    else:
        path0 = os.path.dirname(os.path.abspath(args.script))
    if sys.flags.safe_path:
        if args.module is None:
            sys.path.insert(0, path0)
    elif sys.path:
        sys.path[0] = path0
    else:
        sys.path.append(path0)


def _cmd_run(args: argparse.Namespace) -> int:
    """Run a script (or ``-m module``) with its own sys.argv, under gw.trace() and/or process-wide strong zeros;
    print the report at exit, also when it raises, is interrupted (exit 130) or terminated (exit 143)."""
    import os

    # before the script can chdir; "-": the JSON goes to stdout (and the report, as always, to stderr)
    args.json_path = "-" if args.json == "-" else os.path.abspath(args.json) if args.json else None
    problem = _check_run_args(args)
    if problem is not None:
        print(f"gradwise run: {problem}", file=sys.stderr)
        return 2
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [args.module if args.module is not None else args.script, *args.script_args]
    _script_sys_path(args)
    status, report, late = 0, None, []  # late: a SIGTERM while the trace settles or the report prints
    kept: object = None  # the script's globals (or its exception's frames) until the report is filled
    process = contextlib.ExitStack()  # never closed: see _enter_run_contexts
    handlers = _signal_handlers()
    sigterm = signal.getsignal(signal.SIGTERM)
    if sigterm is signal.SIG_DFL:  # the default handler kills the process without a report
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        with contextlib.ExitStack() as script:
            report = _enter_run_contexts(args, process, script)
            try:
                try:
                    kept = _run_target(args)
                    _join_script_threads()
                finally:  # before anything else runs: the script's handlers must not fire inside gradwise
                    _restore_signal_handlers(handlers)
            except _CannotStart as exc:  # as python: "No module named ...", exit 1, and nothing ran to report
                print(f"gradwise run: {exc}", file=sys.stderr)
                status, report = 1, None
            except SystemExit as exc:  # the script's own exit status
                kept = exc
                status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if exc.code is not None and not isinstance(exc.code, int):
                    print(exc.code, file=sys.stderr)
            except KeyboardInterrupt as exc:
                kept = exc
                _print_user_traceback(exc)
                status = 130
            except _Terminated as exc:
                kept = exc
                print("gradwise run: terminated (SIGTERM)", file=sys.stderr)
                status = 143
            except BaseException as exc:  # report what was traced before the crash, then exit like Python does
                kept = exc
                _print_user_traceback(exc)
                status = 1
            if sigterm is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, lambda signum, frame: late.append(signum))
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    if report is not None:
        _write_report(report, args.json_path)
    del kept
    if sigterm is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return 143 if late else status


def _signal_handlers() -> dict:
    """The Python-level handler of every signal but SIGTERM (which `_cmd_run` manages), before the script runs."""
    got = {}
    for sig in signal.valid_signals():
        if sig != signal.SIGTERM:
            with contextlib.suppress(ValueError, OSError):
                got[sig] = signal.getsignal(sig)
    return got


def _restore_signal_handlers(handlers: dict) -> None:
    """Put back the handlers the script replaced, once it has ended: they served the script, and would now run
    inside the report (a DataLoader's SIGCHLD handler raises "DataLoader worker ... is killed by signal" when a
    SIGTERM sent to the process group ends its workers: the report was lost and the exit status was 1, not 143)."""
    for sig, handler in handlers.items():
        if handler is not None and signal.getsignal(sig) is not handler:
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, handler)


def _write_report(report: Any, json_path: str | None) -> None:
    """The report on stderr; with ``--json FILE`` also as JSON in FILE (``-``: on stdout, after what the script
    printed there, so that ``gradwise run --json - train.py | jq`` reads it when the script prints nothing)."""
    print(file=sys.stderr)
    report.print()
    if json_path == "-":
        sys.stdout.flush()
        print(report.to_json(), flush=True)
    elif json_path is not None:
        try:
            with open(json_path, "w") as f:
                f.write(report.to_json())
        except OSError as exc:
            print(f"gradwise run: could not write the JSON report: {exc}", file=sys.stderr)


def _join_script_threads() -> None:
    """Wait for the non-daemon threads the script started, as Python does before it exits, so that their
    backward passes are traced and use strong zeros."""
    import threading

    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()


def _internal(filename: str) -> bool:
    """A frame of gradwise's runner or of runpy, never the script's."""
    import runpy

    return filename in (__file__, runpy.__file__, "<frozen runpy>")


def _raised_by(exc: BaseException, *files: str) -> bool:
    """Whether ``exc`` was raised in ``files`` with no other frame on the way (this module's aside)."""
    tb = exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if name != __file__ and name not in files:
            return False
        tb = tb.tb_next
    return True


def _print_user_traceback(exc: BaseException) -> None:
    """The script's traceback as Python prints it, without gradwise's and runpy's frames on top."""
    import traceback

    tb = exc.__traceback__
    while tb is not None and _internal(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb)


def _add_run_arguments(run: argparse.ArgumentParser) -> None:
    """`gradwise run`'s options. An option taking a value also goes into _RUN_OPTIONS_WITH_VALUE."""
    run.add_argument("--strong-zeros", action="store_true",
                     help="every backward of the script (in every thread and process it starts) uses strong zeros, as "
                     "if it ran inside gw.strong_zeros(): NaN/Inf values the loss never reads cannot poison gradients")
    run.add_argument("--no-report", action="store_true",
                     help="with --strong-zeros: do not trace, print no report (no tracing cost)")
    run.add_argument("--watch", action="store_true",
                     help="instead of tracing every op, watch at almost no cost (gw.watch()): the first backward "
                     "whose gradients hold NaN/Inf is explained, and the rest of the run is traced in full")
    run.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE; '-' writes it to stdout "
                     "(after the script's own output; the report stays on stderr)")
    run.add_argument("-m", dest="module", metavar="MODULE",
                     help="run a module as `python -m MODULE` does (relative imports work); its arguments follow")
    run.add_argument("script", metavar="SCRIPT.py", nargs="?",
                     help="the script to run, or a folder or zip file holding __main__.py, as python runs them")
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
    native = sub.add_parser(
        "build-native", help="build gw.watch()'s C++ helper now (otherwise the first gw.watch() builds it in the "
        "background; set GRADWISE_NATIVE=0 to run without it)")
    native.add_argument("-v", "--verbose", action="store_true", help="show the compiler's commands and output")
    native.set_defaults(func=_cmd_build_native)
    run = sub.add_parser(
        "run", help="run SCRIPT.py under gw.trace() (and/or with --strong-zeros) and explain every NaN/Inf "
        "gradient and every kink",
        description="Run a Python script under gw.trace(): record its forward and backward passes and print a "
        "report at exit (also when the script raises, on Ctrl-C and on SIGTERM) that explains every NaN/Inf "
        "(where it was born, whether it is contamination from values the output never used or genuine, which "
        "parameters it reaches) and every kink. With --strong-zeros every backward the script makes uses strong "
        "zeros, without editing it. The script runs as python runs it (its own sys.argv, sys.path[0], __file__ and "
        "__main__; a folder or zip file with __main__.py too); the exit status is the script's (130 on Ctrl-C, "
        "143 on SIGTERM; 1 with python's message when there is nothing to run). The report covers the main "
        "thread's passes (a note names the other threads that ran backward passes).",
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
