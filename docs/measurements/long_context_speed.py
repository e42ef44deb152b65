"""Prefill / decode tokens/s and inference-state size at long lengths: SmolLM2-135M (the teacher's lctk copy) against
students with 8 and 15 of its 30 attention layers converted to Mamba-2 (speed and state size depend on the pattern,
not on training). Batch 1, fp32, one thread, each student timed in alternation with the teacher
(lctk.distill.evidence.speed_against). Usage: python docs/measurements/long_context_speed.py 2048 8192 32768
With --one-teacher the teacher is timed once per length, then each student (teacher, 8, 15: one teacher prefill fewer,
for lengths where a prefill takes many minutes), and each model's figures are printed as soon as it is timed."""

import glob
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from lctk.distill.convert import replace_layers, student_from_teacher
from lctk.distill.evidence import cache_bytes, speed, speed_against

torch.set_num_threads(1)
folder = glob.glob(str(Path.home() / ".cache/lctk/teachers/*/"))[0]
teacher = student_from_teacher(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)).requires_grad_(False)
students = {n: replace_layers(teacher, list(range(30 - n, 30)), "mamba2", "mil").eval() for n in (8, 15)}
one_teacher = "--one-teacher" in sys.argv
lengths = [int(n) for n in sys.argv[1:] if n != "--one-teacher"]
for length in lengths:
    sizes = ", ".join(f"{n} replaced {cache_bytes(s, length) / 2**20:.1f}" for n, s in students.items())
    print(f"state MiB at {length}: teacher {cache_bytes(teacher, length) / 2**20:.1f}, {sizes}", flush=True)
for length in lengths if one_teacher else []:
    start = time.perf_counter()
    theirs = speed(teacher, teacher.config.vocab_size, length, 8)
    print(f"{length} tokens, teacher: prefill {theirs['prefill_tok_s']:.1f} tok/s, decode {theirs['decode_tok_s']:.2f} tok/s "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    for n, student in students.items():
        start = time.perf_counter()
        r = speed(student, student.config.vocab_size, length, 8)
        print(f"{length} tokens, {n} replaced: prefill {r['prefill_tok_s']:.1f} tok/s "
              f"({r['prefill_tok_s'] / theirs['prefill_tok_s']:.2f}x), decode {r['decode_tok_s']:.2f} tok/s "
              f"({r['decode_tok_s'] / theirs['decode_tok_s']:.2f}x) ({time.perf_counter() - start:.0f} s)", flush=True)
for length in lengths if not one_teacher else []:
    for n, student in students.items():
        r = speed_against(student, teacher, prefill=length, decode=8, rounds=1)
        print(f"{length} tokens, {n} replaced: prefill {r['prefill_tok_s']:.0f} tok/s ({r['prefill_vs_teacher']:.2f}x), "
              f"decode {r['decode_tok_s']:.1f} tok/s ({r['decode_vs_teacher']:.2f}x)", flush=True)
