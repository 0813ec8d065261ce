"""``python -m gradwise demo``: the seed example, before and after strong zeros."""

from __future__ import annotations

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gradwise._strong_zeros import grad


def run_demo() -> int:
    """Linear(8, 1) on a batch whose rows 4..7 are NaN, loss reads rows 0..3 only."""
    console = Console()
    torch.manual_seed(137)
    lin = torch.nn.Linear(8, 1)
    x = torch.cat((torch.rand(4, 8), torch.full((4, 8), float("nan"))))
    console.print("[bold]gradwise demo[/]: lin = nn.Linear(8, 1); x rows 4..7 are NaN; loss = lin(x)[:4].sum()\n")

    loss = lin(x)[:4].sum()
    plain = torch.autograd.grad(loss, (lin.weight, lin.bias), retain_graph=True)
    strong = grad(loss, (lin.weight, lin.bias))
    reference = torch.autograd.grad(lin(x[:4]).sum(), (lin.weight, lin.bias))

    table = Table(title="d loss / d lin.weight (first 4 of 8) and d loss / d lin.bias")
    table.add_column("method")
    table.add_column("weight grad")
    table.add_column("bias grad")
    for name, (gw_, gb) in [
        ("torch.autograd.grad", plain),
        ("gradwise.grad", strong),
        ("reference: lin(x[:4]).sum()", reference),
    ]:
        table.add_row(name, escape(str([round(v, 4) for v in gw_[0, :4].tolist()])), escape(str(gb.tolist())))
    console.print(table)
    same = all(torch.equal(a, b) for a, b in zip(strong, reference, strict=True))
    console.print(
        "\nPyTorch's slice backward pads rows 4..7 with zeros and the matmul backward computes 0 x NaN = NaN.\n"
        "gradwise treats those zeros as structural: they annihilate the NaN, so the gradient equals the one "
        f"of the program without the unused rows: [bold]{'identical' if same else 'DIFFERENT'}[/]."
    )
    return 0 if same else 1
