"""`python -m gradwise run SCRIPT.py [ARGS...]`: runs a script under trace(), prints the report at exit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    torch.manual_seed(137)
    lin = torch.nn.Linear(8, 1)
    x = torch.cat((torch.rand(4, 8), torch.full((4, 8), float("nan"))))
    loss = lin(x)[:4].sum()
    loss.backward()
    print("args:", sys.argv[1:])
    if "--crash" in sys.argv:
        raise RuntimeError("boom")
    sys.exit(int(sys.argv[sys.argv.index("--status") + 1]) if "--status" in sys.argv else 0)
""")


SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
# the scripts run in tmp_path: a relative PYTHONPATH=src would fall back to another installed gradwise
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, *filter(None, [os.environ.get("PYTHONPATH")])])}


def _run(tmp_path, *args):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    return subprocess.run([sys.executable, "-m", "gradwise", *[str(a).replace("SCRIPT", str(script)) for a in args]],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=ENV)


def test_run_prints_the_report_and_passes_argv_and_status(tmp_path):
    out = _run(tmp_path, "run", "--json", "report.json", "SCRIPT", "--status", "3", "--json", "not-ours")
    assert out.returncode == 3, out.stderr
    assert "args: ['--status', '3', '--json', 'not-ours']" in out.stdout
    assert "gradwise: 1 contamination finding, 0 genuine NaN" in out.stderr
    assert "aten.mm at train.py:7" in out.stderr and "> loss = lin(x)[:4].sum()" in out.stderr
    assert "born: aten.full at train.py:6" in out.stderr and "reaches: lin.weight" in out.stderr
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["findings"][0]["kind"] == "contamination" and data["findings"][0]["location"] == "train.py:7"


def _args_line(out: subprocess.CompletedProcess) -> list[str]:
    return [line for line in out.stdout.splitlines() if line.startswith("args:")]


def test_the_script_gets_its_arguments_as_python_gives_them(tmp_path):
    """A `--` after the script (or -m MODULE) is the script's own: argparse took it as gradwise's and dropped it.
    The reference: the same script run by `python train.py ...` (`python -m pkg.train ...`)."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text(SCRIPT)
    for target, args in ((["SCRIPT"], ["--", "--status", "3"]), (["SCRIPT"], ["a", "--json", "x", "--", "-h"]),
                         (["--js", "r.json", "-m", "pkg.train"], ["--", "b"])):  # (--js: argparse's --json)
        ours = _run(tmp_path, "run", *target, *args)
        python = [sys.executable, "train.py"] if "SCRIPT" in target else [sys.executable, "-m", "pkg.train"]
        theirs = subprocess.run([*python, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=ENV)
        assert _args_line(theirs) and _args_line(ours) == _args_line(theirs), (args, target, ours.stderr)
        assert ours.returncode == theirs.returncode, (args, target)
    assert json.loads((tmp_path / "r.json").read_text())["findings"]


def test_report_is_printed_when_the_script_raises(tmp_path):
    out = _run(tmp_path, "run", "SCRIPT", "--crash")
    assert out.returncode == 1
    assert "RuntimeError: boom" in out.stderr and "1 contamination finding" in out.stderr


def test_help_explains_run(tmp_path):
    top = _run(tmp_path, "--help")
    assert top.returncode == 0 and "run" in top.stdout
    sub = _run(tmp_path, "run", "--help")
    assert "--json FILE" in sub.stdout and "exit status is the script's" in sub.stdout


def test_missing_script(tmp_path):
    out = _run(tmp_path, "run", "nope.py")
    assert out.returncode == 2 and "no such script" in out.stderr


def test_a_json_path_that_is_a_folder_is_refused_before_the_script_runs(tmp_path):
    """It passed the check (its parent folder is writable): the script ran to the end, then the JSON could not be
    written and the exit status was 0."""
    (tmp_path / "out").mkdir()
    out = _run(tmp_path, "run", "--json", "out", "SCRIPT")
    assert out.returncode == 2 and "args:" not in out.stdout, out.stdout
    assert "cannot write the JSON report to out: it is a folder" in out.stderr


def test_run_a_module_with_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helper.py").write_text("def rows():\n    return 4\n")
    (pkg / "train.py").write_text("from .helper import rows\n" + SCRIPT.replace("[:4]", "[:rows()]"))
    out = _run(tmp_path, "run", "-m", "pkg.train", "--status", "0", "--json", "theirs")
    assert out.returncode == 0, out.stderr
    assert "args: ['--status', '0', '--json', 'theirs']" in out.stdout and "1 contamination finding" in out.stderr
    assert not (tmp_path / "theirs").exists()


def test_the_traceback_is_the_scripts_and_options_before_it_are_checked(tmp_path):
    out = _run(tmp_path, "run", "SCRIPT", "--crash")
    assert "runpy" not in out.stderr and "_cli.py" not in out.stderr and 'train.py", line' in out.stderr
    typo = _run(tmp_path, "run", "--jsno", "r.json", "SCRIPT")
    assert typo.returncode == 2 and "--jsno" in typo.stderr and "args:" not in typo.stdout


def test_a_script_that_traces_itself(tmp_path):
    script = tmp_path / "own.py"
    script.write_text("import torch, gradwise as gw\nx = torch.tensor([0.0, 1.0], requires_grad=True)\n"
                      "print(len(gw.explain(lambda x: x.relu().sum(), x).findings), 'own findings')\n")
    out = _run(tmp_path, "run", script)
    assert out.returncode == 0 and "1 own findings" in out.stdout and "1 kink" in out.stderr, out.stderr


# --- gradwise run --strong-zeros -------------------------------------------------------------------------------

PADDED = textwrap.dedent("""
    import sys, threading
    import torch

    def step(used):  # rows 4..7 are NaN padding; the loss reads rows 0..3 (used=False) or 0..4 (used=True)
        torch.manual_seed(137)
        lin = torch.nn.Linear(8, 1)
        x = torch.cat((torch.rand(4, 8), torch.full((4, 8), float("nan"))))
        lin(x)[: 5 if used else 4].sum().backward()
        ref = torch.nn.Linear(8, 1)
        ref.load_state_dict(lin.state_dict())
        ref(x[: 5 if used else 4]).sum().backward()  # the same program without the unused rows
        same = torch.equal(lin.weight.grad, ref.weight.grad) and torch.equal(lin.bias.grad, ref.bias.grad)
        return bool(lin.weight.grad.isfinite().all()), same

    results = {"main": step(False)}
    worker = threading.Thread(target=lambda: results.__setitem__("thread", step(False)))
    worker.start()
    worker.join()
    results["used"] = step(True)
    print("finite/same:", results["main"], results["thread"], results["used"])
""")


def _run_padded(tmp_path, *options):
    (tmp_path / "padded.py").write_text(PADDED)
    return _run(tmp_path, "run", *options, tmp_path / "padded.py")


def test_strong_zeros_in_every_thread_with_the_report(tmp_path):
    """Padding sliced away: finite gradients, equal to the program without the padding, in the main thread and
    in a thread the script starts; a NaN the loss reads stays NaN (and is reported as genuine)."""
    out = _run_padded(tmp_path, "--strong-zeros")
    assert out.returncode == 0, out.stderr
    assert "finite/same: (True, True) (True, True) (False, False)" in out.stdout
    assert "0 contamination findings, 1 genuine NaN" in out.stderr, out.stderr
    assert "born: aten.full at padded.py:8" in out.stderr and "reaches: lin.weight" in out.stderr
    assert "from finite values" not in out.stderr  # the strong-zero rules' own ops are not what the trace reads


def test_strong_zeros_without_the_report(tmp_path):
    out = _run_padded(tmp_path, "--strong-zeros", "--no-report")
    assert out.returncode == 0, out.stderr
    assert "finite/same: (True, True) (True, True) (False, False)" in out.stdout
    assert "gradwise:" not in out.stderr


def test_without_strong_zeros_the_script_is_plain_pytorch(tmp_path):
    out = _run_padded(tmp_path)
    assert "finite/same: (False, False) (False, False) (False, False)" in out.stdout, out.stderr
    assert "1 contamination finding" in out.stderr


def test_strong_zeros_for_a_module(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text(PADDED)
    out = _run(tmp_path, "run", "--strong-zeros", "--no-report", "-m", "pkg.train", "--no-report")
    assert out.returncode == 0, out.stderr
    assert "finite/same: (True, True) (True, True) (False, False)" in out.stdout


def test_run_option_combinations_are_checked(tmp_path):
    (tmp_path / "padded.py").write_text(PADDED)
    no_op = _run(tmp_path, "run", "--no-report", "padded.py")
    assert no_op.returncode == 2 and "add --strong-zeros" in no_op.stderr and "finite" not in no_op.stdout
    both = _run(tmp_path, "run", "--strong-zeros", "--no-report", "--json", "r.json", "padded.py")
    assert both.returncode == 2 and "give one of them" in both.stderr


# --- conventions -------------------------------------------------------------------------------------------------

def test_version_and_no_command(tmp_path):
    import torch

    import gradwise

    version = _run(tmp_path, "--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"gradwise {gradwise.__version__} (torch {torch.__version__})"
    bare = _run(tmp_path)
    assert bare.returncode == 2 and bare.stderr.startswith("usage: gradwise") and bare.stdout == ""
    assert "required: COMMAND" in bare.stderr
    unknown = _run(tmp_path, "demo", "--frobnicate")
    assert unknown.returncode == 2 and "--frobnicate" in unknown.stderr


SLEEPER = textwrap.dedent("""
    import time
    import torch
    torch.manual_seed(137)
    lin = torch.nn.Linear(8, 1)
    x = torch.cat((torch.rand(4, 8), torch.full((4, 8), float("nan"))))
    lin(x)[:4].sum().backward()
    try:
        print("stepped", flush=True)
        time.sleep(60)
    finally:
        print("script cleanup ran", flush=True)
""")


def _interrupt(tmp_path, sig):
    import signal

    (tmp_path / "sleeper.py").write_text(SLEEPER)
    # a shell's background job starts with SIGINT ignored, and Python then keeps ignoring it: restore the default
    proc = subprocess.Popen([sys.executable, "-m", "gradwise", "run", "sleeper.py"], cwd=tmp_path, text=True, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.readline().strip() == "stepped"  # the NaN step is done, the script sleeps
        proc.send_signal(getattr(signal, sig))
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, stdout, stderr


def test_ctrl_c_prints_the_report_and_exits_130(tmp_path):
    status, stdout, stderr = _interrupt(tmp_path, "SIGINT")
    assert status == 130, stderr
    assert "script cleanup ran" in stdout and "KeyboardInterrupt" in stderr
    assert "1 contamination finding" in stderr and "aten.mm at sleeper.py:7" in stderr


def test_sigterm_prints_the_report_and_exits_143(tmp_path):
    status, stdout, stderr = _interrupt(tmp_path, "SIGTERM")
    assert status == 143, stderr
    assert "script cleanup ran" in stdout and "terminated (SIGTERM)" in stderr
    assert "1 contamination finding" in stderr and "aten.mm at sleeper.py:7" in stderr


def test_demo_shows_both_seeds(tmp_path):
    """Exit 0 means every claim the demo prints held (strong zeros == the program without the padding; each
    IoU version: all pieces found, stationary, PyTorch's gradient inside the subdifferential)."""
    out = subprocess.run([sys.executable, "-m", "gradwise", "demo"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env={**ENV, "COLUMNS": "200"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[nan, nan, nan, nan]" in out.stdout and "identical" in out.stdout
    assert out.stdout.count("16 (all) pieces, box +-[0.5, 0.1667] per span; holds PyTorch's: yes") == 3
    assert out.stdout.count("stationary, least norm") == 3
    for torch_grad in ("[[0.0, 0.0], [0.0, 0.0]]", "[[0.5, 0.1667], [-0.5, -0.1667]]",
                       "[[-0.5, -0.1667], [0.5, 0.1667]]"):
        assert torch_grad in out.stdout


def test_watch_explains_the_first_nonfinite_backward(tmp_path):
    """`gradwise run --watch`: nothing traced until a gradient holds NaN/Inf, then the same finding as the trace."""
    out = _run(tmp_path, "run", "--watch", "SCRIPT")
    assert out.returncode == 0, out.stderr
    assert "gradwise: 1 contamination finding" in out.stderr
    assert "explained from its backward" in out.stderr  # the watched step's forward was not traced
    refused = _run(tmp_path, "run", "--watch", "--no-report", "SCRIPT")
    assert refused.returncode == 2 and "--watch" in refused.stderr


# --- run as python runs it ------------------------------------------------------------------------------------

SHOW = textwrap.dedent("""
    import sys
    spec = globals().get("__spec__")
    print("seen:", __file__, __name__, repr(__package__), getattr(spec, "name", None),
          type(globals().get("__loader__")).__name__, sys.argv, sys.path[:2], sys.modules["__main__"].__file__)
""")


def _seen(out: subprocess.CompletedProcess) -> list[str]:
    return [line for line in out.stdout.splitlines() if line.startswith("seen:")]


def test_a_script_folder_or_zip_sees_what_python_gives_it(tmp_path):
    """`__file__` (absolute, as python makes it since 3.9), sys.argv (as typed), sys.path[0] (the script's folder,
    replacing gradwise's own entry: the working folder stayed on sys.path), `__main__`; a folder or zip file with
    __main__.py was refused ('no such script') or run with relative paths. The reference: python itself."""
    import zipfile

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "show.py").write_text(SHOW)
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "__main__.py").write_text(SHOW)
    with zipfile.ZipFile(tmp_path / "app.zip", "w") as z:
        z.writestr("__main__.py", SHOW)
    for target in ("sub/show.py", "app", "app.zip"):
        ours = _run(tmp_path, "run", target, "a", "--", "-b")
        theirs = subprocess.run([sys.executable, target, "a", "--", "-b"], capture_output=True, text=True,
                                timeout=120, cwd=tmp_path, env=ENV)
        assert _seen(theirs) and _seen(ours) == _seen(theirs), (target, ours.stderr)
        assert ours.returncode == 0 and "gradwise: No NaN/Inf" in ours.stderr


def test_what_cannot_be_run_fails_as_python_does_without_a_report(tmp_path):
    """`-m nosuchmod` printed an empty report: python's message instead, exit 1 (a package without __main__, a
    folder without __main__.py too)."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "empty").mkdir()
    for args, message in ((["-m", "nosuchmod"], "No module named nosuchmod"),
                          (["-m", "pkg"], "No module named pkg.__main__; 'pkg' is a package"),
                          (["empty"], "can't find '__main__' module in")):
        out = _run(tmp_path, "run", *args)
        python = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                                env=ENV)
        assert out.returncode == python.returncode == 1 and message in python.stderr, (args, python.stderr)
        assert f"gradwise run: {message}" in out.stderr and "gradwise:" not in out.stderr, (args, out.stderr)
    # an ImportError of the module's own code is its traceback, with the report
    (tmp_path / "pkg" / "broken.py").write_text("import nosuchmod_either\n")
    raising = _run(tmp_path, "run", "-m", "pkg.broken")
    assert raising.returncode == 1 and "broken.py" in raising.stderr and "gradwise:" in raising.stderr


def test_json_dash_writes_the_json_to_stdout(tmp_path):
    """`--json -` wrote a file named '-': the JSON goes to stdout after the script's own output, the report to
    stderr."""
    out = _run(tmp_path, "run", "--json", "-", "SCRIPT", "x")
    assert out.returncode == 0 and not (tmp_path / "-").exists(), out.stderr
    printed, _, data = out.stdout.partition("\n")
    assert printed == "args: ['x']" and json.loads(data)["findings"][0]["kind"] == "contamination"
    assert "gradwise: 1 contamination finding" in out.stderr and "{" not in out.stderr
    assert "'-' writes it to stdout" in " ".join(_run(tmp_path, "run", "--help").stdout.split())


def test_a_script_that_watches_itself(tmp_path):
    """gw.watch() inside `gradwise run` raised ('already watches'): it joins the CLI's block."""
    script = tmp_path / "own.py"
    script.write_text(SCRIPT.replace("loss = ", "import gradwise as gw\nwith gw.watch() as own:\n    loss = ")
                      .replace("loss.backward()", "    loss.backward()\nprint(len(own.findings), 'own findings')"))
    for options in ([], ["--watch"]):
        out = _run(tmp_path, "run", *options, script)
        assert out.returncode == 0 and "1 own findings" in out.stdout, out.stderr
        assert "gradwise: 1 contamination finding" in out.stderr


CLIPPED = textwrap.dedent("""
    import torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(6, 4)
    x[5] = float("nan")  # a row the loss discards
    loss = model(x)[:5].pow(2).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
""")


def test_clip_grad_norm_over_nan_gradients_is_one_finding_with_its_provenance(tmp_path):
    """clip_grad_norm_'s NaN total norm scales every gradient by NaN with one _foreach_mul_. Under `gradwise run`
    the bias gradients it wrote NaN into were not reported (the script's objects died before the report) and
    were listed as NaN 'input tensor[8]' and 'tensor[2]' no gradient used (each list element's provenance was
    taken from its neighbours); in a trace, one finding per parameter, one from 'tensor[2] arrived'."""
    (tmp_path / "clip.py").write_text(CLIPPED)
    out = _run(tmp_path, "run", "--json", "r.json", "clip.py")
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["unused"] == [] and "arrived" not in out.stderr, out.stderr
    (clip,) = [f for f in data["findings"] if f["op"] == "aten._foreach_mul_"]
    assert clip["reaches"] == ["model.0.bias", "model.2.bias"] and clip["count"] == 10 and clip["downstream"]
    assert clip["born_op"] == "gradient" and "contamination from aten.mm" in clip["born"]
    assert "the gradients of model.0.bias, model.2.bias were finite after backward" in clip["message"]


LOADER = textwrap.dedent("""
    import time
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Slow(Dataset):
        def __len__(self):
            return 10**6

        def __getitem__(self, i):
            time.sleep(0.01)
            return torch.full((8,), float("nan")) if i >= 4 else torch.rand(8)

    lin = torch.nn.Linear(8, 1)
    for i, xb in enumerate(DataLoader(Slow(), batch_size=8, num_workers=2)):
        lin(xb)[:4].sum().backward()
        if i == 0:
            print("stepped", flush=True)
""")


def test_sigterm_to_the_process_group_with_dataloader_workers_prints_the_report_and_exits_143(tmp_path):
    """`timeout`, a batch scheduler or a container stop sends SIGTERM to the whole process group: DataLoader's
    workers die of it too, and the SIGCHLD handler DataLoader installed raised "DataLoader worker (pid N) is
    killed by signal: Terminated" inside the report being printed: no report, exit status 1 (python alone:
    killed by SIGTERM). The script's handlers are put back once it has ended."""
    import signal

    (tmp_path / "loader.py").write_text(LOADER)
    proc = subprocess.Popen([sys.executable, "-m", "gradwise", "run", "loader.py"], cwd=tmp_path, text=True, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "stepped"
        os.killpg(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    # (the script's own unwinding may print "Exception ignored in: ...__del__" first, as python does: not ours)
    report = stderr[stderr.index("terminated (SIGTERM)"):]
    assert "1 contamination finding" in report and "aten.mm at loader.py:16" in report, stderr
    assert "Traceback" not in report and "killed by signal" not in report, stderr


THREADED = textwrap.dedent("""
    import threading
    import torch
    import gradwise as gw

    def train(traced):
        lin = torch.nn.Linear(8, 1)
        x = torch.cat((torch.rand(4, 8), torch.full((4, 8), float("nan"))))
        if traced:
            with gw.trace() as own:
                lin(x)[:4].sum().backward()
            print("own report:", own.summary())
        else:
            lin(x)[:4].sum().backward()
        print("grad finite:", bool(lin.weight.grad.isfinite().all()))

    for traced in (False, True):
        t = threading.Thread(target=train, args=(traced,), name=f"trainer-{traced}")
        t.start()
        t.join()
""")


@pytest.mark.parametrize("option", [[], ["--watch"]])
def test_backward_passes_in_the_scripts_threads_are_not_reported_as_none(tmp_path, option):
    """A script that trains in a thread of its own: `gradwise run` traces the main thread, and said "No NaN/Inf
    gradients and no kinks found" of a run whose gradients were NaN, with nothing to say it never saw them. A
    note now names the threads whose backward calls it did not cover (not one that traces itself)."""
    (tmp_path / "threaded.py").write_text(THREADED)
    out = subprocess.run([sys.executable, "-m", "gradwise", "run", *option, "threaded.py"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path, env=ENV)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("grad finite: False") == 2 and "own report: 1 contamination finding" in out.stdout
    assert "1 backward call(s) ran in other threads" in out.stderr and "trainer-False (1)" in out.stderr, out.stderr
    assert "trainer-True" not in out.stderr
