"""``_StepExplainer``: the part of ``gw.watch()`` (``_watching._Watcher``) that explains its first non-finite step:
the replay of the kept graph under a fresh trace (``_explain``), the step under FSDP2 that cannot run again
(``_unreplayable``), and the gradients no replay explains (``_unexplained_gradients``); with the names of the
forward ops of the autograd nodes met (``_node_op``), which the untraced forward never recorded.

May import: torch, gradwise._strong_zeros (its graph walk), gradwise._trace._common, _fsdp_watching, _kinds,
_replay, _replay_sites, _backward_ops, _tracer; lazily _watching (its `_donating`, on a step that could not run again).
"""
from __future__ import annotations

import concurrent.futures
import concurrent.futures.thread
import contextlib
import functools
import logging
import os
import re
import sys
import threading

import torch
import torch.utils.checkpoint

from gradwise import _strong_zeros
from gradwise._trace import _common, _fsdp_watching, _kinds, _replay, _replay_sites
from gradwise._trace._backward_ops import _declared_node
from gradwise._trace._tracer import _Tracer


class _StepExplainer:
    """The first non-finite step of a watch, explained (a part of _Watcher, whose state it reads and sets)."""

    def _explain(self, outs, seeds, leaves, roots, returned=None) -> None:
        """``returned``: what ``autograd.grad`` gave the caller (one per leaf), which the replay stands for."""
        if self.tracer is not None:
            return
        self.found_at = self.step
        tracer = self.tracer = _Tracer(self.sync_every)
        tracer.store.step = self.step
        # the step's gradients are not finite: its replay runs gw.strong_zeros()' shadow pass, which tells
        # contamination from genuine by the rules' supports, as a traced step whose forward met a NaN/Inf does
        # (the forward was not traced: nothing set ``dirty``, and a zero the program computed, tanh'(-inf),
        # below a slice was taken for the slice's)
        tracer.dirty = True
        at = _common._loc(_common._user_frame())  # the user's backward call: the forward's own lines were not seen
        for node in _strong_zeros._walk(roots):  # what each node's forward op was
            seq = node._sequence_nr()
            if seq != _common._ACCUMULATE_SEQ:
                tracer.nodes[seq] = _declared_node(node, at) or _common._Node(_node_op(node.name()), at)
        batches = dict(self.batches.items())  # (the DataLoader batches still alive): tensor -> (index, key)
        tracer.batches.update((t, i) for t, (i, _) in batches.items())
        wanted = [t for t in leaves if t.requires_grad]
        if wanted:
            tracer._name_leaves(wanted, _common._user_frame(), at)  # (their .grad reads start no step: `_forward`)
            # the births of the values the graph saved, in the forward's order (the replay meets them backwards)
            tracer.replayed = tracer._safely("the untraced forward", _replay.forward_origins, tracer, roots, at,
                                             batches, outs) or {}
            tracer.replayed_graph = tracer._safely("the replayed step's graph", _replay_sites.ReplayedGraph, roots,
                                                   outs, tracer, at, self.step)
        self._trace(tracer)
        if not wanted:
            return
        tracer.replaying = True
        try:
            with _no_user_hooks():
                again = torch.autograd.grad(outs, wanted, seeds, retain_graph=True, allow_unused=True)
        except _HookReplayed as exc:  # the user's hook (or a backward inside the backward) would run twice
            self.unexplained = Hooked(exc.args[0])
            _forget_partial_replay(tracer)
            self._unexplained_gradients(tracer, leaves, returned, at,
                                        exc.args[1] if len(exc.args) > 1 else "a hook of yours would run a second time")
            return
        except RuntimeError as exc:  # a graph that cannot be replayed (a compiled backward with donated buffers)
            why = _unreplayed_because(exc, roots)
            self.unexplained = why[0] if isinstance(why[0], Unreplayed) else \
                (str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__)
            _forget_partial_replay(tracer)
            self._unexplained_gradients(tracer, leaves, returned, at, *why)
            return
        finally:
            tracer.replayed = {}  # (storages are reused once the graph is freed)
            tracer.replaying = False
        if tracer.store.orphans and _compiled_nodes(roots):
            # a gradient of the replay holds NaN/Inf that no seen op made: it came out of a compiled backward's
            # generated kernels. What the replay recorded is a part only (the saved values' births, "reaches: no
            # gradient"; each such gradient "birth not observed"): the step is told as not explained, its
            # gradients one finding whose provenance the later steps inherit
            self.unexplained = Unreplayed(_OPAQUE_REPLAY)
            _forget_partial_replay(tracer)
            self._unexplained_gradients(tracer, leaves, returned, at, _OPAQUE_REPLAY)
            return
        given = {id(leaf): r for leaf, r in zip(leaves, returned, strict=False)} if returned is not None else {}
        compiled = None  # whether the graph holds a compiled backward (read once, where needed)
        for leaf, g in zip(wanted, again, strict=True):
            # the replay's provenance stands for the real gradient (.grad, or what autograd.grad returned): an
            # optimizer step reading it is then "a gradient used as a value", descending from this step's findings
            got = tracer.prov.get(g) if g is not None else None
            real = given.get(id(leaf)) if returned is not None else leaf.grad
            if got and isinstance(real, torch.Tensor):
                tracer.prov[real] = got
            elif returned is None and isinstance(real, torch.Tensor) and not got and id(leaf) in self.stale:
                # finite in the replay, non-finite in .grad, as it was before the block's first backward added to it
                # (not after: a .grad that the all-reduce made NaN is told by note_received below)
                with torch.utils._python_dispatch._disable_current_modes():  # (the trace's own reads)
                    tracer._safely("a gradient accumulated into", tracer.stale_gradient, leaf, real, at, self.step)
            elif returned is None and isinstance(real, torch.Tensor) and not got and _common._dist_rank() is None:
                # finite in the replay and when a backward of the block first reached it, no collective: the program
                # wrote NaN/Inf into this .grad between backwards, untraced (was told as no NaN/Inf at all)
                with torch.utils._python_dispatch._disable_current_modes():
                    if _common._inexact(real) and _kinds.readable(real) and real.layout is torch.strided and \
                            _common._nonfinite(real):
                        # (unless a compiled backward ran there: its kernels' ops are not seen, and its replay
                        # under the shadow pass may run the strong variant, finite where the step's was not)
                        compiled = compiled if compiled is not None else bool(_compiled_nodes(roots))
                        tracer._safely("a gradient written between backwards", tracer.unexplained_gradient, real,
                                       leaf, at, self.step, _OPAQUE_REPLAY, None,  # (_safely: no keywords, what=)
                                       None if compiled else _BETWEEN.format(name=tracer.leaf_name(leaf),
                                                                             step=self.step))
        if returned is None and _common._dist_rank() is not None:
            # the replay ran no collective: a .grad that is NaN/Inf where this rank's own gradient is finite came
            # from another rank through DDP's all-reduce, which this step ran untraced
            with torch.utils._python_dispatch._disable_current_modes():  # (the trace's reads)
                local = {tracer.leaf_name(leaf) for leaf, g in zip(wanted, again, strict=True)
                         if isinstance(g, torch.Tensor) and _common._nonfinite(g)}
                for leaf in wanted:  # a received .grad that a later backward accumulates onto stays received
                    if tracer.leaf_name(leaf) not in local and isinstance(leaf.grad, torch.Tensor) and \
                            _common._nonfinite(leaf.grad):
                        tracer.remember_received(leaf.grad, ("c10d.allreduce_", at))
            tracer._safely("received gradients", tracer.note_received, local, ("c10d.allreduce_", at))

    def _unreplayable(self, fsdp, leaves) -> None:
        """The first non-finite step under FSDP2, which must not run again (`_fsdp_watching`): each non-finite
        gradient of this rank (of an FSDP2 parameter, or of a leaf FSDP does not manage) becomes a finding born at
        the backward call. Then the full trace starts, as after a replay. (It was not started until the step it
        starts in was set as ended: the next step's ops were recorded as this one's, and the next step's genuine
        NaN, the test's ``x[0, 0] = nan``, read as a spurious second birth of this step at an aten.copy_.)"""
        if self.tracer is not None:
            return
        self.found_at = self.step
        self.unexplained = _fsdp_watching.WHY
        tracer = self.tracer = _Tracer(self.sync_every)
        tracer.store.step = self.step
        # the step's gradients are not finite: its replay runs gw.strong_zeros()' shadow pass, which tells
        # contamination from genuine by the rules' supports, as a traced step whose forward met a NaN/Inf does
        # (the forward was not traced: nothing set ``dirty``, and a zero the program computed, tanh'(-inf),
        # below a slice was taken for the slice's)
        tracer.dirty = True
        frame = _common._user_frame()
        at = _common._loc(frame)
        tracer.batches.update((t, i) for t, (i, _) in dict(self.batches.items()).items())
        with torch.utils._python_dispatch._disable_current_modes():  # (the trace's own reads)
            managed = {id(leaf) for leaf, _ in fsdp}
            others = [t for t in leaves if id(t) not in managed and isinstance(g := t.grad, torch.Tensor) and
                      _common._inexact(g) and g.layout is _STRIDED and _kinds.readable(g) and _common._nonfinite(g)]
            bad = _fsdp_watching.nonfinite(fsdp) + [(t, t.grad, _common._nonfinite_mask(t.grad)) for t in others]
            tracer._name_leaves([fp.sharded_param for _, fp in fsdp] + others, frame, at)
            for _, fp in fsdp:  # a parameter no frame holds: FSDP's own name for it
                if (tracer.names.get(fp.sharded_param) or "").startswith("tensor[") and getattr(fp, "_param_fqn", None):
                    tracer.names[fp.sharded_param] = fp._param_fqn
            for p, g, mask in bad:
                tracer._safely("unexplained gradients", tracer.unexplained_gradient, g, p, at, self.step,
                               "under FSDP2 its backward cannot run again", mask)
            self.fsdp_found = [(tracer.leaf_name(p), "NaN" if _common._has_nan(g) else "Inf",
                                _common._count(mask), id(p) in self.stale) for p, g, mask in bad]
            for leaf, fp in fsdp:  # the traced steps read the unsharded parameters: the model's names for them
                tracer.names[leaf] = tracer.leaf_name(fp.sharded_param)
        # no traced backward ended this step (the replay does in `_explain`): without this, the next step's ops
        # were recorded as this one's, and its genuine NaN was told as a second birth of this step
        tracer.backward_ended = True
        self._trace(tracer)

    def _unexplained_gradients(self, tracer: _Tracer, leaves, returned, at, *why: str) -> None:
        """The step's NaN/Inf gradients, which no replay explains, become one finding born at its backward call
        (contamination or genuine: not known), and the provenance of those gradients: an optimizer step that
        writes them into the parameters is then downstream of it, as are the later steps' NaN (they were a
        genuine NaN of data that 'arrived non-finite' at the optimizer's line, a NaN .grad taken for an input)."""
        grads = list(returned) if returned is not None else [leaf.grad for leaf in leaves]
        with torch.utils._python_dispatch._disable_current_modes():  # (the trace's own reads)
            for leaf, g in zip(leaves, grads, strict=False):
                if isinstance(g, torch.Tensor) and _common._inexact(g) and _kinds.readable(g) and \
                        g.layout is torch.strided and _common._nonfinite(g):
                    if returned is None and g is leaf.grad and id(leaf) not in self.stale_fresh and \
                            self.stale_counts.get(id(leaf)) == _common._count(_common._nonfinite_mask(g)):
                        # its NaN/Inf are the ones it held before the block: what the backward added was finite
                        # (a NaN of this step landing on an old one keeps the count: not this) and no element
                        # more is NaN/Inf (finite + finite overflowing to Inf), as gw.trace() tells them (was
                        # "not explained")
                        tracer._safely("a gradient accumulated into", tracer.stale_gradient, leaf, g, at, self.step)
                        continue
                    tracer._safely("unexplained gradients", tracer.unexplained_gradient, g, leaf, at, self.step,
                                   *why)


class Hooked(str):
    """Why the step was not replayed: a hook of the user's in its graph (``_no_user_hooks``)."""


class Unreplayed(str):
    """Why the step was not explained, in the report's words, where gradwise knows it: a compiled backward that
    donated its saved buffers (``_DONATED``), or one whose generated kernels the replay does not see."""


class _HookReplayed(Exception):
    """Raised as the replay calls a hook of the user's, before its body runs (``_no_user_hooks``)."""


@contextlib.contextmanager
def _no_user_hooks():
    """The replay runs the step's backward a second time, and with it the user's hooks (tensor, node, module
    backward hooks, a library's), whose effects (a counter, a list, a write into .grad) the program would then see
    twice. As the engine calls one (Python code outside torch it runs directly, or through ``_HOOK_RUNNERS``:
    ``_common.engine_hook``), a trace function stops the replay before the hook's first line: the program's state
    stays as without the watch; as it does where a checkpoint recomputes the user's forward (``_RECOMPUTE``). A
    custom Function's backward runs as the backward does. Only this thread (the CPU engine's; a device thread's
    hooks are not seen), only hooks with a Python frame (not a builtin: ``register_hook(grads.append)``), and only
    where sys.settrace (a call event per Python frame, no more) or else sys.setprofile (also every return and C
    call: slower) is free; with both set (a debugger and cProfile) they are left alone and the hooks run again."""
    if sys.gettrace() is None:
        get, put = sys.gettrace, sys.settrace
    elif sys.getprofile() is None:
        get, put = sys.getprofile, sys.setprofile
    else:
        yield
        return
    core, runners, engine_hook = _common._core_file, _common._HOOK_RUNNERS, _common.engine_hook

    def watch(frame, event, arg):
        # per Python call of the replay (the trace's own too): the cheap tests first. A hook's own frame is called
        # by the engine (C++, under _engine_run_backward) or by one of _HOOK_RUNNERS; not torch's, not gradwise's.
        if event != "call":
            return None
        code = frame.f_code
        if code.co_name == _RECOMPUTE[0] and code.co_filename == _RECOMPUTE[1]:
            raise _HookReplayed("its backward recomputes a checkpointed forward (torch.utils.checkpoint), which a "
                                "replay would run a second time (a BatchNorm's running statistics updated again)")
        if code in _HANDOFF and torch._C._current_graph_task_id() != -1 and (caller := _handing_off(frame)):
            # a custom backward that starts a thread or hands work to a pool's running thread (which may run a
            # backward of its own, not seen here): run again, its work would run a second time (a pool's thread
            # already started: its backward added to .grad twice, silently). gradwise's own helper thread is not
            raise _HookReplayed(f"its backward starts a thread or hands it work ({_HANDOFF[code]} at "
                                f"{_common._fmt(_common._loc(caller))}), which a replay would run a "
                                "second time", "a thread its backward starts would run again")
        if code is _BACKWARD and torch._C._current_graph_task_id() != -1:
            # a custom Function's backward that runs torch.autograd.backward of its own: run again, it adds to
            # the .grad of its leaves a second time (their gradients were doubled, silently)
            raise _HookReplayed(f"its backward runs a backward of its own (torch.autograd.backward at "
                                f"{_common._fmt(_common._loc(frame.f_back))}), which a replay would run a second "
                                "time, adding to .grad again", "a backward inside its backward would run again")
        if core.get(code.co_filename, False):
            return None
        back = frame.f_back
        if back is None or (back.f_code.co_name != "_engine_run_backward" and
                            not back.f_code.co_filename.endswith(runners)) or _common._core(code):
            return None
        # _engine_run_backward's own calls (its logging level), not the engine's: outside any backward, or, in a
        # backward that a custom backward starts (torch.autograd.grad inside it), the one call of its own that is
        # not torch's (it was named "your hook Logger.getEffectiveLevel", and the step went unexplained)
        if torch._C._current_graph_task_id() == -1 or code is _LOG_LEVEL or _reads_log_level(frame):
            return None
        hook = engine_hook(frame)
        if hook is not None:
            raise _HookReplayed(f"its backward runs your hook {hook} at {_common._fmt(_common._loc(frame))}, which "
                                "a replay would run a second time")
        return None

    put(watch)
    try:
        yield
    finally:
        if get() is watch or get() is None:
            put(None)


def _unreplayed_because(exc: RuntimeError, roots) -> tuple[str, ...]:
    """Why the replay's torch.autograd.grad refused the step, in the report's words (none: not known). A reentrant
    checkpoint refuses .grad() before it runs the user's forward again; a compiled backward with donated buffers
    (the watch then ran the step without keeping its graph: `_watching._donating`) freed the saved tensors."""
    if "use_reentrant=True" in str(exc):
        return (Unreplayed("torch.utils.checkpoint(use_reentrant=True) refuses torch.autograd.grad, which a replay "
                           "uses; gw.trace() has it explained"),)
    from gradwise._trace._watching import _donating

    if _donating(roots):
        return (Unreplayed(_DONATED),)
    return ()


_DONATED = ("its compiled backward donates its saved buffers (torch._functorch.config.donated_buffer, on by "
            "default), so the step ran without keeping its graph and what a replay needs was freed; set "
            "torch._functorch.config.donated_buffer = False before the first compile, or run the step under "
            "gw.trace(), to have it explained")


# the function through which torch.utils.checkpoint (use_reentrant=False) runs the user's forward again in a
# backward: a replay would run it once more, with its effects (a BatchNorm's running statistics, a counter). Known
# by its name and file: it is nested in _checkpoint_without_reentrant_generator up to torch 2.13 and in its
# _impl from 2.14 (read from the first, it was no code at all there, and the replay recomputed the forward)
_RECOMPUTE = ("recompute_fn", torch.utils.checkpoint.__file__)
# torch.autograd.backward as PyTorch defines it (gradwise's wrapper, installed in a block, calls it)
_BACKWARD = torch.autograd.backward.__code__
# where a backward hands work to another thread: one it starts, a pool's (whose thread may already run)
_HANDOFF = {threading.Thread.start.__code__: "threading.Thread.start",
            concurrent.futures.ThreadPoolExecutor.submit.__code__: "ThreadPoolExecutor.submit"}
_GRADWISE_DIR = os.path.dirname(os.path.dirname(_common.__file__)) + os.sep


def _handing_off(frame):
    """The frame that called into ``threading`` / ``concurrent.futures`` (the hand-off ``frame`` runs), or None
    where that is gradwise's own (its helper thread for a complex pinv: no work of the program's)."""
    f = frame.f_back
    while f is not None and f.f_code.co_filename in _THREADING_FILES:
        f = f.f_back
    return None if f is None or f.f_code.co_filename.startswith(_GRADWISE_DIR) else f


_THREADING_FILES = frozenset({threading.__file__, concurrent.futures.thread.__file__,
                              concurrent.futures._base.__file__})
# what torch.autograd.graph._engine_run_backward calls first, outside torch (no hook of the user's)
_LOG_LEVEL = logging.Logger.getEffectiveLevel.__code__
_STRIDED = torch.strided
_NODE_SUFFIX = re.compile(r"Backward\d*$")


def _reads_log_level(frame) -> bool:
    """Whether this call is a method of a logging.Logger (torch's autograd logger): _engine_run_backward's read of
    its level through a Logger subclass's own getEffectiveLevel (a logger class set with logging.setLoggerClass
    before torch was imported), or, with that logger at DEBUG (TORCH_LOGS="+torch.autograd"), the log.debug of
    the hooks torch puts on the graph. No hook of the user's: they were named "your hook
    MyLogger.getEffectiveLevel" / "your hook Logger.debug", and the step went unexplained."""
    return isinstance(frame.f_locals.get("self"), logging.Logger)


def _node_op(name: str) -> str:
    """'AddmmBackward0' -> 'aten.addmm', the op the trace records for that node (what `_discarded_by` and the
    report expect): LogSoftmaxBackward0 is aten._log_softmax's, NllLossBackward0 aten.nll_loss_forward's,
    ToCopyBackward0 aten._to_copy's; others (CopySlices, a custom Function's) as they are."""
    base = _NODE_SUFFIX.sub("", name)
    op = _op_named(base) if base != name else None
    return f"aten.{op}" if op else name


@functools.cache
def _op_named(base: str) -> str | None:
    """The aten op whose autograd node is named ``base`` + 'BackwardN', the likeliest of those that share the
    name: not a composite op (CompositeImplicitAutograd: log_softmax decomposes into _log_softmax), not an
    in-place one."""
    ops = _ops_by_node_name().get(base)
    if not ops:
        return None
    return min(ops, key=lambda op: (_composite(op), op.endswith("_"), op.startswith("_"), op)) if len(ops) > 1 \
        else next(iter(ops))


@functools.cache
def _ops_by_node_name() -> dict[str, set[str]]:
    """Autograd node name (without 'BackwardN') -> the aten ops of that name. PyTorch's codegen names a node
    after its op (torchgen's _create_op_prefix: title case of the '_'-split name, so a leading '_' and a
    trailing '_forward' vanish). Built once (a few ms), when a watch first explains a step."""
    names: dict[str, set[str]] = {}
    for full in torch._C._dispatch_get_all_op_names():
        if full.startswith("aten::"):
            op = full[6:].split(".")[0]
            camel = "".join(p.title() for p in op.split("_"))
            names.setdefault(camel.removesuffix("Forward"), set()).add(op)
    return names


def _composite(op: str) -> bool:
    """Whether every functional overload of an aten op decomposes (CompositeImplicitAutograd): no node is its."""
    try:
        packet = getattr(torch.ops.aten, op)
        got = [getattr(packet, o) for o in packet.overloads() if "out" not in o]
        return bool(got) and all(o.has_kernel_for_dispatch_key(_COMPOSITE) for o in got)
    except (AttributeError, RuntimeError):  # (an op the Python bindings do not know: sym_size)
        return True


_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd



_OPAQUE_REPLAY = ("its compiled backward runs in generated kernels, whose ops the replay does not see: run the "
                  "step without torch.compile, or with backend='aot_eager', to have it explained")


def _compiled_nodes(roots) -> list:
    """The compiled backwards of the graph whose kernels' ops a replay does not see: not aot_eager's, which runs
    its graph's ops as they are (``boxed_nop``), seen as eager ops are; one not compiled yet counts as opaque."""
    from gradwise._strong_zeros._compile import _backward_compiler, compiled_nodes

    def opaque(node) -> bool:
        fn = getattr(_backward_compiler(node), "compiled_bw", None)
        return not str(getattr(fn, "__qualname__", "")).startswith("boxed_nop.")

    return [n for n in compiled_nodes(roots) if opaque(n)]


_BETWEEN = ("{name}.grad held NaN/Inf when the backward at step {step} added finite values to it, though it was "
            "finite when an earlier backward of the block reached it: the program wrote it between backwards, "
            "where gw.watch() traces nothing")


def _forget_partial_replay(tracer: _Tracer) -> None:
    """Drop what a replay that stopped recorded (the births of the saved values read for it, the incidents of
    the part of the backward that ran before a hook of the user's): the step is told as not explained, one
    finding per gradient at the backward call. They were findings of their own, "genuine NaN ... reaches: no
    gradient" and "tensor[1, 4] arrived with 4 NaN value(s)" (a GRU's hidden state, no data that arrived)."""
    step = tracer.store.step
    tracer.store = type(tracer.store)()
    tracer.store.step = step
    tracer.prov = _common._ByIdentity()
    tracer.clean = _common._Cleanness()
    tracer.parts.clear()
    tracer.split.clear()
    tracer.output_births.clear()  # (a NaN loss's, read when the replay began)
