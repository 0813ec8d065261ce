"""Cost of strong zeros under torch.compile: a compiled training step with and without ``gw.strong_zeros()``.

    python benchmarks/bench_compile.py [--repeats 21] [--backend inductor] [--json FILE] [--device cuda]

Each case compiles its loss function once (``torch.compile``, default options) and times one training step:
the compiled forward, ``loss.backward()`` and ``zero_grad``, plain against the same step inside
``gw.strong_zeros()``, the two interleaved in one process (``_harness.median_times``), median of the repeats.
The strong-zero variant of each compiled backward is built once, in the warm-up.

Finite data: target <= 1.05x. NaN padding rows (or a NaN border) that the loss slices (crops) away: target
<= 1.5x, and the gradients must be finite and equal (rtol 1e-5) to the plain compiled step on the same data
with the padding replaced by finite values; the "grads" column says whether they are and "path" how the
backward ran: "pass" (the compiled variant alone) or "op by op" (re-run under the eager mode).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._functorch.config
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gradwise as gw
from _harness import keep_freed_memory, median_times, print_table
from gradwise._strong_zeros import _compile

nan = float("nan")


@dataclass
class Case:
    name: str
    net: nn.Module
    loss: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    data: torch.Tensor
    target: float
    clean: torch.Tensor | None = None  # the same data with finite padding, when ``data`` holds NaN


def mlp() -> nn.Module:
    return nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(256, 256), nn.GELU())])


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))


def cases() -> list[Case]:
    torch.manual_seed(0)
    x = torch.randn(256, 256)
    padded, filled = torch.cat((x, torch.full((64, 256), nan))), torch.cat((x, torch.full((64, 256), 0.5)))
    layer = nn.TransformerEncoderLayer(128, 8, dim_feedforward=512, dropout=0.0, batch_first=True)
    seq = torch.randn(8, 64, 128)
    seq_padded, seq_filled = torch.cat((seq, torch.full((2, 64, 128), nan))), torch.cat((seq, seq[:2]))
    img = torch.randn(32, 3, 32, 32)
    framed, clean_frame = F.pad(img, (2, 2, 2, 2), value=nan), F.pad(img, (2, 2, 2, 2), value=0.25)
    rows = lambda net, t: net(t)[:256].square().mean()
    batch = lambda net, t: net(t)[:8].square().mean()
    crop = lambda net, t: net(t)[..., 5:31, 5:31].square().mean()
    whole = lambda net, t: net(t).square().mean()
    return [
        Case("MLP 6x256+GELU b256", mlp(), whole, x, 1.05),
        Case("Transformer d128 h8 8x64", layer, whole, seq, 1.05),
        Case("CNN 3 conv 32x32 b32", cnn(), whole, img, 1.05),
        Case("MLP, 64 NaN rows sliced", mlp(), rows, padded, 1.5, filled),
        Case("Transformer, 2 NaN sequences sliced", layer, batch, seq_padded, 1.5, seq_filled),
        Case("CNN, NaN border cropped", cnn(), crop, framed, 1.5, clean_frame),
    ]


def step(net: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], data: torch.Tensor, strong: bool) -> None:
    if strong:
        with gw.strong_zeros():
            fn(data).backward()
    else:
        fn(data).backward()
    net.zero_grad(set_to_none=True)


def grads(net: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], data: torch.Tensor, strong: bool) -> list:
    net.zero_grad(set_to_none=True)
    if strong:
        with gw.strong_zeros():
            fn(data).backward()
    else:
        fn(data).backward()
    return [p.grad.clone() for p in net.parameters()]


def check(case: Case, fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[str, str]:
    before = dict(_compile.STATS)
    got = grads(case.net, fn, case.data, True)
    path = "op by op" if _compile.STATS["eager"] > before["eager"] else "pass"
    if case.clean is None:  # finite data: bit for bit the plain compiled step's gradients
        want = grads(case.net, fn, case.data, False)
        return ("ok" if all(torch.equal(g, w) for g, w in zip(got, want, strict=True)) else "NOT EQUAL"), path
    if not all(g.isfinite().all() for g in got):
        return "NOT FINITE", path
    want = grads(case.net, fn, case.clean, False)
    try:
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    except AssertionError:
        return "WRONG", path
    return "ok", path


def measure(case: Case, backend: str, repeats: int, cpu_time: bool = False) -> dict[str, object]:
    fn = torch.compile(lambda t: case.loss(case.net, t), backend=backend)
    verdict, path = check(case, fn)  # compiles the forward, PyTorch's backward and the strong-zero variant
    times = median_times({"plain": lambda: step(case.net, fn, case.data, False),
                          "strong": lambda: step(case.net, fn, case.data, True)}, repeats=repeats,
                         clock=time.process_time if cpu_time else time.perf_counter)
    ratio = times["strong"] / times["plain"]
    return {"case": case.name, "plain_ms": times["plain"] * 1e3, "strong_ms": times["strong"] * 1e3,
            "ratio": ratio, "target": case.target, "grads": verdict, "path": path,
            "met": ratio <= case.target and verdict == "ok"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--cpu-time", action="store_true", help="time in process CPU time, not wall time")
    parser.add_argument("--autograd-cache", action="store_true", help="keep AOTAutograd's on-disk cache on")
    parser.add_argument("--device", default="cpu", help="where the models and data live (e.g. cuda)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # a backward AOTAutograd loads from its on-disk cache (a second run of this script) has no graph metadata to
    # compile a strong-zero version from, and takes the op-by-op path (docs/compile.md): measure the fast path
    torch._functorch.config.enable_autograd_cache = args.autograd_cache
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.jit's, on inductor's first import
    memory = keep_freed_memory()
    with torch.device(args.device):
        workloads = [c for c in cases() if args.only in c.name]
    rows = [measure(c, args.backend, args.repeats, args.cpu_time) for c in workloads]
    clock = "CPU time" if args.cpu_time else "wall time"
    print_table(f"compiled step ({args.backend}, {args.device}), strong zeros / plain, {clock}, median of "
                f"{args.repeats} interleaved; "
                f"{torch.get_num_threads()} threads; {memory}",
                ["case", "plain ms", "strong ms", "ratio", "target", "grads", "path", "met"],
                [[r["case"], r["plain_ms"], r["strong_ms"], r["ratio"], r["target"], r["grads"], r["path"],
                  str(r["met"])] for r in rows])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if all(r["grads"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
