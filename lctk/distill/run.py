"""`lctk distill`: a validated DistillRecipe -> teacher, data -> stage by stage: rank, convert, distil, measure.

First the align stage (lctk.distill.align, `distill.align`): every attention layer's new mixer learns that layer's
output from the teacher's input to it. Then each stage starts from the previous student (its recurrent layers keep
their trained weights), picks the next attention layers (lctk.distill.importance: loo, loo-layer, mmr, kl-restore), converts them
(lctk.distill.convert; their mixers take the aligned weights) and distils with the shared Trainer and a KD loss
(lctk.distill.losses). The teacher during training is the teacher's exact lctk copy (same
logits, tested), so teacher and student take the same inputs and their hidden states line up index by index.

Run dir (run.output_dir, default runs/<run.name>):
    recipe.yaml                  the resolved recipe
    stage-0/evidence.json        the teacher's row of the table
    align/mixers.safetensors     the aligned mixer of every attention layer (align/align.json: each layer's output
                                 distance to its attention layer before and after; align/metrics.jsonl); with a
                                 list of student mixers, align/<mixer>/ each and align/choice.json (mixer per layer)
    stage-K/importance.json      the candidates' scores and the layers chosen (reused on resume), and the rank
                                 agreement with mmr from the aligned mixers (+ loo and loo-layer for kl-restore)
    stage-K/distill/             the stage's Trainer run (metrics.jsonl; checkpoints, removed once the stage is saved)
    stage-K/model/               the student after stage K: an HF folder with the tokenizer
    stage-K/layout.json          its pattern, attention / replaced layers, parameter count
    stage-K/evidence.json        its row of the table
    final -> stage-N/model       the last student
    report.md, stages.json, quality.png      the stage table and the quality-vs-replaced-layers plot
A killed run continues with --resume auto: finished stages are loaded from their folders, the current one resumes
from its Trainer checkpoint; the recipe's data and distill sections must be those the run was started with. The run
dir is marked as lctk's and locked while the run uses it, and --overwrite empties only a marked one
(lctk.train.rundir). Everything that can be checked (the schedule, the student settings) is checked before the first
write.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lctk.distill import convert, evidence, importance
from lctk.distill.align import AlignedMixers, align_loss_fn, choose_targets, layer_errors
from lctk.distill.losses import distill_loss_fn
from lctk.distill.recipe import DistillRecipe, StageSection
from lctk.distill.teacher import load_teacher
from lctk.errors import UserError
from lctk.train import rundir

PROBE_WANDB = {"mode": "disabled"}
FREEZE_NOTES = {"mixers": "every converted mixer trains at each stage", "new": "only each stage's new mixers train",
                "none": "every weight trains"}
SECTIONS_FIXED_ON_RESUME = ("data", "distill")


@dataclass
class DistillRun:
    """What every stage of one distill run works with, built once before the first stage."""

    recipe: DistillRecipe
    accelerator: Any  # accelerate.Accelerator
    teacher: Any  # the teacher's lctk copy, frozen, on the device
    tokenizer: Any
    data: Any  # lctk.data.pipeline.PreparedData
    held_out: list[dict]  # the evidence batches, on the device
    scoring: list[dict]  # the importance batches, on the device
    resume: str | None
    say: Callable[[str], None]  # prints on the main process only
    aligned: AlignedMixers | None = None  # the align stage's mixers, which converted layers start from
    targets: dict[int, str] | None = None  # attention layer -> the mixer it is converted to

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def batches(self, data_offset: int):
        """The training stream continued from step `data_offset`, so that every stage and warm-up sees new rows."""
        from lctk.data.packing import StepBatches

        stream = StepBatches(self.data.rows, self.recipe.train.batch_size, self.recipe.train.grad_accum,
                             self.accelerator.process_index, self.accelerator.num_processes)
        return lambda step: stream(step + data_offset)


def distill_recipe(recipe: DistillRecipe, resume: str | None = None, overwrite: bool = False) -> list[dict]:
    """Run a distill recipe end to end; returns the stage table (also in <run_dir>/stages.json)."""
    with contextlib.ExitStack() as held:  # the run dir's lock, until the run ends
        return _distill(recipe, resume, overwrite, held)


def _distill(recipe: DistillRecipe, resume: str | None, overwrite: bool, held: contextlib.ExitStack) -> list[dict]:
    from accelerate.utils import set_seed

    from lctk.data.generated import Teacher, generate_sources
    from lctk.data.pipeline import cache_folder, prepare_data
    from lctk.evals.fingerprints import weights_fingerprint
    from lctk.parallel import make_accelerator
    from lctk.train.tracking import log_results

    accelerator = make_accelerator(recipe.train)
    main = accelerator.is_main_process
    say = (lambda text: print(text, flush=True)) if main else (lambda _: None)
    run_dir = recipe.run.dir
    folder = _run_folder(recipe, resume, overwrite)
    if main:
        folder.check()
    accelerator.wait_for_everyone()
    set_seed(recipe.run.seed)
    spec = recipe.distill

    with accelerator.main_process_first():  # the main process converts a GGUF teacher
        teacher_hf, tokenizer = load_teacher(spec.teacher)
    check_schedule(spec.stages, convert.hybrid_config_from(teacher_hf.config).pattern, aligned=_align_steps(recipe) > 0)
    if recipe.train.context_parallel > 1:
        raise UserError("train.context_parallel: distillation runs the teacher on whole rows; split rows are for "
                        "train and extend (set it to 1)")
    teacher = convert.student_from_teacher(teacher_hf).requires_grad_(False).to(accelerator.device)
    student = convert.student_from_teacher(teacher_hf)
    for mixer in spec.student.targets:  # a bad setting fails here, not after stage 0
        convert.student_config(student.config, convert.attention_layers(student)[:1], mixer,
                               spec.student.settings_of(mixer))
    _check_targets(recipe, student)
    # data after every check: generate: sources write for minutes
    generator = Teacher(teacher_hf, weights_fingerprint)  # for `generate:` sources: every process makes its share
    generate_sources(recipe.data, tokenizer, generator, cache_folder(recipe.data), accelerator.device)
    with accelerator.main_process_first():  # the main process fills the data caches
        data = prepare_data(recipe.data, tokenizer, recipe.run.seed, generator)
    del teacher_hf
    seq_len = recipe.data.seq_len
    for model in (teacher, student):
        model.config.train_length = seq_len
    held_out = _held_out_batches(data.held_out, recipe.train.batch_size,
                                 max(spec.evidence.held_out_batches, spec.importance_batches))
    held_out = [{k: v.to(accelerator.device) for k, v in b.items()} for b in held_out]
    total_layers = len(student.config.pattern)

    if main:
        held.enter_context(folder.opened())
    say(f"teacher: {spec.teacher} -> {total_layers} layers, pattern {teacher.config.pattern}, "
        f"{sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M parameters")
    for line in data.summary:
        say(f"data: {line}")

    run = DistillRun(recipe, accelerator, teacher, tokenizer, data, held_out=held_out[: spec.evidence.held_out_batches],
                     scoring=held_out[: spec.importance_batches], resume=resume, say=say)
    rows = [_stage_row(run, run_dir / "stage-0", 0, teacher)]
    run.aligned = _align(run, student)
    data_offset = _align_steps(recipe, accelerator.num_processes)
    for number, stage in enumerate(spec.stages, start=1):
        stage_dir = run_dir / f"stage-{number}"
        steps = stage.steps if stage.steps is not None else recipe.train.total_steps(seq_len, accelerator.num_processes)
        finished = rundir.saved_record(stage_dir / "evidence.json")
        if finished is not None:
            student = _load_student(stage_dir / "model", accelerator)
            rows.append(finished)
            say(f"stage {number}: done before, loaded {stage_dir / 'model'}")
            data_offset += steps
            continue
        chosen = _choose_layers(run, number, stage, student, data_offset, stage_dir)
        mixers = ", ".join(f"{layer} by {run.targets[layer]}" for layer in chosen)
        say(f"stage {number}: replacing layers {mixers} ({spec.student.init} init"
            f"{', aligned' if run.aligned is not None else ''})")
        student = _convert(run, student, chosen, seed=recipe.run.seed + number)
        replaced = convert.layout(student)["replaced_layers"]
        freeze = stage.freeze if stage.freeze is not None else spec.freeze
        _set_trainable(student, {"mixers": replaced, "new": chosen, "none": None}[freeze])
        train = recipe.train.model_copy(update={"lr": stage.lr} if stage.lr is not None else {})
        student = _fit(run, student, distill_loss_fn(teacher, spec.loss, replaced), train,
                       range(data_offset, data_offset + steps), stage_dir / "distill",
                       f"{recipe.run.name}-stage-{number}")
        data_offset += steps
        student.requires_grad_(True)
        rows.append(_stage_row(run, stage_dir, number, student))
        if main:
            shutil.rmtree(stage_dir / "distill" / "checkpoints", ignore_errors=True)  # superseded by the saved model
            evidence.write_report(run_dir, rows, f"{recipe.run.name}: distillation of {spec.teacher}", _notes(recipe))
        accelerator.wait_for_everyone()

    if spec.end_to_end.steps:
        student = _end_to_end(run, student, data_offset, rows)

    if main:
        final = run_dir / "final"
        if final.is_symlink():
            final.unlink()
        elif final.exists():
            shutil.rmtree(final)
        final.symlink_to(Path(f"stage-{len(rows) - 1}") / "model", target_is_directory=True)
        report = evidence.write_report(run_dir, rows, f"{recipe.run.name}: distillation of {spec.teacher}", _notes(recipe))
        if recipe.eval.suites:
            recipe.eval.run(student, tokenizer, recipe.data.seq_len, recipe.run.seed, run_dir / "eval", recipe.run.name)
        say(evidence.markdown_table(rows))
        last = rows[-1]
        say(f"done: {len(rows) - 1} stages, {last['replaced']}/{total_layers} attention layers replaced, "
            f"held-out KL {last['kl_rev']:.4f}, top-1 agreement {last['top1']:.3f} -> {report}")
        log_results(accelerator, {f"stage-{number}": row for number, row in enumerate(rows)})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return rows


def _align_steps(recipe: DistillRecipe, world_size: int = 1) -> int:
    steps = recipe.distill.align.steps
    return recipe.train.total_steps(recipe.data.seq_len, world_size) if steps is None else steps


def _align(run: DistillRun, student) -> AlignedMixers | None:
    """The align stage: every attention layer of `student` (the all-attention start) converted to each target mixer
    and trained on the align loss, in <run>/align (<run>/align/<mixer> for a list of mixers, then choice.json: the
    mixer each layer takes). A target a resumed run finished is loaded from its folder. Sets run.targets."""
    recipe, say = run.recipe, run.say
    spec = recipe.distill
    layers = convert.attention_layers(student)
    targets = spec.student.targets
    run.targets = dict.fromkeys(layers, targets[0])
    steps = _align_steps(recipe, run.accelerator.num_processes)
    if not steps:
        return None
    base = recipe.run.dir / "align"
    found = {name: _align_target(run, student, name, base / name if len(targets) > 1 else base, steps)
             for name in targets}
    if len(targets) == 1:
        return found[targets[0]][0]
    states = _target_states(recipe, student)
    run.targets = choose_targets({name: errors for name, (_, errors) in found.items()}, states,
                                 spec.student.max_state)
    choice = {str(layer): {"mixer": name, "distance": {other: found[other][1][layer] for other in targets}}
              for layer, name in run.targets.items()}
    _save_json(base / "choice.json", {"loss": spec.align.loss, "max_state": spec.student.max_state,
                                      "state_per_layer": states, "layers": choice}, run.accelerator)
    say("align: mixer per layer " + ", ".join(f"{layer}: {name}" for layer, name in run.targets.items()))
    return AlignedMixers(student.config, {layer: found[name][0].mixers[str(layer)] for layer, name in run.targets.items()})


def _align_target(run: DistillRun, student, mixer: str, folder: Path, steps: int) -> tuple[AlignedMixers, dict]:
    """Every attention layer converted to `mixer` and aligned for `steps` in `folder`; returns the mixers and each
    layer's distance after the stage."""
    from safetensors.torch import load_file, save_file

    recipe, say = run.recipe, run.say
    spec = recipe.distill
    layers = convert.attention_layers(student)
    converted = convert.replace_layers(student, layers, mixer, spec.student.init, spec.student.settings_of(mixer),
                                       seed=recipe.run.seed)
    aligned = AlignedMixers.of(converted).to(run.accelerator.device)
    del converted
    record = rundir.saved_record(folder / "align.json")
    if record is not None:
        aligned.load_state_dict(load_file(folder / "mixers.safetensors", device=str(run.accelerator.device)))
        say(f"align: done before, loaded {folder / 'mixers.safetensors'}")
        return aligned, {int(layer): values["after"] for layer, values in record["layers"].items()}
    kind = spec.align.loss
    say(f"align: {len(layers)} attention layers -> {mixer}, {steps} steps of {kind} against each attention "
        "layer's output")
    before = layer_errors(run.teacher, aligned, run.scoring, kind)
    lr = {"lr": spec.align.lr} if spec.align.lr is not None else {}
    train = recipe.train.model_copy(update={"activation_checkpointing": False, "recompute_segment": None, **lr})
    aligned = _fit(run, aligned, align_loss_fn(run.teacher, kind), train, range(steps), folder,
                   f"{recipe.run.name}-align-{mixer}")
    after = layer_errors(run.teacher, aligned, run.scoring, kind)
    if run.main:
        save_file({k: v.contiguous() for k, v in aligned.state_dict().items()}, folder / "mixers.safetensors")
        record = {"mixer": mixer, "loss": kind, "steps": steps,
                  "layers": {str(i): {"before": before[i], "after": after[i]} for i in aligned.layers}}
        (folder / "align.json").write_text(json.dumps(record, indent=2) + "\n")
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # superseded by mixers.safetensors
        mean = {name: sum(values.values()) / len(values) for name, values in (("before", before), ("after", after))}
        say(f"align: mean {kind} over the {len(layers)} layers {mean['before']:.4g} -> {mean['after']:.4g} "
            f"(per layer in {folder / 'align.json'})")
    run.accelerator.wait_for_everyone()
    return aligned, after


def _target_states(recipe: DistillRecipe, student) -> dict[str, int]:
    """{mixer: inference state of one converted layer, in elements at the longest evidence.cache_lengths}."""
    from lctk.models.mixers import MIXERS

    spec = recipe.distill
    length = max(spec.evidence.cache_lengths)
    first = convert.attention_layers(student)[0]
    states = {}
    for name in spec.student.targets:
        config = convert.student_config(student.config, [first], name, spec.student.settings_of(name))
        letter = config.pattern[first]
        states[name] = MIXERS[letter](config, letter).state_size(length)
    return states


def _convert(run: DistillRun, student, layers: list[int], seed: int):
    """`student` with `layers` converted, each to its target mixer (run.targets) and from its aligned weights."""
    spec = run.recipe.distill.student
    for mixer in dict.fromkeys(run.targets[layer] for layer in layers):
        group = [layer for layer in layers if run.targets[layer] == mixer]
        student = convert.replace_layers(student, group, mixer, spec.init, spec.settings_of(mixer), seed=seed)
    if run.aligned is not None:
        run.aligned.load_into(student, layers)
    return student


def _end_to_end(run: DistillRun, student, data_offset: int, rows: list[dict]):
    """The optional last stage: every student weight trains on KD + next-token CE, no layer replaced."""
    recipe, say = run.recipe, run.say
    spec = recipe.distill
    number = len(spec.stages) + 1
    stage_dir = recipe.run.dir / f"stage-{number}"
    finished = rundir.saved_record(stage_dir / "evidence.json")
    if finished is not None:
        rows.append(finished)
        say(f"stage {number} (end to end): done before, loaded {stage_dir / 'model'}")
        return _load_student(stage_dir / "model", run.accelerator)
    say(f"stage {number}: end to end, every weight trains ({spec.end_to_end.steps} steps, CE weight "
        f"{spec.end_to_end.ce_weight:g})")
    _set_trainable(student, None)
    loss = spec.loss.model_copy(update={"ce_weight": spec.end_to_end.ce_weight})
    lr = spec.end_to_end.lr
    train = recipe.train.model_copy(update={"lr": lr} if lr is not None else {})
    student = _fit(run, student, distill_loss_fn(run.teacher, loss, convert.layout(student)["replaced_layers"]),
                   train, range(data_offset, data_offset + spec.end_to_end.steps), stage_dir / "distill",
                   f"{recipe.run.name}-stage-{number}")
    rows.append(_stage_row(run, stage_dir, number, student))
    if run.main:
        shutil.rmtree(stage_dir / "distill" / "checkpoints", ignore_errors=True)
    run.accelerator.wait_for_everyone()
    return student


def _check_targets(recipe: DistillRecipe, student) -> None:
    """A list of mixers needs the align stage, and some mixer must fit student.max_state."""
    spec = recipe.distill.student
    if len(spec.targets) > 1 and not _align_steps(recipe):
        raise UserError("distill.student.mixer: a list of mixers is chosen per layer by the align stage; "
                        "set distill.align.steps > 0")
    if spec.max_state is not None:
        states = _target_states(recipe, student)
        if min(states.values()) > spec.max_state:
            raise UserError(f"distill.student.max_state: {spec.max_state} elements per layer; no mixer fits "
                            f"(at {max(recipe.distill.evidence.cache_lengths)} tokens: {states})")


def check_schedule(stages: list[StageSection], pattern: str, aligned: bool = True) -> None:
    """Every stage's layer count against the teacher's attention layers, before any work is done."""
    attention = [i for i, letter in enumerate(pattern) if letter in convert.ATTENTION_LETTERS]
    replaced: set[int] = set()
    for index, stage in enumerate(stages):
        where = f"distill.stages.{index}"
        if stage.by == "kl-restore" and stage.layers is None and not aligned:
            raise UserError(f"{where}.by: kl-restore ranks the aligned mixers; it needs the align stage "
                            "(distill.align.steps > 0)")
        left = len(attention) - len(replaced)
        if stage.layers is not None:
            bad = sorted(set(stage.layers) - set(attention) | set(stage.layers) & replaced)
            if bad:
                raise UserError(f"{where}.layers: {bad} are not attention layers left to replace (teacher attention "
                                f"layers: {attention}; given in earlier stages: {sorted(replaced)})")
            count = len(set(stage.layers))
        else:
            count = stage.target(len(attention) - left, len(pattern)) - (len(attention) - left)
            if not 0 < count <= left:
                hint = " (YAML reads +N as the number N: quote it, replace: '+N')" if isinstance(stage.replace, int) else ""
                raise UserError(
                    f"{where}.replace: {stage.replace!r} asks for {count} more layers; {left} attention layers are left{hint}"
                )
        # which layers loo / mmr will pick is not known yet: count them as the first free ones
        free = [layer for layer in attention if layer not in replaced]
        replaced |= set(stage.layers) if stage.layers is not None else set(free[:count])


def _run_folder(recipe: DistillRecipe, resume: str | None, overwrite: bool) -> rundir.RunFolder:
    if resume not in (None, "auto"):
        raise UserError(f"--resume: distill runs resume with 'auto' (stage by stage), got {resume!r}")
    return rundir.RunFolder(recipe, "distill", resuming=resume is not None, overwrite=overwrite,
                            holds_run=lambda run_dir: any(run_dir.glob("stage-*")),
                            folders=["align", *(f"stage-{number}" for number in range(len(recipe.distill.stages) + 2))],
                            fixed_sections=SECTIONS_FIXED_ON_RESUME)


def _held_out_batches(rows: list, batch_size: int, count: int) -> list[dict]:
    from lctk.data.packing import collate

    if not rows:
        raise UserError("data.held_out: distillation needs held-out text (a text source and data.held_out > 0)")
    rows = rows[: batch_size * count]
    return [collate(rows[start : start + batch_size]) for start in range(0, len(rows), batch_size)]


def _set_trainable(student, layers: list[int] | None) -> None:
    """Only the mixers of `layers` train (None: everything)."""
    student.requires_grad_(layers is None)
    for index in layers or []:
        student.model.layers[index].mixer.requires_grad_(True)


def _fit(run: DistillRun, student, loss_fn, train, steps: range, out_dir: Path, name: str, *, probe: bool = False):
    """Train `student` on `steps` of the run's data stream with the shared Trainer in out_dir. A probe starts
    afresh, keeps one checkpoint, logs once, without wandb, and prints no summary."""
    from lctk.recipe import CheckpointSection, LoggingSection
    from lctk.train.trainer import Trainer, summary_line

    if not steps:
        return student
    recipe = run.recipe
    trainer = Trainer(
        student,
        run.batches(steps.start),
        train=train,
        checkpoint=CheckpointSection(every=None, keep_last=1) if probe else recipe.checkpoint,
        logging=LoggingSection(every=len(steps), wandb=PROBE_WANDB) if probe else recipe.logging,
        run_dir=out_dir,
        accelerator=run.accelerator,
        total_steps=len(steps),
        loss_fn=loss_fn,
        run_config=recipe.model_dump(mode="json"),
        run_name=name,
    )
    result = trainer.fit("auto" if run.resume and not probe else None)
    if run.main and not probe:
        print(summary_line(result, out_dir), flush=True)
    return trainer.trained_model()


def _choose_layers(run: DistillRun, number: int, stage: StageSection, student, data_offset: int,
                   stage_dir: Path) -> list[int]:
    """The layers stage `number` replaces, by its rule; scores are saved in stage_dir/importance.json."""
    teacher, held_out, divergence = run.teacher, run.scoring, run.recipe.distill.loss.divergence
    where = f"distill.stages.{number - 1}"
    candidates = convert.attention_layers(student)
    total = len(student.config.pattern)
    if stage.layers is not None:
        bad = [layer for layer in stage.layers if layer not in candidates]
        if bad:  # replaced by an earlier stage's ranking
            raise UserError(f"{where}.layers: {bad} were replaced by an earlier stage (attention layers left: {candidates})")
        chosen = sorted(set(stage.layers))
        _save_json(stage_dir / "importance.json", {"by": "given", "chosen": chosen}, run.accelerator)
        return chosen
    count = stage.target(total - len(candidates), total) - (total - len(candidates))  # checked by check_schedule
    record = rundir.saved_record(stage_dir / "importance.json")
    if record is not None:
        if record.get("by") == stage.by and record.get("count") == count:
            return record["chosen"]
    if stage.by == "loo":
        scores = importance.leave_one_out(student, teacher, held_out, candidates, divergence)
    elif stage.by == "loo-layer":  # ranked once on the teacher (the same for every stage), as Apriel-H1
        scores = importance.leave_one_out(teacher, teacher, held_out, candidates, divergence,
                                          importance.layer_removed)
    elif stage.by == "kl-restore":
        scores = importance.kl_restore(student, teacher, held_out, candidates, run.aligned, divergence)
    else:
        scores = importance.mmr_probes(
            teacher, held_out, candidates,
            lambda layer: _probe(run, student, layer, stage, data_offset, stage_dir / "probes" / f"layer-{layer}"),
            divergence,
        )
    chosen = sorted(importance.ranking(scores)[:count])
    record = {"by": stage.by, "count": count, "chosen": chosen,
              "scores": {str(layer): value for layer, value in scores.items()}}
    record["agreement"] = _agreement(run, student, candidates, importance.ranking(scores), count, stage.by)
    if run.main:
        shown = ", ".join(f"{layer}: {scores[layer]['score']:.4f}" for layer in importance.ranking(scores))
        print(f"stage {number}: {stage.by} scores (lowest first) {shown}", flush=True)
        for name, agreement in record.get("agreement", {}).items():
            print(f"stage {number}: {stage.by} against {name}: Spearman {agreement['spearman']:.3f}, "
                  f"{agreement['kept_overlap']:.0%} of the {count} replaced layers shared", flush=True)
    _save_json(stage_dir / "importance.json", record, run.accelerator)
    return chosen


def _agreement(run: DistillRun, student, candidates: list[int], ranked: list[int], count: int, by: str) -> dict:
    """How a ranking agrees with `mmr` from the aligned mixers (one probe pass; not without the align stage) and, for
    kl-restore, with `loo` and `loo-layer` (two more), on the same candidates: forwards only, no probe trains."""
    teacher, held_out, divergence = run.teacher, run.scoring, run.recipe.distill.loss.divergence
    others = {}
    if by == "kl-restore":
        others["loo"] = importance.leave_one_out(student, teacher, held_out, candidates, divergence)
        others["loo-layer"] = importance.leave_one_out(teacher, teacher, held_out, candidates, divergence,
                                                       importance.layer_removed)
    if run.aligned is not None:
        others["mmr-aligned"] = importance.mmr_aligned(student, teacher, held_out, candidates, run.aligned, divergence)
    return {name: {**importance.rank_agreement(ranked, importance.ranking(scores), count),
                   "ranking": importance.ranking(scores)} for name, scores in others.items()}


def _probe(run: DistillRun, student, layer: int, stage: StageSection, data_offset: int, probe_dir: Path):
    """A copy of the student with `layer` converted and distilled for probe_steps (only the new mixer trains);
    its Trainer folder is removed afterwards."""
    recipe = run.recipe
    spec = recipe.distill
    probed = _convert(run, student, [layer], seed=recipe.run.seed)
    _set_trainable(probed, [layer])  # the probe: only the candidate's mixer, whatever distill.freeze says
    train = recipe.train.model_copy(update={"warmup_steps": 0, **({"lr": stage.lr} if stage.lr else {})})
    probed = _fit(run, probed, distill_loss_fn(run.teacher, spec.loss, []), train,
                  range(data_offset, data_offset + stage.probe_steps), probe_dir, f"probe-{layer}", probe=True)
    run.accelerator.wait_for_everyone()
    if run.main:
        shutil.rmtree(probe_dir, ignore_errors=True)
    return probed.eval()


def _stage_row(run: DistillRun, stage_dir: Path, number: int, student) -> dict:
    """Measure the student, save it (stages >= 1) with its layout, and return its table row."""
    recipe, tokenizer = run.recipe, run.tokenizer
    saved = stage_dir / "evidence.json"
    finished = rundir.saved_record(saved)
    if finished is not None:
        return finished
    from lctk.train.checkpoint import save_hf_folder

    spec = recipe.distill.evidence
    student.eval()
    layout = convert.layout(student)
    row = {
        "stage": number,
        "replaced": len(layout["replaced_layers"]),
        "attention_layers": len(layout["attention_layers"]),
        "pattern": layout["pattern"],
        **evidence.quality(student, run.teacher, run.held_out),
    }
    if run.main:
        for length in spec.cache_lengths:
            row[f"cache_mib_{length // 1024}k"] = evidence.cache_bytes(student, length) / 2**20
        row.update(evidence.speed_against(student, run.teacher, spec.speed_prefill, spec.speed_decode))
        row.update(_passkey(student, tokenizer, recipe, stage_dir / "passkey"))
        stage_dir.mkdir(parents=True, exist_ok=True)
        if number > 0:
            save_hf_folder(student, tokenizer, stage_dir / "model", recipe.data.seq_len)
            row["path"] = str(stage_dir / "model")
        (stage_dir / "layout.json").write_text(json.dumps(layout, indent=2) + "\n")
        saved.write_text(json.dumps(row, indent=2) + "\n")
        run.say(f"stage {number}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))
    return row


def _passkey(model, tokenizer, recipe: DistillRecipe, out_dir: Path) -> dict:
    """Passkey accuracy (%) at each evidence length, keyed passkey_<N>x (times data.seq_len) or passkey_<tokens>."""
    from lctk.recipe import EvalSection

    spec = recipe.distill.evidence
    if spec.passkey_samples == 0:
        return {}
    seq_len = recipe.data.seq_len
    # the evidence keys were checked with the distill recipe: built without a second validation
    section = EvalSection.model_construct(suites=["passkey"], lengths=spec.passkey_lengths,
                                          limit=spec.passkey_samples, options={"depths": spec.passkey_depths})
    lengths = section.token_lengths(seq_len)
    try:
        results = section.run(model, tokenizer, seq_len, recipe.run.seed, out_dir, out_dir.parent.name)
    except UserError as error:  # e.g. a length too short for the passkey prompt with this tokenizer
        raise UserError(f"distill.evidence.passkey_lengths: {error}") from None
    by_length = results["results"]["passkey"]["by_length"]
    figures = {}
    for length in lengths:
        name = f"passkey_{length // seq_len}x" if length % seq_len == 0 else f"passkey_{length}"
        figures[name] = by_length.get(str(length), by_length.get(length))
    return figures


def _load_student(folder: Path, accelerator):
    from lctk.models.loading import load_causal_lm, open_model

    where = f"resumed stage {folder.parent.name}"
    return load_causal_lm(open_model(str(folder), where), where, dtype=torch.float32).to(accelerator.device)


def _save_json(path: Path, record: dict, accelerator) -> None:
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")


def _notes(recipe: DistillRecipe) -> list[str]:
    spec = recipe.distill
    steps = _align_steps(recipe)
    aligned = f"aligned for {steps} steps ({spec.align.loss} against each attention layer's output)" if steps else "not aligned"
    return [
        f"Student mixer {spec.student.mixer} ({spec.student.init} init, {aligned}); loss {spec.loss.divergence} at temperature "
        f"{spec.loss.temperature:g}; {FREEZE_NOTES[spec.freeze]}"
        + (f"; then {spec.end_to_end.steps} end-to-end steps (every weight, CE weight {spec.end_to_end.ce_weight:g})."
           if spec.end_to_end.steps else "."),
        f"KL and top-1 agreement over {spec.evidence.held_out_batches} held-out batches of "
        f"{recipe.train.batch_size} x {recipe.data.seq_len} tokens; cache = inference state at batch 1 in bf16; "
        f"speed at batch 1 (prefill {spec.evidence.speed_prefill} tokens, {spec.evidence.speed_decode} decode steps).",
    ]
