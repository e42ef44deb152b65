"""RULER's non-NIAH tasks (Hsieh et al., 2024; NVIDIA/RULER scripts/data/synthetic): variable tracking (vt), common
words extraction (cwe), frequent words extraction (fwe) and the two QA tasks (qa_1: SQuAD v2, qa_2: HotpotQA).

Each prompt is RULER's template and answer prefix (wording as RULER's constants.py, its typo "assgined" included, so
prompts tokenise as RULER's do), filled with as many units (noise lines, words, documents) as fit in
`length - reserve` tokens, reserve = RULER's tokens_to_generate (vt 30, cwe 120, fwe 50, qa 32). Scoring as RULER's:
string_match_all for vt / cwe / fwe, string_match_part for qa (any reference answer counts).

  vt   one chain of 5 variables (5 uppercase letters each): "VAR A = 12345", then "VAR B = VAR A" ... 4 hops, its
       lines at random positions among copies of the noise paragraph (one per line); a one-shot example first (3-letter
       variables, about 500 tokens). Answer: the 5 variables.
  cwe  a numbered list of words; 10 common words appear 30 times and the others 3 (6 and 1 below 4K tokens), after a
       one-shot example (40 words, 10 / 3 repeats; 20 words, 3 / 1 below 4K). Answer: the 10 common words. Words come
       from the builtin corpus's vocabulary (RULER uses wonderwords' nouns, adjectives and verbs).
  fwe  coded words (6 random lowercase letters) from a vocabulary of length // 50, word k repeated
       int(N k^-2 / zeta(2)) times, shuffled; the most frequent is "..." (noise). Answer: words 2-4 by frequency.
  qa   "Document i:" blocks: the question's gold paragraph(s) (+ its article's other paragraphs for SQuAD) and random
       others, shuffled; sample i asks question i of the set (as RULER). Answer: any reference answer.

QA data: `qa_data` = a folder holding RULER's files (squad.json = SQuAD v2.0 dev, hotpotqa.json = HotpotQA dev
distractor, as RULER's download_qa_dataset.sh names them); without it the hub datasets (rajpurkar/squad_v2,
hotpotqa/hotpot_qa) when the network allows; otherwise QaUnavailable, one line.
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
import socket
import string
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lctk.errors import UserError
from lctk.tasks.haystacks import FILLER, essay_text
from lctk.tasks.niah import wrap
from lctk.tasks.prompts import PromptTooShort
from lctk.tasks.sample import Sample

TEMPLATES = {
    "vt": (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n",
        "Question: Find all variables that are assigned the value {query} in the text above.",
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assgined "
        "the value {query}, they are: ",
    ),
    "cwe": (
        "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
        "that appear most often.\n{context}\n",
        "Question: What are the 10 most common words in the above list?",
        " Answer: The top 10 words that appear most often in the list are:",
    ),
    "fwe": (
        "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
        "appeared coded words. {context}\n",
        "Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently "
        "appeared words in the above coded text?",
        " Answer: According to the coded text above, the three most frequently appeared words are:",
    ),
    "qa": (
        "Answer the question based on the given documents. Only give me the answer and do not output any other "
        "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
        "documents. Only give me the answer and do not output any other words.\n\n",
        "Question: {query}",
        " Answer:",
    ),
}
TOKENS_TO_GENERATE = {"vt": 30, "cwe": 120, "fwe": 50, "qa_1": 32, "qa_2": 32}
METRIC = {"vt": "all", "cwe": "all", "fwe": "all", "qa_1": "part", "qa_2": "part"}
ONE_LINE = ("vt", "qa_1", "qa_2")  # answers RULER expects on one line: generation may stop at a newline
QA_SETS = {"qa_1": "squad", "qa_2": "hotpotqa"}
TASKS = tuple(TOKENS_TO_GENERATE)
VT_HOPS, VT_ICL_TOKENS = 4, 500
CWE_COMMON = 10
FWE_ALPHA, FWE_WORD_LENGTH = 2.0, 6
DOCUMENT = "Document {i}:\n{document}"


class QaUnavailable(UserError):
    """Neither local QA files nor the hub datasets could be read."""


def make_sample(
    tokenizer,
    task: str,
    length: int,
    rng: random.Random,
    index: int = 0,
    reserve: int | None = None,
    chat: tuple[str, str] = ("", ""),
    qa_data: str | None = None,
) -> Sample:
    """A prompt of `task` (TASKS) with at most `length - reserve` tokens (reserve: RULER's tokens_to_generate)."""
    reserve = TOKENS_TO_GENERATE[task] if reserve is None else reserve
    budget = length - reserve
    seed = rng.getrandbits(63)  # every unit count rebuilds the same sample from this
    if task == "vt":
        build, answers, cap = _variable_tracking(tokenizer, seed, chat)
    elif task == "cwe":
        build, answers, cap = _common_words(seed, length, chat)
    elif task == "fwe":
        build, answers, cap = _frequent_words(seed, length, chat)
    else:
        build, answers, cap = _qa(load_qa(QA_SETS[task], qa_data), index, seed, chat)
    text, ids, units = fit_units(tokenizer, build, budget, task, cap)
    return Sample(
        task=task,
        length=length,
        reserve=reserve,
        prompt=text,
        input_ids=ids,
        answers=tuple(answers),
        target=" " + " ".join(answers),
        meta={"metric": METRIC[task], "units": units, "method": "whole"},
    )


def fit_units(
    tokenizer, build: Callable[[int], str], budget: int, task: str, cap: int | None = None
) -> tuple[str, np.ndarray, int]:
    """The prompt build(n) with the most units n <= cap whose tokenisation fits `budget` (doubling, then bisection:
    RULER's incremental search, exact)."""

    def encode(n: int) -> np.ndarray:
        return np.asarray(tokenizer(build(n), add_special_tokens=True)["input_ids"], dtype=np.int64)

    ids = encode(1)
    if len(ids) > budget:
        raise PromptTooShort(f"a {budget}-token prompt is too short for {task}: one unit already takes {len(ids)} tokens")
    lo, hi = 1, 2
    while len(encode(hi)) <= budget:
        if cap is not None and hi >= cap:
            return build(cap), encode(cap), cap
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(encode(mid)) <= budget else (lo, mid)
    return build(lo), encode(lo), lo


def _variable_tracking(tokenizer, seed: int, chat: tuple[str, str]):
    rng = random.Random(seed)
    names = _variables(rng, 5, VT_HOPS + 1)
    value = str(rng.randint(10_000, 99_999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(VT_HOPS)]
    icl_names = _variables(rng, 3, VT_HOPS + 1)
    icl_value = str(rng.randint(10_000, 99_999))
    icl_chain = [f"VAR {icl_names[0]} = {icl_value}"] + [
        f"VAR {icl_names[j + 1]} = VAR {icl_names[j]}" for j in range(VT_HOPS)
    ]
    place_seed = rng.getrandbits(63)

    def body(lines: list[str], noises: int, value: str) -> str:
        context = [FILLER] * noises
        positions = sorted(random.Random(place_seed + noises).sample(range(noises + len(lines)), len(lines)))
        for at, line in zip(positions, lines, strict=True):
            context.insert(at, line)
        head, question, prefix = TEMPLATES["vt"]
        return (head.format(context="\n".join(context)), question.format(query=value),
                prefix.format(num_v=VT_HOPS + 1, query=value))

    # the one-shot example: as many noise lines as fit in about 500 tokens with its answer (RULER's ICL example)
    def example(noises: int) -> str:
        return "".join(body(icl_chain, noises, icl_value)) + " " + " ".join(icl_names) + "\n\n"

    shot = example(fit_units(tokenizer, example, VT_ICL_TOKENS, "vt")[2])

    def build(noises: int) -> str:
        head, question, prefix = body(chain, noises, value)
        before, after = wrap(chat, shot + head, question, prefix)
        return before + after

    return build, names, None


def _variables(rng: random.Random, letters: int, count: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    return names


def _common_words(seed: int, length: int, chat: tuple[str, str]):
    rng = random.Random(seed)
    # RULER's repeats: (example words, common, uncommon repeats) and the sample's (common, uncommon) repeats
    (shot_words, shot_common, shot_rare), (common, rare) = ((20, 3, 1), (6, 1)) if length < 4096 else ((40, 10, 3), (30, 3))
    vocabulary = _cwe_words()
    shot_list = rng.sample(vocabulary, shot_words)
    shot_text = _numbered(_repeat_words(shot_list, shot_common, shot_rare, random.Random(rng.getrandbits(63))))
    order = rng.sample(vocabulary, len(vocabulary))
    shuffle_seed = rng.getrandbits(63)
    head, question, prefix = TEMPLATES["cwe"]
    shot = head.format(context=shot_text) + question + prefix + _numbered(shot_list[:CWE_COMMON]) + "\n"

    def build(words: int) -> str:
        listed = _repeat_words(order[: min(words, len(order))], common, rare, random.Random(shuffle_seed))
        before, after = wrap(chat, shot + head.format(context=_numbered(listed)), question, prefix)
        return before + after

    return build, order[:CWE_COMMON], len(order)


def _repeat_words(words: list[str], common: int, rare: int, rng: random.Random) -> list[str]:
    listed = words[:CWE_COMMON] * common + words[CWE_COMMON:] * rare
    rng.shuffle(listed)
    return listed


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


@functools.cache
def _cwe_words() -> list[str]:
    """Distinct lowercase words of the builtin corpus (4-12 letters, seen at least twice), in a fixed order."""
    counts = Counter(re.findall(r"\b[a-z]{4,12}\b", essay_text()))
    return sorted(word for word, count in counts.items() if count >= 2)


def _frequent_words(seed: int, length: int, chat: tuple[str, str]):
    rng = random.Random(seed)
    size = max(length // 50, 4)  # RULER's vocabulary size
    vocabulary: list[str] = []
    while len(vocabulary) < size:
        word = "".join(rng.choices(string.ascii_lowercase, k=FWE_WORD_LENGTH))
        if word not in vocabulary:
            vocabulary.append(word)
    vocabulary[0] = "..."  # the most frequent "word" is noise
    ranks = np.arange(1, size + 1, dtype=np.float64)
    zeta = math.pi**2 / 6  # zeta(FWE_ALPHA), RULER's normaliser
    shuffle_seed = rng.getrandbits(63)
    head, question, prefix = TEMPLATES["fwe"]

    def build(words: int) -> str:
        counts = (words * ranks**-FWE_ALPHA / zeta).astype(int)
        coded = [word for word, count in zip(vocabulary, counts, strict=True) for _ in range(count)]
        random.Random(shuffle_seed).shuffle(coded)
        before, after = wrap(chat, head.format(context=" ".join(coded)), question, prefix)
        return before + after

    return build, vocabulary[1:4], None


def _qa(data: tuple[list[dict], list[str]], index: int, seed: int, chat: tuple[str, str]):
    questions, documents = data
    item = questions[index % len(questions)]
    gold, more = item["context"], item.get("more_context", [])
    others = [i for i in random.Random(seed).sample(range(len(documents)), min(len(documents), 4096))
              if i not in gold and i not in more]
    shuffle_seed = seed + 1
    head, question, prefix = TEMPLATES["qa"]

    def build(count: int) -> str:
        chosen = (gold + more + others)[: max(count, len(gold))]
        random.Random(shuffle_seed).shuffle(chosen)
        context = "\n\n".join(DOCUMENT.format(i=i + 1, document=documents[d]) for i, d in enumerate(chosen))
        before, after = wrap(chat, head.format(context=context), question.format(query=item["query"]), prefix)
        return before + after

    return build, item["outputs"], len(gold + more + others)


def load_qa(name: str, folder: str | None) -> tuple[list[dict], list[str]]:
    """(questions, documents) of RULER's QA set `name` (squad | hotpotqa); see the module doc for where from."""
    return _load_qa(name, str(Path(folder).resolve()) if folder else None)


@functools.cache
def _load_qa(name: str, folder: str | None) -> tuple[list[dict], list[str]]:
    if folder is not None:
        path = Path(folder) / f"{name}.json"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise QaUnavailable(f"--qa-data: cannot read {path} ({getattr(error, 'strerror', None) or error})") from None
        try:
            return _squad(raw["data"]) if name == "squad" else _hotpotqa(raw)
        except (KeyError, TypeError, IndexError):
            raise QaUnavailable(f"--qa-data: {path} is not RULER's {name}.json format") from None
    try:
        socket.getaddrinfo("huggingface.co", 443)  # offline machines fail here at once, not after the hub's retries
        return _from_hub(name)
    except Exception:  # offline, the datasets library missing, the hub unreachable: all mean the same here
        raise QaUnavailable(
            f"no {name} data: pass --qa-data FOLDER with RULER's {name}.json (offline), or run with a network"
        ) from None


def _squad(articles: list[dict]) -> tuple[list[dict], list[str]]:
    documents = sorted({p["context"] for a in articles for p in a["paragraphs"]})
    at = {d: i for i, d in enumerate(documents)}
    questions = []
    for article in articles:
        siblings = [at[p["context"]] for p in article["paragraphs"]]
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                if not qa.get("is_impossible") and qa["answers"]:
                    here = at[paragraph["context"]]
                    questions.append({"query": qa["question"], "outputs": [a["text"] for a in qa["answers"]],
                                      "context": [here], "more_context": [i for i in siblings if i != here]})
    return questions, documents


def _hotpotqa(items: list[dict]) -> tuple[list[dict], list[str]]:
    def text(title, sentences) -> str:
        return f"{title}\n{''.join(sentences)}"

    documents = sorted({text(t, s) for item in items for t, s in item["context"]})
    at = {d: i for i, d in enumerate(documents)}
    questions = [{"query": item["question"], "outputs": [item["answer"]],
                  "context": [at[text(t, s)] for t, s in item["context"]]} for item in items]
    return questions, documents


def _from_hub(name: str) -> tuple[list[dict], list[str]]:
    import datasets

    if name == "squad":
        rows = datasets.load_dataset("rajpurkar/squad_v2", split="validation")
        articles: dict[str, dict[str, list]] = {}
        for row in rows:
            paragraph = articles.setdefault(row["title"], {}).setdefault(row["context"], [])
            paragraph.append({"question": row["question"], "answers": [{"text": t} for t in row["answers"]["text"]]})
        return _squad([{"paragraphs": [{"context": c, "qas": q} for c, q in paragraphs.items()]}
                       for paragraphs in articles.values()])
    rows = datasets.load_dataset("hotpotqa/hotpot_qa", "distractor", split="validation")
    return _hotpotqa([{"question": r["question"], "answer": r["answer"],
                       "context": list(zip(r["context"]["title"], r["context"]["sentences"], strict=True))} for r in rows])

