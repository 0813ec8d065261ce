"""Hunt (session 27) over gradwise where users train: Lightning, the Hugging Face Trainer, torch.distributed, the
CLI and long traced runs. Each test here failed before its fix."""

from __future__ import annotations

import pytest

import gradwise as gw
from gradwise._distributed import rank_story


def _finding(kind: str, rank: int, where: str, born_op: str) -> gw.Finding:
    return gw.Finding(kind, born_op if born_op != "backward" else "backward", where, 1, born_op=born_op,
                      born_location=where, rank=rank)


# gw.watch() under FSDP2 cannot replay the first NaN step: each rank's finding is born at the backward call
# (tests/test_hunt_dist.py runs it; the findings below are what it gave for a NaN on rank 1 only). The ranks
# line said "rank 0 introduced the NaN at train.py:39; rank 1 introduced the NaN at train.py:39": rank 0 had
# only received rank 1's NaN through the reduce-scatter.
UNEXPLAINED = [
    ([_finding("nan", 0, "train.py:39", "backward"), _finding("nan", 1, "train.py:39", "backward")],
     ["ranks 0,1 had NaN/Inf gradients in a step gw.watch() could not replay: which rank introduced them is not "
      "known"]),
    # the steps after it are traced in full: their origin is named, the unreplayed step still said to be unknown
    ([_finding("nan", 0, "train.py:39", "backward"), _finding("nan", 1, "train.py:39", "backward"),
      _finding("nan", 1, "data.py:9", "aten.copy_")],
     ["rank 1 introduced the NaN at data.py:9; ranks 0,1 had NaN/Inf gradients in a step gw.watch() could not "
      "replay: which rank introduced them is not known"]),
    ([_finding("inf", 1, "train.py:39", "backward"), _finding("nan", 0, "train.py:39", "c10d.allreduce_")],
     ["rank 0 received NaN/Inf through the all-reduce, but no traced rank saw it born: trace every rank "
      "(gw.trace() around the same steps); rank 1 had NaN/Inf gradients in a step gw.watch() could not replay: "
      "which rank introduced them is not known"]),
]


@pytest.mark.parametrize(("findings", "want"), UNEXPLAINED)
def test_a_step_the_watch_could_not_replay_names_no_rank_as_its_origin(findings, want):
    assert rank_story(findings) == want
