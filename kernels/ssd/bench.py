"""GPU benchmark of the SSD op (`make bench-gpu`): `python -m lctk.kernels.ssd.bench [--smoke] [--json PATH]`.

Times forward and forward+backward, bf16, for
  triton     our kernels (lctk.kernels.ssd on CUDA tensors)
  torch      the torch reference (reference.py), only up to T = 8K
  sdpa       torch SDPA causal attention, flash backend, q/k/v [B, H, T, 64]: the attention it replaces
  fla        fla's chunk_simple_gla (same op, scalar decay per head), if `fla` imports
  mamba_ssm  mamba_ssm's mamba_chunk_scan_combined (Mamba-2 shapes), if its Triton ops import
at B = 4, H = 16 value heads of dim 64 and T = 2K, 8K, 32K, for three shapes: linear attention with decay
(K = V = 64, 16 q/k heads) and Mamba-2 (one q/k group, state K = 64 or 128). Prints a table and then one JSON
document; --json also writes it (after every measurement, so a run cut short keeps what it measured).

Work counted for TFLOP/s: chunked forward = B T (Hk 2 L K + H (2 L V + 4 K V)) with chunk L = 64 (the products
our kernels compute), attention forward = 2 B H T^2 D (causal half of 4 B H T^2 D); forward+backward = 3x the
forward for both. GB/s counts the unavoidable traffic: reading the inputs and writing the outputs once (and for
the backward also reading them again with do and writing the gradients). Peaks come from the card's name.
Needs only torch and triton; import fla/mamba_ssm failures are reported, not fatal. A deadline keeps the whole run
under --budget seconds (default 420): what does not fit is skipped and listed.

--smoke runs tiny sizes on whatever device there is (on a CPU: the Triton interpreter, TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import ssd
from .reference import ssd_chunked

# dense bf16 TFLOP/s and memory TB/s by card name (the first match wins)
PEAKS = [("H200", 989.0, 4.8), ("H100 PCIe", 756.0, 2.0), ("H100", 989.0, 3.35), ("A100", 312.0, 2.0), ("L40S", 362.0, 0.86)]


@dataclass
class Shape:
    name: str
    batch: int
    n_heads: int
    n_groups: int
    key_dim: int
    value_dim: int


SHAPES = [
    Shape("linear-attn K=V=64", 4, 16, 16, 64, 64),
    Shape("mamba2 state=64", 4, 16, 1, 64, 64),
    Shape("mamba2 state=128", 4, 16, 1, 128, 64),
]
LENGTHS = [2048, 8192, 32768]
SMOKE_SHAPES = [Shape("smoke", 1, 2, 1, 16, 16)]
SMOKE_LENGTHS = [40]


class Bench:
    def __init__(self, device: torch.device, budget_s: float, json_path: str | None, smoke: bool):
        self.device, self.json_path, self.smoke = device, json_path, smoke
        self.deadline = time.monotonic() + budget_s
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        peak = next(((f, b) for key, f, b in PEAKS if key in name), (None, None))
        self.report = {"device": name, "peak_tflops": peak[0], "peak_tbps": peak[1], "results": [], "skipped": [],
                       "available": {}, "checks": []}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def time_ms(self, fn, grads: list[torch.Tensor]) -> float:
        if self.device.type != "cuda":
            start = time.perf_counter()
            fn()
            return 1000 * (time.perf_counter() - start)
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=50, grad_to_none=grads)

    def measure(self, method: str, shape: Shape, seq_len: int, run, inputs: list[torch.Tensor], flops: float,
                io_bytes: float, need_s: float = 5.0) -> None:
        entry = dict(method=method, shape=shape.name, T=seq_len, B=shape.batch, H=shape.n_heads, Hk=shape.n_groups,
                     K=shape.key_dim, V=shape.value_dim)
        if self.left() < need_s:
            self.report["skipped"].append({**entry, "why": "time budget"})
            return
        try:
            out = run()
            grad_out = [torch.randn_like(x) for x in out]
            fwd = self.time_ms(lambda: run(), [])

            def fwd_bwd():
                torch.autograd.backward(run(), grad_out)

            both = self.time_ms(fwd_bwd, inputs)
        except Exception as error:  # a method that cannot run here is reported, not fatal
            self.report["skipped"].append({**entry, "why": f"{type(error).__name__}: {str(error)[:200]}"})
            print(f"  skipped {method} {shape.name} T={seq_len}: {type(error).__name__}: {str(error)[:200]}", flush=True)
            return
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        entry.update(fwd_ms=fwd, fwd_bwd_ms=both,
                     fwd_tflops=flops / fwd / 1e9, fwd_bwd_tflops=3 * flops / both / 1e9,
                     fwd_gbps=io_bytes / fwd / 1e6, fwd_bwd_gbps=2.5 * io_bytes / both / 1e6)
        self.report["results"].append(entry)
        self.print_row(entry)
        self.save()

    def print_row(self, e: dict) -> None:
        peak_f, peak_b = self.report["peak_tflops"], self.report["peak_tbps"]
        of_peak = lambda x, p: f" ({100 * x / p:4.1f}%)" if p else ""  # noqa: E731
        print(
            f"{e['shape']:<20} {e['T']:>6} {e['method']:<10} {e['fwd_ms']:>9.3f} {e['fwd_bwd_ms']:>10.3f}"
            f" {e['fwd_tflops']:>8.1f}{of_peak(e['fwd_tflops'], peak_f)} {e['fwd_bwd_tflops']:>8.1f}"
            f"{of_peak(e['fwd_bwd_tflops'], peak_f)} {e['fwd_gbps']:>8.0f}{of_peak(e['fwd_gbps'] / 1000, peak_b)}",
            flush=True,
        )

    def save(self) -> None:
        if self.json_path:
            with open(self.json_path, "w") as f:
                json.dump(self.report, f, indent=1)


def chunked_flops(shape: Shape, seq_len: int, chunk: int = 64) -> float:
    per_token = shape.n_groups * 2 * chunk * shape.key_dim
    per_token += shape.n_heads * (2 * chunk * shape.value_dim + 4 * shape.key_dim * shape.value_dim)
    return shape.batch * seq_len * per_token


def ssd_inputs(shape: Shape, seq_len: int, device, dtype=torch.bfloat16):
    gen = torch.Generator(device=device).manual_seed(0)
    qk = (shape.batch, seq_len, shape.n_groups, shape.key_dim)
    scale = shape.key_dim**-0.5
    q = (scale * torch.randn(*qk, device=device, generator=gen)).to(dtype).requires_grad_()
    k = (scale * torch.randn(*qk, device=device, generator=gen)).to(dtype).requires_grad_()
    v = torch.randn(shape.batch, seq_len, shape.n_heads, shape.value_dim, device=device, generator=gen).to(dtype)
    g = F.logsigmoid(torch.randn(shape.batch, seq_len, shape.n_heads, device=device, generator=gen) + 4)
    return q, k, v.requires_grad_(), g.requires_grad_()


def import_optional(report: dict) -> dict:
    """fla's chunk_simple_gla and mamba_ssm's mamba_chunk_scan_combined, where they import."""
    found = {}
    try:
        found["fla"] = importlib.import_module("fla.ops.simple_gla").chunk_simple_gla
        report["available"]["fla"] = "ok"
    except Exception as error:
        report["available"]["fla"] = f"{type(error).__name__}: {str(error)[:200]}"
    try:
        try:
            module = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
        except ImportError as error:
            # mamba_ssm built without its CUDA extension: its package __init__ fails, the Triton ops need only triton
            spec = importlib.util.find_spec("mamba_ssm")
            if spec is None or spec.submodule_search_locations is None:
                raise error
            for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
                del sys.modules[name]
            package = types.ModuleType("mamba_ssm")
            package.__path__ = list(spec.submodule_search_locations)
            sys.modules["mamba_ssm"] = package
            module = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
        found["mamba_ssm"] = module.mamba_chunk_scan_combined
        report["available"]["mamba_ssm"] = "ok"
    except Exception as error:
        report["available"]["mamba_ssm"] = f"{type(error).__name__}: {str(error)[:200]}"
    return found


def check_against_reference(bench: Bench, shape: Shape, seq_len: int, dtype: torch.dtype) -> None:
    """Our Triton output and gradients vs the torch reference on the same inputs (a sanity check, not a test)."""
    q, k, v, g = ssd_inputs(shape, seq_len, bench.device, dtype)
    results = []
    for fn in (lambda: ssd(q, k, v, g, chunk_size=64)[0], lambda: ssd_chunked(q, k, v, g, chunk_size=64)[0]):
        o = fn()
        grads = torch.autograd.grad(o.float().square().sum(), (q, k, v, g))
        results.append([o, *grads])
    errors = {
        name: ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()
        for name, a, b in zip(["o", "dq", "dk", "dv", "dg"], *results)
    }
    bench.report["checks"].append({"shape": shape.name, "T": seq_len, "max_rel_error_vs_torch": errors})
    print(f"check {shape.name} T={seq_len}: triton vs torch reference, max relative error "
          + ", ".join(f"{n} {e:.1e}" for n, e in errors.items()), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; runs on a CPU under TRITON_INTERPRET=1")
    parser.add_argument("--json", help="also write the JSON report here")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run (default 420)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        if not args.smoke or os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("error: no CUDA device; on a CPU run `TRITON_INTERPRET=1 python -m lctk.kernels.ssd.bench --smoke`")
        os.environ["LCTK_KERNELS"] = "triton"  # the interpreter on CPU tensors
    bench = Bench(device, args.budget, args.json, args.smoke)
    shapes, lengths = (SMOKE_SHAPES, SMOKE_LENGTHS) if args.smoke else (SHAPES, LENGTHS)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    optional = import_optional(bench.report)
    print(f"device: {bench.report['device']}; peaks bf16 {bench.report['peak_tflops']} TFLOP/s, "
          f"{bench.report['peak_tbps']} TB/s; optional: {bench.report['available']}", flush=True)
    try:
        check_against_reference(bench, shapes[0], lengths[0], dtype)
    except Exception as error:  # reported; the timings still run
        bench.report["checks"].append({"error": f"{type(error).__name__}: {str(error)[:300]}"})
        print(f"check failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
    print(f"{'shape':<20} {'T':>6} {'method':<10} {'fwd ms':>9} {'f+b ms':>10} {'fwd TFLOP/s':>15}"
          f" {'f+b TFLOP/s':>15} {'fwd GB/s':>15}", flush=True)

    later = []  # third-party methods run after ours, as their first calls autotune for minutes
    for shape in shapes:
        for seq_len in lengths:
            q, k, v, g = ssd_inputs(shape, seq_len, device, dtype)
            elem = q.element_size()
            io = elem * shape.batch * seq_len * (2 * shape.n_groups * shape.key_dim + 2 * shape.n_heads * shape.value_dim)
            io += 4 * shape.batch * seq_len * shape.n_heads
            flops = chunked_flops(shape, seq_len)
            inputs = [q, k, v, g]
            bench.measure("triton", shape, seq_len, lambda x=inputs: (ssd(*x)[0],), inputs, flops, io)
            if seq_len <= 8192:
                bench.measure("torch", shape, seq_len, lambda x=inputs: (ssd_chunked(*x)[0],), inputs, flops, io,
                              need_s=20.0)
            if shape.n_groups == shape.n_heads and device.type == "cuda":
                measure_sdpa(bench, shape, seq_len, dtype)
            later.append((shape, seq_len))
    for shape, seq_len in later:
        q, k, v, g = ssd_inputs(shape, seq_len, device, dtype)
        io = q.element_size() * shape.batch * seq_len * (2 * shape.n_groups * shape.key_dim + 2 * shape.n_heads * shape.value_dim)
        flops = chunked_flops(shape, seq_len)
        if "mamba_ssm" in optional and shape.n_groups < shape.n_heads:
            measure_mamba(bench, optional["mamba_ssm"], shape, seq_len, q, k, v, g, flops, io)
        if "fla" in optional:
            measure_fla(bench, optional["fla"], shape, seq_len, q, k, v, g, flops, io)
    print(json.dumps(bench.report, indent=1))
    bench.save()


def measure_sdpa(bench: Bench, shape: Shape, seq_len: int, dtype) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device=bench.device).manual_seed(0)
    q, k, v = (torch.randn(shape.batch, shape.n_heads, seq_len, shape.value_dim, device=bench.device, generator=gen)
               .to(dtype).requires_grad_() for _ in range(3))
    flops = 2 * shape.batch * shape.n_heads * seq_len**2 * shape.value_dim
    io = 4 * q.numel() * q.element_size()

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return (F.scaled_dot_product_attention(q, k, v, is_causal=True),)

    bench.measure("sdpa", shape, seq_len, run, [q, k, v], flops, io)


def measure_fla(bench: Bench, chunk_simple_gla, shape, seq_len, q, k, v, g, flops, io) -> None:
    """fla has no q/k groups: the groups are expanded to every head first (outside the timing)."""
    repeat = shape.n_heads // shape.n_groups
    qh, kh = (x.detach().repeat_interleave(repeat, dim=2).requires_grad_() for x in (q, k))

    def run():
        return (chunk_simple_gla(q=qh, k=kh, v=v, g=g, scale=1.0)[0],)

    bench.measure("fla", shape, seq_len, run, [qh, kh, v, g], flops, io, need_s=60.0)


def measure_mamba(bench: Bench, scan, shape, seq_len, q, k, v, g, flops, io) -> None:
    """mamba_chunk_scan_combined(x, dt, A, B, C) is our op with q = C, k = B, v = x * dt, g = A * dt: fed
    x = v, dt = -g, A = -1, B = k, C = q it does the same work on the same shapes."""
    dt = (-g).detach().clamp(min=1e-4).requires_grad_()
    A = -torch.ones(shape.n_heads, device=bench.device)

    def run():
        return (scan(v, dt, A, k, q, chunk_size=64),)

    bench.measure("mamba_ssm", shape, seq_len, run, [q, k, v, dt], flops, io, need_s=60.0)


if __name__ == "__main__":
    main()
