"""`lctk distill` end to end in subprocesses on a tiny Llama teacher: the run dir and its evidence, students that
reload and generate, KL falling within a stage, resume, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lctk.distill.run import distill_recipe
from lctk.errors import UserError
from lctk.recipe import load_recipe

WORDS = "the cat sat on a mat while seven dogs ran past the old red barn near river and sang".split()


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lctk.cli", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd)


def write_recipe(folder: Path, teacher: Path, **distill) -> Path:
    text = folder / "text.txt"
    text.write_text(" ".join(WORDS[(i * i + 3 * i) % len(WORDS)] for i in range(8000)))
    recipe = {
        "run": {"name": "tiny", "output_dir": str(folder / "run"), "seed": 0},
        "data": {"seq_len": 64, "sources": [{"text": str(text)}], "held_out": 0.1, "cache_dir": str(folder / "cache")},
        "train": {"steps": 8, "batch_size": 4, "lr": 3e-3, "warmup_steps": 0, "precision": "fp32"},
        "checkpoint": {"every": 4},
        "logging": {"every": 1, "wandb": {"mode": "disabled"}},
        "distill": {
            "teacher": str(teacher),
            "stages": [{"replace": 1, "by": "loo"}, {"replace": "+1", "by": "mmr", "probe_steps": 2, "steps": 4}],
            "evidence": {"held_out_batches": 2, "passkey_samples": 1, "passkey_lengths": [320],
                         "passkey_depths": [0.5], "speed_prefill": 16, "speed_decode": 2},
            **distill,
        },
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from tiny_teachers import save_teacher

    folder = tmp_path_factory.mktemp("distill")
    recipe = write_recipe(folder, save_teacher(folder / "teacher"), end_to_end={"steps": 2})
    result = run_cli("distill", str(recipe), cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, recipe, result


@pytest.mark.slow
def test_each_stage_leaves_a_student_that_reloads_and_generates(finished_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lctk  # noqa: F401

    folder, _, result = finished_run
    run_dir = folder / "run"
    assert "Traceback" not in result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("done: 3 stages, 2/4 attention layers replaced")
    for stage, replaced in ((1, 1), (2, 2)):
        layout = json.loads((run_dir / f"stage-{stage}" / "layout.json").read_text())
        assert layout["pattern"].count("M") == replaced and len(layout["attention_layers"]) == 4 - replaced
        model = AutoModelForCausalLM.from_pretrained(run_dir / f"stage-{stage}" / "model")
        tokenizer = AutoTokenizer.from_pretrained(run_dir / f"stage-{stage}" / "model")
        assert model.config.pattern == layout["pattern"]
        ids = tokenizer("the cat", return_tensors="pt")["input_ids"]
        assert model.generate(ids, max_new_tokens=5, do_sample=False).shape == (1, ids.shape[1] + 5)
    assert (run_dir / "final").resolve() == (run_dir / "stage-3" / "model").resolve()  # the end-to-end stage
    first, second = (json.loads((run_dir / f"stage-{n}" / "importance.json").read_text()) for n in (1, 2))
    assert first["by"] == "loo" and len(first["scores"]) == 4 and len(first["chosen"]) == 1
    assert second["by"] == "mmr" and len(second["scores"]) == 3 and first["chosen"][0] not in second["chosen"]
    for record in (first, second):  # each stage's ranking against mmr from the aligned mixers (one probe pass)
        assert list(record["agreement"]) == ["mmr-aligned"]
        assert sorted(record["agreement"]["mmr-aligned"]["ranking"]) == sorted(map(int, record["scores"]))
    # freeze: mixers (the default): stage 2 trains stage 1's mixer too; the end-to-end stage trains the MLPs
    weights = [AutoModelForCausalLM.from_pretrained(run_dir / f"stage-{n}" / "model").model.layers for n in (1, 2, 3)]
    layer = first["chosen"][0]
    assert not torch.equal(weights[0][layer].mixer.in_proj.weight, weights[1][layer].mixer.in_proj.weight)
    assert torch.equal(weights[0][layer].mlp.up_proj.weight, weights[1][layer].mlp.up_proj.weight)
    assert not torch.equal(weights[1][layer].mlp.up_proj.weight, weights[2][layer].mlp.up_proj.weight)
    assert not (run_dir / "stage-1" / "distill" / "checkpoints").exists()  # superseded by the saved student


@pytest.mark.slow
def test_the_report_holds_one_row_per_stage_with_every_figure(finished_run):
    folder, _, _ = finished_run
    run_dir = folder / "run"
    rows = json.loads((run_dir / "stages.json").read_text())
    assert [row["stage"] for row in rows] == [0, 1, 2, 3]
    assert [row["attention_layers"] for row in rows] == [4, 3, 2, 2]
    assert rows[0]["kl_rev"] == 0 and rows[0]["top1"] == 1
    for row in rows:
        for key in ("kl_rev", "kl_fwd", "ppl_teacher", "ppl_student", "top1", "passkey_5x", "cache_mib_8k",
                    "cache_mib_32k", "prefill_tok_s", "decode_tok_s", "prefill_vs_teacher", "decode_vs_teacher"):
            assert row[key] is not None, key
    assert rows[2]["cache_mib_32k"] < rows[1]["cache_mib_32k"] < rows[0]["cache_mib_32k"]
    assert rows[0]["cache_mib_32k"] == pytest.approx(4 * 2 * 2 * 16 * 32768 * 2 / 2**20)  # layers x K,V x kv heads x d
    report = (run_dir / "report.md").read_text()
    assert report.count("\n| ") == 5 and "passkey 5x" in report and (run_dir / "quality.png").stat().st_size > 0


@pytest.mark.slow
def test_kl_to_the_teacher_falls_within_a_stage(finished_run):
    folder, _, _ = finished_run
    logged = [json.loads(line) for line in (folder / "run" / "stage-1" / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == list(range(1, 9))
    assert logged[-1]["loss"] < 0.8 * logged[0]["loss"]


@pytest.mark.slow
def test_a_finished_run_is_refused_without_resume_and_resumes_to_the_same_table(finished_run):
    folder, recipe, _ = finished_run
    with pytest.raises(UserError, match="already holds a run; pass --resume auto"):
        distill_recipe(load_recipe(recipe, kind="distill"))
    before = (folder / "run" / "stages.json").read_text()
    resumed = run_cli("distill", str(recipe), "--resume", "auto", cwd=folder)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "stage 2: done before" in resumed.stdout
    assert (folder / "run" / "stages.json").read_text() == before


def test_an_unsupported_teacher_architecture_is_one_line_and_exit_code_2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    result = run_cli("distill", str(write_recipe(tmp_path, tmp_path / "gpt2")), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: distill.teacher: '{tmp_path / 'gpt2'}' is a 'gpt2' model; distillation supports llama, mistral, qwen2"
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stages": [{"replace": 9}]}, "distill.stages.0.replace: 9 asks for 9 more layers; 4 attention layers are left"),
        ({"stages": [{"replace": 2}, {"replace": 2}]}, "quote it, replace: '+N'"),
        ({"stages": [{"layers": [1]}, {"layers": [1, 7]}]}, "distill.stages.1.layers: [1, 7] are not attention layers left"),
        ({"student": {"mixer": "rwkv"}}, "distill.student.mixer: expected one of mamba2, based, lact"),
        ({"student": {"mixer": ["mamba2", "mamba2"]}}, "distill.student.mixer: expected one of mamba2"),
        ({"student": {"mixer": ["mamba2", "gated_deltanet"], "settings": {"state_size": 8}}},
         "distill.student.settings: with a list of mixers, settings are {mixer: overrides}; ['state_size'] not in"),
        ({"student": {"mixer": ["mamba2", "gated_deltanet"]}, "align": {"steps": 0}},
         "distill.student.mixer: a list of mixers is chosen per layer by the align stage; set distill.align.steps > 0"),
        ({"student": {"max_state": 10}}, "distill.student.max_state: 10 elements per layer; no mixer fits (at 32768"),
        ({"stages": [{"replace": "half"}]}, "distill.stages.0.replace: expected N, '+N' or 'P%'"),
        ({"stages": [{"replace": 1, "layers": [0]}]}, "distill.stages.0.replace: give exactly one of replace or layers"),
        ({"student": {"settings": {"state_sizee": 8}}}, "distill.student.settings: mamba2.state_sizee: unknown setting"),
        ({"loss": {"align_steps": 4}}, "distill.loss.align_steps: replaced by distill.align (steps: N"),
        ({"align": {"loss": "l1"}}, "distill.align.loss: input should be 'mse' or 'cosine'"),
        ({"align": {"steps": 0}, "stages": [{"replace": 1, "by": "kl-restore"}]},
         "distill.stages.0.by: kl-restore ranks the aligned mixers; it needs the align stage (distill.align.steps > 0)"),
    ],
)
def test_bad_distill_settings_name_the_key(tmp_path, change, message):
    from tiny_teachers import save_teacher

    recipe = write_recipe(tmp_path, save_teacher(tmp_path / "teacher"), **change)
    with pytest.raises(UserError) as error:
        distill_recipe(load_recipe(recipe, kind="distill"))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("teacher", "change", "key"),
    [
        ("other-teacher", {}, "distill.teacher"),
        ("teacher", {"stages": [{"replace": 1, "by": "loo"}]}, "distill.stages"),
        ("teacher", {"stages": [{"replace": 2}, {"replace": "+1", "by": "mmr", "probe_steps": 2, "steps": 4}]},
         "distill.stages.0.replace"),
    ],
)
def test_resuming_with_a_changed_recipe_names_the_key(tmp_path, teacher, change, key):
    from lctk.train import rundir

    started = load_recipe(write_recipe(tmp_path, tmp_path / "teacher"), kind="distill")
    run_dir = tmp_path / "run"
    with rundir.claim(run_dir, "distill", "tiny", "run.output_dir"):  # a run stopped after its first stage
        (run_dir / "recipe.yaml").write_text(started.to_yaml())
        (run_dir / "stage-1").mkdir()
    changed = load_recipe(write_recipe(tmp_path, tmp_path / teacher, **change), kind="distill")
    with pytest.raises(UserError, match=rf"^{key}: differs from the run in {run_dir} that this command would continue"):
        distill_recipe(changed, resume="auto")
