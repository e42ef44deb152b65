"""Benchmarks of the delta-rule op: `python -m lctk.kernels.delta.bench [--cpu | --smoke] [--json PATH]`.

GPU (the default; part of `make gpu-check`): forward and forward+backward, bf16, B = 2, H = 16 heads of K = V = 128,
T = 2K, 8K, 32K, for a scalar decay (Gated DeltaNet) and a per-channel decay (KDA):
  triton   our kernels (lctk.kernels.delta on CUDA tensors)
  torch    the chunked torch reference (reference.py), only up to T = 8K
  fla      fla's chunk_gated_delta_rule / chunk_kda (the same ops), if `fla` imports
Work counted for TFLOP/s, per token and head of the chunked form with chunks of L = 64: 4 L K (the two [L, L]
factors), 3 L (K + V) (the triangular solve and W, U), 6 K V (W S, the state update, the read of S), 2 L V (P delta);
forward+backward = 3x the forward. Peaks come from the card's name (the SSD bench's table). A check compares our
Triton output and gradients with the torch reference first.

--cpu: this CPU, fp32, B = 1, H = 4 heads of K = V = 64, forward + backward: the chunked torch path against the
token-by-token recurrence (reference.py's twin) at T = 512, and against fla's own torch references of the same ops
(fla.ops.gated_delta_rule.naive / fla.ops.kda.naive: a chunked form with a Python loop over the chunk's rows for the
triangular inverse, and a token loop) at T = 512 and 2048, when fla is importable (it is only a comparison here:
`pip install --no-deps --target DIR flash-linear-attention fla-core einops` and DIR on PYTHONPATH). Wall time and
this process's CPU time (steadier on a shared machine), best of a few interleaved runs, and the ratios to ours.

--smoke: tiny sizes on whatever device there is (on a CPU: the Triton interpreter, TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F

from ..ssd.bench import Bench, Shape
from . import delta_rule
from .reference import delta_chunked, delta_recurrent

SHAPES = [Shape("gated-deltanet H=16 K=V=128", 2, 16, 16, 128, 128), Shape("kda H=16 K=V=128", 2, 16, 16, 128, 128)]
LENGTHS = [2048, 8192, 32768]
SMOKE_SHAPES = [Shape("smoke scalar", 1, 2, 2, 16, 16), Shape("smoke channel", 1, 2, 2, 16, 16)]
SMOKE_LENGTHS = [20]


def per_channel(shape: Shape) -> bool:
    return "kda" in shape.name or "channel" in shape.name


def delta_inputs(batch: int, seq_len: int, heads: int, key_dim: int, value_dim: int, channel: bool, device,
                 dtype=torch.bfloat16, seed: int = 0) -> list[torch.Tensor]:
    """q, k (unit norm), v, g (log-decay, per head or per channel), beta, as the mixers pass them; leaves."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, seq_len, heads, key_dim)
    q = F.normalize(torch.randn(*shape, device=device, generator=gen), dim=-1).to(dtype)
    k = F.normalize(torch.randn(*shape, device=device, generator=gen), dim=-1).to(dtype)
    v = torch.randn(batch, seq_len, heads, value_dim, device=device, generator=gen).to(dtype)
    g = F.logsigmoid(torch.randn(*(shape if channel else shape[:3]), device=device, generator=gen) + 4)
    beta = torch.rand(*shape[:3], device=device, generator=gen)
    return [x.requires_grad_() for x in (q, k, v, g, beta)]


def chunked_flops(shape: Shape, seq_len: int, chunk: int = 64) -> float:
    K, V = shape.key_dim, shape.value_dim
    per_token = 4 * chunk * K + 3 * chunk * (K + V) + 6 * K * V + 2 * chunk * V
    return shape.batch * seq_len * shape.n_heads * per_token


def import_fla(report: dict) -> dict:
    """fla's chunk_gated_delta_rule and chunk_kda, where they import."""
    found = {}
    for name, module, attr in (("fla-gdn", "fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
                               ("fla-kda", "fla.ops.kda", "chunk_kda")):
        try:
            found[name] = getattr(importlib.import_module(module), attr)
            report["available"][name] = "ok"
        except Exception as error:
            report["available"][name] = f"{type(error).__name__}: {str(error)[:200]}"
    return found


def check_against_reference(bench: Bench, shape: Shape, seq_len: int, dtype: torch.dtype) -> None:
    """Our Triton output and gradients vs the torch reference on the same inputs (a sanity check, not a test)."""
    inputs = delta_inputs(shape.batch, seq_len, shape.n_heads, shape.key_dim, shape.value_dim, per_channel(shape),
                          bench.device, dtype)
    results = []
    for fn in (delta_rule, delta_chunked):
        o = fn(*inputs, scale=shape.key_dim**-0.5)[0]
        results.append([o, *torch.autograd.grad(o.float().square().sum(), inputs)])
    errors = {name: ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()
              for name, a, b in zip(["o", "dq", "dk", "dv", "dg", "dbeta"], *results)}
    bench.report["checks"].append({"shape": shape.name, "T": seq_len, "max_rel_error_vs_torch": errors})
    print(f"check {shape.name} T={seq_len}: triton vs torch reference, max relative error "
          + ", ".join(f"{n} {e:.1e}" for n, e in errors.items()), flush=True)


def _outputs(op, inputs: list[torch.Tensor]) -> tuple[torch.Tensor]:
    return (op(*inputs, scale=inputs[0].shape[-1] ** -0.5)[0],)


def gpu_main(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        if not args.smoke or os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("error: no CUDA device; on a CPU run `python -m lctk.kernels.delta.bench --cpu`, or "
                     "`TRITON_INTERPRET=1 python -m lctk.kernels.delta.bench --smoke`")
        os.environ["LCTK_KERNELS"] = "triton"  # the interpreter on CPU tensors
    bench = Bench(device, args.budget, args.json, args.smoke)
    shapes, lengths = (SMOKE_SHAPES, SMOKE_LENGTHS) if args.smoke else (SHAPES, LENGTHS)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    fla = import_fla(bench.report)
    print(f"device: {bench.report['device']}; peaks bf16 {bench.report['peak_tflops']} TFLOP/s; "
          f"optional: {bench.report['available']}", flush=True)
    for shape in shapes:
        try:
            check_against_reference(bench, shape, lengths[0], dtype)
        except Exception as error:  # reported; the timings still run
            bench.report["checks"].append({"shape": shape.name, "error": f"{type(error).__name__}: {str(error)[:300]}"})
            print(f"check failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
    print(f"{'shape':<20} {'T':>6} {'method':<10} {'fwd ms':>9} {'f+b ms':>10} {'fwd TFLOP/s':>15}"
          f" {'f+b TFLOP/s':>15} {'fwd GB/s':>15}", flush=True)
    later = []  # fla after ours: its first calls autotune for minutes
    for shape in shapes:
        for seq_len in lengths:
            inputs = delta_inputs(shape.batch, seq_len, shape.n_heads, shape.key_dim, shape.value_dim,
                                  per_channel(shape), device, dtype)
            io = inputs[0].element_size() * shape.batch * seq_len * shape.n_heads * (2 * shape.key_dim + 2 * shape.value_dim)
            flops = chunked_flops(shape, seq_len)
            bench.measure("triton", shape, seq_len, partial(_outputs, delta_rule, inputs), inputs, flops, io)
            if seq_len <= 8192:
                bench.measure("torch", shape, seq_len, partial(_outputs, delta_chunked, inputs), inputs, flops, io,
                              need_s=20.0)
            later.append((shape, seq_len, inputs, flops, io))
    for shape, seq_len, inputs, flops, io in later:
        op = fla.get("fla-kda" if per_channel(shape) else "fla-gdn")
        if op is not None:  # the same positional arguments (q, k, v, g, beta) and scale
            bench.measure("fla", shape, seq_len, partial(_outputs, op, inputs), inputs, flops, io, need_s=60.0)
    print(json.dumps(bench.report, indent=1))
    bench.save()


# ---------------------------------------------------------------- CPU


def _fla_naive(module: str):
    """fla's torch reference module, loaded from its file (fla's package __init__ pulls in its Triton kernels)."""
    spec = importlib.util.find_spec("fla")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("fla is not importable")
    path = os.path.join(spec.submodule_search_locations[0], *module.split("."), "naive.py")
    loaded = importlib.util.spec_from_file_location(f"_fla_naive_{module.replace('.', '_')}", path)
    naive = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(naive)
    return naive


def cpu_methods(channel: bool, report: dict) -> dict:
    """name -> fn(q, k, v, g, beta) -> o, for the CPU comparison."""
    methods = {
        "lctk chunked": lambda q, k, v, g, b: delta_chunked(q, k, v, g, b, scale=q.shape[-1] ** -0.5)[0],
        "lctk recurrence": lambda q, k, v, g, b: delta_recurrent(q, k, v, g, b, scale=q.shape[-1] ** -0.5)[0],
    }
    try:
        if channel:
            naive = _fla_naive("ops.kda")
            methods["fla naive chunk"] = lambda q, k, v, g, b: naive.naive_chunk_kda(q, k, v, g, b, chunk_size=64)[0]
            methods["fla naive recurrent"] = lambda q, k, v, g, b: naive.naive_recurrent_kda(q, k, v, g, b)[0]
        else:
            naive = _fla_naive("ops.gated_delta_rule")
            methods["fla naive chunk"] = lambda q, k, v, g, b: naive.naive_chunk_gated_delta_rule(q, k, v, g, b)[0]
            methods["fla naive recurrent"] = lambda q, k, v, g, b: naive.naive_recurrent_gated_delta_rule(q, k, v, b,
                                                                                                           g)[0]
        report["available"]["fla"] = "ok"
    except Exception as error:
        report["available"]["fla"] = f"{type(error).__name__}: {str(error)[:200]}"
    return methods


def _timed(fn, inputs, grad) -> tuple[float, float]:
    """(wall s, process CPU s) of one forward + backward."""
    for x in inputs:
        x.grad = None
    wall, cpu = time.perf_counter(), time.process_time()
    torch.autograd.backward(fn(*inputs), grad)
    return time.perf_counter() - wall, time.process_time() - cpu


def cpu_main(args) -> None:
    heads, dim, repeats = 4, 64, 3
    report = {"device": "cpu", "threads": torch.get_num_threads(), "results": [], "available": {}}
    lengths = {"lctk chunked": (512, 2048, 8192), "lctk recurrence": (512,), "fla naive chunk": (512, 2048),
               "fla naive recurrent": (512,)}
    print(f"CPU, fp32, B=1, H={heads}, K=V={dim}, forward+backward, best of {repeats} interleaved, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    print(f"{'decay':<8} {'T':>6} {'method':<20} {'wall s':>9} {'cpu s':>9} {'cpu vs lctk chunked':>20} {'max rel err':>12}")
    for channel in (False, True):
        methods = cpu_methods(channel, report)
        for seq_len in (512, 2048, 8192):
            inputs = delta_inputs(1, seq_len, heads, dim, dim, channel, "cpu", torch.float32)
            grad = torch.randn(1, seq_len, heads, dim)
            names = [n for n in methods if seq_len in lengths[n]]
            best = {n: (float("inf"), float("inf")) for n in names}
            outputs = {n: methods[n](*inputs).detach() for n in names}
            for _ in range(repeats):
                for name in names:
                    best[name] = min(best[name], _timed(methods[name], inputs, grad), key=lambda t: t[1])
            ours = best["lctk chunked"][1]
            for name in names:
                error = ((outputs[name] - outputs["lctk chunked"]).abs().max()
                         / outputs["lctk chunked"].abs().max()).item()
                row = {"decay": "channel" if channel else "scalar", "T": seq_len, "method": name,
                       "wall_s": round(best[name][0], 4), "cpu_s": round(best[name][1], 4),
                       "cpu_vs_lctk_chunked": round(best[name][1] / ours, 2), "max_rel_error_vs_lctk_chunked": error}
                report["results"].append(row)
                print(f"{row['decay']:<8} {seq_len:>6} {name:<20} {row['wall_s']:>9.3f} {row['cpu_s']:>9.3f} "
                      f"{row['cpu_vs_lctk_chunked']:>19.2f}x {error:>12.1e}", flush=True)
    print(f"fla: {report['available'].get('fla')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU comparison: chunked vs recurrence vs fla's torch")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; runs on a CPU under TRITON_INTERPRET=1")
    parser.add_argument("--json", help="also write the JSON report here")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the GPU run (default 420)")
    args = parser.parse_args(argv)
    (cpu_main if args.cpu else gpu_main)(args)


if __name__ == "__main__":
    main()
