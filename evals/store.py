"""The output folder: samples.jsonl (one record per finished job, appended and flushed as it finishes, so a killed
run loses at most the job in flight), results.json (written to a temporary file, then renamed into place).

Rerunning into the same folder reads samples.jsonl back and skips every job whose key is already there. Each record
carries a digest of its own content: a line that is not JSON (a run killed mid-write, random bytes) or whose digest
does not match (a record edited or cut short, e.g. without its score) is not trusted; its job runs again and the
store counts it in `damaged` for one warning line. The first sample this run finishes rewrites the file (atomically:
a temporary file renamed over it) with the trusted records and the new one, so the damaged lines are gone and no
later run warns about them again; their samples are redone by this run, or by any later one that asks for them.

The folder is checked before any sample runs: it can be made, lctk may write in it, and it holds no user's file that
an eval would replace."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lctk.errors import UserError, check_creatable
from lctk.files import atomic_file, check_writable

OUTPUT_FILES = ("samples.jsonl", "results.json", "report.md")
REPLACED = ("results.json", "report.md")  # rewritten whole; samples.jsonl is only appended to
REPORT_TITLE = "# lctk eval: "


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
    check_writable(output_dir, "eval output folder")


def _written_by_lctk(file: Path) -> bool:
    """results.json names the lctk version that wrote it, report.md starts with lctk's title (or is the start of one
    that a full disk cut short)."""
    try:
        text = file.read_text(encoding="utf-8")
        if file.suffix == ".md":
            return text.startswith(REPORT_TITLE) or REPORT_TITLE.startswith(text)
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
        self._torn = bool(data) and not data.endswith(b"\n")  # appending starts on a fresh line
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
        if self.path and self.damaged:  # keep the trusted records, drop the damaged lines
            with atomic_file(self.path) as out:
                out.writelines(json.dumps(kept) + "\n" for kept in self.records.values())
            self.damaged, self._torn = 0, False
        elif self.path:
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
    with atomic_file(path) as out:
        json.dump(data, out, indent=2)
