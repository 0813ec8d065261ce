"""The reference the trace's classification is checked against, shared by the trace test modules: a program with
two writes (``program(pad, other)``: NaN padding by ``fill_``, a NaN/Inf by ``copy_``), run under gw.strong_zeros()
with each write alone (a write is genuine where its NaN/Inf stays in the gradient), and under gw.trace() with
both."""

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
