"""`lctk train`: a validated TrainRecipe -> tokenizer, packed data, model -> Trainer -> run dir -> evals.

Run dir (run.output_dir, default runs/<run.name>):
    recipe.yaml      the resolved recipe (defaults filled in)
    tokenizer/       the tokenizer (trained BPE, bytes or a copy of the given one)
    metrics.jsonl    one line per logged step
    checkpoints/     see lctk.train.checkpoint
    final/           the model and tokenizer as a Hugging Face folder (AutoModelForCausalLM after `import lctk`)
    eval/before, eval/after   eval suite outputs; results.json   before/after figures
A run dir that already holds a run is resumed with --resume auto and otherwise refused, so nothing is overwritten by
accident; resuming checks that the recipe's model, tokenizer and data sections are those the run was started with.
The run dir is marked as lctk's and locked while the run uses it (lctk.train.rundir): --overwrite empties only a
marked run dir, and a fresh run into a marked dir that holds no run (one killed before its first checkpoint) clears
that run's metrics, results and evals, which lctk wrote.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch

from lctk.errors import UserError
from lctk.recipe import TrainRecipe
from lctk.train import rundir

SECTIONS_FIXED_ON_RESUME = ("model", "tokenizer", "data")
SUITE_UNITS = {"passkey": "%", "niah": "%"}
LEFT_BY_A_KILLED_RUN = ("eval", "results.json", "metrics.jsonl")
RUN_FOLDERS = ("checkpoints", "final", "tokenizer", "eval")  # what the run dir holds as folders


def train_recipe(recipe: TrainRecipe, resume: str | None = None, overwrite: bool = False) -> dict:
    """Run a train recipe end to end; returns the run's results (also in <run_dir>/results.json)."""
    with contextlib.ExitStack() as held:  # the run dir's lock, until the run ends
        return _train(recipe, resume, overwrite, held)


def _train(recipe: TrainRecipe, resume: str | None, overwrite: bool, held: contextlib.ExitStack) -> dict:
    from accelerate.utils import set_seed

    from lctk.data.packing import StepBatches
    from lctk.data.pipeline import load_tokenizer, prepare_data
    from lctk.parallel import check_context_parallel, context_group, make_accelerator
    from lctk.train.checkpoint import check_matches, save_hf_folder, usable_checkpoint
    from lctk.train.tracking import log_results
    from lctk.train.trainer import Trainer, summary_line

    accelerator = make_accelerator(recipe.train)
    context = context_group(accelerator, recipe.train.context_parallel)
    main = accelerator.is_main_process
    say = print if main else (lambda *_, **__: None)
    run_dir = recipe.run.dir
    folder = rundir.RunFolder(recipe, "train", resuming=resume is not None, overwrite=overwrite, holds_run=_holds_run,
                              folders=RUN_FOLDERS, fixed_sections=SECTIONS_FIXED_ON_RESUME,
                              left_by_a_killed_run=LEFT_BY_A_KILLED_RUN)
    if main:
        folder.check()
        if resume not in (None, "auto"):
            usable_checkpoint(Path(resume))
    accelerator.wait_for_everyone()
    set_seed(recipe.run.seed)

    with accelerator.main_process_first():  # the main process fills the caches, the others read them
        tokenizer = load_tokenizer(recipe.tokenizer, recipe.data)
    model = _build_model(recipe, tokenizer)  # a bad init_from or vocab_size fails before the data is tokenised
    if main and resume not in (None, "auto"):
        check_matches(Path(resume), model)
    with accelerator.main_process_first():
        data = prepare_data(recipe.data, tokenizer, recipe.run.seed)
    check_context_parallel(context.size, recipe.data.seq_len, model.config)
    if main:
        held.enter_context(folder.opened())
        tokenizer.save_pretrained(run_dir / "tokenizer")
    world = accelerator.num_processes
    total_steps = recipe.train.total_steps(recipe.data.seq_len, context.dp_size)
    tokens_per_step = recipe.train.batch_size * recipe.train.grad_accum * context.dp_size * recipe.data.seq_len
    say(f"model: {recipe.model.pattern or model.config.pattern} pattern, {_count_parameters(model) / 1e6:.2f}M parameters, "
        f"vocab {model.config.vocab_size}, seq_len {recipe.data.seq_len}")
    for line in data.summary:
        say(f"data: {line}")
    split = f", each row split over {context.size} (context parallel)" if context.size > 1 else ""
    say(f"train: {total_steps} steps x {tokens_per_step} tokens on {world} process(es){split}, {recipe.train.precision}")

    results_file = run_dir / "results.json"
    results = (rundir.saved_record(results_file) or {}) if resume is not None else {}
    if main and recipe.eval.before and "before" not in results:
        results["before"] = _evaluate(recipe, model, tokenizer, data.held_out, accelerator, run_dir / "eval" / "before")
    accelerator.wait_for_everyone()

    trainer = Trainer(
        model,
        StepBatches(data.rows, recipe.train.batch_size, recipe.train.grad_accum, context.dp_rank, context.dp_size),
        train=recipe.train,
        checkpoint=recipe.checkpoint,
        logging=recipe.logging,
        run_dir=run_dir,
        accelerator=accelerator,
        total_steps=total_steps,
        run_config=recipe.model_dump(mode="json"),
        run_name=recipe.run.name,
        context=context,
    )
    result = trainer.fit(resume)
    final = trainer.trained_model()
    if main:
        save_hf_folder(final, tokenizer, run_dir / "final", recipe.data.seq_len)
        results["train"] = dict(result.__dict__)
        if result.new_steps or "after" not in results:  # evaluations of an older model must not be resumed
            shutil.rmtree(run_dir / "eval" / "after", ignore_errors=True)
            results["after"] = _evaluate(recipe, final, tokenizer, data.held_out, accelerator, run_dir / "eval" / "after")
        results_file.write_text(json.dumps(results, indent=1))
        log_results(accelerator, results)  # before end_training closes the trackers
        print_results(results, recipe)
        say(summary_line(result, run_dir))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def _holds_run(run_dir: Path) -> bool:
    return (run_dir / "checkpoints").exists() or (run_dir / "final").exists()


def _build_model(recipe: TrainRecipe, tokenizer):
    from lctk.models import HybridForCausalLM
    from lctk.models.loading import load_causal_lm, open_model

    if recipe.model.init_from:
        path = Path(recipe.model.init_from)
        if not path.is_dir():  # a local folder, never a hub name
            raise UserError(f"model.init_from: model folder not found: {path}")
        model = load_causal_lm(open_model(str(path), "model.init_from"), "model.init_from", dtype=torch.float32)
        if model.config.vocab_size < len(tokenizer):
            raise UserError(f"model.init_from: {path} has {model.config.vocab_size} tokens, the tokenizer {len(tokenizer)}")
        return model
    vocab = -(-len(tokenizer) // 64) * 64  # a multiple of 64 keeps the embedding and LM-head matmuls aligned
    if recipe.model.vocab_size is not None and recipe.model.vocab_size < len(tokenizer):
        raise UserError(
            f"model.vocab_size: {recipe.model.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens "
            "(leave it unset to fit the tokenizer)"
        )
    config = recipe.hybrid_config(
        vocab, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    config.train_length = recipe.data.seq_len
    return HybridForCausalLM(config)


def _count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _evaluate(recipe: TrainRecipe, model, tokenizer, held_out, accelerator, out_dir: Path) -> dict:
    from lctk.train.trainer import held_out_loss

    figures: dict = {}
    if recipe.eval.held_out_loss and held_out:
        figures["held_out_loss"] = held_out_loss(model, held_out, accelerator)
    if recipe.eval.suites:
        suite_results = recipe.eval.run(model, tokenizer, recipe.data.seq_len, recipe.run.seed, out_dir,
                                        recipe.run.name)
        figures["suites"] = {name: entry for name, entry in suite_results["results"].items()}
    return figures


def print_results(results: dict, recipe: TrainRecipe) -> None:
    """The before/after table: held-out loss and each suite's score by length."""
    from rich.console import Console
    from rich.table import Table

    columns = [name for name in ("before", "after") if name in results]
    if not columns:
        return
    table = Table(title=f"{recipe.run.name}: before and after training")
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    rows: dict[str, list[str]] = {}
    seq_len = recipe.data.seq_len
    for position, name in enumerate(columns):
        figures = results[name]
        entries = []
        if figures.get("held_out_loss") is not None:
            entries.append(("held-out loss (nats/token)", f"{figures['held_out_loss']:.3f}"))
        for suite, entry in figures.get("suites", {}).items():
            for length, score in (entry.get("by_length") or {}).items():
                times = int(length) / seq_len
                label = f"{suite} @ {length} tokens ({times:g}x)"
                entries.append((label, "n/a" if score is None else f"{score:.1f}{SUITE_UNITS.get(suite, '')}"))
        for label, value in entries:
            rows.setdefault(label, [""] * len(columns))[position] = value
    for label, values in rows.items():
        table.add_row(label, *values)
    Console().print(table)
