"""`lctk extend`: a validated ExtendRecipe -> model -> (eval before) -> RoPE -> training stages -> recurrent
methods -> final model -> (eval after) -> report.

Order: the RoPE change comes first (training and calibration see the attention layers as they will be used); the
training-free recurrent methods come last, calibrated on the final weights (and their token-by-token state cap would
make training slow).

Run dir (run.output_dir, default runs/<run.name>):
    recipe.yaml               the resolved recipe
    stages/<n>/               one Trainer run per stage: metrics.jsonl, checkpoints/, final/ (the stage's model)
    final/                    the extended model and its tokenizer (config.json in both RoPE layouts, the
                              extension recorded under `lctk_extension`)
    eval/before, eval/after   eval suite outputs
    extend.json               what was done and the before/after figures
    report.md + PNGs          both curves on one plot per figure
A stage whose final/ exists is not redone, and a stage in progress resumes from its latest checkpoint, so a killed
run picks up where it stopped when rerun with the same recipe: a rerun whose data or extend section differs from the
saved recipe.yaml is refused (--overwrite starts again). The run dir is marked as lctk's and locked while the run
uses it (lctk.train.rundir); the model, the tokenizer and the calibration text are checked before the first write.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lctk.errors import UserError
from lctk.extend.recipe import ExtendRecipe, StageSection, tokens_at
from lctk.extend.recurrent import NEEDS_IN_LENGTH_TEXT, NEEDS_LONG_TEXT, apply_recurrent, check_applicable
from lctk.extend.rope import (
    MAX_FACTOR,
    RECORD,
    extension_record,
    original_length,
    scale_rope,
    write_legacy_rope_keys,
)
from lctk.train import rundir
from lctk.train.tracking import log_command_results

SECTIONS_FIXED_ON_RERUN = ("data", "extend")


def current_length(config) -> int:
    """How far the model reaches now: the target of an earlier extension, max_position_embeddings for a model that
    ships RoPE scaling (e.g. Llama 3.1), else its training length."""
    record = extension_record(config)
    if "target_length" in record:
        return int(record["target_length"])
    if (config.rope_parameters or {}).get("rope_type", "default") != "default":
        return int(config.max_position_embeddings)
    return original_length(config)


def extend_recipe(recipe: ExtendRecipe, log: Callable[[str], None] = print, overwrite: bool = False) -> dict[str, Any]:
    """Run an extend recipe end to end (overwrite: empty the run dir first); returns extend.json's content."""
    with contextlib.ExitStack() as held:  # the run dir's lock, until the run ends
        return _extend(recipe, log, overwrite, held)


def _extend(recipe: ExtendRecipe, log: Callable[[str], None], overwrite: bool, held: contextlib.ExitStack) -> dict:
    from lctk.evals.loading import load_weights
    from lctk.models.loading import load_tokenizer, open_model

    ext, run_dir = recipe.extend, recipe.run.dir
    # under a launcher every process trains the stages together; the rest (files, evals, calibration) is the main one's
    main = os.environ.get("RANK", "0") == "0"
    log = log if main else (lambda _: None)
    # a rerun continues the run in run_dir, so it needs the same data and extend sections
    folder = rundir.RunFolder(recipe, "extend", resuming=not overwrite, overwrite=overwrite,
                              folders=("stages", "final", "eval"), fixed_sections=SECTIONS_FIXED_ON_RERUN)
    folder.check()
    torch.manual_seed(recipe.run.seed)
    files = open_model(ext.model, "extend.model")
    users = tokenizer_users(recipe)
    tokenizer = None  # a training-free change needs none; final/ gets the model's own tokenizer when it has one
    if users or files.has_tokenizer():
        tokenizer = load_tokenizer(files, "extend.model", hint=f"needed by {', '.join(users)}")
    model = load_weights(files, dtype="float32" if ext.stages else "auto", where="extend.model")
    config = model.config
    original, reach = original_length(config), current_length(config)
    factor = ext.factor if ext.factor is not None else ext.length / reach
    if factor < 1:
        raise UserError(f"extend.length: {ext.length} is below the model's current length {reach}")
    if factor > MAX_FACTOR:
        raise UserError(f"extend.length: {ext.length} is {factor:.0f}x the model's current length {reach}; "
                        f"at most {MAX_FACTOR}x")
    target = int(round(reach * factor))
    lengths = recipe.eval.token_lengths(original)
    for index, step in enumerate(ext.recurrent):
        check_applicable(model, step.method, step.params(), where=f"extend.recurrent.{index}")
    methods = {step.method for step in ext.recurrent}  # their calibration text is read (and checked) before any write
    in_length = (calibration_ids(tokenizer, ext.calibration.text, ext.calibration.rows, original)
                 if methods & NEEDS_IN_LENGTH_TEXT else None)
    long = (calibration_ids(tokenizer, ext.calibration.text, ext.calibration.rows, target)
            if methods & NEEDS_LONG_TEXT else None)
    if main:
        held.enter_context(folder.opened())
    log(f"extend: {ext.model} ({type(model).__name__}, trained at {original} tokens, reaches {reach}) -> {target} tokens")

    results: dict[str, Any] = {"model": ext.model, "original_length": original, "target_length": target}
    if recipe.eval.suites and recipe.eval.before and main:
        results["before"] = evaluate(recipe, model, tokenizer, original, run_dir / "eval" / "before", "before")

    rope_start = _rope_state(config)
    if ext.rope is not None:
        scale_rope(config, ext.rope.method, factor, where="extend.rope", **ext.rope.params())
        rebuild_rotary(model)
        log(f"rope: {ext.rope.method} x{factor:g}: {config.rope_parameters}")
    final_rope = _rope_state(config)

    for number, stage in enumerate(ext.stages, start=1):
        if ext.rope is not None:
            _set_rope_state(config, rope_start)
            stage_factor = stage.rope.factor if stage.rope and stage.rope.factor is not None else factor
            stage_params = {**ext.rope.params(), **(stage.rope.params() if stage.rope else {})}
            scale_rope(config, ext.rope.method, stage_factor, where=f"extend.stages.{number - 1}.rope", **stage_params)
            rebuild_rotary(model)
        model = train_stage(recipe, model, tokenizer, stage, number, original, log)
        config = model.config
    if ext.stages and ext.rope is not None:
        _set_rope_state(config, final_rope)
        rebuild_rotary(model)
    if not main:
        return {}

    applied = []
    for index, step in enumerate(ext.recurrent):
        setting = apply_recurrent(
            model, step.method, step.params(), original,
            in_length_ids=(lambda: in_length) if step.method in NEEDS_IN_LENGTH_TEXT else None,
            long_ids=(lambda: long) if step.method in NEEDS_LONG_TEXT else None,
            log=log, where=f"extend.recurrent.{index}",
        )
        applied.append({"method": step.method, **step.params(), "set": setting})
        log(f"recurrent: {step.method}: {_short(setting)}")
    record = extension_record(config)
    record.update(original_max_position_embeddings=original, target_length=target)
    if applied:  # the values themselves are in config.mamba2
        record["recurrent"] = [*record.get("recurrent", []), *[{**a, "set": sorted(a["set"])} for a in applied]]
    if ext.stages:
        record["stages"] = [*record.get("stages", []), *[_stage_record(s, recipe, original) for s in ext.stages]]
    setattr(config, RECORD, record)

    final_dir = run_dir / "final"
    save_model(model, tokenizer, final_dir)
    log(f"saved: {final_dir}")
    results["extension"], results["recurrent"] = record, applied
    if recipe.eval.suites:
        results["after"] = evaluate(recipe, model, tokenizer, original, run_dir / "eval" / "after", "after")
    (run_dir / "extend.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    log_command_results(recipe.logging, run_dir, recipe.run.name, recipe.model_dump(mode="json"), results)
    if recipe.eval.suites:
        from lctk.extend.report import write_report

        write_report(results, run_dir, lengths)
        log(f"report: {run_dir / 'report.md'}")
    return results


def tokenizer_users(recipe: ExtendRecipe) -> list[str]:
    """The recipe keys whose work tokenizes text: evals, training stages, calibration of recurrent methods."""
    calibrated = [s.method for s in recipe.extend.recurrent if s.method in NEEDS_IN_LENGTH_TEXT | NEEDS_LONG_TEXT]
    return [key for key, used in (("eval.suites", recipe.eval.suites), ("extend.stages", recipe.extend.stages),
                                  (f"extend.recurrent ({', '.join(calibrated)})", calibrated)) if used]


def evaluate(recipe: ExtendRecipe, model, tokenizer, original: int, out_dir: Path, name: str) -> dict:
    """The recipe's eval suites on `model` at every length, relative to the `original` training length (beyond the
    model's limit too: that is the point)."""
    results = recipe.eval.run(model, tokenizer, original, recipe.run.seed, out_dir, name, default_limit=5)
    return results["results"]


def rebuild_rotary(model) -> None:
    """Rotary modules build their frequency tables from the config once; rebuild them after a RoPE change (lctk's
    and transformers' rotary classes are all constructed from the config)."""
    for name, module in list(model.named_modules()):
        if name and hasattr(module, "inv_freq") and hasattr(module, "original_inv_freq") and hasattr(module, "config"):
            parent_name, _, child = name.rpartition(".")
            rebuilt = type(module)(module.config).to(module.inv_freq.device)
            setattr(model.get_submodule(parent_name) if parent_name else model, child, rebuilt)


def calibration_ids(tokenizer, text: str, rows: int, length: int) -> torch.Tensor:
    """`rows` consecutive windows of `length` tokens [rows, length] from the calibration text: the builtin corpus'
    training split read from its end (far from the held-out text the eval suites read first), or a .txt file."""
    if text == "builtin":
        from lctk.tasks.corpus import builtin_documents

        documents = list(reversed(builtin_documents("train")))
    else:
        path = Path(text)
        if not path.is_file():
            raise UserError(f"extend.calibration.text: no file at {path} (use 'builtin' or a .txt file)")
        documents = [path.read_text(encoding="utf-8", errors="replace")]
    needed, ids = rows * length, []
    for document in documents:
        ids.extend(tokenizer(document + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= needed:
            return torch.tensor(ids[:needed]).view(rows, length)
    raise UserError(f"extend.calibration.text: {text} holds {len(ids)} tokens, fewer than the {rows} x {length} needed")


def train_stage(recipe: ExtendRecipe, model, tokenizer, stage: StageSection, number: int, original: int, log):
    """Continued training of one stage through the shared Trainer; returns the stage's model (resumable)."""
    from lctk.data.packing import StepBatches
    from lctk.parallel import check_context_parallel, context_group, make_accelerator
    from lctk.train.checkpoint import save_hf_folder
    from lctk.train.tracking import finish_trackers
    from lctk.train.trainer import Trainer, summary_line

    stage_dir = recipe.run.dir / "stages" / str(number)
    seq_len = tokens_at(stage.seq_len, original)
    done = stage_dir / "final"
    if (done / "config.json").is_file():
        log(f"stage {number}: done before ({done})")
        from lctk.evals.loading import load_weights
        from lctk.models.loading import open_model

        return load_weights(open_model(str(done), f"stage {number}"), dtype="float32", where=f"stage {number}")
    settings = recipe.train.model_copy(update={"lr": stage.lr or recipe.train.lr, "steps": stage.steps or recipe.train.steps})
    steps = settings.steps or recipe.train.total_steps(seq_len, 1)
    long_share = stage.long_share if stage.long_share is not None else recipe.extend.long_share
    accelerator = make_accelerator(settings)
    with accelerator.main_process_first():  # the main process builds the token stores, the others map them
        rows = stage_rows(recipe, tokenizer, seq_len, original, long_share)
    context = context_group(accelerator, settings.context_parallel)
    check_context_parallel(context.size, seq_len, model.config)
    log(f"stage {number}: {steps} steps at {seq_len} tokens, lr {settings.lr:g}, long share {long_share:g}")
    trainer = Trainer(
        model,
        StepBatches(rows, settings.batch_size, settings.grad_accum, context.dp_rank, context.dp_size),
        train=settings, checkpoint=recipe.checkpoint, logging=recipe.logging, run_dir=stage_dir,
        accelerator=accelerator, total_steps=steps, run_config=recipe.model_dump(mode="json"),
        run_name=f"{recipe.run.name}-stage{number}", context=context,
    )
    result = trainer.fit("auto")
    finish_trackers(accelerator)  # each stage is a tracker run of its own, named after the stage
    model = trainer.trained_model()
    if accelerator.is_main_process:
        save_hf_folder(model, tokenizer, done)
    log(summary_line(result, stage_dir))
    return model.eval()


def stage_rows(recipe: ExtendRecipe, tokenizer, seq_len: int, short_len: int, long_share: float):
    """Rows of seq_len tokens: the recipe's data sources as they are (documents cut at seq_len), mixed with their text
    documents cut at the original length and packed with their boundaries (short contexts in long rows)."""
    from lctk.data.packing import Mixture, Pieces, TextRows, split_held_out
    from lctk.data.pipeline import cache_folder, prepare_data
    from lctk.data.store import token_store

    data = recipe.data.model_copy(update={"seq_len": seq_len})
    long_rows = prepare_data(data, tokenizer, recipe.run.seed).rows
    text_sources = [(i, s) for i, s in enumerate(data.sources) if s.task is None]
    if long_share >= 1 or not text_sources:
        return long_rows
    short_sources, weights = [], []
    for index, source in text_sources:
        store = token_store(source, f"data.sources.{index}", tokenizer, cache_folder(data))
        pieces, _ = split_held_out(Pieces.cut(store, short_len, tokenizer.eos_token_id), data.held_out)
        short_sources.append(TextRows(pieces, seq_len, recipe.run.seed + 1000 + index))
        weights.append(source.weight)
    short_rows = short_sources[0] if len(short_sources) == 1 else Mixture(short_sources, weights, recipe.run.seed + 1)
    if long_share <= 0:
        return short_rows
    return Mixture([long_rows, short_rows], [long_share, 1 - long_share], recipe.run.seed + 2)


def save_model(model, tokenizer, folder: Path) -> None:
    """The HF folder (written aside and renamed into place), its config.json in both RoPE layouts."""
    from lctk.train.checkpoint import save_hf_folder

    save_hf_folder(model, tokenizer, folder)
    write_legacy_rope_keys(folder)


def _rope_state(config) -> tuple:
    return copy.deepcopy((config.rope_parameters, config.max_position_embeddings, getattr(config, RECORD, None)))


def _set_rope_state(config, state: tuple) -> None:
    rope, length, record = copy.deepcopy(state)
    config.rope_parameters, config.max_position_embeddings = rope, length
    setattr(config, RECORD, record)


def _stage_record(stage: StageSection, recipe: ExtendRecipe, original: int) -> dict:
    return {
        "seq_len": tokens_at(stage.seq_len, original),
        "steps": stage.steps or recipe.train.steps,
        "lr": stage.lr or recipe.train.lr,
        "rope": stage.rope.model_dump(exclude_none=True) if stage.rope else None,
    }


def _short(setting: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items())
