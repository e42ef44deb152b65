"""`lctk eval --lm-eval` against lm-eval's own simple_evaluate on the same model: local task YAML files (a
multiple-choice loglikelihood task and a generate_until task over a jsonl file), lm-eval alone (`--suite ""`), its
own document limit. Runs when the lm-eval extra is installed (`make test` installs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lctk import HybridConfig, HybridForCausalLM
from lctk.cli import main

lm_eval = pytest.importorskip("lm_eval")

DOCS = 6
LIMIT = 4
MC = """task: lctk_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""
GEN = """task: lctk_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 3
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, byte_tokenizer):
    """A tiny lctk model folder, and a task folder whose generation targets are the model's own greedy answers for
    half the documents (so exact_match is neither 0 nor 1)."""
    root = tmp_path_factory.mktemp("lm-eval")
    torch.manual_seed(0)
    model = HybridForCausalLM(HybridConfig(pattern="MA", vocab_size=len(byte_tokenizer), hidden_size=32,
                                           num_attention_heads=2, max_position_embeddings=256)).eval()
    model.save_pretrained(root / "model")
    byte_tokenizer.save_pretrained(root / "model")
    rows = []
    for i in range(DOCS):
        question = f"Q{i}: is {i} even?"
        ids = byte_tokenizer(question, return_tensors="pt").input_ids
        greedy = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
        answer = byte_tokenizer.decode(greedy).split("\n")[0].strip() if i % 2 == 0 else "never"
        rows.append({"question": question, "choices": [" yes", " no"], "label": i % 2, "answer": answer})
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tasks / "mc.yaml").write_text(MC.format(data=tasks / "data.jsonl"))
    (tasks / "gen.yaml").write_text(GEN.format(data=tasks / "data.jsonl"))
    broken = MC.format(data=tasks / "missing.jsonl").replace("lctk_tiny_mc", "lctk_tiny_broken")
    (tasks / "broken.yaml").write_text(broken)  # lm-eval fails inside simple_evaluate
    return root


def lctk_eval(monkeypatch, capsys, *args) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["lctk", "eval", *map(str, args)])
    with pytest.raises(SystemExit) as done:
        main()
        raise SystemExit(0)
    return done.value.code, capsys.readouterr().err


def test_the_bridge_reports_lm_evals_own_numbers(monkeypatch, capsys, setup, byte_tokenizer):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = setup / "out"
    code, err = lctk_eval(monkeypatch, capsys, "--model", setup / "model", "--suite", "", "--lm-eval",
                          "lctk_tiny_mc,lctk_tiny_gen", "--lm-eval-include", setup / "tasks", "--lm-eval-limit", LIMIT,
                          "--output", out)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert list(results["results"]) == ["lm-eval"] and results["config"]["lengths"] == []
    bridge = results["results"]["lm-eval"]["by_task"]

    model = HybridForCausalLM.from_pretrained(setup / "model").eval()
    own = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=byte_tokenizer, batch_size=1, backend="causal"),
        tasks=["lctk_tiny_mc", "lctk_tiny_gen"], limit=LIMIT,
        task_manager=TaskManager(include_path=str(setup / "tasks"), include_defaults=False),  # indexing all: ~20 s
    )["results"]
    assert bridge["lctk_tiny_mc"]["metric"] == "acc,none" and bridge["lctk_tiny_gen"]["metric"] == "exact_match,none"
    for task in ("lctk_tiny_mc", "lctk_tiny_gen"):
        assert bridge[task]["samples"] == LIMIT  # the bridge stores the metric, not sample_len
        for key, value in bridge[task]["metrics"].items():
            assert value == pytest.approx(float(own[task][key]), abs=1e-9), (task, key)
    assert 0 < bridge["lctk_tiny_gen"]["score"] < 1
    expected = (100 * bridge["lctk_tiny_mc"]["score"] + 100 * bridge["lctk_tiny_gen"]["score"]) / 2
    assert results["results"]["lm-eval"]["score"] == pytest.approx(expected, abs=1e-3)
    report = (out / "report.md").read_text()
    assert "- lctk_tiny_mc:" in report and "(acc,none)" in report


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lm-eval", "no_such_task_xyz"], "error: --lm-eval: unknown task 'no_such_task_xyz'"),
        (["--lm-eval", "lctk_tiny_mc"], "error: --lm-eval: unknown task 'lctk_tiny_mc'"),  # no include folder
        (["--lm-eval", "lctk_tiny_mc", "--lm-eval-include", "{nowhere}"], "error: --lm-eval-include: not a folder"),
        (["--lm-eval", "lctk_tiny_mc", "--lm-eval-include", "{tasks}", "--lm-eval-limit", "0"],
         "error: --lm-eval-limit: must be at least 1"),
        ([], "error: --suite: give at least one suite"),
        (["--lm-eval", "lctk_tiny_broken", "--lm-eval-include", "{tasks}"], "error: --lm-eval: "),
    ],
)
def test_bad_lm_eval_input_is_one_line(monkeypatch, capsys, setup, args, message):
    names = {"nowhere": setup / "nowhere", "tasks": setup / "tasks"}
    code, err = lctk_eval(monkeypatch, capsys, "--model", setup / "model", "--suite", "",
                          *[a.format(**names) for a in args], "--output", setup / "bad")
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.strip().startswith(message), err


@pytest.mark.slow
def test_the_lm_eval_command_loads_a_saved_lctk_model_with_trust_remote_code(setup):
    """lm_eval never imports lctk itself: the folder's auto_map and code files get it there (lctk.models.remote_code)."""
    out = setup / "cli-out"
    done = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={setup / 'model'},trust_remote_code=True", "--tasks", "lctk_tiny_mc", "--include_path",
         str(setup / "tasks"), "--limit", str(LIMIT), "--output_path", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert results["lctk_tiny_mc"]["sample_len"] == LIMIT and "acc,none" in results["lctk_tiny_mc"]
