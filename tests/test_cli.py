"""`python -m gradwise run SCRIPT.py [ARGS...]`: runs a script under trace(), prints the report at exit."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

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


def _run(tmp_path, *args):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    return subprocess.run([sys.executable, "-m", "gradwise", *[str(a).replace("SCRIPT", str(script)) for a in args]],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_run_prints_the_report_and_passes_argv_and_status(tmp_path):
    out = _run(tmp_path, "run", "--json", "report.json", "SCRIPT", "--status", "3", "--json", "not-ours")
    assert out.returncode == 3, out.stderr
    assert "args: ['--status', '3', '--json', 'not-ours']" in out.stdout
    assert "gradwise: 1 contamination finding, 0 genuine NaN" in out.stderr
    assert "aten.mm at train.py:7" in out.stderr and "> loss = lin(x)[:4].sum()" in out.stderr
    assert "born: aten.full at train.py:6" in out.stderr and "reaches: lin.weight" in out.stderr
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["findings"][0]["kind"] == "contamination" and data["findings"][0]["location"] == "train.py:7"


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
