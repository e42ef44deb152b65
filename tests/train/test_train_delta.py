"""`lctk train` with the delta-rule mixers (`G`, `K`) end to end in subprocesses: the run trains, a run resumed from
a mid-run checkpoint ends with bit-identical weights, and the saved model generates with a cache that equals the full
forward pass."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
MODEL = {"pattern": "GCKA", "hidden_size": 32, "num_attention_heads": 2,
         "gated_deltanet": {"num_heads": 2, "head_dim": 16, "chunk_size": 8}, "kda": {"chunk_size": 8}}


def test_trains_resumes_bitwise_and_generates_with_its_cache(tmp_path, make_recipe, lctk):
    recipe = make_recipe(tmp_path, "delta", model=MODEL, train={"steps": 6}, checkpoint={"every": 2})
    run_dir = tmp_path / "runs" / "delta"
    first = lctk("train", str(recipe))
    assert first.returncode == 0, first.stderr[-3000:]
    expected = load_file(run_dir / "final" / "model.safetensors")

    shutil.rmtree(run_dir / "checkpoints" / "step-00000006")  # as after a crash past the step-4 checkpoint
    shutil.rmtree(run_dir / "final")
    resumed = lctk("train", str(recipe), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    got = load_file(run_dir / "final" / "model.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name

    from transformers import AutoModelForCausalLM

    import lctk as package  # noqa: F401  (registers the hybrid with the Auto classes)

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()
    assert model.config.pattern == "GCKA"
    ids = torch.randint(1, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
        full = model(out.sequences[:, :-1], use_cache=False).logits[:, ids.shape[1] - 1 :]
    cached = torch.stack(out.logits, dim=1)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
