"""Associative recall: MQAR on raw token ids (Zoology, Arora et al., 2023) and a text key-value recall for any LM.

MQAR (multi-query associative recall), one sequence of `length` token ids, as Zoology's `multiquery_ar`:
    k_1 v_1 k_2 v_2 ... k_D v_D | noise ... k_i r ... noise ... k_j r ...
keys are drawn without replacement from [1, V/2), values from [V/2, V) (V = vocab_size); each of the D keys is queried
once after the listing, at even offsets 2g with gaps g drawn without replacement from p(g) ~ g^(a - 1) (a = power_a,
0.01: most queries come soon after the listing, some far). The position after a query holds a random id, like every
other non-key position (Zoology's random_non_queries): the value is never shown again, only asked for. labels hold
the value at that position and IGNORE (-100) elsewhere (Hugging Face convention: the model shifts them, so the prediction at
the query key is scored), accuracy = share of queried values predicted by argmax.
D defaults to length // 16, Zoology's figure (64:4, 128:8, 256:16). BASED (Arora et al., 2024, Figure 2) trains on
the mixture BASED_TRAIN_MIXTURE and tests on BASED_TEST (up to D = length / 4), both with a vocabulary of 8,192.

Text recall, for any tokenizer: an instruction, a listing of `key: value.` lines (word-pair keys, 7-digit values)
filling the budget, then `queries` lines repeating keys from the listing with their values. Scored teacher-forced:
a query counts when every token of its value is the argmax prediction.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np

from lctk.errors import UserError
from lctk.labels import IGNORE
from lctk.tasks.haystacks import PAIRS_START_RANGE, pairs_haystack, window_start
from lctk.tasks.prompts import Piece, PromptTooShort, fit_prompt
from lctk.tasks.sample import Sample

TEXT_INSTRUCTION = (
    "Below is a list of keys and their values. Memorize them: you will be asked for the values afterwards.\n"
)
TEXT_QUESTION = "\nThe values of some of the keys above:\n"
DEFAULT_QUERIES = 8
MQAR_VOCAB = 8192
# (length, pairs, examples): BASED's train mixture (zoology arxiv24_based_figure2), sampled by example count
BASED_TRAIN_MIXTURE = ((64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000), (256, 32, 20_000), (256, 64, 20_000))
BASED_TEST = ((64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256))  # (length, pairs)


def default_pairs(length: int) -> int:
    """Zoology's key-value pair count for a sequence of `length` tokens."""
    return max(length // 16, 1)


@dataclass(frozen=True)
class MqarSample:
    input_ids: np.ndarray  # (length,) int64
    labels: np.ndarray  # (length,) int64, IGNORE except at the queried values
    num_kv_pairs: int


def make_mqar_sample(
    length: int,
    rng: random.Random,
    vocab_size: int = MQAR_VOCAB,
    num_kv_pairs: int | None = None,
    power_a: float = 0.01,
    value_in_input: bool = False,
) -> MqarSample:
    """One MQAR sequence; num_kv_pairs defaults to default_pairs(length) = length // 16 (Zoology: 4 pairs at 64).

    value_in_input=True puts each value after its query in the input too: training documents need it, as their
    targets are the next input tokens (the prediction at the key sees only what precedes the value either way)."""
    pairs = num_kv_pairs if num_kv_pairs is not None else default_pairs(length)
    if 4 * pairs > length or pairs >= vocab_size // 2:
        raise ValueError(f"MQAR: {pairs} pairs do not fit {length} tokens and a vocabulary of {vocab_size}")
    np_rng = np.random.default_rng(rng.getrandbits(63))
    keys = np_rng.choice(np.arange(1, vocab_size // 2), size=pairs, replace=False)
    values = np_rng.choice(np.arange(vocab_size // 2, vocab_size), size=pairs, replace=False)
    ids = np_rng.integers(0, vocab_size, size=length)
    labels = np.full(length, IGNORE, dtype=np.int64)
    ids[0 : 2 * pairs : 2], ids[1 : 2 * pairs : 2] = keys, values
    space = (length - 2 * pairs) // 2
    weights = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    gaps = np_rng.choice(space, size=pairs, replace=False, p=weights / weights.sum())
    at = 2 * pairs + 2 * gaps
    ids[at] = keys  # ids[at + 1] keeps its random id (Zoology): the value is to be recalled, not read
    if value_in_input:
        ids[at + 1] = values
    labels[at + 1] = values
    return MqarSample(ids.astype(np.int64), labels, pairs)


def make_text_recall_sample(
    tokenizer, length: int, rng: random.Random, queries: int = DEFAULT_QUERIES, exact: bool = False
) -> Sample:
    """A key-value listing filling `length` tokens, then `queries` keys with their values (teacher-forced: reserve 0).

    Sample.meta["value_spans"] holds the character spans of the queried values in the prompt."""
    haystack = pairs_haystack(tokenizer)
    if not haystack.offsets_available:
        raise UserError("text recall needs a fast tokenizer (one that returns character offsets)")
    start = window_start(haystack, rng, PAIRS_START_RANGE)
    pick_seed = rng.getrandbits(63)

    def layout(a: int, b: int) -> list[Piece]:
        listing = haystack.text[a:b]
        lines = listing.split("\n")[:-1]  # the last line may be cut by the window end
        counts: dict[str, int] = {}
        for line in lines:
            counts[line.split(":")[0]] = counts.get(line.split(":")[0], 0) + 1
        unique = [line for line in lines if counts[line.split(":")[0]] == 1]
        chosen = random.Random(pick_seed).sample(unique, min(queries, len(unique)))
        return [TEXT_INSTRUCTION, (a, b), TEXT_QUESTION + "\n".join(chosen)]

    prompt = fit_prompt(haystack, layout, length, start=start, exact=exact, task="text recall")
    listing_end = prompt.text.rindex(TEXT_QUESTION)
    question = listing_end + len(TEXT_QUESTION)
    spans = [
        (question + m.start(1), question + m.end(1))
        for m in re.finditer(r": (\d+)\.", prompt.text[question:])
    ]
    if not spans:
        raise PromptTooShort(f"length {length} is too short for text recall: no complete key-value pair fits")
    return Sample(
        task="text_recall",
        length=length,
        reserve=0,
        prompt=prompt.text,
        input_ids=prompt.input_ids,
        answers=tuple(prompt.text[a:b] for a, b in spans),
        target="",
        offsets=prompt.offsets,
        meta={
            "value_spans": spans,
            "pairs": prompt.text.count("\n", len(TEXT_INSTRUCTION), listing_end) + 1,
            "method": prompt.method,
        },
    )


def value_token_positions(sample: Sample) -> list[np.ndarray]:
    """For each queried value, the indices of the tokens that overlap its characters."""
    starts, ends = sample.offsets[:, 0], sample.offsets[:, 1]
    return [np.flatnonzero((ends > a) & (starts < b)) for a, b in sample.meta["value_spans"]]
