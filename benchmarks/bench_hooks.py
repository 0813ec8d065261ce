"""Cost of gradwise's ``Tensor.register_hook`` wrapper (``_strong_zeros._hooks``): a training step that hooks
tensors, against the same step with PyTorch's own ``register_hook`` and engine entry, same process, same data.

    python benchmarks/bench_hooks.py [--repeats 41] [--json FILE]
    python benchmarks/bench_hooks.py --cpu-time --threads 1   # on a machine shared with other jobs

Per workload, one step = forward, a hook on the tensors named below (the hook only notes its gradient's shape),
loss, backward, grads cleared. Candidates, interleaved (``_harness.times``, in two groups: torch
and imported, then torch and the blocks), ratios the median over repeats of the
ratio within a repeat (``_harness.paired_ratios``) to ``torch``:

- ``torch``: PyTorch's own ``Tensor.register_hook`` and ``torch.autograd._engine_run_backward`` put back for the
  step (what a process without gradwise runs);
- ``imported``: gradwise imported, no block (goal <= 1.02);
- ``imported, torch's register_hook``: the same with PyTorch's own ``register_hook``: what gradwise's engine entry
  (``_engine._engine_entry``, ``_observe``) costs alone;
- ``block, unhooked``: the step without its hooks, inside ``gw.strong_zeros()`` (what the block costs anyway);
- ``block, hooked``: the step inside ``gw.strong_zeros()``;
- ``block, hooked, zeros reach``: as above with a loss that slices rows away, so that structural zeros reach the
  hooked tensors (the pass must run under the mode there).

Workloads: a 4-layer 64-wide MLP hooking every activation (batch 32), and a 2-layer ``TransformerEncoder``
(d 128, 4 heads, batch 8 x 64) whose output is hooked.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gradwise as gw
from _harness import keep_freed_memory, medians, paired_ratios, print_table, times
from gradwise._strong_zeros import _engine, _hooks

IMPORTED_GOAL = 1.02


def _note(g: torch.Tensor) -> None:
    _note.shapes = g.shape  # type: ignore[attr-defined]


def _mlp_case() -> tuple[nn.Module, Callable[..., torch.Tensor]]:
    torch.manual_seed(0)
    layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(4))
    x = torch.randn(32, 64)

    def loss(net: nn.Module, hooked: bool, sliced: bool, register: Callable) -> torch.Tensor:
        h = x
        for lin in net:
            h = torch.tanh(lin(h))
            if hooked:
                register(h, _note)
        return (h[:24] if sliced else h).sum()

    return layers, loss


def _encoder_case() -> tuple[nn.Module, Callable[..., torch.Tensor]]:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(128, 4, dim_feedforward=256, dropout=0.0, batch_first=True)
    net = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    x = torch.randn(8, 64, 128)

    def loss(net: nn.Module, hooked: bool, sliced: bool, register: Callable) -> torch.Tensor:
        out = net(x)
        if hooked:
            register(out, _note)
        return (out[:, :48] if sliced else out).sum()

    return net, loss


CASES = {"mlp 4x64, hook per activation": _mlp_case, "encoder 2x128, hooked output": _encoder_case}


class _TorchOwn:
    """PyTorch's own engine entry for the length of a step (the candidate 'torch'; a module attribute: setting
    ``torch.Tensor.register_hook`` per step would empty the type's method cache, so the step calls torch's own
    ``register_hook`` function instead of the attribute)."""

    def __enter__(self) -> None:
        self.saved = torch.autograd._engine_run_backward
        torch.autograd._engine_run_backward = _engine._torch_engine_run

    def __exit__(self, *exc: object) -> None:
        torch.autograd._engine_run_backward = self.saved


def _step(net: nn.Module, loss: Callable, hooked: bool = True, sliced: bool = False, block: bool = False,
          own: bool = False, own_register: bool = False) -> Callable[[], None]:
    # (gradwise's register_hook since its import)
    register = _hooks._ORIGINAL if own or own_register else torch.Tensor.register_hook

    def run() -> None:
        if own:
            with _TorchOwn():
                loss(net, hooked, sliced, register).backward()
        elif block:
            with gw.strong_zeros():
                loss(net, hooked, sliced, register).backward()
        else:
            loss(net, hooked, sliced, register).backward()
        net.zero_grad(set_to_none=True)
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--cpu-time", action="store_true", help="time process CPU time (use with --threads 1)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    print(keep_freed_memory())
    with gw.strong_zeros():  # (the engine hook is put in place on the first block, for the process: as in training)
        pass
    rows, out = [], []
    for name, make in CASES.items():
        net, loss = make()
        # two interleaved groups: the cost outside any block alone, then the blocks' (a block's step in the same
        # rotation moved the 'imported' ratio of the MLP below 1: its garbage and caches land on its neighbours)
        outside = times({"torch": _step(net, loss, own=True), "imported": _step(net, loss),
                         "imported, torch's register_hook": _step(net, loss, own_register=True)},
                        args.repeats, warmup=5, clock=clock)
        inside = times({"torch": _step(net, loss, own=True),
                        "block, unhooked": _step(net, loss, hooked=False, block=True),
                        "block, hooked": _step(net, loss, block=True),
                        "block, hooked, zeros reach": _step(net, loss, sliced=True, block=True)},
                       args.repeats, warmup=5, clock=clock)
        med = medians(outside)
        ratio = {**paired_ratios(inside, "torch"), **paired_ratios(outside, "torch")}
        rows.append([name, med["torch"] * 1e3, ratio["imported"], ratio["imported, torch's register_hook"],
                     ratio["block, unhooked"], ratio["block, hooked"],
                     ratio["block, hooked, zeros reach"], "yes" if ratio["imported"] <= IMPORTED_GOAL else "NO"])
        out.append({"workload": name, "torch_ms": med["torch"] * 1e3, **{f"{k} x": v for k, v in ratio.items()}})
    print_table("register_hook per step (ratios to torch's own, paired medians)",
                ["workload", "torch ms", "imported x", "its engine entry alone x", "block unhooked x",
                 "block hooked x", "zeros reach x", "imported <= 1.02"], rows)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
