"""Text sources shared by the tasks: haystack streams (classic filler, RULER noise paragraphs, builtin-corpus essays,
distractor needles, key-value listings) and needle keys/values (word pairs, 7-digit numbers, uuids).

Every stream is a function n -> at least the first n characters of a fixed, unbounded text (so a longer request only
appends), registered with `prompts.cached_haystack` so each is tokenised once per tokenizer. Word keys are pairs of
distinct words taken from the builtin corpus (frequency ranks 100-2099 of its 5-10 letter lowercase words; ~4M pairs),
in the style of RULER's adjective-noun pairs, without shipping a word list.
"""

from __future__ import annotations

import functools
import json
import random
import re
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lctk.errors import UserError
from lctk.tasks.corpus import builtin_documents
from lctk.tasks.prompts import Haystack, cached_haystack
from lctk.tasks.tokens import encode_batch

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
SENTENCE_BOUNDARY = r"(?<=[.!?])\s+(?=\S)"
LINE_BOUNDARY = r"\n"
NEEDLE = "One of the special magic {type} for {key} is: {value}."
PAIRS_START_RANGE = 1 << 16  # text-recall listings start at a random line in this prefix (any line is as good)
DISTRACTOR_RANGE = 1 << 21  # distractor windows start at a random line in this prefix (~30K lines): fresh per sample
HAYSTACK_SUFFIXES = (".txt", ".md", ".json", ".jsonl")


def word_key(rng: random.Random) -> str:
    first, second = rng.sample(_key_words(), 2)
    return f"{first}-{second}"


def number_value(rng: random.Random) -> str:
    return str(rng.randint(10**6, 10**7 - 1))


def uuid_value(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


GENERATORS: dict[str, Callable[[random.Random], str]] = {"words": word_key, "numbers": number_value, "uuids": uuid_value}


def draw_unique(kind: str, count: int, rng: random.Random) -> list[str]:
    drawn: list[str] = []
    while len(drawn) < count:
        value = GENERATORS[kind](rng)
        if value not in drawn:
            drawn.append(value)
    return drawn


def filler_haystack(tokenizer) -> Haystack:
    """The classic passkey filler, repeated and joined by spaces; needles go between sentences."""
    return cached_haystack(tokenizer, "filler", lambda: (_repeat(FILLER, " "), SENTENCE_BOUNDARY))


def noise_haystack(tokenizer) -> Haystack:
    """RULER's `repeat` haystack: the filler paragraph once per line; needles go between lines."""
    return cached_haystack(tokenizer, "noise", lambda: (_repeat(FILLER, "\n"), LINE_BOUNDARY))


def essay_haystack(tokenizer, source: str | None = None) -> Haystack:
    """RULER's essay haystack: the builtin corpus, or the user's text (`source`: a file or a folder of .txt / .md /
    .json {"text": ...} / .jsonl files, e.g. RULER's Paul Graham essays), whitespace collapsed to single spaces;
    cycles at its end."""
    name = f"essay:{Path(source).resolve()}" if source else "essay"
    return cached_haystack(tokenizer, name, lambda: (_cycle(lambda: essay_text(source), " "), SENTENCE_BOUNDARY))


def essay_text(source: str | None = None) -> str:
    """The text of the essay haystack: all of it, so that windows may start anywhere in it."""
    return _essay_text() if source is None else _user_text(str(Path(source).resolve()))


@functools.cache
def _user_text(source: str) -> str:
    path = Path(source)
    files = sorted(f for f in path.rglob("*") if f.suffix in HAYSTACK_SUFFIXES) if path.is_dir() else [path]
    documents = []
    for file in files:
        try:
            raw = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f"--haystack: cannot read {file} ({error})") from None
        if file.suffix in (".json", ".jsonl"):
            try:
                records = [json.loads(line) for line in raw.splitlines() if line.strip()] if file.suffix == ".jsonl" else [json.loads(raw)]
            except ValueError:
                raise UserError(f"--haystack: {file} is not valid JSON") from None
            documents += [r["text"] for r in records if isinstance(r, dict) and isinstance(r.get("text"), str)]
        else:
            documents.append(raw)
    text = " ".join(re.sub(r"\s+", " ", document).strip() for document in documents).strip()
    if len(text) < 4096:
        raise UserError(f"--haystack: {source} holds {len(text)} characters of text; a haystack needs at least 4096")
    return text


def corpus_haystack(tokenizer) -> Haystack:
    """The builtin corpus as written, held-out documents first (perplexity and state collapse read it from the
    start); cycles at its end."""
    return cached_haystack(tokenizer, "corpus", lambda: (_cycle(_corpus_text, "\n\n"), r"\n\n"))


def distractor_haystack(tokenizer, key_type: str, value_type: str) -> Haystack:
    """RULER's `needle` haystack: one distractor needle per line with random keys and values (a fixed stream)."""

    def line(rng: random.Random) -> str:
        return NEEDLE.format(type=value_type, key=GENERATORS[key_type](rng), value=GENERATORS[value_type](rng))

    name = f"distractors-{key_type}-{value_type}"
    return cached_haystack(tokenizer, name, lambda: (_line_stream(name, line), LINE_BOUNDARY))


def pairs_haystack(tokenizer) -> Haystack:
    """Key-value listing for text recall: one `key: value.` line each, word-pair keys and 7-digit values."""

    def line(rng: random.Random) -> str:
        return f"{word_key(rng)}: {number_value(rng)}."

    return cached_haystack(tokenizer, "kv-pairs", lambda: (_line_stream("kv-pairs", line), LINE_BOUNDARY))


def _repeat(unit: str, joiner: str) -> Callable[[int], str]:
    def stream(n_chars: int) -> str:
        return joiner.join([unit] * (n_chars // (len(unit) + len(joiner)) + 2))

    return stream


def _line_stream(name: str, line: Callable[[random.Random], str]) -> Callable[[int], str]:
    lines: list[str] = []
    rng = random.Random(name)
    size = 0

    def stream(n_chars: int) -> str:
        nonlocal size
        while size < n_chars:
            lines.append(line(rng))
            size += len(lines[-1]) + 1
        return "\n".join(lines)

    return stream


@functools.cache
def _essay_text() -> str:
    return " ".join(re.sub(r"\s+", " ", document).strip() for document in builtin_documents())


@functools.cache
def _corpus_text() -> str:
    return "\n\n".join(builtin_documents("heldout") + builtin_documents("train"))


def _cycle(text: Callable[[], str], joiner: str) -> Callable[[int], str]:
    def stream(n_chars: int) -> str:
        whole = text()
        if n_chars <= len(whole):
            return whole[:n_chars]
        return joiner.join([whole] * (n_chars // (len(whole) + len(joiner)) + 1))[:n_chars]

    return stream


@functools.cache
def _key_words() -> tuple[str, ...]:
    counts = Counter(re.findall(r"\b[a-z]{5,10}\b", _essay_text()))
    ranked = sorted(counts, key=lambda word: (-counts[word], word))
    return tuple(ranked[100:2100])


def window_start(haystack: Haystack, rng: random.Random, spread: int) -> int:
    """A random unit start in the first `spread` characters (draws once from rng)."""
    return haystack.unit_start(rng.randrange(spread))


def heldout_tokens(tokenizer, count: int) -> tuple[np.ndarray, int]:
    """(the first `count` tokens of the builtin corpus's held-out documents, the token where they first repeat): past
    the end of the held-out text (~250K characters) its documents come again, in a new order each pass, so long
    windows never read training text."""
    haystack = cached_haystack(tokenizer, "heldout", lambda: (_passes(builtin_documents("heldout")), r"\n\n"))
    ids = _tokens(haystack, tokenizer, 0, count)
    once = sum(len(d) + 2 for d in builtin_documents("heldout"))
    return ids, int(np.searchsorted(haystack.starts, once)) if haystack.offsets_available else count


def _passes(documents: list[str]) -> Callable[[int], str]:
    def stream(n_chars: int) -> str:
        parts, size, k = [], 0, 0
        while size < n_chars:
            order = list(documents)
            if k:  # the first pass in the corpus's order, later ones reshuffled
                random.Random(k).shuffle(order)
            parts += order
            size += sum(len(d) + 2 for d in order)
            k += 1
        return "\n\n".join(parts)[:n_chars]

    return stream


def corpus_tokens(tokenizer, first: int, count: int) -> np.ndarray:
    """Tokens [first, first + count) of the builtin corpus (held-out documents first), without special tokens."""
    return _tokens(corpus_haystack(tokenizer), tokenizer, first, count)


def _tokens(haystack: Haystack, tokenizer, first: int, count: int) -> np.ndarray:
    if haystack.offsets_available:
        haystack.ensure(first + count)
        return haystack.ids[first : first + count]
    # a tokenizer without offsets: tokenise enough of the text in one go (at least one character per token)
    haystack.ensure(8 * (first + count))
    ids = encode_batch(tokenizer, [haystack.text], with_offsets=False)[0].ids
    return ids[first : first + count]
