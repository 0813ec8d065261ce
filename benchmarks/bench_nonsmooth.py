"""Cost of gradwise's nonsmooth calculus against plain PyTorch, same process, median of interleaved repeats.

    python benchmarks/bench_nonsmooth.py              # wall clock
    python benchmarks/bench_nonsmooth.py --cpu-time   # CPU time, one thread (for a machine loaded by others)
    python benchmarks/bench_nonsmooth.py --only top-k # only the rows whose name contains "top-k"

Rows: ``generalized_grad`` / plain ``torch.autograd.grad`` (forward + backward) on a 6-layer ReLU MLP (width 256,
batch 128, random data: no kink hit) and on a conv + max-pool network fed integer-valued images (many exact
ties in the pooling windows: all of them among relu-dead zeros, which are no kinks); the same network fed blocky
images (8x nearest-upsampled integer images: flat patches, so ~90,000 windows tie between live units and must
be ranked); a ReLU MLP whose loss takes ``maximum(h, h.flip(0))`` (elementwise ties between relu-dead mirrored
rows: no kinks); a top-k / sort loss over integer-valued scores (live ties in every row); ``stationarity`` on the
seed IoU loss at its optimum, and on a max layer whose 1,200 outputs tie (absolute times).
Target (issue #14): ratio <= 2 (goal 1.3) on the MLPs, the integer-image network and the top-k loss;
stationarity well under a second. The blocky row shows what live
ties cost (every call after the first carries tangents in its first pass, see docs/nonsmooth.md, "Cost").
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import gradwise as gw
from _harness import keep_freed_memory, median_times, print_table


def mlp_case():
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(256, 10))
    x, y = torch.randn(128, 256), torch.randint(0, 10, (128,))
    return model, x, y


def conv_case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(32 * 8 * 8, 10))
    x = torch.randint(0, 4, (64, 3, 32, 32)).float()  # integer-valued images: flat regions, tied windows
    return model, x, torch.randint(0, 10, (64,))


def blocky_case():
    model, _, y = conv_case()
    g = torch.Generator().manual_seed(1)
    small = torch.randint(0, 4, (64, 3, 4, 4), generator=g).float()
    return model, nn.functional.interpolate(small, scale_factor=8, mode="nearest"), y  # live ties in pool windows


class MirrorMax(nn.Module):
    """A ReLU MLP whose loss takes ``maximum(h, h.flip(0))``: mirrored rows tie wherever both are relu-dead (and
    exactly, since h is 0 there), the case of issue #14 (many elementwise ties, none of them a kink)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        h = self.body(x)
        return self.head(torch.maximum(h, h.flip(0)))


def mirror_case():
    torch.manual_seed(0)
    return MirrorMax(), torch.randn(128, 256), torch.randint(0, 10, (128,))


class TopkLoss(nn.Module):
    """Scores of integer-valued features through a linear layer with integer weights, then a top-k / sort loss:
    many exact ties among the scores (ties whose order changes the gradient: live)."""

    def __init__(self):
        super().__init__()
        self.score = nn.Linear(64, 512)
        with torch.no_grad():
            self.score.weight.copy_(torch.randint(-1, 2, self.score.weight.shape).float())
            self.score.bias.zero_()

    def forward(self, x):
        s = torch.relu(self.score(x))
        top = torch.topk(s, 32, dim=1).values
        ranked = torch.sort(s, dim=1, descending=True).values[:, :64]
        return top @ torch.linspace(1.0, 0.1, 32) + ranked @ torch.linspace(0.5, 0.0, 64)


def topk_case():
    torch.manual_seed(0)
    return TopkLoss(), torch.randint(0, 3, (128, 64)).float(), None


CPU_TIME = "--cpu-time" in sys.argv


def ratio_row(name, model, x, y, repeats):
    params = tuple(model.parameters())
    loss = (lambda *p: nn.functional.cross_entropy(model(x), y)) if y is not None else (lambda *p: model(x).mean())
    plain = lambda: torch.autograd.grad(loss(), params)
    ours = lambda: gw.generalized_grad(loss, params, seed=0)
    t = median_times({"torch": plain, "gradwise": ours}, repeats=repeats,
                     clock=time.process_time if CPU_TIME else time.perf_counter)
    return [name, t["torch"] * 1e3, t["gradwise"] * 1e3, t["gradwise"] / t["torch"]]


def iou_row():
    t = lambda v: torch.tensor(v)

    def iou(ps, pe):
        ts, te = t([5.0, 2.0]), t([5.0, 4.0])
        common = (torch.minimum(pe, te) - torch.maximum(ps, ts) + 1).clamp_min(0)
        return (1 - common / ((pe - ps + 1).clamp_min(0) + (te - ts + 1) - common)).mean()

    x = (t([5.0, 2.0]), t([5.0, 4.0]))
    start = time.perf_counter()
    gw.stationarity(iou, x)  # the first call pays one-time imports (SciPy's HiGHS, forward-AD tables)
    cold = time.perf_counter() - start
    warm = median_times({"stationarity": lambda: gw.stationarity(iou, x)}, repeats=5, warmup=0)["stationarity"]
    return ["stationarity, seed IoU loss (cold / warm)", cold * 1e3, warm * 1e3, "stationary=True"]


def tied_layer_row():
    """stationarity beyond enumeration: a max layer whose 1,200 outputs all tie (sampled pieces, decided by the
    interval-tangent bound, ``_nonsmooth/_bound.py``), at the default atol and at one the bound reaches only after
    Frank-Wolfe refinement."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (40, 5), generator=gen).double()
    w = torch.randn(5, 30, generator=gen, dtype=torch.float64)
    c = torch.randn(5, 30, generator=gen, dtype=torch.float64)

    def f(w1, w2):
        return torch.maximum(x @ w1, x @ w2).sum() + (c * w1).sum()

    times, verdicts = [], []
    for atol in (1e-6, 100.0):
        gw.stationarity(f, (w, w.clone()), samples=8, atol=atol)
        start = time.perf_counter()
        cert = gw.stationarity(f, (w, w.clone()), samples=8, atol=atol)
        times.append((time.perf_counter() - start) * 1e3)
        verdicts.append(f"{cert.stationary} (bound {cert.lower_bound:.3g})")
    return ["stationarity, 1,200 tied max outputs (atol 1e-6 / 100)", "", " / ".join(f"{t:.0f}" for t in times),
            " / ".join(verdicts)]


def main(repeats: int = 15, only: str | None = None) -> list[list[object]]:

    cases = {"6-layer ReLU MLP (256 wide, batch 128)": mlp_case,
             "conv + max-pool, integer images (batch 64)": conv_case,
             "conv + max-pool, blocky images: live ties": blocky_case,
             "ReLU MLP, loss through maximum(h, h.flip(0)): dead ties": mirror_case,
             "top-k / sort loss with tied integer scores: live ties": topk_case}
    rows = [ratio_row(name, *case(), repeats) for name, case in cases.items() if only is None or only in name]
    if only is None or "stationarity".startswith(only):
        rows.append(iou_row())
        rows.append(tied_layer_row())
    print_table("generalized_grad vs torch.autograd.grad (forward + backward)",
                ["case", "torch ms (cold ms)", "gradwise ms", "ratio / result"], rows)
    return rows


if __name__ == "__main__":
    print(f"allocator: {keep_freed_memory()}")
    if CPU_TIME:  # python benchmarks/bench_nonsmooth.py --cpu-time: CPU-time ratios, one torch thread
        torch.set_num_threads(1)
        print("CPU time (time.process_time), one torch thread")
    main(only=sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv[:-1] else None)
