"""What each stage is measured by: quality against the teacher on held-out rows, inference-state size, speed, and
passkey retrieval (through `lctk.evals`), plus the report and the quality-vs-replaced-layers plot.

Quality, over held-out rows (every position predicts the next token; teacher and student see the same rows):
    kl_rev = mean_t KL(q_t || p_t), kl_fwd = mean_t KL(p_t || q_t)      q student, p teacher, temperature 1
    ppl    = exp(mean next-token cross-entropy), for the teacher and the student
    top1   = share of positions where the student's argmax equals the teacher's
Cache size: sum over layers of `state_size(L)` elements x 2 bytes (a bf16 inference cache), batch 1.
Speed: batch 1, one prefill of `prefill` tokens, then `decode` single-token steps through a cache allocated once for
all of them (lctk.models.preallocated_cache: a StaticCache for the teacher), greedy, each timed after a short
warm-up; tokens/s. Student and teacher are timed in alternation (best of 2 each) and the table
shows the ratio too, since absolute figures on a shared machine move with its load.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from lctk.distill.losses import model_inputs, target_mask, token_kl
from lctk.labels import shifted_targets
from lctk.models.cache import preallocated_cache
from lctk.train.losses import token_ce

CACHE_BYTES_PER_ELEMENT = 2


@torch.no_grad()
def quality(student, teacher, batches: Iterable[dict]) -> dict[str, float]:
    """Held-out figures over collated rows (input_ids, position_ids, labels); see the module doc."""
    sums = dict.fromkeys(("kl_rev", "kl_fwd", "ce_student", "ce_teacher", "top1"), 0.0)
    count = 0.0
    for batch in batches:
        mask, targets = target_mask(batch), shifted_targets(batch["labels"])
        inputs = model_inputs(batch)
        ours, theirs = student(**inputs, use_cache=False).logits, teacher(**inputs, use_cache=False).logits
        per_position = {
            "kl_rev": token_kl(ours, theirs, "reverse_kl"),
            "kl_fwd": token_kl(ours, theirs, "forward_kl"),
            "ce_student": token_ce(ours, targets),
            "ce_teacher": token_ce(theirs, targets),
            "top1": (ours.argmax(-1) == theirs.argmax(-1)).float(),
        }
        for name, values in per_position.items():
            sums[name] += float((values * mask).sum())
        count += float(mask.sum())
    means = {name: total / max(count, 1.0) for name, total in sums.items()}
    return {
        "kl_rev": means["kl_rev"],
        "kl_fwd": means["kl_fwd"],
        "ppl_student": math.exp(means["ce_student"]),
        "ppl_teacher": math.exp(means["ce_teacher"]),
        "top1": means["top1"],
    }


def cache_bytes(model, seq_len: int) -> int:
    return sum(model.state_size(seq_len)) * CACHE_BYTES_PER_ELEMENT


def speed_against(student, teacher, prefill: int = 256, decode: int = 16, rounds: int = 2) -> dict[str, float]:
    """The student's prefill and decode tokens/s and their ratios to the teacher's, both timed in alternation
    (best of `rounds` each), so that a shared, busy machine slows both alike."""
    best: dict[str, dict[str, float]] = {"student": {}, "teacher": {}}
    for _ in range(rounds):
        for name, model in (("teacher", teacher), ("student", student)):
            for key, value in speed(model, model.config.vocab_size, prefill, decode).items():
                best[name][key] = max(best[name].get(key, 0.0), value)
    ours, theirs = best["student"], best["teacher"]
    return {
        **ours,
        "prefill_vs_teacher": ours["prefill_tok_s"] / theirs["prefill_tok_s"],
        "decode_vs_teacher": ours["decode_tok_s"] / theirs["decode_tok_s"],
    }


@torch.no_grad()
def speed(model, vocab_size: int, prefill: int = 256, decode: int = 16, seed: int = 0) -> dict[str, float]:
    """Prefill and decode tokens/s at batch 1 (see the module doc)."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (1, prefill), generator=generator).to(device)
    was_training = model.training
    model.eval()
    model(ids[:, :8], use_cache=True)  # warm-up
    start = time.perf_counter()
    out = model(ids, use_cache=True, cache=preallocated_cache(model, 1, prefill + decode))
    prefill_s = time.perf_counter() - start
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(decode):
        out = model(token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    decode_s = time.perf_counter() - start
    model.train(was_training)
    return {"prefill_tok_s": prefill / prefill_s, "decode_tok_s": decode / decode_s}


COLUMNS = (
    ("stage", "stage", "{}"),
    ("replaced", "replaced", "{}"),
    ("attention_layers", "attn layers", "{}"),
    ("kl_rev", "KL(s‖t)", "{:.4f}"),
    ("kl_fwd", "KL(t‖s)", "{:.4f}"),
    ("ppl_teacher", "ppl teacher", "{:.2f}"),
    ("ppl_student", "ppl student", "{:.2f}"),
    ("top1", "top-1 agree", "{:.3f}"),
    ("cache_mib_8k", "cache MiB 8K", "{:.1f}"),
    ("cache_mib_32k", "cache MiB 32K", "{:.1f}"),
    ("prefill_tok_s", "prefill tok/s", "{:.0f}"),
    ("prefill_vs_teacher", "prefill vs teacher", "{:.2f}x"),
    ("decode_tok_s", "decode tok/s", "{:.1f}"),
    ("decode_vs_teacher", "decode vs teacher", "{:.2f}x"),
)


def markdown_table(rows: Sequence[dict]) -> str:
    passkeys = sorted({key for row in rows for key in row if key.startswith("passkey_")}, key=_passkey_order)
    columns = [*COLUMNS[:8], *((key, key.replace("_", " "), "{:.0f}%") for key in passkeys), *COLUMNS[8:]]
    present = [c for c in columns if any(c[0] in row for row in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in present) + " |", "|" + "---|" * len(present)]
    for row in rows:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "-" for key, _, fmt in present]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _passkey_order(key: str) -> float:
    """passkey_1x < passkey_2x < passkey_4096 (a length in tokens) by the number in the key."""
    number = key.removeprefix("passkey_").removesuffix("x")
    return float(number) if number.isdigit() else float("inf")


def plot_quality(rows: Sequence[dict], path: Path) -> None:
    """Quality against the number of replaced layers: KL (left axis), top-1 agreement and passkey (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    replaced = [row["replaced"] for row in rows]
    fig, left = plt.subplots(figsize=(6, 4))
    left.plot(replaced, [row["kl_rev"] for row in rows], "o-", color="tab:red", label="KL(student || teacher)")
    left.set_xlabel("attention layers replaced")
    left.set_ylabel("held-out KL (nats/token)")
    right = left.twinx()
    right.plot(replaced, [row["top1"] * 100 for row in rows], "s--", color="tab:blue", label="top-1 agreement %")
    passkeys = sorted({key for row in rows for key in row if key.startswith("passkey_")}, key=_passkey_order)
    if passkeys and all(row.get(passkeys[0]) is not None for row in rows):
        label = passkeys[0].replace("_", " ")
        right.plot(replaced, [row[passkeys[0]] for row in rows], "^:", color="tab:green", label=f"{label} %")
    right.set_ylabel("%")
    right.set_ylim(0, 105)
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles, [h.get_label() for h in handles], loc="center left", fontsize=8)
    left.set_title("distillation: quality vs replaced layers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(run_dir: Path, rows: Sequence[dict], title: str, notes: Sequence[str] = ()) -> Path:
    """report.md with the stage table and the plot; stages.json with the same rows."""
    (run_dir / "stages.json").write_text(json.dumps(list(rows), indent=2) + "\n")
    plot_quality(rows, run_dir / "quality.png")
    lines = [f"# {title}", "", markdown_table(rows), "", "![quality vs replaced layers](quality.png)", ""]
    for row in rows:
        if row.get("pattern"):
            lines.append(f"- stage {row['stage']}: pattern `{row['pattern']}`" + (f", student in `{row['path']}`" if row.get("path") else ""))
    lines.extend(["", *notes])
    path = run_dir / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
