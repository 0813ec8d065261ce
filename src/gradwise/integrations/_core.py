"""What the Lightning and Hugging Face callbacks share: options, strong zeros around the backward, the
once-per-step NaN/Inf check with one decision on every rank, and the explanation of a NaN/Inf step.

A framework callback calls, in order, per optimizer step: ``begin_step`` (before the forward of the first
micro-batch), ``begin_backward`` / ``end_backward`` around each backward (or nothing, if the framework has no
hook there: then ``begin_step`` enters strong zeros too), and ``before_optimizer_step`` once every backward of
the step is done. ``close`` leaves whatever is still open (end of training, or an exception).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

import gradwise as gw
from gradwise._distributed import NonfiniteGradientError
from gradwise._strong_zeros._contract import in_process_group

EXPLAIN = ("first", "every", None)
ON_NONFINITE = ("skip", "raise", "warn")


def check_options(strong_zeros: object, explain: object, on_nonfinite: object) -> None:
    """Refuse an option out of range, naming the accepted values."""
    if not isinstance(strong_zeros, bool):
        raise TypeError(f"GradwiseCallback(strong_zeros=...): expected True or False, got {strong_zeros!r}")
    if explain not in EXPLAIN:
        raise ValueError(f"GradwiseCallback(explain=...): expected 'first', 'every' or None, got {explain!r}")
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"GradwiseCallback(on_nonfinite=...): expected 'skip', 'raise' or 'warn', got "
                         f"{on_nonfinite!r}")


def _local(g: torch.Tensor) -> torch.Tensor:
    """The values of a gradient to check: a DTensor's (FSDP2) local shard (the flags are all-reduced anyway); a
    sparse gradient's (``nn.Embedding(sparse=True)``) stored values, summed per index as the optimizer adds them
    (isfinite has no sparse kernel: the check raised NotImplementedError at every step)."""
    g = g.to_local() if hasattr(g, "to_local") else g
    if g.layout == torch.sparse_coo:
        return g.coalesce().values()
    return g.values() if g.layout != torch.strided else g


def optimizer_parameters(named: Iterable[tuple[str, torch.Tensor]], optimizer: Any) -> list[tuple[str, torch.Tensor]]:
    """The (name, parameter) pairs of the parameters ``optimizer`` steps, named from the module's ``named``.
    A step is checked (and skipped) on its own optimizer's gradients: with two optimizers (manual optimization,
    a GAN) a NaN in the first one's gradients must not drop the second one's finite step, nor be blamed on it."""
    named = list(named)
    if optimizer is None:
        return named
    mine = {id(p): p for group in optimizer.param_groups for p in group["params"]}
    known = [(n, p) for n, p in named if id(p) in mine]  # in the module's order (the optimizer's groups split it)
    seen = {id(p) for _, p in known}
    return known + [(f"optimizer parameter {i}", p) for i, p in enumerate(mine.values()) if id(p) not in seen]


class SessionResults:
    """What a callback reports after training, read from its ``_session`` (both frameworks' callbacks)."""

    _session: Session

    @property
    def nonfinite_steps(self) -> list[int]:
        return self._session.nonfinite_steps

    @property
    def skipped_steps(self) -> list[int]:
        return self._session.skipped_steps

    @property
    def reports(self) -> list[Any]:
        return self._session.reports


class Session:
    """The per-training state of one callback (framework-independent)."""

    def __init__(self, strong_zeros: bool, explain: str | None, on_nonfinite: str, logger: logging.Logger):
        check_options(strong_zeros, explain, on_nonfinite)
        self.strong_zeros, self.explain, self.on_nonfinite, self.logger = strong_zeros, explain, on_nonfinite, logger
        self._trace = contextlib.ExitStack()
        self._sz = contextlib.ExitStack()
        self._remembering = contextlib.ExitStack()
        self._report: gw.Report | None = None
        self._in_strong_zeros = False
        self._explained = False
        # parameters whose gradients a skip set to None since the last backward: another optimizer stepping
        # them too (a shared parameter) must skip as well, not step on the rest of its gradients
        self._skipped: set[int] = set()
        self.nonfinite_steps: list[int] = []  # optimizer steps (0-based) whose gradients held NaN/Inf
        self.skipped_steps: list[int] = []
        self.reports: list[Path] = []  # JSON files written (on rank 0)

    # -- the step's brackets -------------------------------------------------------------------------------

    def begin_step(self, strong_zeros_now: bool = False, batch: Any = None, batch_index: int | None = None) -> None:
        """Before the first forward of an optimizer step: start tracing if an explanation may be needed, and
        (``strong_zeros_now``) enter strong zeros for the whole step when the framework has no backward hook.
        ``batch`` (fetched before the trace started) is tagged with ``batch_index``: a NaN it brings is reported
        as arriving in that DataLoader batch."""
        self._skipped.clear()
        wanted = self.explain == "every" or (self.explain == "first" and not self._explained)
        if wanted and self._report is None:
            self._report = self._trace.enter_context(gw.trace())
        if self._report is not None:
            from gradwise._trace._session import tag_batch, tag_recent_batches

            tag_recent_batches()
            if batch is not None and batch_index is not None:
                tag_batch(batch, batch_index)
        if strong_zeros_now:
            self.begin_backward()

    def remember_batches(self) -> None:
        """For a framework whose step hook sees no batch (Hugging Face's on_step_begin): until ``close``, keep the
        batches DataLoaders yield while no trace is open, so that ``begin_step`` tags them (when it may explain)."""
        if self.explain is not None:
            from gradwise._trace._session import remember_batches

            self._remembering.enter_context(remember_batches())

    def begin_backward(self) -> None:
        self._skipped.clear()  # this backward writes the gradients afresh
        if self.strong_zeros and not self._in_strong_zeros:
            self._sz.enter_context(gw.strong_zeros())
            self._in_strong_zeros = True

    def end_backward(self) -> None:
        self._sz.close()
        self._in_strong_zeros = False

    def close(self) -> None:
        """Leave strong zeros and the trace (end of training, or an exception in between)."""
        self.end_backward()
        self._trace.close()
        self._remembering.close()
        self._report = None

    # -- the decision --------------------------------------------------------------------------------------

    def before_optimizer_step(self, step: int, named_parameters: Iterable[tuple[str, torch.Tensor]],
                              out_dir: str | os.PathLike | None) -> bool:
        """After every backward of optimizer step ``step``: one NaN/Inf check of the gradients (one host read;
        under torch.distributed one all-reduce of the flag, so every rank decides alike), then the policy.
        Returns True when the step must be skipped; the caller does nothing else: on "skip" the gradients are
        set to None here, so the optimizer leaves every parameter and its state (momentum, step count) as
        they were."""
        self.end_backward()
        report, self._report = self._report, None
        self._trace.close()  # fills the report
        everything = list(named_parameters)
        named = [(n, p) for n, p in everything if p.grad is not None]
        # a rank without gradients still joins the all-reduce below (a rank missing from it would hang the rest)
        flags = torch.stack([~torch.isfinite(_local(p.grad)).all() for _, p in named]) if named \
            else torch.zeros(1, dtype=torch.bool, device=everything[0][1].device if everything else None)
        bad_any = flags.any().float()
        skipped = [n for n, p in everything if p.grad is None and id(p) in self._skipped]
        if skipped:  # NaN/Inf in this step, cleared by an earlier optimizer's skip
            bad_any.fill_(1.0)
        if in_process_group():
            torch.distributed.all_reduce(bad_any, op=torch.distributed.ReduceOp.MAX)
        if not bool(bad_any):  # the one host read of a finite step
            return False
        self.nonfinite_steps.append(step)
        local = [n for (n, _), f in zip(named, flags.tolist(), strict=False) if f] + skipped
        bad = self._everywhere(local)
        where = "; ".join(f"rank {r}: {', '.join(names)}" for r, names in bad) or "no local gradient"
        message = f"gradwise: NaN/Inf gradients at optimizer step {step} ({where})"
        if report is not None:
            self._explain(report, step, out_dir)
        if self.on_nonfinite == "raise":
            raise NonfiniteGradientError(message + ". Every rank raises this error.", bad)
        if self.on_nonfinite == "warn":
            self._log(message + "; the optimizer step is taken (on_nonfinite='warn')")
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            return False
        for _, p in named:
            p.grad = None
            self._skipped.add(id(p))
        self.skipped_steps.append(step)
        self._log(message + "; the optimizer step is skipped on every rank")
        return True

    def _everywhere(self, local: list[str]) -> list[tuple[int, list[str]]]:
        """(rank, names) of every rank with NaN/Inf gradients: the same list on every rank (only on NaN steps)."""
        if not in_process_group():
            return [(0, local)] if local else []
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, local)
        return [(r, names) for r, names in enumerate(gathered) if names]

    def _explain(self, report: gw.Report, step: int, out_dir: str | os.PathLike | None) -> None:
        """The trace of this step, merged over the ranks on rank 0: logged, and written as JSON in out_dir."""
        self._explained = True
        if in_process_group():
            merged = gw.gather_reports(report)  # every rank is here: the decision was the same everywhere
            if merged is None:
                return
            report = merged
        # each optimizer step has a trace of its own: a finding's step counts that step's backward passes
        report.notes.insert(0, f"optimizer step {step}: a finding's 'step' counts this optimizer step's backward "
                               "passes (gradient-accumulation micro-batches) from 0")
        path = Path(out_dir if out_dir is not None else ".") / f"gradwise-nonfinite-step{step}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report.to_json())
        self.reports.append(path)
        self._log(f"gradwise: why optimizer step {step} has NaN/Inf gradients (also in {path}):\n{report}")

    def _log(self, message: str) -> None:
        if not in_process_group() or torch.distributed.get_rank() == 0:
            self.logger.warning(message)
