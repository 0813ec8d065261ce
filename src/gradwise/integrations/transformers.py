"""``GradwiseCallback`` for the Hugging Face ``transformers.Trainer``: strong zeros, NaN/Inf steps skipped (or
raised, or warned about) on every rank together, and a report of why a step's gradients hold NaN/Inf.

Needs ``transformers`` (``pip install gradwise[transformers]``). Example::

    from transformers import Trainer
    from gradwise.integrations.transformers import GradwiseCallback

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[GradwiseCallback(explain="first")])
    trainer.train()
"""

from __future__ import annotations

from typing import Any

try:
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging
except ImportError as e:  # pragma: no cover - exercised only where transformers is absent
    raise ImportError("gradwise.integrations.transformers needs Hugging Face transformers: "
                      "pip install 'gradwise[transformers]' (or pip install transformers)") from e

from gradwise.integrations._core import Session, SessionResults, optimizer_parameters

__all__ = ["GradwiseCallback"]

# under the "transformers" logger, so its verbosity settings (and handlers) apply
_LOGGER = hf_logging.get_logger("transformers.gradwise")


class GradwiseCallback(SessionResults, TrainerCallback):
    """gradwise in a Hugging Face ``Trainer``.

    Args:
        strong_zeros: run the backward of every training step under ``gw.strong_zeros()``: NaN/Inf in values
            the loss never uses (padding, masked positions) cannot poison the gradients. The Trainer has no
            callback around the backward itself, so strong zeros are on from the start of each optimizer
            step (``on_step_begin``) to the optimizer step; they affect only backward passes.
        explain: ``"first"``: trace each training step with ``gw.trace()`` until one has NaN/Inf gradients,
            then log its report (merged over the ranks) through transformers' logger and write it as JSON
            (``gradwise-nonfinite-step{N}.json``) in ``args.output_dir``; ``"every"``: trace every step and
            report each NaN/Inf step; ``None``: no tracing (tracing costs like ``gw.trace()``).
        on_nonfinite: what a step whose gradients hold NaN/Inf does, the same on every rank (one all-reduce of
            a flag per step when distributed), checked after gradient clipping, before ``optimizer.step()``:
            ``"skip"`` the optimizer step (the gradients are set to None, so no parameter and no optimizer
            state changes; the LR scheduler still steps), ``"raise"`` ``gw.NonfiniteGradientError`` on every
            rank, or ``"warn"`` (``RuntimeWarning``) and step.

    After training, ``nonfinite_steps`` and ``skipped_steps`` list the optimizer steps concerned and
    ``reports`` the JSON files written (on rank 0).
    """

    def __init__(self, strong_zeros: bool = True, explain: str | None = None, on_nonfinite: str = "skip"):
        self._session = Session(strong_zeros, explain, on_nonfinite, _LOGGER)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # on_step_begin sees no batch and comes after the Trainer fetched it: keep the batches for begin_step
        self._session.remember_batches()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # called once per optimizer step, before the first micro-batch's forward
        self._session.begin_step(strong_zeros_now=True)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        optimizer = kwargs.get("optimizer")
        named = optimizer_parameters(model.named_parameters() if model is not None else [], optimizer)
        self._session.before_optimizer_step(state.global_step, named, args.output_dir)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._session.end_backward()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._session.close()
