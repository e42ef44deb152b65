"""The align stage: each converted layer's mixer learns its attention layer's output from the teacher's inputs; the
per-layer gradients taken inside the teacher's forward equal those of one backward; the teacher never changes; a
run killed inside the align stage resumes to the same mixers and the same student."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from test_distill_command import write_recipe
from tiny_teachers import tiny_llama

from lctk.distill.align import AlignedMixers, align_loss_fn, choose_targets, layer_errors, output_distance
from lctk.distill.convert import replace_layers, student_from_teacher


def _batch(seed: int, rows: int = 2, length: int = 24) -> dict:
    ids = torch.randint(0, 320, (rows, length), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[0, :3] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(length).expand(rows, length)}


def _aligned(teacher, mixer: str = "mamba2") -> AlignedMixers:
    return AlignedMixers.of(replace_layers(teacher, [0, 1, 2, 3], mixer, "mil"))


def _train(aligned, teacher, batches, steps: int, kind: str = "mse", lr: float = 3e-3) -> None:
    optimizer = torch.optim.AdamW(aligned.parameters(), lr=lr)
    loss_fn = align_loss_fn(teacher, kind)
    for step in range(steps):
        loss_fn(aligned, batches[step % len(batches)]).backward()
        optimizer.step()
        optimizer.zero_grad()


def test_distances_match_their_definitions():
    ours, theirs = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    torch.testing.assert_close(output_distance(ours, theirs, "mse"),
                               torch.nn.functional.mse_loss(ours, theirs, reduction="none").mean(-1))
    cosine = (ours * theirs).sum(-1) / (ours.norm(dim=-1) * theirs.norm(dim=-1))
    torch.testing.assert_close(output_distance(ours, theirs, "cosine"), 1 - cosine)
    assert float(output_distance(theirs, 2 * theirs, "cosine").abs().max()) < 1e-6


# 30 steps on a random tiny teacher: Mamba-2 (MIL init) gets within 1% of its start on every layer; Gated DeltaNet
# (fresh gates and output norm) and the cosine loss move more slowly (measured: 0.54-0.80x and 0.65-0.89x)
@pytest.mark.parametrize(("mixer", "kind", "lr", "factor"),
                         [("mamba2", "mse", 3e-3, 0.1), ("gated_deltanet", "mse", 3e-3, 0.9), ("mamba2", "cosine", 1e-2, 0.95)])
def test_align_cuts_every_layers_output_distance_on_held_out_rows(mixer, kind, lr, factor):
    teacher = student_from_teacher(tiny_llama(seed=7)).requires_grad_(False)
    aligned = _aligned(teacher, mixer)
    held_out = [_batch(100)]
    before = layer_errors(teacher, aligned, held_out, kind)
    _train(aligned, teacher, [_batch(seed) for seed in range(4)], 30, kind, lr)
    after = layer_errors(teacher, aligned, held_out, kind)
    assert sorted(after) == [0, 1, 2, 3]
    for layer in after:  # on rows it did not train on
        assert after[layer] < factor * before[layer], (layer, before[layer], after[layer])


def test_the_loss_is_the_mean_over_layers_of_each_mixers_distance_to_its_attention():
    teacher = student_from_teacher(tiny_llama(seed=7)).requires_grad_(False)
    aligned = _aligned(teacher)
    batch = _batch(5)
    counted = (batch["labels"][:, 1:] != -100).sum()
    # reference: the teacher's normed input of each layer, through the layer's attention and its new mixer
    with torch.no_grad():
        hidden = teacher(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states
    errors = layer_errors(teacher, aligned, [batch])
    reference = {}
    for layer in range(4):
        block = teacher.model.layers[layer]
        seen = {}
        handle = block.mixer.register_forward_hook(lambda m, args, out, seen=seen: seen.update(seq=args[1], out=out))
        with torch.no_grad():
            teacher(input_ids=batch["input_ids"])
            handle.remove()
            ours = aligned.mixers[str(layer)](block.mixer_norm(hidden[layer]), seen["seq"], None)
            torch.testing.assert_close(block.mixer(block.mixer_norm(hidden[layer]), seen["seq"], None), seen["out"])
        mask = torch.nn.functional.pad(batch["labels"][:, 1:] != -100, (0, 1))
        reference[layer] = float((output_distance(ours, seen["out"]) * mask).sum() / counted)
    assert errors == pytest.approx(reference, rel=1e-5)
    loss = align_loss_fn(teacher)(aligned, batch)
    assert float(loss.detach()) / float(counted) == pytest.approx(sum(reference.values()) / 4, rel=1e-5)


def test_gradients_taken_layer_by_layer_equal_one_backward(monkeypatch):
    teacher = student_from_teacher(tiny_llama(seed=7)).requires_grad_(False)
    aligned = _aligned(teacher)
    batch = _batch(9)
    eager = align_loss_fn(teacher)(aligned, batch)
    eager.backward()
    layer_by_layer = {name: p.grad.clone() for name, p in aligned.named_parameters()}
    aligned.zero_grad()
    monkeypatch.setattr("lctk.parallel.fsdp.is_sharded", lambda module: True)  # the FSDP path: one graph, one backward
    whole = align_loss_fn(teacher)(aligned, batch)
    whole.backward()
    torch.testing.assert_close(eager.detach(), whole.detach())
    for name, p in aligned.named_parameters():
        torch.testing.assert_close(layer_by_layer[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert any(float(g.abs().max()) > 0 for g in layer_by_layer.values())


def test_align_leaves_the_teacher_as_it_was_and_trains_the_students_own_mixers():
    source = tiny_llama(seed=7)
    teacher = student_from_teacher(source).requires_grad_(False)
    weights = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    student = replace_layers(teacher, [0, 1, 2, 3], "mamba2", "mil")
    aligned = AlignedMixers.of(student)
    start = student.model.layers[2].mixer.in_proj.weight.clone()
    _train(aligned, teacher, [_batch(0)], 3)
    assert all(torch.equal(tensor, teacher.state_dict()[name]) for name, tensor in weights.items())
    ids = _batch(1)["input_ids"]
    with torch.no_grad():  # zero layers replaced: still the teacher, after the align stage's hooks came and went
        torch.testing.assert_close(teacher(input_ids=ids).logits, source(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    assert not torch.equal(student.model.layers[2].mixer.in_proj.weight, start)  # the same modules trained
    fresh = replace_layers(teacher, [2], "mamba2", "mil")
    aligned.load_into(fresh, [2])
    assert torch.equal(fresh.model.layers[2].mixer.in_proj.weight, student.model.layers[2].mixer.in_proj.weight)


@pytest.mark.slow
def test_a_run_killed_inside_the_align_stage_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from tiny_teachers import save_teacher

    from lctk.distill.run import distill_recipe
    from lctk.recipe import load_recipe
    from lctk.train.trainer import Trainer

    teacher = save_teacher(tmp_path / "teacher")
    results = {}
    for name, stop_at in (("whole", None), ("killed", 3)):
        folder = tmp_path / name
        folder.mkdir()
        recipe_path = write_recipe(folder, teacher, align={"steps": 4}, stages=[{"replace": 1, "by": "loo", "steps": 2}])
        values = yaml.safe_load(recipe_path.read_text())
        values["checkpoint"] = {"every": 2}
        values["distill"]["evidence"].update(passkey_samples=0, held_out_batches=1)
        recipe_path.write_text(yaml.safe_dump(values))
        recipe = load_recipe(recipe_path, kind="distill")
        if stop_at is not None:
            step = Trainer._step

            def killed(self, number, step=step, stop_at=stop_at):
                if self.run_dir.name == "align" and number == stop_at:
                    raise KeyboardInterrupt
                return step(self, number)

            with monkeypatch.context() as patch:
                patch.setattr(Trainer, "_step", killed)
                with pytest.raises(KeyboardInterrupt):
                    distill_recipe(recipe)
            assert (folder / "run" / "align" / "checkpoints").is_dir()
            assert not (folder / "run" / "align" / "align.json").exists()
            rows = distill_recipe(recipe, resume="auto")
        else:
            rows = distill_recipe(recipe)
        results[name] = (rows, load_file(folder / "run" / "align" / "mixers.safetensors"))
    (whole_rows, whole_mixers), (killed_rows, killed_mixers) = results["whole"], results["killed"]
    assert whole_mixers.keys() == killed_mixers.keys()
    for name in whole_mixers:
        torch.testing.assert_close(killed_mixers[name], whole_mixers[name], rtol=0, atol=0, msg=name)
    for key in ("kl_rev", "kl_fwd", "top1", "pattern"):
        assert killed_rows[-1][key] == whole_rows[-1][key], key


@pytest.mark.slow
def test_kl_restore_stages_start_from_the_aligned_mixers_and_report_agreement(tmp_path):
    from safetensors.torch import load_file
    from tiny_teachers import save_teacher
    from transformers import AutoModelForCausalLM

    from lctk.distill.run import distill_recipe
    from lctk.recipe import load_recipe

    recipe_path = write_recipe(tmp_path, save_teacher(tmp_path / "teacher"),
                               stages=[{"replace": 2, "by": "kl-restore", "steps": 0}])
    values = yaml.safe_load(recipe_path.read_text())
    values["distill"]["evidence"].update(passkey_samples=0, held_out_batches=1)
    recipe_path.write_text(yaml.safe_dump(values))
    distill_recipe(load_recipe(recipe_path, kind="distill"))
    run_dir = tmp_path / "run"
    record = json.loads((run_dir / "align" / "align.json").read_text())
    assert sorted(record["layers"], key=int) == ["0", "1", "2", "3"] and record["steps"] == 8
    assert sum(v["after"] for v in record["layers"].values()) < sum(v["before"] for v in record["layers"].values())
    scores = json.loads((run_dir / "stage-1" / "importance.json").read_text())
    ranked = sorted(scores["scores"], key=lambda layer: (scores["scores"][layer]["score"], int(layer)))
    assert scores["by"] == "kl-restore" and scores["chosen"] == sorted(int(layer) for layer in ranked[:2])
    assert list(scores["agreement"]) == ["loo", "loo-layer", "mmr-aligned"]
    for agreement in scores["agreement"].values():
        assert -1 <= agreement["spearman"] <= 1 and agreement["kept_overlap"] in (0, 0.5, 1)
        assert sorted(agreement["ranking"]) == [0, 1, 2, 3]
    aligned = load_file(run_dir / "align" / "mixers.safetensors")
    student = AutoModelForCausalLM.from_pretrained(run_dir / "stage-1" / "model")
    for layer in scores["chosen"]:  # no KD steps: the converted layers are exactly their aligned mixers
        for name, tensor in student.model.layers[layer].mixer.state_dict().items():
            assert torch.equal(tensor, aligned[f"mixers.{layer}.{name}"]), (layer, name)


def test_each_layer_takes_the_nearest_mixer_whose_state_fits():
    errors = {"mamba2": {0: 0.5, 1: 0.1, 2: 0.3}, "gated_deltanet": {0: 0.2, 1: 0.4, 2: 0.3}}
    assert choose_targets(errors, {"mamba2": 10, "gated_deltanet": 20}) == {0: "gated_deltanet", 1: "mamba2",
                                                                           2: "mamba2"}  # a tie: the first listed
    assert choose_targets(errors, {"mamba2": 10, "gated_deltanet": 20}, max_state=15) == dict.fromkeys((0, 1, 2),
                                                                                                      "mamba2")


@pytest.mark.slow
def test_a_list_of_mixers_aligns_each_and_converts_every_layer_to_its_nearest(tmp_path):
    from safetensors.torch import load_file
    from tiny_teachers import save_teacher
    from transformers import AutoModelForCausalLM

    from lctk.distill.run import distill_recipe
    from lctk.recipe import load_recipe

    recipe_path = write_recipe(tmp_path, save_teacher(tmp_path / "teacher"),
                               student={"mixer": ["mamba2", "gated_deltanet"]},
                               stages=[{"replace": 3, "by": "kl-restore", "steps": 0}])
    values = yaml.safe_load(recipe_path.read_text())
    values["distill"]["evidence"].update(passkey_samples=0, held_out_batches=1)
    recipe_path.write_text(yaml.safe_dump(values))
    distill_recipe(load_recipe(recipe_path, kind="distill"))
    align_dir = tmp_path / "run" / "align"
    choice = json.loads((align_dir / "choice.json").read_text())
    after = {name: json.loads((align_dir / name / "align.json").read_text())["layers"]
             for name in ("mamba2", "gated_deltanet")}
    for layer, picked in choice["layers"].items():
        nearest = min(after, key=lambda name: after[name][layer]["after"])
        assert picked["mixer"] == nearest and picked["distance"][nearest] == after[nearest][layer]["after"]
    chosen = json.loads((tmp_path / "run" / "stage-1" / "importance.json").read_text())["chosen"]
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "stage-1" / "model")
    letters = {"mamba2": "M", "gated_deltanet": "G"}
    for layer in chosen:
        mixer = choice["layers"][str(layer)]["mixer"]
        assert student.config.pattern[layer] == letters[mixer]
        aligned = load_file(align_dir / mixer / "mixers.safetensors")
        for name, tensor in student.model.layers[layer].mixer.state_dict().items():
            assert torch.equal(tensor, aligned[f"mixers.{layer}.{name}"]), (layer, name)
