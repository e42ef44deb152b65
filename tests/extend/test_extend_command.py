"""`lctk extend` end to end on a tiny model: the flag form and a recipe with training stages, the files each run
writes, resuming, and bad input (one line, exit code 2)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from lctk import HybridConfig, HybridForCausalLM
from lctk.cli import app
from lctk.data.tokenizer import build_tokenizer
from lctk.errors import UserError
from lctk.extend.rope import scale_rope
from lctk.extend.run import rebuild_rotary
from lctk.recipe import load_recipe
from lctk.tasks.corpus import builtin_documents

LENGTH = 32
QUICK_EVAL = ["--set", "eval.limit=1", "--set", "eval.suites=[perplexity,state-collapse]", "--set", "eval.lengths=[1x,2x]"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer("bytes", None, None)
    torch.manual_seed(0)
    config = HybridConfig(
        pattern="MAM", vocab_size=320, hidden_size=32, num_attention_heads=2, max_position_embeddings=LENGTH,
        mamba2={"state_size": 8, "head_dim": 16, "chunk_size": 16}, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.train_length = LENGTH
    HybridForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def invoke(*args):
    result = CliRunner().invoke(app, ["extend", *map(str, args)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.output


def test_flag_form_writes_the_extended_model_and_the_evidence(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    invoke("--model", tiny_model_dir, "--method", "yarn,state_norm", "--factor", 4, "--output", out, *QUICK_EVAL)
    saved = json.loads((out / "final" / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "yarn" and saved["rope_parameters"]["factor"] == 4
    assert saved["rope_scaling"] == {k: v for k, v in saved["rope_parameters"].items() if k != "rope_theta"}
    assert saved["max_position_embeddings"] == 4 * LENGTH
    assert saved["lctk_extension"]["original_max_position_embeddings"] == LENGTH
    caps = saved["mamba2"]["state_norm_cap"]
    assert caps[1] is None and len(caps[0]) == len(caps[2]) == 4

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.mamba2["state_norm_cap"] == caps
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 256, (1, 3 * LENGTH))).logits).all()

    results = json.loads((out / "extend.json").read_text())
    growth = {when: results[when]["state-collapse"]["state_growth"][str(2 * LENGTH)] for when in ("before", "after")}
    assert growth["after"] <= growth["before"] + 1e-6  # capped states cannot outgrow the uncapped ones
    report = (out / "report.md").read_text()
    assert "perplexity, before" in report and "perplexity, after" in report
    for name in ("loss_by_position.png", "perplexity_by_length.png", "eval/before/results.json", "eval/after/results.json"):
        assert (out / name).is_file()


def test_recipe_with_training_stages_and_calibration_resumes(tiny_model_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(builtin_documents("train")[:20]))
    recipe = {
        "run": {"name": "stages", "output_dir": str(tmp_path / "run")},
        "data": {"sources": [{"text": str(text)}]},
        "train": {"steps": 2, "batch_size": 2, "lr": 1e-3, "precision": "fp32"},
        "logging": {"every": 1, "wandb": {"mode": "disabled"}},
        "eval": {"suites": ["perplexity"], "lengths": ["1x", "4x"], "limit": 1},
        "extend": {
            "model": str(tiny_model_dir),
            "length": 4 * LENGTH,
            "rope": {"method": "linear"},
            "recurrent": [{"method": "calibrate_dt", "grid": [0.5, 1, 2]}],
            "stages": [{"seq_len": "2x", "rope": {"factor": 2}}, {"seq_len": "4x", "steps": 1, "long_share": 1.0}],
        },
    }
    path = tmp_path / "extend.yaml"
    path.write_text(yaml.safe_dump(recipe))
    first = invoke(path)
    assert "stage 1: 2 steps at 64 tokens" in first and "stage 2: 1 steps at 128 tokens" in first
    stage1 = AutoConfig.from_pretrained(tmp_path / "run" / "stages" / "1" / "final")
    assert stage1.rope_parameters["factor"] == 2 and stage1.max_position_embeddings == 2 * LENGTH
    final = AutoConfig.from_pretrained(tmp_path / "run" / "final")
    assert final.rope_parameters == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    assert final.mamba2["dt_scale"][1] is None and all(s in (0.5, 1.0, 2.0) for s in final.mamba2["dt_scale"][::2])
    assert [s["seq_len"] for s in final.lctk_extension["stages"]] == [2 * LENGTH, 4 * LENGTH]
    assert "stage 1: done before" in invoke(path)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(vocab_size=320, hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                         intermediate_size=64, max_position_embeddings=LENGTH)
    LlamaForCausalLM(config).save_pretrained(folder)
    build_tokenizer("bytes", None, None).save_pretrained(folder)
    return folder


def test_a_llama_model_is_extended_in_the_layout_transformers_reads(llama_dir, tmp_path):
    invoke("--model", llama_dir, "--method", "llama3", "--factor", 4, "--output", tmp_path / "o", "--set", "eval.suites=[]")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "final")
    assert isinstance(model, LlamaForCausalLM) and model.config.max_position_embeddings == 4 * LENGTH
    assert model.config.rope_parameters["rope_type"] == "llama3"
    assert model.config.rope_parameters["original_max_position_embeddings"] == LENGTH
    saved = json.loads((tmp_path / "o" / "final" / "config.json").read_text())
    assert saved["rope_scaling"]["rope_type"] == "llama3" and saved["rope_theta"] == 10000.0


def test_recurrent_method_on_an_attention_only_model(llama_dir, tmp_path):
    with pytest.raises(UserError, match=r"extend\.recurrent\.0\.method: the model has no Mamba-2 layers"):
        invoke("--model", llama_dir, "--method", "state_window", "--factor", 2, "--output", tmp_path / "o",
               "--set", "eval.suites=[]")
    assert not (tmp_path / "o").exists()  # checked before the run folder is made


def test_a_recurrent_setting_that_does_not_fit_the_model_fails_before_any_write(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match=r"^extend\.recurrent\.0\.scale: a per-layer list needs one entry per layer"):
        invoke("--model", tiny_model_dir, "--method", "dt_scale", "--factor", 2, "--output", tmp_path / "o",
               "--set", "eval.suites=[]", "--set", "extend.recurrent.0.scale=[2.0]")
    assert not (tmp_path / "o").exists()


def weights_only(llama_dir, folder):
    """The model folder without its tokenizer."""
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(llama_dir / name, folder / name)
    return folder


def test_a_training_free_change_needs_no_tokenizer(llama_dir, tmp_path):
    model = weights_only(llama_dir, tmp_path / "weights-only")
    invoke("--model", model, "--method", "yarn", "--factor", 2, "--output", tmp_path / "o", "--set", "eval.suites=[]")
    assert AutoConfig.from_pretrained(tmp_path / "o" / "final").rope_parameters["rope_type"] == "yarn"
    with pytest.raises(UserError, match=rf"^extend.model: no tokenizer in {model} \(needed by eval.suites\)$"):
        invoke("--model", model, "--method", "yarn", "--factor", 2, "--output", tmp_path / "o2")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "config.json").write_text("{garbage"), "config.json is not valid JSON"),
        (lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 7), "model.safetensors is truncated: 7 bytes"),
    ],
)
def test_a_damaged_model_is_reported_as_such_not_as_a_tokenizer_problem(llama_dir, tmp_path, damage, message):
    model = weights_only(llama_dir, tmp_path / "damaged")
    damage(model)
    with pytest.raises(UserError, match="^extend.model: ") as error:
        invoke("--model", model, "--method", "yarn", "--factor", 2, "--output", tmp_path / "o")
    assert message in str(error.value) and "tokenizer" not in str(error.value)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "m", "--method", "ntk", "--factor", 4], "--method: unknown method 'ntk'"),
        (["--model", "m", "--method", "yarn,linear", "--factor", 4], "--method: one RoPE method at a time"),
        (["--model", "m", "--method", "yarn"], "--factor: give --factor"),
        (["--model", "m", "--method", "yarn", "--factor", 0.5], "extend.factor: must be >= 1"),
        (["--model", "m", "--method", "yarn", "--factor", 4, "--set", "extend.rope.beta_fast=-1"],
         "extend.rope.beta_fast: must be a positive number"),
        (["--model", "m", "--method", "yarn", "--factor", 4, "--set", "extend.rope.mscale=1"],
         "extend.rope.mscale: unknown key"),
        (["--model", "m", "--method", "dt_scale", "--factor", 4], "extend.recurrent.0.scale: dt_scale needs a scale"),
        (["--model", "no/such/folder", "--method", "yarn", "--factor", 4, "--set", "eval.suites=[]"], "no/such/folder"),
        (["--method", "yarn", "--factor", 4], "--model: give the model folder"),
    ],
)
def test_bad_flags_name_the_problem_in_one_line(args, message, tmp_path):
    with pytest.raises(UserError) as error:
        invoke(*args, "--output", tmp_path / "out")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_recipe_names_the_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"extend": {"model": "m", "factor": 2, "rope": {"method": "yarn"}, "stagez": []}}))
    with pytest.raises(UserError, match=r"^extend\.stagez: unknown key \(did you mean 'stages'\?\)$"):
        invoke(path)
    path.write_text(yaml.safe_dump({"extend": {"model": "m", "factor": 2, "recurrent": [{"method": "forget"}]}}))
    with pytest.raises(UserError, match=r"extend\.recurrent\.0\.method: unknown method 'forget'"):
        invoke(path)
    with pytest.raises(UserError, match="give a recipe or the flags"):
        invoke(path, "--model", "m")


def test_bad_input_exits_2_with_one_line():
    args = ["--model", "m", "--method", "ntk", "--factor", "4"]
    result = subprocess.run([sys.executable, "-m", "lctk.cli", "extend", *args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[2].glob("recipes/extend-*.yaml")), ids=lambda p: p.name)
def test_extend_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.kind == "extend" and (recipe.extend.rope or recipe.extend.recurrent or recipe.extend.stages)


@pytest.mark.parametrize("build", [
    lambda: HybridForCausalLM(HybridConfig(pattern="A", vocab_size=50, hidden_size=32, num_attention_heads=2)),
    lambda: LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                                         intermediate_size=64)),
], ids=["lctk", "llama"])
def test_rebuilt_rotary_follows_the_new_config(build):
    model = build()
    scale_rope(model.config, "yarn", 4)
    rebuild_rotary(model)
    fresh = type(model)(model.config)
    assert torch.equal(model.model.rotary_emb.inv_freq, fresh.model.rotary_emb.inv_freq)
    assert model.model.rotary_emb.attention_scaling == fresh.model.rotary_emb.attention_scaling > 1


def test_a_rerun_with_another_model_is_refused_until_overwrite(tiny_model_dir, llama_dir, tmp_path):
    out = tmp_path / "run"
    quick = ["--method", "yarn", "--factor", 2, "--output", out, "--set", "eval.suites=[]"]
    invoke("--model", tiny_model_dir, *quick)
    with pytest.raises(UserError, match=rf"^extend\.model: differs from the run in {out} .*--overwrite"):
        invoke("--model", llama_dir, *quick)
    assert AutoConfig.from_pretrained(out / "final").model_type == "lctk_hybrid"
    invoke("--model", llama_dir, *quick, "--overwrite")
    assert AutoConfig.from_pretrained(out / "final").model_type == "llama"


def test_an_output_lctk_did_not_make_is_refused_and_left_alone(tiny_model_dir, tmp_path):
    mine = tmp_path / "mine"
    (mine / "final").mkdir(parents=True)
    (mine / "final" / "notes.txt").write_text("mine")
    (tmp_path / "file.txt").write_text("mine")
    quick = ["--model", tiny_model_dir, "--method", "yarn", "--factor", 2, "--set", "eval.suites=[]"]
    with pytest.raises(UserError, match="already exists and was not made by lctk"):
        invoke(*quick, "--output", mine)
    with pytest.raises(UserError, match="--overwrite: .* was not made by lctk"):
        invoke(*quick, "--output", mine, "--overwrite")
    with pytest.raises(UserError, match="file.txt is a file, not a run folder"):
        invoke(*quick, "--output", tmp_path / "file.txt")
    assert [p.name for p in mine.rglob("*")] == ["final", "notes.txt"] and (tmp_path / "file.txt").read_text() == "mine"


def test_a_missing_calibration_text_fails_before_anything_is_written(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match=r"^extend\.calibration\.text: no file at .*nope\.txt"):
        invoke("--model", tiny_model_dir, "--method", "state_norm", "--factor", 2, "--output", tmp_path / "run",
               "--set", "eval.suites=[]", "--set", f"extend.calibration.text={tmp_path / 'nope.txt'}")
    assert not (tmp_path / "run").exists()


def test_a_length_beyond_the_largest_factor_is_one_line_before_any_write(tiny_model_dir, tmp_path):
    output = tmp_path / "out"
    with pytest.raises(UserError, match=r"^extend\.length: 10000000 is 312500x the model's current length 32; at most 1024x$"):
        invoke("--model", tiny_model_dir, "--method", "yarn", "--length", 10_000_000, "--output", output)
    assert not output.exists()
