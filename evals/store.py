"""The output folder: samples.jsonl (one record per finished job, appended and flushed as it finishes, so a killed
run loses at most the job in flight), results.json (written to a temporary file, then renamed into place).
Rerunning into the same folder reads samples.jsonl back and skips every job whose key is already there; a damaged
last line (a run killed mid-write) is ignored."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


class SampleStore:
    def __init__(self, output_dir: Path | None):
        self.path = output_dir / "samples.jsonl" if output_dir else None
        self.records: dict[str, dict] = {}
        self._torn = False  # the file ends in a partial line: start on a fresh line
        if self.path and self.path.exists():
            with self.path.open("rb") as raw:
                raw.seek(0, os.SEEK_END)
                if raw.tell():
                    raw.seek(-1, os.SEEK_END)
                    self._torn = raw.read(1) != b"\n"
            with self.path.open(encoding="utf-8") as lines:
                for line in lines:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(record, dict) and "key" in record:
                        self.records[record["key"]] = record

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def add(self, record: dict) -> None:
        self.records[record["key"]] = record
        if self.path:
            with self.path.open("a", encoding="utf-8") as out:
                out.write(("\n" if self._torn else "") + json.dumps(record) + "\n")
            self._torn = False


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        json.dump(data, tmp, indent=2)
    os.replace(tmp.name, path)
