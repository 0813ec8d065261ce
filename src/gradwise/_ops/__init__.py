"""Facts about aten ops, written once and read by every concern (the trace, nonsmooth calculus, strong zeros).

Modules:

``_kinks``   where each aten op kinks (or is singular, or jumps), and PyTorch's convention there: ``KINKS``.

No engine lives here: only what is true of an op, whoever asks.

May import: torch, math only (no other gradwise module).
"""
