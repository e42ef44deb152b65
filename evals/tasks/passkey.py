"""Passkey retrieval in the classic format (Mohtashami & Jaggi, 2023):

    {TASK}\\n{filler ...}\\n{NEEDLE}\\n{... filler}\\n{QUESTION}

The filler sentence group is repeated (joined by spaces) to fill the token budget; the needle sits at the sentence
boundary nearest to `depth` (0 = first line after the task, 1 = last line before the question). The key is a
5-digit number (10000-99999: fixed width, so a stray digit in the output cannot match it). Greedy decoding; correct
when the generated text contains the key.
"""

from __future__ import annotations

import random

from lctk.evals.context import fit_prompt, needle_layout
from lctk.evals.tasks.sample import Sample
from lctk.evals.tasks.text import filler_haystack

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
DEFAULT_RESERVE = 16


def make_sample(
    tokenizer, length: int, depth: float, rng: random.Random, reserve: int = DEFAULT_RESERVE, exact: bool = False
) -> Sample:
    """A passkey prompt of at most `length - reserve` tokens with the needle at `depth` in [0, 1]."""
    key = str(rng.randint(10_000, 99_999))
    haystack = filler_haystack(tokenizer)
    layout = needle_layout(haystack, TASK + "\n", [(depth, NEEDLE.format(key=key))], "\n" + QUESTION, "\n")
    prompt = fit_prompt(haystack, layout, length - reserve, exact=exact, task="passkey")
    return Sample(
        task="passkey",
        length=length,
        reserve=reserve,
        prompt=prompt.text,
        input_ids=prompt.input_ids,
        answers=(key,),
        target=f" {key}.",
        depth=depth,
        offsets=prompt.offsets,
        meta={"method": prompt.method},
    )
