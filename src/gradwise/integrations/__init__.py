"""gradwise inside training frameworks and libraries: one callback each for Lightning and Hugging Face ``Trainer``,
and torchaudio's RNN-T loss.

- ``gradwise.integrations.lightning.GradwiseCallback`` (needs ``lightning``: ``pip install gradwise[lightning]``)
- ``gradwise.integrations.transformers.GradwiseCallback`` (needs ``transformers``:
  ``pip install gradwise[transformers]``)
- ``gradwise.integrations.torchaudio.rnnt_loss``: torchaudio's RNN-T loss with its padding declared unused
  (``gw.mark_unused``), so padded frames' NaN cannot reach the joiner's gradients under strong zeros.

The callbacks take the same options (``strong_zeros``, ``explain``, ``on_nonfinite``) and behave alike; see
docs/integrations.md. Nothing is imported here, so ``import gradwise.integrations`` works without any of these
libraries.
"""

__all__: list[str] = []
