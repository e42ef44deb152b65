"""Text sources read as a stream of document batches, never whole: the builtin corpus, local files, a folder of them,
a `datasets.save_to_disk` folder, and hub datasets.

- A .txt file is one document. jsonl/json, parquet and csv rows are documents (their `field` column), read by
  `datasets` in streaming mode (nothing is copied into its Arrow cache); files of one format that follow each other
  in sorted order are read as one dataset. A folder is searched recursively; hidden files are skipped and any other
  file is an error naming it, so a stray file never goes unnoticed.
- A folder written by `datasets.save_to_disk` (a Dataset, or a DatasetDict whose `split` is used) is read through
  its memory-mapped Arrow files.
- A hub dataset streams (`streaming=True`): `max_documents` / `max_tokens` read only what they need, and a whole
  split goes through in batches without being held or downloaded first.
Empty and non-string values are skipped. `identity` names what a source is, to key the token store built from it.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from lctk.errors import UserError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
BATCH_ROWS = 1000  # rows per batch read from a dataset


class TextSource:
    """A `text:` or `hub:` source of a recipe opened for reading; `key` names it in errors (data.sources.0)."""

    def __init__(self, source, key: str):
        self.source, self.key = source, key
        self.path = None if source.hub is not None or source.text == "builtin" else Path(source.text)
        self.saved = self.path is not None and _is_saved_dataset(self.path)
        self.files = [] if self.path is None or self.saved else _local_files(self.path, f"{key}.text")

    def identity(self) -> dict:
        """What the documents are: the hub dataset's name/config/split/revision, the builtin corpus' hash, or each
        local file's path, size and modification time (an edited file changes it)."""
        source = self.source
        described: dict = {"field": source.field, "max_documents": source.max_documents}
        if source.hub is not None:
            described |= {"hub": source.hub, "config": source.config, "split": source.split, "revision": source.revision}
        elif self.path is None:
            from lctk.tasks.corpus import builtin_documents

            described["builtin"] = hashlib.sha256("\n\n".join(builtin_documents()).encode()).hexdigest()
        else:
            files = sorted(p for p in self.path.rglob("*") if p.is_file()) if self.saved else self.files
            described["files"] = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
            described["split"] = source.split if self.saved else None
        return described

    def batches(self) -> Iterator[list[str]]:
        """Lists of documents in the source's order, up to max_documents in all."""
        batches = self._all_batches()
        if self.source.max_documents is None:
            yield from batches
            return
        left = self.source.max_documents
        for batch in batches:
            yield batch[:left]
            left -= len(batch)
            if left <= 0:
                return

    def documents(self) -> Iterator[str]:
        return itertools.chain.from_iterable(self.batches())

    def expected_documents(self) -> int | None:
        """How many documents the source holds, when that is cheap to know (for the progress bar's ETA)."""
        counts = {"parquet": _parquet_rows, "json": _lines, "csv": _lines, "text": lambda _: 1}
        if self.source.hub is not None:
            info = self._hub_dataset.info
            split = (info.splits or {}).get(self.source.split) if info else None
            total = split.num_examples if split else None
        elif self.path is None:
            from lctk.tasks.corpus import builtin_documents

            total = len(builtin_documents())
        elif self.saved:
            total = len(self._saved_dataset())
        else:
            try:
                total = sum(counts[BUILDERS[p.suffix]](p) for p in self.files)
            except (OSError, ValueError):  # an unreadable file: reading it names it; the estimate is only for the ETA
                total = None
        caps = [n for n in (total, self.source.max_documents) if n]
        return min(caps) if caps else None

    def _all_batches(self) -> Iterator[list[str]]:
        if self.source.hub is not None:
            yield from self._dataset_batches(self._hub_dataset, self.source.hub, f"{self.key}.hub")
        elif self.path is None:
            from lctk.tasks.corpus import builtin_documents

            documents = builtin_documents()
            for start in range(0, len(documents), BATCH_ROWS):
                yield list(documents[start : start + BATCH_ROWS])
        elif self.saved:
            yield from self._dataset_batches(self._saved_dataset(), str(self.path), f"{self.key}.text")
        else:
            for builder, group in itertools.groupby(self.files, key=lambda p: BUILDERS[p.suffix]):
                group = list(group)
                if builder == "text":
                    yield from ([_text_file(path, f"{self.key}.text")] for path in group)
                    continue
                datasets = _datasets()
                where = str(group[0]) if len(group) == 1 else f"{len(group)} {builder} files in {self.path}"
                try:
                    dataset = datasets.load_dataset(builder, data_files=[str(p) for p in group], split="train",
                                                    streaming=True)
                except Exception as error:  # datasets raises many types for unreadable files
                    raise UserError(f"{self.key}.text: cannot read {where} ({_reason(error)})") from None
                yield from self._dataset_batches(dataset, where, f"{self.key}.text")

    def _dataset_batches(self, dataset, where: str, key: str) -> Iterator[list[str]]:
        field = self.source.field
        batches = dataset.iter(batch_size=BATCH_ROWS)
        while True:
            try:
                batch = next(batches, None)
            except Exception as error:  # a damaged file or a lost connection mid-stream
                raise UserError(f"{key}: cannot read {where} ({_reason(error)})") from None
            if batch is None:
                return
            if field not in batch:
                raise UserError(f"{self.key}.field: column {field!r} not in {where} (columns: {', '.join(batch)})")
            yield [text for text in batch[field] if isinstance(text, str) and text.strip()]

    def _saved_dataset(self):
        datasets = _datasets()
        try:
            dataset = datasets.load_from_disk(str(self.path))
        except Exception as error:  # datasets raises many types for damaged folders
            raise UserError(f"{self.key}.text: cannot read the saved dataset {self.path} ({_reason(error)})") from None
        if isinstance(dataset, datasets.DatasetDict):
            if self.source.split not in dataset:
                raise UserError(f"{self.key}.split: no split {self.source.split!r} in {self.path} "
                                f"(splits: {', '.join(dataset)})")
            dataset = dataset[self.source.split]
        return dataset

    @functools.cached_property
    def _hub_dataset(self):  # opened once: the progress estimate and the reading share it
        datasets = _datasets()
        source = self.source
        offline = any(os.environ.get(name, "0") not in ("", "0") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        if not offline and not _hub_reachable():
            raise UserError(
                f"{self.key}.hub: cannot reach the Hugging Face hub to load {source.hub!r} (offline?); set "
                "HF_DATASETS_OFFLINE=1 to use a copy cached earlier, or point `text:` at local files"
            )
        try:
            return datasets.load_dataset(source.hub, source.config, split=source.split, revision=source.revision,
                                         streaming=True)
        except Exception as error:  # unknown name, bad config, lost connection: datasets raises many types
            raise UserError(f"{self.key}.hub: cannot load dataset {source.hub!r} ({_reason(error)})") from None


def _datasets():
    """The datasets library, quiet: the store shows its own progress, and a problem becomes one line naming it."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    return datasets


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _local_files(path: Path, key: str) -> list[Path]:
    kinds = ", ".join(BUILDERS)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        for file in files:
            if file.suffix not in BUILDERS:
                raise UserError(f"{key}: {file} in folder {path} is not a {kinds} file")
        if not files:
            raise UserError(f"{key}: folder {path} holds no {kinds} files")
        return files
    if not path.exists():
        raise UserError(f"{key}: file {path} not found (use 'builtin' for the builtin corpus)")
    if path.suffix not in BUILDERS:
        raise UserError(f"{key}: {path} is not a {kinds} file")
    return [path]


def _text_file(path: Path, key: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{key}: {path} is not UTF-8 text") from None
    except OSError as error:
        raise UserError(f"{key}: cannot read {path} ({error.strerror or type(error).__name__})") from None


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _lines(path: Path) -> int:
    """Newlines in a jsonl/csv file, read in blocks (about 1 s per GB): a close estimate of its rows."""
    with open(path, "rb") as handle:
        return sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 24), b""))


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One quick connection attempt, instead of datasets' half a minute of retries when there is no network."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _reason(error: Exception) -> str:
    return str(error).splitlines()[0][:160] if str(error) else type(error).__name__
