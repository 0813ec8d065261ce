"""Strong-zero rules for fused backwards of single ops: softmax / log_softmax / nll_loss, the margin losses,
_trilinear, triangular and linear solves, cdist / pdist, embedding_bag's per-sample weights, grid_sampler, CTC
loss and weight normalisation.

May import: torch, gradwise._masks, _supports, _rules, _rules_pointwise, _rules_bilinear.
"""

from __future__ import annotations

import torch

from gradwise._masks import mask_all, mask_any
from gradwise._strong_zeros._rules import _UNRULED, _annihilate, _register, _run_unruled, _tracked_slots
from gradwise._strong_zeros._rules_bilinear import _finite
from gradwise._strong_zeros._rules_pointwise import bag_of
from gradwise._strong_zeros._supports import _STATE, stood_aside_for_the_batch

aten = torch.ops.aten


def _softmax_backward(func, args, kwargs, sup):
    """_softmax_backward_data(g, y, dim): out = y * (g - sum(g * y)). A softmax output that is exactly 0 (its
    input was -inf: a masked position) is a structural zero, and so is every output of a row whose g is all
    structural zeros. NaN rows of y (a fully masked softmax row) meet only structural zeros there.
    A y of exactly 0 can also be an underflow of a finite input (softmax([0, -200]) in float32). Where an
    infinite g meets it and the output being differentiated is finite (entropy: entr(0) = 0, sqrt(0) = 0), y * g
    tends to 0 either way and the row is exact with the zero structural. Where the output is not finite (log of
    that 0 reaches it) the row keeps PyTorch's values (NaN) rather than a finite guess."""
    g, y, dim = args[0], args[1], args[2]
    out = func(*args, **kwargs)
    s = sup.of(g)
    zero = y == 0
    if _STATE.outputs_finite:  # y*g -> 0 as y -> 0 for the finite outputs' functions (entr, sqrt, xlogy)
        genuine = torch.zeros((), dtype=torch.bool, device=y.device)
    else:
        hit = zero & ~torch.isfinite(g)
        genuine = mask_any(hit if s is None else hit & s, dim, keepdim=True)
        if bool(mask_any(genuine)):
            stood_aside_for_the_batch(sup)
    support = ~zero | genuine
    if s is not None:
        support = support & mask_any(s, dim, keepdim=True)
    used = support if s is None else support & s  # the elements whose g * y enter the row's sum
    bad_rows = mask_any(~torch.isfinite(out) & support, dim, keepdim=True) & ~genuine
    if bool(mask_any(bad_rows)):
        redo = y * (g - torch.where(used, g * y, 0).sum(dim, keepdim=True))
        out = torch.where(bad_rows, redo.to(out.dtype), out)
    support = support.expand(out.shape)
    sup.record(_annihilate(out, support), support)
    return out


_register(aten._softmax_backward_data)(_softmax_backward)


def _log_softmax_backward(func, args, kwargs, sup):
    """_log_softmax_backward_data(g, y, dim): out = g - exp(y) * sum(g). A row of g that is all structural
    zeros (an ignored target, a discarded row) gives a structurally zero row whatever y holds. A y of -inf (a masked
    position: exp(y) = 0, softmax's structural 0) takes no part in the row's sum term, so where g is a structural zero
    there the output is one too (until 2026-12-07 it was a computed 0: exp(log_softmax(s + mask)) as attention
    weights sent the masked keys' scores 0, and a padded key's infinite slope below met it as 0 x inf = NaN). Where
    the output being differentiated is not finite and an infinite g is in the row, PyTorch's row stays, as in
    softmax's rule."""
    g, y, dim = args[0], args[1], args[2]
    out = func(*args, **kwargs)
    s = sup.of(g)
    if s is None:
        sup.record(out, None)
        return out
    row = mask_any(s, dim, keepdim=True)
    masked = y == float("-inf")
    if not _STATE.outputs_finite:
        masked = masked & ~mask_any(~torch.isfinite(g) & s, dim, keepdim=True)
    support = (s | (row & ~masked)).expand(out.shape)
    sup.record(_annihilate(out, support), support)
    return out


_register(aten._log_softmax_backward_data)(_log_softmax_backward)


def _nll_loss_backward(func, args, kwargs, sup):
    """nll_loss_backward(g, self, target, weight, reduction, ignore_index, total_weight): only the target
    class of each non-ignored sample receives gradient; everything else is a structural zero."""
    out = func(*args, **kwargs)
    g, self, target, ignore_index = args[0], args[1], args[2], args[5]
    class_dim = 1 if self.dim() > 1 else 0
    keep = target != ignore_index
    support = torch.zeros(out.shape, dtype=torch.bool, device=out.device)
    support.scatter_(class_dim, torch.where(keep, target, 0).unsqueeze(class_dim),
                     keep.unsqueeze(class_dim))
    s = sup.of(g)
    if s is not None:  # per sample (reduction='none') or one scalar for the reduced loss
        support &= s.unsqueeze(class_dim) if s.dim() > 0 else s
    sup.record(_annihilate(out, support), support)
    return out


_register(aten.nll_loss_backward, aten.nll_loss2d_backward)(_nll_loss_backward)


def _margin_loss_backward(func, args, kwargs, sup):
    """multi_margin_loss_backward(g, self, target, p, margin, weight, reduction) and
    multilabel_margin_loss_backward(g, self, target, reduction, is_target): each sample's row of the result is
    its g (one value per sample for reduction='none', one scalar else) times a function of that row of self, so
    the row of a sample whose g is a structural zero (a padded or discarded sample) is one, whatever NaN/Inf its
    scores hold. Other rows are PyTorch's."""
    if _tracked_slots(args, sup) not in ([], [0]):
        return _run_unruled(func, args, kwargs, sup, "a tracked operand")
    out = func(*args, **kwargs)
    s = sup.of(args[0])
    if s is None:
        sup.record(out, None)
        return out
    support = (s.unsqueeze(-1) if s.dim() and out.dim() > s.dim() else s).expand(out.shape)
    sup.record(_annihilate(out, support), support)
    return out


_register(aten.multi_margin_loss_backward, aten.multilabel_margin_loss_backward)(_margin_loss_backward)


def _trilinear(func, args, kwargs, sup):
    """_trilinear(i1, i2, i3, expand1, expand2, expand3, sumdim): the sum over ``sumdim`` of the product of the
    three operands, each unsqueezed at its expand dims (nn.Bilinear, and its backward with the sensitivity as
    one operand). An output element is a structural zero when every term is, i.e. when the sensitivity's
    slice is all structural zeros. A contraction index at which the sensitivity holds only structural zeros (a
    batch's padding rows) contributes nothing, so it is dropped from every operand that has it and the NaN/Inf
    there never enter. A NaN/Inf still meeting a structural zero inside a kept index is left as PyTorch
    computes it (listed by gw.unruled_ops()), never replaced: the counting that mm uses needs one value."""
    operands, expands, sumdim = list(args[:3]), args[3:6], args[6]
    tracked = _tracked_slots(args, sup)
    if len(tracked) != 1:
        return _run_unruled(func, args, kwargs, sup, "several tracked operands" if tracked else None)
    slot = tracked[0]
    s = sup.of(operands[slot])
    ndim = operands[slot].dim() + len(expands[slot])
    dims = [[d for d in range(ndim) if d not in expands[i]] for i in range(3)]  # each operand's dims, expanded
    s_sum = tuple(dims[slot].index(d) for d in sumdim if d in dims[slot])
    for d in sumdim:
        if d not in dims[slot]:
            continue
        axis = dims[slot].index(d)
        kept = mask_any(s, tuple(a for a in range(s.dim()) if a != axis)) if s.dim() > 1 else s
        if mask_all(kept):
            continue
        index = kept.nonzero().squeeze(1)
        s = s.index_select(axis, index)
        for i in range(3):
            if d in dims[i]:
                operands[i] = operands[i].index_select(dims[i].index(d), index)
    out = func(*operands, *args[3:], **kwargs)
    support = mask_any(s, s_sum) if s_sum else s  # the sensitivity's remaining dims, in expanded order
    out_dims = [d for d in range(ndim) if d not in sumdim]
    kept_dims = [d for d in dims[slot] if d not in sumdim]
    support = support.reshape([support.shape[kept_dims.index(d)] if d in kept_dims else 1 for d in out_dims])
    support = support.expand(out.shape)
    values = [i for i in range(3) if i != slot]
    if not mask_all(s) and not all(_finite(operands[i]) for i in values):
        # do terms with a structural zero meet a NaN/Inf in a supported output? counted with 0/1 indicators
        meets = 0
        for i in values:
            ind = [operands[j].new_ones(()).expand(operands[j].shape) for j in range(3)]
            ind[slot] = (~s).to(out.dtype)
            ind[i] = (~torch.isfinite(operands[i])).to(out.dtype)
            meets = meets + func(*ind, *args[3:], **kwargs)
        if bool(mask_any((meets > 0) & support)):
            _UNRULED.add(f"{func} (NaN/Inf meeting a structural zero inside a kept contraction index)")
    sup.record(_annihilate(out, support), support)
    return out


_register(aten._trilinear)(_trilinear)


# op -> (position of the right-hand side among the positional arguments, whether the solve is always from the left)
_SOLVES = {
    aten.linalg_solve_triangular.default: (1, False),
    aten.triangular_solve.default: (0, True),
    aten.cholesky_solve.default: (0, True),
    aten.linalg_lu_solve.default: (2, False),
}


def _solve(func, args, kwargs, sup):
    """Triangular, Cholesky and LU solves, A X = B (or X A = B with left=False): column k of X depends on
    column k of B alone (row k when solving from the right), so a column of B that is all structural zeros
    gives a structurally zero column of X, exactly 0 whatever A holds. Their backwards solve with the
    sensitivity as B; the products after them then drop those columns (a discarded column of a solution no
    longer turns A's gradient into NaN). A tracked matrix A runs as PyTorch computes it (unruled)."""
    rhs, always_left = _SOLVES[func]
    tracked = _tracked_slots(args, sup)
    if tracked != [rhs] or args[rhs].dim() < 2:
        return _run_unruled(func, args, kwargs, sup, "the matrix is tracked" if tracked else None)
    out = func(*args, **kwargs)
    first = out[0] if isinstance(out, (tuple, list)) else out
    s = sup.of(args[rhs])
    left = always_left or kwargs.get("left", True)
    support = mask_any(s, -2 if left else -1, keepdim=True).expand(first.shape)
    sup.record(_annihilate(first, support), support)
    for other in (out[1:] if isinstance(out, (tuple, list)) else ()):
        if isinstance(other, torch.Tensor):
            sup.record(other, None)
    return out


_register(*_SOLVES)(_solve)


def _cdist_backward(func, args, kwargs, sup):
    """_cdist_backward(g, x1, x2, p, cdist): x1's gradient, row i = sum over j of g[i, j] times the distance's
    derivative. A column j where g holds only structural zeros (a discarded point of x2) contributes nothing
    and is dropped from g, x2 and cdist, so its NaN/Inf never enter; a row i where g does is a structural
    zero."""
    tracked = _tracked_slots(args, sup)
    if tracked != [0]:  # the sensitivity alone
        return _run_unruled(func, args, kwargs, sup, "a tracked point set" if tracked else None)
    g, x1, x2, p, dist = args
    s = sup.of(g)
    kept = mask_any(s.reshape(-1, s.shape[-1]), 0)
    if not mask_all(kept):
        j = kept.nonzero().squeeze(1)
        g, x2, dist = g.index_select(-1, j), x2.index_select(-2, j), dist.index_select(-1, j)
    out = func(g, x1, x2, p, dist, **kwargs)
    support = mask_any(s, -1, keepdim=True).expand(out.shape)
    sup.record(_annihilate(out, support), support)
    return out


_register(aten._cdist_backward)(_cdist_backward)


def _pdist_backward(func, args, kwargs, sup):
    """_pdist_backward(g, x, p, pdist): g and pdist run over the pairs i < j in row-major order. A row of x
    whose pairs all have structural zeros in g (a discarded point) is dropped with those pairs, so its NaN/Inf
    never meet the other rows; its own gradient is a structural zero."""
    tracked = _tracked_slots(args, sup)
    if tracked != [0]:  # the sensitivity alone
        return _run_unruled(func, args, kwargs, sup, "a tracked point set" if tracked else None)
    g, x, p, dist = args
    s = sup.of(g)
    n = x.shape[0]
    pairs = torch.triu_indices(n, n, 1, device=x.device)
    kept = torch.zeros(n, dtype=torch.bool, device=x.device)
    kept[pairs[0][s]] = True
    kept[pairs[1][s]] = True
    if mask_all(kept):
        out = func(*args, **kwargs)
    else:
        out = x.new_zeros(x.shape)
        rows = kept.nonzero().squeeze(1)
        if rows.numel() > 1:  # (one kept row has no pair: nothing to compute)
            among = kept[pairs[0]] & kept[pairs[1]]
            out[rows] = func(g[among], x[rows], p, dist[among], **kwargs)
    support = kept.unsqueeze(1).expand(out.shape)
    sup.record(_annihilate(out, support), support)
    return out


_register(aten._pdist_backward)(_pdist_backward)


def _embedding_bag_per_sample_weights_backward(func, args, kwargs, sup):
    """(g, weight, indices, offsets, offset2bag, mode, padding_idx): the gradient of each per-sample weight is
    the dot product, over the embedding columns, of its bag's g row with its weight row. A column where g holds
    only structural zeros (an embedding dimension the output discards) is dropped from g and weight, so the
    NaN/Inf there never enter. The outputs are recorded as supported (offset2bag, which would say which bag
    each index feeds, is empty on the fast path)."""
    tracked = _tracked_slots(args, sup)
    if tracked != [0]:  # the sensitivity alone
        return _run_unruled(func, args, kwargs, sup, "a tracked weight" if tracked else None)
    g, weight = args[0], args[1]
    s = sup.of(g).expand(g.shape)
    kept = mask_any(s, 0)
    if not mask_all(kept):
        j = kept.nonzero().squeeze(1)
        args = (g.index_select(1, j), weight.index_select(1, j), *args[2:])
    out = func(*args, **kwargs)
    # an index in a bag whose g row holds only structural zeros (a bag the output discards): its weight's
    # gradient is a structural zero, whatever its weight row holds
    dead = ~mask_any(s, 1)
    bags = bag_of(args[2], args[3], args[4]) if mask_any(dead) else None
    if bags is not None and bags.numel() == out.numel():
        support = ~dead[bags]
        sup.record(_annihilate(out, support), support)
    else:
        sup.record(out, None)
    return out


_register(aten._embedding_bag_per_sample_weights_backward)(_embedding_bag_per_sample_weights_backward)


def _grid_sampler_backward(func, args, kwargs, sup):
    """grid_sampler_2d/3d_backward(g, input, grid, mode, padding_mode, align_corners, output_mask): each output
    position reads the input through its own grid point. A position whose g is a structural zero in every channel
    (a cropped output) is discarded: its grid point is replaced by 0 before the kernel runs (a NaN grid point
    would make NaN weights) and its grid gradient is a structural zero, whatever input pixels it would have
    read. The input's gradient is a structural zero at the pixels no kept position reads (outside every
    bilinear or nearest footprint: found by running the kernel once more with g = 1 at the kept positions, its
    weights being >= 0), e.g. NaN padding a crop never samples; bicubic weights can cancel, so there it stays
    fully supported. A pixel read with weight 0 is read (0 x NaN there makes the forward NaN)."""
    tracked = _tracked_slots(args, sup)
    if tracked not in ([], [0]):  # the sensitivity alone
        return _run_unruled(func, args, kwargs, sup, "a tracked input or grid")
    g, inp, grid = args[0], args[1], args[2]
    s = sup.of(g)
    kept = mask_any(s.expand(g.shape), 1) if s is not None else \
        torch.ones((g.shape[0], *g.shape[2:]), dtype=torch.bool, device=g.device)  # (N, *output spatial)
    grid = torch.where(kept.unsqueeze(-1), grid, 0)
    outs = func(g, inp, grid, *args[3:], **kwargs)
    grad_input, grad_grid = outs
    if grad_input is not None:
        sup.record(grad_input, None)
        if args[3] in (0, 1):  # bilinear, nearest: the pixels some kept position reads
            ones = kept.unsqueeze(1).expand(g.shape).to(g.dtype)
            read = func(ones, inp, grid, *args[3:6], [True, False])[0] > 0
            if not mask_all(read):
                sup.record(_annihilate(grad_input, read), read)
    if grad_grid is not None:
        support = kept.unsqueeze(-1).expand(grad_grid.shape)
        sup.record(_annihilate(grad_grid, support), support)
    return outs


_register(aten.grid_sampler_2d_backward, aten.grid_sampler_3d_backward)(_grid_sampler_backward)


def _ctc_loss_backward(func, args, kwargs, sup):
    """_ctc_loss_backward(g, log_probs, targets, input_lengths, target_lengths, nll, log_alpha, blank,
    zero_infinity): each sample's alignment is computed on its own, so a sample whose per-sample g is a
    structural zero (an infeasible sample whose infinite loss was dropped) is removed from every operand before
    the kernel runs; its log_probs column gets structural zeros and its -inf alignments never enter. Frames past
    a sample's input length are never read: structural zeros too (NaN padding frames)."""
    tracked = _tracked_slots(args, sup)
    g, log_probs, targets, in_len, tg_len, nll, log_alpha = args[:7]
    if tracked not in ([], [0]) or log_probs.dim() != 3:
        return _run_unruled(func, args, kwargs, sup, "a tracked operand" if tracked not in ([], [0]) else None)
    kept = sup.of(g).expand(g.shape) if tracked else torch.ones(g.shape, dtype=torch.bool, device=g.device)
    if mask_all(kept):
        out = func(*args, **kwargs)
    else:
        index = kept.nonzero().squeeze(1)
        pick = lambda v: v.index_select(0, index) if isinstance(v, torch.Tensor) else [v[i] for i in index.tolist()]
        if targets.dim() == 1:  # concatenated targets: keep the kept samples' segments
            lengths = torch.as_tensor(tg_len, device=targets.device)
            starts = torch.cumsum(lengths, 0) - lengths
            targets = torch.cat([targets[int(starts[i]):int(starts[i]) + int(lengths[i])] for i in index.tolist()])
        else:
            targets = targets.index_select(0, index)
        part = func(g.index_select(0, index), log_probs.index_select(1, index), targets, pick(in_len),
                    pick(tg_len), nll.index_select(0, index), log_alpha.index_select(0, index), *args[7:], **kwargs)
        out = log_probs.new_zeros(log_probs.shape)
        out.index_copy_(1, index, part)
    frames = torch.arange(log_probs.shape[0], device=out.device).unsqueeze(1)
    read = frames < torch.as_tensor(in_len, device=out.device).unsqueeze(0)  # (T, N)
    support = (kept.view(1, -1) & read).unsqueeze(-1).expand(out.shape)
    sup.record(_annihilate(out, support), None if mask_all(support) else support)
    return out


_register(aten._ctc_loss_backward)(_ctc_loss_backward)


def _weight_norm_backward(func, args, kwargs, sup):
    """_weight_norm_interface_backward(grad_w, v, g, norms, dim) -> (grad_v, grad_g): w = g * v / ||v|| for each
    slice along ``dim`` (an output unit), so a slice whose grad_w is all structural zeros (a unit the loss never
    reads: a pruned all-zero row, whose norm 0 makes 0/0, or a sliced-off class) gets structural zeros in both
    results. Any other slice reads every element of its grad_w through the dot product <grad_w, v>: PyTorch's."""
    if _tracked_slots(args, sup) not in ([], [0]):
        return _run_unruled(func, args, kwargs, sup, "a tracked operand")
    grad_v, grad_g = func(*args, **kwargs)
    s = sup.of(args[0])
    if s is None:
        sup.record(grad_v, None)
        sup.record(grad_g, None)
        return grad_v, grad_g
    w, dim = args[0], args[4] % max(args[0].dim(), 1)
    unit = mask_any(s.expand(w.shape), [d for d in range(w.dim()) if d != dim], keepdim=True)
    for out in (grad_v, grad_g):
        support = unit.expand(out.shape)
        sup.record(_annihilate(out, support), support)
    return grad_v, grad_g


_register(aten._weight_norm_interface_backward)(_weight_norm_backward)
