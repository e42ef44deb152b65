"""`lctk eval` through the real CLI entry point: a run on a saved tiny Llama, and one-line errors with exit code 2."""

import importlib.util
import json
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


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm-eval is installed")
def test_lm_eval_bridge_without_lm_eval_is_one_line(monkeypatch, capsys, llama_dir, tmp_path):
    code, _, err = lctk(monkeypatch, capsys, "--model", llama_dir, "--lm-eval", "hellaswag", "--output", tmp_path)
    assert code == 2 and err.strip() == "error: --lm-eval needs lm-evaluation-harness: pip install 'lctk[lm-eval]'"
