"""metrics.jsonl on resume: lines after the checkpoint's step go, and damaged lines never stop the run."""

import json

from lctk.train.progress import _truncate_after


def test_resuming_keeps_the_steps_up_to_the_checkpoint_and_drops_damaged_lines(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": 1}), json.dumps({"step": 3}), "[1, 2]", json.dumps({"step": "x"}), '{"step": 2, "lo']
    metrics.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe random bytes\n" + json.dumps({"step": 2}).encode())
    _truncate_after(metrics, 2)
    assert metrics.read_text() == '{"step": 1}\n{"step": 2}\n'
