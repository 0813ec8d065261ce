"""Cost of strong zeros: `gw.backward(loss)` and `loss.backward()` inside `gw.strong_zeros()` ("block x") against
plain `loss.backward()`, same process, same data.

    python benchmarks/bench_strong_zeros.py [--repeats 31] [--json FILE] [--device cuda]
    python benchmarks/bench_strong_zeros.py --cpu-time --threads 1   # on a machine shared with other jobs

Times the backward pass alone: every repeat runs a fresh forward (untimed), then the timed backward, the
candidates interleaved (`_harness.times_after`). The ms columns are each candidate's median; the ratios ("time x",
"block x") the median over repeats of the ratio within a repeat (`_harness.paired_ratios`: drift between repeats
cancels; the JSON also holds the ratio of the medians). Memory is the peak of the CPU allocations held during
the backward, over what was live just before it (the parameters and the forward's activations; the input
batch is not counted; `_harness.peak_memory_bytes`); on a CUDA device, the caching allocator's peak of
allocated bytes during the backward over those allocated just before it.

Finite data: targets <= 1.05x time (issue #15; goal 1.02x) and <= 1.25x peak memory. NaN only in discarded
regions (padding rows sliced away, a border cropped away, padding sequences of a batch): target <= 2x the plain
backward of the same program (goal 1.5x), and gradwise's
gradients must be finite and equal to the clean reference's (the same program without the NaN); the
"grads" column says whether they are. Exits 1 when a gradient check fails.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gradwise as gw
from _harness import keep_freed_memory, medians, paired_ratios, peak_memory_bytes, print_table, times_after

nan = float("nan")
FINITE, DISCARDED = 1.05, 2.0  # time targets (issue #15)


@dataclass
class Case:
    name: str
    net: nn.Module
    loss: Callable[[nn.Module], torch.Tensor]  # the program gradwise and torch both differentiate
    time_target: float
    clean: Callable[[nn.Module], torch.Tensor] | None = None  # same program without the NaN, when it has NaN


def mlp() -> nn.Module:
    return nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(256, 256), nn.GELU())])


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))


class SdpaBlock(nn.Module):
    """A Llama-style decoder block: RMS norm, causal grouped-query SDPA (CPU flash attention), SiLU MLP."""

    def __init__(self, d: int = 128, heads: int = 4, kv_heads: int = 2):
        super().__init__()
        self.heads, self.kv_heads, self.dh = heads, kv_heads, d // heads
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv = nn.Linear(d, (heads + 2 * kv_heads) * self.dh, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.up, self.down = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split([self.heads * self.dh, *[self.kv_heads * self.dh] * 2], -1)
        q, k, v = (z.view(b, t, -1, self.dh).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.silu(self.up(self.norm2(x))))


def cases() -> list[Case]:
    torch.manual_seed(0)
    x = torch.randn(256, 256)
    padded = torch.cat((x, torch.full((64, 256), nan)))  # 64 NaN padding rows, sliced away after the net
    layer = nn.TransformerEncoderLayer(128, 4, dim_feedforward=512, dropout=0.0, batch_first=True)
    seq = torch.randn(8, 64, 128)
    img = torch.randn(32, 3, 32, 32)
    # a NaN border of width 2 around 32x32; three 3x3 convolutions read 3 pixels around, so outputs 5..30
    # of the 36x36 map never see it
    framed = F.pad(img, (2, 2, 2, 2), value=nan)
    clean_frame = F.pad(img, (2, 2, 2, 2), value=0.25)
    kept = lambda out: out[..., 5:31, 5:31]
    block = SdpaBlock()
    tokens = torch.randn(8, 64, 128)
    # two all-NaN padding sequences fill the batch to 10; the loss reads the 8 real ones
    padded_tokens = torch.cat((tokens, torch.full((2, 64, 128), nan)))
    return [
        Case("MLP 6x256+GELU b256", mlp(), lambda net: net(x).square().mean(), FINITE),
        Case("Transformer d128 h4 8x64", layer, lambda net: net(seq).square().mean(), FINITE),
        Case("CNN 3 conv 32x32 b32", cnn(), lambda net: net(img).square().mean(), FINITE),
        Case("MLP, NaN rows sliced", mlp(), lambda net: net(padded)[:256].square().mean(), DISCARDED,
             clean=lambda net: net(x).square().mean()),
        Case("CNN, NaN border cropped", cnn(), lambda net: kept(net(framed)).square().mean(), DISCARDED,
             clean=lambda net: kept(net(clean_frame)).square().mean()),
        Case("SDPA block causal GQA 8x64", block, lambda net: net(tokens).square().mean(), FINITE),
        Case("SDPA block, NaN sequences sliced", block, lambda net: net(padded_tokens)[:8].square().mean(), DISCARDED,
             clean=lambda net: net(tokens).square().mean()),
    ]


def gradients(net: nn.Module, loss: torch.Tensor, backward: Callable[[torch.Tensor], None]) -> list:
    net.zero_grad(set_to_none=True)
    backward(loss)
    return [p.grad.clone() for p in net.parameters()]


def check_gradients(case: Case) -> str:
    # cuDNN's fastest convolution backwards add with atomics: two plain runs differ in the last bits
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        return _check_gradients(case)


def _check_gradients(case: Case) -> str:
    got = gradients(case.net, case.loss(case.net), gw.backward)
    if not all(g.isfinite().all() for g in got):
        unruled = sorted(gw.unruled_ops())
        return "NOT FINITE" + (f" (unruled: {', '.join(unruled)})" if unruled else "")
    if case.clean is None:  # finite data: gradwise's gradients are torch's, bit for bit
        expected = gradients(case.net, case.loss(case.net), torch.Tensor.backward)
        return "ok" if all(torch.equal(g, e) for g, e in zip(got, expected, strict=True)) else "NOT EQUAL"
    expected = gradients(case.net, case.clean(case.net), torch.Tensor.backward)
    try:
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
    except AssertionError:
        return "WRONG"
    return "ok"


def backward_peak(case: Case, backward: Callable[[torch.Tensor], None]) -> tuple[int, int]:
    if next(case.net.parameters()).is_cuda:
        net = copy.deepcopy(case.net)
        loss = case.loss(net)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        backward(loss)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), before

    def run():
        net = copy.deepcopy(case.net)  # allocated under the profiler, so whatever backward frees is counted
        net.zero_grad(set_to_none=True)
        loss = case.loss(net)
        with torch.profiler.record_function("backward"):
            backward(loss)

    return peak_memory_bytes(run, region="backward")


def _block_backward(loss: torch.Tensor) -> None:
    """The other way in: ``loss.backward()`` inside ``gw.strong_zeros()`` (a block per backward: the strictest
    reading; a block held around a training loop enters once)."""
    with gw.strong_zeros():
        loss.backward()


def measure(case: Case, repeats: int, cpu_time: bool = False) -> dict[str, object]:
    def fresh_loss() -> torch.Tensor:
        case.net.zero_grad(set_to_none=True)
        return case.loss(case.net)

    candidates = {"torch": (fresh_loss, torch.Tensor.backward), "gradwise": (fresh_loss, gw.backward),
                  "block": (fresh_loss, _block_backward)}
    samples = times_after(candidates, repeats=repeats, clock=time.process_time if cpu_time else time.perf_counter)
    times, ratios = medians(samples), paired_ratios(samples, "torch")
    plain_peak, before = backward_peak(case, torch.Tensor.backward)
    gw_peak, gw_before = backward_peak(case, gw.backward)
    assert gw_before == before, "the two forwards should hold the same memory"
    time_ratio, memory_ratio = ratios["gradwise"], gw_peak / plain_peak
    block_ratio = ratios["block"]
    memory_target = 1.25 if case.clean is None else None
    met = max(time_ratio, block_ratio) <= case.time_target and (memory_target is None or memory_ratio <= memory_target)
    return {
        "case": case.name,
        "data": "finite" if case.clean is None else "NaN discarded",
        "torch_backward_ms": times["torch"] * 1e3,
        "gradwise_backward_ms": times["gradwise"] * 1e3,
        "time_ratio": time_ratio,
        "block_time_ratio": block_ratio,
        "time_ratio_of_medians": times["gradwise"] / times["torch"],
        "block_time_ratio_of_medians": times["block"] / times["torch"],
        "time_target": case.time_target,
        "live_before_backward_mb": before / 2**20,
        "torch_peak_over_live": plain_peak / before,
        "gradwise_peak_over_live": gw_peak / before,
        "memory_ratio": memory_ratio,
        "memory_target": memory_target,
        "gradients": check_gradients(case),
        "targets_met": met,
        "samples_ms": {name: [t * 1e3 for t in ts] for name, ts in samples.items()},  # per repeat, in run order
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    parser.add_argument("--only", default="", help="run the cases whose name contains this text")
    parser.add_argument("--device", default="cpu", help="where the models and data live (e.g. cuda)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--cpu-time", action="store_true", help="time in process CPU time (with --threads 1 on a "
                        "machine shared with other jobs, where wall time mostly measures them)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with torch.device(args.device):
        workloads = [case for case in cases() if args.only in case.name]
    rows = [measure(case, args.repeats, args.cpu_time) for case in workloads]
    print_table(
        f"gw.backward and a strong_zeros() block vs loss.backward: backward only, {args.device}, medians of "
        f"{args.repeats} interleaved repeats (ratios: of the ratios within a repeat), "
        f"{'CPU' if args.cpu_time else 'wall'} time, {torch.get_num_threads()} threads; peaks during "
        "backward / memory live before it",
        ["case", "torch ms", "gw ms", "time x", "block x", "target", "live MB", "torch peak", "gw peak", "memory x",
         "grads", "met"],
        [[r["case"], r["torch_backward_ms"], r["gradwise_backward_ms"], r["time_ratio"], r["block_time_ratio"],
          r["time_target"],
          r["live_before_backward_mb"], r["torch_peak_over_live"], r["gradwise_peak_over_live"],
          r["memory_ratio"], r["gradients"], "yes" if r["targets_met"] else "NO"] for r in rows],
    )
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "device": args.device, "cpu_time": args.cpu_time,
                                         "threads": torch.get_num_threads(), "repeats": args.repeats, "rows": rows},
                                        indent=2))
    return 0 if all(r["gradients"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    print(f"allocator: {keep_freed_memory()}")
    sys.exit(main())
