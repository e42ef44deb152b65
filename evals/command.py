"""`lctk eval`: run evaluation suites on one or more Hugging Face causal LMs and write results, plots and a report."""

from __future__ import annotations

from pathlib import Path

import typer

from lctk.errors import UserError
from lctk.models.loading import TRUST_REMOTE_CODE_HELP


def eval_command(
    model: str = typer.Option(..., "--model", help="model folder(s) or .gguf file(s), comma separated"),
    suite: str = typer.Option(
        "passkey", "--suite", help="passkey, niah, ruler, state-collapse, recall-throughput, perplexity (comma "
        "separated); a niah task name (niah_single_1 ... niah_multiquery, niah_grid) or RULER task name (vt, cwe, fwe, "
        "qa_1, qa_2) runs that task only, passkey_stuffed_mamba Stuffed Mamba's passkey; \"\" with --lm-eval: "
        "lm-eval tasks alone"
    ),
    lengths: str = typer.Option("1k,2k,4k", "--lengths", help="context lengths in tokens, e.g. 1k,4k,16k (k = 1024)"),
    limit: int = typer.Option(10, "--limit", help="samples per length (per length and depth for grids)"),
    batch_size: str = typer.Option(
        "auto", "--batch-size", help="prompts generated together (left-padded, one length a batch); auto: as many as "
        "--memory-budget holds, measured on the first prompt of each length"
    ),
    memory_budget: str | None = typer.Option(
        None, "--memory-budget", help="memory for auto batches, e.g. 8GB (default: 80% of the free GPU memory, or "
        "half the available memory)"
    ),
    max_new_tokens: int | None = typer.Option(
        None, "--max-new-tokens", help="tokens generated per answer and kept free in the budget (passkey 16, niah 64)"
    ),
    depths: str = typer.Option("0,0.25,0.5,0.75,1", "--depths", help="needle depths for the grids, 0 = start"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16"),
    output: Path = typer.Option(Path("runs/eval"), "--output", help="output folder; rerunning into it resumes"),
    seed: int = typer.Option(0, "--seed", help="seed of every sample"),
    tokenizer: str | None = typer.Option(None, "--tokenizer", help="tokenizer folder (default: the model's)"),
    allow_longer: bool = typer.Option(False, "--allow-longer", help="allow lengths above the model's position limit"),
    exact: bool = typer.Option(False, "--exact", help="check every prompt against a whole-text tokenisation"),
    lm_eval: str | None = typer.Option(
        None, "--lm-eval", help="lm-evaluation-harness tasks or task YAML files, comma separated (the lm-eval extra)"
    ),
    lm_eval_limit: int | None = typer.Option(
        None, "--lm-eval-limit", help="documents per lm-eval task (default: all); --limit is the suites'"
    ),
    lm_eval_include: Path | None = typer.Option(
        None, "--lm-eval-include", help="a folder of lm-eval task YAML files (lm-eval's --include_path)"
    ),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
    chat_template: str = typer.Option(
        "auto", "--chat-template", help="wrap prompts in the tokenizer's chat template: auto (when it has one), on, off"
    ),
    haystack: Path | None = typer.Option(
        None, "--haystack", help="your essay text for RULER's essay haystack: a file or a folder of .txt/.md/.json "
        "(e.g. RULER's Paul Graham essays); default: the builtin corpus"
    ),
    qa_data: Path | None = typer.Option(
        None, "--qa-data", help="folder with RULER's squad.json and hotpotqa.json for qa_1 / qa_2 (else the hub, online)"
    ),
) -> None:
    """Run evaluation suites on any Hugging Face causal LM and write results.json, samples.jsonl, plots, report.md."""
    from lctk.evals.loading import load_weights, open_model_and_tokenizer, resolve_device, resolve_dtype
    from lctk.evals.runner import check_model_fits, compare, run_suites
    from lctk.evals.settings import EvalSettings
    from lctk.evals.store import check_output_dir
    from lctk.models.loading import trusting_remote_code

    paths = [p.strip() for p in model.split(",") if p.strip()]
    if not paths:
        raise UserError("--model: give at least one model path")
    try:
        depth_list = [float(d) for d in depths.split(",") if d.strip()]
    except ValueError as error:
        raise UserError(f"--depths: cannot read {depths!r} (use e.g. 0,0.5,1)") from error
    settings = EvalSettings(
        suites=suite, lengths=lengths, limit=limit, seed=seed, depths=depth_list, batch_size=batch_size,
        memory_budget=memory_budget, max_new_tokens=max_new_tokens, allow_longer=allow_longer, exact=exact, chat_template=chat_template,
        haystack=haystack, qa_data=qa_data, lm_eval=lm_eval, lm_eval_limit=lm_eval_limit,
        lm_eval_include=lm_eval_include,
    )
    names = _unique_names(paths)
    outputs = [output if len(paths) == 1 else output / name for name in names]
    resolve_dtype(dtype, resolve_device(device))
    for out in [output] * (len(paths) > 1) + outputs:  # the comparison's report.md goes into --output itself
        check_output_dir(out)
    with trusting_remote_code(trust_remote_code):
        # every input is checked before the first model is evaluated: flags, output folders, each model's files,
        # config and tokenizer, and whether the prompts fit its lengths
        opened = []
        for path in paths:
            files, loaded_tokenizer = open_model_and_tokenizer(path, tokenizer)
            check_model_fits(settings, files.config, loaded_tokenizer)
            opened.append((files, loaded_tokenizer))
        everything = {}
        for (files, loaded_tokenizer), name, out in zip(opened, names, outputs, strict=True):
            loaded_model = load_weights(files, device=device, dtype=dtype)
            results = run_suites(loaded_model, loaded_tokenizer, settings, output_dir=out, model_name=name,
                                 config={"model_path": files.path, "dtype_flag": dtype, "device_flag": device})
            everything[name] = results
            scores = " | ".join(f"{s} {_short(e.get('score'))}" + _rates(e) for s, e in results["results"].items())
            typer.echo(f"{name}: {scores} ({results['timings']['total_s']:.1f} s) -> {out / 'report.md'}")
            del loaded_model
    if len(paths) > 1:
        compare(everything, output)
        typer.echo(f"comparison of {len(paths)} models -> {output / 'report.md'}")


def _unique_names(paths: list[str]) -> list[str]:
    from lctk.evals.loading import model_name

    names: list[str] = []
    for path in paths:
        name = model_name(path)
        while name in names:
            name += "_"
        names.append(name)
    return names


def _short(value) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _rates(entry: dict) -> str:
    """ (1.9 samples/s, 3,870 tok/s) for suites that time their samples."""
    if not entry.get("samples_per_s"):
        return ""
    return f" ({entry['samples_per_s']:.3g} samples/s, {entry['tokens_per_s']:,.0f} tok/s)"
