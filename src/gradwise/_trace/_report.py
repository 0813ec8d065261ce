"""Finding / Report: what `gw.trace()` found, rendered for people (rich) and tools (JSON).

May import: rich only (no torch, no other gradwise module).
"""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field

from rich.console import Console
from rich.markup import escape

KINDS = ("contamination", "nan", "inf", "kink", "singular")
_TITLES = {
    "contamination": "contamination: an unused NaN/Inf reached a gradient through zero sensitivities",
    "nan": "genuine NaN: the output depends on it",
    "inf": "genuine Inf: the output depends on it",
    "kink": "kink: an op evaluated where it is not differentiable",
    "singular": "singular point: an op evaluated where its derivative is infinite",
}
_STYLE = {"contamination": "yellow", "nan": "red", "inf": "red", "kink": "cyan", "singular": "magenta"}
_RECEIVED_TITLE = "received: a NaN/Inf that another rank's gradients brought in through a collective"
_COLLECTIVE_PREFIXES = ("c10d.", "_c10d_functional.")


def is_received(finding: Finding) -> bool:
    """True for a NaN/Inf this rank only received from another rank through a collective (its ``born_op``
    is the collective, e.g. "c10d.allreduce_"), False for one born here."""
    return finding.kind in ("nan", "inf") and (finding.born_op or "").startswith(_COLLECTIVE_PREFIXES)


@dataclass
class Finding:
    """One explained event, grouped over repeats of the same op on the same source line.

    ``kind``: "contamination", "nan", "inf", "kink" or "singular". ``op``: the aten op where it arose (the
    backward op where a zero sensitivity met NaN/Inf for contamination, the forward op otherwise).
    ``location``: "file.py:LINE" of the user code that called the op. ``count``: how many elements (summed
    over repeats). ``reaches``: the leaf tensors / parameters whose gradients it reached. ``fix``: what to do.
    """

    kind: str
    op: str
    location: str
    count: int
    reaches: list[str] = field(default_factory=list)
    fix: str = ""
    message: str = ""  # one line: what happened
    source: str = ""  # the text of the user's source line
    indices: list[list[int]] = field(default_factory=list)  # the first few elements concerned
    born_op: str | None = None  # where the NaN/Inf was born (op, or "input" for data that arrived non-finite)
    born_location: str | None = None
    born: str | None = None  # the birth, in words
    discarded_op: str | None = None  # contamination: the forward op whose backward produced the zero sensitivity
    discarded_location: str | None = None
    convention: str | None = None  # kink / singular: the value PyTorch's backward uses there
    reached_gradient: bool | None = None  # kink / singular: did a nonzero sensitivity go through it?
    occurrences: int = 1  # how many times this (kind, op, line) happened in the traced block
    rank: int | None = None  # torch.distributed rank that found it (None outside distributed runs)
    step: int | None = None  # the step (backward pass, counted from 0) where it first happened, when traced
    downstream: bool = False  # follows from an earlier finding's NaN/Inf (inherited through the parameters)
    # nan / inf met in a backward op without a strong-zero rule: contamination and genuine cannot be told apart
    undecided: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Report:
    """The findings of one `gw.trace()` block. ``str(report)`` renders it, ``report.to_json()`` serialises it."""

    findings: list[Finding] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)  # NaN/Inf the forward made that nothing used: not errors
    forward_ops: int = 0
    backward_ops: int = 0
    ranks: list[str] = field(default_factory=list)  # merged reports: which rank introduced what, who received it
    causes: list[str] = field(default_factory=list)  # root causes first: one line each, earliest first
    removed: list[str] = field(default_factory=list)  # contamination gw.strong_zeros() annihilated: not a problem
    notes: list[str] = field(default_factory=list)  # what the trace passed over (tensor kinds it cannot read)
    # backward calls run without being read (under a torch.func transform, batched seeds): their gradients were not
    # examined, so neither "no NaN/Inf gradients" nor "no gradient used" can be said of them
    untraced_backwards: int = 0

    def of_kind(self, *kinds: str) -> list[Finding]:
        return [f for f in self.findings if f.kind in kinds]

    def summary(self) -> str:
        """One line, e.g. "2 contamination findings, 0 genuine NaN, 0 genuine Inf, 3 kinks, 0 singular points"."""
        if not self.findings and not self.untraced_backwards:
            return (f"No NaN/Inf gradients and no kinks found ({self.forward_ops} forward and "
                    f"{self.backward_ops} backward ops traced).")
        if not self.findings:
            return (f"No NaN/Inf gradients and no kinks found in what was traced ({self.forward_ops} forward and "
                    f"{self.backward_ops} backward ops), but {self._untraced()}.")
        # a gradient gw.watch() could not replay (born at its backward call) is neither genuine nor contamination
        unknown = sum(1 for f in self.findings if f.born_op == "backward" and not f.downstream)
        n = {k: sum(1 for f in self.findings if f.kind == k and not f.downstream and f.born_op != "backward")
             for k in KINDS}
        s = lambda k, word: f"{n[k]} {word}{'' if n[k] == 1 else 's'}"
        down = sum(1 for f in self.findings if f.downstream)
        causes = len(self.causes)
        return (f"{s('contamination', 'contamination finding')}, {n['nan']} genuine NaN, {n['inf']} genuine Inf, "
                f"{s('kink', 'kink')}, {s('singular', 'singular point')}"
                + (f", {unknown} not explained (contamination or genuine)" if unknown else "")
                + (f"; {down} downstream finding{'' if down == 1 else 's'} of {causes} root "
                   f"cause{'' if causes == 1 else 's'}" if down else "")
                + (f"; {self._untraced()}" if self.untraced_backwards else ""))

    def _untraced(self) -> str:
        n = self.untraced_backwards
        return (f"{n} backward call{'' if n == 1 else 's'} ran untraced (under a torch.func transform, with batched "
                "gradients, recorded by make_fx, or started where the trace could not see the call: see the notes): "
                f"{'its' if n == 1 else 'their'} gradients were not examined and may hold NaN/Inf")

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON: ``{"summary", "findings": [...], "unused", "forward_ops", "backward_ops"}``, and
        ``"ranks"`` for a report merged across ranks (`gw.gather_reports`)."""
        data = {"summary": self.summary(), "findings": [f.as_dict() for f in self.findings],
                "unused": self.unused, "forward_ops": self.forward_ops, "backward_ops": self.backward_ops}
        if self.ranks:
            data["ranks"] = self.ranks
        if self.causes:
            data["causes"] = self.causes
        if self.removed:
            data["removed"] = self.removed
        if self.notes:
            data["notes"] = self.notes
        if self.untraced_backwards:
            data["untraced_backwards"] = self.untraced_backwards
        return json.dumps(data, indent=indent)

    def print(self, console: Console | None = None) -> None:
        """Print with colours to the terminal (or to the given rich Console)."""
        _render(self, console or Console(stderr=True, soft_wrap=True))

    def __str__(self) -> str:
        buf = io.StringIO()
        _render(self, Console(file=buf, width=110, color_system=None, force_terminal=False, soft_wrap=True))
        return buf.getvalue().rstrip("\n")

    def __len__(self) -> int:
        return len(self.findings)


SHOWN_FINDINGS = 50  # findings rendered in full by str(report) / report.print()


def _render(report: Report, console: Console) -> None:
    console.print(f"[bold]gradwise:[/bold] {escape(report.summary())}")
    for line in report.ranks:
        console.print(f"  {escape(line)}")
    causes = report.causes if len(report.findings) > 1 else []  # one finding tells its own story
    for letter, line in zip("ABCDEFGHIJKLMNOPQRSTUVWXYZ", causes, strict=False):
        console.print(f"  [bold]{letter}.[/] {escape(line)}")
    if len(causes) > 26:
        console.print(f"  ... and {len(causes) - 26} more root causes")
    for i, f in enumerate(report.findings, 1):
        if i > SHOWN_FINDINGS:  # a terminal report stays readable; report.findings / to_json() hold them all
            console.print()
            console.print(f"... and {len(report.findings) - SHOWN_FINDINGS} more findings (all of them are in "
                          "report.findings and report.to_json())")
            break
        style = _STYLE[f.kind]
        times = f" (x{f.occurrences})" if f.occurrences > 1 else ""
        if f.step is not None and (f.step or f.occurrences > 1):
            times += f", first at step {f.step}"
        where = f"rank {f.rank}: " if f.rank is not None else ""
        console.print()
        title = _RECEIVED_TITLE if is_received(f) else _TITLES[f.kind]
        if f.born_op == "backward":  # (gw.watch() could not replay that step)
            title = f"{'NaN' if f.kind == 'nan' else 'Inf'} gradient, not explained: contamination or genuine"
        elif f.undecided and f.kind == "contamination":
            title = "contamination, or beneath a genuine NaN/Inf in some gradients: not known there"
        elif f.undecided:
            title = f"{'NaN' if f.kind == 'nan' else 'Inf'}: contamination or genuine, not known (an op without a " \
                "strong-zero rule)"
        if f.downstream:
            title = f"downstream {'NaN' if f.kind == 'nan' else 'Inf'}: follows from an earlier finding's NaN/Inf"
        console.print(f"[bold {style}]{i}. {escape(where + title)}[/]")
        console.print(f"   [bold]{escape(f.op)}[/] at {escape(f.location)}{times}: {escape(f.message)}")
        if f.source:
            console.print(f"   [dim]>[/] {escape(f.source)}")
        if f.born:
            console.print(f"   born: {escape(f.born)}")
        if f.discarded_op:
            # (a formula that reads a triangle its forward never reads: _findings words its message so)
            why = "it never reads them" if "its forward never reads" in f.message else \
                "its backward sends zero sensitivity there"
            console.print(f"   unused since: {escape(f.discarded_op)} at {escape(f.discarded_location or '?')} ({why})")
        if f.convention:
            console.print(f"   PyTorch's convention: {escape(f.convention)}")
        if f.kind in ("kink", "singular"):
            console.print(f"   reached a gradient: {'yes' if f.reached_gradient else 'no'}")
        elements = f"{f.count} element{'s' if f.count != 1 else ''}"
        if f.indices:
            shown = ", ".join(str(tuple(ix)) if len(ix) != 1 else str(ix[0]) for ix in f.indices)
            elements += f", first at {shown}"
        console.print(f"   elements: {escape(elements)}")
        if f.kind not in ("kink", "singular") or f.reaches:
            console.print(f"   reaches: {escape(', '.join(f.reaches)) if f.reaches else 'no gradient'}")
        if f.fix:
            console.print(f"   fix: {escape(f.fix)}")
    if report.removed:
        console.print()
        console.print("[green]Removed by gw.strong_zeros() (contamination it annihilated: not a problem):[/]")
        for line in report.removed:
            console.print(f"  {escape(line)}")
    if report.unused:
        console.print()
        if report.untraced_backwards:  # an untraced backward may have used them: not known to be harmless
            console.print(f"[dim]NaN/Inf values made in the traced block that no traced gradient used (the untraced "
                          f"backward calls may have): {escape('; '.join(report.unused))}[/]")
        else:
            console.print(f"[dim]Not errors: NaN/Inf values made in the traced block that no gradient used: "
                          f"{escape('; '.join(report.unused))}[/]")
    if report.notes:
        console.print()
        console.print(f"[dim]Notes: {escape('; '.join(report.notes))}[/]")
