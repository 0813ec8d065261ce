"""Facts about aten ops, written once and read by every concern that needs them (the trace, nonsmooth calculus,
strong zeros).

Modules:

``_kinks``      where each aten op kinks (or is singular, or jumps), and PyTorch's convention there: ``KINKS``.
``_discrete``   the jumps of ops that read floats into integers or bools (bucketize, casts, nonzero ...), added
                to ``KINKS``.
``_cuts``       where complex functions meet their branch cuts (log, sqrt, z ** p), read by the facts and rules.
``_linalg``     the kinks of matrix factorisations (eigh, eig, svd, LU's pivots, QR's reflections), added to
                ``KINKS``.
``_pool_kinks`` the ties of max-pooling ops (max-pool, adaptive and fractional max-pool, embedding_bag max), added
                to ``KINKS``.
``_overloads`` which overloads are the same computation: an ``out=`` overload's functional one
                (``functional_of``), so a rule written for the functional form serves both.
``_zeros``      what each aten op does to structural zeros, by kind (makes, moves, adds, multiplies, gates ...):
                ``ZERO_FACTS``, read by both strong-zero engines (eager and compiled) and the trace;
                ``LOG_SPACE_SUMS``, whose weight of a -inf argument is a structural zero (both read it).

No engine lives here: only what is true of an op, whoever asks. Facts one concern alone reads stay with it:
which forward ops discard values, with the trace's fix texts (``_trace/_facts.py``), and what backward formulas of
autograd node types do with saved tensors (``_strong_zeros/_node_facts.py``); their docstrings say why.

May import: torch, math only (no other gradwise module).
"""

from gradwise._ops import _discrete, _linalg, _norm_kinks, _pool_kinks  # noqa: F401  (register their facts in KINKS)
