"""Hugging Face transformers models with attn_implementation="sdpa" (the library's default, CPU flash attention's
backward), built from tiny configs with random weights (nothing downloaded), float64.

NaN sits only where the model discards it: a whole padding sequence of a fixed-size batch (its labels -100),
beside ordinary right padding of finite pad tokens under the attention mask. The reference is the same loss
over each real sequence alone, without padding. A NaN inside a padded *position* of a kept sequence is not used
here: its key and value reach every query's forward through the kernel's 0 x NaN (as in eager attention), so no
backward can repair it. Controls: the padding sequence's labels kept, its NaN reaches the gradients.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gradwise as gw

transformers = pytest.importorskip("transformers", reason="transformers is an optional test dependency")

nan = float("nan")
f64 = torch.float64
VOCAB, STEPS = 40, 7
LENGTHS = [5, 0, 7]  # sequence 1 is all padding, filled with NaN


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (len(LENGTHS), STEPS), generator=torch.Generator().manual_seed(seed))


def _labels(ids: torch.Tensor, keep_nan_sequence: bool = False) -> torch.Tensor:
    labels = ids.clone()
    for b, n in enumerate(LENGTHS):
        labels[b, n:] = -100
    if keep_nan_sequence:
        labels[1] = ids[1]
    return labels


def _attention_mask() -> torch.Tensor:
    mask = torch.zeros(len(LENGTHS), STEPS, dtype=torch.long)
    for b, n in enumerate(LENGTHS):
        mask[b, : n or STEPS] = 1  # the NaN sequence is attended like a full one: it is discarded anyway
    return mask


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")


def _lm(model, ids: torch.Tensor):
    """A language model's case: the token loss over the padded batch, and the reference summed over each real
    sequence alone, without padding."""

    def loss(embeds, mask, labels):
        return _ce(model(inputs_embeds=embeds, attention_mask=mask).logits, labels)

    def reference():
        embed = model.get_input_embeddings()
        return sum(loss(embed(ids[b : b + 1, :n]), None, ids[b : b + 1, :n]) for b, n in enumerate(LENGTHS) if n)

    return model, ids, loss, reference


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", torch_dtype=f64)
    ids = _ids(1)

    return _lm(model, ids)


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=1, num_heads=4,
                   dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = T5ForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", torch_dtype=f64)
    ids = _ids(2)
    decoder_ids = torch.randint(3, VOCAB, (len(LENGTHS), 4), generator=torch.Generator().manual_seed(3))

    def loss(embeds, mask, labels):
        kept = labels[:, 0] != -100
        dec_labels = decoder_ids.masked_fill(~kept[:, None], -100)
        out = model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids[: len(embeds)])
        return _ce(out.logits, dec_labels[: len(embeds)] if len(embeds) == len(LENGTHS) else labels)

    def reference():
        embed = model.get_input_embeddings()
        total = 0
        for b, n in enumerate(LENGTHS):
            if n:
                out = model(inputs_embeds=embed(ids[b : b + 1, :n]), decoder_input_ids=decoder_ids[b : b + 1])
                total = total + _ce(out.logits, decoder_ids[b : b + 1])
        return total

    return model, ids, loss, reference


def _mistral():
    """Sliding-window attention (window 3 < the 7 steps) with grouped-query heads."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=3, max_position_embeddings=32,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = MistralForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=f64)
    ids = _ids(4)

    return _lm(model, ids)


def _bart():
    """Encoder-decoder: the decoder's cross-attention reads the padded encoder under its attention mask."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                     dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0, bos_token_id=1,
                     eos_token_id=2, decoder_start_token_id=2)
    model = BartForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=f64)
    ids = _ids(5)
    decoder_ids = torch.randint(3, VOCAB, (len(LENGTHS), 4), generator=torch.Generator().manual_seed(6))

    def loss(embeds, mask, labels):
        kept = labels[:, 0] != -100
        out = model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids)
        return _ce(out.logits, decoder_ids.masked_fill(~kept[:, None], -100))

    def reference():
        embed = model.get_input_embeddings()
        total = 0
        for b, n in enumerate(LENGTHS):
            if n:
                out = model(inputs_embeds=embed(ids[b : b + 1, :n]), decoder_input_ids=decoder_ids[b : b + 1])
                total = total + _ce(out.logits, decoder_ids[b : b + 1])
        return total

    return model, ids, loss, reference


def _causal_or_masked_lm(name: str):
    """One of three more families, each with the plain loss and the per-sequence reference of _llama: BERT
    (bidirectional, absolute positions, token types), GPT-2 (causal, learned positions, Conv1D projections),
    Qwen2 (grouped-query heads, rotary positions, biased q/k/v)."""
    import transformers as T

    torch.manual_seed(0)
    small = dict(vocab_size=VOCAB, num_hidden_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if name == "bert":
        cfg = T.BertConfig(hidden_size=16, intermediate_size=32, num_attention_heads=4, max_position_embeddings=32,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **small)
        cls = T.BertForMaskedLM
    elif name == "gpt2":
        cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
        cls = T.GPT2LMHeadModel
    else:
        cfg = T.Qwen2Config(hidden_size=16, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=32, **small)
        cls = T.Qwen2ForCausalLM
    model = cls._from_config(cfg, attn_implementation="sdpa", dtype=f64).eval()
    ids = _ids(7)

    return _lm(model, ids)


def _nan_padding_sequence(model, ids: torch.Tensor) -> torch.Tensor:
    """The token embeddings, with sequence 1 (the batch's padding sequence) filled with NaN."""
    padding = torch.tensor([n == 0 for n in LENGTHS])[:, None, None]
    return model.get_input_embeddings()(ids).masked_fill(padding, nan)


MODELS = {"llama-gqa": _llama, "t5": _t5, "mistral-sliding-window": _mistral, "bart": _bart,
          **{name: (lambda name=name: _causal_or_masked_lm(name)) for name in ("bert", "gpt2", "qwen2-gqa")}}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sdpa_model_with_a_nan_padding_sequence(name):
    model, ids, loss_fn, reference = MODELS[name]()
    assert model.config._attn_implementation == "sdpa"
    params = [p for p in model.parameters() if p.requires_grad]
    embeds = _nan_padding_sequence(model, ids)
    loss = loss_fn(embeds, _attention_mask(), _labels(ids))
    assert loss.isfinite()
    plain = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    assert sum(int((~g.isfinite()).sum()) for g in plain if g is not None) > 0, "plain PyTorch is contaminated"
    gw.unruled_ops().clear()
    got = gw.grad(loss, params, allow_unused=True)
    exp = torch.autograd.grad(reference(), params, allow_unused=True)
    for g, e in zip(got, exp, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)
    assert not any("attention" in op for op in gw.unruled_ops())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sdpa_model_control_nan_used(name):
    """Control: the NaN sequence's labels are kept, so its NaN is used and stays in the gradients."""
    model, ids, loss_fn, _ = MODELS[name]()
    params = [p for p in model.parameters() if p.requires_grad]
    embeds = _nan_padding_sequence(model, ids)
    loss = loss_fn(embeds, _attention_mask(), _labels(ids, keep_nan_sequence=True))
    got = gw.grad(loss, params, allow_unused=True)
    assert any(g is not None and not g.isfinite().all() for g in got)


def _whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8,
                        max_source_positions=16, max_target_positions=16, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, decoder_start_token_id=1, dropout=0.0, suppress_tokens=None,
                        begin_suppress_tokens=None)
    return WhisperForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", torch_dtype=f64)


@pytest.mark.parametrize("keep_nan", [False, True])
def test_whisper_with_a_nan_padding_clip(keep_nan):
    """Whisper (conv front end, sdpa encoder and decoder, cross-attention): clip 1 of the batch is NaN padding
    (its labels -100); the gradients equal those of the real clips alone. Control: its labels kept."""
    model = _whisper()
    assert model.config._attn_implementation == "sdpa"
    params = [p for p in model.parameters() if p.requires_grad]  # (the sinusoidal positions are frozen)
    gen = torch.Generator().manual_seed(5)
    feats = torch.randn(3, 8, 32, generator=gen, dtype=f64)
    feats[1] = nan
    labels = torch.randint(3, VOCAB, (3, 4), generator=gen)
    targets = labels.clone()
    if not keep_nan:
        targets[1] = -100
    loss = _ce(model(input_features=feats, decoder_input_ids=labels).logits, targets)
    if not keep_nan:
        plain = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        assert any(g is not None and not g.isfinite().all() for g in plain), "plain PyTorch is contaminated"
    got = gw.grad(loss, params, allow_unused=True)
    if keep_nan:
        assert any(g is not None and not g.isfinite().all() for g in got)
        return
    ref = sum(_ce(model(input_features=feats[b : b + 1], decoder_input_ids=labels[b : b + 1]).logits,
                  labels[b : b + 1]) for b in (0, 2))
    exp = torch.autograd.grad(ref, params, allow_unused=True)
    for g, e in zip(got, exp, strict=True):
        if e is None:
            assert g is None or not g.any()
            continue
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)
