"""`lctk serve` (lctk's own environment; skipped in the serving one, which has no training dependencies): the model
is checked before vLLM starts, each problem one `error:` line; a servable model becomes `vllm serve MODEL ...` of the
serving venv (os.execv, recorded here instead of run)."""

import os
import sys

import pytest

from lctk.serving import servable_problem

try:
    import lctk.cli  # noqa: F401
except ImportError:
    pytest.skip("lctk's CLI needs lctk's own environment", allow_module_level=True)


def save_model(folder, pattern: str, **settings):
    import lctk

    config = lctk.HybridConfig(pattern=pattern, vocab_size=64, hidden_size=32, num_attention_heads=2,
                               mamba2={"state_size": 8, "head_dim": 16}, **settings)
    lctk.HybridForCausalLM(config).save_pretrained(folder)
    return folder


def lctk_serve(monkeypatch, capsys, *args, venv):
    """`lctk serve ARGS` in this process, os.execv recorded instead of run: (exit code, stderr, the exec'd argv)."""
    started = []

    def execv(path, argv):
        started.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(os, "execv", execv)
    monkeypatch.setenv("LCTK_SERVE_VENV", str(venv))
    monkeypatch.setattr(sys, "argv", ["lctk", "serve", *map(str, args)])
    capsys.readouterr()  # what saving the model printed
    with pytest.raises(SystemExit) as exit_:
        lctk.cli.main()
    return exit_.value.code, capsys.readouterr().err, started[0] if started else None


def fake_venv(folder):
    vllm = folder / "bin" / "vllm"
    vllm.parent.mkdir(parents=True)
    vllm.write_text("#!/bin/sh\n")
    vllm.chmod(0o755)
    return folder


def test_servable_patterns_and_settings():
    import lctk

    def problem(pattern, **settings):
        return servable_problem(lctk.HybridConfig(pattern=pattern, hidden_size=64, num_attention_heads=2, **settings))

    assert problem("MASM") is None
    assert problem("GSGA") is None  # Gated DeltaNet is the recurrent layer vLLM's hybrid needs
    assert problem("MG", gated_deltanet={"head_dim": 32, "expand_v": 1.5}) == (
        "gated_deltanet.expand_v = 1.5: vLLM's Gated DeltaNet takes value heads of d_k channels, so expand_v must be "
        "a whole number")
    assert problem("MAKS").startswith("layer 2 is `K` (Kimi Delta Attention), which lctk's vLLM plugin cannot serve")
    assert problem("B").startswith("layer 0 is `B` (BASED linear attention)")
    assert problem("MA", mamba2={"dt_scale": 2.0}) == (
        "mamba2.dt_scale = 2.0: vLLM's Mamba-2 layer has no such setting (serve with it off)")
    assert problem("MA", mamba2={"state_window": 64}).startswith("mamba2.state_window = 64")
    assert problem("AS").startswith("pattern 'AS' has no `M` or `G` layer")
    assert servable_problem({"model_type": "llama"}).startswith("not an lctk model")


def test_serve_execs_the_serving_venvs_vllm_with_the_options(tmp_path, monkeypatch, capsys):
    model = save_model(tmp_path / "m", "MA")
    venv = fake_venv(tmp_path / "venv")
    code, err, argv = lctk_serve(monkeypatch, capsys, model, "--port", "8123", "--max-num-seqs", "4", venv=venv)
    assert code == 0, err
    assert argv == [str(venv / "bin" / "vllm"), "serve", str(model), "--port", "8123", "--max-num-seqs", "4"]


@pytest.mark.parametrize("given, added", [([], ["--dtype", "bfloat16"]), (["--dtype=float16"], [])])
def test_gated_deltanet_models_get_bf16_on_a_cpu_unless_a_dtype_is_given(tmp_path, monkeypatch, capsys, given, added):
    model = save_model(tmp_path / "m", "MG", gated_deltanet={"head_dim": 16})
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    code, err, argv = lctk_serve(monkeypatch, capsys, model, "--port", "8123", *given, venv=fake_venv(tmp_path / "v"))
    assert code == 0, err
    assert argv[3:] == ["--port", "8123", *given, *added]


@pytest.mark.parametrize("case", ["unservable", "missing model", "no venv"])
def test_serve_problems_are_one_line(tmp_path, monkeypatch, capsys, case):
    model = save_model(tmp_path / "m", "MK" if case == "unservable" else "MA")
    venv = tmp_path / "none" if case == "no venv" else fake_venv(tmp_path / "venv")
    code, err, argv = lctk_serve(monkeypatch, capsys, tmp_path / "absent" if case == "missing model" else model,
                                 venv=venv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and argv is None, err
    expected = {
        "unservable": f"error: MODEL: {model}: layer 1 is `K` (Kimi Delta Attention), which lctk's vLLM plugin cannot",
        "missing model": "error: MODEL: model folder not found",
        "no venv": f"error: no vLLM serving environment ({venv}/bin/vllm not found): run `make serve-setup`",
    }[case]
    assert err.startswith(expected)
