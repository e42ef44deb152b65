"""One Mamba-2 layer, forward + backward on this CPU: lctk's mixer vs transformers' Mamba2Mixer (its torch fallback,
the path it takes without mamba_ssm), same shapes and weights. Batch 1, hidden 256 (d_inner 512, 8 heads of 64,
state 64, one group, chunk 64), fp32.

Peak memory is measured in a fresh process per case, on its first fwd+bwd: the rise of the resident set's
high-water mark (ru_maxrss) over the resident size just before that call, i.e. the call's own working memory.
Times are the best of a few calls after it.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

LENGTHS = (2048, 8192)
REPEATS = 3


def _layers(hidden: int = 256, their_chunk: int | None = None):
    import torch
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    from lctk import HybridConfig
    from lctk.models.mixers.mamba2 import Mamba2

    config = HybridConfig(pattern="M", hidden_size=hidden, num_attention_heads=4, vocab_size=256)
    s = config.mamba2
    ours = Mamba2(config, "M")
    theirs = Mamba2Mixer(
        Mamba2Config(
            hidden_size=hidden, state_size=s["state_size"], head_dim=s["head_dim"], n_groups=s["n_groups"],
            expand=s["expand"], num_heads=ours.num_heads, conv_kernel=s["conv_kernel"],
            chunk_size=their_chunk or s["chunk_size"],
            use_conv_bias=True, use_bias=False,
        ),
        layer_idx=0,
    )
    with torch.no_grad():
        theirs.load_state_dict(
            {
                "in_proj.weight": ours.in_proj.weight, "conv1d.weight": ours.conv_weight.unsqueeze(1),
                "conv1d.bias": ours.conv_bias, "dt_bias": ours.dt_bias, "A_log": ours.A_log, "D": ours.D,
                "norm.weight": ours.norm.weight, "out_proj.weight": ours.out_proj.weight,
            }
        )
    return ours, theirs


def _case(impl: str, length: int) -> dict:
    """Runs in a child process: time and working memory of fwd+bwd for one implementation and length."""
    import torch

    from lctk.models.sequence import build_sequence_info

    torch.manual_seed(0)
    ours, theirs = _layers(their_chunk=256 if impl == "transformers-chunk256" else None)
    layer = ours if impl == "lctk" else theirs
    layer.train()
    x = torch.randn(1, length, 256, requires_grad=True)
    seq = build_sequence_info(1, length, 0, x.device)

    def step():
        out = layer(x, seq) if impl == "lctk" else layer(x)
        out.float().pow(2).mean().backward()

    rss_before = _rss_kib()
    step()
    peak_rise = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    layer.zero_grad(set_to_none=True)
    x.grad = None
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        layer.zero_grad(set_to_none=True)
        x.grad = None
    return {"seconds": min(times), "peak_mib": max(peak_rise, 0) / 1024}


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def _run_isolated(impl: str, length: int) -> dict:
    code = f"import json; from lctk.bench.model import _case; print(json.dumps(_case({impl!r}, {length})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run() -> None:
    import torch

    print(
        f"Mamba-2 layer fwd+bwd, batch 1, hidden 256, fp32, {torch.get_num_threads()} threads, best of {REPEATS}; "
        "HF = transformers' Mamba2Mixer torch fallback at our chunk size 64 (and at its default 256)"
    )
    print(
        f"{'T':>6} | {'lctk s':>7} {'HF s':>7} {'HF256 s':>8} {'speed-up':>9} {'vs 256':>7} | "
        f"{'lctk MiB':>9} {'HF MiB':>7} {'HF256 MiB':>9} {'mem ratio':>9}"
    )
    rows = []
    for length in LENGTHS:
        ours, theirs = _run_isolated("lctk", length), _run_isolated("transformers", length)
        theirs256 = _run_isolated("transformers-chunk256", length)
        row = {
            "T": length, "lctk": ours, "transformers": theirs, "transformers_chunk256": theirs256,
            "speedup": theirs["seconds"] / ours["seconds"],
            "speedup_vs_chunk256": theirs256["seconds"] / ours["seconds"],
            "mem_ratio": ours["peak_mib"] / max(theirs["peak_mib"], 1e-9),
        }
        rows.append(row)
        print(
            f"{length:>6} | {ours['seconds']:>7.3f} {theirs['seconds']:>7.3f} {theirs256['seconds']:>8.3f} "
            f"{row['speedup']:>8.2f}x {row['speedup_vs_chunk256']:>6.2f}x | {ours['peak_mib']:>9.0f} "
            f"{theirs['peak_mib']:>7.0f} {theirs256['peak_mib']:>9.0f} {row['mem_ratio']:>9.2f}"
        )
    print(json.dumps({"mamba2_layer": rows}))
