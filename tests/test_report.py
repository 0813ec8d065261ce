"""Report / Finding: the fields of the API contract, the terminal rendering and the JSON."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import gradwise as gw
from gradwise import Finding, Report


def _seed_report() -> Report:
    torch.manual_seed(137)
    lin = torch.nn.Linear(8, 1)
    x = torch.cat((torch.rand(4, 8), torch.full((4, 8), float("nan"))))
    ps, pe = torch.tensor([5.0, 2.0], requires_grad=True), torch.tensor([5.0, 4.0], requires_grad=True)
    with gw.trace() as report:
        lin(x)[:4].sum().backward()
        common = torch.minimum(pe, torch.tensor([5.0, 4.0])) - torch.maximum(ps, torch.tensor([5.0, 2.0])) + 1
        common.sum().backward()
    return report


def test_finding_has_the_contract_fields():
    names = {f.name for f in dataclasses.fields(Finding)}
    assert {"kind", "op", "location", "count", "reaches", "fix"} <= names


def test_summary_line_first_then_one_block_per_finding():
    report = _seed_report()
    text = str(report)
    first = text.splitlines()[0]
    assert first == "gradwise: 1 contamination finding, 0 genuine NaN, 0 genuine Inf, 2 kinks, 0 singular points"
    assert text.count("\n1. ") == 1 and text.count("\n3. ") == 1 and "\n4. " not in text
    assert "> lin(x)[:4].sum().backward()" in text  # the user's source line is shown
    assert "\x1b[" not in text  # plain text, no colour codes
    assert "reaches: lin.weight" in text and "gw.strong_zeros()" in text


def test_json_round_trip():
    report = _seed_report()
    data = json.loads(report.to_json())
    assert data["summary"] == report.summary()
    assert [f["kind"] for f in data["findings"]] == [f.kind for f in report.findings]
    assert Finding(**data["findings"][0]) == report.findings[0]


def test_empty_report_says_so_in_one_line():
    assert str(Report()).splitlines() == [f"gradwise: {Report().summary()}"]
    assert "No NaN/Inf" in Report().summary()
    assert json.loads(Report().to_json())["findings"] == []


def test_unused_forward_values_are_one_line_not_findings():
    x = torch.tensor([0.0, 1.0], requires_grad=True)
    with gw.trace() as report:
        y = torch.where(x > 0.5, x, torch.full_like(x, float("-inf")))  # an intentional -inf mask
        torch.softmax(y, 0).sum().backward()
    assert not report.of_kind("contamination", "nan", "inf")
    assert report.unused and str(report).count("Not errors") == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_a_nan_batch_is_born_in_its_dataloader_batch(workers):
    """A batch from a DataLoader brings NaN: the birth is the data that arrived, with the batch's index. With
    worker processes the batch reaches the trace only as storage rebinding (aten.set_ inside
    multiprocessing), which is no birth."""
    from torch.utils.data import DataLoader, TensorDataset

    x, y = torch.randn(64, 8), torch.randn(64, 1)
    x[40:48] = float("nan")
    lin = torch.nn.Linear(8, 1)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, num_workers=workers)
    with gw.trace() as report:
        for xb, yb in loader:
            lin.zero_grad()
            ((lin(xb) - yb) ** 2).mean().backward()
    (finding,) = [f for f in report.findings if not f.downstream]
    assert finding.born_op == "input", finding
    assert "in DataLoader batch 2" in finding.born and finding.born.startswith("xb arrived with 64 NaN"), finding.born


def _padded_loader_run(pad: bool, real: bool, strong: bool, batches: int = 4, real_at: int = 2,
                       with_pad: tuple = (0,)) -> Report:
    """Batches of 2 sequences of 6 steps; ``pad``: NaN padding (steps 4, 5, which the loss never reads) in the
    batches ``with_pad``; ``real``: one NaN the loss reads, in batch ``real_at``."""
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    x = torch.randn(2 * batches, 6, 4)
    for b in with_pad if pad else ():
        x[2 * b : 2 * b + 2, 4:] = float("nan")
    if real:
        x[2 * real_at, 0, 0] = float("nan")
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    with gw.trace() as report:
        for xb in DataLoader(x, batch_size=2):
            loss = net(xb)[:, :4].pow(2).mean()
            net.zero_grad()
            if strong:
                with gw.strong_zeros():
                    loss.backward()
            else:
                loss.backward()
    return report


def _facts(findings) -> list:
    return [(f.kind, f.op, f.count, f.indices, f.born, f.reaches, f.step, f.occurrences) for f in findings]


@pytest.mark.parametrize("strong", [False, True])
def test_nan_data_of_different_dataloader_batches_are_told_apart(strong):
    """Batch 0 brings NaN padding the loss never reads, batch 2 a NaN it reads. Each batch's data is its own
    arrival: the report is the union of the two programs' reports, one with the padding alone, one with the real
    NaN alone (it merged them into one genuine finding born in batch 0, with the padding's elements, and under
    strong zeros the removal of the padding disappeared)."""
    both = _padded_loader_run(pad=True, real=True, strong=strong)
    padding = _padded_loader_run(pad=True, real=False, strong=strong)
    real = _padded_loader_run(pad=False, real=True, strong=strong)
    assert _facts(both.of_kind("nan")) == _facts(real.of_kind("nan")), str(both)
    assert "in DataLoader batch 2" in both.of_kind("nan")[0].born
    assert _facts(both.of_kind("contamination")) == _facts(padding.of_kind("contamination")), str(both)
    assert both.removed == padding.removed and bool(both.removed) == strong, str(both)


def test_dataloader_batches_with_the_same_padding_are_one_line():
    """Padding in every batch and a real NaN in batch 1: the padding of batches 0, 2 and 3 is told in one
    contamination finding per backward op (one removal under strong zeros), as in the program without batch 1's
    padding nor its real NaN; the real NaN is a finding of batch 1, as in the program with batch 1's data only."""
    for strong in (False, True):
        report = _padded_loader_run(pad=True, real=True, strong=strong, real_at=1, with_pad=(0, 1, 2, 3))
        padding = _padded_loader_run(pad=True, real=False, strong=strong, with_pad=(0, 2, 3))
        real = _padded_loader_run(pad=True, real=True, strong=strong, real_at=1, with_pad=(1,))
        # batch 1's padding is removed too, beside its real NaN (one arrival, used and discarded): one line
        assert len(report.removed) == len(padding.removed) == strong, str(report)
        assert not strong or ("batches 0, 1, 2, 3" in report.removed[0] and "never uses it" in report.removed[0])
        # batch 1's padding meets its zero sensitivity beside the real NaN: an elementwise backward (tanh's)
        # tells it apart as contamination, but the matmuls after it mix the real NaN into every element of the
        # gradients (gw.grad's are NaN wherever PyTorch's are): no contamination of batch 1 reaches a gradient
        for op in ("aten.mm", "aten.tanh_backward"):
            at = lambda r, op=op: [f for f in r.of_kind("contamination") if f.op == op]
            assert _facts(at(report)) == _facts(at(padding)), str(report)
        assert "batches 0, 2, 3" in str(report) or strong
        assert _facts(report.of_kind("nan")) == _facts(real.of_kind("nan")), str(report)


def test_an_overflow_chain_is_rooted_at_the_overflow():
    """A naive softmax: exp overflows to Inf, then inf / inf is NaN. The finding names the exp (its fix is the
    one to apply), and says what the division made of it; no second finding for the division."""
    x = torch.tensor([1.0, 1000.0, 2.0], requires_grad=True)
    with gw.trace() as report:
        e = x.exp()
        (e / e.sum()).log().sum().backward()
    (finding,) = report.findings
    assert (finding.kind, finding.born_op) == ("nan", "aten.exp"), finding
    assert "then aten.div" in finding.born and "inf / inf" in finding.born, finding.born
    assert "logsumexp" in finding.fix


def test_the_terminal_report_is_bounded():
    """1,000 different findings: str(report) shows the first 50 and says where the rest are (it printed 9,000
    lines); report.findings and the JSON keep them all."""
    from gradwise._trace._report import SHOWN_FINDINGS, Finding, Report

    report = Report(findings=[Finding("nan", "aten.sqrt", f"f.py:{i}", 1, message="m") for i in range(1000)])
    text = str(report)
    assert f"and {1000 - SHOWN_FINDINGS} more findings" in text and text.count("aten.sqrt at f.py:") == SHOWN_FINDINGS
    assert len(json.loads(report.to_json())["findings"]) == 1000
