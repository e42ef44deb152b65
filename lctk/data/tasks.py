"""Synthetic training tasks, generated on the fly from a seeded random source (the same documents on every run).

    passkey  the classic passkey prompt + its answer, from `lctk.tasks.passkey` (the eval's own generator)
    niah     RULER needle-in-a-haystack prompts + answers, from `lctk.tasks.niah` (options.tasks picks which)
    mqar     multi-query associative recall on raw token ids, from `lctk.tasks.recall` (loss on the values)
    copy     x_1 .. x_n SEP x_1 .. x_n over random token ids (loss on the copy)

A document is token ids and a mask of the tokens that get a loss: every token for `loss: all` (the default for text
tasks: the model also learns the prompt format), only the answer for `loss: answer`. Text-task documents end with the
end-of-text token. Lengths are drawn uniformly from [min_length, max_length] tokens (max_length defaults to
data.seq_len, min_length to half of it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationError, model_validator

from lctk.errors import UserError
from lctk.labels import IGNORE
from lctk.schema import Section, describe_error, suggest


@dataclass
class Document:
    ids: np.ndarray  # int64 token ids
    trained: np.ndarray  # bool, True where the token is a training target


class LengthOptions(Section):
    min_length: int | None = Field(None, gt=1)
    max_length: int | None = Field(None, gt=1)

    @model_validator(mode="after")
    def _ordered(self) -> LengthOptions:
        if self.min_length is not None and self.max_length is not None and self.min_length > self.max_length:
            raise ValueError(f"min_length: {self.min_length} is more than max_length {self.max_length}")
        return self


class TextTaskOptions(LengthOptions):
    loss: Literal["all", "answer"] = "all"


class NiahOptions(TextTaskOptions):
    tasks: list[str] = Field(default_factory=lambda: ["niah_single_1"], min_length=1)


class MqarOptions(LengthOptions):
    num_kv_pairs: int | None = Field(None, gt=0)  # default: length // 16 (Zoology)
    vocab_size: int | None = Field(None, gt=3)  # default: the tokenizer's, at most 8192
    power_a: float = Field(0.01, gt=0)


class CopyOptions(LengthOptions):
    vocab_size: int | None = Field(None, gt=3)


OPTIONS: dict[str, type[Section]] = {
    "passkey": TextTaskOptions,
    "niah": NiahOptions,
    "mqar": MqarOptions,
    "copy": CopyOptions,
}


def check_task(name: str, options: dict[str, Any]) -> Section:
    """Validated options of task `name`; ValueError naming the key ("task: ..." or "options.x: ...")."""
    if name not in OPTIONS:
        raise ValueError(f"task: unknown task {name!r}{suggest(name, OPTIONS)}; known: {', '.join(OPTIONS)}")
    try:
        parsed = OPTIONS[name].model_validate(options)
    except ValidationError as error:
        raise ValueError(f"options.{describe_error(error, OPTIONS[name])}") from None
    if isinstance(parsed, NiahOptions):
        from lctk.tasks.niah import TASKS

        for task in parsed.tasks:
            if task not in TASKS:
                raise ValueError(f"options.tasks: unknown NIAH task {task!r}{suggest(task, TASKS)}")
    return parsed


class Task:
    """Makes documents of one task. `key` names the recipe source in errors."""

    def __init__(self, name: str, options: dict[str, Any], tokenizer, seq_len: int, key: str):
        self.name, self.tokenizer, self.key = name, tokenizer, key
        self.options = check_task(name, options)
        self.max_length = min(self.options.max_length or seq_len, seq_len)
        self.min_length = min(self.options.min_length or max(self.max_length // 2, 2), self.max_length)
        asked = getattr(self.options, "vocab_size", None)
        if asked is not None and asked > len(tokenizer):
            raise UserError(f"{key}.options.vocab_size: {asked} is more than the tokenizer's {len(tokenizer)} tokens")
        self.vocab_size = asked or min(len(tokenizer), 8192)
        self.eos = tokenizer.eos_token_id
        for length in {self.min_length, self.max_length}:  # fail now, not mid-run, when a length cannot work
            self.document(random.Random(0), length)

    def document(self, rng: random.Random, length: int) -> Document:
        """A document of at most `length` tokens."""
        try:
            if self.name in ("passkey", "niah"):
                return self._text_document(rng, length)
            if self.name == "mqar":
                return self._mqar(rng, length)
            return self._copy(rng, length)
        except (UserError, ValueError) as error:  # the eval generators reject budgets that cannot hold a prompt
            raise UserError(
                f"{self.key}.options.min_length: {length} tokens are too few for a {self.name} document with this "
                f"tokenizer ({str(error).splitlines()[0]})"
            ) from None

    def _text_document(self, rng: random.Random, length: int) -> Document:
        budget = length - 1  # room for end-of-text
        if self.name == "passkey":
            from lctk.tasks import passkey

            sample = passkey.make_sample(self.tokenizer, budget, rng.random(), rng)
        else:
            from lctk.tasks import niah

            sample = niah.make_sample(self.tokenizer, rng.choice(self.options.tasks), budget, rng)
        answer = self.tokenizer(sample.target, add_special_tokens=False)["input_ids"] + [self.eos]
        ids = np.concatenate([np.asarray(sample.input_ids, dtype=np.int64), np.asarray(answer, dtype=np.int64)])
        trained = np.ones(len(ids), dtype=bool)
        if self.options.loss == "answer":
            trained[: len(sample.input_ids)] = False
        return Document(ids, trained)

    def _mqar(self, rng: random.Random, length: int) -> Document:
        from lctk.tasks.recall import make_mqar_sample

        # the loss targets are the next input tokens, so the queried values stay in the input (eval: random ids)
        sample = make_mqar_sample(length, rng, self.vocab_size, self.options.num_kv_pairs, self.options.power_a,
                                  value_in_input=True)
        return Document(sample.input_ids, sample.labels != IGNORE)

    def _copy(self, rng: random.Random, length: int) -> Document:
        alphabet = np.setdiff1d(np.arange(self.vocab_size), self.tokenizer.all_special_ids)  # no special tokens
        n = (length - 1) // 2
        if n < 1 or len(alphabet) < 2:
            raise ValueError(f"copy needs at least 3 tokens and 2 symbols, got {length} tokens")
        separator, symbols = alphabet[0], alphabet[1:]
        copied = np.random.default_rng(rng.getrandbits(63)).choice(symbols, size=n)
        ids = np.concatenate([copied, [separator], copied]).astype(np.int64)
        trained = np.zeros(len(ids), dtype=bool)
        trained[n + 1 :] = True
        return Document(ids, trained)
