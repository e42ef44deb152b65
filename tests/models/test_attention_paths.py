"""Attention's O(T)-memory paths against the eager path's whole [T, S] mask (the old behaviour), forward and
backward: packed documents and padding grouped into spans, padding between real tokens (masked query blocks),
flex_attention's document BlockMask; and that what the documents path keeps for backward grows linearly in T."""

import pytest
import torch

from lctk import HybridConfig, HybridForCausalLM
from lctk.models.mixers import attention
from lctk.models.sequence import build_sequence_info

VOCAB = 61


def pair(pattern: str = "A", **overrides):
    """The same weights on the sdpa path and on the eager path (whole mask)."""
    models = []
    for backend in ("sdpa", "eager"):
        torch.manual_seed(0)
        config = HybridConfig(pattern=pattern, vocab_size=VOCAB, hidden_size=32, num_attention_heads=4,
                              num_key_value_heads=2, attention={"window": 8, "backend": backend}, **overrides)
        model = HybridForCausalLM(config)
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 2:
                    param.normal_(0, 0.3)
        models.append(model)
    return models


def positions_of(lengths: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])


def loss_and_grads(model, ids, keep, **inputs):
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=embeds, use_cache=False, **inputs).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3)) * keep.unsqueeze(-1)
    (logits * weights).sum().backward()
    return logits.detach(), [embeds.grad] + [p.grad for p in model.parameters()]


def assert_close(actual, expected, tol=1e-4):
    scale = expected.abs().max().clamp(min=1.0)
    assert (actual - expected).abs().max() <= tol * scale, f"max error {(actual - expected).abs().max():.3e}"


def assert_same_training(sdpa, eager, ids, keep=None, **inputs):
    """Logits and every gradient of a loss on them agree (at the positions `keep`, default all)."""
    keep = keep if keep is not None else torch.ones(ids.shape, dtype=torch.bool)
    got, got_grads = loss_and_grads(sdpa, ids, keep, **inputs)
    want, want_grads = loss_and_grads(eager, ids, keep, **inputs)
    assert_close(got[keep], want[keep])
    for a, b in zip(got_grads, want_grads):
        assert_close(a, b)


@pytest.mark.parametrize("limit", [6, 512])  # every document its own span / short documents grouped in one span
def test_packed_documents_train_as_with_the_whole_mask(monkeypatch, limit):
    monkeypatch.setattr(attention, "SPAN_TOKENS", limit)
    sdpa, eager = pair("AMA")
    lengths = [[3, 1, 9, 2, 17], [20, 4, 8]]
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    assert_same_training(sdpa, eager, ids, position_ids=positions_of(lengths))


def test_edge_padding_and_documents_train_as_with_the_whole_mask():
    sdpa, eager = pair()
    ids = torch.randint(1, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    mask[1, 20:] = 0  # right padding
    positions = positions_of([[24], [11, 13]])
    # the eager path lets a padding query see only itself: compare the real tokens
    assert_same_training(sdpa, eager, ids, keep=mask.bool(), attention_mask=mask, position_ids=positions)


def test_padding_between_real_tokens_takes_masked_blocks(monkeypatch):
    monkeypatch.setattr(attention, "QUERY_BLOCK", 8)
    sdpa, eager = pair()
    ids = torch.randint(1, VOCAB, (2, 30), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[0, 10:14] = 0  # a hole inside the row's one document
    seq = build_sequence_info(2, 30, 0, ids.device, attention_mask=mask)
    assert seq.attention_runs is None
    assert_same_training(sdpa, eager, ids, keep=mask.bool(), attention_mask=mask)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_block_mask_matches_the_spans():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 40, 4, 8), torch.randn(2, 40, 2, 8), torch.randn(2, 40, 2, 8)
    positions = positions_of([[7, 20, 13], [40]])
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :6] = 0
    seq = build_sequence_info(2, 40, 0, q.device, position_ids=positions, attention_mask=mask)
    spans = [attention.group_runs(row, 16) for row in seq.attention_runs]
    want = attention.span_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), spans).transpose(1, 2)
    got = attention.flex_document_attention(q, k, v, seq)
    assert_close(got[mask.bool()], want[mask.bool()], tol=1e-5)


def test_grouping_keeps_long_documents_alone():
    runs = [(0, 3), (3, 5), (5, 40), (40, 44), (44, 50)]
    assert attention.group_runs(runs, 10) == [(0, 5, 0, [3, 2]), (5, 40, 5, None), (40, 50, 40, [4, 6])]
    assert attention.shard_spans([(0, 12), (12, 20), (20, 24), (24, 32)], 16, 32, 12) == [
        (16, 20, 12, None), (20, 32, 20, [4, 8])]  # the shard's keys of its first document start at 12


def saved_bytes(model, length: int, documents: int) -> int:
    """Bytes autograd keeps for backward in one forward of `documents` equal documents over `length` tokens."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    positions = torch.arange(length // documents).repeat(documents)[None]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(torch.randint(0, VOCAB, (1, length)), position_ids=positions, use_cache=False)
    return sum(storages.values())


def test_documents_keep_memory_linear_in_the_row():
    sdpa, eager = pair()
    short, long = saved_bytes(sdpa, 1024, 16), saved_bytes(sdpa, 4096, 64)
    assert long < 4.5 * short  # 4x the tokens
    assert saved_bytes(eager, 4096, 64) > 8 * saved_bytes(eager, 1024, 16) / 2  # the whole mask: ~16x
