"""Layer importance: leave-one-out scores are the divergence rise, deterministic for a seed."""

from __future__ import annotations

import pytest
import torch
from tiny_teachers import tiny_llama

from lctk.distill.convert import student_from_teacher
from lctk.distill.importance import attention_removed, layer_removed, leave_one_out, mmr_probes, ranking


def _held_out(seed: int):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 320, (2, 24), generator=generator)
    return [{"input_ids": ids, "labels": ids}]


def test_leave_one_out_ranking_is_deterministic_for_a_seed():
    runs = []
    for _ in range(2):
        teacher = student_from_teacher(tiny_llama(seed=7)).requires_grad_(False)
        runs.append(leave_one_out(teacher, teacher, _held_out(1), [0, 1, 2, 3]))
    assert runs[0] == runs[1]
    assert sorted(ranking(runs[0])) == [0, 1, 2, 3]
    assert all(score["score"] > 0 for score in runs[0].values())  # removing a layer of the teacher costs something


def test_a_layer_that_adds_nothing_scores_zero_and_ranks_first():
    teacher = student_from_teacher(tiny_llama(seed=7)).requires_grad_(False)
    student = student_from_teacher(tiny_llama(seed=7))
    with torch.no_grad():
        student.model.layers[2].mixer.o_proj.weight.zero_()  # attention output already nothing
        teacher.model.layers[2].mixer.o_proj.weight.zero_()
    scores = leave_one_out(student, teacher, _held_out(2), [0, 1, 2, 3])
    assert abs(scores[2]["score"]) < 1e-7
    assert ranking(scores)[0] == 2
    ids = _held_out(2)[0]["input_ids"]
    with torch.no_grad(), attention_removed(student, 2):
        removed = student(input_ids=ids).logits
    assert torch.equal(removed, student(input_ids=ids).logits.detach())


def test_mmr_probes_rank_by_the_divergence_each_probe_reaches():
    teacher = student_from_teacher(tiny_llama(seed=7)).requires_grad_(False)
    damaged = student_from_teacher(tiny_llama(seed=7))
    with torch.no_grad():
        damaged.model.layers[0].mixer.o_proj.weight.mul_(3.0)
    probes = {0: damaged, 1: teacher}  # layer 0's probe ends far from the teacher, layer 1's on it
    scores = mmr_probes(teacher, _held_out(3), [0, 1], probes.__getitem__)
    assert scores[1]["score"] < 1e-7 < scores[0]["score"]
    assert ranking(scores) == [1, 0]


def test_whole_layer_leave_one_out_makes_the_block_the_identity():
    teacher = student_from_teacher(tiny_llama(seed=7)).requires_grad_(False)
    seen = {}
    hooks = [teacher.model.layers[i].register_forward_hook(lambda m, args, out, i=i: seen.update({i: args[0]}))
             for i in (1, 2)]
    with torch.no_grad(), layer_removed(teacher, 1):
        teacher(input_ids=_held_out(3)[0]["input_ids"])
    for hook in hooks:
        hook.remove()
    assert torch.equal(seen[1], seen[2])  # layer 2 received what layer 1 was given
    scores = leave_one_out(teacher, teacher, _held_out(1), [0, 1, 2, 3], remove=layer_removed)
    assert all(score["score"] > 0 for score in scores.values()) and sorted(ranking(scores)) == [0, 1, 2, 3]
    assert scores != leave_one_out(teacher, teacher, _held_out(1), [0, 1, 2, 3])  # not the attention-only variant


def test_kl_restore_scores_the_kl_each_restored_attention_removes():
    from types import SimpleNamespace

    from lctk.distill.importance import kl_restore, rank_agreement

    teacher = student_from_teacher(tiny_llama(seed=7)).requires_grad_(False)
    student = student_from_teacher(tiny_llama(seed=7)).requires_grad_(False)
    exact = {str(layer): teacher.model.layers[layer].mixer for layer in range(4)}  # stand-ins equal to attention
    silent = lambda x, seq, state: torch.zeros_like(x)  # noqa: E731  (a stand-in that lost the layer)
    # only layer 3's stand-in is wrong: restoring it removes all the KL, restoring any other removes none
    scores = kl_restore(student, teacher, _held_out(4), [0, 1, 2, 3], SimpleNamespace(mixers={**exact, "3": silent}))
    assert scores[3]["divergence"] < 1e-6 and scores[3]["score"] == pytest.approx(scores[3]["all_converted"])
    assert scores[3]["score"] > 1e-3 and all(abs(scores[layer]["score"]) < 1e-6 for layer in (0, 1, 2))
    assert ranking(scores)[-1] == 3
    # two wrong stand-ins: each restored layer leaves the other's damage, as leave-one-out of the teacher measures it
    scores = kl_restore(student, teacher, _held_out(4), [0, 1, 2, 3],
                        SimpleNamespace(mixers={**exact, "1": silent, "3": silent}))
    alone = leave_one_out(teacher, teacher, _held_out(4), [1, 3])
    assert scores[1]["divergence"] == pytest.approx(alone[3]["divergence"], rel=1e-5)
    assert scores[3]["divergence"] == pytest.approx(alone[1]["divergence"], rel=1e-5)
    assert sorted(ranking(scores)[:2]) == [0, 2]
    assert rank_agreement(ranking(scores), ranking(scores), 2) == {"spearman": 1.0, "kept_overlap": 1.0}


def test_rank_agreement_is_spearman_and_the_shared_share_of_the_kept_layers():
    from lctk.distill.importance import rank_agreement

    assert rank_agreement([0, 1, 2, 3], [1, 0, 2, 3], 1) == {"spearman": pytest.approx(0.8), "kept_overlap": 0.0}
    assert rank_agreement([0, 1, 2, 3], [1, 0, 2, 3], 2)["kept_overlap"] == 1.0
    assert rank_agreement([0, 1, 2, 3], [3, 2, 1, 0], 2) == {"spearman": pytest.approx(-1.0), "kept_overlap": 0.0}
    with pytest.raises(ValueError, match="rankings of different layers"):
        rank_agreement([0, 1], [0, 2], 1)


def test_mmr_from_the_aligned_mixers_equals_mmr_at_zero_probe_steps():
    from lctk.distill.align import AlignedMixers
    from lctk.distill.convert import replace_layers
    from lctk.distill.importance import mmr_aligned

    teacher = student_from_teacher(tiny_llama(seed=7)).requires_grad_(False)
    student = student_from_teacher(tiny_llama(seed=7))
    aligned = AlignedMixers.of(replace_layers(teacher, [0, 1, 2, 3], "mamba2", "mil"))

    def converted(layer):  # what `by: mmr` probes with probe_steps 0 after the align stage
        probed = replace_layers(student, [layer], "mamba2", "mil")
        aligned.load_into(probed, [layer])
        return probed

    hooked = mmr_aligned(student, teacher, _held_out(5), [0, 1, 2, 3], aligned)
    probed = mmr_probes(teacher, _held_out(5), [0, 1, 2, 3], converted)
    for layer in range(4):
        assert hooked[layer]["score"] == pytest.approx(probed[layer]["score"], rel=1e-5)
    assert all(score["score"] > 0 for score in hooked.values()) and ranking(hooked) == ranking(probed)


def test_every_ranked_stage_reports_its_agreement_with_mmr_from_the_aligned_mixers():
    from types import SimpleNamespace

    from lctk.distill.run import _agreement

    teacher = student_from_teacher(tiny_llama(seed=7)).requires_grad_(False)
    student = student_from_teacher(tiny_llama(seed=7)).requires_grad_(False)
    exact = {str(layer): teacher.model.layers[layer].mixer for layer in range(4)}
    silent = lambda x, seq, state: torch.zeros_like(x)  # noqa: E731
    loss = SimpleNamespace(divergence="reverse_kl")
    run = SimpleNamespace(teacher=teacher, scoring=_held_out(4), recipe=SimpleNamespace(distill=SimpleNamespace(loss=loss)),
                          aligned=SimpleNamespace(mixers={**exact, "1": silent, "3": silent}))
    # layers 0 and 2 run by exact stand-ins score 0 (first, by index); 1 and 3 each lose their attention alone
    alone = leave_one_out(teacher, teacher, _held_out(4), [1, 3])
    expected = [0, 2, *sorted((1, 3), key=lambda layer: alone[layer]["divergence"])]
    # against [3, 2, 1, 0], replacing 2: by hand, rank differences (3, 0, 0, 3) or (2, 0, 1, 3); {3, 2} & {0, 2}
    rho = {(0, 2, 1, 3): 1 - 6 * 18 / 60, (0, 2, 3, 1): 1 - 6 * 14 / 60}[tuple(expected)]
    found = _agreement(run, student, [0, 1, 2, 3], [3, 2, 1, 0], 2, "loo")
    assert found == {"mmr-aligned": {"spearman": pytest.approx(rho), "kept_overlap": 0.5, "ranking": expected}}
    found = _agreement(run, student, [0, 1, 2, 3], [3, 2, 1, 0], 2, "kl-restore")
    assert list(found) == ["loo", "loo-layer", "mmr-aligned"] and found["mmr-aligned"]["ranking"] == expected
    assert _agreement(SimpleNamespace(**{**vars(run), "aligned": None}), student, [0, 1, 2, 3], [3, 2, 1, 0], 2,
                      "loo") == {}  # no align stage: nothing to compare without training probes
