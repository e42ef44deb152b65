"""The Trainer: gradient accumulation equals a bigger batch, non-finite steps are skipped and stop the run,
checkpoints round-trip exactly and damaged ones are passed over."""

from __future__ import annotations

import json
import math

import pytest
import torch
from accelerate.state import AcceleratorState
from transformers import LlamaConfig, LlamaForCausalLM

from lctk.data.packing import StepBatches, TextRows, cut_pieces
from lctk.errors import UserError
from lctk.models import HybridConfig, HybridForCausalLM
from lctk.parallel import make_accelerator
from lctk.recipe import CheckpointSection, LoggingSection, TrainSection
from lctk.train.checkpoint import latest_valid, list_checkpoints, tied_aliases
from lctk.train.trainer import Trainer, causal_lm_loss


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def tiny_model(seed: int = 0) -> HybridForCausalLM:
    torch.manual_seed(seed)
    config = HybridConfig(pattern="MA", vocab_size=64, hidden_size=32, num_attention_heads=2,
                          mamba2={"state_size": 8, "head_dim": 16, "chunk_size": 8})
    return HybridForCausalLM(config)


def rows(seq_len: int = 16) -> TextRows:
    generator = torch.Generator().manual_seed(0)
    documents = [torch.randint(0, 63, (int(n),), generator=generator).numpy() for n in torch.randint(5, 30, (60,), generator=generator)]
    return TextRows(cut_pieces(documents, seq_len, eos=63), seq_len, seed=0)


def trainer(tmp_path, model, batch_size=4, grad_accum=1, steps=3, loss_fn=causal_lm_loss, keep_last=2, **train) -> Trainer:
    settings = TrainSection(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=1e-2, precision="fp32", **train)
    return Trainer(
        model,
        StepBatches(rows(), batch_size, grad_accum),
        train=settings,
        checkpoint=CheckpointSection(every=1, keep_last=keep_last),
        logging=LoggingSection(every=1, wandb={"mode": "disabled"}),
        run_dir=tmp_path,
        accelerator=make_accelerator(settings),
        total_steps=steps,
        loss_fn=loss_fn,
    )


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_accumulation_matches_one_big_batch(tmp_path):
    big = trainer(tmp_path / "big", tiny_model(), batch_size=4, grad_accum=1)
    big.fit()
    small = trainer(tmp_path / "small", tiny_model(), batch_size=2, grad_accum=2)
    small.fit()
    for name, value in weights(big.model).items():
        torch.testing.assert_close(weights(small.model)[name], value, rtol=1e-4, atol=1e-5)
    first = [json.loads(line) for line in (tmp_path / "big" / "metrics.jsonl").read_text().splitlines()]
    second = [json.loads(line) for line in (tmp_path / "small" / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in first] == pytest.approx([m["loss"] for m in second], rel=1e-5)
    assert set(first[0]) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen", "peak_memory_mb", "skipped_steps"}
    assert first[-1]["tokens_seen"] == 3 * 4 * 16


def poisoned_from(first_bad_call: int):
    """A loss that turns NaN from the `first_bad_call`-th optimizer step on (0-based)."""

    def loss_fn(model, batch):
        loss = causal_lm_loss(model, batch)
        return loss * math.nan if loss_fn.step_calls >= first_bad_call else loss

    loss_fn.step_calls = 0
    return loss_fn


def count_steps(run: Trainer, loss_fn) -> dict:
    """Count run's optimizer steps into loss_fn.step_calls; returns the weights after the first step (filled in)."""
    original_step, after_first = run._step, {}

    def counting_step(step):
        result = original_step(step)
        loss_fn.step_calls += 1
        if step == 0:
            after_first.update(weights(run.model))
        return result

    run._step = counting_step
    return after_first


def test_non_finite_losses_skip_the_step_and_stop_the_run(tmp_path):
    poisoned = poisoned_from(1)
    run = trainer(tmp_path, tiny_model(), steps=20, loss_fn=poisoned, max_bad_steps=3)
    after_first = count_steps(run, poisoned)
    with pytest.raises(UserError, match=r"training stopped at step 4: 3 non-finite losses .* no checkpoint precedes .* train.lr"):
        run.fit()
    assert run.state.skipped_steps == 3
    for name, value in weights(run.model).items():  # skipped steps left the weights alone
        assert torch.equal(value, after_first[name])
    # checkpoint 1 holds the weights the first bad step saw: not resumable, kept aside
    assert list_checkpoints(tmp_path / "checkpoints") == [] and (tmp_path / "checkpoints" / "diverged-step-00000001").is_dir()
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics[1]["loss"] is None and metrics[-1]["skipped_steps"] == 3


def test_the_nan_stop_keeps_and_names_the_last_checkpoint_whose_next_step_was_finite(tmp_path):
    poisoned = poisoned_from(3)
    run = trainer(tmp_path, tiny_model(), steps=20, loss_fn=poisoned, max_bad_steps=3, keep_last=1)
    count_steps(run, poisoned)
    good = tmp_path / "checkpoints" / "step-00000002"
    with pytest.raises(UserError, match=rf"stopped at step 6: .* from step 4, .* not saved; the last checkpoint before them is {good} "):
        run.fit()
    assert list_checkpoints(tmp_path / "checkpoints") == [good]  # the stop rotated nothing out
    assert latest_valid(tmp_path / "checkpoints", print) == good


def test_a_run_whose_every_step_is_skipped_fails(tmp_path):
    run = trainer(tmp_path, tiny_model(), steps=3, loss_fn=poisoned_from(0), max_bad_steps=10)
    with pytest.raises(UserError, match="stopped at step 3: 3 non-finite losses .* no checkpoint precedes them"):
        run.fit()
    assert list_checkpoints(tmp_path / "checkpoints") == []


def test_checkpoints_round_trip_exactly_and_damaged_ones_are_skipped(tmp_path):
    model = tiny_model()
    assert tied_aliases(model) == {"lm_head.weight": "model.embed_tokens.weight"}
    first = trainer(tmp_path, model, steps=3)
    first.fit()
    saved = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in saved] == ["step-00000002", "step-00000003"]  # keep_last = 2

    resumed = trainer(tmp_path, tiny_model(seed=1), steps=3)
    resumed._resume(str(saved[-1]))
    for name, value in weights(first.model).items():
        assert torch.equal(weights(resumed.model)[name], value)
    state_a, state_b = first.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for key in state_a:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state_a[key][field], state_b[key][field])
    assert resumed.state.step == 3

    (saved[-1] / "model.safetensors").write_bytes(b"garbage")
    (tmp_path / "checkpoints" / "step-00000004.tmp").mkdir()  # a save interrupted by a kill
    warnings = []
    assert latest_valid(tmp_path / "checkpoints", warnings.append) == saved[0]
    assert "step-00000003" in warnings[0] and "model.safetensors" in warnings[0]
    with pytest.raises(UserError, match="damaged"):
        trainer(tmp_path, tiny_model(), steps=3)._resume(str(saved[-1]))


def test_rotation_keeps_the_fresh_checkpoint_when_newer_ones_are_damaged(tmp_path):
    trainer(tmp_path, tiny_model(), steps=6, keep_last=3).fit()
    folder = tmp_path / "checkpoints"
    for step in (5, 6):  # damaged, newer than the valid step 4 the next run resumes from
        (folder / f"step-0000000{step}" / "model.safetensors").write_bytes(b"garbage")
    again = trainer(tmp_path, tiny_model(), steps=5, keep_last=1)
    again.fit("auto")
    assert [p.name for p in list_checkpoints(folder)] == ["step-00000005", "step-00000006"]
    assert latest_valid(folder, print) == folder / "step-00000005"


@pytest.mark.parametrize("manifest", ["{}", "[]", '{"step": 3}', '{"files": {"model.safetensors": 12}}', '{"files": {}}'])
def test_a_manifest_of_the_wrong_shape_is_damaged(tmp_path, manifest):
    trainer(tmp_path, tiny_model(), steps=3).fit()
    folder = tmp_path / "checkpoints"
    (folder / "step-00000003" / "manifest.json").write_text(manifest)
    warnings = []
    assert latest_valid(folder, warnings.append) == folder / "step-00000002"
    assert "step-00000003 is damaged (manifest.json does not list" in warnings[0]


def _rehash(checkpoint) -> None:
    """A manifest that matches the files again: what another run (or lctk version) would have written."""
    from lctk.train.checkpoint import _sha256

    manifest = json.loads((checkpoint / "manifest.json").read_text())
    for name in manifest["files"]:
        manifest["files"][name] = {"bytes": (checkpoint / name).stat().st_size, "sha256": _sha256(checkpoint / name)}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("model", "is of another model: model.embed_tokens.weight is (64, 32) there but (64, 64) in this recipe's model"),
        ("optimizer.pt", "cannot be restored into this run"),
        ("trainer.json", "cannot be restored into this run"),
    ],
)
def test_a_checkpoint_whose_files_match_but_do_not_fit_is_one_line(tmp_path, change, message):
    trainer(tmp_path, tiny_model(), steps=1).fit()
    checkpoint = tmp_path / "checkpoints" / "step-00000001"
    if change != "model":
        (checkpoint / change).write_bytes(b"[1, 2]" if change == "trainer.json" else bytes(300))
        _rehash(checkpoint)
    model = tiny_model() if change != "model" else HybridForCausalLM(HybridConfig(
        pattern="MA", vocab_size=64, hidden_size=64, num_attention_heads=2, mamba2={"state_size": 8, "head_dim": 16}))
    with pytest.raises(UserError) as error:
        trainer(tmp_path, model, steps=2)._resume(str(checkpoint))
    assert str(error.value).startswith(f"--resume: checkpoint {checkpoint}") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_checkpoint_written_with_another_context_split_is_refused(tmp_path):
    trainer(tmp_path, tiny_model(), steps=1).fit()
    checkpoint = tmp_path / "checkpoints" / "step-00000001"
    state = json.loads((checkpoint / "trainer.json").read_text())
    assert state["context_parallel"] == 1
    (checkpoint / "trainer.json").write_text(json.dumps({**state, "context_parallel": 2}))
    _rehash(checkpoint)
    with pytest.raises(UserError, match=r"^train\.context_parallel: .* written with context_parallel 2; resume it with "
                                        r"the same \(this run has 1\)"):
        trainer(tmp_path, tiny_model(), steps=2)._resume(str(checkpoint))


@pytest.mark.parametrize("settings", [{"activation_checkpointing": True}, {"recompute_segment": 5},
                                      {"activation_checkpointing": True, "recompute_segment": 5}])
def test_activation_checkpointing_and_segments_change_memory_not_results(tmp_path, settings):
    plain = trainer(tmp_path / "plain", tiny_model(), steps=2)
    plain.fit()
    recomputed = trainer(tmp_path / "ckpt", tiny_model(), steps=2, **settings)
    assert recomputed.model.model.gradient_checkpointing == settings.get("activation_checkpointing", False)
    assert recomputed.model.model.recompute_segment == settings.get("recompute_segment")
    recomputed.fit()
    # segments cut the SSD's chunks at other places: the same sums in another order (Adam then scales tiny gradients up)
    for name, value in weights(plain.model).items():
        torch.testing.assert_close(weights(recomputed.model)[name], value, rtol=1e-4, atol=1e-5)


def test_segments_need_an_lctk_model(tmp_path):
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(UserError, match="train.recompute_segment: needs an lctk hybrid model, not LlamaForCausalLM"):
        trainer(tmp_path, llama, recompute_segment=8)
