"""The chunked cross-entropy against the full computation: same loss and same gradients (hidden states, head weight
and bias), for odd sizes, ignored targets, document starts, chunks larger than T, tied embeddings and bf16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from lctk.models import HybridConfig, HybridForCausalLM
from lctk.train.losses import LMHead, ce_value_and_grad, cross_entropy_sum, final_hidden
from lctk.train.trainer import causal_lm_loss


def full_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss as it was: every logit in fp32 at once."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction="sum")


def leaves(batch: int, length: int, width: int, vocab: int, bias: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, width, generator=generator).requires_grad_()
    weight = (torch.randn(vocab, width, generator=generator) / width**0.5).requires_grad_()
    b = torch.randn(vocab, generator=generator).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[torch.rand(batch, length, generator=generator) < 0.3] = -100
    return hidden, weight, b, labels


def grads_of(value: torch.Tensor, tensors) -> list[torch.Tensor]:
    return list(torch.autograd.grad(value, [t for t in tensors if t is not None]))


@pytest.mark.parametrize("chunk", [1, 5, 64, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_cross_entropy_equals_the_full_one(chunk, bias):
    hidden, weight, b, labels = leaves(3, 13, 7, 29, bias)
    head = LMHead(weight, b, scale=0.7, softcap=4.0) if bias else LMHead(weight)
    ours = cross_entropy_sum(hidden, head, labels, chunk=chunk)
    reference = full_loss(head.logits(hidden), labels)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-5)
    # a non-unit incoming gradient, as the Trainer's loss * scale gives
    for got, want in zip(grads_of(ours * 2.5, (hidden, weight, b)), grads_of(reference * 2.5, (hidden, weight, b))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_closed_form_cross_entropy_gradient_equals_autograd():
    """softmax - onehot made in place: large logits (no overflow), ignored rows (zero gradient), a row of ties."""
    generator = torch.Generator().manual_seed(3)
    raw = torch.randn(6, 11, generator=generator) * 40
    raw[2] = 0.0
    targets = torch.tensor([3, -100, 0, 10, -100, 7])
    leaf = raw.clone().requires_grad_()
    want = F.cross_entropy(leaf, targets, ignore_index=-100, reduction="sum")
    (want_grad,) = torch.autograd.grad(want, leaf)
    value, grad = ce_value_and_grad(raw.clone(), targets)
    torch.testing.assert_close(value, want.detach())
    torch.testing.assert_close(grad, want_grad)
    assert grad[[1, 4]].abs().sum() == 0
    # every target ignored: no loss, no gradient
    value, grad = ce_value_and_grad(raw.clone(), torch.full((6,), -100))
    assert value == 0 and grad.abs().sum() == 0


def test_without_grad_only_the_loss_is_computed():
    hidden, weight, _, labels = leaves(2, 9, 5, 17, False)
    with torch.no_grad():
        ours = cross_entropy_sum(hidden, LMHead(weight), labels, chunk=4)
    assert not ours.requires_grad
    torch.testing.assert_close(ours, full_loss(F.linear(hidden, weight), labels).detach())


def packed_batch(vocab: int, seed: int = 0) -> dict:
    """Two rows of 3 + 4 + 6 tokens packed as documents; the first token of each document is no target."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [3, 4, 6]
    position_ids = torch.cat([torch.arange(n) for n in lengths]).expand(2, -1)
    input_ids = torch.randint(0, vocab, (2, sum(lengths)), generator=generator)
    labels = input_ids.masked_fill(position_ids == 0, -100)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def hybrid(tied: bool) -> HybridForCausalLM:
    torch.manual_seed(0)
    config = HybridConfig(pattern="MA", vocab_size=61, hidden_size=32, num_attention_heads=2,
                          tie_word_embeddings=tied, mamba2={"state_size": 8, "head_dim": 16, "chunk_size": 4})
    return HybridForCausalLM(config)


@pytest.mark.parametrize("tied", [True, False])
def test_trainer_loss_matches_the_full_logits_loss_and_its_parameter_gradients(tied):
    model, batch = hybrid(tied), packed_batch(61)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    params = [p for p in model.parameters() if p.requires_grad]
    ours = causal_lm_loss(model, batch)
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    reference = full_loss(out.logits, batch["labels"])
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-5)
    for got, want in zip(grads_of(ours, params), grads_of(reference, params)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_is_close_to_the_full_path():
    model, batch = hybrid(True), packed_batch(61, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = causal_lm_loss(model, batch)
        reference = full_loss(model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits,
                              batch["labels"])
    torch.testing.assert_close(ours, reference, rtol=2e-2, atol=0.0)
    weight = model.lm_head.weight
    got, want = grads_of(ours, [weight])[0], grads_of(reference, [weight])[0]
    assert float((got - want).norm() / want.norm()) < 2e-2


def test_any_hf_causal_lm_gives_its_final_hidden_states_without_logits():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=53, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))
    batch = packed_batch(53)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    hidden, out = final_hidden(llama, inputs)
    assert out.logits.numel() == 0
    torch.testing.assert_close(causal_lm_loss(llama, batch), full_loss(llama(**inputs, use_cache=False).logits, batch["labels"]),
                               rtol=1e-6, atol=1e-5)
    llama.config.dim_model_base = 256  # MiniCPM rescales the hidden states before its head: refused, not guessed
    with pytest.raises(ValueError, match="dim_model_base"):
        LMHead.of(llama)
