"""gradwise inside training frameworks: one callback each for Lightning and Hugging Face ``Trainer``.

- ``gradwise.integrations.lightning.GradwiseCallback`` (needs ``lightning``: ``pip install gradwise[lightning]``)
- ``gradwise.integrations.transformers.GradwiseCallback`` (needs ``transformers``:
  ``pip install gradwise[transformers]``)

Both take the same options (``strong_zeros``, ``explain``, ``on_nonfinite``) and behave alike; see
docs/integrations.md. Nothing is imported here, so ``import gradwise.integrations`` works without either library.
"""

__all__: list[str] = []
