"""Scoring of generated text as RULER scores it (scripts/eval/synthetic/constants.py), x 100, case-insensitively:

string_match_all  the share of expected strings found in the output (NIAH, VT, CWE, FWE; passkey is the one-answer
                  case: 100 when the output contains the key, else 0);
string_match_part 100 when any expected string is found (QA: any of the reference answers counts).
"""

from __future__ import annotations


def string_match_all(prediction: str, answers: tuple[str, ...] | list[str]) -> float:
    if not answers:
        raise ValueError("string_match_all needs at least one expected answer")
    text = prediction.lower()
    return 100.0 * sum(answer.lower() in text for answer in answers) / len(answers)


def string_match_part(prediction: str, answers: tuple[str, ...] | list[str]) -> float:
    if not answers:
        raise ValueError("string_match_part needs at least one expected answer")
    text = prediction.lower()
    return 100.0 * any(answer.lower() in text for answer in answers)


METRICS = {"all": string_match_all, "part": string_match_part}
