"""An RNN-T joiner (encoder and predictor features -> tanh -> Linear -> logits (B, T, U+1, V)) on a padded batch
whose padded frames and tokens hold NaN, under two transducer losses:

- a PyTorch one (the forward-variable recursion over each utterance's own slice): strong zeros alone remove
  the contamination;
- a kernel-like one that computes its gradient in the forward and returns ``saved * dy`` in the backward, with
  ordinary zeros past the lengths (torchaudio's ``rnnt_loss``, warp-rnnt): exact only behind
  ``gradwise.integrations.torchaudio.rnnt_loss`` / ``gw.mark_unused``.

The reference is the same model on each utterance alone, without its padding (float64). torchaudio itself is
used where it loads (its 2.11 wheel does not load against torch 2.13: that test is skipped with the reason).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

import gradwise as gw
from gradwise._strong_zeros._planning import _plan
from gradwise.integrations import torchaudio as gw_torchaudio

nan = float("nan")
B, T, U, V, F, H = 3, 6, 3, 5, 4, 8
LOGIT_LENGTHS = [6, 4, 2]
TARGET_LENGTHS = [3, 1, 2]


def transducer_nll(logits: torch.Tensor, targets: torch.Tensor, blank: int) -> torch.Tensor:
    """-log P(targets | logits) of one utterance, logits (frames, tokens + 1, classes), by the forward variables."""
    lp = logits.log_softmax(-1)
    frames, positions, _ = lp.shape
    alpha: list[list[torch.Tensor]] = []
    for t in range(frames):
        row: list[torch.Tensor] = []
        for u in range(positions):
            if t == 0 and u == 0:
                row.append(lp.new_zeros(()))
                continue
            terms = []
            if t > 0:
                terms.append(alpha[t - 1][u] + lp[t - 1, u, blank])
            if u > 0:
                terms.append(row[u - 1] + lp[t, u - 1, targets[u - 1]])
            row.append(torch.logsumexp(torch.stack(terms), 0))
        alpha.append(row)
    return -(alpha[-1][-1] + lp[-1, -1, blank])


class Joiner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc, self.pred, self.out = nn.Linear(F, H), nn.Linear(F, H), nn.Linear(H, V)

    def forward(self, frames: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.enc(frames)[:, :, None] + self.pred(tokens)[:, None]))


def _kernel_like_rnnt(logits, targets, logit_lengths, target_lengths, blank=-1, clamp=-1, reduction="mean",
                      fused_log_softmax=True):
    """torchaudio.functional.rnnt_loss's shape: costs and the logits' gradient from one forward kernel (zeros
    past the lengths, never read there), backward ``saved * dy``."""
    costs = _KernelRnnt.apply(logits, targets, logit_lengths, target_lengths, blank % logits.shape[-1])
    return costs.mean() if reduction == "mean" else costs.sum() if reduction == "sum" else costs


class _KernelRnnt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, logit_lengths, target_lengths, blank):
        grads = torch.zeros_like(logits)
        costs = []
        for b in range(logits.shape[0]):
            t, u = int(logit_lengths[b]), int(target_lengths[b])
            with torch.enable_grad():
                piece = logits[b, :t, :u + 1].detach().requires_grad_()
                cost = transducer_nll(piece, targets[b, :u], blank)
                grads[b, :t, :u + 1] = torch.autograd.grad(cost, piece)[0]
            costs.append(cost.detach())
        ctx.save_for_backward(grads)
        return torch.stack(costs)

    @staticmethod
    def backward(ctx, dy):
        (grads,) = ctx.saved_tensors
        return grads * dy.view(-1, 1, 1, 1), None, None, None, None


@pytest.fixture
def stand_in_torchaudio(monkeypatch):
    """A torchaudio whose functional.rnnt_loss is the kernel-like loss (the real one does not load here)."""
    functional = types.ModuleType("torchaudio.functional")
    functional.rnnt_loss = _kernel_like_rnnt
    package = types.ModuleType("torchaudio")
    package.functional = functional
    monkeypatch.setitem(sys.modules, "torchaudio", package)
    monkeypatch.setitem(sys.modules, "torchaudio.functional", functional)
    return functional


def batch(fill: float = nan, used_nan: bool = False):
    torch.manual_seed(0)
    model = Joiner().double()
    frames = torch.randn(B, T, F, dtype=torch.float64)
    tokens = torch.randn(B, U + 1, F, dtype=torch.float64)
    for b in range(B):
        frames[b, LOGIT_LENGTHS[b]:] = fill
        tokens[b, TARGET_LENGTHS[b] + 1:] = fill
    if used_nan:
        frames[0, 1, 0] = nan  # a frame the loss reads
    targets = torch.randint(0, V - 1, (B, U))
    lengths = torch.tensor(LOGIT_LENGTHS, dtype=torch.int32), torch.tensor(TARGET_LENGTHS, dtype=torch.int32)
    return model, frames, tokens, targets, lengths


def pytorch_loss(model, frames, tokens, targets, lengths):
    logits = model(frames, tokens)
    return sum(transducer_nll(logits[b, :int(lengths[0][b]), :int(lengths[1][b]) + 1],
                              targets[b, :int(lengths[1][b])], V - 1) for b in range(B)) / B


def reference_grads(model, frames, tokens, targets, lengths):
    """Each utterance alone, without its padding."""
    total = 0
    for b in range(B):
        t, u = int(lengths[0][b]), int(lengths[1][b])
        logits = model(frames[b:b + 1, :t], tokens[b:b + 1, :u + 1])
        total = total + transducer_nll(logits[0], targets[b, :u], V - 1)
    return torch.autograd.grad(total / B, list(model.parameters()))


def assert_equal_to_reference(got, expected):
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_pytorch_transducer_loss_on_a_padded_batch_equals_each_utterance_alone():
    model, frames, tokens, targets, lengths = batch()
    params = list(model.parameters())
    loss = pytorch_loss(model, frames, tokens, targets, lengths)
    assert loss.isfinite()
    plain = torch.autograd.grad(loss, params, retain_graph=True)
    assert not all(g.isfinite().all() for g in plain), "the padding should contaminate plain PyTorch"
    assert_equal_to_reference(gw.grad(loss, params), reference_grads(model, frames, tokens, targets, lengths))


def test_kernel_like_loss_keeps_the_nan_without_the_declaration(stand_in_torchaudio):
    """Its backward holds ordinary zeros past the lengths: nothing tells them from computed ones, so the NaN
    stays (visible, never hidden); the integration is the way out (next test)."""
    model, frames, tokens, targets, lengths = batch()
    loss = stand_in_torchaudio.rnnt_loss(model(frames, tokens), targets, *lengths)
    assert not all(g.isfinite().all() for g in gw.grad(loss, list(model.parameters())))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_integration_rnnt_loss_equals_each_utterance_alone(stand_in_torchaudio, reduction):
    model, frames, tokens, targets, lengths = batch()
    logits = model(frames, tokens)
    loss = gw_torchaudio.rnnt_loss(logits, targets, *lengths, reduction=reduction)
    assert torch.equal(loss, stand_in_torchaudio.rnnt_loss(logits, targets, *lengths, reduction=reduction))
    got = gw.grad(loss, list(model.parameters()))
    expected = reference_grads(model, frames, tokens, targets, lengths)
    scale = B if reduction == "sum" else 1
    assert_equal_to_reference(got, [e * scale for e in expected])


def test_integration_under_the_strong_zeros_block(stand_in_torchaudio):
    model, frames, tokens, targets, lengths = batch()
    with gw.strong_zeros():
        gw_torchaudio.rnnt_loss(model(frames, tokens), targets, *lengths).backward()
    assert_equal_to_reference([p.grad for p in model.parameters()],
                              reference_grads(model, frames, tokens, targets, lengths))


@pytest.mark.parametrize("loss_kind", ["pytorch", "kernel"])
def test_a_nan_in_a_used_frame_stays(stand_in_torchaudio, loss_kind):
    model, frames, tokens, targets, lengths = batch(used_nan=True)
    if loss_kind == "pytorch":
        loss = pytorch_loss(model, frames, tokens, targets, lengths)
    else:
        loss = gw_torchaudio.rnnt_loss(model(frames, tokens), targets, *lengths)
    assert loss.isnan()
    grads = gw.grad(loss, list(model.parameters()))
    assert all(g.isnan().any() for g in grads[:2] + grads[4:]), "a NaN the loss reads must stay"


def test_finite_data_is_bitwise_pytorchs(stand_in_torchaudio):
    model, frames, tokens, targets, lengths = batch(fill=0.5)
    params = list(model.parameters())
    plain = torch.autograd.grad(stand_in_torchaudio.rnnt_loss(model(frames, tokens), targets, *lengths), params)
    declared = gw_torchaudio.rnnt_loss(model(frames, tokens), targets, *lengths)
    # the plan knows the declaration's node: finite data takes the plain path (the kernel's node is a custom
    # Function gradwise knows nothing about, so one checked pass runs: 'check')
    assert _plan([declared], ()) == "check"
    assert _plan([gw.mark_unused(frames.requires_grad_() * 2, frames.isnan()).sum()], ()) == "plain"
    for g, p in zip(gw.grad(declared, params), plain, strict=True):
        assert torch.equal(g, p)


def test_a_wrong_declaration_raises():
    """Declaring elements unused that the code reads would zero their gradient: it raises instead."""
    x = torch.randn(4, 3, requires_grad=True)
    y = gw.mark_unused(x * 2, torch.tensor([[False], [False], [True], [True]]))
    with pytest.raises(gw.UnusedReadError, match="reads them"):
        gw.grad(y[:3].sum(), x)
    y = gw.mark_unused(x * 2, torch.tensor([[False], [False], [True], [True]]))
    with pytest.raises(gw.UnusedReadError):
        torch.autograd.grad(y.sum(), x)


def test_mark_unused_values_and_plain_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    unused = torch.tensor([[False], [False], [True], [True]])
    y = gw.mark_unused(x, unused)
    assert torch.equal(y, x) and y.data_ptr() == x.data_ptr()
    (g,) = torch.autograd.grad(y[:2].sum(), x)
    assert torch.equal(g, torch.tensor([[1.0] * 3] * 2 + [[0.0] * 3] * 2))
    z = torch.randn(3)
    assert gw.mark_unused(z, torch.tensor([True, False, False])) is z  # nothing to differentiate


@pytest.mark.parametrize(("args", "error", "match"), [
    ((torch.ones(3), [True, False, False]), TypeError, "two tensors"),
    ((torch.ones(3), torch.tensor([1, 0, 0])), TypeError, "bool tensor"),
    ((torch.ones(3), torch.ones(4, dtype=torch.bool)), ValueError, "does not broadcast"),
    ((torch.ones(3), torch.ones(2, 3, dtype=torch.bool)), ValueError, "larger one"),
])
def test_mark_unused_refuses_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        gw.mark_unused(*args)


def test_rnnt_unused_marks_frames_and_tokens_past_the_lengths():
    logits = torch.zeros(2, 4, 3, 5)
    unused = gw_torchaudio.rnnt_unused(logits, torch.tensor([4, 2]), torch.tensor([2, 0]))
    assert unused.shape == (2, 4, 3, 1)
    assert not unused[0].any()
    assert unused[1, 2:].all() and unused[1, :2, 1:].all() and not unused[1, :2, 0].any()
    with pytest.raises(ValueError, match="logit_lengths"):
        gw_torchaudio.rnnt_unused(logits, torch.tensor([4.0, 2.0]), torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="frames"):
        gw_torchaudio.rnnt_unused(logits[0], torch.tensor([4]), torch.tensor([2]))


def test_without_a_loadable_torchaudio_the_error_names_the_way_out(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchaudio", None)
    monkeypatch.setitem(sys.modules, "torchaudio.functional", None)
    with pytest.raises(ImportError, match="mark_unused"):
        gw_torchaudio.rnnt_loss(torch.zeros(1, 2, 2, 3), torch.zeros(1, 1, dtype=torch.int32),
                                torch.tensor([2], dtype=torch.int32), torch.tensor([1], dtype=torch.int32))


def test_real_torchaudio_rnnt_loss():
    try:
        import torchaudio.functional as taf
    except (ImportError, OSError) as e:
        pytest.skip(f"torchaudio does not load with this torch: {e}")
    model, frames, tokens, targets, lengths = batch()
    model, frames, tokens = model.float(), frames.float(), tokens.float()
    logits = model(frames, tokens)
    loss = gw_torchaudio.rnnt_loss(logits, targets.int(), *lengths)
    assert torch.equal(loss, taf.rnnt_loss(logits, targets.int(), *lengths))
    got = gw.grad(loss, list(model.parameters()))
    expected = reference_grads(model, frames, tokens, targets, lengths)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


class _ScaledSaved(torch.autograd.Function):
    """The kernel shape in small: reads rows 0 and 1, saves a gradient that is 0 for row 2."""

    @staticmethod
    def forward(h):
        return h[:2].sum()

    @staticmethod
    def setup_context(ctx, inputs, output):
        h = inputs[0]
        ctx.save_for_backward(torch.tensor([[1.0], [1.0], [0.0]], dtype=h.dtype).expand_as(h).clone())

    @staticmethod
    def backward(ctx, dy):
        return ctx.saved_tensors[0] * dy


def _small_case():
    torch.manual_seed(0)
    lin = nn.Linear(4, 2)
    x = torch.randn(3, 4)
    expected = torch.autograd.grad(lin(x[:2]).sum(), lin.weight)[0]
    x[2] = nan
    return lin, x, torch.tensor([[False], [False], [True]]), expected


# dynamo instantiates torch.autograd.Function to trace any custom Function's ctx (torch 2.13), and warns about it
@pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")
def test_declaration_inside_a_compiled_function():
    lin, x, unused, expected = _small_case()
    f = torch.compile(lambda x: _ScaledSaved.apply(gw.mark_unused(lin(x), unused)), backend="aot_eager",
                      fullgraph=True)
    with gw.strong_zeros():
        f(x).backward()
    torch.testing.assert_close(lin.weight.grad, expected)


def test_under_torch_func_a_wrong_declaration_keeps_the_gradient():
    """No value can be read under a transform: an element whose gradient contradicts the declaration keeps it."""
    unused = torch.tensor([False, True, False])
    right = torch.func.grad(lambda x: gw.mark_unused(x * 2, unused)[[0, 2]].sum())(torch.ones(3))
    wrong = torch.func.vmap(torch.func.grad(lambda x: gw.mark_unused(x * 2, unused).sum()))(torch.ones(2, 3))
    assert torch.equal(right, torch.tensor([2.0, 0.0, 2.0]))
    assert torch.equal(wrong, torch.full((2, 3), 2.0))


def test_the_trace_reads_the_declaration_as_the_discarding_op(stand_in_torchaudio):
    """A plain backward under gw.trace(): behind the declaration every finding is contamination, discarded by
    gw.mark_unused at the line that declared it; without it, the fix names the declaration."""
    model, frames, tokens, targets, lengths = batch()
    with gw.trace() as report:
        gw_torchaudio.rnnt_loss(model(frames, tokens), targets, *lengths).backward()
    assert report.findings and not report.of_kind("nan", "inf"), str(report)
    here = __file__.rsplit("/", 1)[-1]
    for f in report.of_kind("contamination"):
        assert f.discarded_op == "gw.mark_unused" and here in f.discarded_location, str(report)
    model.zero_grad()
    with gw.trace() as report:
        stand_in_torchaudio.rnnt_loss(model(frames, tokens), targets, *lengths).backward()
    assert any("gw.mark_unused" in f.fix for f in report.of_kind("contamination")), str(report)


def test_the_check_elementwise_and_per_broadcast_group():
    """A full-shape declaration is checked per element; a broadcast one per group (one max-norm per row of
    classes): a group whose gradient holds NaN counts as the kernel's own contamination, which it removes."""
    x = torch.randn(3, 4, requires_grad=True)
    full = torch.zeros(3, 4, dtype=torch.bool)
    full[2, 1] = True
    with pytest.raises(gw.UnusedReadError):
        torch.autograd.grad(gw.mark_unused(x * 1, full).sum(), x)
    y = gw.mark_unused(x * 1, torch.tensor([[False], [False], [True]]))
    seed = torch.ones(3, 4)
    seed[2] = torch.tensor([0.0, nan, 0.0, 0.0])  # the kernel's NaN in a row it did not read
    (g,) = torch.autograd.grad(y, x, seed)
    assert torch.equal(g, torch.tensor([[1.0] * 4, [1.0] * 4, [0.0] * 4]))


def test_watch_explains_the_step_with_the_declaration(stand_in_torchaudio):
    """gw.watch() explains the first non-finite step from its kept graph: the declaration's node is named there
    too, so that step's findings are contamination as under gw.trace()."""
    model, frames, tokens, targets, lengths = batch()
    with gw.watch() as report:
        gw_torchaudio.rnnt_loss(model(frames, tokens), targets, *lengths).backward()
    assert report.findings and not report.of_kind("nan", "inf"), str(report)
    assert all(f.discarded_op == "gw.mark_unused" for f in report.of_kind("contamination")), str(report)
