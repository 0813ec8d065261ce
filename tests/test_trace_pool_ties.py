"""Max-pool window ties as the trace reports them, on the route 2x2 windows that tile the input take on CPU (the
second largest element of each window against its maximum, tr35): every tie is still reported, with the count
and the first indices that counting window by window gives (the reference: each window unfolded and compared
with its maximum), whatever the values (-inf, -0.0 beside 0.0, the smallest subnormal), dtype and layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import gradwise as gw

# few distinct values, so that windows tie often; -0.0 == 0.0 is a tie, -inf is an element below any maximum, two
# +inf tie, a NaN window has no tie (it equals nothing: the compare route counts those)
_VALUES = [float("-inf"), -1.0, -0.0, 0.0, 1e-45, 1.0, 1e30, float("inf"), float("nan")]
_LAYOUTS = ["contiguous", "channels_last", "transposed", "sliced"]


def _tied_windows(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Reference: the windows (2x2, tiling x, the last odd row/column left out) whose maximum occurs more than
    once, compared window by window."""
    rows, cols = values.shape[-2:]
    windows = x[..., : 2 * rows, : 2 * cols].unfold(-2, 2, 2).unfold(-2, 2, 2).flatten(-2)
    return (windows == values[..., None]).sum(-1) > 1


def _pool_finding(report):
    found = [f for f in report.findings if f.kind == "kink" and f.op == "aten.max_pool2d_with_indices"]
    assert len(found) <= 1, str(report)
    return found[0] if found else None


@settings(max_examples=60, deadline=None)
@given(data=st.lists(st.sampled_from(_VALUES), min_size=2 * 2 * 5 * 7, max_size=2 * 2 * 5 * 7),
       rows=st.integers(2, 5), cols=st.integers(2, 7), dtype=st.sampled_from([torch.float32, torch.float64]),
       layout=st.sampled_from(_LAYOUTS), finite=st.booleans())
def test_max_pool_2x2_ties_counted_window_by_window(data, rows, cols, dtype, layout, finite):
    x = torch.tensor(data, dtype=dtype).view(2, 2, 5, 7)[..., :rows, :cols]
    if finite:  # (most draws then take the second-largest route: only -inf windows leave it)
        x = x.nan_to_num(nan=2.0, posinf=2.0, neginf=float("-inf"))
    if layout == "contiguous":
        x = x.contiguous()
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    x.requires_grad_()
    with gw.trace() as report:
        values = F.max_pool2d(x, 2)
        values.sum().backward()  # (a sensitivity of 1 at every window)
    tied = _tied_windows(x.detach(), values.detach())
    finding = _pool_finding(report)
    if not tied.any():
        assert finding is None, str(report)
        return
    assert finding is not None, str(report)
    assert finding.count == int(tied.sum())
    assert finding.indices == tied.nonzero()[: len(finding.indices)].tolist()
    assert finding.reached_gradient


@pytest.mark.parametrize("batch", [1, 4])
def test_relu_dead_windows_of_a_cnn_are_all_reported(batch):
    """benchmarks/bench_trace.py's max-pool CNN (relu-dead windows tie at 0 on every step): each max-pool's tie
    count is the window-by-window count of its input, and a sensitivity reaches each."""
    torch.manual_seed(0)
    c1, c2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(batch, 3, 16, 16)
    with gw.trace() as report:
        a = torch.relu(c1(x))
        p = F.max_pool2d(a, 2)
        b = torch.relu(c2(p))
        q = F.max_pool2d(b, 2)
        q.logsumexp(1).mean().backward()
    found = {f.location: f for f in report.findings if f.op == "aten.max_pool2d_with_indices"}
    expected = [int(_tied_windows(t.detach(), v.detach()).sum()) for t, v in ((a, p), (b, q))]
    assert all(n > 0 for n in expected)
    assert sorted(f.count for f in found.values()) == sorted(expected), str(report)
    assert all(f.reached_gradient for f in found.values())
