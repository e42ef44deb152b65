"""Scoring of generated text (RULER's string_match_all): the share of expected strings found in the output,
case-insensitively, x 100. Passkey is the one-answer case: 100 when the output contains the key, else 0."""

from __future__ import annotations


def string_match_all(prediction: str, answers: tuple[str, ...] | list[str]) -> float:
    if not answers:
        raise ValueError("string_match_all needs at least one expected answer")
    text = prediction.lower()
    return 100.0 * sum(answer.lower() in text for answer in answers) / len(answers)
