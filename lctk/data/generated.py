"""Teacher-generated text: a `generate:` source of a distill recipe, the teacher's own continuations of prompts cut
from a text source, stored in a token store (lctk.data.store) so that the student learns the teacher's distribution
(Apriel-H1 found its teacher's generations better distillation data than pretraining text).

    data:
      sources:
        - generate: {prompts: builtin, tokens: 2M, prompt_tokens: 32, max_new_tokens: 256, temperature: 1.0}

Prompts: the prompt text (builtin, or a local file / folder read as a `text:` source) goes through its own token
store, cut into pieces of data.seq_len and split into training and held-out pieces as a text source would be. Each
prompt is the first `prompt_tokens` tokens of a training piece (pieces in a seeded order, those not longer skipped,
cycling when more prompts are needed than there are pieces); the held-out pieces are the source's held-out rows, so
the distillation's evidence measures the student on corpus text it was never prompted with, not on generations.
A document of the store is a prompt followed by its continuation, up to (not including) the first end-of-text token
or `max_new_tokens` new tokens. There are ceil(tokens / max_new_tokens) prompts.

Generation: rows of one length (every prompt is `prompt_tokens` long, so no padding) in batches of `batch_size`
through transformers' `generate` with a cache allocated once (lctk.models.cache.preallocated_generation: a
StaticCache for Llama / Mistral / Qwen2) and explicit settings (the teacher's generation_config is not read, so a
repetition penalty in it changes nothing): greedy at temperature 0, else sampling with temperature, top_p, top_k.
Batch c is seeded with (seed, c), so what a batch holds does not depend on which process made it.

At scale: batch c of the prompts is made by process c mod N (accelerate's process index and count), each on its own
device, and saved as one file `<store>.chunks/chunk-<c>.npy` written aside and renamed; a killed build keeps its
finished batches and the next run (with any number of processes) makes only the missing ones. When all are there the
main process packs them, in batch order, into the store's shards (written aside and renamed, as every store), then
removes the chunks folder. Progress: a bar on the main process (its batches, tokens/s, ETA), then a summary line.

The store is keyed on what decides its tokens: the teacher's weights (Teacher.fingerprint), the
tokenizer, the prompt source's identity, data.seq_len and data.held_out (which pieces are prompts), and every
setting of the `generate:` section; changing any of them builds another store, an identical rerun reuses it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lctk.data.packing import Pieces, split_held_out
from lctk.data.store import (
    FORMAT_VERSION,
    MANIFEST,
    DamagedStore,
    ShardWriter,
    TokenStore,
    id_dtype,
    move_store_into_place,
    open_store,
    token_store,
)
from lctk.data.tokenizer import fingerprint
from lctk.errors import UserError, os_error_cause, os_error_of
from lctk.files import atomic_file, private_name, remove_dead_leftovers, scratch_folder

GENERATE_FORMAT = 1


@dataclass
class Teacher:
    """The model that generates, and the function that identifies its weights (the caller passes
    lctk.evals.fingerprints.weights_fingerprint: lctk.data does not import the evals), called only when a
    `generate:` source needs it."""

    model: Any
    identify: Callable[[Any], str]

    @functools.cached_property
    def fingerprint(self) -> str:
        return self.identify(self.model)


class GeneratedSource:
    """A `generate:` source of `data` (its recipe key `key`) for `teacher` and its tokenizer: the prompts, the held-out
    pieces of the prompt text and the store's identity."""

    def __init__(self, source, key: str, data, tokenizer, teacher: Teacher | None, cache_dir: Path):
        if teacher is None:
            raise UserError(f"{key}.generate: only a distill recipe has a teacher to generate from")
        self.settings, self.key, self.tokenizer, self.teacher = source.generate, key, tokenizer, teacher.model
        settings = self.settings
        prompt_source = settings.prompt_source()
        prompt_store = token_store(prompt_source, f"{key}.generate.prompts", tokenizer, cache_dir)
        train, self.held_out = split_held_out(Pieces.cut(prompt_store, data.seq_len, tokenizer.eos_token_id),
                                              data.held_out)
        eligible = np.flatnonzero(train.lengths > settings.prompt_tokens)  # longer: a prompt never ends a document
        if not len(eligible):
            raise UserError(f"{key}.generate.prompt_tokens: no piece of {settings.prompts} has "
                            f"{settings.prompt_tokens} tokens")
        self.prompt_pieces = train.take(np.random.default_rng(settings.seed).permutation(eligible))
        self.prompts = math.ceil(settings.tokens / settings.max_new_tokens)
        self.chunks = math.ceil(self.prompts / settings.batch_size)
        self.identity = {
            "generated": GENERATE_FORMAT, "format": FORMAT_VERSION, "teacher": teacher.fingerprint,
            "tokenizer": fingerprint(tokenizer), "prompts": prompt_store.path.name,
            "seq_len": data.seq_len, "held_out": data.held_out, "settings": settings.model_dump(mode="json"),
        }
        name = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = cache_dir / "stores" / name
        self.work = self.folder.with_name(f"{name}.chunks")

    def prompt_batch(self, chunk: int) -> torch.Tensor:
        size = self.settings.batch_size
        rows = range(chunk * size, min((chunk + 1) * size, self.prompts))
        count = len(self.prompt_pieces)
        return torch.tensor(np.stack([self.prompt_pieces[i % count][: self.settings.prompt_tokens] for i in rows]))

    def open(self) -> TokenStore | None:
        if not self.folder.exists():
            return None
        try:
            return open_store(self.folder, self.identity)
        except DamagedStore as problem:
            print(f"warning: token store {self.folder} is damaged ({problem}); generating it again",
                  file=sys.stderr, flush=True)
            return None

    def build(self, rank: int = 0, world: int = 1, barrier=lambda: None, device=None) -> TokenStore:
        """The store, made by `world` processes together (every one calls this; `barrier` waits for all of them)."""
        store = self.open()
        if store is not None:
            return store
        try:
            if rank == 0:
                self.work.mkdir(parents=True, exist_ok=True)
            barrier()
            self._generate_share(rank, world, device)
            barrier()
            if rank == 0:
                self._pack()
            barrier()
        except Exception as error:
            fault = os_error_of(error)
            if fault is None:
                raise
            raise UserError(f"data.cache_dir: cannot write the generated store of {self.key} in {self.folder.parent} "
                            f"({os_error_cause(fault)})") from None
        return open_store(self.folder, self.identity)

    def _chunk_file(self, chunk: int) -> Path:
        return self.work / f"chunk-{chunk:06d}.npy"

    def _finished(self, chunk: int) -> bool:
        try:
            _read_chunk(self._chunk_file(chunk))
            return True
        except (OSError, ValueError):  # not made yet, or cut short by a crash of the filesystem
            return False

    def _generate_share(self, rank: int, world: int, device) -> None:
        mine = [c for c in range(rank, self.chunks, world) if not self._finished(c)]
        teacher = self.teacher
        home = next(teacher.parameters()).device
        if device is not None:
            teacher.to(device)
        made, started = 0, time.perf_counter()
        try:
            with _progress_bar(self.key, rank == 0) as progress:
                task = progress.add_task("", total=len(mine), tokens=0, rate="")
                for chunk in mine:
                    documents = self._generate(chunk)
                    made += sum(map(len, documents)) - self.settings.prompt_tokens * len(documents)
                    lengths = np.array([len(d) for d in documents], dtype=np.int64)
                    with atomic_file(self._chunk_file(chunk), "wb") as out:
                        np.save(out, np.concatenate([[len(documents)], lengths, *documents]).astype(np.int64))
                    rate = made / (time.perf_counter() - started)
                    progress.update(task, advance=1, tokens=made, rate=f"{rate:,.0f} new tok/s")
        finally:
            teacher.to(home)

    @torch.no_grad()
    def _generate(self, chunk: int) -> list[np.ndarray]:
        from transformers import GenerationConfig

        from lctk.models.cache import preallocated_generation

        settings, teacher, tokenizer = self.settings, self.teacher, self.tokenizer
        device = next(teacher.parameters()).device
        prompts = self.prompt_batch(chunk).to(device)
        eos = tokenizer.eos_token_id
        sampling = settings.temperature > 0
        config = GenerationConfig(
            max_new_tokens=settings.max_new_tokens, do_sample=sampling, eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
            **({"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k}
               if sampling else {}),
            **preallocated_generation(teacher),
        )
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(settings.seed * 1_000_003 + chunk)
            out = teacher.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                   generation_config=config)
        documents = []
        for prompt, row in zip(prompts.cpu().numpy(), out[:, prompts.shape[1]:].cpu().numpy(), strict=True):
            ends = np.flatnonzero(row == eos)
            documents.append(np.concatenate([prompt, row[: ends[0] if len(ends) else len(row)]]))
        return documents

    def _pack(self) -> None:
        """The chunks, in order, into the store's shards, written aside and renamed; then the chunks go."""
        stores = self.folder.parent
        temporary = stores / private_name(f".{self.folder.name}")
        remove_dead_leftovers(stores, f".{self.folder.name}")
        started = time.perf_counter()
        with scratch_folder(temporary):
            writer = ShardWriter(temporary, id_dtype(self.tokenizer))
            for chunk in range(self.chunks):
                try:
                    lengths, ids = _read_chunk(self._chunk_file(chunk))
                except (OSError, ValueError) as error:
                    raise UserError(f"{self.key}: the generated batch {self._chunk_file(chunk)} is missing or "
                                    f"damaged ({error}); run the command again to make it") from None
                writer.add(ids.astype(writer.dtype), lengths)
            manifest = writer.close() | {"format": FORMAT_VERSION, "identity": self.identity,
                                         "built_s": round(time.perf_counter() - started, 1)}
            (temporary / MANIFEST).write_text(json.dumps(manifest, indent=1))
            move_store_into_place(temporary, self.folder)
        shutil.rmtree(self.work)
        generated = manifest["tokens"] - manifest["documents"] * self.settings.prompt_tokens
        print(f"generated store: {generated:,} new tokens ({manifest['tokens']:,} with prompts) "
              f"in {manifest['documents']} documents from the teacher for {self.key} -> {self.folder}", flush=True)


def _read_chunk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, ids) of a saved batch; ValueError when the file does not hold what its header says."""
    values = np.load(path, allow_pickle=False)
    count = int(values[0]) if values.ndim == 1 and len(values) else -1
    lengths = values[1 : 1 + count]
    if count < 1 or len(lengths) != count or lengths.sum() != len(values) - 1 - count:
        raise ValueError(f"{path.name} is not a whole batch")
    return lengths, values[1 + count :]


def generated_store(source, key: str, data, tokenizer, teacher: Teacher | None, cache_dir: Path) -> tuple[TokenStore, Pieces]:
    """(the store of a `generate:` source, the held-out pieces of its prompt text), made by this process alone when
    it is not there yet (lctk distill makes it with every process first: generate_sources)."""
    generated = GeneratedSource(source, key, data, tokenizer, teacher, cache_dir)
    return generated.build(), generated.held_out


def generate_sources(data, tokenizer, teacher: Teacher, cache_dir: Path, device=None) -> None:
    """Make the store of every `generate:` source of `data`, each process of the accelerate run generating its share
    of the batches on `device` (every process calls this, outside main_process_first)."""
    from accelerate import PartialState

    state = PartialState()
    for index, source in enumerate(data.sources):
        if source.generate is None:
            continue
        with state.main_process_first():  # the prompt text's store is built once
            generated = GeneratedSource(source, f"data.sources.{index}", data, tokenizer, teacher, cache_dir)
        generated.build(state.process_index, state.num_processes, state.wait_for_everyone, device)


def _progress_bar(key: str, shown: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn(f"generating {key}"), BarColumn(), TextColumn("{task.completed}/{task.total} batches"),
        TextColumn("{task.fields[tokens]:,} new tokens, {task.fields[rate]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), disable=not shown,
    )
