"""Review (session 27) of branch integ_hunt: `gradwise run --strong-zeros` in the processes the script starts, the
Lightning / Hugging Face callbacks with several optimizers, and gather_reports' ranks line for a step gw.watch()
could not replay. Each test attacks one of them; the ones marked "was" failed before their fix."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, *filter(None, [os.environ.get("PYTHONPATH")])])}

# ---------------------------------------------------------------------------------------------------------
# (a) `gradwise run --strong-zeros`: every way a script starts a spawn child. `finite()` is a backward whose
# forward read a NaN padding row that the loss slices away: finite under strong zeros, NaN in plain PyTorch.
# ---------------------------------------------------------------------------------------------------------

PROBE = textwrap.dedent("""
    import concurrent.futures as cf
    import functools
    import multiprocessing as mp
    import sys
    import torch

    def finite():
        lin = torch.nn.Linear(3, 1)
        x = torch.cat((torch.rand(2, 3), torch.full((1, 3), float("nan"))))
        lin(x)[:2].sum().backward()
        return bool(lin.weight.grad.isfinite().all())

    def put(q):
        q.put(finite())

    def put_rank(rank, q):
        q.put(finite())

    class Obj:
        def meth(self, q):
            q.put(finite())

    class Cls:
        def __init__(self, q):
            q.put(finite())

    class Sub(mp.get_context("spawn").Process):
        def run(self):
            super().run()

    def task(_):
        return finite()

    def exiter():
        sys.exit(3)

    def raiser():
        raise ValueError("boom")

    def nested(q, method):
        ctx = mp.get_context(method)
        q2 = ctx.SimpleQueue()
        p = ctx.Process(target=put, args=(q2,))
        p.start()
        p.join()
        q.put(q2.get())

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 4
        def __getitem__(self, i):
            return torch.tensor([float(i), float("gradwise" in sys.modules)])

    def child(ctx, target, *args):
        q = ctx.SimpleQueue()
        p = target(q, *args) if isinstance(target, type) and issubclass(target, mp.process.BaseProcess) else \\
            ctx.Process(target=target, args=(q, *args))
        p.start()
        p.join()
        return q.get()

    if __name__ == "__main__":
        case, ctx = sys.argv[1], mp.get_context("spawn")
        if case == "bound":
            got = child(ctx, Obj().meth)
        elif case == "partial":
            got = child(ctx, functools.partial(put))
        elif case == "class":
            got = child(ctx, Cls)
        elif case == "subclass":
            q = ctx.SimpleQueue()
            p = Sub(target=put, args=(q,))
            p.start()
            p.join()
            got = q.get()
        elif case in ("nested-spawn", "nested-fork"):
            got = child(ctx, nested, case.split("-")[1])
        elif case == "pool":
            with ctx.Pool(1) as pool:
                got = pool.map(task, [0])[0]
        elif case == "executor":
            with cf.ProcessPoolExecutor(1, mp_context=ctx) as ex:
                got = ex.submit(task, 0).result()
        elif case == "exit":
            p = ctx.Process(target=exiter)
            p.start()
            p.join()
            got = p.exitcode
        elif case == "raise":
            p = ctx.Process(target=raiser)
            p.start()
            p.join()
            got = p.exitcode
        elif case == "lambda":
            try:
                ctx.Process(target=lambda: None).start()
            except Exception as e:
                got = f"{type(e).__name__}: {str(e).split(' at 0x')[0]}"
        elif case == "mp.spawn-join-false":
            import torch.multiprocessing as tmp
            q = ctx.SimpleQueue()
            pc = tmp.spawn(put_rank, args=(q,), nprocs=1, join=False)
            while not pc.join():
                pass
            got = q.get()
        elif case == "dataloader":
            loader = torch.utils.data.DataLoader(Data(), batch_size=2, num_workers=2, multiprocessing_context="spawn")
            got = [b.flatten().tolist() for b in loader]
        elif case == "patched":
            import multiprocessing.process
            got = multiprocessing.process.BaseProcess.start.__qualname__
        print("got:", got)
""")


def _run(tmp_path, options, case):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    return subprocess.run([sys.executable, "-m", "gradwise", "run", *options, str(script), case],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=ENV)


SZ = ["--strong-zeros", "--no-report"]
CASES = [  # (gradwise run options, case, what the script prints): the same target run, the child's backward
    (SZ, "bound", "True"), (SZ, "partial", "True"), (SZ, "class", "True"),
    (SZ, "subclass", "True"),  # a Process subclass whose run() calls super().run()
    (SZ, "pool", "True"), (SZ, "executor", "True"),  # their workers are Process objects: covered, as documented
    (SZ, "mp.spawn-join-false", "True"),
    (SZ, "nested-spawn", "True"),  # was False: a spawn child's own spawn child ran plain PyTorch
    (SZ, "nested-fork", "True"),
    (SZ, "exit", "3"), (SZ, "raise", "1"),  # the child's exit status unchanged
    (SZ, "lambda", "PicklingError: Can't pickle <function <lambda>"),  # python's own message
    ([], "lambda", "PicklingError: Can't pickle <function <lambda>"),
    # DataLoader workers run no backward: same batches, and gradwise is not imported in them (was: imported,
    # 2 epochs of a 2-worker spawn DataLoader took 22-27 s instead of 10-11 s on the shared 2-core machine)
    (SZ, "dataloader", "[[0.0, 0.0, 1.0, 0.0], [2.0, 0.0, 3.0, 0.0]]"),
    ([], "patched", "BaseProcess.start"),  # without --strong-zeros nothing is wrapped
    ([], "bound", "False"), ([], "nested-spawn", "False"),  # plain PyTorch without --strong-zeros
]


@pytest.mark.parametrize(("options", "case", "want"), CASES)
def test_strong_zeros_in_each_kind_of_child_process(tmp_path, options, case, want):
    out = _run(tmp_path, options, case)
    assert out.returncode == 0, out.stderr
    assert f"got: {want}" in out.stdout, out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------------------
# (b) The callbacks with several optimizers: each optimizer step decided on its own optimizer's gradients.
# ---------------------------------------------------------------------------------------------------------

import importlib.util  # noqa: E402

import torch  # noqa: E402

needs_lightning = pytest.mark.skipif(importlib.util.find_spec("lightning") is None,
                                     reason="lightning is not installed (pip install 'gradwise[lightning]')")
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is not installed (pip install 'gradwise[transformers]')")


def lightning_warnings(test):
    """Lightning's own warnings on this tiny CPU run (the suite turns warnings into errors)."""
    for w in ("LeafSpec.* is deprecated", "does not have many workers", "smaller than the logging interval"):
        test = pytest.mark.filterwarnings(f"ignore:.*{w}")(test)
    return test


def _fit(tmp_path, module, callback):
    import lightning.pytorch as pl

    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, callbacks=[callback] if callback else [], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(module, torch.utils.data.DataLoader(torch.ones(2, 3), batch_size=1))
    return [p.detach().clone() for p in (module.a, module.s, module.b)]


def _module(kind: str, nan_in: str | None):
    """a, b: one optimizer's own parameter each; s: shared by both (kind "shared"), frozen (kind "frozen": one
    optimizer over a), or added to the first one's param_groups after its first step (kind "added").
    ``nan_in``: the parameter whose gradient is NaN (sqrt(p**2) at p = 0), or None (a finite run)."""
    import lightning.pytorch as pl
    from torch import nn

    class M(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            for name, v in (("a", [1.0, 2.0]), ("s", [3.0, 4.0]), ("b", [5.0, 6.0])):
                setattr(self, name, nn.Parameter(torch.tensor([0.0, 1.0] if name == nan_in else v)))
            self.s.requires_grad_(kind != "frozen")

        def training_step(self, x, batch_idx):
            opts = self.optimizers()
            opts = opts if isinstance(opts, list) else [opts]
            if kind == "added" and self.current_epoch == 0 and batch_idx == 1:
                opts[0].optimizer.add_param_group({"params": [self.s]})
            for o in opts:
                o.zero_grad()
            loss = sum((p * x.sum()).pow(2).sum() for p in (self.a, self.b))
            if self.s.requires_grad:
                loss = loss + torch.sqrt(self.s ** 2).sum()
            self.manual_backward(loss + torch.sqrt(self.a ** 2).sum())
            for o in opts:
                o.step()

        def configure_optimizers(self):
            if kind == "frozen":
                return torch.optim.SGD([self.a, self.b], lr=0.01, momentum=0.9)
            first = [self.a, self.s] if kind == "shared" else [self.a]
            return (torch.optim.SGD(first, lr=0.01, momentum=0.9),
                    torch.optim.SGD([self.b, self.s] if kind == "shared" else [self.b], lr=0.01, momentum=0.9))

    return M()


@needs_lightning
@lightning_warnings
@pytest.mark.parametrize("kind", ["shared", "frozen", "added"])
@pytest.mark.parametrize("strong_zeros", [True, False])
def test_lightning_finite_runs_are_bitwise_plain_pytorch(tmp_path, kind, strong_zeros):
    from gradwise.integrations.lightning import GradwiseCallback

    plain = _fit(tmp_path, _module(kind, None), None)
    cb = GradwiseCallback(strong_zeros=strong_zeros)
    got = _fit(tmp_path, _module(kind, None), cb)
    assert all(torch.equal(g, p) for g, p in zip(got, plain, strict=True))
    assert cb.nonfinite_steps == []


NAN_CASES = [  # (kind, parameter with NaN gradients, the parameters that move, the optimizer steps skipped)
    ("frozen", "a", set(), [0, 1, 2, 3]),  # a's NaN skips the one optimizer (b with it); s frozen throughout
    ("added", "s", {"a", "b"}, [2, 4, 6]),  # s's NaN counts once s is in the first optimizer (its 2nd step on)
    # s shared: its NaN skips both optimizers' steps, as one optimizer over a, s, b would (was: the second
    # optimizer saw s.grad already None from the first one's skip and stepped b, silently: skipped [0, 2, 4, 6])
    ("shared", "s", set(), [0, 1, 2, 3, 4, 5, 6, 7]),
]


@needs_lightning
@lightning_warnings
@pytest.mark.parametrize(("kind", "nan_in", "moves", "skipped"), NAN_CASES)
def test_lightning_nan_skips_each_optimizer_that_steps_it(tmp_path, kind, nan_in, moves, skipped):
    from gradwise.integrations.lightning import GradwiseCallback

    start = _module(kind, nan_in)
    first = [p.detach().clone() for p in (start.a, start.s, start.b)]
    cb = GradwiseCallback()
    got = dict(zip("asb", _fit(tmp_path, start, cb), strict=True))
    moved = {n for n, f in zip("asb", first, strict=True) if not torch.equal(got[n], f)}
    assert all(g.isfinite().all() for g in got.values())
    assert moved == moves
    assert cb.skipped_steps == cb.nonfinite_steps == skipped


def _hf_train(tmp_path, callback, nan_step: int | None, padding: bool = True) -> list[torch.Tensor]:
    """A Hugging Face Trainer with a custom optimizer over the last layer only (the first one trains by nothing):
    3 steps of SGD with momentum; at ``nan_step`` a row the loss reads holds a NaN."""
    from torch import nn
    from transformers import Trainer, TrainingArguments

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

        def forward(self, x):
            return {"loss": self.net(x)[:, :4].pow(2).mean()}  # rows 4, 5: NaN padding

    data = []
    for i in range(3):
        x = torch.randn(6, 4, generator=torch.Generator().manual_seed(i))
        if padding:
            x[4:] = float("nan")
        if i == nan_step:
            x[0, 0] = float("nan")
        data.append({"x": x})
    model = Net()
    opt = torch.optim.SGD(model.net[2].parameters(), lr=0.1, momentum=0.9)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=1, use_cpu=True,
                             report_to="none", save_strategy="no", disable_tqdm=True, max_grad_norm=0.0,
                             dataloader_num_workers=0, remove_unused_columns=False, seed=0)
    Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None),
            callbacks=[callback] if callback else []).train()
    return [p.detach().clone() for p in model.parameters()]


@needs_transformers
def test_hf_custom_optimizer_over_a_subset(tmp_path):
    from gradwise.integrations.transformers import GradwiseCallback

    reference = _hf_train(tmp_path, GradwiseCallback(strong_zeros=True), None)
    clean = _hf_train(tmp_path, GradwiseCallback(strong_zeros=True), None, padding=False)
    assert all(torch.equal(g, p) for g, p in zip(clean, _hf_train(tmp_path, None, None, False), strict=True))
    torch.manual_seed(0)
    first = list(torch.nn.Linear(4, 8).parameters())  # Net's first layer as built
    cb = GradwiseCallback(strong_zeros=True)
    got = _hf_train(tmp_path, cb, 1)
    assert len(cb.skipped_steps) == 1 and cb.skipped_steps == cb.nonfinite_steps  # (the Trainer shuffles)
    assert all(p.isfinite().all() for p in got)
    assert torch.equal(got[0], first[0]) and torch.equal(reference[0], first[0])  # in no optimizer: unchanged
    assert not torch.equal(got[2], reference[2])  # the skipped step is missing


# ---------------------------------------------------------------------------------------------------------
# (c) gw.gather_reports: a step gw.watch() could not replay (FSDP2) names no rank as the NaN's origin.
# ---------------------------------------------------------------------------------------------------------

def _finding(kind: str, rank: int, where: str, born_op: str):
    import gradwise as gw

    return gw.Finding(kind, born_op, where, 1, born_op=born_op, born_location=where, rank=rank)


UNREPLAYED = "had NaN/Inf gradients in a step gw.watch() could not replay: which rank introduced them is not known"
ALONE = "had NaN/Inf gradients in a step gw.watch() could not replay: the only rank, it introduced them (where is " \
        "not known)"
STORIES = [  # (findings, the ranks line), merged in a group of one rank (findings of rank 1: a merged report's)
    ([_finding("nan", 0, "t.py:3", "backward")], f"rank 0 {ALONE}"),  # one rank: it received nothing
    ([_finding("nan", 0, "t.py:3", "backward"), _finding("inf", 1, "t.py:3", "backward")], f"ranks 0,1 {UNREPLAYED}"),
    # the next step, traced in full, names its origin; rank 0's received NaN of that step is said too
    ([_finding("nan", 0, "t.py:3", "backward"), _finding("nan", 1, "t.py:3", "backward"),
      _finding("nan", 1, "d.py:9", "aten.copy_"), _finding("nan", 0, "t.py:3", "c10d.allreduce_")],
     f"rank 1 introduced the NaN at d.py:9; rank 0 received it through the all-reduce; ranks 0,1 {UNREPLAYED}"),
    ([_finding("contamination", 0, "t.py:3", "backward")], f"rank 0 {ALONE}"),
    ([_finding("kink", 0, "t.py:3", "backward")], None),  # a kink names no origin
]


@pytest.mark.parametrize(("findings", "want"), STORIES)
def test_gather_reports_ranks_line_for_an_unreplayed_step(tmp_path, findings, want):
    """Through gather_reports itself, in a one-process gloo group: the merged report's text."""
    import torch.distributed as dist

    import gradwise as gw

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        merged = gw.gather_reports(gw.Report(findings=findings))
    finally:
        dist.destroy_process_group()
    assert merged.ranks == ([want] if want else [])
    if want:
        assert want in str(merged)
