"""Strong zeros through the ops of real library models not covered elsewhere: `torch._grouped_mm`, the expert
matmul of Hugging Face's mixture-of-experts layers (their default `experts_implementation="grouped_mm"`, float32:
the op takes no float64), whose backward is `_grouped_mm` again.

References: the same program with the unused values replaced by two different finite values (a value the output
never uses cannot change its gradient), PyTorch's own gradient on finite data (bitwise), and a control where the
NaN is used and stays.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import gradwise as gw
from _fresh_warnings import fresh_warnings  # noqa: F401 (an autouse fixture: every test here)

nan = float("nan")
pytestmark = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm needs torch >= 2.8")

# tokens 1 and 6 are padding (NaN), routed into groups 0 and 2; groups are rows [0, 3), [3, 5), [5, 8)
_OFFS = torch.tensor([3, 5, 8], dtype=torch.int32)
_PADDING, _KEPT = [1, 6], [0, 2, 3, 4, 5, 7]


def _grouped_grads(fill: float, backward, kept=_KEPT):
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 8)
    experts = torch.randn(3, 8, 4, requires_grad=True)  # (groups, K, N): the CPU kernel wants 16-byte strides
    x = torch.randn(8, 5)
    x[_PADDING] = fill
    out = torch._grouped_mm(lin(x), experts, offs=_OFFS)
    return backward(out[kept].tanh().sum(), [lin.weight, lin.bias, experts])


def test_grouped_mm_drops_padding_tokens():
    """The padding tokens' rows meet structural zeros in both backward products (grad of the tokens: g @ b^T per
    group; grad of the experts: a^T @ g per group). Without a rule for _grouped_mm the NaN stayed in the weight
    and expert gradients (an OpaqueBackwardWarning named the op)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _grouped_grads(nan, gw.grad)
    for fill in (0.0, 100.0):
        for g, e in zip(got, _grouped_grads(fill, torch.autograd.grad), strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_grouped_mm_finite_data_is_pytorchs():
    for g, e in zip(_grouped_grads(0.5, gw.grad), _grouped_grads(0.5, torch.autograd.grad), strict=True):
        assert torch.equal(g, e)


def test_grouped_mm_control_nan_used():
    got = _grouped_grads(nan, gw.grad, kept=list(range(8)))
    assert not got[0].isfinite().all() and not got[2].isfinite().all()


def test_mixtral_grouped_mm_experts_with_a_nan_padding_sequence():
    """A tiny Mixtral (float32, experts_implementation "grouped_mm", the default), one batch sequence all NaN
    padding with labels -100: gw.grad equals the gradient of the batch with that sequence finite."""
    transformers = pytest.importorskip("transformers", reason="transformers is an optional test dependency")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=32, pad_token_id=0)
    model = transformers.MixtralForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    assert model.config._experts_implementation == "grouped_mm"
    params = [p for name, p in model.named_parameters() if "embed_tokens" not in name]  # embeds are given
    ids = torch.randint(3, 40, (3, 7), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[1] = -100

    def grads(fill, backward):
        embeds = model.get_input_embeddings()(ids).detach()
        embeds[1] = fill
        logits = model(inputs_embeds=embeds).logits
        return backward(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100), params)

    got = grads(nan, gw.grad)
    for fill in (0.0, 3.0):
        for g, e in zip(got, grads(fill, torch.autograd.grad), strict=True):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
