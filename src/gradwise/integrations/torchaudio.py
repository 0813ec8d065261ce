"""Strong zeros behind torchaudio's RNN-T loss: the padded frames and tokens it skips become structural zeros.

``torchaudio.functional.rnnt_loss`` computes the gradient of its logits inside the forward (one C++ kernel) and
its backward multiplies that saved gradient by the loss's sensitivity. Past each sequence's ``logit_lengths``
(frames) and ``target_lengths`` (tokens) the saved gradient holds ordinary zeros, which nothing in the backward
can tell from a computed 0: a NaN in padded frames of the encoder (or the predictor) then reaches the joiner's
weight gradient as ``0 x NaN``, with or without ``gw.strong_zeros()``. ``rnnt_loss`` below declares those
elements unused (``gw.mark_unused``) before calling torchaudio's, so under strong zeros their gradient is a
structural zero and the joiner's gradients equal those of the batch without its padding.

Example::

    from gradwise.integrations.torchaudio import rnnt_loss

    loss = rnnt_loss(logits, targets, logit_lengths, target_lengths)  # torchaudio's arguments
    gw.backward(loss)

Other RNN-T kernels (warp-rnnt, k2's) skip the same elements: ``gw.mark_unused(logits, rnnt_unused(...))``.
torchaudio is imported when ``rnnt_loss`` is first called; ``rnnt_unused`` needs only torch.
"""

from __future__ import annotations

import torch

from gradwise._strong_zeros._unused import mark_unused

__all__ = ["rnnt_loss", "rnnt_unused"]


def rnnt_unused(logits: torch.Tensor, logit_lengths: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
    """The elements of RNN-T ``logits`` (batch, max frames, max tokens + 1, classes) that the loss never reads:
    frame ``t >= logit_lengths[b]`` or token position ``u > target_lengths[b]``. A bool tensor of shape
    (batch, max frames, max tokens + 1, 1), built by comparisons (no value is read on the host)."""
    if logits.dim() != 4:
        raise ValueError(f"rnnt_unused: logits must be (batch, frames, tokens + 1, classes), got shape "
                         f"{tuple(logits.shape)}")
    batch, frames, tokens, _ = logits.shape
    for name, lengths in (("logit_lengths", logit_lengths), ("target_lengths", target_lengths)):
        if not isinstance(lengths, torch.Tensor) or lengths.shape != (batch,) or lengths.is_floating_point():
            raise ValueError(f"rnnt_unused: {name} must be an integer tensor of shape ({batch},), got "
                             f"{getattr(lengths, 'shape', type(lengths).__name__)}")
    t = torch.arange(frames, device=logits.device).view(1, frames, 1, 1)
    u = torch.arange(tokens, device=logits.device).view(1, 1, tokens, 1)
    past_frames = t >= logit_lengths.to(logits.device).view(batch, 1, 1, 1)
    past_tokens = u > target_lengths.to(logits.device).view(batch, 1, 1, 1)
    return past_frames | past_tokens


def rnnt_loss(logits: torch.Tensor, targets: torch.Tensor, logit_lengths: torch.Tensor,
              target_lengths: torch.Tensor, blank: int = -1, clamp: float = -1, reduction: str = "mean",
              fused_log_softmax: bool = True) -> torch.Tensor:
    """``torchaudio.functional.rnnt_loss`` with the padding it skips declared unused (``gw.mark_unused``):
    same arguments, same loss (bitwise: the logits pass through as a view); under strong zeros, padded frames and
    tokens get structural-zero gradients. The declaration is checked in every eager backward: torchaudio's
    gradient there must be 0, else ``gw.mark_unused`` raises."""
    try:
        import torchaudio.functional as taf
    except (ImportError, OSError) as e:  # a wheel built for another torch fails with OSError
        raise ImportError("gradwise.integrations.torchaudio.rnnt_loss needs a torchaudio that loads with this "
                          f"torch ({torch.__version__}): {e}. Other RNN-T kernels: "
                          "gw.mark_unused(logits, rnnt_unused(logits, logit_lengths, target_lengths))") from e
    logits = mark_unused(logits, rnnt_unused(logits, logit_lengths, target_lengths))
    return taf.rnnt_loss(logits, targets, logit_lengths, target_lengths, blank=blank, clamp=clamp,
                         reduction=reduction, fused_log_softmax=fused_log_softmax)
