"""Known trace defects of session 27: the trace and gw.strong_zeros() must agree on what is contamination (a
formula that reads a triangle its forward never reads), a NaN a hook sets is born at the hook, gw.watch() leaves
the program's state as it is without it, and cdist's kink is reported on both of PyTorch's routes. The ground
truth is plain PyTorch (which gradient entries are NaN) and gw.strong_zeros() on the same program."""

from __future__ import annotations

import contextlib

import pytest
import torch

import gradwise as gw

NAN = float("nan")


def _spd(n: int = 4) -> torch.Tensor:
    torch.manual_seed(0)
    m = torch.randn(n, n, dtype=torch.float64)
    return m @ m.T + n * torch.eye(n, dtype=torch.float64)


def _unused_nan(a: torch.Tensor, upper: bool) -> torch.Tensor:
    """``a`` with NaN in the strict triangle a Cholesky-factor reader does not read (upper for a lower factor)."""
    full = torch.full_like(a, NAN)
    return a + (full.tril(-1) if upper else full.triu(1))


def _solve(a, upper):
    b = torch.linspace(-1, 1, 8, dtype=torch.float64).reshape(4, 2)
    return torch.cholesky_solve(b, _unused_nan(torch.linalg.cholesky(a, upper=upper), upper), upper=upper).sum()


def _inverse(a, upper):
    return torch.cholesky_inverse(_unused_nan(torch.linalg.cholesky(a, upper=upper), upper), upper=upper).sum()


def _pinv(a, upper):
    return torch.linalg.pinv(_unused_nan(a, False), hermitian=True).sum()


_TRIANGLE_READERS = {  # program, its forward op (the one whose formula reads the unused triangle)
    "cholesky_solve": (_solve, False, "aten.cholesky_solve"),
    "cholesky_solve upper": (_solve, True, "aten.cholesky_solve"),
    "cholesky_inverse": (_inverse, False, "aten.cholesky_inverse"),
    "cholesky_inverse upper": (_inverse, True, "aten.cholesky_inverse"),
    "pinv hermitian": (_pinv, False, "aten.linalg_pinv"),
}


@pytest.mark.parametrize("name", list(_TRIANGLE_READERS))
def test_an_unused_triangle_is_contamination_as_strong_zeros_say(name):
    fn, upper, op = _TRIANGLE_READERS[name]
    a = _spd().requires_grad_()
    with gw.trace() as report:
        fn(a, upper).backward()
    assert a.grad.isnan().any()  # PyTorch's formula reads the unused triangle
    assert report.findings and {f.kind for f in report.findings} == {"contamination"}, report
    assert {f.discarded_op for f in report.findings} == {op}
    assert all("never reads" in f.message for f in report.findings)
    a.grad = None
    with gw.strong_zeros(), gw.trace() as report:
        fn(a, upper).backward()
    assert bool(a.grad.isfinite().all())  # the ground truth: strong zeros remove it
    assert not report.findings, report
    assert report.removed and "annihilated it in the backward of " + op in report.removed[0]


def test_an_unused_triangle_of_a_leaf_that_arrived_so_is_contamination():
    lower = torch.linalg.cholesky(_spd())
    factor = lower.masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), NAN).requires_grad_()
    b = torch.ones(4, 2, dtype=torch.float64)
    with gw.trace() as report:  # the forward met no NaN/Inf (no shadow pass): the node is followed alone
        torch.cholesky_solve(b, factor).sum().backward()
    assert factor.grad.isnan().any()
    assert [f.kind for f in report.findings] == ["contamination"], report


def test_a_nan_in_the_read_triangle_stays_genuine():
    a = _spd().requires_grad_()
    with gw.trace() as report:
        lower = torch.linalg.cholesky(a)
        lower = lower + torch.full_like(lower, NAN)  # both triangles: the forward reads NaN
        torch.cholesky_solve(torch.ones(4, 2, dtype=torch.float64), lower).sum().backward()
    assert report.of_kind("nan"), report
    assert not report.of_kind("contamination"), report


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [5, 26, 40])
@pytest.mark.parametrize("batched", [False, True], ids=["2d", "batched"])
def test_cdist_reports_coincident_points_on_both_routes(rows, dtype, batched):
    """p = 2 with more than 25 rows runs PyTorch's matrix-product route (aten._euclidean_dist, no exact 0 at a
    coincident pair): it reported nothing there while <= 25 rows reported the pairs. Reference: the pairs of equal
    rows, counted by loops."""
    torch.manual_seed(1)
    x = (torch.randn(2, rows, 3, dtype=dtype) * 10)
    y = torch.cat((x[:, :3], torch.randn(2, 7, 3, dtype=dtype)), 1)  # 3 coincident pairs per batch
    y[:, 4] = x[:, 4] + 1e-3  # near, not coincident
    x, y = (x, y) if batched else (x[0], y[0])
    want = sum(bool(torch.equal(a, b)) for xa, ya in zip(x.reshape(-1, rows, 3), y.reshape(-1, 10, 3), strict=True)
               for a in xa for b in ya)
    x.requires_grad_()
    with gw.trace() as report:
        torch.cdist(x, y).sum().backward()
    assert [(f.kind, f.count) for f in report.findings] == [("singular", want)], report


def _nan_hook(g):
    return g * NAN


def _nan_tensor_hook(g):
    return torch.full_like(g, NAN)


def _module_hook(module, grad_input, grad_output):
    return (grad_input[0] * NAN,)


def _module_pre_hook(module, grad_output):
    return (grad_output[0] * NAN,)


def _post_accumulate_hook(p):
    p.grad.mul_(NAN)


def _node_hook(grad_inputs, grad_outputs):
    return tuple(None if g is None else g * NAN for g in grad_inputs)


_HOOKS = {  # where the hook goes, the hook (its function's name is what the report names)
    "leaf tensor hook": lambda x, y, lin: x.register_hook(_nan_hook),
    "non-leaf tensor hook": lambda x, y, lin: y.register_hook(_nan_hook),
    "hook returning a NaN tensor": lambda x, y, lin: y.register_hook(_nan_tensor_hook),
    "module full backward hook": lambda x, y, lin: lin.register_full_backward_hook(_module_hook),
    "module full backward pre-hook": lambda x, y, lin: lin.register_full_backward_pre_hook(_module_pre_hook),
    "post-accumulate-grad hook": lambda x, y, lin: lin.weight.register_post_accumulate_grad_hook(_post_accumulate_hook),
    "node hook": lambda x, y, lin: y.grad_fn.register_hook(_node_hook),
}


@pytest.mark.parametrize("where", list(_HOOKS))
def test_a_nan_a_hook_sets_is_born_at_the_hook(where):
    """A hook that sets NaN was told as 'the backward of AccumulateGrad (or of the node running the hook) made
    NaN': the NaN is born in the user's hook, which the report names with its line."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3, requires_grad=True)
    with gw.trace() as report:
        y = x * 2
        hook = _HOOKS[where](x, y, lin)
        lin(y).exp().sum().backward()
    hook.remove()
    grads = {"x": x.grad, "lin.weight": lin.weight.grad, "lin.bias": lin.bias.grad}
    nonfinite = {n for n, g in grads.items() if not bool(g.isfinite().all())}
    assert nonfinite  # ground truth: plain PyTorch's gradients
    [finding] = report.findings
    assert finding.kind == "nan", report
    name = _HOOKS[where].__code__.co_names[-1]  # the hook's function
    assert finding.op == f"hook {name}", report
    code = globals()[name].__code__
    assert finding.location.endswith(f":{code.co_firstlineno + 1}"), report  # the hook's line that made NaN
    assert f"the hook {name} (run in the backward of" in finding.born, report
    assert set(finding.reaches) == nonfinite, report


def test_a_custom_backward_is_no_hook():
    class Nan(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return a * 1

        @staticmethod
        def backward(ctx, g):
            return g * NAN

    x = torch.ones(3, requires_grad=True)
    with gw.trace() as report:
        Nan.apply(x).sum().backward()
    [finding] = report.findings
    assert not finding.op.startswith("hook") and "hook" not in finding.born, report


def _hooked_step(hooks: str, watch: bool):
    """One step whose gradient is NaN (padding the loss never reads), with hooks that count, log and write."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    total = torch.zeros(4, 3)
    calls: list[str] = []

    def tensor_hook(g):
        calls.append("tensor")
        total.add_(g.nan_to_num())  # an in-place write of the program's own tensor

    def module_hook(module, grad_input, grad_output):
        calls.append("module")

    def node_hook(grad_inputs, grad_outputs):
        calls.append("node")

    x = torch.cat((torch.randn(2, 3), torch.full((2, 3), NAN))).requires_grad_()
    if "tensor" in hooks:
        x.register_hook(tensor_hook)
    if "module" in hooks:
        lin.register_full_backward_hook(module_hook)
    with gw.watch() if watch else contextlib.nullcontext() as report:
        y = lin(x)
        if "node" in hooks:
            y.grad_fn.register_hook(node_hook)
        y[:2].sum().backward()
    return calls, total, lin.weight.grad, x.grad, report


@pytest.mark.parametrize("hooks", ["tensor", "module", "node", "tensor module node", ""])
def test_watch_leaves_the_program_state_as_without_it(hooks):
    """gw.watch() replays its first non-finite step to explain it: the replay ran the user's hooks a second time
    (a counter counted 2, a list held two entries, a tensor a hook adds to held twice the sum). Reference: the same
    program without gw.watch()."""
    calls, total, wgrad, xgrad, _ = _hooked_step(hooks, False)
    calls_w, total_w, wgrad_w, xgrad_w, report = _hooked_step(hooks, True)
    assert calls_w == calls
    assert torch.equal(total_w, total)
    assert torch.equal(wgrad_w.nan_to_num(7.0), wgrad.nan_to_num(7.0))
    assert torch.equal(xgrad_w.nan_to_num(7.0), xgrad.nan_to_num(7.0))
    assert report.findings, report  # the NaN gradient is told either way
    if hooks:
        assert "which a replay would run a second time" in report.notes[0], report
    else:  # no hook: replayed and explained as before
        assert [f.kind for f in report.findings] == ["contamination"], report


_SELECTED_AFTER = {  # a NaN born at x < 0, then a selection that keeps some of the NaN elements
    "slice": lambda x: x.sqrt()[:2].sum(),
    "index": lambda x: x.sqrt()[torch.tensor([0, 3])].sum(),
    "column then rows": lambda x: (x.sqrt()[:, :1] @ torch.ones(1, 3))[1:].sum(),
    "nothing dropped": lambda x: x.sqrt().sum(),
}


@pytest.mark.parametrize("name", list(_SELECTED_AFTER))
def test_a_genuine_finding_counts_the_elements_the_output_uses(name):
    """sqrt of 4 negative values, then a slice keeping 2 of them: the genuine finding counted the 4 NaN sqrt
    made (its elements listed the dropped rows too, which the contamination finding lists). Reference: the NaN
    gradient elements under gw.strong_zeros() (genuine) and under plain PyTorch (genuine + contamination)."""
    f = _SELECTED_AFTER[name]
    x0 = torch.tensor([[-1.0, 4.0], [4.0, -1.0], [-1.0, -1.0], [4.0, 4.0]])
    x = x0.clone().requires_grad_()
    with gw.trace() as report:
        f(x).backward()
    strong = x0.clone().requires_grad_()
    with gw.strong_zeros():
        f(strong).backward()
    genuine = report.of_kind("nan")
    contamination = report.of_kind("contamination")
    assert sum(g.count for g in genuine) == int(strong.grad.isnan().sum()), report
    assert sum(c.count for c in contamination) + sum(g.count for g in genuine) == int(x.grad.isnan().sum()), report
    kept = {tuple(i) for i in strong.grad.isnan().nonzero().tolist()}
    assert all({tuple(i) if isinstance(i, list) else (i,) for i in g.indices} <= kept for g in genuine), report
