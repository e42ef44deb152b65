"""Peak memory of one training step (forward, backward, AdamW) against the sequence length T.

    python -m lctk.bench memory                  # the table (CPU: peak RSS; CUDA: peak allocated)
    python -m lctk.bench.memory --json PATH      # the same, figures also written as JSON (`make gpu-check`)

The model is the hybrid-150m recipe's shape at reduced depth: one block of its pattern (MMMA, 4 layers), width 768,
vocabulary 32,768, batch 1, bf16 autocast, against a transformers LlamaForCausalLM of the same width, depth, heads,
MLP and vocabulary (SDPA attention). Variants:

    hybrid full loss      the loss as it was: every logit, then cross-entropy in fp32 ([T, vocab] tensors)
    hybrid chunked        lctk.train.losses: cross-entropy from the final hidden states, chunk by chunk
    hybrid chunked+ckpt   the same with activation checkpointing of every block
    hybrid +segments      the same, and rows recomputed in segments of 2,048 tokens inside each block (norm + MLP,
                          and the Mamba-2 layers: train.recompute_segment)
    llama full loss       Llama as transformers trains it (logits, then cross-entropy)
    llama chunked+ckpt    Llama with lctk's chunked loss and activation checkpointing: the best Llama gets here

Each (variant, T) runs in a fresh process, one thread; on a CPU its figure is the process's peak RSS
(getrusage ru_maxrss, reset after the imports) minus the RSS it had before building the model, so weights, gradients and AdamW state are
included, read twice: after backward and after the optimizer step. The step's peak is the larger of the two phases:
forward + backward grows with T, the optimizer step (weights, gradients, AdamW state) does not and sets the peak at
short T. A straight line through the forward + backward peaks gives bytes per token (per layer: divided by the depth)
and the longest T that fits in the machine's memory. Every variant runs at one T before any runs at the next; a point
is not run but extrapolated (the table marks it) when its predicted peak passes MAX_RUN_BYTES (the box is shared),
or its predicted run time passes MAX_RUN_SECONDS or what is left of BUDGET_SECONDS (one CPU thread: the LM head and
attention's T^2 make long rows slow).

The loss's share of the step is measured two ways. `loss alone` runs the chunked loss by itself on random final
hidden states (its peak minus its inputs, gradients of the hidden states and of the LM head included): an upper
bound, since most of it is freed before the backward pass reaches its peak. `without the loss` runs the step of
hybrid +segments with a loss that reads no LM head (the mean square of the final hidden states: a gradient of the
same shape flows back, and the tied embeddings still get theirs): the difference of the two steps' forward +
backward peaks is what the loss adds to the step's peak, which is what limits T.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "hybrid-150m.yaml"
PATTERN = "MMMA"
VOCAB = 32768
LENGTHS = (2048, 4096, 8192, 16384, 32768, 65536)
SEGMENT = 2048  # train.recompute_segment of the segmented variant
VARIANTS = {  # name: (model, loss, activation checkpointing, train.recompute_segment)
    "hybrid full loss": ("hybrid", "full", False, None),
    "hybrid chunked": ("hybrid", "chunked", False, None),
    "hybrid chunked+ckpt": ("hybrid", "chunked", True, None),
    "hybrid +segments": ("hybrid", "chunked", True, SEGMENT),
    "llama full loss": ("llama", "full", False, None),
    "llama chunked+ckpt": ("llama", "chunked", True, None),
}
WITHOUT_LOSS = "hybrid +segments, no head"  # measured at LOSS_LENGTHS only, against hybrid +segments
VARIANTS_OFF_TABLE = {WITHOUT_LOSS: ("hybrid", "none", True, SEGMENT)}
BEST = "hybrid +segments"
LOSS_LENGTHS = (2048, 8192)
MAX_RUN_BYTES = 14 * 2**30  # the CPU box is shared: beyond this a point is extrapolated, not run
MAX_RUN_SECONDS = 150.0  # one measurement, process start included
BUDGET_SECONDS = 900.0  # all measurements
STARTUP_SECONDS = 12.0  # a fresh process importing torch, transformers and lctk on the shared box
DRY_RUN = {"lengths": (64, 128, 256), "hidden_size": 64, "vocab": 512}
# `--packed`: the attention bar of issue 28, a step on rows of packed documents (attention across document boundaries
# is where a [T, T] mask used to appear): patterns MA and MM, width 64, vocabulary 32,768, bf16 autocast, chunked loss
PACKED = {"patterns": ("MA", "MM"), "lengths": (16384, 65536), "hidden_size": 64, "heads": 4}


def build(kind: str, dry_run: bool = False):
    """The hybrid (hybrid-150m's settings, read with PyYAML alone: the GPU image has no pydantic) or its Llama twin."""
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    from lctk.models import HybridConfig, HybridForCausalLM

    settings = dict(yaml.safe_load(RECIPE.read_text())["model"], pattern=PATTERN)
    settings["attention"] = {**settings.get("attention", {}), "backend": "sdpa"}  # as the Llama twin
    vocab = VOCAB
    if dry_run:
        vocab = DRY_RUN["vocab"]
        settings.update(hidden_size=DRY_RUN["hidden_size"], num_attention_heads=4, num_key_value_heads=2)
        settings["mamba2"] = {**settings["mamba2"], "state_size": 16, "head_dim": 16, "chunk_size": 16}
    hybrid = HybridConfig(vocab_size=vocab, **settings)
    if kind == "hybrid":
        return HybridForCausalLM(hybrid)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hybrid.hidden_size, intermediate_size=hybrid.intermediate_size,
        num_hidden_layers=len(PATTERN), num_attention_heads=hybrid.num_attention_heads,
        num_key_value_heads=hybrid.num_key_value_heads, head_dim=hybrid.head_dim,
        tie_word_embeddings=hybrid.tie_word_embeddings, attn_implementation="sdpa",
    ))


def peak_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def start_bytes(device) -> int:
    """What a measurement starts from: the peak is reset to what is in use now (on a CPU through /proc/self/clear_refs,
    so that the imports' own transient peak does not hide the measurement's)."""
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # Linux >= 4.0: reset the peak RSS (ru_maxrss) to the current RSS
    return peak_bytes(device)


def measure_step(variant: str, length: int, device_name: str, dry_run: bool) -> dict:
    """One training step of `variant` at T = length in this process: {"peak": bytes over the start, "seconds"}."""
    import torch
    import torch.nn.functional as F

    from lctk.train.losses import final_hidden
    from lctk.train.trainer import causal_lm_loss

    torch.set_num_threads(1)
    device = torch.device(device_name)
    kind, loss_kind, checkpointing, segment = {**VARIANTS, **VARIANTS_OFF_TABLE}[variant]
    start = start_bytes(device)
    torch.manual_seed(0)
    model = build(kind, dry_run).to(device).train()
    if segment:
        model.recompute_in_segments(DRY_RUN["lengths"][0] // 2 if dry_run else segment)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=device)
    batch = {"input_ids": ids, "position_ids": torch.arange(length, device=device)[None], "labels": ids}
    started = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        if loss_kind == "chunked":
            loss = causal_lm_loss(model, batch)
        elif loss_kind == "none":
            loss = final_hidden(model, {"input_ids": ids, "position_ids": batch["position_ids"]})[0].square().mean()
        else:  # the old causal_lm_loss
            logits = model(input_ids=ids, position_ids=batch["position_ids"], use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
        loss.backward()
    forward_backward = peak_bytes(device) - start
    optimizer.step()  # AdamW's state is made here, after the activations are gone
    optimizer.zero_grad(set_to_none=True)
    return {"peak": peak_bytes(device) - start, "forward_backward": forward_backward,
            "seconds": time.perf_counter() - started}


def measure_loss(length: int, device_name: str, dry_run: bool) -> dict:
    """The chunked loss alone at T = length: its peak over its inputs (final hidden states, head, labels)."""
    import torch

    from lctk.train.losses import LMHead, cross_entropy_sum

    torch.set_num_threads(1)
    device = torch.device(device_name)
    width, vocab = (DRY_RUN["hidden_size"], DRY_RUN["vocab"]) if dry_run else (build_width(), VOCAB)
    hidden = torch.randn(1, length, width, device=device, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(vocab, width, device=device) * 0.02)
    labels = torch.randint(0, vocab, (1, length), device=device)
    start = start_bytes(device)
    started = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        cross_entropy_sum(hidden, LMHead(weight), labels).backward()
    return {"peak": peak_bytes(device) - start, "seconds": time.perf_counter() - started}


def packed_positions(length: int) -> list[int]:
    """position_ids of one row of `length` tokens packed with the builtin corpus' documents in order (a document's
    tokens counted as its UTF-8 bytes / 4, about a BPE tokenizer's rate), the last one cut at the row's end."""
    from lctk.tasks.corpus import builtin_documents

    positions: list[int] = []
    for document in builtin_documents("train"):
        positions += range(max(1, len(document.encode()) // 4))
        if len(positions) >= length:
            return positions[:length]
    raise ValueError(f"the builtin corpus has fewer than {length} tokens")


def measure_packed(pattern: str, length: int, device_name: str, dry_run: bool) -> dict:
    """One training step (chunked loss, AdamW, bf16 autocast) of `pattern` on a row of packed documents."""
    import torch

    from lctk.models import HybridConfig, HybridForCausalLM
    from lctk.train.trainer import causal_lm_loss

    torch.set_num_threads(1)
    device = torch.device(device_name)
    start = start_bytes(device)
    torch.manual_seed(0)
    vocab = DRY_RUN["vocab"] if dry_run else VOCAB
    config = HybridConfig(pattern=pattern, hidden_size=PACKED["hidden_size"], num_attention_heads=PACKED["heads"],
                          vocab_size=vocab)
    model = HybridForCausalLM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (1, length), device=device)
    positions = torch.tensor([packed_positions(length)], device=device)
    started = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        causal_lm_loss(model, {"input_ids": ids, "position_ids": positions, "labels": ids}).backward()
    optimizer.step()
    return {"peak": peak_bytes(device) - start, "seconds": time.perf_counter() - started,
            "documents": int((positions == 0).sum())}


def packed_table(device_name: str, dry_run: bool, lengths: tuple[int, ...]) -> dict:
    """`--packed`: each pattern at each T in a fresh process; peak memory of the whole step."""
    lengths = DRY_RUN["lengths"][:2] if dry_run else lengths
    print(f"one training step on a row of packed builtin documents: width {PACKED['hidden_size']}, vocabulary "
          f"{VOCAB if not dry_run else DRY_RUN['vocab']}, bf16 autocast, chunked loss, AdamW; peak memory over the "
          "process's start (CPU: RSS)")
    table: dict = {}
    for pattern in PACKED["patterns"]:
        for length in lengths:
            figures = child([f"packed:{pattern}", str(length)], device_name, dry_run, timeout=BUDGET_SECONDS)
            table[f"{pattern}@{length}"] = figures
            if figures is not None:
                print(f"  {pattern:<3} T={length:>6} ({figures['documents']} documents): {figures['peak'] / 2**30:.2f} "
                      f"GiB in {figures['seconds']:.0f} s", flush=True)
    return table


def measure(name: str, length: str, device_name: str, dry_run: bool) -> dict:
    if name == "loss":
        return measure_loss(int(length), device_name, dry_run)
    if name.startswith("packed:"):
        return measure_packed(name.removeprefix("packed:"), int(length), device_name, dry_run)
    return measure_step(name, int(length), device_name, dry_run)


def build_width() -> int:
    import yaml

    return int(yaml.safe_load(RECIPE.read_text())["model"]["hidden_size"])


def machine_bytes(device_name: str) -> int:
    import torch

    if device_name == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fit(points: dict[int, float]) -> tuple[float, float]:
    """Least-squares line (slope, intercept) through {T: value}."""
    xs, ys = list(points), list(points.values())
    if len(xs) == 1:
        return ys[0] / xs[0], 0.0
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return slope, mean_y - slope * mean_x


def predicted_seconds(times: dict[int, float], length: int) -> float:
    """A power law through the last two measured run times (exponent between 1 and 2: attention is T^2)."""
    (t1, s1), (t2, s2) = sorted(times.items())[-2:] if len(times) > 1 else ((1, 0.0), *times.items())
    exponent = min(2.0, max(1.0, math.log(s2 / s1) / math.log(t2 / t1))) if s1 > 0 else 1.0
    return s2 * (length / t2) ** exponent


def child(args: list[str], device_name: str, dry_run: bool, timeout: float) -> dict | None:
    """One measurement (variant or "loss", T); None if it failed or ran out of time. On a CPU in a fresh process
    (nice'd, one thread): RSS is a per-process high-water mark. On CUDA (peak statistics reset per measurement) and
    in dry runs (figures that only show the code runs), in this process."""
    if device_name == "cuda" or dry_run:
        import torch

        try:
            return measure(*args, device_name, dry_run)
        except torch.cuda.OutOfMemoryError:
            print(f"  ({' '.join(args)}: out of memory)", flush=True)
            return None
    command = [sys.executable, "-m", "lctk.bench.memory", "--device", device_name, "--child", *args]
    command += ["--dry-run"] if dry_run else []
    # glibc keeps freed blocks under its mmap threshold (which grows up to 32 MiB) in the heap, so at short T the
    # RSS high-water mark counts freed activations too; with a 64 KiB threshold tensors are mapped and unmapped
    # one by one, as a long row's large tensors are anyway, and RSS follows the live tensors
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    try:
        done = subprocess.run(["nice", "-n", "10", *command], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        print(f"  ({' '.join(args)}: over {timeout:.0f}s, extrapolated)", flush=True)
        return None
    if done.returncode != 0:
        print(f"  ({' '.join(args)}: exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]})", flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def sweep(device_name: str, dry_run: bool, lengths: tuple[int, ...] = LENGTHS) -> dict:
    """Every variant at every T, shortest T first across variants, while the time budget lasts; the loss alone first."""
    lengths = DRY_RUN["lengths"] if dry_run else lengths
    budget = machine_bytes(device_name)
    gib, deadline = 2**30, time.monotonic() + BUDGET_SECONDS
    loss = {}
    for length in (lengths[0], lengths[-2]) if dry_run else LOSS_LENGTHS:
        figures = child(["loss", str(length)], device_name, dry_run, timeout=2 * MAX_RUN_SECONDS)
        if figures is not None:
            loss[length] = figures["peak"]
    without_loss = {}
    for length in (lengths[0], lengths[-2]) if dry_run else LOSS_LENGTHS:
        figures = child([WITHOUT_LOSS, str(length)], device_name, dry_run, timeout=2 * MAX_RUN_SECONDS)
        if figures is not None:
            without_loss[length] = figures["forward_backward"]
    measured: dict[str, dict[int, float]] = {name: {} for name in VARIANTS}  # forward + backward peaks
    steps: dict[str, dict[int, float]] = {name: {} for name in VARIANTS}  # whole-step peaks
    times: dict[str, dict[int, float]] = {name: {} for name in VARIANTS}
    for length in lengths:
        for name in VARIANTS:
            if len(measured[name]) < lengths.index(length):
                continue  # a shorter T was skipped or failed: so is every longer one
            if len(measured[name]) >= 2:
                slope, intercept = fit(measured[name])
                if slope * length + intercept > (MAX_RUN_BYTES if device_name == "cpu" else 0.9 * budget):
                    continue
            expected = predicted_seconds(times[name], length) + STARTUP_SECONDS if times[name] else 0.0
            left = deadline - time.monotonic()
            if expected > min(left, MAX_RUN_SECONDS):
                continue
            # a loaded machine can take several times the predicted time: only the budget cuts a run short
            figures = child([name, str(length)], device_name, dry_run,
                            timeout=max(120.0, min(left, max(MAX_RUN_SECONDS, 3 * expected))))
            if figures is not None:
                measured[name][length], steps[name][length] = figures["forward_backward"], figures["peak"]
                times[name][length] = figures["seconds"] + STARTUP_SECONDS
    results: dict = {"device": device_name, "lengths": list(lengths), "machine_bytes": budget, "variants": {}}
    print(f"peak memory of one training step, batch 1, bf16 autocast, {len(PATTERN)} layers ({PATTERN} / Llama), "
          f"machine memory {budget / gib:.1f} GiB; GiB per T (* = extrapolated from the line through the others)")
    print(f"{'variant':<20} | " + " | ".join(f"{t:>7}" for t in lengths) + " | B/token/layer | longest T that fits")
    print("(B/token/layer and the longest T come from the line through the forward + backward peaks)")
    for name in VARIANTS:
        # the step's peak is the larger of forward + backward (a line in T) and the optimizer step (a constant: AdamW
        # state, weights and gradients), which decides the peak at short T
        slope, intercept = fit(measured[name])
        optimizer_peak = max(steps[name].values(), default=0.0)
        optimizer_peak = optimizer_peak if optimizer_peak > 1.01 * max(measured[name].values(), default=0.0) else 0.0
        row = {t: {"bytes": steps[name].get(t, max(slope * t + intercept, optimizer_peak)),
                   "forward_backward": measured[name].get(t), "measured": t in measured[name]} for t in lengths}
        # (in-process dry runs on a CPU may see no growth of the high-water mark at all)
        longest, per_layer = (int((budget - intercept) / slope) if slope > 0 else None), slope / len(PATTERN)
        # how straight the line is: the largest gap between a measured point and the line, relative to the point
        off_line = max((abs(b - slope * t - intercept) / b for t, b in measured[name].items() if b > 0),
                       default=None) if slope > 0 else None
        results["variants"][name] = {"points": row, "bytes_per_token": slope, "bytes_per_token_per_layer": per_layer,
                                     "intercept_bytes": intercept, "longest_T": longest, "off_line": off_line,
                                     "seconds": times[name]}
        cells = [f"{row[t]['bytes'] / gib:>6.2f}{' ' if row[t]['measured'] else '*'}" for t in lengths]
        print(f"{name:<20} | " + " | ".join(cells) + f" | {per_layer:>13,.0f} | "
              + (f"{longest:,}" + (f" (measured points within {off_line:.1%} of the line)" if off_line is not None
                                   else "") if longest else "n/a"))
    step = results["variants"][BEST]["points"]
    loss_slope, loss_intercept = fit(loss) if loss else (0.0, 0.0)
    results["loss_alone"] = {t: {"bytes": loss.get(t, loss_slope * t + loss_intercept), "measured": t in loss,
                                 "share_of_step": loss.get(t, loss_slope * t + loss_intercept) / max(step[t]["bytes"], 1)}
                             for t in lengths}
    print(f"the chunked loss alone (its gradients included), share of the step of {BEST}: " + ", ".join(
        f"T={t}: {v['bytes'] / gib:.2f} GiB{'' if v['measured'] else '*'} = {v['share_of_step']:.1%}"
        for t, v in results["loss_alone"].items()))
    # what the loss adds does not grow with T: the mean gap between the two steps where both were measured
    gaps = [measured[BEST][t] - without_loss[t] for t in without_loss if t in measured[BEST]]
    if gaps:
        added = dict.fromkeys(lengths, sum(gaps) / len(gaps))
        results["loss_added"] = {t: {"bytes": added[t], "share_of_step": added[t] / max(step[t]["bytes"], 1),
                                     "without_loss_forward_backward": without_loss.get(t)} for t in lengths}
        print(f"what the loss adds to the forward + backward peak of {BEST} (against the same step with a "
              "loss that reads no head), share of the step: " + ", ".join(
                  f"T={t}: {v['bytes'] / 2**20:.0f} MiB = {v['share_of_step']:.1%}"
                  for t, v in results["loss_added"].items()))
    if all(v["longest_T"] for v in results["variants"].values()):
        ratios(results)
    return results


def ratios(results: dict) -> None:
    longest = {name: v["longest_T"] for name, v in results["variants"].items()}
    best = longest[BEST]
    print(f"longest trainable T, {BEST}: {best:,} = {best / longest['hybrid full loss']:.1f}x the full "
          f"loss's, {best / longest['llama full loss']:.1f}x Llama's (full loss), "
          f"{best / longest['llama chunked+ckpt']:.2f}x Llama's with chunked loss + checkpointing", flush=True)


def run() -> None:
    import torch

    sweep("cuda" if torch.cuda.is_available() else "cpu", dry_run=False)


def main(argv: list[str]) -> None:
    global BUDGET_SECONDS, MAX_RUN_SECONDS  # sweep() reads them
    parser = argparse.ArgumentParser(prog="python -m lctk.bench.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes, seconds")
    parser.add_argument("--device", default=None)
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="T values, comma-separated")
    parser.add_argument("--budget", type=float, default=BUDGET_SECONDS, help="seconds for all measurements")
    parser.add_argument("--max-run-seconds", type=float, default=MAX_RUN_SECONDS, help="seconds for one measurement")
    parser.add_argument("--packed", action="store_true",
                        help="the packed-documents table instead (MA and MM at T = 16,384 and 65,536 by default)")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.child:
        print(json.dumps(measure(*args.child, device, args.dry_run)))
        return
    lengths_given = args.lengths != parser.get_default("lengths")
    try:
        lengths = tuple(sorted(int(t) for t in args.lengths.split(",")))
    except ValueError:
        parser.error(f"--lengths: comma-separated token counts, got {args.lengths!r}")
    if args.packed:
        BUDGET_SECONDS = args.budget
        table = packed_table(device, args.dry_run, lengths if lengths_given else PACKED["lengths"])
        if args.json:
            Path(args.json).write_text(json.dumps(table, indent=1))
        return
    if len(lengths) < 2 or lengths[0] < 1:
        parser.error(f"--lengths: at least two positive token counts, got {args.lengths!r}")
    BUDGET_SECONDS, MAX_RUN_SECONDS = args.budget, args.max_run_seconds
    results = sweep(device, args.dry_run, lengths)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
