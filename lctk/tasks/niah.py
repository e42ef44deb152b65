"""Needle in a haystack: the RULER family (Hsieh et al., 2024) and the classic depth x length grid.

Prompt (RULER's template, plural form):

    Some special magic {type} are hidden within the following text. Make sure to memorize it. I will quiz you about
    the {type} afterwards.\\n{context}\\nWhat are all the special magic {type} for {query} mentioned in the provided
    text? The special magic {type} for {query} mentioned in the provided text are

and, when one value is asked for (queries x values == 1), the singular form: "A special magic {t} is hidden ...
about the {t} afterwards. ... What is the special magic {t} for {query} ... text is" with {t} the singular type.
Needles: "One of the special magic {type} for {key} is: {value}." (plural type, as in RULER). The context is a
haystack with the needles inserted at unit boundaries, at depths drawn without replacement from 40 evenly spaced
depths in [0, 1]; units and needles are joined by a space (essay) or a newline (noise, distractors). Several queried
keys read "a, b, and c". Score: string_match_all, the share of expected values found in the output, x 100.

Tasks (haystack, key type, value type, keys, values per key, queried keys):
  niah_single_1   noise        words  numbers  1 1 1
  niah_single_2   essay        words  numbers  1 1 1
  niah_single_3   essay        words  uuids    1 1 1
  niah_multikey_1 essay        words  numbers  4 1 1
  niah_multikey_2 distractors  words  numbers  1 1 1
  niah_multikey_3 distractors  uuids  uuids    1 1 1
  niah_multivalue essay        words  numbers  1 4 1
  niah_multiquery essay        words  numbers  4 1 4
  niah_grid       essay        words  numbers  1 1 1  (needle at a given depth: the classic grid)
Like RULER: every essay window starts at a random sentence anywhere in the corpus and ends at a whole sentence,
distractor windows start at a random line of a long stream (fresh distractors per sample), noise-haystack needles go
at random lines; 128 tokens are reserved for the answer (RULER's tokens_to_generate). With a chat template (`chat`:
the (before, after) of tokens.chat_wrap) the prompt up to the question is the user's message and the answer prefix
follows the assistant tag, as RULER does for instruct models. Differences: the essay is the builtin corpus unless
`haystack` names the user's text (RULER's Paul Graham essays reproduce it), word keys come from the corpus's
vocabulary rather than wonderwords' adjective-noun pairs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lctk.tasks.haystacks import (
    DISTRACTOR_RANGE,
    NEEDLE,
    distractor_haystack,
    draw_unique,
    essay_haystack,
    essay_text,
    noise_haystack,
    window_start,
)
from lctk.tasks.prompts import fit_prompt, needle_layout
from lctk.tasks.sample import Sample

DEPTHS = tuple(round(k / 39, 4) for k in range(40))
DEFAULT_RESERVE = 128  # RULER's tokens_to_generate for NIAH
SINGULAR = {"numbers": "number", "words": "word", "uuids": "uuid"}


@dataclass(frozen=True)
class NiahTask:
    haystack: str  # "noise" | "essay" | "distractors"
    key_type: str
    value_type: str
    keys: int = 1
    values: int = 1
    queries: int = 1


TASKS: dict[str, NiahTask] = {
    "niah_single_1": NiahTask("noise", "words", "numbers"),
    "niah_single_2": NiahTask("essay", "words", "numbers"),
    "niah_single_3": NiahTask("essay", "words", "uuids"),
    "niah_multikey_1": NiahTask("essay", "words", "numbers", keys=4),
    "niah_multikey_2": NiahTask("distractors", "words", "numbers"),
    "niah_multikey_3": NiahTask("distractors", "uuids", "uuids"),
    "niah_multivalue": NiahTask("essay", "words", "numbers", values=4),
    "niah_multiquery": NiahTask("essay", "words", "numbers", keys=4, queries=4),
    "niah_grid": NiahTask("essay", "words", "numbers"),
}
RULER_TASKS = tuple(name for name in TASKS if name != "niah_grid")


def template(value_type: str, query: str, singular: bool) -> tuple[str, str, str]:
    """(text before the context, the question after it, the answer prefix) of RULER's prompt."""
    if singular:
        kind = SINGULAR[value_type]
        return (
            f"A special magic {kind} is hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {kind} afterwards.\n",
            f"\nWhat is the special magic {kind} for {query} mentioned in the provided text?",
            f" The special magic {kind} for {query} mentioned in the provided text is",
        )
    return (
        f"Some special magic {value_type} are hidden within the following text. Make sure to memorize it. "
        f"I will quiz you about the {value_type} afterwards.\n",
        f"\nWhat are all the special magic {value_type} for {query} mentioned in the provided text?",
        f" The special magic {value_type} for {query} mentioned in the provided text are",
    )


def wrap(chat: tuple[str, str], head: str, question: str, answer_prefix: str) -> tuple[str, str]:
    """(prefix, suffix) around a prompt's context: RULER's template, inside the chat template when there is one."""
    before, after = chat
    if not before and not after:
        return head, question + answer_prefix
    return before + head, question + after + answer_prefix.lstrip()


def make_sample(
    tokenizer,
    task: str,
    length: int,
    rng: random.Random,
    depth: float | None = None,
    reserve: int = DEFAULT_RESERVE,
    exact: bool = False,
    chat: tuple[str, str] = ("", ""),
    haystack: str | None = None,
) -> Sample:
    """A prompt of task `task` with at most `length - reserve` tokens. `depth` in [0, 1] pins a single needle (the
    grid); otherwise needle depths are drawn from DEPTHS (essay, distractors) or uniformly (a random line of the
    noise haystack). `haystack`: the user's essay text (file or folder), default the builtin corpus."""
    spec = TASKS[task]
    if depth is not None and spec.keys * spec.values != 1:
        raise ValueError(f"{task} has several needles; a fixed depth is only for single-needle tasks")
    hay, joiner = _haystack(tokenizer, spec, haystack)
    if spec.haystack == "noise":
        start = 0
    else:  # anywhere in the essay text; any of the first ~30K distractor lines
        start = window_start(hay, rng, DISTRACTOR_RANGE if spec.haystack == "distractors" else len(essay_text(haystack)))
    keys = draw_unique(spec.key_type, max(spec.keys, spec.queries), rng)
    values = {key: draw_unique(spec.value_type, spec.values, rng) for key in keys}
    needles = [NEEDLE.format(type=spec.value_type, key=key, value=value) for key in keys for value in values[key]]
    rng.shuffle(needles)
    if depth is not None:
        depths = [depth]
    elif spec.haystack == "noise":
        depths = [rng.random() for _ in needles]
    else:
        depths = rng.sample(DEPTHS, len(needles))
    queried = rng.sample(keys, spec.queries)
    answers = tuple(value for key in queried for value in values[key])
    query = queried[0] if len(queried) == 1 else ", ".join(queried[:-1]) + ", and " + queried[-1]
    head, tail = wrap(chat, *template(spec.value_type, query, singular=len(answers) == 1))
    layout = needle_layout(hay, head, list(zip(depths, needles, strict=True)), tail, joiner)
    prompt = fit_prompt(hay, layout, length - reserve, start=start, exact=exact, task=task)
    if any(prompt.text.count(key) != 2 * (key in queried) + spec.values for key in keys):
        # a distractor happens to carry one of the keys: draw again (rare; keeps the answer unambiguous)
        return make_sample(tokenizer, task, length, rng, depth, reserve, exact, chat, haystack)
    return Sample(
        task=task,
        length=length,
        reserve=reserve,
        prompt=prompt.text,
        input_ids=prompt.input_ids,
        answers=answers,
        target=" " + (answers[0] if len(answers) == 1 else ", ".join(answers[:-1]) + ", and " + answers[-1]) + ".",
        depth=depth if depth is not None else (depths[0] if len(depths) == 1 else None),
        offsets=prompt.offsets,
        meta={"keys": queried, "depths": depths, "method": prompt.method},
    )


def _haystack(tokenizer, spec: NiahTask, source: str | None):
    if spec.haystack == "noise":
        return noise_haystack(tokenizer), "\n"
    if spec.haystack == "distractors":
        return distractor_haystack(tokenizer, spec.key_type, spec.value_type), "\n"
    return essay_haystack(tokenizer, source), " "
