"""The token store at growing corpus sizes: `python -m lctk.bench data` (10M and 100M tokens), or
`python -m lctk.bench.data --sizes 10M,100M,1B` (the 1B corpus takes about 4 GB of disk for its jsonl and 2 GB for
the store).

For each size N, a local corpus of N tokens is written as jsonl shards of spans of the builtin text (random spans of
random documents, shuffled; no network), with a byte-level BPE of 32K tokens trained on the builtin text. Then, each
in a fresh process:
  1. build: `token_store` from the folder (streaming, encode_batch on all cores, shards written to disk): tokens/s
     and peak RSS; the encode calls are also timed inside the build, so the rest (reading, conversion, writing: one
     thread) is known, and `RECIPE_TOKENS` on `CORES` cores is estimated as that rest plus the encode CPU time over
     the cores (the encoding scales with cores; the rest does not);
  2. tokenizers alone: the same documents in the same batches through the tokenizers library's own `encode_batch`
     and `encode_batch_fast` (which the store uses: no character offsets), alternating batch by batch; only the
     encode calls are timed, reading is not. The ratios show what the pipeline adds (or saves);
  3. read: reopen the store as a training process does (rows of 4096 tokens, 1% held out) and read ROWS random rows:
     time to the first row (a store of up to EAGER_BYTES of ids is checked whole at open), peak RSS;
  4. verify (same process, after the reads): the checksums of every block checked in one pass (MB/s), beside crc32
     and blake2b over the same blocks; the same ROWS rows read from a store checked lazily (each block the first time
     a row reads from it) and from one not checked at all, alternating row by row, so the difference is what the
     first touch of each block costs; and one training step (forward, backward, AdamW) of the quickstart model on one
     row of SEQ_LEN tokens, for the share of a step that checking takes: lazily (a first pass over fresh blocks, the
     worst case: one row per step) and at open (the whole store once per process, spread over an epoch of its rows).
Throughput is given per second of wall time and per second of CPU time (all threads of the process): on a machine
shared with other jobs the CPU-time ratio is the steadier one. Peak RSS comes from getrusage and includes the
imports (torch and transformers, through `import lctk`); the peak right after the imports is shown beside it, so what
the data adds is the difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = ("10M", "100M")
VOCAB = 32000
SEQ_LEN = 4096
ROWS = 1000
SHARD_CHARS = 1 << 28  # characters per generated jsonl shard
SPAN_CHARS = (400, 20000)
RECIPE_TOKENS, CORES = 2.5e9, 32  # recipes/hybrid-150m.yaml's text, on a 32-core node


def run(sizes: tuple[str, ...] = SIZES, stages: tuple[str, ...] = ("build", "tokenizers", "read")) -> None:
    from lctk.sizes import parse_size

    work = Path(tempfile.mkdtemp(prefix="lctk-bench-data-"))
    try:
        tokenizer_dir = work / "tokenizer"
        chars_per_token = _tokenizer(tokenizer_dir)
        print(f"byte-level BPE, {VOCAB} tokens, {chars_per_token:.2f} characters per token on the builtin text; "
              f"rows of {SEQ_LEN} tokens", flush=True)
        if "tokenizers" in stages:
            print(f"{'N':>6} | {'build tok/s':>11} | {'encode_batch':>12} | {'_fast':>6} | {'ratio':>5} | {'ratio _fast':>11} | "
                  f"{'CPU ratio':>9} | {'CPU _fast':>9} | {'build peak RSS':>14} | {'reader peak RSS':>15} | "
                  f"{'(at imports)':>12} | {'first row':>9} | {'row':>7} | {'disk B/token':>12}")
        for size in sizes:
            corpus, cache = work / "corpus", work / "cache"
            _write_corpus(corpus, int(parse_size(size, base=1000) * chars_per_token))
            build = _child("build", corpus, tokenizer_dir, cache)
            if "tokenizers" not in stages:  # the table needs it; only the checksum figures below are printed
                read = _child("read", corpus, tokenizer_dir, cache)
                _print_checks(size, build, read)
                shutil.rmtree(corpus)
                shutil.rmtree(cache)
                continue
            alone = _child("tokenizers", corpus, tokenizer_dir, cache)
            read = _child("read", corpus, tokenizer_dir, cache)
            rates = {name: build["tokens"] / build[name] for name in ("seconds", "cpu_seconds")}
            wall = [alone["tokens"] / alone[f"{name}_seconds"] for name in ("encode_batch", "encode_batch_fast")]
            cpu = [alone["tokens"] / alone[f"{name}_cpu_seconds"] for name in ("encode_batch", "encode_batch_fast")]
            print(f"{size:>6} | {rates['seconds'] / 1e6:>10.2f}M | {wall[0] / 1e6:>11.2f}M | {wall[1] / 1e6:>5.2f}M | "
                  f"{rates['seconds'] / wall[0]:>5.2f} | {rates['seconds'] / wall[1]:>11.2f} | "
                  f"{rates['cpu_seconds'] / cpu[0]:>9.2f} | {rates['cpu_seconds'] / cpu[1]:>9.2f} | "
                  f"{_mib(build['peak_rss']):>14} | {_mib(read['peak_rss']):>15} | {_mib(read['peak_rss_at_imports']):>12} | "
                  f"{read['first_row_s']:>8.3f}s | {read['row_ms']:>5.2f}ms | {build['disk_bytes'] / build['tokens']:>12.3f}",
                  flush=True)
            rest = (build["seconds"] - build["encode_seconds"]) / build["tokens"]
            encode = build["encode_cpu_seconds"] / build["tokens"]
            print(f"{'':>6}   per 1M tokens: {rest * 1e6:.2f} s outside encoding, {encode * 1e6:.2f} CPU-s encoding "
                  f"-> {RECIPE_TOKENS / 1e9:g}B tokens on {CORES} cores: {RECIPE_TOKENS * (rest + encode / CORES) / 3600:.2f} h",
                  flush=True)
            _print_checks(size, build, read)
            shutil.rmtree(corpus)
            shutil.rmtree(cache)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _print_checks(size: str, build: dict, read: dict) -> None:
    rates = {name: read["store_bytes"] / read[f"{name}_s"] / 1e6 for name in ("xxh3", "crc32", "blake2b")}
    lazy_ms = read["lazy_row_ms"] - read["unchecked_row_ms"]
    epoch_s = build["tokens"] / SEQ_LEN * read["step_s"]  # one row per step: the step time per row
    print(f"{size:>6}   checksums: xxh3 {rates['xxh3']:.0f} MB/s (crc32 {rates['crc32']:.0f}, blake2b "
          f"{rates['blake2b']:.0f}) over {build['tokens'] / 1e6:.1f}M tokens, {read['store_bytes'] / 1e6:.0f} MB in "
          f"{read['blocks']} blocks: "
          f"{read['check_all_s']:.3f} s per process to check the whole store | lazily: {read['lazy_row_ms']:.3f} ms/row against "
          f"{read['unchecked_row_ms']:.3f} unchecked, {lazy_ms:+.3f} ms on a first pass | one training step of the "
          f"quickstart model on a {SEQ_LEN}-token row: {read['step_s']:.3f} s -> lazily {lazy_ms / 1e3 / read['step_s']:.4%} "
          f"of a step, at open {read['check_all_s'] / epoch_s:.5%} of an epoch", flush=True)


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


def _tokenizer(folder: Path) -> float:
    """Trains and saves the benchmark's tokenizer; returns the characters per token of the builtin text."""
    from lctk.data.tokenizer import build_tokenizer
    from lctk.tasks.corpus import builtin_documents

    documents = builtin_documents()
    tokenizer = build_tokenizer(f"bpe:{VOCAB}", lambda: documents, folder.parent / "tokenizers")
    tokenizer.save_pretrained(folder)
    tokens = sum(len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch_fast(list(documents)))
    return sum(map(len, documents)) / tokens


def _write_corpus(folder: Path, chars: int) -> None:
    """jsonl shards of random spans of the builtin documents, `chars` characters in all."""
    from lctk.tasks.corpus import builtin_documents

    documents = builtin_documents()
    rng = random.Random(0)
    folder.mkdir(parents=True)
    written, shards, shard = 0, 0, None
    while written < chars:
        if shard is None or shard.tell() > SHARD_CHARS:  # tell() counts JSON's escapes too: number shards apart
            if shard is not None:
                shard.close()
            shard = open(folder / f"shard-{shards:05d}.jsonl", "w")
            shards += 1
        document = rng.choice(documents)
        start = rng.randrange(len(document))
        span = document[start : start + rng.randint(*SPAN_CHARS)]
        shard.write(json.dumps({"text": span}) + "\n")
        written += len(span)
    shard.close()


def _child(stage: str, corpus: Path, tokenizer_dir: Path, cache: Path) -> dict:
    """Runs one stage in a fresh process; its figures are the last line it prints."""
    command = [sys.executable, "-m", "lctk.bench.data", "--stage", stage, str(corpus), str(tokenizer_dir), str(cache)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{stage} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _stage(stage: str, corpus: Path, tokenizer_dir: Path, cache: Path) -> dict:
    import numpy as np

    from lctk.data import store as store_module
    from lctk.data.packing import Pieces, TextRows, split_held_out
    from lctk.data.store import _char_batches, token_store
    from lctk.data.text import TextSource
    from lctk.data.tokenizer import load_local_tokenizer
    from lctk.recipe import Source

    tokenizer = load_local_tokenizer(str(tokenizer_dir))
    source = Source(text=str(corpus))
    figures = {"peak_rss_at_imports": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    started, cpu_started = time.perf_counter(), time.process_time()
    if stage == "build":
        store_module.encode_batch = _timed(store_module.encode_batch, figures, "encode")
        store = token_store(source, "bench", tokenizer, cache)
        figures |= {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started,
                    "tokens": store.tokens, "disk_bytes": sum(p.stat().st_size for p in store.path.iterdir())}
    elif stage == "tokenizers":
        figures["tokens"] = 0
        encoders = {name: _timed(getattr(tokenizer.backend_tokenizer, name), figures, name)
                    for name in ("encode_batch", "encode_batch_fast")}
        for batch in _char_batches(TextSource(source, "bench").batches()):
            for encode in encoders.values():  # the encodings are freed outside the timed call
                tokens = sum(len(e) for e in encode(batch, add_special_tokens=False))
            figures["tokens"] += tokens
    else:
        store = token_store(source, "bench", tokenizer, cache)
        train, _ = split_held_out(Pieces.cut(store, SEQ_LEN, tokenizer.eos_token_id), 0.01)
        rows = TextRows(train, SEQ_LEN, seed=0)
        indices = np.random.default_rng(0).integers(0, len(rows), ROWS)
        rows.row(int(indices[0]))
        figures["first_row_s"] = time.perf_counter() - started
        started = time.perf_counter()
        for index in indices[1:]:
            rows.row(int(index))
        figures["row_ms"] = (time.perf_counter() - started) / (ROWS - 1) * 1e3
        figures["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        figures |= _checks(store.path, indices, tokenizer.eos_token_id)
    figures.setdefault("peak_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return figures


def _checks(folder: Path, indices, eos: int) -> dict:
    """Checksum speed over the store's blocks, the cost of lazy checks per row, and a training step (see the module
    docstring)."""
    import zlib

    from lctk.data import store as store_module
    from lctk.data.packing import Pieces, TextRows, split_held_out

    store_module.EAGER_BYTES = 0  # open without checking: each measurement below decides what is checked
    checks = store_module.open_store(folder).checks
    blocks = [checks_of_shard.data[at : at + checks_of_shard.block_bytes] for checks_of_shard in checks
              for at in range(0, len(checks_of_shard.data), checks_of_shard.block_bytes)]
    figures = {"store_bytes": sum(len(block) for block in blocks), "blocks": len(blocks)}
    started = time.perf_counter()
    for checks_of_shard in checks:  # what a process does when it checks the whole store (maps its pages, too)
        checks_of_shard.check()
    figures["check_all_s"] = time.perf_counter() - started
    for name, checksum in (("xxh3", store_module.block_checksum), ("crc32", zlib.crc32),
                           ("blake2b", lambda block: hashlib.blake2b(block, digest_size=16).digest())):
        started = time.perf_counter()  # the pages are mapped by now: the checksums alone
        for block in blocks:
            checksum(block)
        figures[f"{name}_s"] = time.perf_counter() - started

    readers = {}
    for name in ("lazy", "unchecked"):
        store = store_module.open_store(folder)
        if name == "unchecked":
            store.checks = None
        train, _ = split_held_out(Pieces.cut(store, SEQ_LEN, eos), 0.01)
        readers[name] = TextRows(train, SEQ_LEN, seed=0)
        figures[f"{name}_row_ms"] = 0.0
    for index in indices:  # alternating, so that both see the same page cache and the same load
        for name, rows in readers.items():
            started = time.perf_counter()
            rows.row(int(index))
            figures[f"{name}_row_ms"] += (time.perf_counter() - started) * 1e3 / len(indices)
    figures["step_s"] = _training_step_s()
    return figures


def _training_step_s() -> float:
    """Median of 3 training steps (after one warm-up) of the quickstart model on one row of SEQ_LEN tokens, fp32."""
    import statistics

    import torch

    from lctk.models import HybridForCausalLM
    from lctk.recipe import load_recipe
    from lctk.train.trainer import causal_lm_loss

    recipe = load_recipe(Path(__file__).parents[2] / "recipes" / "quickstart.yaml", kind="train")
    model = HybridForCausalLM(recipe.hybrid_config(1024))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 1024, (1, SEQ_LEN))
    batch = {"input_ids": ids, "position_ids": torch.arange(SEQ_LEN)[None], "labels": ids}
    times = []
    for _ in range(4):
        started = time.perf_counter()
        causal_lm_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def _timed(function, figures: dict, name: str):
    """`function`, adding its wall and CPU seconds (all threads) to figures[name + "_seconds" / "_cpu_seconds"]."""
    figures[f"{name}_seconds"] = figures[f"{name}_cpu_seconds"] = 0.0

    def timed(*args, **kwargs):
        started, cpu_started = time.perf_counter(), time.process_time()
        result = function(*args, **kwargs)
        figures[f"{name}_seconds"] += time.perf_counter() - started
        figures[f"{name}_cpu_seconds"] += time.process_time() - cpu_started
        return result

    return timed


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help="corpus sizes in tokens, e.g. 10M,100M,1B")
    parser.add_argument("--skip-tokenizers", action="store_true",
                        help="build and read only (the checksum figures, without the table's tokenizer comparison)")
    parser.add_argument("--stage", choices=("build", "tokenizers", "read"), help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.stage:
        print(json.dumps(_stage(arguments.stage, *arguments.paths)))
    else:
        run(tuple(arguments.sizes.split(",")), ("build", "read") if arguments.skip_tokenizers else
            ("build", "tokenizers", "read"))
