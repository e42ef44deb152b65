"""From a recipe's `tokenizer` and `data` sections to a tokenizer and an addressable stream of packed rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lctk.data.generated import generated_store
from lctk.data.packing import Mixture, Pieces, Row, RowSource, TaskRows, TextRows, split_held_out
from lctk.data.store import token_store
from lctk.data.tasks import Task
from lctk.data.text import TextSource
from lctk.data.tokenizer import build_tokenizer
from lctk.errors import UserError
from lctk.tasks import corpus

BPE_TRAINING_CHARS = 50_000_000  # BPE is trained on at most this much of the text sources
HELD_OUT_ROWS = 64


@dataclass
class TrainingData:
    rows: RowSource
    held_out: list[Row] = field(default_factory=list)  # rows of held-out text, for the held-out loss
    summary: list[str] = field(default_factory=list)  # one line per source


def cache_folder(data) -> Path:
    return Path(data.cache_dir) if data.cache_dir else corpus.cache_dir()


def load_tokenizer(spec: str, data):
    """The recipe's tokenizer; `bpe:N` is trained on the text sources of `data`, or on the builtin corpus when it has
    only synthetic tasks (MQAR draws its ids from the tokenizer: the recall sweep's vocabulary of 8,192)."""

    def training_text() -> list[str]:
        documents, chars = [], 0
        for index, source in enumerate(data.sources):
            if source.task is None and source.generate is None:
                for document in TextSource(source, f"data.sources.{index}").documents():
                    documents.append(document)
                    chars += len(document)
                    if chars > BPE_TRAINING_CHARS:
                        return documents
        if not documents:  # synthetic tasks only
            documents = list(corpus.builtin_documents())
        return documents

    return build_tokenizer(spec, training_text, cache_folder(data))


def prepare_data(data, tokenizer, seed: int, teacher=None) -> TrainingData:
    """Rows mixing every source of `data` by weight, and held-out rows of its text sources (each text source is read
    from its token store, built on first use; a `generate:` source from the store of `teacher`'s generations, made
    on first use, with held-out rows of its prompt text: lctk.data.generated)."""
    sources, weights, summary, held_out = [], [], [], []
    eos = tokenizer.eos_token_id
    for index, source in enumerate(data.sources):
        key = f"data.sources.{index}"
        if source.task is not None:
            task = Task(source.task, source.options, tokenizer, data.seq_len, key)
            sources.append(TaskRows(task, data.seq_len, seed, salt=index, pad_id=eos))
            summary.append(f"{source.task} (synthetic, {task.min_length}-{task.max_length} tokens), weight {source.weight:g}")
        else:
            if source.generate is not None:
                store, held = generated_store(source, key, data, tokenizer, teacher, cache_folder(data))
                train = Pieces.cut(store, data.seq_len, eos)
            else:
                store = token_store(source, key, tokenizer, cache_folder(data))
                train, held = split_held_out(Pieces.cut(store, data.seq_len, eos), data.held_out)
            if train.tokens < data.seq_len:
                raise UserError(f"{key}: {source.label} has fewer than data.seq_len = {data.seq_len} tokens")
            sources.append(TextRows(train, data.seq_len, seed + index))
            if held.tokens >= data.seq_len:  # the first rows of each source's held-out pieces, in order
                held_rows = TextRows(held, data.seq_len, seed=0, shuffle=False)
                held_out += [held_rows.row(i) for i in range(min(len(held_rows), HELD_OUT_ROWS - len(held_out)))]
            summary.append(f"{source.label}: {train.tokens / 1e6:.2f}M training tokens in {len(store)} documents, "
                           f"weight {source.weight:g} (token store {store.path})")
        weights.append(source.weight)
    rows = sources[0] if len(sources) == 1 else Mixture(sources, weights, seed)
    return TrainingData(rows=rows, held_out=held_out, summary=summary)
