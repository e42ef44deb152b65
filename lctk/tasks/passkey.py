"""Passkey retrieval, two variants (VARIANTS; the report names the one that ran).

`passkey` is Landmark Attention's format (Mohtashami & Jaggi, 2023):

    {TASK}\\n{filler ...}\\n{NEEDLE}\\n{... filler}\\n{QUESTION}

The filler sentence group is repeated (joined by spaces) to fill the token budget; the needle sits at the sentence
boundary nearest to `depth` (0 = first line after the task, 1 = last line before the question). The key is a
5-digit number (10000-99999: fixed width, so a stray digit in the output cannot match it). Greedy decoding; correct
when the generated text contains the key.

`passkey_stuffed_mamba` is Stuffed Mamba's (Chen et al., 2024, passkey-retrieval/passkey.py): a 5-digit key drawn from
00000-99999, its prefix, the filler paragraph one per line, the needle line "The passkey is {key}. Remember it. {key}
is the passkey." at the line nearest to `depth`, and its question after a blank line.
"""

from __future__ import annotations

import random

from lctk.tasks.haystacks import filler_haystack, noise_haystack
from lctk.tasks.prompts import fit_prompt, needle_layout
from lctk.tasks.sample import Sample

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
DEFAULT_RESERVE = 16
STUFFED_PREFIX = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
STUFFED_NEEDLE = "The passkey is {key}. Remember it. {key} is the passkey."
STUFFED_SUFFIX = "\n\nWhat is the pass key? The passkey is"
VARIANTS = {"passkey": "Landmark Attention (Mohtashami & Jaggi, 2023)", "passkey_stuffed_mamba": "Stuffed Mamba (Chen et al., 2024)"}


def make_sample(
    tokenizer,
    length: int,
    depth: float,
    rng: random.Random,
    reserve: int = DEFAULT_RESERVE,
    exact: bool = False,
    variant: str = "passkey",
    chat: tuple[str, str] = ("", ""),
) -> Sample:
    """A passkey prompt of at most `length - reserve` tokens with the needle at `depth` in [0, 1]; `chat` as in
    niah.make_sample (the question ends the user's message, the answer prefix follows the assistant tag)."""
    from lctk.tasks.niah import wrap

    if variant == "passkey":
        key = str(rng.randint(10_000, 99_999))
        haystack = filler_haystack(tokenizer)
        question, answer_prefix = QUESTION.split("? ")
        head, tail = wrap(chat, TASK + "\n", "\n" + question + "?", " " + answer_prefix)
        layout = needle_layout(haystack, head, [(depth, NEEDLE.format(key=key))], tail, "\n")
    else:
        key = f"{rng.randrange(100_000):05d}"
        haystack = noise_haystack(tokenizer)
        question, answer_prefix = STUFFED_SUFFIX.split("? ")
        head, tail = wrap(chat, STUFFED_PREFIX, question + "?", " " + answer_prefix)
        layout = needle_layout(haystack, head, [(depth, STUFFED_NEEDLE.format(key=key))], tail, "\n")
    prompt = fit_prompt(haystack, layout, length - reserve, exact=exact, task=variant)
    return Sample(
        task=variant,
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
