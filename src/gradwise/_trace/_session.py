"""The public entry points ``trace``, ``snapshot`` and ``explain``: per-thread tracers and the wrapped
``torch.autograd.backward``/``grad`` (``_TRACERS``, ``_WATCHERS``, and the rebound ``_installed``: read as
``_session.<name>``).

May import: torch, gradwise._modes, gradwise._ops, gradwise._strong_zeros, gradwise._trace._common, _kinds, _report,
_tracer.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import threading
from collections.abc import Callable, Iterator

import torch
from torch._dynamo.eval_frame import skip_code

from gradwise import _strong_zeros
from gradwise._modes import dynamo_off
from gradwise._ops._kinks import _SCRATCH
from gradwise._strong_zeros import _engine
from gradwise._strong_zeros._traced import recording
from gradwise._trace import _kinds
from gradwise._trace._common import _tensors
from gradwise._trace._report import Report
from gradwise._trace._tracer import RECORDED, _Tracer

# -- public API ------------------------------------------------------------------------------------------------

# Per-thread tracers: torch.autograd.backward/grad are wrapped once (reference-counted, under a lock) and the
# wrappers look up the calling thread's tracer; a thread without one runs PyTorch's functions untouched. The
# dispatch mode itself is thread-local (PyTorch's mode stack is).
_LOCK = threading.Lock()
_TRACERS: dict[int, _Tracer] = {}  # thread id -> its outermost active tracer
_WATCHERS: dict = {}  # thread id -> its gw.watch() state (_watch._Watcher), while no tracer runs there
_ORIGINAL: list = []  # [torch.autograd.backward, torch.autograd.grad, the DataLoader iterator's __next__] while wrapped
_LOADER_ITER = torch.utils.data.dataloader._BaseDataLoaderIter
_installed = 0


def _current() -> _Tracer | None:
    """This thread's tracer; on an autograd engine thread running a traced backward's nodes (CUDA's device threads:
    a custom backward calling torch.autograd.grad there), the tracer the engine carried in the dispatch mode stack."""
    tracer = _TRACERS.get(threading.get_ident())
    if tracer is None and _TRACERS and torch._C._len_torch_dispatch_stack():
        tracer = next((m for m in reversed(torch.utils._python_dispatch._get_current_dispatch_mode_stack())
                       if isinstance(m, _Tracer)), None)
    return tracer


_UNTRACED: list[dict] = []  # while `gradwise run` reports for the process: {thread name: backward calls untraced}
_UNTRACED_NAMES = 8  # thread names kept apart; later threads are counted together


@contextlib.contextmanager
def untraced_threads() -> Iterator[dict]:
    """While `gradwise run` reports on a whole script: the backward calls made in threads that neither trace nor
    watch (the script's own worker threads), by thread name, so that its report does not say "no NaN/Inf
    gradients" of passes it never saw. Costs nothing in traced threads."""
    got: dict = {}
    _install()
    _UNTRACED.append(got)
    try:
        yield got
    finally:
        _UNTRACED.remove(got)
        _uninstall()


def _untraced_call() -> None:
    """A backward call in a thread without a watcher: count it for `untraced_threads` unless a tracer runs there
    (it passed the call over: a batched gradient under vmap)."""
    if _current() is not None:
        return
    name = threading.current_thread().name
    for got in _UNTRACED:
        if name not in got and len(got) >= _UNTRACED_NAMES:  # (a thread per request: bounded, the rest counted)
            name = "other threads"
        got[name] = got.get(name, 0) + 1


_OTHER_THREAD = "not explained (run on another thread inside a traced backward; the trace is per thread)"


def _inside_another_threads_backward(tensors, inputs) -> None:
    """A backward in a thread that neither traces nor watches, while a watched or traced thread is inside a backward
    (a custom backward that runs one on a thread of its own and joins it): the watch and the trace are per thread,
    and its NaN .grad was told by neither ("No NaN/Inf gradients"). Its leaves are checked with the running watched
    backward's (as a nested backward's on the same thread), and a trace counts it as a backward run untraced. A
    thread of the program's own that runs backwards beside a watched one meanwhile is included: a NaN .grad it makes
    is then told too (not explained), never hidden."""
    watching = [w for w in list(_WATCHERS.values()) if w.depth and w.tracer is None]
    tracing = [t for t in list(_TRACERS.values()) if t.depth]
    try:
        for w in watching:
            w.note_nested(tensors, inputs, here=False)
        for t in tracing:
            t._pass_over_backward("torch.autograd.backward", _OTHER_THREAD)
    except Exception:  # (a graph walk the other thread's backward must not fail on: it runs as it would)
        pass


@contextlib.contextmanager
def _backward_call(tracer: _Tracer) -> Iterator[None]:
    """Around one backward/grad call. Under gw.strong_zeros() the engine hook may run a plain pass, then redo
    it with strong zeros when a gradient came out non-finite: what the plain pass recorded is provisional and
    is dropped when the strong pass ran (the strong pass records what remains, and what it removed)."""
    outer = tracer.depth == 0
    if outer:
        tracer.provisional = [] if _strong_zeros._STATE.depth else None
        tracer.strong_ran = False
    collectives, serial = tracer.collectives, tracer.store.serial
    # gradients already NaN/Inf before this backward (accumulated onto): not received through its collective
    stale = (tracer._safely("received gradients", tracer.nonfinite_grads) or set()) if outer else set()
    tracer.depth += 1
    try:
        yield
    finally:
        tracer.depth -= 1
        tracer.flush()
        tracer.backward_ended = not tracer.depth
        if outer:
            if tracer.provisional:
                tracer.drop_provisional()
            tracer.provisional = None
            if tracer.collectives != collectives:  # DDP all-reduced in it: the gradients now may be another rank's
                # local: what this rank's own NaN/Inf reached in it. An incident of an earlier step is not: DDP's
                # buckets persist and keep that step's provenance, so its reaches are added again (stale)
                local = {n for inc in tracer.store.incidents.values()
                         if inc.serial > serial and id(inc) in tracer.reached_now for n in inc.reaches}
                tracer._safely("received gradients", tracer.note_received, local | stale)
            tracer.reached_now = set()
            tracer.shadow = tracer.triangles = None


# Never traced by dynamo (a backward inside a torch.compile'd training step graph-breaks; the frames its eager
# call enters would be compiled, with torch.compiler.is_compiling() reading True): see _strong_zeros._engine
_BATCHED = "functorch-transformed (vmap, batched gradient)"


def _untraceable() -> str | None:
    """Why no backward started now can be traced (a note's kind), or None: a torch.func transform is active, or
    make_fx / a fake mode records it (the trace's reads would enter the user's graph)."""
    if torch._C._are_functorch_transforms_active():
        return _BATCHED
    return RECORDED if recording() else None


def _once(arg):
    """A one-pass iterable of tensors (a generator) as a tuple: PyTorch reads it once (``tuple(...)``) and so may
    the wrapped call, after the watch or trace has read it (else PyTorch met it empty: a backward that ran nothing,
    a grad that raised)."""
    if arg is None or isinstance(arg, (torch.Tensor, torch.autograd.graph.GradientEdge, tuple, list)):
        return arg
    return tuple(arg)


@dynamo_off
def _traced_backward(tensors, grad_tensors=None, *args, **kwargs):
    tensors, grad_tensors = _once(tensors), _once(grad_tensors)
    if len(args) > 3:  # (retain_graph, create_graph, grad_variables, inputs)
        args = (*args[:3], _once(args[3]), *args[4:])
    if "inputs" in kwargs:
        kwargs["inputs"] = _once(kwargs["inputs"])
    tracer = _current()
    if tracer is not None and tracer.passed_calls:  # inside a call passed over: counted once, there (see _traced_grad)
        return _ORIGINAL[0](tensors, grad_tensors, *args, **kwargs)
    if tracer is not None and (why := _untraceable()) is not None:
        tracer._pass_over_backward("torch.autograd.backward", why)
        with tracer.passing():  # (its ops still reach the tracer: counted once, here)
            return _ORIGINAL[0](tensors, grad_tensors, *args, **kwargs)
    if tracer is None:
        watcher = _WATCHERS.get(threading.get_ident())
        if watcher is not None:
            return watcher.backward(_ORIGINAL[0], tensors, grad_tensors, *args, **kwargs)
        if _UNTRACED:
            _untraced_call()
        if _WATCHERS or _TRACERS:
            _inside_another_threads_backward(tensors, kwargs.get("inputs", args[3] if len(args) > 3 else None))
        return _ORIGINAL[0](tensors, grad_tensors, *args, **kwargs)
    tensors, grad_tensors = tracer.roots(tensors, grad_tensors)
    with _backward_call(tracer):
        result = _ORIGINAL[0](tensors, grad_tensors, *args, **kwargs)
        inputs = kwargs.get("inputs", args[3] if len(args) > 3 else None)
        if inputs is not None:  # non-leaf inputs get their .grad without an AccumulateGrad node: read it here
            targets = [t for t in ((inputs,) if isinstance(inputs, torch.Tensor) else inputs)
                       if isinstance(t, torch.Tensor) and not t.is_leaf]
            _read_results(tracer, "torch.autograd.backward", [t.grad for t in targets], targets)
        return result


@dynamo_off
def _traced_grad(outputs, inputs, grad_outputs=None, *args, **kwargs):
    outputs, inputs, grad_outputs = _once(outputs), _once(inputs), _once(grad_outputs)
    tracer = _current()
    if tracer is not None and tracer.passed_calls:
        # inside a call passed over, counted once there: make_fx's torch-function mode calls torch.autograd.grad's
        # handler with the function the module's name resolves to, this wrapper (the one call came here twice)
        return _ORIGINAL[1](outputs, inputs, grad_outputs, *args, **kwargs)
    if tracer is not None and ((why := _untraceable()) is not None or kwargs.get("is_grads_batched")
                               or not all(_kinds.readable(g) for g in _tensors(
                                   [grad_outputs] if isinstance(grad_outputs, torch.Tensor) else grad_outputs or ()))):
        tracer._pass_over_backward("torch.autograd.grad", why or _BATCHED)
        with tracer.passing():  # batched gradients: their values cannot be read here (counted once, here)
            return _ORIGINAL[1](outputs, inputs, grad_outputs, *args, **kwargs)
    if tracer is None:
        watcher = _WATCHERS.get(threading.get_ident())
        if watcher is not None:
            return watcher.grad(_ORIGINAL[1], outputs, inputs, grad_outputs, *args, **kwargs)
        if _UNTRACED:
            _untraced_call()
        return _ORIGINAL[1](outputs, inputs, grad_outputs, *args, **kwargs)
    outputs, grad_outputs = tracer.roots(outputs, grad_outputs)
    with _backward_call(tracer):
        result = _ORIGINAL[1](outputs, inputs, grad_outputs, *args, **kwargs)
        if isinstance(inputs, (torch.Tensor, torch.autograd.graph.GradientEdge)) or not isinstance(
                inputs, (list, tuple)):
            leaves = (inputs,)
        else:
            leaves = tuple(inputs)
        _read_results(tracer, "torch.autograd.grad", result, leaves)
    return result


class _UnseenReader:
    """The trace's and the watch's part in the engine hook (``_strong_zeros._engine.unseen_reader``, set while
    installed): a backward that no wrapped call started (``grad`` bound before the block began: `from torch.autograd
    import grad` at a module's top calls PyTorch's own, which looks the hook up at call time) is read as a wrapped
    one is: its seeds made roots and its results read (a trace), its gradients checked (a watch). TorchScript's and
    C++ backwards never reach the hook (the trace notes them from their ops)."""

    @staticmethod
    def unseen() -> object | None:
        """This thread's tracer, else its watcher, when no backward call of its own is running (it then started
        none of this one)."""
        ident = threading.get_ident()
        if torch.compiler.is_compiling():  # (dynamo running a gradient node on fake tensors: no program backward)
            return None
        tracer = _TRACERS.get(ident)
        if tracer is not None:
            return None if tracer.depth or tracer.passed_calls else tracer
        watcher = _WATCHERS.get(ident)
        return None if watcher is None or watcher.depth else watcher

    @staticmethod
    @dynamo_off
    def read(who, engine: Callable, t_outputs, grad_tensors, retain_graph, create_graph, inputs=(),
             allow_unreachable=True, accumulate_grad=True):
        def run(outputs, seeds, retain, create, given=inputs):
            return engine(tuple(outputs), tuple(seeds), retain, create, given, allow_unreachable=allow_unreachable,
                          accumulate_grad=accumulate_grad)

        # is_grads_batched: torch.autograd.grad runs the engine under legacy vmap, whose seeds cannot be read
        batched = not all(_kinds.readable(g) and not _legacy_batched(g) for g in _tensors(grad_tensors or ()))
        if not isinstance(who, _Tracer):  # a watcher: its own backward/grad around the engine's run
            return _watched(who, run, batched, t_outputs, grad_tensors, retain_graph, create_graph, inputs,
                            accumulate_grad)
        tracer, call = who, "torch.autograd.backward" if accumulate_grad else "torch.autograd.grad"
        why = _untraceable() or (_BATCHED if batched else None)
        if why is not None:
            tracer._pass_over_backward(call, why)
            with tracer.passing():
                return run(t_outputs, grad_tensors, retain_graph, create_graph)
        t_outputs, grad_tensors = tracer.roots(t_outputs, grad_tensors)
        with _backward_call(tracer):
            result = run(t_outputs, grad_tensors, retain_graph, create_graph)
            # backward: non-leaf inputs get their .grad without an AccumulateGrad node, read here (leaves' are read
            # at their accumulation); grad: the results, one per input
            grads = [t.grad if isinstance(t, torch.Tensor) and not t.is_leaf else None for t in inputs] \
                if accumulate_grad else result
            _read_results(tracer, call, grads, inputs)
        return result


_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def _watched(watcher, run: Callable, batched: bool, t_outputs, grad_tensors, retain_graph, create_graph, inputs,
             accumulate_grad: bool):
    """An unseen backward under gw.watch(): the watcher's backward/grad around the engine's run (``run``), which
    holds the watcher's depth so that the hook does not hand the same backward over again. Batched seeds: run
    untraced and counted, as a batched torch.autograd.grad is."""
    def held(*args):
        watcher.depth += 1
        try:
            return run(*args)
        finally:
            watcher.depth -= 1

    if batched:
        watcher.untraced += 1
        return held(t_outputs, grad_tensors, retain_graph, create_graph)
    if accumulate_grad:
        return watcher.backward(lambda t, g, retain, create, _, given: held(t, g, retain, create, given or ()),
                                t_outputs, grad_tensors, retain_graph, create_graph, None, inputs or None)
    return watcher.grad(lambda o, _, g, retain, create, *rest: held(o, g, retain, create), t_outputs, inputs,
                        grad_tensors, retain_graph, create_graph)


skip_code(_UnseenReader.unseen.__code__)  # (called in the engine hook: see _strong_zeros._engine._observe)


def _read_results(tracer, call: str, grads, leaves) -> None:
    """Record which findings reach each gradient a backward call produced (``grads[i]`` for ``leaves[i]``)."""
    tracer.flush()
    # the trace's own reads of the results are no ops of the program: run with the modes off, as in the
    # mode's handler (not torch._C._DisableTorchDispatch: a legacy-vmap batched result crashes under it)
    with torch.utils._python_dispatch._disable_current_modes():
        for g, leaf in zip(grads, leaves, strict=False):
            # torch.func.grad calls this too; under vmap its gradients are batched and cannot be read here
            if isinstance(g, torch.Tensor) and isinstance(leaf, torch.Tensor) and _kinds.readable(g):
                tracer._safely(call, tracer.reached, g, leaf)  # (a legacy-vmap batched g fails: a note)


def _traced_next(it):
    """A DataLoader iterator's ``__next__``: the tensors of a batch are tagged with its index, so that a NaN
    they bring is reported as arriving in that batch (a worker's batch reaches the mode as storage rebinding
    only, with no line of the user's)."""
    batch = _ORIGINAL[2](it)
    tracer = _current()
    if tracer is not None:
        tracer._safely("DataLoader", _tag_batch, tracer.batches, batch, it._num_yielded - 1)
        if it._num_workers and it._num_yielded == 1:  # worker processes copied what the block had made until now
            tracer.worker_cut = len(tracer.store.births)
    elif (watcher := _WATCHERS.get(threading.get_ident())) is not None:  # (a few dict writes per batch)
        try:
            _tag_batch(watcher.batches, batch, it._num_yielded - 1, keyed=True)
        except Exception:  # a batch it cannot walk: its data is then named without its batch, never an error
            pass
    elif (recent := _RECENT.get(threading.get_ident())) is not None:
        recent.append((batch, it._num_yielded - 1))
    return batch


_RECENT: dict = {}  # thread id -> the last batches its DataLoaders yielded with no trace open (remember_batches)


@contextlib.contextmanager
def remember_batches() -> Iterator[None]:
    """While a Trainer callback lives: the last few batches this thread's DataLoaders yield while no trace is open,
    kept for ``tag_recent_batches`` (Hugging Face's callback opens its trace at a step's start, after the Trainer
    fetched the step's batches, and its hook sees no batch). Memory: at most ``_KEPT_BATCHES`` batches."""
    _install()
    _RECENT[threading.get_ident()] = collections.deque(maxlen=_KEPT_BATCHES)
    try:
        yield
    finally:
        _RECENT.pop(threading.get_ident(), None)
        _uninstall()


_KEPT_BATCHES = 8  # (a gradient-accumulation step fetches several; accelerate prefetches one more)


def tag_recent_batches() -> None:
    """Tag the batches ``remember_batches`` kept, each with its own index, in this thread's trace (then forget
    them): a NaN one brings is told as arriving in that DataLoader batch."""
    recent = _RECENT.get(threading.get_ident())
    while recent:
        tag_batch(*recent.popleft())


def tag_batch(batch: object, index: int) -> None:
    """Tag a batch fetched before this thread's trace started with its index (a Trainer callback opens the trace
    at the start of a step, after the framework fetched that step's batch), so that a NaN it brings is told as
    arriving in that batch. Nothing without a trace; a batch it cannot walk is left untagged."""
    tracer = _current()
    if tracer is not None:
        tracer._safely("DataLoader", _tag_batch, tracer.batches, batch, index)


def _tag_batch(tags, batch: object, index: int, keyed: bool = False) -> None:
    """Tag a batch's tensors with its index (``keyed``: with the index and, for a dict batch, the tensor's key, a
    name the watch can give data that no variable holds when it explains a step: Trainer's inputs["x"])."""
    if keyed and isinstance(batch, dict):
        for k, t in batch.items():
            if isinstance(t, torch.Tensor):
                tags[t] = (index, f"{k}" if isinstance(k, str) and k.isidentifier() else None)
        return
    for t in _tensors(torch.utils._pytree.tree_leaves(batch)):
        tags[t] = (index, None) if keyed else index


_BUILD_HANDLERS: list = []  # [dynamo's (cached) table builder], looked up once: a watch opened per step pays no import


def _dynamo_handlers_built() -> None:
    """Dynamo keys its handlers of torch functions by identity in a table built on first use: built while the
    wrappers below replace torch.autograd.grad/backward (a first compile inside a trace or watch), it would know
    the wrappers only, and later compiled code would trace the real torch.autograd.grad into its graph. Built
    now, with PyTorch's own functions."""
    if not _BUILD_HANDLERS:
        try:
            from torch._dynamo.variables.torch import TorchInGraphFunctionVariable

            _BUILD_HANDLERS.append(TorchInGraphFunctionVariable._get_handlers)
        except (ImportError, AttributeError):  # another PyTorch: no such table
            _BUILD_HANDLERS.append(lambda: None)
    _BUILD_HANDLERS[0]()


@functools.cache
def _jit_builtins_registered() -> None:
    """torch.jit.script resolves torch.autograd.grad/backward by identity to its builtins: the wrappers are those
    builtins too (scripted code runs PyTorch's own; its ops are still seen by the mode). The table keeps them
    once registered: a watch opened per step registers nothing again."""
    torch.jit._builtins._register_builtin(_traced_backward, "aten::backward")
    torch.jit._builtins._register_builtin(_traced_grad, "aten::grad")


def _install() -> None:
    global _installed
    with _LOCK:
        if _installed == 0:
            _dynamo_handlers_built()
            _ORIGINAL[:] = [torch.autograd.backward, torch.autograd.grad, _LOADER_ITER.__next__]
            _jit_builtins_registered()
            torch.autograd.backward, torch.autograd.grad = _traced_backward, _traced_grad
            _LOADER_ITER.__next__ = _traced_next
            _engine.unseen_reader = _UnseenReader
        _installed += 1


def _uninstall() -> None:
    global _installed
    with _LOCK:
        _installed -= 1
        if _installed == 0:
            torch.autograd.backward, torch.autograd.grad, _LOADER_ITER.__next__ = _ORIGINAL
            _engine.unseen_reader = None
            _ORIGINAL.clear()


@contextlib.contextmanager
def trace(*, sync_every: int = 256) -> Iterator[Report]:
    """Record the forward and backward passes run in the block and explain every NaN/Inf and every kink.

    Works with any number of ``.backward()`` / ``torch.autograd.grad`` calls, modules and custom Functions.
    The report is filled in when the block exits (also when it raises, e.g. on KeyboardInterrupt).
    ``sync_every``: on accelerators, finiteness checks are batched and settled every this many ops (one host
    sync per batch); on CPU every op is checked at once. The trace belongs to the thread that opened it: other
    threads' backward passes are not traced and pay nothing. Memory stays bounded over long runs (repeats of a
    finding are counted, not stored).

    Example::

        >>> import torch, gradwise as gw
        >>> x = torch.tensor([-1.0, 4.0], requires_grad=True)
        >>> with gw.trace() as report:
        ...     torch.where(x > 0, x.sqrt(), x).sum().backward()
        >>> [f.kind for f in report.findings]
        ['contamination']
        >>> report.findings[0].reaches
        ['x']
    """
    if not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"sync_every must be a positive int, got {sync_every!r}")
    report = Report()
    outer = _current()
    if outer is None and (watcher := _WATCHERS.get(threading.get_ident())) is not None:
        outer = watcher.start_tracing()  # inside gw.watch() (gradwise run --watch): join it, tracing from here
    if outer is not None:  # nested (a script using gw.explain run by `gradwise run`): the outer block records
        since = outer.store.serial
        try:
            yield report
        finally:
            outer.fill(report, since)
        return
    tracer = _Tracer(sync_every)
    me = threading.get_ident()
    _install()
    _TRACERS[me] = tracer
    try:
        with tracer:
            yield report
    finally:
        _TRACERS.pop(me, None)
        _uninstall()
        _SCRATCH.buf = None
        tracer.fill(report)


def snapshot(thread: int | None = None) -> Report | None:
    """The report so far of the `gw.trace()` block running in ``thread`` (a ``threading.get_ident()``; default:
    the main thread), without ending it; None when that thread traces nothing. Safe to call from a signal
    handler (the CLI prints it on SIGTERM): the trace's dispatch mode is switched off while the report is built,
    and recording goes on afterwards."""
    tracer = _TRACERS.get(threading.main_thread().ident if thread is None else thread)
    if tracer is None:
        return None
    report = Report()
    with torch.utils._python_dispatch._disable_current_modes():
        tracer.fill(report)
    return report


def explain(fn: Callable[..., torch.Tensor], *args, **kwargs) -> Report:
    """Call ``fn(*args, **kwargs)``, back-propagate its scalar result and explain every NaN/Inf and kink.

    The gradients are taken with ``torch.autograd.grad`` with respect to every leaf the result depends on, so
    no ``.grad`` is changed.

    Example::

        >>> import torch, gradwise as gw
        >>> x = torch.tensor([0.0, 2.0], requires_grad=True)
        >>> report = gw.explain(lambda x: torch.relu(x).sum(), x)
        >>> [(f.kind, f.op, f.count) for f in report.findings]
        [('kink', 'aten.relu', 1)]
    """
    if not callable(fn):
        raise TypeError(f"gw.explain(fn, *args): fn must be callable, got {type(fn).__name__}")
    with trace() as report:
        out = fn(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"gw.explain: fn must return a scalar tensor to back-propagate, got {type(out).__name__}; "
                            "return the loss (e.g. out.sum())")
        if not out.is_floating_point():
            raise TypeError(f"gw.explain: fn returned a {out.dtype} tensor; gradients need a floating-point result")
        if out.numel() != 1:
            raise ValueError(f"gw.explain: fn returned shape {tuple(out.shape)}, not a scalar; return a scalar "
                             "(e.g. out.sum()), or use `with gw.trace():` and call backward(grad_outputs) yourself")
        if not out.requires_grad:
            raise ValueError("gw.explain: fn's result does not require grad: no input it uses has "
                             "requires_grad=True; call x.requires_grad_() on the tensors to differentiate")
        leaves = _leaves(out)
        torch.autograd.grad(out, leaves, allow_unused=True)
    return report


def _leaves(out: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors requiring grad that `out` depends on (from its autograd graph)."""
    leaves, seen, stack = [], set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(n for n, _ in node.next_functions)
    return leaves
