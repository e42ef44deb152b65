"""`lctk eval` through the real CLI entry point: a run on a saved tiny Llama, and one-line errors with exit code 2."""

import json
import os
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lctk.cli import main


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, bpe_tokenizer):
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(bpe_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(folder)
    bpe_tokenizer.save_pretrained(folder)
    return folder


def lctk(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["lctk", "eval", *map(str, args)])
    with pytest.raises(SystemExit) as done:
        main()
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return done.value.code, out, err


def test_eval_run_writes_results_plots_and_report(monkeypatch, capsys, llama_dir, tmp_path):
    code, out, err = lctk(monkeypatch, capsys, "--model", llama_dir, "--suite", "passkey,perplexity", "--lengths",
                          "128,256", "--limit", "1", "--depths", "0.5", "--max-new-tokens", "4", "--output", tmp_path)
    assert code == 0, err
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["results"]) == {"passkey", "perplexity"}
    assert set(results["results"]["passkey"]["by_length"]) == {"128", "256"}
    assert results["config"]["model_path"] == str(llama_dir) and results["config"]["length_limit"] == 512
    assert results["versions"]["torch"] == torch.__version__
    assert (tmp_path / "report.md").exists() and (tmp_path / "passkey_heatmap.png").exists()
    assert "passkey" in out and "report.md" in out
    # the same command again resumes: nothing new in samples.jsonl
    before = (tmp_path / "samples.jsonl").read_text()
    assert lctk(monkeypatch, capsys, "--model", llama_dir, "--suite", "passkey,perplexity", "--lengths", "128,256",
                "--limit", "1", "--depths", "0.5", "--max-new-tokens", "4", "--output", tmp_path)[0] == 0
    assert (tmp_path / "samples.jsonl").read_text() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "{missing}"], "error: --model: model folder not found: {missing}"),
        (["--model", "{llama}", "--suite", "passkey,bogus"], "error: --suite: unknown suite 'bogus'"),
        (["--model", "{llama}", "--lengths", "1k,4x"], "error: --lengths: cannot read '4x'"),
        (["--model", "{llama}", "--lengths", "256,1k"], "error: --lengths: 1k (1024 tokens) is above the model's limit of 512"),
        (["--model", "{llama}", "--depths", "0,half"], "error: --depths: cannot read '0,half'"),
        (["--model", "{llama}", "--depths", "0,2"], "error: --depths: every depth must be within 0..1"),
        (["--model", "{llama}", "--device", "tpu:9"], "error: --device: unknown device 'tpu:9'"),
        (["--model", "{llama}", "--dtype", "float8"], "error: --dtype: unknown dtype 'float8'"),
        (["--model", "{missing}.gguf"], "error: --model: model file not found: {missing}.gguf"),
        (["--model", "{empty}"], "error: --model: no config.json in {empty}"),
        (["--model", "{llama}", "--max-new-tokens", "-3"], "error: --max-new-tokens: must be at least 1, got -3"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(monkeypatch, capsys, llama_dir, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    names = {"missing": tmp_path / "nowhere", "llama": llama_dir, "empty": tmp_path / "empty"}
    code, out, err = lctk(monkeypatch, capsys, *[a.format(**names) for a in args], "--output", tmp_path / "out")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.format(**names)), err
    assert "Traceback" not in err


def test_lm_eval_bridge_without_lm_eval_is_one_line(monkeypatch, capsys, llama_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed
    code, _, err = lctk(monkeypatch, capsys, "--model", llama_dir, "--lm-eval", "hellaswag", "--output", tmp_path)
    assert code == 2 and err.strip() == "error: --lm-eval needs lm-evaluation-harness: pip install 'lctk[lm-eval]'"


PASSKEY_RUN = ("--suite", "passkey", "--lengths", "128", "--limit", "1", "--depths", "0.5", "--max-new-tokens", "4")


def save_llama(folder, tokenizer, seed: int) -> None:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_resumed_samples_are_keyed_on_the_weights_not_the_path(monkeypatch, capsys, bpe_tokenizer, tmp_path):
    model, out = tmp_path / "model", tmp_path / "out"
    save_llama(model, bpe_tokenizer, seed=0)
    assert lctk(monkeypatch, capsys, "--model", model, *PASSKEY_RUN, "--output", out)[0] == 0
    code, _, err = lctk(monkeypatch, capsys, "--model", model, *PASSKEY_RUN, "--output", out)
    assert code == 0 and f"passkey: reusing 1 finished samples from {out}" in err
    save_llama(model, bpe_tokenizer, seed=1)  # another model at the same path: nothing of the old one is reused
    code, _, err = lctk(monkeypatch, capsys, "--model", model, *PASSKEY_RUN, "--output", out)
    assert code == 0 and "reusing" not in err
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[0]["key"] != records[1]["key"]
    assert json.loads((out / "results.json").read_text())["config"]["model_fingerprint"]


def test_every_model_and_setting_is_checked_before_the_first_sample(monkeypatch, capsys, llama_dir, tmp_path):
    out = tmp_path / "out"
    code, _, err = lctk(monkeypatch, capsys, "--model", f"{llama_dir},/nope", *PASSKEY_RUN, "--output", out)
    assert code == 2 and err.strip() == "error: --model: model folder not found: /nope"
    # every NIAH task's prompt must fit the shortest length: refused before any sample runs
    code, _, err = lctk(monkeypatch, capsys, "--model", llama_dir, "--suite", "niah", "--lengths", "96,256",
                        "--limit", "1", "--output", out)
    assert code == 2 and "--lengths: 96 tokens leave no room for a niah_" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_an_output_path_that_is_a_file_is_one_line(monkeypatch, capsys, llama_dir, tmp_path):
    (tmp_path / "taken").write_text("mine")
    code, _, err = lctk(monkeypatch, capsys, "--model", llama_dir, *PASSKEY_RUN, "--output", tmp_path / "taken")
    assert code == 2 and err.strip() == f"error: eval output folder {tmp_path / 'taken'} is an existing file, not a folder"
    assert (tmp_path / "taken").read_text() == "mine"


def test_a_comparison_never_replaces_a_report_lctk_did_not_write(monkeypatch, capsys, llama_dir, tmp_path):
    (tmp_path / "report.md").write_text("mine")
    code, _, err = lctk(monkeypatch, capsys, "--model", f"{llama_dir},{llama_dir}", *PASSKEY_RUN, "--output", tmp_path)
    assert code == 2 and err.strip().endswith("holds a report.md that lctk did not write, which an eval would replace; "
                                              "choose another --output")
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"] and (tmp_path / "report.md").read_text() == "mine"


@pytest.mark.parametrize(
    "damage",
    [
        lambda f: f.write_bytes(os.urandom(300)),
        lambda f: f.write_text("\n".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "score"})
                                         for line in f.read_text().splitlines())),
    ],
    ids=["random-bytes", "record-without-score"],
)
def test_a_damaged_samples_file_is_one_warning_and_its_samples_run_again(monkeypatch, capsys, llama_dir, tmp_path, damage):
    assert lctk(monkeypatch, capsys, "--model", llama_dir, *PASSKEY_RUN, "--output", tmp_path)[0] == 0
    damage(tmp_path / "samples.jsonl")
    code, _, err = lctk(monkeypatch, capsys, "--model", llama_dir, *PASSKEY_RUN, "--output", tmp_path)
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert code == 0 and len(warnings) == 1 and "damaged record(s)" in warnings[0] and "Traceback" not in err
    assert "score" in json.loads((tmp_path / "samples.jsonl").read_bytes().splitlines()[-1])


def test_a_folder_in_place_of_samples_jsonl_is_one_line(monkeypatch, capsys, llama_dir, tmp_path):
    (tmp_path / "samples.jsonl").mkdir()
    code, _, err = lctk(monkeypatch, capsys, "--model", llama_dir, *PASSKEY_RUN, "--output", tmp_path)
    assert code == 2 and err.strip().startswith(f"error: {tmp_path / 'samples.jsonl'} is a folder")


def test_a_tokenizer_larger_than_the_model_vocabulary_is_one_line(monkeypatch, capsys, bpe_tokenizer, tmp_path):
    save_llama(tmp_path / "model", bpe_tokenizer, seed=0)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    small = LlamaConfig(**{**config, "vocab_size": 100})
    LlamaForCausalLM(small).save_pretrained(tmp_path / "model")
    capsys.readouterr()
    code, _, err = lctk(monkeypatch, capsys, "--model", tmp_path / "model", *PASSKEY_RUN, "--output", tmp_path / "o")
    assert code == 2 and err.strip() == f"error: the tokenizer has {len(bpe_tokenizer)} tokens, more than the model's vocab_size 100"
