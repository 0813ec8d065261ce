"""gw.trace() at training scale and on every tensor kind: bounded records over long runs, root causes first,
strong zeros' removals reported as removed, per-thread traces, and no crash on tensors it cannot read.

References: the record counts of a 20-step run (a 200-step run must keep the same), plain PyTorch's results of
the same calls (the trace must not change them), and gw.strong_zeros()' own gradients.
"""
from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import gradwise as gw
from gradwise._trace import _common, _session


def test_a_long_nan_run_keeps_a_bounded_record_and_one_root_cause():
    """200 NaN-poisoned training steps (NaN padding rows sliced away after the model; the parameters are NaN
    from step 1): the trace keeps the same number of records at 200 steps as at 20 (interned per site, not per
    step), and the report names one root cause at step 0 with the later NaN as downstream of it."""
    def run(steps):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with gw.trace() as report:
            tracer = _session._current()
            for _ in range(steps):
                pad = torch.full((2, 6), float("nan"))
                loss = model(torch.cat((torch.randn(4, 6), pad)))[:4].square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            kept = tracer.store.kept(), len(tracer.nodes), len(tracer.parents), tracer.store.step
        return report, kept

    _, (kept20, _, _, last20) = run(20)
    report, (kept200, nodes200, parents200, last200) = run(200)
    assert (last20, last200) == (19, 199)
    assert kept200 == kept20 and nodes200 <= _common._MAX_NODES and parents200 <= _common._MAX_NODES
    assert [f.kind for f in report.findings if not f.downstream] == ["contamination"]
    (down,) = [f for f in report.findings if f.downstream]
    assert down.op == "gradient" and down.step in (0, 1), str(report)
    (cause,) = report.causes
    assert cause.startswith("root cause at step 0: aten.full"), cause
    assert "aten.slice" in cause and "199 later steps" in cause, cause
    assert "downstream" in report.summary() and "aten.empty" not in str(report)


def _loader_run(batches: int, real_at: int | None, pad: tuple | None = None):
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    x = torch.randn(2 * batches, 6, 4)
    for b in range(batches) if pad is None else pad:
        x[2 * b : 2 * b + 2, 4:] = float("nan")  # padding the loss never reads
    if real_at is not None:
        x[2 * real_at, 0, 0] = float("nan")  # a NaN it reads
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    with gw.trace() as report:
        tracer = _session._current()
        for xb in DataLoader(x, batch_size=2):
            net.zero_grad()
            net(xb)[:, :4].pow(2).mean().backward()
        kept = tracer.store.kept()
    return report, kept


def test_nan_in_every_dataloader_batch_keeps_a_bounded_record():
    """Each DataLoader batch's non-finite data is an arrival of its own, but a run with NaN padding in every
    batch keeps as many records at 60 batches as at 20; a real NaN in batch 50 (after the first batches) is still
    its own finding, as in the program where only batch 50 brings NaN."""
    _, kept20 = _loader_run(20, None)
    report, kept60 = _loader_run(60, None)
    assert kept60 == kept20 and not report.of_kind("nan"), str(report)
    report, _ = _loader_run(60, 50)
    alone, _ = _loader_run(60, 50, pad=(50,))
    facts = [[(f.count, f.indices, f.born, f.step, f.reaches) for f in r.of_kind("nan")] for r in (report, alone)]
    assert facts[0] == facts[1] and facts[0], str(report)


def _padded_steps(steps: int, strong: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.trace() as report:
        for _ in range(steps):
            x = torch.cat((torch.randn(4, 6), torch.full((2, 6), float("nan"))))
            loss = model(x)[:4].square().mean()
            opt.zero_grad()
            if strong:
                with gw.strong_zeros():
                    loss.backward()
            else:
                loss.backward()
            opt.step()
    return report, model


def test_contamination_strong_zeros_removed_is_reported_as_removed():
    report, model = _padded_steps(5, strong=True)
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    assert not report.findings, str(report)
    (line,) = report.removed
    assert "aten.full" in line and "annihilated" in line and "x5" in line
    plain, _ = _padded_steps(5, strong=False)
    assert [f.kind for f in plain.findings if not f.downstream] == ["contamination"]


def test_a_genuine_nan_under_strong_zeros_stays_a_finding():
    x = torch.tensor([-1.0, 4.0], requires_grad=True)
    with gw.trace() as report, gw.strong_zeros():
        x.sqrt().sum().backward()
    assert [f.kind for f in report.findings] == ["nan"] and not report.removed
    assert x.grad.isnan().any()


def test_a_where_branch_strong_zeros_removed():
    x = torch.tensor([-1.0, 4.0], requires_grad=True)
    with gw.trace() as report, gw.strong_zeros():
        torch.where(x > 0, x.sqrt(), x).sum().backward()
    assert not report.findings and len(report.removed) == 1 and "aten.sqrt" in report.removed[0]
    assert torch.equal(x.grad, gw.grad(torch.where(x > 0, x.sqrt(), x).sum(), x)[0])


def _sparse():
    v = torch.tensor([1.0, 2.0], requires_grad=True)
    s = torch.sparse_coo_tensor(torch.tensor([[0, 1], [1, 0]]), v, (2, 2), check_invariants=True)
    torch.sparse.mm(s, torch.ones(2, 2)).sum().backward()
    return v.grad


def _nested_strided():
    warnings.filterwarnings("ignore", "The PyTorch API of nested tensors is in prototype", UserWarning)
    a = torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)], requires_grad=True)
    return torch.nested.to_padded_tensor(a * 2, 0.0).sum()


def _nested_jagged():
    a = torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)], layout=torch.jagged,
                                   requires_grad=True)
    return a.clone().values().sum()


def _dual_custom_function():
    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def jvp(ctx, t):
            return t * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    with fwAD.dual_level():
        return fwAD.unpack_dual(Double.apply(fwAD.make_dual(torch.ones(3), torch.ones(3)))).tangent


def _gradgradcheck_abs():
    x = torch.tensor([0.5, -1.0, 2.0], dtype=torch.double, requires_grad=True)
    return torch.autograd.gradgradcheck(lambda x: torch.nn.functional.l1_loss(x, torch.zeros_like(x)), (x,),
                                        check_batched_grad=True)


def _gradcheck_forward_and_batched():
    x = torch.tensor([0.5, -1.0, 2.0], dtype=torch.double, requires_grad=True)
    return torch.autograd.gradcheck(lambda x: x.abs() * 2, (x,), check_forward_ad=True, check_batched_grad=True)


def _gradcheck_of_a_hessian():
    # the batched-gradient check runs autograd.grad under legacy vmap: its results are batched tensors, here
    # around a tensor subclass (PyTorch's own test_hessian_create_graph, which once crashed the trace)
    from torch.testing._internal.logging_tensor import LoggingTensor

    x = LoggingTensor(torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.double), requires_grad=True)
    return torch.autograd.gradcheck(
        lambda x: torch.autograd.functional.hessian(lambda y: y.pow(3).sum(), x, create_graph=True), (x,),
        check_batched_grad=True)


def _gradient_edge_output():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = x * 3
    return torch.autograd.grad(torch.autograd.graph.get_gradient_edge(y), x, grad_outputs=torch.ones(2))[0]


def _grads_batched():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    return torch.autograd.grad(x * 2, x, torch.eye(2), is_grads_batched=True)[0]


KINDS = [
    ("meta module init", lambda: torch.nn.Linear(4, 4, device="meta").weight.shape, "meta"),
    ("sparse", _sparse, "sparse"),
    ("mkldnn", lambda: torch.randn(2, 3).to_mkldnn().to_dense().shape, "mkldnn"),
    ("nested strided", _nested_strided, "nested"),
    ("nested jagged", _nested_jagged, "NestedTensor"),
    ("forward-AD custom Function", _dual_custom_function, "forward-AD"),
    ("gradgradcheck of abs (ZeroTensors)", _gradgradcheck_abs, "ZeroTensor"),
    ("gradcheck forward AD + batched", _gradcheck_forward_and_batched, "forward-AD"),
    ("gradcheck of a hessian (legacy-vmap batched results)", _gradcheck_of_a_hessian, None),
    ("GradientEdge output", _gradient_edge_output, None),
    ("is_grads_batched", _grads_batched, "functorch"),
]


@pytest.mark.parametrize(("name", "fn", "note"), KINDS, ids=[k[0] for k in KINDS])
def test_every_tensor_kind_runs_as_plain_pytorch_with_a_note(name, fn, note):
    """Each call gives PyTorch's own result under the trace, and what the trace could not read is noted."""
    torch.manual_seed(0)
    expected = fn()
    torch.manual_seed(0)
    with gw.trace() as report:
        got = fn()
    if isinstance(expected, torch.Tensor) and expected.layout == torch.strided and not expected.is_nested:
        assert torch.equal(got, expected)
    else:
        assert type(got) is type(expected)
    if note is not None:
        assert any(note in n for n in report.notes), report.notes
    str(report)  # renders


def test_two_threads_trace_at_once_and_a_third_is_untouched():
    reports, grads = {}, {}
    barrier = threading.Barrier(3)

    def traced(k):
        x = torch.tensor([-1.0, 4.0, 9.0][: k + 2], requires_grad=True)
        barrier.wait()
        with gw.trace() as r:
            for _ in range(30):
                torch.where(x > 0, x.sqrt(), x).sum().backward()
        reports[k] = r

    def plain():
        x = torch.tensor([-1.0, 4.0], requires_grad=True)
        barrier.wait()
        for _ in range(30):
            torch.where(x > 0, x.sqrt(), x).sum().backward()
        grads["plain"] = x.grad

    threads = [threading.Thread(target=traced, args=(k,)) for k in range(2)] + [threading.Thread(target=plain)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(2):
        (f,) = reports[k].findings
        assert f.kind == "contamination" and f.occurrences == 30 and f.reaches == ["x"]
    assert grads["plain"].isnan().any()
    assert not _session._TRACERS and torch.autograd.backward.__module__ == "torch.autograd"


def test_snapshot_gives_the_report_so_far_without_ending_the_trace():
    x = torch.tensor([-1.0, 4.0], requires_grad=True)
    assert _session.snapshot() is None
    with gw.trace() as report:
        torch.where(x > 0, x.sqrt(), x).sum().backward()
        early = _session.snapshot()
        x.relu().sum().backward()
    assert [f.kind for f in early.findings] == ["contamination"]
    assert [f.kind for f in report.findings] == ["contamination"] and report.findings[0].occurrences == 1


def test_a_nan_literal_is_born_at_its_line():
    w = torch.ones(3, requires_grad=True)
    with gw.trace() as report:
        v = torch.tensor([1.0, 2.0, float("nan")])  # the literal's line
        (v * w)[:2].sum().backward()
    (f,) = report.findings
    assert f.kind == "contamination" and f.born_op == "aten.lift_fresh" and "torch.tensor([1.0" in _line(
        f.born_location)


def test_a_zero_the_program_computes_is_no_contamination_as_for_strong_zeros():
    """(0 * sqrt(w)).sum() at w = -1: the zero is a value, strong zeros keep the NaN, and the trace calls it
    genuine (no contamination finding next to it)."""
    w = torch.tensor([-1.0], requires_grad=True)
    strong = gw.grad((torch.zeros(1) * w.sqrt()).sum(), w)[0]
    with gw.trace() as report:
        (torch.zeros(1) * w.sqrt()).sum().backward()
    assert strong.isnan().all()
    assert [f.kind for f in report.findings] == ["nan"], str(report)


def _line(location: str) -> str:
    from pathlib import Path

    path, _, line = location.rpartition(":")
    return Path(path).read_text().splitlines()[int(line) - 1]


def test_a_nan_in_an_expanded_view_costs_what_the_view_stores(monkeypatch):
    """A NaN broadcast by expand to 10^8 elements: the trace's checks, masks, counts and positions work on the
    one element the view stores (full-size masks took ~1 byte per viewed element: +968 MB for a large view)."""
    import gradwise as gw

    largest = [0]
    for name in ("isfinite", "isnan"):
        real = getattr(torch, name)

        def spy(t, _real=real):
            largest[0] = max(largest[0], t.numel())
            return _real(t)

        monkeypatch.setattr(torch, name, spy)
    w = torch.ones(1, 1, requires_grad=True)
    with gw.trace() as report:
        view = (torch.full((1, 1), float("nan")) * w).expand(10**4, 10**4)
        view.sum().backward()  # the sum's backward expands its seed too: nothing of the view's size is stored
    assert largest[0] < 10**4  # never a mask of the view's size
    assert [f.kind for f in report.findings] == ["nan"]  # genuine: the sum reads it


def test_mask_counts_and_first_positions_of_expanded_masks_equal_the_materialised():
    from gradwise._trace._store import count, first

    g = torch.Generator().manual_seed(0)
    for shape, expand in [((1, 5), (7, 5)), ((4, 1, 3), (4, 6, 3)), ((1,), (9,)), ((2, 1), (2, 4))]:
        stored = torch.rand(shape, generator=g) > 0.6
        view = stored.expand(expand)
        dense = view.contiguous()
        assert count(view) == count(dense)
        got, want = first(view), first(dense)
        assert got[:1] == want[:1] and all(bool(dense[tuple(i)]) for i in got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.bool])
@pytest.mark.parametrize("n", [1, 1000, 2**24 + 3])
def test_mask_counts_are_exact_in_every_mask_dtype(dtype, n):
    """A 0/1 float mask is counted by a float32 sum where that is exact (every partial sum <= 2**24), else in
    float64: the count equals count_nonzero's, also past float32's exact integers."""
    from gradwise._trace._store import count

    mask = torch.ones(n, dtype=dtype)  # all set: past 2**24, a float32 sum could not hold the count
    mask[:: max(2, n // 7)] = 0
    assert count(mask) == int(torch.count_nonzero(mask))
