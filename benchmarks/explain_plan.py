"""Why `gw.backward` takes the path it takes on a strong-zeros workload: the plan, the node types of the graph,
and the saved tensors the plan would read that hold NaN/Inf.

    python benchmarks/explain_plan.py [--only "SDPA block causal"] [--device cuda]
"""
from __future__ import annotations

import argparse
from collections import Counter

import torch

import bench_strong_zeros
from gradwise._strong_zeros._autograd_graph import _root_nodes, _walk
from gradwise._strong_zeros._node_facts import MAKES_NO_ZEROS, NODE_FACTS
from gradwise._strong_zeros._planning import _plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="SDPA block causal")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with torch.device(args.device):
        cases = [c for c in bench_strong_zeros.cases() if args.only in c.name]
    for case in cases:
        loss = case.loss(case.net)
        print(f"{case.name} ({args.device}): plan {_plan([loss], ())}")
        names = Counter(type(n).__name__ for n in _walk(_root_nodes([loss])))
        unknown = sorted(n for n in names if n not in NODE_FACTS)
        zeros = sorted(n for n in names if n not in MAKES_NO_ZEROS)
        print(f"  nodes: {dict(names)}\n  unknown to NODE_FACTS: {unknown}\n  may make zeros: {zeros}")
        for node in _walk(_root_nodes([loss])):
            for attr in dir(node):
                if attr.startswith("_saved_"):
                    t = getattr(node, attr, None)
                    if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(t.isfinite().all()):
                        print(f"  non-finite saved: {type(node).__name__}.{attr} {tuple(t.shape)}")


if __name__ == "__main__":
    main()
