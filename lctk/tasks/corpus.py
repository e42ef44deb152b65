"""The builtin English corpus: text that ships with Python and with lctk's own dependencies, so training and the
eval haystacks need no network and the repository carries no data.

Sources, in this fixed order (about 5 MB, over 1M tokens for a GPT-2-like tokenizer):
  1. `pydoc_data.topics`: the Python language reference as plain text, one document per topic;
  2. the docstrings of the standard library, read with `ast` (nothing is imported), one document per module;
  3. the docstrings of numpy and matplotlib (both hard dependencies), one document per module.
A module's document is its module docstring followed by its class and function docstrings, blank-line separated.
Every HELDOUT_EVERY-th document (index 0, 20, 40, ...; about 5%, 60K tokens) is held out: `builtin_documents("train")`
leaves them out, `builtin_documents("heldout")` has only them; evals measure perplexity on them first.
Files are visited in sorted path order and tests are skipped, so the corpus is the same on every machine with the
same Python and package versions. The assembled documents are cached as JSON under `cache_dir()` (built once,
about 5 s), keyed by those versions, with their sha256: a damaged cache file is built again. When the cache cannot
be written (a full disk, a read-only cache folder) the corpus is used from memory after one warning line, and no
partial file is left.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from lctk.errors import UserError, os_error_line
from lctk.files import atomic_file

FORMAT_VERSION = 2  # 2: the documents with their sha256
PACKAGES = ("numpy", "matplotlib")
SKIPPED_DIRS = {"test", "tests", "testing", "idlelib", "turtledemo", "site-packages", "__pycache__", "lib2to3"}
MIN_DOCUMENT_CHARS = 200
HELDOUT_EVERY = 20


def cache_dir() -> Path:
    """Where lctk keeps derived data: $LCTK_CACHE, else $XDG_CACHE_HOME/lctk, else ~/.cache/lctk."""
    if os.environ.get("LCTK_CACHE"):
        return Path(os.environ["LCTK_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lctk"


def builtin_text(split: str = "all") -> str:
    """The corpus (or one split of it) as one string, documents separated by a blank line."""
    return "\n\n".join(builtin_documents(split))


def builtin_documents(split: str = "all") -> tuple[str, ...]:
    """The corpus as documents (topics and modules) in a fixed order; split is "all", "train" or "heldout"."""
    documents = _all_documents()
    if split == "all":
        return documents
    if split not in ("train", "heldout"):
        raise ValueError(f"split: expected all, train or heldout, got {split!r}")
    return tuple(d for i, d in enumerate(documents) if (i % HELDOUT_EVERY == 0) == (split == "heldout"))


@functools.cache
def _all_documents() -> tuple[str, ...]:
    """Built once per machine and cached on disk as JSON."""
    path = cache_dir() / f"builtin-corpus-{_sources_key()}.json"
    if path.exists():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            if cached["sha256"] == _digest(cached["documents"]):
                return tuple(cached["documents"])
        except (OSError, ValueError, TypeError, KeyError):
            pass  # a damaged cache file is rebuilt below
    documents = list(_collect_documents())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as out:  # a concurrent reader sees no file or the whole new one
            json.dump({"sha256": _digest(documents), "documents": documents}, out)
    except (OSError, UserError) as error:  # only a cache: the corpus is in memory
        reason = os_error_line(error) if isinstance(error, OSError) else error
        print(f"warning: the builtin corpus is not cached ({reason}); it is collected again next time",
              file=sys.stderr, flush=True)
    return tuple(documents)


def _digest(documents: list[str]) -> str:
    return hashlib.sha256(json.dumps(documents).encode()).hexdigest()


def _sources_key() -> str:
    versions = [f"format={FORMAT_VERSION}", f"python={sys.version}"]
    for package in PACKAGES:
        module = sys.modules.get(package)
        version = getattr(module, "__version__", None) if module else None
        versions.append(f"{package}={version or _installed_version(package)}")
    return hashlib.sha256("\n".join(versions).encode()).hexdigest()[:16]


def _installed_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def _collect_documents() -> Iterator[str]:
    import pydoc_data.topics

    for name in sorted(pydoc_data.topics.topics):
        yield from _keep(pydoc_data.topics.topics[name])
    yield from _docstring_documents(Path(sysconfig.get_paths()["stdlib"]))
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            yield from _docstring_documents(Path(next(iter(spec.submodule_search_locations))))


def _docstring_documents(root: Path) -> Iterator[str]:
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIPPED_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py") and not name.startswith("test_"):
                yield from _keep(_module_docstrings(Path(directory) / name))


def _module_docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    docstrings = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            text = ast.get_docstring(node)
            if text:
                docstrings.append(text.strip())
    return "\n\n".join(docstrings)


def _keep(document: str) -> Iterator[str]:
    document = document.strip()
    if len(document) >= MIN_DOCUMENT_CHARS:
        yield document
