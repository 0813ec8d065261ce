"""gradwise's C++ helper (``graph.cpp``): the per-step work of `gw.watch()` that Python can only do one object
at a time (a graph walk, the release of its saved tensors, a finiteness scan of the gradients), one call each.

Why C++. On a 1 ms training step the watch's Python walk, check and release cost ~80 us (``_watching``'s
design notes); PyTorch offers no Python-level call that frees a kept graph's saved tensors at once, while its
C++ ``Node::release_variables`` is what the engine itself calls. The helper is optional: every call has a Python
twin, used until it is built, where it cannot be built (no C++ compiler or ninja), or with ``GRADWISE_NATIVE=0``.

Building. `torch.utils.cpp_extension.load` compiles it against the installed PyTorch (~10-20 s) into
``$GRADWISE_NATIVE_DIR`` (default ``~/.cache/gradwise/native-<key>``; the key hashes the source, PyTorch's and
Python's versions: each build matches one PyTorch). ``gradwise build-native`` builds it in the foreground, with
the compiler's output on failure. Otherwise the first `gw.watch()` starts the build in a background process
(lowest priority, its log in that folder) and runs the Python path meanwhile: a block never waits for a compiler.
A failed build is not retried by later processes until ``gradwise build-native`` (the log says why).

May import: torch (and, to build, torch.utils.cpp_extension).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

_SOURCE = Path(__file__).with_name("graph.cpp")
_NAME = "gradwise_native"  # (+ the folder's name: torch.utils.cpp_extension renames a second build of one name
# in a process to NAME_v1, which another process would not find)
_RECHECK_S = 2.0  # while a background build runs: how often `module()` looks for its result
_STALE_S = 600.0  # a ``building`` marker older than this is a build that died

_module: ModuleType | None = None
_state = "unknown"  # unknown, building, ready, failed, off
_builder: subprocess.Popen | None = None  # (held: a Popen dropped while its process runs warns)
_next_look = 0.0
_folder = Path()  # build_dir(), once per process


def enabled() -> bool:
    """Whether the helper may be used (``GRADWISE_NATIVE`` is not ``0``)."""
    value = os.environ.get("GRADWISE_NATIVE", "1").strip().lower()
    if value not in ("0", "1", "", "on", "off", "true", "false", "yes", "no"):
        raise ValueError(f"GRADWISE_NATIVE must be 0 or 1 (got {value!r}): 0 runs gw.watch() in Python only")
    return value not in ("0", "off", "false", "no")


def build_dir() -> Path:
    """Where this PyTorch's build of the helper lives (one folder per source, PyTorch and Python)."""
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), torch.__version__.encode(), str(torch.version.git_version).encode(),
                 sys.version.encode(), platform.machine().encode(), sys.platform.encode()):
        key.update(part)
    root = os.environ.get("GRADWISE_NATIVE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gradwise"
    return Path(root) / f"native-{key.hexdigest()[:16]}"


def module() -> ModuleType | None:
    """The built helper, or None: disabled, not buildable, or not built yet (then its build starts in the
    background, once per process, and a later call picks it up). Cheap after the first call: one comparison
    while the state is settled, a clock read while a build runs."""
    global _state, _next_look, _folder
    if _module is not None or _state == "failed" or _state == "off":
        return _module
    if _state == "building":
        now = time.monotonic()
        if now < _next_look:
            return None
        _next_look = now + _RECHECK_S
        if _builder is not None and _builder.poll() is None:
            return None
        settled = _settle(_folder)  # (``building`` by another process: its marker stays until it settles)
        if _state == "building" and _builder is not None:  # ours ended and marked nothing (killed): Python path
            _state = "failed"
        return settled
    if not enabled():
        _state = "off"
        return None
    try:
        folder = _folder = build_dir()
    except (OSError, RuntimeError):  # (no HOME and no passwd entry: an arbitrary-UID container) the Python path
        _state = "failed"
        return None
    settled = _settle(folder)
    if settled is not None or _state == "failed":
        return settled
    _start_build(folder)
    return None


def _settle(folder: Path) -> ModuleType | None:
    """Import the build in ``folder`` if it is done; note a failed one."""
    global _module, _state
    try:
        ready, failed = (folder / "ready").exists(), (folder / "failed").exists()
    except OSError:  # (a folder this user may not read: another user's cache, a cluster-wide setting) Python path
        _state = "failed"
        return None
    if ready:
        try:
            _module = _import(folder)
            _state = "ready"
        except Exception:  # (a build of another PyTorch in a shared folder, a truncated file): Python path
            _state = "failed"
        return _module
    if failed:
        _state = "failed"
    return None


def _name(folder: Path) -> str:
    return f"{_NAME}_{re.sub(r'[^0-9A-Za-z_]', '_', folder.name)}"


def _import(folder: Path) -> ModuleType:
    suffix = ".pyd" if sys.platform == "win32" else ".so"  # (torch.utils.cpp_extension's names)
    spec = importlib.util.spec_from_file_location(_name(folder), folder / f"{_name(folder)}{suffix}")
    if spec is None or spec.loader is None:
        raise ImportError(f"no built module in {folder}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _start_build(folder: Path) -> None:
    """Start the background build, unless another process has (its ``building`` marker, younger than
    ``_STALE_S``: the ranks of a distributed job start one build, not one each); `module()` then waits for
    ``ready`` or ``failed`` as for its own."""
    global _state, _builder, _next_look
    _state = "building"
    _next_look = time.monotonic() + _RECHECK_S
    try:
        folder.mkdir(parents=True, exist_ok=True)
        marker = folder / "building"
        _drop_stale(marker)  # (a build that died: started again)
        try:
            with open(marker, "x") as claim:
                claim.write(f"{os.getpid()}\n")
        except FileExistsError:
            return
        # (run by its path, not ``-m gradwise._native``: the gradwise on the child's default path may be another
        # one, which this process's sys.path hid, and would build its graph.cpp into the folder of this one's hash)
        with open(folder / "build.log", "ab") as log:
            _builder = subprocess.Popen(
                [sys.executable, str(_SOURCE.with_name("__main__.py")), str(folder)], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    except OSError:  # (a read-only home, no fork): the Python path, as without a compiler
        _state = "failed"


def _drop_stale(path: Path) -> None:
    """Remove ``path`` (a ``building`` marker, torch's build lock) when older than ``_STALE_S``: no build takes
    that long, so its build died."""
    try:
        if time.time() - path.stat().st_mtime > _STALE_S:
            path.unlink(missing_ok=True)
    except FileNotFoundError:
        pass


def build(folder: Path | None = None, verbose: bool = False) -> ModuleType:
    """Build the helper now (in this process) and return it; raises ``RuntimeError`` with the compiler's output
    when it cannot be built. Marks the folder ``ready`` or ``failed`` for `module()` in every process."""
    global _module, _state
    from torch.utils import cpp_extension

    folder = folder or build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "failed").unlink(missing_ok=True)
    # torch's own lock, left by a build that died (killed, a reboot): load() would wait for it forever
    _drop_stale(folder / "lock")
    path = os.environ.get("PATH", "")
    try:
        # torch runs ``ninja`` by name: the one pip installed (beside this Python, or the ninja package's) first
        os.environ["PATH"] = os.pathsep.join((*_ninja_dirs(), path))
        mod = cpp_extension.load(name=_name(folder), sources=[str(_SOURCE)], extra_cflags=["-O3"],
                                 build_directory=str(folder), verbose=verbose)
    except Exception as exc:
        (folder / "failed").write_text(f"{type(exc).__name__}: {exc}\n")
        (folder / "building").unlink(missing_ok=True)
        raise RuntimeError(f"gradwise could not build its C++ helper in {folder} ({type(exc).__name__}: {exc}); "
                           "gw.watch() runs in Python (slower on small steps). It needs a C++ compiler and ninja "
                           "(pip install ninja)") from exc
    finally:
        os.environ["PATH"] = path
    (folder / "ready").write_text(torch.__version__ + "\n")
    (folder / "building").unlink(missing_ok=True)
    _module, _state = mod, "ready"
    return mod


def _ninja_dirs() -> list[str]:
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja  # (the pip package: its binary is not on PATH when the venv is not activated)

        dirs.append(str(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    return dirs
