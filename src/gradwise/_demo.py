"""``python -m gradwise demo``: the two seed problems.

1. NaN padding that the loss never reads: PyTorch's gradient is NaN, strong zeros give the gradient of the
   program without the padding.
2. A span IoU loss at its global minimum (prediction == target), written three ways: PyTorch's gradient
   depends on how min/max are written and is nonzero for two of them; the subdifferential is the same box for
   all three, and the stationarity certificate proves the point stationary.
"""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gradwise._nonsmooth import Subdifferential, stationarity
from gradwise._strong_zeros import grad


def run_demo() -> int:
    """Both seeds; the exit status is 0 when every claim printed held."""
    console = Console()
    start = time.perf_counter()
    ok = _nan_padding(console)
    console.print()
    ok &= _iou_at_its_minimum(console)
    console.print(f"\n[dim]({time.perf_counter() - start:.1f} s)[/]")
    return 0 if ok else 1


def _nan_padding(console: Console) -> bool:
    """Linear(8, 1) on a batch whose rows 4..7 are NaN, loss reads rows 0..3 only."""
    torch.manual_seed(137)
    lin = torch.nn.Linear(8, 1)
    x = torch.cat((torch.rand(4, 8), torch.full((4, 8), float("nan"))))
    console.print("[bold]1. NaN padding[/]: lin = nn.Linear(8, 1); x rows 4..7 are NaN; loss = lin(x)[:4].sum()\n")

    loss = lin(x)[:4].sum()
    plain = torch.autograd.grad(loss, (lin.weight, lin.bias), retain_graph=True)
    strong = grad(loss, (lin.weight, lin.bias))
    reference = torch.autograd.grad(lin(x[:4]).sum(), (lin.weight, lin.bias))

    table = Table(title="d loss / d lin.weight (first 4 of 8) and d loss / d lin.bias")
    table.add_column("method")
    table.add_column("weight grad")
    table.add_column("bias grad")
    for name, (gw_, gb) in [
        ("torch.autograd.grad (before)", plain),
        ("gradwise.grad (after)", strong),
        ("reference: lin(x[:4]).sum()", reference),
    ]:
        table.add_row(name, escape(str([round(v, 4) for v in gw_[0, :4].tolist()])), escape(str(gb.tolist())))
    console.print(table)
    same = all(torch.equal(a, b) for a, b in zip(strong, reference, strict=True))
    console.print(
        "PyTorch's slice backward pads rows 4..7 with zeros and the matmul backward computes 0 x NaN = NaN.\n"
        "gradwise treats those zeros as structural: they annihilate the NaN, so the gradient equals the one "
        f"of the program without the unused rows: [bold]{'identical' if same else 'DIFFERENT'}[/].\n"
        "Without editing a script: [bold]gradwise run --strong-zeros train.py[/]."
    )
    return same


_TARGET = (torch.tensor([5.0, 2.0]), torch.tensor([5.0, 4.0]))  # two spans, of length 1 and 3

# min(a, b) and max(a, b) of two tensors, written three ways a user might
_WAYS = {
    "minimum, maximum": (torch.minimum, torch.maximum),
    "stack().min(0), .max(0)": (lambda a, b: torch.stack([a, b]).min(0).values,
                                lambda a, b: torch.stack([a, b]).max(0).values),
    "where(a < b, a, b), ...": (lambda a, b: torch.where(a < b, a, b), lambda a, b: torch.where(a > b, a, b)),
}


def _iou(pred_start: torch.Tensor, pred_end: torch.Tensor, lo, hi) -> torch.Tensor:
    target_start, target_end = _TARGET
    common = (lo(pred_end, target_end) - hi(pred_start, target_start) + 1).clamp_min(0)
    union = (pred_end - pred_start + 1) + (target_end - target_start + 1) - common
    return (1 - common / union).mean()


def _iou_at_its_minimum(console: Console) -> bool:
    console.print("[bold]2. Nonzero gradients at the global minimum?[/] A 1-D IoU loss of two spans (lengths 1, 3) "
                  "at prediction == target (loss 0), min/max written three ways; gradients w.r.t. "
                  "(pred_start, pred_end)\n")
    x = tuple(t.clone().requires_grad_(True) for t in _TARGET)
    table = Table(title="IoU loss at its optimum")
    table.add_column("min, max with")
    table.add_column("PyTorch's gradient")
    table.add_column("gw.subdifferential")
    table.add_column("gw.stationarity")
    ok = True
    for name, (lo, hi) in _WAYS.items():
        f = lambda s, e, lo=lo, hi=hi: _iou(s, e, lo, hi)
        torch_grad = torch.autograd.grad(f(*x), x)
        cert = stationarity(f, x)
        sub = cert.subdifferential
        box = sub.matrix().amax(0)[:2]  # the hull here is a box centred at 0: its half-width per span
        # PyTorch's gradient is a generalized gradient iff it lies in the hull: least norm of the shifted hull
        shifted = Subdifferential([tuple(e - g for e, g in zip(el, torch_grad, strict=True)) for el in sub.elements],
                                  sub.exact)
        weights = torch.as_tensor(shifted.min_norm_weights())
        distance = float((weights @ shifted.matrix()).norm())
        inside = distance < 1e-6
        ok &= bool(cert.stationary) and sub.exact and inside
        table.add_row(
            escape(name),
            escape(str([[round(v, 4) for v in g.tolist()] for g in torch_grad])),
            f"{len(sub.elements)}{' (all)' if sub.exact else ''} pieces, box +-{[round(v, 4) for v in box.tolist()]}"
            f" per span; holds PyTorch's: {'yes' if inside else 'NO'}",
            f"{'stationary' if cert.stationary else cert.stationary}, least norm {cert.min_norm:.1e}",
        )
    console.print(table)
    console.print(
        "The loss has a kink at its minimum: every point of the box is a legitimate 'gradient', and PyTorch picks "
        "one by the way the formula is written (the minimum/maximum version happens to land on 0). Test "
        "optimality with [bold]gw.stationarity(f, x)[/], not with the gradient's size (docs/nonsmooth.md).")
    return ok
