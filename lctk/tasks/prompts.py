"""Prompts built to an exact token budget with the model's own tokenizer, fast enough for 128K-token contexts.

A prompt is a list of pieces: literal strings (task line, needles, question) and character ranges of a haystack (filler,
essay, distractor needles). A haystack is a deterministic, unbounded text stream tokenised once per tokenizer, with
character offsets, and extended on demand. A prompt's ids are spliced together:

    ids = specials + real(dirty_0) + cached(hay_1) + real(dirty_1) + ... + specials

where cached(hay_j) are the cached haystack tokens of the interior of a haystack range (from a word boundary at least
MARGIN_CHARS inside it) and real(dirty_j) is a real tokenisation of everything in between (literals and the haystack
margins next to them). Splice points are word starts (a token that carries the space before it, or follows a dropped
space). Each dirty region is tokenised together with at least OVERLAP_TOKENS cached tokens on either side of it (from
and to a word start) and must reproduce them, so the spliced ids equal the tokenisation of the whole text for any
tokenizer whose context reaches no further than that across a word boundary (BPE, byte-level BPE, Unigram,
WordPiece). A failed check, or a tokenizer without offsets, falls back to tokenising the whole prompt (correct,
slower). The first SPOT_CHECKS prompts of each haystack (every prompt with exact=True) are also compared with one
real tokenisation of the whole text; a mismatch switches that haystack to whole-text tokenisation for good.

Fitting: the haystack size n (in cached tokens, window = tokens [start, start + n)) is searched so that the prompt has
at most `budget` tokens: from the estimate n = budget - len(prompt with an empty haystack), a safeguarded secant /
bisection on the exact count, keeping the longest prompt that fits. It ends at len == budget or when n and n + 1
straddle the budget, so a prompt is never over budget and under it only by what one more haystack token would add
across a junction (0-2 tokens in practice). Typically 2-4 assemblies of a few hundred characters of real
tokenisation each (about 10 ms at 128K tokens, against 0.5 s for one tokenisation of the whole prompt).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lctk.errors import UserError
from lctk.tasks.tokens import encode_batch, fingerprint, has_offsets, special_tokens_around


class PromptTooShort(UserError):
    """The token budget cannot hold the task's fixed parts (a suite may skip such a length instead of failing)."""


MARGIN_CHARS = 48
OVERLAP_TOKENS = 3
MAX_SEARCH_STEPS = 40
SPOT_CHECKS = 4
_WHITESPACE = np.array([ord(c) for c in " \t\n\r\f\v"], dtype=np.uint32)

Piece = str | tuple[int, int]  # literal text, or a [start, end) character range of the haystack text
Layout = Callable[[int, int], list[Piece]]  # haystack window [start, end) in characters -> pieces


@dataclass(frozen=True)
class Prompt:
    text: str
    input_ids: np.ndarray  # int64, with the tokenizer's special tokens; exactly tokenizer(text)["input_ids"]
    offsets: np.ndarray | None  # (n, 2) character spans in `text` ((0, 0) for specials); None without offsets
    method: str  # "spliced" (cached haystack tokens) or "whole" (the whole text tokenised)


class Haystack:
    """A deterministic, unbounded text stream tokenised with one tokenizer and extended on demand.

    stream(n) returns at least the first n characters of the stream (always the same characters).
    `boundary` is a regex for the separator between two units (sentences, lines); needles are inserted there, with
    the separator dropped and the layout's own joiner used instead."""

    def __init__(self, tokenizer, stream: Callable[[int], str], boundary: str):
        self.tokenizer = tokenizer
        self.offsets_available = has_offsets(tokenizer)
        self._stream = stream
        self._boundary = re.compile(boundary)
        self.text = ""
        self.usable = 0  # tokens [0, usable) are final (the stream's cut end is never used)
        self.spot_checks = 0  # prompts compared with a whole-text tokenisation so far
        self.splice_failed = False  # a check failed: this tokenizer is not local enough to splice
        self._tokenize(1 << 15)

    def ensure(self, n_tokens: int) -> None:
        """Make at least n_tokens tokens usable."""
        while self.usable < n_tokens:
            chars_per_token = len(self.text) / max(self.usable, 1)
            self._tokenize(max(2 * len(self.text), int(1.2 * n_tokens * chars_per_token) + 4 * MARGIN_CHARS))

    def _tokenize(self, n_chars: int) -> None:
        self.text = self._stream(n_chars)
        if self.offsets_available:
            encoded = encode_batch(self.tokenizer, [self.text], with_offsets=True)[0]
            self.ids, spans = encoded.ids, encoded.offsets
            self.starts, self.ends = spans[:, 0].copy(), spans[:, 1].copy()
            codes = np.frombuffer(self.text.encode("utf-32-le"), dtype=np.uint32)
            at_space = np.concatenate([np.isin(codes, _WHITESPACE), [True]])[self.starts]
            previous_end = np.concatenate([[0], self.ends[:-1]])
            previous_start = np.concatenate([[-1], self.starts[:-1]])
            # a cut before token i keeps whole characters on both sides; a splice also needs the start of a word:
            # the token carries the space before it (byte-level BPE, Metaspace) or the tokenizer dropped the space
            # (WordPiece); a token right after a bare "▁" token is inside a word for Unigram and is not a word start
            self.cut_ok = (self.starts >= previous_end) & (self.starts > previous_start)
            self.splice_ok = self.cut_ok & (at_space | (self.starts > previous_end))
            last_safe = np.searchsorted(self.starts, len(self.text) - 4 * MARGIN_CHARS)
            self.usable = int(max(last_safe - 1, 0))
        else:  # without offsets the whole prompt is tokenised; the window is counted in characters
            self.ids = np.zeros(0, dtype=np.int64)
            self.starts = np.arange(len(self.text), dtype=np.int64)
            self.ends = self.starts + 1
            self.cut_ok = self.splice_ok = np.ones(len(self.text), dtype=bool)
            self.usable = max(len(self.text) - 4 * MARGIN_CHARS, 0)
        found = [(m.start(), m.end()) for m in self._boundary.finditer(self.text)]
        self.left_ends = np.array([a for a, _ in found], dtype=np.int64)
        self.right_starts = np.array([b for _, b in found], dtype=np.int64)

    def unit_start(self, char_position: int) -> int:
        """The first unit start (after a boundary) at or after char_position: where a window may begin."""
        while True:
            k = int(np.searchsorted(self.right_starts, char_position))
            if k < len(self.right_starts) and self.right_starts[k] < len(self.text) - 4 * MARGIN_CHARS:
                return int(self.right_starts[k])
            self.ensure(2 * max(self.usable, 1))

    def insertion_point(self, a: int, b: int, depth: float) -> tuple[int, int]:
        """(left end, right start) of the unit boundary nearest to depth (0..1) of the window [a, b); 0 and 1 are the
        window's edges."""
        if depth <= 0.0 or b <= a:
            return a, a
        if depth >= 1.0:
            return b, b
        target = a + depth * (b - a)
        k = int(np.searchsorted(self.left_ends, target))
        candidates = [j for j in (k - 1, k) if 0 <= j < len(self.left_ends)]
        inside = [j for j in candidates if self.left_ends[j] > a and self.right_starts[j] < b]
        if not inside:
            return (a, a) if depth < 0.5 else (b, b)
        best = min(inside, key=lambda j: abs(self.left_ends[j] - target))
        return int(self.left_ends[best]), int(self.right_starts[best])

    def window_end(self, first: int, n: int) -> int:
        """Character position where a window of n tokens from token `first` ends: moved back to the end of the last
        whole unit (sentence, line) inside it, or to a clean token cut when not even one unit fits."""
        end = first + n
        while end > first and not self.cut_ok[end]:
            end -= 1
        position = int(self.starts[end])
        k = int(np.searchsorted(self.left_ends, position, side="right")) - 1
        if k >= 0 and self.left_ends[k] > self.starts[first]:
            return int(self.left_ends[k])
        return position


_haystacks: OrderedDict[tuple[str, str], Haystack] = OrderedDict()
MAX_CACHED_HAYSTACKS = 16


def cached_haystack(tokenizer, name: str, make: Callable[[], tuple[Callable[[int], str], str]]) -> Haystack:
    """The haystack `name` tokenised with `tokenizer`, built once per process (LRU of MAX_CACHED_HAYSTACKS)."""
    key = (fingerprint(tokenizer), name)
    if key in _haystacks:
        _haystacks.move_to_end(key)
        return _haystacks[key]
    stream, boundary = make()
    haystack = _haystacks[key] = Haystack(tokenizer, stream, boundary)
    while len(_haystacks) > MAX_CACHED_HAYSTACKS:
        _haystacks.popitem(last=False)
    return haystack


def needle_layout(
    haystack: Haystack, prefix: str, needles: Sequence[tuple[float, str]], suffix: str, joiner: str
) -> Layout:
    """prefix + the window with each needle inserted at its depth (units and needles joined by `joiner`) + suffix."""

    def layout(a: int, b: int) -> list[Piece]:
        placed = sorted(
            ((*haystack.insertion_point(a, b, depth), order, text) for order, (depth, text) in enumerate(needles)),
        )
        items: list[Piece] = []
        cursor = a
        for left_end, right_start, _, text in placed:
            if left_end > cursor:
                items.append((cursor, left_end))
            items.append(text)
            cursor = max(cursor, right_start)
        if b > cursor:
            items.append((cursor, b))
        pieces: list[Piece] = [prefix]
        for k, item in enumerate(items):
            if k:
                pieces.append(joiner)
            pieces.append(item)
        pieces.append(suffix)
        return pieces

    return layout


def fit_prompt(
    haystack: Haystack, layout: Layout, budget: int, start: int = 0, exact: bool = False, task: str = "this task"
) -> Prompt:
    """The longest prompt layout(window) with at most `budget` tokens, the window growing from character `start`.

    exact=True compares every spliced prompt with a real tokenisation of its whole text; exact=False does so for the
    first SPOT_CHECKS prompts of each haystack only. Any mismatch switches the haystack to whole-text tokenisation."""
    spliced = haystack.offsets_available and not haystack.splice_failed
    prompt = _search(haystack, layout, budget, start, spliced=spliced, task=task) if spliced else None
    if prompt is not None and (exact or haystack.spot_checks < SPOT_CHECKS):
        haystack.spot_checks += 1
        whole = _tokenize_whole(haystack.tokenizer, prompt.text, with_offsets=False)
        if not np.array_equal(whole.input_ids, prompt.input_ids):
            prompt = None
    if prompt is None:
        haystack.splice_failed = spliced or haystack.splice_failed
        prompt = _search(haystack, layout, budget, start, spliced=False, task=task)
    assert prompt is not None
    return prompt


def _search(haystack: Haystack, layout: Layout, budget: int, start: int, spliced: bool, task: str) -> Prompt | None:
    """Safeguarded secant search over the window size n; None when a splice check failed."""
    best: Prompt | None = None
    lo, hi = -1, None  # largest n known to fit, smallest n known to overflow
    seen: dict[int, int] = {}
    n, slope = 0, 1.0 if haystack.offsets_available else 0.25  # tokens per window unit (a token, or a character)
    for _ in range(MAX_SEARCH_STEPS):
        first = int(np.searchsorted(haystack.starts, start))  # window tokens are counted from here
        haystack.ensure(first + n + 1)
        pieces = layout(start, max(start, haystack.window_end(first, n)))
        prompt = _assemble(haystack, pieces) if spliced else _tokenize_whole(
            haystack.tokenizer, _join(haystack, pieces), with_offsets=haystack.offsets_available
        )
        if prompt is None:
            return None
        length = len(prompt.input_ids)
        seen[n] = length
        if length <= budget:
            lo = max(lo, n)
            if best is None or length > len(best.input_ids):
                best = prompt
            if length == budget:
                break
        else:
            hi = n if hi is None else min(hi, n)
            if n == 0:
                raise PromptTooShort(
                    f"a {budget}-token prompt is too short for {task}: it needs {length} tokens before any haystack "
                    "(raise --lengths or lower --max-new-tokens)"
                )
        if hi is not None and hi - lo <= 1:
            break
        if len(seen) > 1:
            (n_a, len_a), (n_b, len_b) = sorted(seen.items(), key=lambda kv: abs(kv[0] - n))[:2]
            slope = max((len_b - len_a) / (n_b - n_a), 1e-3) if n_b != n_a else slope
        guess = max(n + round((budget - length) / slope), lo + 1)
        if hi is not None:
            guess = min(guess, hi - 1)
        if guess in seen:
            guess = (lo + hi) // 2 if hi is not None else 2 * max(n, 1)
        n = guess
    return best


def _join(haystack: Haystack, pieces: list[Piece]) -> str:
    return "".join(p if isinstance(p, str) else haystack.text[p[0] : p[1]] for p in pieces)


def _tokenize_whole(tokenizer, text: str, with_offsets: bool) -> Prompt:
    out = tokenizer(text, add_special_tokens=True, return_offsets_mapping=with_offsets)
    offsets = np.asarray(out["offset_mapping"], dtype=np.int64).reshape(-1, 2) if with_offsets else None
    return Prompt(text, np.asarray(out["input_ids"], dtype=np.int64), offsets, "whole")


@dataclass(frozen=True)
class _Cached:
    """Cached haystack tokens [first, last) placed at `at` in the prompt text. The dirty region before it is
    tokenised with tokens [first, right_end) appended, the one after it with [left_start, last) prepended; both
    overlaps start and end at word starts, so they tokenise the same alone as in context."""

    first: int
    last: int
    at: int
    right_end: int
    left_start: int


def _assemble(haystack: Haystack, pieces: list[Piece]) -> Prompt | None:
    """Splice cached haystack tokens with real tokenisations of the regions around literals (see module doc)."""
    h = haystack
    parts: list[str] = []
    cached: list[_Cached] = []
    position = 0
    for piece in pieces:
        if isinstance(piece, str):
            parts.append(piece)
            position += len(piece)
            continue
        a, b = piece
        parts.append(h.text[a:b])
        lowest = int(np.searchsorted(h.starts, a + MARGIN_CHARS))
        highest = int(np.searchsorted(h.starts, b - MARGIN_CHARS, side="right"))
        splices = lowest + np.flatnonzero(h.splice_ok[lowest:highest])
        right = int(np.searchsorted(splices, splices[0] + OVERLAP_TOKENS)) if len(splices) else 0
        left = int(np.searchsorted(splices, splices[-1] - OVERLAP_TOKENS, side="right")) - 1 if len(splices) else -1
        if 0 < right <= left < len(splices) - 1:
            first, last = int(splices[0]), int(splices[-1])
            right_end, left_start = int(splices[right]), int(splices[left])
            cached.append(_Cached(first, last, position + int(h.starts[first]) - a, right_end, left_start))
        position += b - a
    text = "".join(parts)

    # dirty region j lies between cached[j - 1] and cached[j] (the prompt's start and end close the first and last)
    dirty_texts, cursors = [], []
    cursor = 0
    for j in range(len(cached) + 1):
        before = cached[j - 1] if j else None
        after = cached[j] if j < len(cached) else None
        left = h.text[h.starts[before.left_start] : h.starts[before.last]] if before else ""
        right = h.text[h.starts[after.first] : h.starts[after.right_end]] if after else ""
        dirty_texts.append(left + text[cursor : after.at if after else len(text)] + right)
        cursors.append(cursor - len(left))  # prompt position of the dirty text's first character
        if after:
            cursor = after.at + int(h.starts[after.last] - h.starts[after.first])
    encoded = encode_batch(h.tokenizer, dirty_texts, with_offsets=True)

    pre, post = special_tokens_around(h.tokenizer)
    id_parts = [np.asarray(pre, dtype=np.int64)]
    offset_parts = [np.zeros((len(pre), 2), dtype=np.int64)]
    for j, (enc, shift) in enumerate(zip(encoded, cursors, strict=True)):
        before = cached[j - 1] if j else None
        after = cached[j] if j < len(cached) else None
        head = before.last - before.left_start if before else 0
        tail = len(enc.ids) - (after.right_end - after.first if after else 0)
        if before and not np.array_equal(enc.ids[:head], h.ids[before.left_start : before.last]):
            return None
        if after and not np.array_equal(enc.ids[tail:], h.ids[after.first : after.right_end]):
            return None
        id_parts.append(enc.ids[head:tail])
        offset_parts.append(enc.offsets[head:tail] + shift)
        if after:
            id_parts.append(h.ids[after.first : after.last])
            spans = np.stack([h.starts[after.first : after.last], h.ends[after.first : after.last]], axis=1)
            offset_parts.append(spans + (after.at - int(h.starts[after.first])))
    id_parts.append(np.asarray(post, dtype=np.int64))
    offset_parts.append(np.zeros((len(post), 2), dtype=np.int64))
    return Prompt(text, np.concatenate(id_parts), np.concatenate(offset_parts), "spliced")
