"""The output folder: samples.jsonl (one record per finished job, appended and flushed as it finishes, so a killed
run loses at most the job in flight), results.json (written to a temporary file, then renamed into place).

Rerunning into the same folder reads samples.jsonl back and skips every job whose key is already there. Each record
carries a digest of its own content: a line that is not JSON (a run killed mid-write, random bytes) or whose digest
does not match (a record edited or cut short, e.g. without its score) is not trusted; its job runs again and the
store counts it in `damaged` for one warning line."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from lctk.errors import UserError, check_creatable

OUTPUT_FILES = ("samples.jsonl", "results.json", "report.md")
REPLACED = ("results.json", "report.md")  # rewritten whole; samples.jsonl is only appended to


def check_output_dir(output_dir: Path) -> None:
    """The eval output folder can be made (or is one), none of the files lctk writes there is a folder, and the
    results.json and report.md it would replace are an earlier lctk eval's, not a user's."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"eval output folder {output_dir} is an existing file, not a folder")
    for name in OUTPUT_FILES:
        if (output_dir / name).is_dir():
            raise UserError(f"{output_dir / name} is a folder; lctk writes its {name} file there (move the folder away)")
        if name in REPLACED and (output_dir / name).is_file() and not _written_by_lctk(output_dir / name):
            raise UserError(f"eval output folder {output_dir} holds a {name} that lctk did not write, which an eval "
                            "would replace; choose another --output")
    check_creatable(output_dir, "eval output folder")


def _written_by_lctk(file: Path) -> bool:
    """results.json names the lctk version that wrote it, report.md starts with lctk's title."""
    try:
        text = file.read_text(encoding="utf-8")
        if file.suffix == ".md":
            return text.startswith("# lctk eval: ")
        return "lctk" in json.loads(text).get("versions", {})
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, TypeError):
        return False


class SampleStore:
    def __init__(self, output_dir: Path | None):
        self.path = output_dir / "samples.jsonl" if output_dir else None
        self.records: dict[str, dict] = {}
        self.damaged = 0  # lines not trusted (see module doc)
        self._torn = False  # the file ends in a partial line: start on a fresh line
        if not (self.path and self.path.exists()):
            return
        try:
            data = self.path.read_bytes()
        except OSError as error:
            raise UserError(f"cannot read {self.path} ({error.strerror or error})") from None
        self._torn = bool(data) and not data.endswith(b"\n")
        for line in data.splitlines():
            record = _trusted(line)
            if record is None:
                self.damaged += bool(line.strip())
            else:
                self.records[record["key"]] = record

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def add(self, record: dict) -> None:
        record = json.loads(json.dumps(record))  # as it will read back (int dict keys become strings)
        record["digest"] = _digest(record)
        self.records[record["key"]] = record
        if self.path:
            with self.path.open("a", encoding="utf-8") as out:
                out.write(("\n" if self._torn else "") + json.dumps(record) + "\n")
            self._torn = False


def _digest(record: dict) -> str:
    content = {k: v for k, v in record.items() if k != "digest"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def _trusted(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:  # not UTF-8 or not JSON
        return None
    if isinstance(record, dict) and isinstance(record.get("key"), str) and record.get("digest") == _digest(record):
        return record
    return None


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        json.dump(data, tmp, indent=2)
    os.replace(tmp.name, path)
