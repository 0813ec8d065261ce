"""gradwise's Lightning and Hugging Face Trainer callbacks, in real Trainer runs on CPU.

The runs (tests/integrations/lightning_train.py and hf_train.py): a tiny MLP, 3 optimizer steps of SGD, every
sample 6 rows of which the loss reads 4; the other 2 are padding, NaN unless said otherwise. The reference is
plain PyTorch, written here, on the same data with the padding rows deleted, taking the optimizer steps that
should be taken (a skipped step is left out). In 1 process the runs are in this process; in 2 processes they
are subprocesses (Lightning starts its second DDP process itself; transformers under torchrun) with a timeout,
so that a hang fails the test.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent / "integrations"
sys.path.insert(0, str(HERE))
SUBPROCESS_TIMEOUT_S = 240

needs_lightning = pytest.mark.skipif(importlib.util.find_spec("lightning") is None,
                                     reason="lightning is not installed (pip install 'gradwise[lightning]')")
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is not installed (pip install 'gradwise[transformers]')")
# warnings of the frameworks themselves on this tiny CPU setup (the suite turns warnings into errors)
framework_warnings = [
    pytest.mark.filterwarnings("ignore:.*LeafSpec.* is deprecated"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*Checkpoint directory .* exists"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval"),
]


def _reference(module_name: str, steps_taken: tuple[int, ...], world: int = 1, dtype=torch.float64) -> list:
    """Plain PyTorch SGD(lr=0.1) on the padding-free data of every rank (the mean of the per-rank losses, as
    the data-parallel average of gradients), stepping only at ``steps_taken``."""
    mod = __import__(module_name)
    net = mod.Net()
    net = net.net if hasattr(net, "net") else net
    net = net.to(dtype)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(mod.STEPS):
        opt.zero_grad()
        losses = []
        for rank in range(world):
            data = mod.Padded(rank, False, (), 0, 2)
            x = torch.stack([data[2 * step + i]["x"] if module_name == "hf_train" else data[2 * step + i]
                             for i in range(2)]).to(dtype)
            losses.append(net(x[:, :4]).pow(2).mean())
        (sum(losses) / world).backward()
        if step in steps_taken:
            opt.step()
    return [p.detach() for p in net.parameters()]


def _params(result: dict, dtype=torch.float64) -> list[torch.Tensor]:
    return [torch.tensor(p, dtype=dtype) for p in result["params"]]


def _close(got: list[torch.Tensor], want: list[torch.Tensor], tol: float) -> bool:
    return all(torch.allclose(g, w.to(g.dtype), rtol=0, atol=tol) for g, w in zip(got, want, strict=True))


class _Records(logging.Handler):
    """The messages logged to one logger (transformers' loggers do not propagate to the root, so caplog
    would not see them)."""

    def __init__(self, name: str):
        super().__init__(logging.WARNING)
        self.logger, self.messages = logging.getLogger(name), []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> list[str]:
        self.logger.addHandler(self)
        return self.messages

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)


def _initial(module_name: str) -> list[torch.Tensor]:
    mod = __import__(module_name)
    net = mod.Net()
    return [p.detach().double() for p in net.parameters()]


# ---------------------------------------------------------------------------------------------------------
# Options (no framework run needed)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [pytest.param("lightning", marks=needs_lightning),
                                    pytest.param("transformers", marks=needs_transformers)])
def test_options_out_of_range_are_refused(module):
    cls = importlib.import_module(f"gradwise.integrations.{module}").GradwiseCallback
    with pytest.raises(ValueError, match=r"explain=\.\.\.\): expected 'first', 'every' or None, got 'all'"):
        cls(explain="all")
    with pytest.raises(ValueError, match=r"on_nonfinite=\.\.\.\): expected 'skip', 'raise' or 'warn', got 'zero'"):
        cls(on_nonfinite="zero")
    with pytest.raises(TypeError, match=r"strong_zeros=\.\.\.\): expected True or False, got 'yes'"):
        cls(strong_zeros="yes")
    cb = cls()  # the defaults
    assert cb.nonfinite_steps == [] and cb.skipped_steps == [] and cb.reports == []


# ---------------------------------------------------------------------------------------------------------
# One process, in this process
# ---------------------------------------------------------------------------------------------------------

FRAMEWORKS = [pytest.param("lightning_train", marks=[needs_lightning, *framework_warnings]),
              pytest.param("hf_train", marks=[needs_transformers, *framework_warnings])]
TOL = {"lightning_train": 1e-12, "hf_train": 1e-6}  # float64 / float32 runs
DTYPE = {"lightning_train": torch.float64, "hf_train": torch.float32}
LOGGER = {"lightning_train": "lightning.pytorch.callbacks.gradwise", "hf_train": "transformers.gradwise"}


def _run(module_name: str, tmp_path: Path, options: dict, **kwargs) -> dict:
    mod = __import__(module_name)
    return mod.run(str(tmp_path), options, **kwargs)


@pytest.mark.parametrize("module_name", FRAMEWORKS)
def test_strong_zeros_train_on_nan_padding_as_on_clean_data(module_name, tmp_path):
    got = _run(module_name, tmp_path, {"on_nonfinite": "raise"})
    assert got["error"] is None and got["nonfinite_steps"] == []
    assert _close(_params(got), _reference(module_name, (0, 1, 2), dtype=DTYPE[module_name]), TOL[module_name])


@pytest.mark.parametrize("module_name", FRAMEWORKS)
def test_without_strong_zeros_the_padding_nan_steps_are_all_skipped(module_name, tmp_path):
    with _Records(LOGGER[module_name]) as logged:
        got = _run(module_name, tmp_path, {"strong_zeros": False})
    assert got["nonfinite_steps"] == [0, 1, 2] and got["skipped_steps"] == [0, 1, 2]
    assert _close(_params(got), _initial(module_name), 0.0)  # untouched, finite
    assert len(logged) == 3 and "optimizer step 0 (rank 0: net.0.weight" in logged[0]
    assert logged[0].endswith("the optimizer step is skipped on every rank")


@pytest.mark.parametrize("module_name", FRAMEWORKS)
def test_a_genuine_nan_step_is_skipped_and_explained_every_time(module_name, tmp_path):
    with _Records(LOGGER[module_name]) as messages:
        got = _run(module_name, tmp_path, {"explain": "every"}, genuine=(0, 2))
    assert got["skipped_steps"] == [0, 2]
    assert _close(_params(got), _reference(module_name, (1,), dtype=DTYPE[module_name]), TOL[module_name])
    assert [Path(p).name for p in got["reports"]] == ["gradwise-nonfinite-step0.json", "gradwise-nonfinite-step2.json"]
    for path in got["reports"]:
        report = json.loads(Path(path).read_text())
        genuine = [f for f in report["findings"] if f["kind"] == "nan"]
        assert genuine and f"{module_name}.py:" in genuine[0]["location"]
        # a finding's step counts the backward passes of that optimizer step: the report says so
        step = Path(path).stem.rsplit("step", 1)[1]
        # fetched before the callback's trace started: Lightning's hook sees the batch; Hugging Face's callback
        # keeps the batches its DataLoader yields (its on_step_begin sees none; it was named without its batch)
        assert f"in DataLoader batch {step} " in genuine[0]["born"], genuine[0]["born"]
        assert report["notes"][0].startswith(f"optimizer step {step}: a finding's 'step' counts")
    logged = "\n".join(messages)
    assert "why optimizer step 0 has NaN/Inf gradients" in logged and "genuine NaN" in logged
    if module_name == "lightning_train":  # next to Lightning's own logs
        assert Path(got["reports"][0]).parent == Path(got["log_dir"])


@pytest.mark.parametrize("module_name", FRAMEWORKS)
def test_explain_first_reports_only_the_first_nan_step(module_name, tmp_path):
    got = _run(module_name, tmp_path, {"explain": "first"}, genuine=(0, 2))
    assert got["nonfinite_steps"] == [0, 2] and [Path(p).name for p in got["reports"]] == [
        "gradwise-nonfinite-step0.json"]


@pytest.mark.parametrize("module_name", FRAMEWORKS)
def test_raise_stops_at_the_nan_step(module_name, tmp_path):
    got = _run(module_name, tmp_path, {"on_nonfinite": "raise"}, genuine=(1,))
    assert got["error"].startswith("NonfiniteGradientError: gradwise: NaN/Inf gradients at optimizer step 1 "
                                   "(rank 0: net.0.weight, net.0.bias, net.2.weight, net.2.bias)")
    assert _close(_params(got), _reference(module_name, (0,), dtype=DTYPE[module_name]), TOL[module_name])


@pytest.mark.parametrize("module_name", FRAMEWORKS)
def test_warn_warns_and_steps_so_the_nan_reaches_the_weights(module_name, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _run(module_name, tmp_path, {"on_nonfinite": "warn"}, genuine=(1,))
    ours = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "gradwise" in str(w.message)]
    # step 1's NaN gradients were stepped with, so step 2's are NaN too: both warn
    assert [m.split(" (")[0] for m in ours] == ["gradwise: NaN/Inf gradients at optimizer step 1",
                                                "gradwise: NaN/Inf gradients at optimizer step 2"]
    assert got["nonfinite_steps"] == [1, 2] and got["skipped_steps"] == []
    assert not all(bool(p.isfinite().all()) for p in _params(got))  # "warn" hides nothing and protects nothing


# ---------------------------------------------------------------------------------------------------------
# Two processes (subprocesses with a timeout)
# ---------------------------------------------------------------------------------------------------------


def _two_processes(module_name: str, tmp_path: Path, spec: dict) -> list[dict]:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"root": str(tmp_path), **spec}))
    script = str(HERE / f"{module_name}.py")
    out = tmp_path / "out"
    if module_name == "lightning_train":  # Lightning's DDP launcher starts rank 1 by running the script again
        command = [sys.executable, script, str(out), str(spec_file)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
                   str(out), str(spec_file)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")]),
           "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path, start_new_session=True)
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    files = [Path(f"{out}.rank{r}") for r in (0, 1)]
    try:
        output, _ = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        # Lightning's rank 0 does not wait for the rank it started: wait for its result too
        while not all(f.exists() for f in files) and time.monotonic() < deadline:
            time.sleep(0.2)
    except subprocess.TimeoutExpired:
        output = ""
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: a hung rank must not outlive the test
    results = [json.loads(f.read_text()) for f in files if f.exists()]
    assert proc.returncode == 0 and len(results) == 2, (
        f"exit {proc.returncode}, {len(results)} of 2 ranks reported within {SUBPROCESS_TIMEOUT_S} s:\n{output}")
    return results


TWO = [pytest.param("lightning_train", marks=needs_lightning), pytest.param("hf_train", marks=needs_transformers)]


@pytest.fixture(scope="module", params=TWO)
def two_processes(request, tmp_path_factory):
    """A genuine NaN on rank 1 only, at step 1; strong zeros on, explain="first", skip."""
    tmp = tmp_path_factory.mktemp(request.param)
    spec = {"options": {"explain": "first"}, "genuine": [1], "genuine_rank": 1}
    if request.param == "lightning_train":
        spec["devices"] = 2  # Lightning starts the second process; torchrun starts both for transformers
    return request.param, _two_processes(request.param, tmp, spec)


def test_two_processes_skip_the_nan_step_together(two_processes):
    module_name, ranks = two_processes
    for got in ranks:
        assert got["error"] is None and got["skipped_steps"] == [1] and got["warnings"] == []
    assert ranks[0]["params"] == ranks[1]["params"]  # the same on every rank
    # the data-parallel average of the clean gradients, step 1 left out
    want = _reference(module_name, (0, 2), world=2, dtype=DTYPE[module_name])
    assert _close(_params(ranks[0]), want, TOL[module_name])


def test_two_processes_explain_names_rank_1_on_rank_0(two_processes):
    module_name, ranks = two_processes
    assert len(ranks[0]["reports"]) == 1 and ranks[1]["reports"] == []  # merged on rank 0
    report = json.loads(Path(ranks[0]["reports"][0]).read_text())
    [story] = report["ranks"]
    assert re.search(rf"rank 1 introduced the NaN at \S*{module_name}\.py:\d+", story), story
    assert any(f["rank"] == 1 and f["kind"] == "nan" for f in report["findings"])


def test_two_processes_explain_names_rank_0_as_a_receiver(two_processes):
    _, ranks = two_processes
    report = json.loads(Path(ranks[0]["reports"][0]).read_text())
    assert report["ranks"][0].endswith("rank 0 received it through the all-reduce"), (report["ranks"], [
        (f["rank"], f["kind"], f["op"]) for f in report["findings"]])
