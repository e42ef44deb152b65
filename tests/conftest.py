"""Suite-wide settings and fixtures. pytest-xdist runs two workers on two cores: one torch thread each avoids
oversubscription, which slows tiny-model tests by 5-60x on a busy machine. Offline tokenizers for the task and eval
tests are trained here on builtin text (session-scoped, saved under a tmp dir)."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lctk.tasks.corpus import builtin_documents

torch.set_num_threads(1)


def _train(tmp_path_factory, name: str, tokenizer: Tokenizer, trainer, documents: int, **specials):
    """Train on the first `documents` builtin documents (80: ~0.5 MB), save under a session tmp dir, wrap for HF."""
    folder = tmp_path_factory.mktemp(name)
    tokenizer.train_from_iterator(builtin_documents()[:documents], trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **specials)


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style), 4096 tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    return _train(tmp_path_factory, "bpe", tokenizer, trainer, 80, eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (byte-level BPE without merges)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)} | {"<eos>": 256}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


@pytest.fixture(scope="session")
def unigram_tokenizer(tmp_path_factory) -> PreTrainedTokenizerFast:
    """SentencePiece-style Unigram with the Metaspace pre-tokenizer and a BOS token added to every text."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=2000, special_tokens=["<s>", "</s>", "<unk>"], unk_token="<unk>")
    tokenizer = _train(tmp_path_factory, "unigram", tokenizer, trainer, 20, bos_token="<s>", eos_token="</s>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.convert_tokens_to_ids("<s>"))]
    )
    return tokenizer


@pytest.fixture(scope="session")
def wordpiece_tokenizer(tmp_path_factory) -> PreTrainedTokenizerFast:
    """BERT-style: lower-cased, split on whitespace and punctuation (offsets skip the spaces), [CLS] ... [SEP]."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=2000, special_tokens=["[UNK]", "[CLS]", "[SEP]"])
    tokenizer = _train(tmp_path_factory, "wordpiece", tokenizer, trainer, 40, unk_token="[UNK]")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[(t, tokenizer.convert_tokens_to_ids(t)) for t in ("[CLS]", "[SEP]")],
    )
    return tokenizer


@pytest.fixture(scope="session")
def spaced_bpe_tokenizer(tmp_path_factory) -> PreTrainedTokenizerFast:
    """BPE with no pre-tokenizer: merges run across spaces (tokens like 'e the'), so splicing cached haystack tokens
    can disagree with tokenising the whole text; the prompt builder must notice and still be exact."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>"])
    return _train(tmp_path_factory, "spaced", tokenizer, trainer, 6, unk_token="<unk>")


@pytest.fixture(scope="session")
def slow_byte_tokenizer():
    """A Python tokenizer without character offsets (ByT5)."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()
