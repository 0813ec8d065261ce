"""Hunt (session 30) over gradwise where PyTorch users train: activation checkpointing, activation offloading,
saved-tensor hooks, module and tensor hooks, autocast, and the Lightning callback around them.

The reference of each strong-zero case is the same program with the padding rows deleted, in float64 (plain
PyTorch); on finite data it is plain PyTorch on the same data, bitwise. A NaN the loss uses must stay.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import gradwise as gw

N = 4  # rows the loss reads; rows N.. are padding


def _net(dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _data(padding: float | None = float("nan"), genuine: bool = False, dtype=torch.float64) -> torch.Tensor:
    x = torch.randn(6, 4, dtype=dtype, generator=torch.Generator().manual_seed(1))
    if padding is not None:
        x[N:] = padding
    if genuine:
        x[1, 2] = float("nan")  # a row the loss reads
    return x


# Each program reads rows :n of x (the rest is padding) and returns a scalar loss. ``x`` does not require grad
# unless the program makes it (a reentrant checkpoint needs an input that requires grad).

def _ck_inside(reentrant: bool) -> Callable:
    def program(m, x, n):  # the slice that drops the padding is inside the checkpointed block
        h = m[0](x)
        return checkpoint(lambda t: m[2](m[1](t))[:n].pow(2).sum(), h, use_reentrant=reentrant)
    return program


def _ck_inside_finite_block(m, x, n):  # ...and the block's own saved tensors are finite (t[:n])
    h = m[1](m[0](x))
    return checkpoint(lambda t: m[2](t[:n]).pow(2).sum(), h, use_reentrant=True)


def _ck_outside(reentrant: bool) -> Callable:
    def program(m, x, n):
        x = x.clone().requires_grad_()
        return m[2](checkpoint(lambda t: m[1](m[0](t)), x, use_reentrant=reentrant))[:n].pow(2).sum()
    return program


def _ck_nested(reentrant: bool, inside: bool) -> Callable:
    def program(m, x, n):
        def inner(t):
            return m[1](m[0](t))

        def outer(t):
            out = m[2](checkpoint(inner, t, use_reentrant=reentrant))
            return out[:n].pow(2).sum() if inside else out

        out = checkpoint(outer, x.clone().requires_grad_(), use_reentrant=reentrant)
        return out if inside else out[:n].pow(2).sum()
    return program


def _ck_nested_first_layer_outside(m, x, n):  # a reentrant block in a reentrant block, fed by a layer outside
    h = m[0](x)

    def outer(t):
        return checkpoint(lambda u: m[2](m[1](u))[:n].pow(2).sum(), t, use_reentrant=True)

    return checkpoint(outer, h, use_reentrant=True)


def _ck_sequential(reentrant: bool) -> Callable:
    def program(m, x, n):
        return checkpoint_sequential(m, 2, x.clone().requires_grad_(), use_reentrant=reentrant)[:n].pow(2).sum()
    return program


def _save_on_cpu(m, x, n):
    with torch.autograd.graph.save_on_cpu():
        return m(x)[:n].pow(2).sum()


def _save_on_cpu_checkpointed(m, x, n):
    with torch.autograd.graph.save_on_cpu():
        return checkpoint(m, x, use_reentrant=False)[:n].pow(2).sum()


def _own_saved_tensor_hooks(m, x, n):
    store: dict[int, torch.Tensor] = {}

    def pack(t):
        store[len(store)] = t.detach().clone()
        return len(store) - 1

    with torch.autograd.graph.saved_tensors_hooks(pack, store.__getitem__):
        return m(x)[:n].pow(2).sum()


def _save_mm(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op == torch.ops.aten.mm.default else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_checkpoint(m, x, n):  # selective activation checkpointing (a policy on which ops to save)
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    h = m[0](x)
    return checkpoint(lambda t: m[2](m[1](t))[:n].pow(2).sum(), h, use_reentrant=False,
                      context_fn=lambda: create_selective_checkpoint_contexts(_save_mm))


PROGRAMS = {
    "reentrant, slice inside the block": _ck_inside(True),
    "reentrant, slice inside, block finite": _ck_inside_finite_block,
    "non-reentrant, slice inside the block": _ck_inside(False),
    "reentrant, slice outside": _ck_outside(True),
    "non-reentrant, slice outside": _ck_outside(False),
    "nested reentrant": _ck_nested(True, inside=False),
    "nested reentrant, slice inside": _ck_nested(True, inside=True),
    "nested reentrant, first layer outside": _ck_nested_first_layer_outside,
    "nested non-reentrant": _ck_nested(False, inside=False),
    "checkpoint_sequential reentrant": _ck_sequential(True),
    "checkpoint_sequential non-reentrant": _ck_sequential(False),
    "save_on_cpu": _save_on_cpu,
    "save_on_cpu + checkpoint": _save_on_cpu_checkpointed,
    "own saved_tensors_hooks": _own_saved_tensor_hooks,
    "selective checkpoint": _selective_checkpoint,
}


def _backward(how: str, loss: torch.Tensor) -> None:
    if how == "gw.backward":
        gw.backward(loss)
    elif how == "strong_zeros":
        with gw.strong_zeros():
            loss.backward()
    else:
        assert how == "trace"
        with gw.trace(), gw.strong_zeros():
            loss.backward()


def _grads(program: Callable, x: torch.Tensor, n: int, how: str | None, dtype=torch.float64) -> list[torch.Tensor]:
    m = _net(dtype)
    loss = program(m, x, n)
    if how is None:
        loss.backward()
    else:
        _backward(how, loss)
    return [p.grad for p in m.parameters()]


# ---------------------------------------------------------------------------------------------------------
# torch.utils.checkpoint(use_reentrant=True) whose checkpointed block drops the padding itself (the slice inside
# it), fed by a layer outside it: the block's backward is a backward of its own (torch.autograd.backward inside
# CheckpointFunction.backward), which gradwise planned and ran as if outside the strong pass. The padding rows of
# the gradient it returned were ordinary zeros, and the layer below multiplied them by its NaN input: the first
# Linear's weight gradient was all NaN under gw.backward, gw.strong_zeros() and gw.trace(), with no warning
# (plain PyTorch's NaN, kept silently). Fixed: a backward nested in a strong pass that met NaN/Inf runs strong
# and hands the structural zeros of its results to the pass (_engine._nested, _export).
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["gw.backward", "strong_zeros", "trace"])
@pytest.mark.parametrize("name", list(PROGRAMS))
def test_checkpointed_and_offloaded_padding_gives_the_unpadded_gradients(name, how):
    program = PROGRAMS[name]
    got = _grads(program, _data(), N, how)
    want = _grads(program, _data()[:N], N, None)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_checkpointed_genuine_nan_stays(name):
    program = PROGRAMS[name]
    got = _grads(program, _data(genuine=True), N, "gw.backward")
    want = _grads(program, _data(genuine=True)[:N], N, None)
    for g, w in zip(got, want, strict=True):
        assert not w.isfinite().all()
        assert torch.equal(g.isnan(), w.isnan())
        torch.testing.assert_close(g.nan_to_num(), w.nan_to_num(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_checkpointed_finite_data_is_bitwise_pytorch(name):
    program = PROGRAMS[name]
    for dtype in (torch.float32, torch.float64):
        x = _data(padding=None, dtype=dtype)
        got = _grads(program, x, N, "gw.backward", dtype)
        want = _grads(program, x, N, None, dtype)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_reentrant_checkpoint_padding_is_no_finding_of_the_trace():
    m = _net()
    with gw.trace() as report:
        loss = _ck_inside(True)(m, _data(), N)
        with gw.strong_zeros():
            loss.backward()
    assert all(p.grad.isfinite().all() for p in m.parameters())
    assert [f.kind for f in report.findings if f.kind in ("nan", "inf")] == []

    # a genuine NaN: a finding, and no OpaqueBackwardWarning. The trace's own ops on the recomputed forward (the
    # parts of a product) ran under the strong-zero pass below it, which warned that "structural zeros reached
    # aten.addmm.default, which has no strong-zero rule ... the NaN/Inf may be contamination"
    m = _net()
    with gw.trace() as report, warnings.catch_warnings():
        warnings.simplefilter("error", gw.OpaqueBackwardWarning)
        loss = _ck_inside(True)(m, _data(genuine=True), N)
        with gw.strong_zeros():
            loss.backward()
    assert "nan" in [f.kind for f in report.findings]


class _MaskedPooling(nn.Module):
    """Sequences of lengths 5, 3, 2 padded to 5; the checkpointed block pools the valid positions with where()."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(4, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 8))
        self.head = nn.Linear(8, 2)
        self.double()

    def pool(self, h, valid):
        return torch.where(valid[..., None], self.block(h), 0).sum(1) / valid.sum(1, keepdim=True)

    def forward(self, x, valid, reentrant):
        h = self.inp(x)
        pooled = self.pool(h, valid) if reentrant is None else checkpoint(self.pool, h, valid,
                                                                          use_reentrant=reentrant)
        return self.head(pooled).pow(2).sum()


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_masked_pooling_gives_the_gradients_of_the_unpadded_sequences(reentrant):
    lengths = [5, 3, 2]
    x = torch.randn(3, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    valid = torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]
    padded = x.masked_fill(~valid[..., None], float("nan"))
    model = _MaskedPooling()
    gw.backward(model(padded, valid, reentrant))
    ref = _MaskedPooling()
    sum(ref(x[b:b + 1, :n], valid[b:b + 1, :n], None) for b, n in enumerate(lengths)).backward()
    for p, r in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Hooks, autocast (these passed: kept so that they stay so)
# ---------------------------------------------------------------------------------------------------------

def _module_full_backward_hook(m):
    m[2].register_full_backward_hook(lambda mod, gin, gout: (gin[0] * 2,))


def _module_full_backward_pre_hook(m):
    m[2].register_full_backward_pre_hook(lambda mod, gout: (gout[0] * 3,))


def _tensor_hook_on_weight(m):
    m[0].weight.register_hook(lambda g: g * 2)


def _multi_grad_hook(m):
    def forward_hook(mod, inp, out):
        torch.autograd.graph.register_multi_grad_hook((inp[0], out), lambda grads: None)
    m[1].register_forward_hook(forward_hook)


def _post_accumulate_grad_hook(m):
    def double(p):
        p.grad.mul_(2)

    for p in m.parameters():
        p.register_post_accumulate_grad_hook(double)


def _hook_writes_nan_into_a_used_row(m):
    def forward_hook(mod, inp, out):
        out.register_hook(lambda g: g.index_fill(0, torch.tensor([1]), float("nan")))
    m[1].register_forward_hook(forward_hook)


def _hook_writes_inf_into_a_weight_gradient(m):
    m[2].weight.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("inf")))


HOOKS = {f.__name__.lstrip("_"): f for f in (
    _module_full_backward_hook, _module_full_backward_pre_hook, _tensor_hook_on_weight, _multi_grad_hook,
    _post_accumulate_grad_hook, _hook_writes_nan_into_a_used_row, _hook_writes_inf_into_a_weight_gradient)}


@pytest.mark.parametrize("how", ["gw.backward", "strong_zeros", "trace"])
@pytest.mark.parametrize("name", list(HOOKS))
def test_hooks_see_and_give_the_unpadded_gradients(name, how):
    def grads(x, how):
        m = _net()
        HOOKS[name](m)
        loss = m(x)[:N].pow(2).sum()
        if how is None:
            loss.backward()
        else:
            _backward(how, loss)
        return [p.grad for p in m.parameters()]

    for g, w in zip(grads(_data(), how), grads(_data()[:N], None), strict=True):
        assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.isinf(), w.isinf())  # a hook's NaN stays
        torch.testing.assert_close(g.nan_to_num(0, 0, 0), w.nan_to_num(0, 0, 0), rtol=1e-12, atol=1e-12)


def _autocast_grads(x: torch.Tensor, scale: float, strong: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3))
    with torch.autocast("cpu", torch.bfloat16):
        loss = (m(x)[:N].float() * scale).pow(2).sum()
    gw.backward(loss) if strong else loss.backward()
    return [p.grad for p in m.parameters()]


@pytest.mark.parametrize("scale", [1.0, 1e30])  # 1e30: the loss overflows, a genuine Inf a GradScaler must see
def test_autocast_bf16_padding_gives_the_unpadded_gradients_bitwise(scale):
    got = _autocast_grads(_data(dtype=torch.float32), scale, strong=True)
    want = _autocast_grads(_data(dtype=torch.float32)[:N], scale, strong=False)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.isinf(), w.isinf())
        assert torch.equal(g.nan_to_num(0, 0, 0), w.nan_to_num(0, 0, 0))
    found = torch.zeros(1)
    torch._amp_foreach_non_finite_check_and_unscale_([g.clone() for g in got], found, torch.ones(1))
    assert bool(found) == (scale > 1)


# ---------------------------------------------------------------------------------------------------------
# Lightning: a LightningModule whose reentrant-checkpointed block drops the padding (the case above) had every
# step skipped by the callback (the first layer's weight gradient NaN at every step).
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="lightning is not installed")
@pytest.mark.filterwarnings("ignore:.*LeafSpec.* is deprecated")
@pytest.mark.filterwarnings("ignore:.*does not have many workers")
@pytest.mark.filterwarnings("ignore:.*smaller than the logging interval")
def test_lightning_reentrant_checkpoint_trains_as_on_unpadded_data(tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from gradwise.integrations.lightning import GradwiseCallback

    data = torch.randn(6, 6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    data[:, N:] = float("nan")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _net()

        def training_step(self, x, batch_idx):
            h = self.net[0](x)
            return checkpoint(lambda t: self.net[2](self.net[1](t))[:, :N].pow(2).mean(), h, use_reentrant=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module, callback = Module(), GradwiseCallback()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, callbacks=[callback], default_root_dir=str(tmp_path),
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's own advice on this tiny CPU run
        trainer.fit(module, DataLoader(data, batch_size=2))

    ref = _net()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for x in DataLoader(data[:, :N], batch_size=2):
        opt.zero_grad()
        ref(x).pow(2).mean().backward()
        opt.step()
    assert callback.skipped_steps == []
    for p, r in zip(module.net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# gw.watch() over a custom Function whose backward recomputes its block and calls torch.autograd.grad (a
# hand-written checkpoint): the replay of the first NaN step met torch's _engine_run_backward reading its logging
# level inside that nested backward and took it for a hook of the user's. The step went unexplained, the note
# saying "its backward runs your hook Logger.getEffectiveLevel ..., which a replay would run a second time".
# ---------------------------------------------------------------------------------------------------------

class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, block, *params):
        ctx.block = block
        ctx.save_for_backward(h, *params)
        with torch.no_grad():
            return block(h)

    @staticmethod
    def backward(ctx, grad):
        h, *params = ctx.saved_tensors
        with torch.enable_grad():
            h = h.detach().requires_grad_()
            grads = torch.autograd.grad(ctx.block(h), (h, *params), grad)
        return (grads[0], None, *grads[1:])


def _hand_written_checkpoint(m, x, n):
    return _Recompute.apply(m[0](x), lambda t: m[2](m[1](t))[:n].pow(2).sum(), *m[2].parameters())


def test_hand_written_checkpoint_gives_the_unpadded_gradients():
    got = _grads(_hand_written_checkpoint, _data(), N, "gw.backward")
    want = _grads(_hand_written_checkpoint, _data()[:N], N, None)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_watch_explains_a_nan_step_through_a_custom_backward_calling_autograd_grad():
    m = _net()
    with gw.watch() as report:
        for step in range(2):
            m.zero_grad()
            loss = _hand_written_checkpoint(m, _data(genuine=step == 1), N)
            with gw.strong_zeros():
                loss.backward()
    notes = " ".join(report.notes)
    assert "getEffectiveLevel" not in notes and "could not be explained" not in notes, notes
    assert "that step was explained" in notes
    assert [f.kind for f in report.findings] and all(f.kind == "nan" for f in report.findings)


# ---------------------------------------------------------------------------------------------------------
# The reentrant checkpoint above under DDP (static_graph, which reentrant checkpointing needs) and FSDP2, on 2 gloo
# processes (tests/test_distributed.py's harness); rank 1 pads with NaN, rank 0 does not. Before the fix the
# first layer's weight gradient was NaN on both ranks (rank 1's padding, all-reduced or reduce-scattered).
# ---------------------------------------------------------------------------------------------------------

class _ReentrantBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _net()

    def forward(self, x):
        return _ck_inside(True)(self.net, x, N)


def _rank_data(rank: int, padding: bool = True) -> torch.Tensor:
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + rank))
    if rank == 1:
        x[N:] = float("nan")
    return x if padding else x[:N]


def _reentrant_grads(rank: int, wrap: Callable) -> list[torch.Tensor]:
    block = _ReentrantBlock()
    model = wrap(block)
    loss = model(_rank_data(rank))
    with gw.strong_zeros():
        loss.backward()
    return [(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach() for p in block.parameters()]


def check_ddp_reentrant_checkpoint(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    return _reentrant_grads(rank, lambda block: DDP(block, static_graph=True))


def check_fsdp2_reentrant_checkpoint(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def wrap(block):
        mesh = init_device_mesh("cpu", (world,))
        fully_shard(block.net[0], mesh=mesh)
        fully_shard(block.net[2], mesh=mesh)
        return fully_shard(block, mesh=mesh)

    return _reentrant_grads(rank, wrap)


def check_fsdp2_guard_raise_reentrant_checkpoint(rank, world):
    """gw.nonfinite_guard(policy="raise") on FSDP2 with the reentrant checkpoint above: at step 1 rank 1 writes a
    NaN into the checkpointed block's weight gradient (a tensor hook on FSDP's unsharded parameter). The guard
    decided at the end of the block's own backward (a nested graph task) and raised there, halfway through the
    outer backward: the first layer's gradient was never computed, FSDP's end-of-backward never ran, and at
    every later step the parameters were plain unsharded tensors with no reduce-scatter (nothing guarded, ranks
    drifting apart silently); guard.steps counted two per backward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    block = _ReentrantBlock()
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(block.net[0], mesh=mesh)
    fully_shard(block.net[2], mesh=mesh)
    fully_shard(block, mesh=mesh)
    guard = gw.nonfinite_guard(block, policy="raise")
    inject = {"on": False}

    def forward_hook(module, inputs, output):  # the unsharded weight of this forward (and its recomputation)
        if module.weight.requires_grad and torch.is_grad_enabled():
            module.weight.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), float("nan"))
                                        if inject["on"] else g)

    block.net[2].register_forward_hook(forward_hook)
    steps = []
    for step in range(3):
        inject["on"] = step == 1 and rank == 1
        block.zero_grad(set_to_none=True)
        loss = block(_rank_data(rank))
        raised = False
        try:
            with gw.strong_zeros():
                loss.backward()
        except gw.NonfiniteGradientError:
            raised = True
        steps.append({"raised": raised, "steps": guard.steps,
                      "sharded": all(type(p).__name__ == "DTensor" for p in block.parameters()),
                      "grads": all(p.grad is not None for p in block.parameters())})
    return steps


CHECKS = {"reentrant": [check_ddp_reentrant_checkpoint, check_fsdp2_reentrant_checkpoint,
                        check_fsdp2_guard_raise_reentrant_checkpoint]}


@pytest.fixture(scope="module")
def reentrant_group(tmp_path_factory):
    from test_distributed import _run_group

    return _run_group("reentrant", 2, tmp_path_factory.mktemp("reentrant"), module=__name__)


@pytest.mark.slow(reason="spawns 2 gloo processes (~10 s on 2 cores)")
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("check", ["check_ddp_reentrant_checkpoint", "check_fsdp2_reentrant_checkpoint"])
def test_reentrant_checkpoint_under_ddp_and_fsdp2_gives_the_unpadded_gradients(reentrant_group, check):
    from test_distributed import _per_rank

    ref = _ReentrantBlock()
    (sum(ref(_rank_data(r, padding=False)) for r in range(2)) / 2).backward()
    for got in _per_rank(reentrant_group, check):
        for g, p in zip(got, ref.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# The callbacks' NaN/Inf check on a sparse gradient (nn.Embedding(sparse=True)): torch.isfinite has no sparse
# kernel, so every optimizer step raised NotImplementedError ("Could not run 'aten::ne.Scalar' with arguments from
# the 'SparseCPU' backend") from inside the callback.
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="lightning is not installed")
@pytest.mark.filterwarnings("ignore:.*LeafSpec.* is deprecated")
@pytest.mark.filterwarnings("ignore:.*does not have many workers")
@pytest.mark.filterwarnings("ignore:.*smaller than the logging interval")
def test_lightning_callback_checks_sparse_embedding_gradients(tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from gradwise.integrations.lightning import GradwiseCallback

    ids = torch.randint(0, 10, (6, 3), generator=torch.Generator().manual_seed(0))
    scale = torch.ones(6, dtype=torch.float64)
    scale[2] = float("nan")  # step 1 (batches of 2): a NaN the loss uses, reaching the embedding's sparse gradient

    def net():
        torch.manual_seed(0)
        return nn.ModuleDict({"emb": nn.Embedding(10, 4, sparse=True), "lin": nn.Linear(4, 1)}).double()

    def loss_of(modules, batch):
        i, s = batch
        return modules["lin"](modules["emb"](i) * s[:, None, None]).pow(2).mean()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net()

        def training_step(self, batch, batch_idx):
            return loss_of(self.net, batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module, callback = Module(), GradwiseCallback(strong_zeros=False)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, callbacks=[callback], default_root_dir=str(tmp_path),
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's own advice on this tiny CPU run
        trainer.fit(module, DataLoader(list(zip(ids, scale, strict=True)), batch_size=2))
    assert callback.skipped_steps == [1]

    ref = net()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step, batch in enumerate(DataLoader(list(zip(ids, scale, strict=True)), batch_size=2)):
        opt.zero_grad()
        loss_of(ref, batch).backward()
        if step != 1:
            opt.step()
    for p, r in zip(module.net.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p.detach(), r.detach())


@pytest.mark.slow(reason="spawns 2 gloo processes (~10 s on 2 cores)")
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_fsdp2_guard_raises_after_the_whole_backward_of_a_reentrant_checkpoint(reentrant_group):
    from test_distributed import _per_rank

    for got in _per_rank(reentrant_group, "check_fsdp2_guard_raise_reentrant_checkpoint"):
        assert got == [{"raised": raised, "steps": n, "sharded": True, "grads": True}
                       for raised, n in ((False, 1), (True, 2), (False, 3))]
