"""Review of native36 (gw.watch()'s C++ helper, `gradwise._native`): its build machinery hung forever on a lock
left by a build that died, its background build imported whichever gradwise the child's default path held, and a
process without a home directory, or with a helper folder it may not read, crashed in every watched backward."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

import gradwise as gw
from gradwise import _native

_SRC = str(Path(gw.__file__).parents[1])


def _fresh(monkeypatch) -> None:
    """The helper's per-process state as before the first `module()` (the session's build is loaded already)."""
    for name, value in (("_module", None), ("_state", "unknown"), ("_builder", None), ("_next_look", 0.0)):
        monkeypatch.setattr(_native, name, value)


def _aged(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_a_build_lock_left_by_a_dead_build_does_not_hang_the_next_build(tmp_path):
    """torch's ``cpp_extension.load`` waits, without end, while its ``lock`` file exists in the build folder; one left
    by a build that died (killed, a reboot) made ``gradwise build-native`` hang forever, and every later background
    build (one per ``_STALE_S`` per machine) spin forever at nice 19, outliving the training that started it.
    (The compile itself is stubbed: the test is about the lock.)"""
    folder = tmp_path / "native"
    folder.mkdir()
    (folder / "lock").touch()
    _aged(folder / "lock", 2 * _native._STALE_S)
    script = textwrap.dedent("""
        import sys
        from pathlib import Path
        from torch.utils import cpp_extension
        from gradwise import _native

        cpp_extension._write_ninja_file_and_build_library = lambda *a, **k: None
        cpp_extension._import_module_from_library = lambda *a, **k: "the module"
        print(_native.build(Path(sys.argv[1])))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (_SRC, os.environ.get("PYTHONPATH")))))
    try:
        done = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True,
                              timeout=90, env=env)
    except subprocess.TimeoutExpired:
        raise AssertionError("build() waited forever on a stale lock") from None
    assert done.returncode == 0 and done.stdout.strip() == "the module", done.stderr
    assert (folder / "ready").exists()


def test_the_background_build_builds_this_gradwise(tmp_path, monkeypatch):
    """The background build ran ``python -m gradwise._native``, which imports the gradwise of the child's default
    path: where this process's own came first on ``sys.path`` only (a checkout inserted by a script, pytest's
    ``pythonpath``), the child built another gradwise's graph.cpp into this source's folder (its helper then
    ran against this Python), or failed without a ``failed`` marker."""
    shadow = tmp_path / "shadow" / "gradwise" / "_native"
    shadow.mkdir(parents=True)
    (shadow.parent / "__init__.py").write_text("")
    (shadow / "__init__.py").write_text("")
    (shadow / "__main__.py").write_text("import sys\nprint('the other gradwise', sys.argv[1])\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "shadow"))
    started = []

    class _Popen:
        def __init__(self, args, **kwargs):
            started.append((args, kwargs))

    real = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", _Popen)
    _fresh(monkeypatch)
    _native._start_build(tmp_path / "native")
    monkeypatch.setattr(subprocess, "Popen", real)
    (args, kwargs), = started
    # the command it started, in the environment it gave, with the compile stubbed
    run = (f"runpy.run_module({args[2]!r}, run_name='__main__', alter_sys=True)" if args[1] == "-m"
           else f"runpy.run_path({args[1]!r}, run_name='__main__')")
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent(f"""
        import runpy, sys
        from torch.utils import cpp_extension
        cpp_extension.load = lambda **k: print("this gradwise", k["sources"][0])
        sys.argv = [sys.argv[0], {args[-1]!r}]
    """) + run + "\n")
    done = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=120,
                          env=kwargs.get("env"), cwd=kwargs.get("cwd"))
    assert done.stdout.startswith("this gradwise " + str(_native._SOURCE)), done.stdout + done.stderr


def test_no_home_directory_runs_the_python_path(monkeypatch):
    """With neither ``$HOME`` nor a passwd entry (a container run as an arbitrary UID) ``Path.home()`` raises
    RuntimeError: the helper's folder could not be named, and every watched backward raised it from inside
    gradwise (a crash) instead of running the watch's Python twins."""
    for name in ("GRADWISE_NATIVE_DIR", "XDG_CACHE_HOME", "GRADWISE_NATIVE"):
        monkeypatch.delenv(name, raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    _fresh(monkeypatch)
    lin = torch.nn.Linear(3, 1)
    x = torch.ones(2, 3)
    x[1, 0] = float("nan")
    with gw.watch() as report:
        lin(x[:1]).sum().backward()
        lin(x).sum().backward()
    assert [f.step for f in report.findings][:1] == [1] and _native.module() is None


def test_an_unreadable_cache_folder_runs_the_python_path(monkeypatch, tmp_path):
    """A helper folder this user may not read (another user's cache, a cluster-wide ``GRADWISE_NATIVE_DIR``): the
    look for its ``ready`` marker raised PermissionError (``Path.exists`` passes EACCES on), from inside every
    watched backward (a crash), instead of running the watch's Python twins."""
    monkeypatch.setenv("GRADWISE_NATIVE_DIR", str(tmp_path))
    monkeypatch.delenv("GRADWISE_NATIVE", raising=False)
    real = Path.exists

    def exists(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path)):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "exists", exists)
    _fresh(monkeypatch)
    lin = torch.nn.Linear(3, 1)
    with gw.watch() as report:
        lin(torch.ones(2, 3)).sum().backward()
    assert not report.findings and _native.module() is None
