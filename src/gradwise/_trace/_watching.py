"""`gw.watch()`: near-zero cost until the first non-finite gradient, then the full trace.

Design. A long training run pays for `gw.trace()` on every op of every step although NaN appears once.
`gw.watch()` records nothing while the gradients are finite:

1. No dispatch mode, no per-op work: the forward and backward run as plain PyTorch. Only
   ``torch.autograd.backward`` / ``torch.autograd.grad`` are wrapped (once, reference-counted, per thread: the
   same wrappers as `gw.trace()`; a thread that does not watch pays one dict look-up per backward call).
2. Each backward call runs with its graph kept (``retain_graph=True``). One walk of the graph, before it runs,
   lists its leaves, its saved tensors and (only after an AOTAutograd compile in the process) its compiled
   backwards; after it, the gradients it produced (the ``.grad`` of those leaves, or the results of
   ``autograd.grad``) are checked at once (`_finite`: on the CPU a sum per gradient, small float32 vectors
   concatenated into one, each read at once; elsewhere the sums stacked, one host sync). Finite: the saved
   tensors are freed at once, as the engine would have freed them (unless the caller asked to keep the graph),
   and that is all. The walk, the scan of the CPU gradients and the release are one call each into the C++
   helper (`gradwise._native`; the release is PyTorch's ``Node::release_variables``, what its engine calls on a
   graph it does not keep) once it is built; until then, or without a compiler, their Python twins (C-level
   attribute reads per node, a sum per gradient, one ``SavedTensor.register_hooks`` per saved tensor) give the
   same leaves and the same answer (tests/test_native.py, test_watch.py on both paths). The twins leave a
   checkpoint's or save_on_cpu's packed slots to die with the graph (``register_hooks`` refuses them); the helper
   frees them, as the engine does.
3. At the first non-finite gradient the step is explained: the kept graph is differentiated again under the
   trace (``torch.autograd.grad`` of the same outputs with respect to the same leaves: no ``.grad`` changes),
   which classifies every NaN/Inf element (contamination or genuine, which parameters it reaches). The forward
   of that step was not recorded: the values its graph saved are read first in the forward's order
   (`_replay.forward_origins`), so the birth is the data (with its DataLoader batch: the watch tags batches as
   the trace does) or the op that made the NaN/Inf, and what was computed from it carries that birth; lines are
   the backward call's, the autograd node tells the forward op. From then on the block is traced in full
   (`gw.trace()`), so the following steps get birth lines and root causes.
4. Under FSDP2 (`_fsdp_watching`) the leaves are the unsharded parameters, whose gradients FSDP has moved into
   the sharded parameters' ``.grad`` when the backward returns: a leaf left without a gradient (no cost to other
   programs) sends the check to this rank's shards. A non-finite step there is not replayed (FSDP's collectives
   would run on one rank only): its gradients become findings of that step, and the full trace starts as
   elsewhere (`_unreplayable`).

Why the graph is kept, and its cost. The engine frees each node's saved tensors right after running it unless
the graph is kept, so only a kept graph can be replayed; a kept graph must then be freed by the watch, and
PyTorch frees a saved tensor from Python only one at a time (``register_hooks``, ~1 us each, the freeing
itself included, which a plain backward does inside the engine). That walk and release, with the check, are the
cost of a finite step. On the 0.7 ms step of 6 x Linear(128)+ReLU, batch 128 (CPU time, one thread, caches
cold after the backward; 2026-12-06): ~38 us walk (most of it the first Python access of each node and saved
slot), ~50 us check (~25 with the gradients and the code warm: 12 reductions), ~20 us release (19 saved
tensors), ~15 us to reach and enter the watch's backward, ~8 us of keeping the graph through the backward,
~13 us to open and close a block: watch / plain 1.23-1.24 over forward+backward with a block per step, 1.15 over
training steps (SGD) in one block (benchmarks/bench_trace.py). Until 5949032 a refused ``register_hooks`` per
step (a slot saved as None, ~29 us for its C++ backtrace) cost another 4% there. The check alone, with the
parameters known and nothing else, is 1.05-1.09 of that step: the floor of any watch that checks every gradient
of every step, so 1.05 cannot be met on steps that small; on 4-20 ms steps watch / plain is 1.00-1.06 (1.00-1.05
over training steps).
Measured again 2026-12-07 (session 33, issue 16 asks 1.05 on every row; benchmarks/watch_breakdown.py: the watch
with its parts removed, same process, median of per-sample ratios, CPU time, one thread, three runs on a loaded
two-core machine where the small MLP's training step takes 1.6-1.7 ms): watch / plain training 1.15-1.18 there (1.14
quiet, bench_trace at 13:08; 1.07, 1.03, 1.00, 1.02 on the other rows). Entering the watch and its block 1.01-1.03,
+ keeping the graph 1.02-1.04, + the watch's own Python per backward (root nodes, readability tests, the leaves'
.grad, the loss; no walk, check or release) 1.07: the budget is spent before the work the watch exists for. On top,
the check +3.8-4.8% and the walk with the release +4.3-6.3%. On the 4 ms MLP the same parts are 1.00-1.01,
1.014-1.016, 1.027-1.028, check +0.9-1.3%, walk and release +1.0-2.1% (1.05-1.06 loaded, 1.07 quiet). The floor is
set by what must run per step, not by how it is written: every step's graph is new (new nodes, new SavedTensor
objects to free), so a walk cached from the previous step still has to touch each node and slot once, and a check
that the structure is unchanged is that walk (a second walk of a graph already walked, its Python objects made: ~10
us); nor can the walk and the release be one pass: the release waits for the check, the check for the leaves the
walk finds, and the walk cannot move after the backward (a leaf seen for the first time has its .grad read before
the backward adds to it: a stale NaN). PyTorch 2.13 offers no C-level release (Node: name, next_functions, metadata,
hooks, _raw_saved_*; SavedTensor: data, unpack, register_hooks; ``retain_graph`` is one flag for the whole graph
task; ``_current_graph_task_execution_order`` refuses a multithreaded engine). The check's alternatives on the small
MLP's 12 gradients (warm, interleaved, us): the watch's 28 (its tests of what can be read: ~9 of them), a sum each
with the small vectors joined 19, the sums stacked and read once 27, one torch.cat 29, ``_foreach_norm`` 32 (ord 1:
103), ``_foreach_max`` 26 (and it misses -Inf), ``_foreach_powsum`` 35: no fused read-only reduction is cheaper on
the CPU (each is a per-tensor loop in C++ over the same kernels). ``_amp_foreach_non_finite_check_and_unscale_``
(19; 57 against 34 on the 4 ms MLP's 1.5 MB) writes every gradient back: the same bits when inv_scale is 1 and no
version bump, yet a concurrent accumulation by another thread's backward would be lost (a silent wrong gradient).
Checking each gradient as it is made (a post-accumulate hook that records, one check at the end) measured within
noise of the check after the backward on both MLPs (a Python call per gradient instead of one cold read), besides
the DDP objection below. Checking once per optimizer step instead of per backward (gradient accumulation) would keep
every micro-batch's graph until the step (k x activation memory) or free it unchecked (its first non-finite
micro-batch unexplained). Detaching the loss in place (``detach_``) to free the graph in C++ frees only what no
other tensor holds (a user's ``out`` keeps its subgraph, saved tensors included) and changes the user's tensor. So
on a 0.7 ms step of 32 nodes, 19 saved tensors and 12 gradients, 1.05 is out of reach for a watch that checks every
gradient of every step and can explain the first non-finite one; on the 4 ms MLP it is at the edge (1.05-1.07), on
the Transformer and the CNNs within it.
Measured again 2026-12-07 (session 35; `python benchmarks/bench_trace.py --threads 1 --cpu-time` and
`python benchmarks/watch_breakdown.py`, two runs each of 83c7a5b and of this code, interleaved, two cores at load 8-11;
1.108 quiet at 19:14): watch / plain training on the ReLU MLP (0.97-1.09 ms step) 1.115, 1.175 (83c7a5b), 1.160,
1.087 (this code): a spread of 9% at that load, wider than any change tried; the other rows 1.01-1.05 (one
Transformer run 1.097). The breakdown, four runs: entry and block 0.999-1.040, + graph kept 0.990-1.018, + glue
1.028-1.050, + check 1.067-1.093, + walk and release without the check 1.089-1.137, all 1.137-1.166; the
kept-graph variant run again in the last slot reads the same (1.020 and 1.019, 1.015 and 1.019). In situ
(perf_counter around each part of this backward on training steps, median of 300, ~1 ms step, load ~4.6): entry
tests 6 us, root nodes 1.5, walk 24, stale-leaf bookkeeping 2.3, .grad reads 2.4, loss 1.6, check 36, release 19 (per
slot: unpack_hook 0.2, data 0.2, register_hooks 1.1 with the tensor's free); the engine runs as fast with the glue
on (612 against 614 us). Each Python-level read after a backward costs 0.3-1 us with the caches cold (0.04-0.07
warm), so this code costs 2-3x its warm figure (the walk: 9.4 us on a graph already walked, 17.6 on a fresh one,
24-37 between backwards; the check 19 warm, 28-41 in situ), and no one piece of the glue dominates (adding its
pieces one at a time: entry tests 5-13 us, root nodes 3-14, stale-leaf bookkeeping 11, gradients and loss 3-4).
Tried and not faster: one functorch C call per gradient in the check instead of two (``is_functorch_wrapped_tensor``
answers for batched tensors too; kept as the simpler test, tests/test_watch35.py) and ``dim()`` read once: 83c7a5b's
check 1.1415 and 1.1320, this one 1.1444 and 1.1354, an importlib copy of it 1.1451 and 1.1251 (in-process, 300
blocks, the order rotated; in ABBA order the variant in the middle slot read 0.8-1.2% faster with identical code,
which benchmarks/watch_ab.py, rotating, avoids); in situ after a real backward, the sums stacked with one read
+0.5-1% over a read each, ``_foreach_norm(inf)`` of the large gradients +25% (the CPU's per-tensor slow path); the
walk marking a node seen when pushed, with a table of names only: 37.3 against 39.6 us, 36.2 against 35.8 (noise);
the glue with the calls that do nothing on a finite step skipped inline (``_note_stale`` when every leaf is in
``seen``: ``seen.issuperset(map(id, leaves))``; ``_unhook_stale`` with no hooks; ``_recorded`` and ``_as_tuple``
inlined), by `python benchmarks/watch_ab.py <83c7a5b's src>` (150 blocks, three runs, load 7-9; 83c7a5b, then it
and its A/A copy): the backward call 707.0 / 706.2 / 705.0 us, 764.0 / 759.5 / 758.6, 747.8 / 745.2 / 744.1, the
blocks over plain 1.1168 / 1.1155 / 1.1144, 1.1435 / 1.1331 / 1.1274, 1.1341 / 1.1310 / 1.1346: 1-5 us (~0.3%),
not kept for four inlined copies of helpers.
PyTorch 2.13 and 2.14.1 still have no C-level release (Node: name, next_functions, metadata, hooks, _raw_saved_*,
_input_metadata, _sequence_nr; SavedTensor: data, unpack, unpack_hook, register_hooks; torch._C._autograd: a getter
of the graph task's keep flag). The floor stands: 1.05 on this step leaves ~50 us, which the walk, check and release
alone exceed (~80 us in situ) before the entry and glue (~30-50).
Session 36 (2026-12-07): the C++ route the floor above left untried. `gradwise._native` walks the graph, scans
the CPU gradients' memory and calls ``Node::release_variables`` per node, one call each (no Python object per node
or saved slot, no kernel per gradient). In situ on the ReLU MLP's training step (perf_counter around each part,
median of 480 backward calls, two-core machine at load ~5): entry tests 3.4 us, walk 7.0 (was 24), stale-leaf
bookkeeping 1.4, .grad reads 1.9, check 9.7 (was 36; the scan alone 6.7 us for 12 gradients, AVX2, against 12.5
with the SSE2 baseline), release 3.4 (was 19). ``benchmarks/watch_native_ab.py`` (one process, interleaved, same
load): watch / plain training 1.072 on the helper against 1.125 on the Python twins; bench_trace's figures are in
the README.
Measured and rejected (tests/test_watch.py keeps the graph's lifetime): not keeping the graph (the first
non-finite step could not be explained, only a later one; checking only the loss misses contamination, a finite
loss with NaN gradients); leaving a kept graph to die with its tensors (the user's ``loss``/``out`` hold it
through the next forward: twice the activation memory; no cheap hook marks the next forward, and the safe ones,
an optimizer step or a DataLoader fetch, come while the loss is still alive in a real loop, so the release costs
the same there); default saved-tensor hooks whose packed box the watch empties (1.08 with the check, before the
walk for the leaves, but torch.func's grad/vjp/jacrev raise under any saved-tensor hooks, and they compete with
checkpointing's and offloading's); one fused reduction (``torch._foreach_norm``: 2-10x the per-gradient sums on
the CPU; stacked sums and one read: within noise); checking each gradient when it is made (a post-accumulate
hook sees a rank's own gradient before DDP's all-reduce: another rank's NaN would be missed); a second engine
pass with undefined gradients to free it (it would run user hooks and custom Functions' backwards again).

The report (yielded by the ``with``) holds the explained step and everything traced after it; a run that
never goes non-finite gets an empty report. ``step`` counts backward calls from 0.

May import: torch, gradwise._native, gradwise._strong_zeros (its _traced; and, lazily, its _compile),
gradwise._trace._fsdp_watching, _kinds, _report, _tracer, _watch_explain (the first non-finite step explained:
``_StepExplainer``), _watch_leaves (the check, and the leaves' .grad from before: ``_StaleGrads``), _session (whose
per-thread tables it reads and writes as ``_session.<name>``).
"""
from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from gradwise import _native, _strong_zeros
from gradwise._strong_zeros._traced import compiling, recording
from gradwise._trace import _fsdp_watching, _kinds, _session
from gradwise._trace._report import Report
from gradwise._trace._tracer import _Tracer
from gradwise._trace._watch_explain import Hooked, Unreplayed, _StepExplainer
from gradwise._trace._watch_leaves import _STRIDED, _as_tuple, _finite, _input_tensors, _StaleGrads


class _Watcher(_StaleGrads, _StepExplainer):
    """The state of one `gw.watch()` block (one thread)."""

    def __init__(self, sync_every: int) -> None:
        super().__init__()
        self.sync_every = sync_every
        self.step = 0  # backward calls so far
        self.depth = 0
        self.tracer: _Tracer | None = None  # set at the first non-finite gradient
        self.tracing = False  # whether that tracer records
        self.found_at: int | None = None
        self.unexplained: str | None = None  # why that step's backward could not be replayed
        # that step under FSDP2: (parameter, NaN/Inf, count on this rank, whether its gradient held it before the block)
        self.fsdp_found: list[tuple[str, str, int, bool]] = []
        self.joined_at: int | None = None  # the step where a gw.trace() block inside started the full trace
        self._batches: WeakTensorKeyDictionary | None = None  # (made at the first batch: a block per step pays nothing)
        self.untraced = 0  # backward calls run unchecked (a torch.func transform, batched seeds): not known finite

    @property
    def batches(self) -> WeakTensorKeyDictionary:
        """DataLoader tensor -> (its batch's index, its key in a dict batch), as a running trace tags them: data
        that arrived non-finite in the explained step is named with its batch."""
        if self._batches is None:
            self._batches = WeakTensorKeyDictionary()
        return self._batches

    # -- the wrapped autograd entry points (called by _trace's wrappers for a watching thread) ------------

    def backward(self, orig, tensors, grad_tensors=None, retain_graph=None, create_graph=False,
                 grad_variables=None, inputs=None):
        outs = _as_tuple(tensors)
        # a backward inside a backward (reentrant checkpoint): the outer call checks; one made while compiling
        # (AOTAutograd tracing the joint graph on fake tensors) is no step of the program
        if self._recorded():
            return self._untraced_run(orig, tensors, grad_tensors, retain_graph, create_graph, grad_variables, inputs)
        if self.depth or _compiling(outs):
            if self.depth and not _compiling(outs):
                # a backward a backward starts (a reentrant checkpoint's, on its recomputed forward; a custom
                # Function's): its leaves (the block's parameters, a tensor its closure holds) are no leaves of the
                # outer graph, yet their .grad is this step's; checked with the outer call's (a NaN only there was no
                # finding at all). Held weakly: those dead when the outer call returns were made inside it (the
                # checkpoint's detached inputs, whose gradients it hands back to the outer graph)
                self.note_nested(outs, inputs)
            return self._held(orig, tensors, grad_tensors, retain_graph, create_graph, grad_variables, inputs)
        keep = create_graph if retain_graph is None else retain_graph
        # one walk, before the backward (the graph it keeps is the same after): what to check, what to free, and
        # (after an AOTAutograd compile in this process) the compiled backwards that may refuse to be kept; in C++
        # where the helper is built (`_native`: the same leaves, the nodes freed as the engine frees them)
        compiled = [] if _aot_compiles().get("total") else None
        native = _native.module() if compiled is None else None
        if native is not None and all(isinstance(t, torch.Tensor) for t in outs):
            roots = None  # (made only to explain a step or to free toward ``inputs``)
            leaves, walked = native.walk(outs)
        else:
            native = None
            roots = _strong_zeros._root_nodes(outs)
            leaves, walked = _strong_zeros._graph_parts(roots, compiled)
        retain = keep or not _donating_any(compiled)
        if self.tracer is None:
            self._note_stale(leaves, fsdp=True)
        self.depth += 1
        try:
            orig(tensors, grad_tensors, retain, create_graph, grad_variables, inputs)
        finally:
            self.depth -= 1
            nested, self.nested = self.nested, None
            self._unhook_stale()  # (before a replay: what it brings is not this step's addition)
        if inputs is not None:
            leaves = _input_tensors(inputs)
        if nested:
            known = {id(t) for t in leaves}
            leaves = leaves + [t for r in nested if (t := r()) is not None and id(t) not in known]
        grads = [g for t in leaves if (g := t.grad) is not None]
        fsdp = None
        if len(grads) < len(leaves):  # a leaf the backward reached holds no gradient: FSDP2 moved it to its shards
            fsdp = self.fsdp.of(leaves)
            if fsdp:
                grads += _fsdp_watching.gradients(fsdp)
        if not _finite(grads + _losses(outs)):
            if fsdp is None:  # (accumulation without gradient sync keeps .grad: FSDP2's all the same)
                fsdp = self.fsdp.of(leaves)
            if fsdp:
                self._unreplayable(fsdp, leaves)
            else:
                self._explain(outs, grad_tensors, leaves, roots or _strong_zeros._root_nodes(outs))
        if retain and not keep:  # as the engine: only what it ran (toward ``inputs``, if given) is freed
            # (not kept: the engine freed it, and a custom Function's node dropped the SavedTensor objects listed)
            if inputs is not None:
                _release_toward(outs, _as_tuple(inputs), roots, native, inputs_run=True)
            elif native is not None:
                native.release(walked)
            else:
                _strong_zeros._release(walked)
        self.step += 1

    def grad(self, orig, outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False,
             only_inputs=True, allow_unused=None, is_grads_batched=False, materialize_grads=False):
        outs = _as_tuple(outputs)
        if self._recorded():
            return self._untraced_run(orig, outputs, inputs, grad_outputs, retain_graph, create_graph, only_inputs,
                                      allow_unused, is_grads_batched, materialize_grads)
        if self.depth or is_grads_batched or torch._C._are_functorch_transforms_active() or _compiling(outs):
            if not self.depth and not compiling() and (is_grads_batched or torch._C._are_functorch_transforms_active()):
                self.untraced += 1  # batched or transformed (not torch.compile's own trace): gradients unread
            return self._held(orig, outputs, inputs, grad_outputs, retain_graph, create_graph, only_inputs,
                              allow_unused, is_grads_batched, materialize_grads)
        keep = create_graph if retain_graph is None else retain_graph
        roots = _strong_zeros._root_nodes(outs)
        self.depth += 1
        try:
            result = orig(outputs, inputs, grad_outputs, keep or not _donating(roots), create_graph, only_inputs,
                          allow_unused, is_grads_batched, materialize_grads)
        except RuntimeError as exc:  # an unused input is refused after the engine ran (and freed) what it reached
            if not keep and _UNUSED in str(exc):
                _release_toward(outs, _as_tuple(inputs), roots, _native.module())
            raise
        finally:
            self.depth -= 1
            nested, self.nested = self.nested, None
            self._unhook_stale()
        inner = []
        if nested:  # a backward inside it (a custom Function's) wrote the .grad of its own leaves: checked with the
            # results (it was no finding at all)
            known = {id(t) for t in _as_tuple(inputs)}
            inner = [t for r in nested if (t := r()) is not None and t.grad is not None and id(t) not in known]
        if not _finite([g for g in result if isinstance(g, torch.Tensor)] + [t.grad for t in inner] + _losses(outs)):
            leaves = [t for t in _as_tuple(inputs) if isinstance(t, torch.Tensor)] + inner
            self._explain(outs, grad_outputs, leaves, roots, (*result, *(t.grad for t in inner)))
        if not keep:  # as the engine: only the nodes on the way to ``inputs`` ran, and only theirs are freed
            _release_toward(outs, _as_tuple(inputs), roots, _native.module())
        self.step += 1
        return result

    def _recorded(self) -> bool:
        """A backward make_fx (or a fake mode) records, outside torch.compile: its tensors, real ones in make_fx's
        real mode, must not be read (the reads would be recorded or refused: "get value out of a tracing tensor",
        a crash inside the watch). It runs untraced and counted, as the trace does (``_untraced_run``)."""
        return not self.depth and recording() and not compiling()

    def _untraced_run(self, orig, *args):
        self.untraced += 1
        return self._held(orig, *args)

    def _held(self, orig, *args):
        """``orig(*args)``, a backward call the watch passes through, as one call: what it runs inside (make_fx's
        torch-function mode calling torch.autograd.grad again, the engine hook's ``_session._UnseenReader``)
        is part of it, not another call."""
        self.depth += 1
        try:
            return orig(*args)
        finally:
            self.depth -= 1

    def start_tracing(self) -> _Tracer:
        """A gw.trace() block opened inside the watch (a script run by ``gradwise run --watch`` that traces a
        part of itself): trace in full from here, so that the block joins this tracer (as a nested gw.trace()
        joins an outer one) and the watch's report and step numbers cover it."""
        if self.tracer is None:
            self.joined_at = self.step
            self.tracer = _Tracer(self.sync_every)
        if not self.tracing:
            if self.joined_at is None:
                self.joined_at = self.step
            self.tracer.store.step = self.step
            self.tracer.backward_ended = False  # (self.step is already the next step's number)
            self._trace(self.tracer)
        return self.tracer

    def _trace(self, tracer: _Tracer) -> None:
        """Trace this thread in full from here."""
        _session._TRACERS[threading.get_ident()] = tracer
        tracer.__enter__()
        self.tracing = True

    # -- the first non-finite gradient: explain the step, then trace in full ------------------------------

    def finish(self, report: Report) -> None:
        """Fill ``report`` (empty when every gradient stayed finite) and stop tracing."""
        if self.tracer is None:
            report.untraced_backwards = self.untraced
            return
        if self.tracing:
            _session._TRACERS.pop(threading.get_ident(), None)
            self.tracer.__exit__(None, None, None)
        self.tracer.fill(report)
        report.untraced_backwards += self.untraced  # (those before the trace began: the tracer counts its own)
        if self.found_at is None:  # only a gw.trace() block inside made it trace
            report.notes.insert(0, f"gw.watch(): a gw.trace() block inside it started the full trace at step "
                                   f"{self.joined_at}")
            return
        after = ", the following steps were traced in full"
        if self.unexplained is None:
            how = "was explained from its backward (its forward was not traced)"
        elif self.unexplained is _fsdp_watching.WHY:
            held = ", ".join(f"{name} ({kind}, {n} of this rank's elements"
                             f"{'; held before the block, not zeroed' if before else ''})"
                             for name, kind, n, before in self.fsdp_found)
            how = f"could not be explained ({self.unexplained}: {held or 'none on this rank'})"
            after = ", and the following steps were traced in full"
        elif isinstance(self.unexplained, Hooked):
            how = f"could not be explained ({self.unexplained}: the gradients are told as they are)"
        elif isinstance(self.unexplained, Unreplayed):
            how = f"could not be explained ({self.unexplained})"
        else:
            how = f"could not be explained (its backward could not run again: {self.unexplained})"
        unknown = ""
        if self.unexplained is not None and report.unused:
            # that step may have used the NaN/Inf of these same sites: "no gradient used" is not known
            unknown = ("; whether a gradient used the NaN/Inf values that no traced step used could not be "
                       f"determined (step {self.found_at} may have), so they are not listed")
            report.unused = []
        report.notes.insert(0, f"gw.watch(): the first non-finite gradient came at step {self.found_at}; that step "
                               f"{how}{after}{unknown}")



_UNUSED = "appears to not have been used in the graph"  # (PyTorch's message; every check before the run differs)


def _release_toward(outs: tuple, inputs: tuple, roots, native, inputs_run: bool = False) -> None:
    """Free what a backward restricted to ``inputs`` ran, as the engine does: in the C++ helper where every output
    and input is a tensor (GradientEdge ones: the Python twin). ``inputs_run``: backward(inputs=), which runs a
    non-leaf input's own node too (autograd.grad only captures its gradient)."""
    if native is not None and all(isinstance(t, torch.Tensor) for t in (*outs, *inputs)):
        native.release(native.toward(list(outs), list(inputs), inputs_run))
    else:
        _strong_zeros._release(_strong_zeros._saved_toward(roots or _strong_zeros._root_nodes(outs), inputs,
                                                           inputs_run))


def _losses(outs: tuple) -> list[torch.Tensor]:
    """The one-element float roots of a backward call (a loss), checked with its gradients (a 1-element vector,
    joined to the small vectors' one sum: no sync of its own): a NaN loss whose gradients are finite (inf - inf
    of an injected Inf, whose backward reads no value) was never explained, where gw.trace() finds it genuine."""
    return [t for t in outs if isinstance(t, torch.Tensor) and t.numel() == 1 and t.is_floating_point()
            and t.layout is _STRIDED]


def _compiling(outs: tuple) -> bool:
    """A backward call made by torch.compile while it compiles (AOTAutograd differentiates the graph on fake,
    functional tensors): it neither counts as a step nor has values to check."""
    return compiling() or any(
        isinstance(t, torch.Tensor) and not _kinds.readable(t) for t in outs)


@contextlib.contextmanager
def watch(*, sync_every: int = 256) -> Iterator[Report]:
    """Watch the backward passes run in the block at almost no cost; at the first non-finite gradient, explain
    that step and trace the rest of the block in full (`gw.trace()`).

    Until a gradient is non-finite, the only work is one fused check of the gradients per backward call (their
    graph is kept for that call and freed right after, as PyTorch would). The report is filled when the block
    exits: empty if every gradient stayed finite. ``sync_every`` is passed to the trace.

    Inside `gw.trace()` or another `gw.watch()` of the same thread (a script that watches itself, run by
    ``gradwise run``), it joins the outer block instead of raising: the outer block already records this thread,
    so the inner report lists what the outer one recorded during the inner block (a nested `gw.trace()` does the
    same), with a note saying so. A `gw.trace()` block inside it joins it too: the watch traces in full from
    there, so its report and step numbers cover the block. Refusing would crash a script that runs fine alone,
    and a second recording of the same ops would cost twice and compete for the wrapped
    ``torch.autograd.backward``.

    Example::

        >>> import torch, gradwise as gw
        >>> lin = torch.nn.Linear(3, 1)
        >>> x = torch.cat((torch.ones(2, 3), torch.full((1, 3), float("nan"))))
        >>> with gw.watch() as report:
        ...     for step in range(3):
        ...         lin.zero_grad()
        ...         lin(x[:2]).sum().backward()  # finite: nothing recorded
        ...     lin(x)[:2].sum().backward()  # NaN rows read, then sliced away: contamination
        >>> [f.kind for f in report.findings], report.findings[0].step
        (['contamination'], 3)
    """
    if not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"sync_every must be a positive int, got {sync_every!r}")
    me = threading.get_ident()
    if me in _session._TRACERS or me in _session._WATCHERS:
        with _joined(me) as report:
            yield report
        return
    report = Report()
    watcher = _Watcher(sync_every)
    _session._install()
    _session._WATCHERS[me] = watcher
    try:
        yield report
    finally:
        _session._WATCHERS.pop(me, None)
        try:
            watcher.finish(report)
        finally:
            _session._uninstall()


@contextlib.contextmanager
def _joined(me: int) -> Iterator[Report]:
    """gw.watch() nested in this thread's gw.trace() or gw.watch(): the report of what the outer block recorded
    during the inner one (an outer watch may start tracing inside it: then all it traced)."""
    report = Report()
    outer = _session._TRACERS.get(me)
    since = outer.store.serial if outer is not None else 0
    try:
        yield report
    finally:
        tracer = _session._TRACERS.get(me)
        if tracer is not None:
            with torch.utils._python_dispatch._disable_current_modes():  # (the report's own ops are not traced)
                tracer.fill(report, since if tracer is outer else 0)
        report.notes.insert(0, "gw.watch() inside gw.trace() or gw.watch() (gradwise run): it joined the outer "
                               "block, which already records this thread; these are its findings in the block")


def _donating(roots) -> bool:
    """Whether the graph holds a compiled backward with donated buffers, which refuses to run with the graph
    retained: that backward runs as the caller asked (a non-finite gradient is then explained from the next
    step, the replay having nothing to run). Only after an AOTAutograd compile in this process is the graph
    walked."""
    if not _aot_compiles().get("total"):
        return False
    from gradwise._strong_zeros._compile import compiled_nodes

    return _donating_any(compiled_nodes(roots))


def _donating_any(nodes: list | None) -> bool:
    """`_donating`, of compiled backward nodes already found (None or empty: none)."""
    if not nodes:
        return False
    from gradwise._strong_zeros._compile import _backward_compiler, _donated

    for node in nodes:
        bc = _backward_compiler(node)
        if bc is None or any(idxs for _, idxs in _donated(bc)):
            return True
    return False


@functools.cache
def _aot_compiles() -> dict:
    """torch._dynamo's counter of AOTAutograd compiles (looked up once)."""
    from torch._dynamo.utils import counters

    return counters["aot_autograd"]
