"""Hunt for wrong or missing explanations in the trace/watch/CLI, round 28: a differential checker ran generated
programs (slices, where, masked_fill, index_select, gather, scatter, cat/stack, matmul, softmax, layer_norm, conv,
pool, SDPA, a padded GRU, cross_entropy with ignore_index; inside modules with hooks, checkpoint, torch.compile,
TorchScript, custom Functions and torch.library ops) with a NaN/Inf injected at a chosen place, against the ground
truth of the gradients (plain PyTorch against gw.grad, elementwise). Each defect it found is a focused test here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gradwise as gw


def _leaf_truth(f, params: list[torch.Tensor]) -> tuple[set, set]:
    """Per parameter index: (contamination: P non-finite somewhere G is finite, genuine: G non-finite)."""
    p = torch.autograd.grad(f(), params)
    g = gw.grad(f(), params)
    return ({i for i, (a, b) in enumerate(zip(p, g, strict=True)) if bool((~a.isfinite() & b.isfinite()).any())},
            {i for i, b in enumerate(g) if not b.isfinite().all()})


@pytest.mark.parametrize("covered", [True, False])
def test_contamination_born_at_two_ops_beside_a_used_nan_is_judged_as_one(covered):
    """cross_entropy(sqrt(lin(x).exp() * k).scatter(1, s, 0), tgt, ignore_index): row 0 is ignored (its NaN
    makes contamination in the log_softmax backward), row 1's NaN is overwritten by the scatter (contamination born
    at sqrt's backward, where the scatter's zero meets it), rows 2 and 3 hold NaN the loss uses, one in each column:
    every gradient element is NaN under gw.grad too, so no contamination reaches a gradient. The sqrt backward's
    fresh contamination joined the genuine side of the ignored row's split, so the matmul to the weight passed it
    on: 'contamination ... reaches lin.bias, lin.weight' beside the genuine NaN, against gw.grad (found on a
    generated program with 2 x 5 tokens). Without row 3's NaN, column 1 (weight row 1, bias 1) holds only
    contamination, still told."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(2, 2)
    x = torch.randn(4, 2)
    k = torch.tensor([[-1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, -1.0 if covered else 1.0]])  # sqrt(-1) = NaN
    s = torch.tensor([[1], [1], [1], [0]])
    tgt = torch.tensor([-100, 0, 0, 1])
    f = lambda: F.cross_entropy(torch.sqrt(lin(x).exp() * k).scatter(1, s, 0.0), tgt, ignore_index=-100)
    params = list(lin.parameters())
    contaminated, genuine = _leaf_truth(f, params)
    assert genuine == {0, 1} and contaminated == (set() if covered else {0, 1})
    with gw.trace() as report:
        f().backward()
    said = {n for f in report.of_kind("contamination") for n in f.reaches}
    assert said == (set() if covered else {"lin.bias", "lin.weight"}), str(report)
    assert {n for f in report.of_kind("nan") for n in f.reaches} == {"lin.bias", "lin.weight"}, str(report)


def _packed_gru(nan_at):
    torch.manual_seed(0)
    lin, gru = torch.nn.Linear(4, 4), torch.nn.GRU(4, 4, batch_first=True)
    x = torch.randn(2, 5, 4)
    for at in nan_at:
        x[at] = float("nan")

    def f():
        packed = torch.nn.utils.rnn.pack_padded_sequence(lin(x), torch.tensor([5, 3]), batch_first=True,
                                                         enforce_sorted=False)
        return torch.nn.utils.rnn.pad_packed_sequence(gru(packed)[0], batch_first=True, total_length=5)[0].sum()

    return f, {"lin": lin, "gru": gru}


@pytest.mark.parametrize("case", ["padding", "padding and a used NaN"])
def test_a_packed_sequences_padding_is_contamination_as_strong_zeros_say(case):
    """lin(x) packed with lengths [5, 3], a GRU, unpacked: pack_padded_sequence's backward makes a zeros buffer and
    copy_s each step's sensitivity into a view of it; the trace marked the views as sensitivities, not the buffer,
    so the flow stopped there and what followed was read as a forward value. NaN in the padding of sequence 1
    (which the GRU never reads) was told 'genuine NaN: the output depends on it' reaching lin.weight, where
    gw.grad removes it (silent); with a used NaN too, the used NaN reached only the GRU's parameters, and lin.bias
    got a 'downstream' finding (a gradient used as a value) that no optimizer step made."""
    f, mods = _packed_gru([(1, 4)] if case == "padding" else [(1, 4), (0, 1, 2)])
    named = [(f"{m}.{n}", p) for m, mod in mods.items() for n, p in mod.named_parameters()]
    contaminated, genuine = _leaf_truth(f, [p for _, p in named])
    with gw.trace() as report:
        f().backward()
    said = lambda kinds: {n for f in report.findings if f.kind in kinds and not f.downstream for n in f.reaches}
    assert said(("contamination",)) == {named[i][0] for i in contaminated}, str(report)
    assert said(("nan", "inf")) == {named[i][0] for i in genuine}, str(report)
    assert not [f for f in report.findings if f.downstream], str(report)


def _checkpointed(reentrant: bool):
    import torch.utils.checkpoint as cp

    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 3)
    with torch.no_grad():
        lin.bias.fill_(5.0)  # relu passes columns 0 and 1
    x = torch.rand(4, 3)
    k = torch.tensor([1.0, 0.0, 1.0])

    def block(h):
        h = torch.relu(h * torch.tensor([1.0, 1.0, 0.0]))  # column 2 at relu's kink
        return torch.log(h.exp() * k)  # column 1: log(0)

    return lambda: cp.checkpoint(block, lin(x), use_reentrant=reentrant)[:, ::2].sum(), lin


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_reentrant_checkpoints_recomputed_forward_has_its_lines(reentrant):
    """A reentrant torch.utils.checkpoint runs its forward again inside its backward, with grad on: the trace took
    those ops for backward ops. Its NaN was born 'at' the backward call's line (the contamination 'aten.div at
    test.py:<the backward() line>', not the log's), its reaches named the checkpoint's own detached input
    ('tensor[4, 3]' beside lin.weight) and the relu's kink inside the block was not reported at all. Now the
    recomputed forward is recorded as a forward, as the non-reentrant checkpoint's first forward is."""
    f, lin = _checkpointed(reentrant)
    with gw.trace() as report:
        f().backward()
    assert not lin.weight.grad.isfinite().all()  # (lin names the parameters in the report)
    log_line = _checkpointed.__code__.co_firstlineno + 12
    [c] = report.of_kind("contamination")
    assert c.born_location.endswith(f"test_hunt_explain.py:{log_line}"), str(report)
    assert c.location.endswith(f"test_hunt_explain.py:{log_line}"), str(report)
    assert c.reaches == ["lin.bias", "lin.weight"], str(report)
    [k] = report.of_kind("kink")
    assert k.op == "aten.relu" and k.location.endswith(f"test_hunt_explain.py:{log_line - 1}"), str(report)
    assert k.reaches == ["lin.bias", "lin.weight"], str(report)


def test_a_convolutions_weight_gradient_meeting_a_saved_inf_is_explained():
    """exp overflows (Inf) before a conv; the conv makes NaN of it (inf - inf), and layer_norm's backward sends
    that NaN back as a sensitivity weighted by w (some weights 0). In convolution_backward the NaN sensitivity
    meets the saved Inf input: the trace evaluated the op on indicators and took its first result (grad_input,
    2 x 4 x 5) for the output it was explaining (grad_weight, 4 x 4 x 3), without the op's outputs to match. The
    explanation failed ('Notes: a value: not explained (RuntimeError: The size of tensor a (5) must match the
    size of tensor b (3) ...)') and conv.bias got 'genuine NaN: unknown at <unknown> ... the trace did not
    follow how it became so' instead of the exp's finding. (Where the two shapes agree the wrong output's mask
    was used silently.)"""
    torch.manual_seed(0)
    lin, conv, ln = torch.nn.Linear(4, 4), torch.nn.Conv1d(4, 4, 3, padding=1), torch.nn.LayerNorm(4)
    x = torch.randn(2, 5, 4)
    k = torch.where(torch.rand(2, 5, 4) < 0.2, 100.0, 0.0)
    w = torch.randn(2, 5, 4) * (torch.rand(2, 5, 4) > 0.3)
    f = lambda: (ln(conv(torch.exp(lin(x) + k).transpose(1, 2)).transpose(1, 2)) * w).sum()
    named = [(f"{m}.{n}", p) for m, mod in (("lin", lin), ("conv", conv), ("ln", ln))
             for n, p in mod.named_parameters()]
    contaminated, genuine = _leaf_truth(f, [p for _, p in named])
    with gw.trace() as report:
        f().backward()
    assert not report.notes and not contaminated, str(report)
    assert [(f.kind, f.born_op) for f in report.findings] == [("nan", "aten.exp")], str(report)
    assert set(report.findings[0].reaches) == {named[i][0] for i in genuine}, str(report)


@pytest.mark.parametrize("packed", [False, True])
def test_a_discarded_time_step_beside_a_used_one_through_a_gru_is_no_contamination(packed):
    """sqrt(gru(lin(x)).exp() * k)[:, :3].sum() with sqrt(-1) at a kept time step (1) and at discarded ones (4):
    the GRU's backward carries the discarded step's NaN back through every earlier step and mixes it with the
    used one's, so gw.grad's gradients are NaN wherever PyTorch's are. The contamination filled whole tensors (no
    split followed it) and reached every parameter beside the genuine NaN: 'contamination ... reaches gru.*,
    lin.*', against gw.grad. Packed (lengths 5, 3), the GRU's backward copy_s each step's sensitivity into one
    buffer and the buffer kept only the last write's provenance: the used NaN reached the GRU only, and lin got
    the contamination alone. A gradient that strong zeros' pass holds non-finite wherever it is now takes no
    contamination beside its genuine NaN, and writes into parts of one buffer add up their provenance."""
    torch.manual_seed(0)
    lin, gru = torch.nn.Linear(4, 4), torch.nn.GRU(4, 4, batch_first=True)
    x = torch.randn(2, 5, 4)
    k = torch.ones(2, 5, 4)
    k[0, 1, 2] = k[1, 4, 0] = k[0, 4, 1] = -1.0

    def f():
        h = lin(x)
        if packed:
            h = torch.nn.utils.rnn.pack_padded_sequence(h, torch.tensor([5, 3]), batch_first=True,
                                                        enforce_sorted=False)
            h = torch.nn.utils.rnn.pad_packed_sequence(gru(h)[0], batch_first=True, total_length=5)[0]
        else:
            h = gru(h)[0]
        return torch.sqrt(h.exp() * k)[:, :3].sum()

    named = [(f"{m}.{n}", p) for m, mod in (("lin", lin), ("gru", gru)) for n, p in mod.named_parameters()]
    contaminated, genuine = _leaf_truth(f, [p for _, p in named])
    assert not contaminated and len(genuine) == len(named)
    with gw.trace() as report:
        f().backward()
    assert not report.of_kind("contamination"), str(report)
    assert {n for f in report.of_kind("nan") for n in f.reaches} == {n for n, _ in named}, str(report)


@pytest.mark.parametrize("block", ["trace", "watch"])
def test_a_computed_zero_below_a_slice_is_genuine_under_the_watch_too(block):
    """tanh(log(lin(x).exp() * k))[:, :3].sum() with log(0) = -inf at a kept row: tanh'(-inf) = 0 is a zero the
    program computes, so log's backward 0/0 = NaN is genuine (gw.grad keeps it). gw.trace() said so; gw.watch()'s
    replay ran without the shadow strong pass (its forward was not traced, so nothing marked the step as one
    that met a NaN/Inf) and took the zero for the slice's: 'contamination ... the output never used it', with
    gw.strong_zeros() as the fix, where strong zeros change nothing (silent)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 5, 4)
    k = torch.ones(2, 5, 4)
    k[0, 1, 2] = 0.0
    f = lambda: torch.tanh(torch.log(lin(x).exp() * k))[:, :3].sum()
    contaminated, genuine = _leaf_truth(f, list(lin.parameters()))
    assert not contaminated and genuine == {0, 1}
    with gw.watch() if block == "watch" else gw.trace() as report:
        f().backward()
    assert not report.of_kind("contamination"), str(report)
    assert {n for f in report.of_kind("nan") for n in f.reaches} == {"lin.bias", "lin.weight"}, str(report)


def _gru_then_checkpointed_sqrt(reentrant):
    import torch.utils.checkpoint as cp

    torch.manual_seed(0)
    lin, gru = torch.nn.Linear(4, 4), torch.nn.GRU(4, 4, batch_first=True)
    x = torch.randn(2, 5, 4)
    k = torch.ones(2, 5, 4)
    k[0, 1, 2] = k[1, 4, 0] = k[0, 4, 1] = -1.0  # sqrt(-1): a kept time step (1), discarded ones (4)
    block = lambda h: torch.sqrt(h.exp() * k)
    f = lambda: cp.checkpoint(block, gru(lin(x))[0], use_reentrant=reentrant)[:, :3].sum()
    return f, [(f"{m}.{n}", p) for m, mod in (("lin", lin), ("gru", gru)) for n, p in mod.named_parameters()]


@pytest.mark.parametrize("reentrant", [False, True])
def test_contamination_under_a_genuine_nan_below_a_checkpoint_is_covered(reentrant):
    """The GRU test above with the sqrt inside torch.utils.checkpoint: a non-reentrant checkpoint recomputes its
    forward inside the backward with grad on, and the shadow strong pass gave up at the first recomputed op (it
    took it for a create_graph formula). Without the shadow, _covered could not apply: 'contamination ... reaches
    gru.*, lin.*' beside the genuine NaN, where gw.backward's gradients are NaN wherever PyTorch's are (the
    differential checker's seeds 3 and 51). The recomputed forward's values are their own shadows: passed over."""
    f, named = _gru_then_checkpointed_sqrt(reentrant)
    ps = [p for _, p in named]

    def grads(backward):
        for p in ps:
            p.grad = None
        backward(f())
        out = [p.grad.clone() for p in ps]
        for p in ps:
            p.grad = None
        return out

    plain, strong = grads(torch.Tensor.backward), grads(gw.backward)
    assert all(bool((a.isfinite() == b.isfinite()).all()) for a, b in zip(plain, strong, strict=True))
    assert all(not b.isfinite().all() for b in strong)
    with gw.trace() as report:
        f().backward()
    assert not report.of_kind("contamination"), str(report)
    assert {n for f in report.of_kind("nan") for n in f.reaches} == {n for n, _ in named}, str(report)


@pytest.mark.parametrize("how", ["create_graph", "grad on in a hook"])
def test_contamination_beside_a_genuine_nan_without_the_shadow_pass_is_not_claimed(how):
    """The GRU test above where the trace cannot run the shadow strong pass (create_graph=True, or a tensor hook
    that computes with grad enabled): it cannot tell whether the contamination lies beneath the genuine NaN, and
    it claimed it ('contamination ... reaches gru.*, lin.*' with 'gw.strong_zeros() removes it'), where
    gw.backward's gradients are NaN wherever PyTorch's are. Now the finding says it is not known there."""
    torch.manual_seed(0)
    lin, gru = torch.nn.Linear(4, 4), torch.nn.GRU(4, 4, batch_first=True)
    x = torch.randn(2, 5, 4)
    k = torch.ones(2, 5, 4)
    k[0, 1, 2] = k[1, 4, 0] = k[0, 4, 1] = -1.0

    def hook(g):
        with torch.enable_grad():
            return g * 1.0

    def f():
        h = gru(lin(x))[0]
        if how != "create_graph":
            h.register_hook(hook)
        return torch.sqrt(h.exp() * k)[:, :3].sum()

    named = [(f"{m}.{n}", p) for m, mod in (("lin", lin), ("gru", gru)) for n, p in mod.named_parameters()]
    contaminated, genuine = _leaf_truth(f, [p for _, p in named])
    assert not contaminated and len(genuine) == len(named)
    with gw.trace() as report:
        grads = torch.autograd.grad(f(), [p for _, p in named], create_graph=how == "create_graph")
    del grads
    assert all(f.undecided for f in report.of_kind("contamination")), str(report)
    assert {n for f in report.of_kind("nan") for n in f.reaches} == {n for n, _ in named}, str(report)


@pytest.mark.parametrize("outer", [True, False])
def test_a_reentrant_checkpoint_inside_another_names_no_detached_input(outer):
    """checkpoint(lambda h: lin2(checkpoint(block, h, use_reentrant=True)), lin(x), use_reentrant=outer): the
    inner checkpoint's forward runs under no_grad, so the first op to read the outer's detached input (or, under a
    non-reentrant outer, the inner's, whose saved tensors unpack only once) is not one of the recomputation's
    own, and the detached input was named as a leaf: 'reaches: h, lin.bias, ...' ('tensor[4, 3]' with a
    reentrant outer), a tensor the program never sees. A reentrant checkpoint's detach_variable marks them."""
    import torch.utils.checkpoint as cp

    torch.manual_seed(0)
    lin, lin2 = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    x = torch.rand(4, 3)
    k = torch.tensor([[1.0, 0.0, 1.0]] * 3 + [[0.0, 1.0, 1.0]])  # log(0): used in rows 0-2, sliced away in row 3
    inner = lambda h: torch.log(h.exp() * k)
    f = lambda: cp.checkpoint(lambda h: lin2(cp.checkpoint(inner, h, use_reentrant=True)), lin(x),
                              use_reentrant=outer)[:3, ::2].sum()
    with gw.trace() as report:
        f().backward()
    reached = {n for f in report.findings for n in f.reaches}
    assert reached == {"lin.bias", "lin.weight", "lin2.weight"}, str(report)


def test_the_watch_does_not_replay_a_reentrant_checkpoint_and_says_why():
    """gw.watch() over a step whose backward runs a reentrant checkpoint: the replay (torch.autograd.grad) must not
    run the user's forward a third time (a BatchNorm's running statistics), and it does not: the checkpoint
    refuses .grad() first. But the report gave the reason of another case, 'which gw.watch() could not replay (a
    compiled backward with donated buffers keeps no graph)'."""
    import torch.utils.checkpoint as cp

    torch.manual_seed(0)
    bn, lin = torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 3)
    k = torch.tensor([[1.0, 0.0, 1.0]] * 3 + [[0.0, 1.0, 1.0]])
    calls = []

    def block(h):
        calls.append(1)
        return torch.log(bn(h).exp() * k)

    x = torch.rand(4, 3)
    with gw.watch() as report:
        cp.checkpoint(block, lin(x), use_reentrant=True)[:3, ::2].sum().backward()
    assert len(calls) == 2 and int(bn.num_batches_tracked) == 2  # the forward and its recomputation, no more
    text = str(report)
    assert "donated" not in text and "use_reentrant=True) refuses torch.autograd.grad" in text, text


@pytest.mark.parametrize("next_op", ["linear", "matmul"])
def test_the_watch_names_the_op_whose_output_a_later_node_saved_as_a_view(next_op):
    """lin(x.log()) with x[0, 1, 2] = 0 (x 3-d, so linear and matmul save a 2-d view of log's output): log's node
    saves x (finite), the mm saves the view holding -inf, whose node (the view's) makes no NaN/Inf, so gw.watch()'s
    replay said 'tensor[2, 3, 4] arrived with 1 Inf value(s)' and, for log's backward 1/0, a second genuine Inf
    'the backward of aten.log made Inf from finite values', where gw.trace() names one birth: aten.log. The
    saved view's base is the log's output: its node made it."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    x = torch.rand(2, 3, 4)
    x[0, 1, 2] = 0.0
    x.requires_grad_(True)
    f = (lambda: lin(x.log()).sum()) if next_op == "linear" else (lambda: (x.log() @ lin.weight).sum())
    born = {}
    for block in (gw.trace, gw.watch):
        with block() as report:
            f().backward()
        lin.zero_grad()
        x.grad = None
        genuine = [g for g in report.findings if g.kind in ("nan", "inf") and "aten.sum" not in (g.born or "")]
        born[block.__name__] = [(g.kind, g.born_op, tuple(g.reaches)) for g in genuine]
        assert all("arrived" not in (g.born or "") for g in report.findings), str(report)
    assert born["watch"] == born["trace"] == [("inf", "aten.log", ("lin.weight", "x"))], born


class _ScriptedLog(torch.nn.Module):
    def forward(self, h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return torch.log(h.exp() * k) @ torch.ones(4, 4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script is deprecated in 2.13
def test_a_torchscript_blocks_births_say_that_its_lines_are_not_known():
    """torch.jit.script(module) runs its ops in TorchScript's interpreter: no Python frame of the scripted code, so
    the trace names the calling line. It said 'aten.log at test.py:<the call>' as if the call made it, and its
    backward (one DifferentiableGraphBackward node, which the trace saw made at the scripted graph's detached
    outputs) was 'the backward of aten.detach made NaN from finite values' (the differential checker's seed 98).
    The births now say they are inside TorchScript code the line calls, and the node is a TorchScript graph."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    block = torch.jit.script(_ScriptedLog())
    x = torch.randn(6, 4)
    k = torch.ones(6, 4)
    k[1, 2] = 0.0
    f = lambda: torch.tanh(block(lin(x), k)).sum()
    for _ in range(3):  # the profiling executor makes its differentiable graph on the second call
        with gw.trace() as report:
            f().backward()
        lin.zero_grad()
    texts = [f.born or "" for f in report.findings if f.kind in ("nan", "inf", "contamination")]
    assert texts and all("TorchScript" in t for t in texts), str(report)
    assert "aten.detach" not in str(report), str(report)


@pytest.mark.parametrize("nan_first", [True, False])
def test_writes_into_parts_of_a_tensor_keep_each_parts_birth(nan_first):
    """p = F.pad(x * 1, (0, 2)); p[:, 3:] = nan; p[0, 0] = inf; (p * w).sum(): w's gradient holds the 8 NaN and
    the Inf (plain and gw.grad alike). A forward write into a view replaced its base's provenance, so the NaN
    was told as born at the Inf's line ('genuine NaN: aten.copy_ at <p[0, 0] = inf>', 1 element) and the fill
    at p[:, 3:] was in no finding; written the other way round the Inf's birth was lost. Writes into parts of a
    tensor now keep each part's births (as an elementwise op's parts)."""
    torch.manual_seed(0)
    x, w = torch.rand(4, 3, requires_grad=True), torch.rand(4, 5, requires_grad=True)
    nan_line = _writes.__code__.co_firstlineno + (3 if nan_first else 7)
    f = lambda: _writes(x, w, nan_first)
    plain, strong = torch.autograd.grad(f(), [x, w]), gw.grad(f(), [x, w])
    assert [int(g.isnan().sum()) for g in strong] == [int(g.isnan().sum()) for g in plain] == [0, 8]
    assert [int(g.isinf().sum()) for g in strong] == [0, 1]
    with gw.trace() as report:
        f().backward()
    [nan] = report.of_kind("nan")
    assert nan.born_location.endswith(f"test_hunt_explain.py:{nan_line}"), str(report)
    assert nan.count == 8 and nan.reaches == ["w"], str(report)
    assert not report.of_kind("contamination"), str(report)


def _writes(x, w, nan_first):
    p = F.pad(x * 1.0, (0, 2))
    if nan_first:
        p[:, 3:] = float("nan")
        p[0, 0] = float("inf")
    else:
        p[0, 0] = float("inf")
        p[:, 3:] = float("nan")
    return (p * w).sum()


def test_an_attention_masks_infinity_is_no_root_of_the_nan_another_infinity_made():
    """F.scaled_dot_product_attention(h, h, h, attn_mask=m) with h holding log(0) = -inf and padded rows: the
    math path turns the boolean mask into -inf (aten.scalar_tensor) before the scores, where +inf + -inf makes
    NaN. The NaN was named after the earliest birth it met, the mask's: 'genuine NaN ... born: aten.scalar_tensor
    ... a NaN/Inf constant written into the tensor', a root cause of its own beside log's (the differential
    checker's seeds 30, 184), and 'genuine Inf: the output depends on it' born at the mask (the loss holds no
    Inf). An infinity written on purpose explains no NaN another birth's value made of it."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 5, 4)
    k = torch.ones(2, 5, 4)
    k[0, 1, 2] = k[1, 3, 0] = 0.0
    m = torch.rand(5, 5, generator=torch.Generator().manual_seed(1)) < 0.5
    m[torch.arange(5), torch.arange(5)] = True
    with gw.trace() as report:
        h = F.pad(torch.log(lin(x).exp() * k)[:, :3], (0, 0, 0, 2))  # (rows of 0: -inf x 0 = NaN in the scores)
        F.scaled_dot_product_attention(h, h, h, attn_mask=m).sum().backward()
    assert report.of_kind("nan") and all(f.born_op != "aten.scalar_tensor" for f in report.findings), str(report)
    assert report.causes[0].startswith("root cause at step 0: aten.log"), str(report)
    assert all("(finding" not in c or "aten.scalar_tensor" not in c.split(";")[0] or "genuine NaN" not in c
               for c in report.causes), str(report)


@pytest.mark.parametrize("padding_first", [True, False])
def test_a_padding_rows_nan_beside_a_used_nan_through_a_model_is_not_used(padding_first):
    """distributed.md's batch without DDP: x[4:] = nan (padding the loss never reads, model(x)[:4]) and
    x[0, 0] = nan (used), written in either order inside the traced block. Whole-tensor provenance named the
    last write for both: with the padding written last, 'genuine NaN: aten.fill_ (x[4:] = nan) ... reaches
    model.0.bias, model.0.weight, model.2.weight' and the used NaN in no finding (silent). Each write keeps its
    part through the layers (a linear layer's addmm, tanh, autograd's detached saved output, the slice)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def f():
        x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
        if padding_first:
            x[4:] = float("nan")
            x[0, 0] = float("nan")  # (the used NaN)
        else:
            x[0, 0] = float("nan")
            x[4:] = float("nan")
        return model(x)[:4].mean()

    names = [n for n, _ in model.named_parameters()]
    _, genuine = _leaf_truth(f, list(model.parameters()))
    with gw.trace() as report:
        f().backward()
    [nan] = report.of_kind("nan")
    used_line = f.__code__.co_firstlineno + (4 if padding_first else 6)
    assert nan.born_location.endswith(f"test_hunt_explain.py:{used_line}"), str(report)
    assert nan.reaches == sorted(f"model.{names[i]}" for i in genuine), str(report)
    assert not report.of_kind("contamination"), str(report)


@pytest.mark.parametrize("after", ["where then linear", "linear then slice"])
def test_a_genuine_findings_elements_are_those_the_output_uses(after):
    """sqrt(lin(x).exp() * k) with sqrt(-1) in rows 0, 1 (used) and 4, 5 (masked or sliced away), then a linear
    layer: 'genuine NaN ... 4 elements' counted the masked rows too (the linear layer's weight gradient mixes the
    rows, and a birth met there kept the born tensor's count). The reference: the born elements where gw.grad's
    sensitivity (strong zeros: the masked rows' is a structural 0) is nonzero. sqrt's own backward receives the
    whole sensitivity of every use and meets each born element there, so its genuine elements are the used ones."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    x = torch.rand(6, 4)
    k = torch.ones(6, 4)
    k[0, 1] = k[1, 2] = k[4, 0] = k[5, 3] = -1.0
    m = torch.ones(6, 1, dtype=torch.bool)
    m[4:] = False

    def f():
        y = torch.sqrt(lin(x).exp() * k)
        return (lin(torch.where(m, y, 0.0)).sum() if after == "where then linear" else lin(y)[:4].sum()), y

    loss, y = f()
    [g] = gw.grad(loss, [y])
    used = int((~y.isfinite() & (g != 0)).sum())
    assert used == 2
    with gw.trace() as report:
        f()[0].backward()
    [nan] = report.of_kind("nan")
    assert nan.count == used, str(report)


def test_the_watch_does_not_call_a_value_the_forward_made_data_that_arrived():
    """gw.watch() over (where(m, log(lin(x).exp() * k).index_select(0, i), 0) @ w).sum(): no node saves log's
    output nor the index_select's or the where's (they save their input, an index, a condition), and the bmm's
    saved view holds the -inf. The replay fell back to 'tensor[6, 4] arrived with 2 Inf value(s)' for a value the
    forward made (it has a node): a false claim. It now says which node's op or an op before it made it, and that
    the watch cannot tell which (the checker's compiled seeds hit it: a compiled block's output)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    x, w = torch.rand(6, 4), torch.rand(4, 4, requires_grad=True)
    k = torch.ones(6, 4)
    k[0, 1] = k[2, 3] = 0.0
    m, i = torch.rand(6, 4) < 0.9, torch.tensor([0, 1, 2, 3, 4, 5])
    with gw.watch() as report:
        (torch.where(m, torch.log(lin(x).exp() * k).index_select(0, i), 0.0) @ w).sum().backward()
    births = [f.born or "" for f in report.findings if f.kind in ("nan", "inf", "contamination")]
    assert births and not any("arrived with" in b for b in births), str(report)
    assert all("gw.trace() names the op" in b or "aten.log" in b for b in births), str(report)


@pytest.mark.parametrize("softmax", [torch.softmax, torch.log_softmax])
@pytest.mark.parametrize("mask_first", [True, False])
def test_a_fully_masked_rows_nan_beside_another_nan_is_born_at_the_softmax(mask_first, softmax):
    """softmax(sqrt(lin(x).exp() * k) + mask) with sqrt(-1) in row 0 (dropped by a where: it reaches no gradient
    under gw.grad) and row 2 all -inf (a fully masked row: 0/0 = NaN, used). The softmax made no birth (its input
    already held NaN), so the used NaN was named after the earliest birth, or, since only an all -inf written
    constant is a mask value that explains nothing, after sqrt: 'genuine NaN ... born: aten.sqrt ... reaches
    lin.bias, lin.weight' (SILENT: the fix it gives leaves the NaN). The fully masked rows are born at the
    softmax, as parts beside the rows of the other birth."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    x = torch.rand(4, 4)
    k = torch.ones(4, 4)
    k[0, 1] = -1.0
    masked = torch.zeros(4, 4, dtype=torch.bool)
    masked[2, :] = masked[1, 3] = True
    keep = torch.ones(4, 1, dtype=torch.bool)
    keep[0] = False

    def f():
        if mask_first:
            mask = torch.zeros(4, 4).masked_fill(masked, float("-inf"))
        y = torch.sqrt(lin(x).exp() * k)
        if not mask_first:
            mask = torch.zeros(4, 4).masked_fill(masked, float("-inf"))
        p = softmax(y + mask, -1)
        return torch.where(keep, p if softmax is torch.softmax else p.exp(), 0.0).pow(2).sum()

    _, genuine = _leaf_truth(f, list(lin.parameters()))
    assert genuine == {0, 1}
    with gw.trace() as report:
        f().backward()
    reaching = [(g.born_op, g.reaches) for g in report.of_kind("nan") if g.reaches]
    if softmax is torch.softmax:
        assert reaching == [("aten._softmax", ["lin.bias", "lin.weight"])], str(report)
    else:  # (log_softmax's backward mixes row 0's NaN in: its finding reaches lin.* too, a per-row limit)
        assert ("aten._log_softmax", ["lin.bias", "lin.weight"]) in reaching, str(report)
    assert not report.of_kind("contamination"), str(report)


def _moved(x, case):
    x[4:] = float("nan")  # padding rows (unused unless moved into rows 0-3)
    x[0, 0] = float("nan")
    if case == "copy_ of a flip":
        x.copy_(x.flip(0))  # the padding moves into rows 0, 1 (used), x[0, 0] into row 5
    elif case == "mul_ by a NaN column":
        x[0, 0] = 1.0
        x.mul_(torch.tensor([1.0, 1.0, 1.0, float("nan")]))
    elif case == "inf over a NaN row":
        x[0, 0] = 1.0
        x[3:5, 1] = float("inf")  # row 3 used, row 4 was padding
    return x


@pytest.mark.parametrize(("case", "used", "unused"), [
    ("copy_ of a flip", 1, 2), ("mul_ by a NaN column", 7, 1), ("inf over a NaN row", 10, 1)])
def test_in_place_ops_on_a_tensor_with_parts_name_the_births_the_output_uses(case, used, unused):
    """model(x)[:4] with padding rows x[4:] = nan beside x[0, 0] = nan (parts), then an in-place op on x. The parts
    stayed as they were: x.copy_(x.flip(0)) (the padding now in rows 0, 1) was told as 'genuine NaN born at
    x[0, 0] = nan, reaches model.*' and the padding's NaN in no finding; x.mul_ by a NaN column, as the padding
    reaching every parameter, the column in none; and x[3:5, 1] = inf over the NaN padding row took the padding's
    birth (an in-place write into a tensor already NaN carries its NaN): the Inf in row 3 was in no finding. All
    SILENT (wrong births). fill_/copy_ write every element (no prior provenance); an in-place elementwise op keeps
    the parts joined with its inputs' where they cover its NaN/Inf, else the whole provenance is told."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    f = lambda: model(_moved(torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), case))[:4].mean()
    line = _moved.__code__.co_firstlineno
    names = [f"model.{n}" for n, _ in model.named_parameters()]
    contaminated, genuine = _leaf_truth(f, list(model.parameters()))
    with gw.trace() as report:
        f().backward()
    born = {int(g.born_location.rpartition(":")[2]) - line: g.reaches for g in report.findings
            if g.kind in ("nan", "inf") and g.born_location}
    assert genuine and born.get(used) == sorted(names[i] for i in genuine), str(report)
    assert not born.get(unused), str(report)
    said = {n for g in report.of_kind("contamination") for n in g.reaches}
    assert said == {names[i] for i in contaminated}, str(report)


def _written(x, only):
    """x[4:] = nan (padding, sliced away), x[0, 0] = nan, x[1, 1] = inf; ``only``: keep that write alone."""
    if only in (None, "padding"):
        x[4:] = float("nan")
    if only in (None, "nan"):
        x[0, 0] = float("nan")
    if only in (None, "inf"):
        x[1, 1] = float("inf")
    return x


def test_an_inf_met_by_a_computed_zero_beside_a_used_nans_part_reaches_its_gradient():
    """model(x)[:4] (Linear, Tanh, Linear) with padding rows x[4:] = nan, x[0, 0] = nan and x[1, 1] = inf (three
    parts of x). The Inf makes the first linear's output row 1 inf, tanh'(inf) = 0 meets it in the weight's matmul:
    0 x inf = NaN, which gw.grad keeps (a zero the program computes). Beside the used NaN the matmul's saved x was
    one incident named after the NaN's birth: the Inf was told under 'Not errors: ... no gradient used' (SILENT: a
    genuine Inf hidden). The reference per birth: the leaves gw.grad leaves non-finite in the program with that
    write alone (the others deleted)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    names = [f"model.{n}" for n, _ in model.named_parameters()]
    f = lambda only=None: model(_written(torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), only))[
        :4].mean()
    line = _written.__code__.co_firstlineno
    want = {}
    for only, at in (("nan", 5), ("inf", 7)):
        grads = gw.grad(f(only), list(model.parameters()))
        want[at] = sorted(n for n, g in zip(names, grads, strict=True) if not g.isfinite().all())
    assert want[7] == ["model.0.weight"]
    with gw.trace() as report:
        f().backward()
    born = {int(g.born_location.rpartition(":")[2]) - line: g.reaches for g in report.findings
            if g.kind in ("nan", "inf") and g.born_location}
    assert born == want, str(report)
    assert not report.of_kind("contamination"), str(report)


def _rows(x, only):
    """x[4:] = nan (padding rows, sliced away after the reduction), x[0, 0] = nan (used); ``only``: that alone."""
    if only in (None, "padding"):
        x[4:] = float("nan")
    if only in (None, "nan"):
        x[0, 0] = float("nan")
    return x


@pytest.mark.parametrize("reduce", [
    lambda h: h.sum(1), lambda h: h.mean(1, keepdim=True).squeeze(1), lambda h: h.max(1).values,
    lambda h: torch.logsumexp(h, 1), lambda h: h.var(1)], ids=["sum", "mean keepdim", "max", "logsumexp", "var"])
def test_a_reduction_over_a_tensor_with_parts_keeps_each_rows_births(reduce):
    """(reduce(tanh(lin(x)), dim 1) * w)[:4].sum() with padding rows x[4:] = nan beside x[0, 0] = nan: the reduction
    joined the parts, so w's genuine NaN (from row 0) was told as born at the padding's write (the earliest birth),
    'genuine NaN ... born: aten.fill_ ... reaches: w' (SILENT: the padding is contamination there). The reference
    per birth: the leaves gw.grad leaves non-finite with that write alone; contamination: plain non-finite where
    gw.grad is finite, in the whole program."""
    torch.manual_seed(0)
    lin, w = torch.nn.Linear(4, 4), torch.nn.Parameter(torch.ones(6))
    named = [("lin.weight", lin.weight), ("lin.bias", lin.bias), ("w", w)]
    f = lambda only=None: (reduce(torch.tanh(lin(_rows(torch.randn(6, 4, generator=torch.Generator().manual_seed(1)),
                                                     only)))) * w)[:4].sum()
    line = _rows.__code__.co_firstlineno
    want = {}
    for only, at in (("padding", 3), ("nan", 5)):
        grads = gw.grad(f(only), [p for _, p in named])
        reached = sorted(n for (n, _), g in zip(named, grads, strict=True) if not g.isfinite().all())
        if reached:
            want[at] = reached
    contaminated, _ = _leaf_truth(f, [p for _, p in named])
    with gw.trace() as report:
        f().backward()
    born = {int(g.born_location.rpartition(":")[2]) - line: g.reaches for g in report.findings
            if g.kind in ("nan", "inf") and g.born_location}
    assert born == want, str(report)
    assert {n for g in report.of_kind("contamination") for n in g.reaches} == {named[i][0] for i in contaminated}, \
        str(report)


def _born_reaches(report, line) -> dict:
    """Genuine findings: born line (relative to ``line``) -> the leaves they reach."""
    return {int(g.born_location.rpartition(":")[2]) - line: g.reaches for g in report.findings
            if g.kind in ("nan", "inf") and g.born_location}


@pytest.mark.parametrize("join", [
    lambda h: torch.cat([h[:, 1:], h[:, :1]], 1), lambda h: torch.stack([h, h * 0.5], 0).sum(0),
    lambda h: torch.cat([h[3:], h[:3]], 0).roll(3, 0)], ids=["cat of columns", "stack then sum", "cat of rows"])
def test_a_join_keeps_the_parts_of_its_inputs(join):
    """model(join(x))[:4] with padding rows x[4:] = nan and x[1, 1] = inf (tanh'(inf) = 0 x inf = NaN in the
    weight's matmul, kept by gw.grad). cat (and stack) joined the parts into one provenance, and the NaN incident
    preferred a NaN birth: 'genuine NaN ... born: aten.fill_' (the padding, SILENT: it is contamination) for the
    Inf's NaN. The reference per birth: the leaves gw.grad leaves non-finite with that write alone."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    names = [f"model.{n}" for n, _ in model.named_parameters()]
    only_of = {"padding": "padding", "inf": "inf", None: "padding and inf"}

    def f(only=None):
        x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
        if only_of[only] != "inf":
            _written(x, "padding")
        if only_of[only] != "padding":
            _written(x, "inf")
        return model(join(x))[:4].mean()

    line = _written.__code__.co_firstlineno
    want = {}
    for only, at in (("padding", 3), ("inf", 7)):
        grads = gw.grad(f(only), list(model.parameters()))
        reached = sorted(n for n, g in zip(names, grads, strict=True) if not g.isfinite().all())
        if reached:
            want[at] = reached
    assert want == {7: ["model.0.weight"]}
    contaminated, _ = _leaf_truth(f, list(model.parameters()))
    with gw.trace() as report:
        f().backward()
    assert _born_reaches(report, line) == want, str(report)
    assert {n for g in report.of_kind("contamination") for n in g.reaches} == {names[i] for i in contaminated}, \
        str(report)


def _roots(report) -> dict:
    """Finding number -> the op of the root cause its cause line names."""
    import re
    out = {}
    for line in report.causes:
        op = re.search(r"root cause at step \d+: (\S+)", line).group(1)
        out.update((int(n), op) for n in re.findall(r"\(finding (\d+)\)", line))
    return out


@pytest.mark.parametrize("mask", [
    lambda y, m: y.masked_fill(m, float("-inf")), lambda y, m: torch.where(m, float("-inf"), y),
    lambda y, m: y + torch.where(m, float("-inf"), 0.0)], ids=["masked_fill", "where", "additive mask"])
def test_an_infinity_written_into_a_tensor_holding_nan_elsewhere_is_born_there(mask):
    """softmax(mask(sqrt(lin(x).exp() * k)), -1) with row 1 fully masked (-inf: 0/0 = NaN, used) beside sqrt(-1)
    at (0, 0). masked_fill made no birth where its input held a NaN elsewhere (the -inf took the input's
    provenance): the fully masked row's NaN was rooted at the sqrt ('A. root cause: aten.sqrt ... (finding 1);
    ... (finding 2)'). The reference: the same program without the sqrt's NaN, whose softmax finding is rooted
    where the -inf was written; the NaN beside it must not change that, and the sqrt's root explains its own."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    x = torch.rand(3, 4)
    m = torch.zeros(3, 4, dtype=torch.bool)
    m[1, :] = True
    roots, found = [], []
    for nan in (False, True):
        k = torch.ones(3, 4)
        k[0, 0] = -1.0 if nan else 1.0
        with gw.trace() as report:
            torch.softmax(mask(torch.sqrt(lin(x).exp() * k), m), -1).sum().backward()
        roots.append(_roots(report))
        found.append({f.born_op: i for i, f in enumerate(report.findings, 1) if f.kind in ("nan", "inf")})
    assert roots[1][found[1]["aten._softmax"]] == roots[0][found[0]["aten._softmax"]] != "aten.sqrt", str(report)
    assert [i for i, op in roots[1].items() if op == "aten.sqrt"] == [found[1]["aten.sqrt"]], str(report)


@pytest.mark.parametrize("crop", [
    lambda x: torch.sqrt(F.pad(x, (1, 1, 1, 1))), lambda x: torch.sqrt(F.pad(x[:, :3], (0, 0, 0, 2))),
    lambda x: torch.sqrt(F.pad(x, (1, 2))[:, 1:])], ids=["pad", "slice then pad", "pad then slice"])
def test_a_backward_born_infs_elements_are_those_its_gradient_receives(crop):
    """sqrt of a zero-padded x (x[0, 0] = 0 too): sqrt'(0) = inf is made in the backward at every padded zero and
    at x[0, 0], and pad's backward crops the border away. 'genuine Inf ... 13 elements' (or 9) where x's gradient
    holds 1 Inf: the count was the backward op's. The reference: the non-finite elements of x's gradient."""
    x = torch.rand(4, 4) + 0.5
    x[0, 0] = 0.0
    x.requires_grad_()
    [g] = torch.autograd.grad(crop(x).sum(), [x])
    assert int((~g.isfinite()).sum()) == 1
    with gw.trace() as report:
        crop(x).sum().backward()
    [inf] = report.of_kind("inf")
    assert (inf.count, inf.reaches, [tuple(i) for i in inf.indices]) == (1, ["x"], [(0, 0)]), str(report)


def _packed(h):
    packed = torch.nn.utils.rnn.pack_padded_sequence(h, torch.tensor([5, 3]), batch_first=True, enforce_sorted=False)
    return packed


@pytest.mark.parametrize("after", ["packed gru", "index_select then linear"])
def test_a_birth_mixed_further_down_counts_the_elements_its_sensitivity_reaches(after):
    """lin(x).masked_fill(bad, nan) with NaN at a used element and at a padded one, then a packed GRU (the padded
    step is never read by pack_padded_sequence) or an index_select that drops it before a linear layer: 'genuine
    NaN ... 2 elements' where 1 is used (the GRU's backward mixes the used NaN through every step, so the born
    tensor's count was kept). The reference: the born elements where gw.grad's sensitivity is nonzero."""
    torch.manual_seed(0)
    lin, gru, lin2 = torch.nn.Linear(4, 4), torch.nn.GRU(4, 4, batch_first=True), torch.nn.Linear(4, 4)
    x = torch.randn(2, 5, 4)
    bad = torch.zeros(2, 5, 4, dtype=torch.bool)
    bad[0, 1, 2] = bad[1, 4, 0] = True
    keep = torch.tensor([0, 1, 2, 3])

    def f():
        h = lin(x).masked_fill(bad, float("nan"))
        if after == "packed gru":
            out = torch.nn.utils.rnn.pad_packed_sequence(gru(_packed(h))[0], batch_first=True, total_length=5)[0]
        else:
            out = lin2(h.index_select(1, keep))
        return out.sum(), h

    loss, h = f()
    [g] = gw.grad(loss, [h])
    used = int((~h.isfinite() & (g != 0)).sum())
    assert used == 1
    with gw.trace() as report:
        f()[0].backward()
    [nan] = report.of_kind("nan")
    assert nan.count == used, str(report)


def test_a_step_the_watch_could_not_replay_is_only_its_unexplained_gradients():
    """gw.watch() over checkpoint(sqrt(exp(h) * k), lin(x)) then a packed GRU, sqrt(-1) at one element: the
    non-reentrant checkpoint would run its forward again, so the replay stops before it, and the step is told as
    'NaN gradient, not explained' at the backward call. What the replay read and ran before it stopped stayed:
    'genuine NaN ... tensor[1, 4] arrived with ... NaN' (a GRU hidden state, no data that arrived) and 'genuine
    NaN ... aten._pack_padded_sequence or an op before it', both reaching no gradient (the checker's seed 3)."""
    import torch.utils.checkpoint as cp

    torch.manual_seed(0)
    lin, gru = torch.nn.Linear(4, 4), torch.nn.GRU(4, 4, batch_first=True)
    x = torch.randn(2, 5, 4)
    k = torch.ones(2, 5, 4)
    k[0, 2, 1] = -1.0
    with gw.watch() as report:
        h = cp.checkpoint(lambda h: torch.sqrt(h.exp() * k), lin(x), use_reentrant=False)
        out = gru(_packed(h))[0]
        torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=5)[0].sum().backward()
    names = {f"{m}.{n}" for m, mod in (("lin", lin), ("gru", gru)) for n, _ in mod.named_parameters()}
    assert [(f.born_op, set(f.reaches)) for f in report.findings] == [("backward", names)], str(report)


@pytest.mark.parametrize("k", [float("inf"), 0.0])
def test_the_watch_explains_a_nan_loss_whose_gradients_are_finite(k):
    """((lin(x) + k) - k).sum() with k = inf in one column: inf - inf makes the loss NaN, but the backward of add
    and sub reads no value, so every gradient is finite. gw.watch() checked only the gradients: 'No NaN/Inf
    gradients' where gw.trace() reports a genuine NaN (the checker's seed 13, compiled). The loss is checked with
    them (a one-element root joins the small vectors' sum) and the step replayed: the NaN is born at the value
    the loss's node made, 'aten.sum or an op before it' (its forward was not traced); the next step, traced in
    full, names aten.sub. A finite loss starts nothing."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    x = torch.rand(3, 4)
    kk = torch.tensor([0.0, k, 0.0, 0.0])
    with gw.trace() as traced:
        ((lin(x) + kk) - kk).sum().backward()
    with gw.watch() as report:
        for _ in range(2):
            ((lin(x) + kk) - kk).sum().backward()
    if k == 0.0:
        assert not report.findings and not traced.findings, str(report)
        return
    assert [(f.kind, f.born_op, f.reaches) for f in traced.findings] == [("nan", "aten.sub", [])], str(traced)
    first, then = report.findings
    assert (first.kind, first.step, first.reaches) == ("nan", 0, []) and "gw.trace() names the op" in first.born, \
        str(report)
    assert (then.kind, then.born_op, then.step) == ("nan", "aten.sub", 1), str(report)


def test_the_watch_calls_no_hidden_state_of_a_packed_gru_data_that_arrived():
    """gw.watch() over a packed GRU after sqrt(lin(x).exp() * k), sqrt(-1) at one element: the GRU's mul saved its
    hidden state as the clone it was (since rebased by an in-place write), a node the walk from the roots never
    meets, so the replay found no birth for it: 'tensor[1, 4] arrived with 4 NaN value(s) ...; so did tensor[2,
    4]', a false claim (the checker's seeds 7 and 17). It says the watch cannot tell which op made it."""
    torch.manual_seed(0)
    lin, gru = torch.nn.Linear(4, 4), torch.nn.GRU(4, 4, batch_first=True)
    x = torch.randn(2, 5, 4)
    k = torch.ones(2, 5, 4)
    k[0, 1, 1] = -1.0
    with gw.watch() as report:
        out = gru(_packed(torch.sqrt(lin(x).exp() * k)))[0]
        torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=5)[0].sum().backward()
    births = [f.born or "" for f in report.findings]
    assert births and not any("arrived with" in b for b in births), str(report)
    assert all("gw.trace() names the op" in b or "aten.sqrt" in b for b in births), str(report)
