"""``GradwiseCallback`` for Lightning (``lightning.pytorch.Trainer``): strong zeros, NaN/Inf steps skipped (or
raised, or warned about) on every rank together, and a report of why a step's gradients hold NaN/Inf.

Needs ``lightning`` (``pip install gradwise[lightning]``). Example::

    import lightning.pytorch as pl
    from gradwise.integrations.lightning import GradwiseCallback

    trainer = pl.Trainer(callbacks=[GradwiseCallback(explain="first")], ...)
    trainer.fit(module, loader)
"""

from __future__ import annotations

import logging
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - exercised only where lightning is absent
    raise ImportError("gradwise.integrations.lightning needs Lightning: pip install 'gradwise[lightning]' "
                      "(or pip install lightning)") from e

from gradwise.integrations._core import Session, SessionResults, optimizer_parameters

__all__ = ["GradwiseCallback"]

# a child of Lightning's own logger, so messages go where Lightning's go (rank-zero only)
_LOGGER = logging.getLogger("lightning.pytorch.callbacks.gradwise")


class GradwiseCallback(SessionResults, pl.Callback):
    """gradwise in a Lightning ``Trainer``.

    Args:
        strong_zeros: run every backward of the ``LightningModule`` under ``gw.strong_zeros()``: NaN/Inf in
            values the loss never uses (padding, masked rows) cannot poison the gradients.
        explain: ``"first"``: trace each training step with ``gw.trace()`` until one has NaN/Inf gradients,
            then log its report (merged over the ranks) through Lightning's logger and write it as JSON
            (``gradwise-nonfinite-step{N}.json``) in ``trainer.log_dir``; ``"every"``: trace every step and
            report each NaN/Inf step; ``None``: no tracing (tracing costs like ``gw.trace()``).
        on_nonfinite: what a step whose gradients hold NaN/Inf after the backward does, the same on every rank
            (one all-reduce of a flag per step under DDP): ``"skip"`` the optimizer step (the gradients are set
            to None, so no parameter and no optimizer state changes; an LR scheduler still steps),
            ``"raise"`` ``gw.NonfiniteGradientError`` on every rank, or ``"warn"`` (``RuntimeWarning``) and step.

    After training, ``nonfinite_steps`` and ``skipped_steps`` list the optimizer steps concerned and
    ``reports`` the JSON files written (on rank 0).
    """

    def __init__(self, strong_zeros: bool = True, explain: str | None = None, on_nonfinite: str = "skip"):
        super().__init__()
        self._session = Session(strong_zeros, explain, on_nonfinite, _LOGGER)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._session.begin_step(batch=batch, batch_index=batch_idx)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        self._session.begin_backward()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._session.end_backward()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # runs after the closure (forward and backward), before gradient clipping and optimizer.step();
        # the gradients of this optimizer's parameters only (manual optimization may step several in turn)
        self._session.before_optimizer_step(trainer.global_step,
                                            optimizer_parameters(pl_module.named_parameters(), optimizer),
                                            trainer.log_dir)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._session.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._session.close()
