"""The one-call GPU check (`make gpu-check`): everything a lent H100/H200 should measure, in one command that fits in
10 minutes and needs only what a bare GPU image has (torch, triton, transformers) plus pure-Python wheels carried
with the tree (`make gpu-wheels` fetches fla and a recent transformers into .whl/).

    python -m lctk.bench.gpu --out DIR [--budget S] [--dry-run]

Steps, each in its own process under a deadline so one hang or crash costs only its own figures:
  kernel-tests   pytest -m gpu tests/kernels (the Triton SSD and delta-rule kernels compiled for the card)
  ssd-bench      python -m lctk.kernels.ssd.bench: our kernels vs SDPA flash attention and fla's chunk_simple_gla
  delta-bench    python -m lctk.kernels.delta.bench: our delta-rule kernels (scalar and per-channel decay) vs fla's
                 chunk_gated_delta_rule and chunk_kda, forward and forward+backward at T = 2K, 8K, 32K
  train          training tokens/s and MFU of the hybrid-150m shape (recipes/hybrid-150m.yaml) at 4K and 16K tokens
                 per row, bf16 autocast, against a transformers Llama of the same width and parameter count
  distill        the step costs of recipes/distill-smollm2-gpu.yaml (or --recipe's: `python -m lctk.bench.gpu distill
                 --recipe recipes/distill-smollm2.yaml --json F` on a CPU) at its rows (batch_size x seq_len), bf16 autocast:
                 tokens/s and peak memory of an align step (all 30 layers' mixers), of a KD step at each stage's
                 layer count (8 and 15 of 30 Mamba-2) and of a plain training step of the same student (next-token
                 CE, the same weights train, no teacher: the KD/plain ratio is what the teacher costs), and the
                 recipe's training time from them (its align and stage steps only: not the data, layer ranking,
                 evidence or eval). Weights are fp32 under autocast, as in `lctk distill`. The teacher has SmolLM2-135M's exact shape and RANDOM weights:
                 its GGUF (~270 MB) cannot be carried to the device (64 MiB), and no step's cost depends on the
                 weights' values. It uses PyYAML and lctk.distill's torch-only modules, not the recipe loader
                 (the GPU image has no pydantic, accelerate or datasets). Layers are replaced evenly from layer 0,
                 so every step's backward runs through the whole student, as with any choice of an early layer.
  memory         `python -m lctk.bench memory` on the card (peak memory of a training step against T), when present
  packed         `python -m lctk.bench memory --packed`: a training step on rows of packed documents (MA and MM at
                 16K and 64K tokens), attention through flex_attention's document BlockMask
  decode         decode tokens/s of the hybrid-150m model (bf16) at 4K and 16K of context, batch 1 and 8, eager
                 against compile_decoding() (CUDA graphs: mode="reduce-overhead", attention reading its whole
                 preallocated buffer under a mask), with each step's roofline fraction (bytes / the card's measured
                 GEMV bandwidth, lctk.bench.generate) and the compiled logits checked against the eager ones
DIR/gpu-check.json holds every step's status, seconds, output tail and figures; it is rewritten after each step.

MFU counts 6 N FLOPs per token for the N parameters of the matmuls (embedding lookup excluded, LM head included)
plus each global attention layer's 6 * 2 T d_head H (causal half of 12 T d H): torchtitan's convention, so the
hybrid and Llama figures are on one scale. Mamba-2's own scan work is left out (small next to its projections), so
the hybrid's MFU is slightly understated. Peaks come from the card's name (lctk.kernels.ssd.bench.PEAKS).

--dry-run runs every step at toy sizes on whatever device there is (on a CPU: the Triton interpreter for the SSD
bench), which is how the test suite keeps this script from rotting without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "hybrid-150m.yaml"
TRAIN_LENGTHS = (4096, 16384)
WARMUP_STEPS, TIMED_STEPS = 2, 5


def run() -> None:
    """`make bench` entry: this check needs a GPU; on a CPU it says how to dry-run it instead."""
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: skipped (`make gpu-check` on a GPU machine; `python -m lctk.bench.gpu --dry-run "
              "--out DIR` exercises it here)")
        return
    main(["--out", "runs/gpu-check"])


def steps(out: Path, dry_run: bool) -> list[tuple[str, list[str], dict[str, str], float]]:
    """(name, command, extra environment, share of the budget) for each step, in order."""
    python = sys.executable
    interpret = {"TRITON_INTERPRET": "1"} if dry_run else {}
    tests = [python, "-m", "pytest", "-m", "gpu", str(REPO / "tests" / "kernels"), "-o", "addopts=-q", "-p",
             "no:cacheprovider"]
    ssd = [python, "-m", "lctk.kernels.ssd.bench", "--json", str(out / "ssd-bench.json")] + (["--smoke"] if dry_run else [])
    delta = [python, "-m", "lctk.kernels.delta.bench", "--json", str(out / "delta-bench.json")] + (
        ["--smoke"] if dry_run else [])
    train = [python, "-m", "lctk.bench.gpu", "train", "--json", str(out / "train.json")] + (["--dry-run"] if dry_run else [])
    distill = [python, "-m", "lctk.bench.gpu", "distill", "--json", str(out / "distill.json")] + (
        ["--dry-run"] if dry_run else [])
    memory = [python, "-m", "lctk.bench.memory", "--json", str(out / "memory.json")] + (["--dry-run"] if dry_run else [])
    packed = [python, "-m", "lctk.bench.memory", "--packed", "--json", str(out / "packed.json")] + (
        ["--dry-run"] if dry_run else [])
    decode = [python, "-m", "lctk.bench.gpu", "decode", "--json", str(out / "decode.json")] + (
        ["--dry-run"] if dry_run else [])
    return [
        ("kernel-tests", tests, {"LCTK_TRITON_AUTOTUNE": "0"}, 0.2),
        ("ssd-bench", ssd, interpret, 0.1),
        ("delta-bench", delta, interpret, 0.1),
        ("train", train, {"LCTK_TRITON_AUTOTUNE": "0"}, 0.15),
        ("distill", distill, {"LCTK_TRITON_AUTOTUNE": "0"}, 0.1),
        ("memory", memory, {"LCTK_TRITON_AUTOTUNE": "0"}, 0.15),
        ("packed", packed, {"LCTK_TRITON_AUTOTUNE": "0"}, 0.1),  # flex_attention compiles on its first call
        ("decode", decode, {"LCTK_TRITON_AUTOTUNE": "0"}, 0.2),  # so does the decode step; rows are written as they end
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m lctk.bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu-check.json and each step's JSON")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for all steps together (default 540)")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on any device (CPU: Triton interpreter)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": _device_name(), "dry_run": args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "steps": {}}
    deadline = time.monotonic() + args.budget
    planned = steps(out, args.dry_run)
    for index, (name, command, env, share) in enumerate(planned):
        left = deadline - time.monotonic()
        # a step may use the time earlier steps left unused, but never more than what remains
        later = sum(s for *_, s in planned[index + 1 :])
        allowed = max(1.0, left * share / (share + later))
        report["steps"][name] = _run_step(command, env, allowed, out)
        entry = report["steps"][name]
        print(f"[gpu-check] {name}: {entry['status']} in {entry['seconds']:.0f}s", flush=True)
        _write(out / "gpu-check.json", report)
    return report


def _run_step(command: list[str], env: dict[str, str], timeout: float, out: Path) -> dict:
    started = time.monotonic()
    try:
        done = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout,
                              cwd=REPO)
        status, output = ("ok" if done.returncode == 0 else f"exit {done.returncode}"), done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        status = f"timed out after {timeout:.0f}s"
        output = "".join(x.decode() if isinstance(x, bytes) else (x or "") for x in (expired.stdout, expired.stderr))
    entry = {"status": status, "seconds": round(time.monotonic() - started, 1), "command": " ".join(command),
             "output_tail": output[-3000:]}
    figures = next((arg for arg in command if arg.endswith(".json") and arg.startswith(str(out))), None)
    if figures and Path(figures).is_file():
        entry["figures"] = json.loads(Path(figures).read_text())
    elif "pytest" in command:  # pytest's closing line: "3 passed, 4 skipped in 1.2s"
        entry["figures"] = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", output)}
    return entry


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _write(path: Path, data: dict) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=1))
    temporary.replace(path)


# ---------------------------------------------------------------- the `train` step


def hybrid_150m(dry_run: bool):
    """The hybrid-150m recipe's model, read with PyYAML alone (the GPU image has no pydantic): its `model:` keys
    are HybridConfig's. Dry runs keep the pattern at toy width."""
    import yaml

    from lctk.models import HybridConfig, HybridForCausalLM

    settings = dict(yaml.safe_load(RECIPE.read_text())["model"])
    settings.setdefault("attention", {})["backend"] = "sdpa"  # flash-attn is not on a bare image; SDPA uses flash
    if dry_run:
        settings.update(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, pattern="MMMA")
        settings["mamba2"] = {**settings["mamba2"], "state_size": 16, "head_dim": 16, "chunk_size": 16}
    vocab = 512 if dry_run else int(yaml.safe_load(RECIPE.read_text())["tokenizer"].removeprefix("bpe:"))
    return HybridForCausalLM(HybridConfig(vocab_size=vocab, **settings))


def flops_per_token(model, length: int) -> float:
    config = model.config
    pattern = getattr(config, "pattern", "A" * config.num_hidden_layers)
    attention_layers = pattern.count("A")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    from lctk.bench.generate import matmul_parameters

    return 6 * matmul_parameters(model) + 6 * 2 * attention_layers * config.num_attention_heads * head_dim * length


def train_throughput(model, length: int, device, steps: int, warmup: int) -> dict:
    """Tokens/s of full training steps (forward, backward, AdamW) at batch 1, bf16 autocast."""
    import torch

    model.to(device).train()
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
    step_s, peak = timed_training(lambda: model(input_ids=ids, labels=ids, use_cache=False).loss, model.parameters(),
                                  device, steps, warmup)
    model.to("cpu")
    return {"T": length, "step_s": round(step_s, 4), "tokens_per_s": round(length / step_s, 1),
            "model_tflops": round(flops_per_token(model, length) * length / step_s / 1e12, 2),
            "peak_gib": round(peak, 2) if peak is not None else None}


def timed_training(loss_of, parameters, device, steps: int, warmup: int) -> tuple[float, float | None]:
    """(median seconds, peak GiB on a GPU) of training steps: loss_of() under bf16 autocast, backward, AdamW on
    `parameters`; the first `warmup` steps are not counted."""
    import torch

    optimizer = torch.optim.AdamW(list(parameters), lr=1e-4, fused=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(warmup + steps):
        _sync(device)
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        seconds.append(time.perf_counter() - started)
    del optimizer
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return sorted(seconds[warmup:])[len(seconds[warmup:]) // 2], peak


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_args(step: str, argv: list[str], recipe: Path | None = None) -> argparse.Namespace:
    """The flags of a step that runs in its own process: where its JSON goes, toy sizes, and (`recipe`: its default)
    the recipe it measures."""
    parser = argparse.ArgumentParser(prog=f"python -m lctk.bench.gpu {step}")
    parser.add_argument("--json", required=True)
    parser.add_argument("--dry-run", action="store_true")
    if recipe is not None:
        parser.add_argument("--recipe", type=Path, default=recipe, help="a distill recipe (its rows, student, stages)")
    return parser.parse_args(argv)


def train_main(argv: list[str]) -> None:
    args = _step_args("train", argv)
    import torch

    from lctk.bench.train import matching_llama, parameters
    from lctk.kernels.ssd.bench import PEAKS

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = _device_name()
    peak = next((tflops for key, tflops, _ in PEAKS if key in name), None)
    hybrid = hybrid_150m(args.dry_run)
    llama = matching_llama(hybrid)
    lengths = (64, 128) if args.dry_run else TRAIN_LENGTHS
    steps, warmup = (1, 1) if args.dry_run else (TIMED_STEPS, WARMUP_STEPS)
    report = {"device": name, "peak_tflops": peak, "hybrid": {"pattern": hybrid.config.pattern,
              "parameters": parameters(hybrid)}, "llama": {"layers": llama.config.num_hidden_layers,
              "parameters": parameters(llama)}, "results": []}
    print(f"hybrid {hybrid.config.pattern} {parameters(hybrid) / 1e6:.1f}M vs llama {llama.config.num_hidden_layers} "
          f"layers {parameters(llama) / 1e6:.1f}M on {name}, bf16 autocast, batch 1", flush=True)
    for length in lengths:
        row = {"T": length}
        for label, model in (("hybrid", hybrid), ("llama", llama)):
            try:
                figures = train_throughput(model, length, device, steps, warmup)
            except torch.OutOfMemoryError:
                figures = {"error": "out of memory"}
            if peak and "model_tflops" in figures:
                figures["mfu"] = round(figures["model_tflops"] / peak, 4)
            row[label] = figures
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if "tokens_per_s" in row["hybrid"] and "tokens_per_s" in row["llama"]:
            row["hybrid_over_llama"] = round(row["hybrid"]["tokens_per_s"] / row["llama"]["tokens_per_s"], 3)
        report["results"].append(row)
        print(json.dumps(row), flush=True)
        _write(Path(args.json), report)


# ---------------------------------------------------------------- the `distill` step

DISTILL_RECIPE = REPO / "recipes" / "distill-smollm2-gpu.yaml"
# SmolLM2-135M-Instruct's shape (the config.json lctk.distill.teacher writes from its GGUF), the recipe's teacher
SMOLLM2_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True}
TOY_TEACHER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "tie_word_embeddings": True}


# distill.loss keys a recipe may leave out (lctk.distill.recipe.LossSection's defaults: pydantic is not on the card)
LOSS_DEFAULTS = {"divergence": "reverse_kl", "forward_weight": 0.5, "temperature": 1.0, "ce_weight": 0.0,
                 "hidden_weight": 0.0}


def distill_plan(recipe: dict, layers: int) -> dict:
    """What the step needs from the recipe (read with PyYAML): the row shape, the student and loss settings, each
    stage's layer count (scaled to `layers` for the toy teacher) and steps, and the token budget."""
    from types import SimpleNamespace

    train, spec = recipe["train"], recipe["distill"]
    counts = [stage["replace"] for stage in spec["stages"]]
    if not all(isinstance(count, int) for count in counts):
        raise ValueError(f"the distill step reads stages as replace: N, got {counts}")
    scale = layers / SMOLLM2_135M["num_hidden_layers"]
    stage_steps = [stage.get("steps", train["steps"]) for stage in spec["stages"]]
    align_steps = spec["align"].get("steps", train["steps"])
    tokens_per_step = train["batch_size"] * train.get("grad_accum", 1) * recipe["data"]["seq_len"]
    return {"seq_len": recipe["data"]["seq_len"], "batch_size": train["batch_size"],
            "mixer": spec["student"]["mixer"], "init": spec["student"].get("init", "mil"),
            "settings": spec["student"].get("settings", {}), "align_loss": spec["align"].get("loss", "mse"),
            "loss": SimpleNamespace(**{**LOSS_DEFAULTS, **spec.get("loss", {})}),
            "replaced": [max(1, round(count * scale)) for count in counts], "stage_steps": stage_steps,
            "align_steps": align_steps, "tokens_per_step": tokens_per_step,
            "tokens": tokens_per_step * (align_steps + sum(stage_steps))}


def spread(count: int, total: int) -> list[int]:
    """`count` layers of `total`, evenly spaced from layer 0."""
    return sorted({index * total // count for index in range(count)})


def distill_main(argv: list[str]) -> None:
    args = _step_args("distill", argv, DISTILL_RECIPE)
    import torch
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    from lctk.distill import convert
    from lctk.distill.align import AlignedMixers
    from lctk.distill.losses import distill_loss_fn, model_inputs
    from lctk.train.losses import LMHead, cross_entropy_sum, final_hidden

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = TOY_TEACHER if args.dry_run else SMOLLM2_135M
    try:
        plan = distill_plan(yaml.safe_load(args.recipe.read_text()), shape["num_hidden_layers"])
    except KeyError as error:  # one line, not a traceback
        raise SystemExit(f"--recipe {args.recipe}: no {error.args[0]!r} key") from None
    except (OSError, yaml.YAMLError, ValueError, TypeError) as error:
        raise SystemExit(f"--recipe {args.recipe}: {' '.join(str(error).split())}") from None  # YAML's are multi-line
    rows, length = (2, 64) if args.dry_run else (plan["batch_size"], plan["seq_len"])
    steps, warmup = (1, 1) if args.dry_run else (TIMED_STEPS, WARMUP_STEPS)
    teacher_hf = LlamaForCausalLM(LlamaConfig(**shape))
    parameters = sum(p.numel() for p in teacher_hf.parameters())
    teacher = convert.student_from_teacher(teacher_hf).requires_grad_(False).to(device)
    base = convert.student_from_teacher(teacher_hf)
    del teacher_hf
    ids = torch.randint(0, shape["vocab_size"], (rows, length), device=device)
    batch = {"input_ids": ids, "labels": ids,
             "position_ids": torch.arange(length, device=device).expand(rows, length)}
    tokens = rows * length
    report = {"device": _device_name(), "teacher": {"weights": "random", "parameters": parameters, **shape},
              "rows": rows, "T": length, "recipe": {k: plan[k] for k in ("tokens_per_step", "tokens", "align_steps",
                                                                          "stage_steps")},
              "results": []}
    with torch.device("meta"):  # the budget is per parameter of the real teacher, in the dry run too
        real = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).parameters())
    report["recipe"]["tokens_per_parameter"] = round(plan["tokens"] / real, 4)
    print(f"teacher {parameters / 1e6:.1f}M parameters (random weights), rows of {rows} x {length} on "
          f"{report['device']}, bf16 autocast", flush=True)

    def measure(what: str, loss_of, trainable, replaced: int | None = None) -> dict:
        try:
            step_s, peak = timed_training(loss_of, trainable, device, steps, warmup)
            row = {"step": what, "replaced": replaced, "step_s": round(step_s, 4),
                   "tokens_per_s": round(tokens / step_s, 1), "peak_gib": round(peak, 2) if peak is not None else None}
        except torch.OutOfMemoryError:
            row = {"step": what, "replaced": replaced, "error": "out of memory"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report["results"].append(row)
        print(json.dumps(row), flush=True)
        _write(Path(args.json), report)
        return row

    every = convert.attention_layers(base)
    aligned = AlignedMixers.of(convert.replace_layers(base, every, plan["mixer"], plan["init"], plan["settings"]))
    aligned.to(device).train()
    align = measure("align", lambda model=aligned: model(teacher, batch, plan["align_loss"]) / tokens,
                    aligned.parameters(), len(every))
    del aligned  # each model leaves the card before the next is built
    kd_speed = {}
    for count in plan["replaced"]:
        layers = spread(count, len(every))
        student = convert.replace_layers(base, layers, plan["mixer"], plan["init"], plan["settings"]).to(device)
        student.train().requires_grad_(False)
        trainable = [p for layer in layers for p in student.model.layers[layer].mixer.parameters()]
        for p in trainable:
            p.requires_grad_(True)
        kd_loss = distill_loss_fn(teacher, plan["loss"], layers)
        kd = measure("kd", lambda model=student, loss=kd_loss: loss(model, batch) / tokens, trainable, count)

        def plain_loss(model=student):
            hidden, _ = final_hidden(model, model_inputs(batch))
            return cross_entropy_sum(hidden, LMHead.of(model), batch["labels"]) / tokens

        plain = measure("plain", plain_loss, trainable, count)
        if "tokens_per_s" in kd and "tokens_per_s" in plain:
            kd["kd_over_plain"] = round(kd["tokens_per_s"] / plain["tokens_per_s"], 3)
            kd_speed[count] = kd["tokens_per_s"]
        del student, trainable, kd_loss, plain_loss
    if "tokens_per_s" in align and len(kd_speed) == len(plan["replaced"]):  # the stages' training, from the rates above
        seconds = plan["tokens_per_step"] * (plan["align_steps"] / align["tokens_per_s"] + sum(
            steps / kd_speed[count] for count, steps in zip(plan["replaced"], plan["stage_steps"])))
        report["recipe"]["training_s"] = round(seconds, 1)
    _write(Path(args.json), report)


# ---------------------------------------------------------------- the `decode` step

DECODE_CONTEXTS, DECODE_BATCHES, DECODE_STEPS = (4096, 16384), (1, 8), 20


def decode_main(argv: list[str]) -> None:
    args = _step_args("decode", argv)
    import torch

    from lctk.bench import generate

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = hybrid_150m(args.dry_run).to(device, dtype).eval()
    # the dry run's one batch is decode_check's, so that its compiled step is reused rather than compiled again
    batches, contexts, steps = ((2,), (64,), 3) if args.dry_run else (DECODE_BATCHES, DECODE_CONTEXTS, DECODE_STEPS)
    probes = generate.probe(dtype, (*batches, generate.groups_of(model)), 2**20 if args.dry_run else 2**30,
                            device=device.type, square=False)
    report = {"device": _device_name(), "pattern": model.config.pattern, "dtype": str(dtype),
              "bandwidth": probes["bandwidth"], "check": decode_check(model), "results": []}
    for batch in batches:
        for context in contexts:
            row = {"batch": batch, "context": context, **generate.ceiling(model, batch, context, probes)}
            for label, compiled in (("eager", False), ("compiled", True)):
                model.compile_decoding(compiled)
                try:
                    figures = generate.measure_row(model, "lctk", batch, context, steps, prefill=False)
                    figures["fraction"] = row["roofline_s"] / figures["step_s"]
                except torch.OutOfMemoryError:
                    figures = {"error": "out of memory"}
                row[label] = figures
            if "step_s" in row["eager"] and "step_s" in row["compiled"]:
                row["compiled_over_eager"] = row["eager"]["step_s"] / row["compiled"]["step_s"]
            model.compile_decoding(False)
            report["results"].append(row)
            print(json.dumps(row, default=str), flush=True)
            _write(Path(args.json), report)
    _write(Path(args.json), report)


def decode_check(model) -> dict:
    """Largest difference between the logits of compiled decode steps (CUDA graphs on a GPU) and eager ones."""
    import torch

    from lctk.models import HybridCache

    ids = torch.randint(0, model.config.vocab_size, (2, 24), device=next(model.parameters()).device)
    logits = {}
    with torch.no_grad():
        for compiled in (False, True):
            model.compile_decoding(compiled)
            cache = HybridCache.for_model(model, 2, max_length=24)
            model(ids[:, :16], cache=cache)
            logits[compiled] = torch.cat([model(ids[:, t : t + 1], cache=cache).logits.float().clone()
                                          for t in range(16, 24)], dim=1)
    model.compile_decoding(False)
    return {"max_abs_diff": float((logits[True] - logits[False]).abs().max()),
            "max_abs_logit": float(logits[False].abs().max())}


if __name__ == "__main__":
    if sys.argv[1:2] == ["train"]:
        train_main(sys.argv[2:])
    elif sys.argv[1:2] == ["distill"]:
        distill_main(sys.argv[2:])
    elif sys.argv[1:2] == ["decode"]:
        decode_main(sys.argv[2:])
    else:
        main(sys.argv[1:])
