"""The reference the trace's classification is checked against, shared by the trace test modules: a program with
two writes (``program(pad, other)``: NaN padding by ``fill_``, a NaN/Inf by ``copy_``), run under gw.strong_zeros()
with each write alone (a write is genuine where its NaN/Inf stays in the gradient), and under gw.trace() with
both."""

import torch

import gradwise as gw

WRITES = (("aten.fill_", (True, False)), ("aten.copy_", (False, True)))


def genuine_findings(report) -> list:
    """The report's genuine findings (kind nan or inf)."""
    return [f for f in report.findings if f.kind in ("nan", "inf")]


def traced_and_strong(program) -> tuple:
    """(gw.trace()'s report of ``program(True, True)``, the writes strong zeros keep as genuine, each alone).
    ``program`` returns the tensor whose .grad the writes may reach."""
    genuine = set()
    for name, writes in WRITES:
        with gw.strong_zeros():
            if not bool(program(*writes).grad.isfinite().all()):
                genuine.add(name)
    with gw.trace() as report:
        program(True, True)
    return report, genuine


def padded_program(loss_of, at: tuple = (0, 1), value: float = float("nan"), seed: int | None = None,
                   used_first: bool = False):
    """The usual ``program(pad, used)`` of `traced_and_strong`: w = randn(6, 4) requiring grad, x = randn(6, 4)
    whose rows 4: are NaN padding (fill_) and x[at] = value (copy_), then ``loss_of(x.clone() * w).backward()``
    (``loss_of`` returns the loss). ``seed``: set again after the data (ops that draw random numbers);
    ``used_first``: the used write before the padding's."""
    def program(pad: bool, used: bool):
        torch.manual_seed(0)
        w = torch.randn(6, 4, requires_grad=True)
        x = torch.randn(6, 4)
        if used and used_first:
            x[at] = value
        if pad:
            x[4:] = float("nan")
        if used and not used_first:
            x[at] = value
        if seed is not None:
            torch.manual_seed(seed)
        loss_of(x.clone() * w).backward()
        return w

    return program


def masked_key_attention(pad: bool, key: bool, query: bool, in_place: bool) -> torch.Tensor:
    """Attention over two sequences of 5 whose keys 3.. of the second are masked with ``masked_fill(m, -inf)`` (in
    place or not), run forward and backward; returns the projection ``w`` (its .grad filled). ``pad``: those masked
    keys are NaN; ``key``: a used key element k[1, 1, 0] is NaN; ``query``: a used query element q[0, 2, 1] is."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    w = torch.randn(4, 4, requires_grad=True)
    if pad:
        k[1, 3:] = float("nan")
    if key:
        k[1, 1, 0] = float("nan")
    if query:
        q[0, 2, 1] = float("nan")
    s = (q @ w) @ k.transpose(1, 2)
    m = torch.zeros(2, 5, 5, dtype=torch.bool)
    m[1, :, 3:] = True
    s = s.masked_fill_(m, float("-inf")) if in_place else s.masked_fill(m, float("-inf"))
    (s.softmax(-1) @ (k.nan_to_num() @ w))[:, :4].sum().backward()
    return w


def traced_with_each_write_kept(program) -> object:
    """The trace's report of ``program(True, True)`` (two writes of NaN/Inf), having checked the reference: with
    each write alone, strong zeros keep w's gradient non-finite (two root causes, each genuine)."""
    for writes in ((True, False), (False, True)):
        with gw.strong_zeros():
            assert not bool(program(*writes).grad.isfinite().all())
    with gw.trace() as report:
        program(True, True)
    return report
