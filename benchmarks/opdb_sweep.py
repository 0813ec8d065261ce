"""Full op_db sweep for strong zeros: no-regression and contamination counts, printed as tables.

    python benchmarks/opdb_sweep.py                  # every sample of every op (several minutes on 2 cores)
    python benchmarks/opdb_sweep.py --ci             # the subset tests/test_opdb.py runs in CI
    python benchmarks/opdb_sweep.py --fill inf --ops norm --limit 4 --forced

No-regression: on finite samples (float32, float64, complex128) gw.grad equals torch.autograd.grad on the same graph.
Contamination: a NaN (or Inf) block padded onto an input and discarded from the output (sliced away, or
zeroed by ``where``) must leave gw.grad equal to the gradient of the op on the unpadded sample. The machinery
is ``tests/_opdb.py``; ``--ci`` also prints the KNOWN_CONTAMINATED set that tests/test_opdb.py expects.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _opdb
import gradwise as gw
from _harness import print_table
from gradwise._strong_zeros import _engine


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ci", action="store_true", help="the CI subset of tests/test_opdb.py")
    p.add_argument("--limit", type=int, default=None, help="samples per op and dtype (default: all)")
    p.add_argument("--ops", default="", help="only ops whose name contains this")
    p.add_argument("--fill", choices=["nan", "inf"], default="nan")
    p.add_argument("--how", choices=["slice", "where", "both"], default="both")
    p.add_argument("--forced", action="store_true", help="force the strong-zero pass on finite data too")
    p.add_argument("-v", action="store_true", help="name each op on stderr before running it")
    args = p.parse_args()
    torch.set_num_threads(1)  # tiny tensors: intra-op threads only wait on each other

    ops = [op for op in _opdb.op_db() if args.ops in _opdb.op_id(op)]
    fill = math.nan if args.fill == "nan" else math.inf
    hows = ["slice", "where"] if args.how == "both" else [args.how]
    if args.ci:
        from test_opdb import LIMIT, NR_SAMPLES, TRIED
        nr_limit, c_kw = NR_SAMPLES, {"limit": LIMIT, "tried": TRIED}
    else:
        nr_limit = args.limit
        c_kw = {"limit": args.limit, "first_only": False, "dtypes": _opdb.DTYPES}

    op_skips, sample_skips, failures = Counter(), Counter(), {}
    c_skips = Counter()
    outcomes = {how: {} for how in hows}
    samples_run = {"no regression": 0, **{how: 0 for how in hows}}
    t0 = time.perf_counter()
    forced = mock.patch.object(_engine, "_plan", lambda *a, **k: "strong") if args.forced else None
    for op in ops:
        name = _opdb.op_id(op)
        if args.v:
            print(name, file=sys.stderr, flush=True)
        reason = _opdb.op_skip_reason(op)
        if reason:
            op_skips[reason] += 1
            continue
        if forced:
            forced.start()
        r = _opdb.check_no_regression(op, gw.grad, nr_limit)
        if forced:
            forced.stop()
        samples_run["no regression"] += r.run
        sample_skips.update(r.skips)
        if r.failures:
            failures[name] = r.failures[0]
        first = None
        for how in hows:
            if args.ci and how == "where" and first is not None:
                c = _opdb.check_contamination(op, gw.grad, how=how, fill=fill, only=first.tried)
            else:
                c = _opdb.check_contamination(op, gw.grad, how=how, fill=fill, **c_kw)
            first = first or c
            samples_run[how] += c.run
            if how == hows[0]:
                c_skips.update(c.skips)
            in_torch = any(not x.torch_clean for res in c.results for x in res)
            outcomes[how][name] = (c.outcome(), in_torch, c.failures[0] if c.failures else "")
    seconds = time.perf_counter() - t0

    n_diff = len(ops) - sum(op_skips.values())
    print_table("op_db sweep: counts", ["what", "count"], [
        ["ops in op_db (filtered)", len(ops)],
        ["differentiable ops with a float32/64 or complex128 backward", n_diff],
        ["no-regression samples run (float32, float64, complex128)", samples_run["no regression"]],
        ["no-regression ops failing", len(failures)],
        *[[f"contamination samples run ({how})", samples_run[how]] for how in hows],
        ["seconds", round(seconds, 1)],
    ])
    print_table("skip reasons", ["check", "reason", "count"],
                [["op", k, v] for k, v in op_skips.most_common()]
                + [["no-regression sample", k, v] for k, v in sample_skips.most_common()]
                + [[f"contamination sample ({hows[0]})", k, v] for k, v in c_skips.most_common()])
    rows = []
    for how in hows:
        o = outcomes[how]
        tried = [n for n, (v, _, _) in o.items() if v != "untried"]
        rows.append([how, len(tried), sum(o[n][1] for n in tried),
                     sum(v == "removed" for v, _, _ in o.values()),
                     sum(v == "clean in torch" for v, _, _ in o.values()),
                     sum(v == "contaminated" for v, _, _ in o.values()),
                     sum(v == "untried" for v, _, _ in o.values())])
    print_table(f"contamination ({args.fill} padding)",
                ["discard", "ops tried", "contaminated in torch", "removed by gradwise", "clean in torch too",
                 "still contaminated", "no discardable padding"], rows)
    still = sorted({n for o in outcomes.values() for n, (v, _, _) in o.items() if v == "contaminated"})
    print_table("still contaminated", ["op", "first failure"],
                [[n, next(o[n][2] for o in outcomes.values() if o[n][0] == "contaminated")] for n in still])
    if failures:
        print_table("no-regression failures", ["op", "first failure"], [[k, v] for k, v in failures.items()])
    if args.ci:
        print("KNOWN_CONTAMINATED =", "{" + ", ".join(repr(n) for n in still) + "}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
