"""The eval store and resume keys: a damaged samples.jsonl never raises and never hands back a damaged record; the
weights fingerprint follows the weights and the config, not the path."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from lctk.errors import UserError
from lctk.evals.fingerprints import weights_fingerprint
from lctk.evals.loading import load_model
from lctk.evals.store import SampleStore

RECORDS = [
    {"key": f"k{i}", "suite": "passkey", "length": 128 * (i + 1), "score": float(i), "buckets": {512: [1.5, 2], 64: [0, 1]}}
    for i in range(4)
]


def written_store(folder) -> SampleStore:
    store = SampleStore(folder)
    for record in RECORDS:
        store.add(record)
    return store


def test_records_read_back_as_written(tmp_path):
    written = written_store(tmp_path).records
    assert SampleStore(tmp_path).records == written and set(written) == {r["key"] for r in RECORDS}


_edits = st.lists(
    st.one_of(
        st.tuples(st.just("cut"), st.floats(0, 1)),
        st.tuples(st.just("flip"), st.floats(0, 1), st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("insert"), st.floats(0, 1), st.binary(max_size=40)),
        st.tuples(st.just("replace"), st.binary(max_size=200)),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_edits)
def test_a_damaged_store_loads_and_keeps_only_intact_records(tmp_path, edits):
    written = written_store(tmp_path).records
    path = tmp_path / "samples.jsonl"
    data = path.read_bytes()
    for kind, *args in edits:
        at = int(args[0] * len(data)) if kind != "replace" else 0
        if kind == "cut":
            data = data[:at]
        elif kind == "flip":
            data = data[:at] + args[1] + data[at + len(args[1]) :]
        elif kind == "insert":
            data = data[:at] + args[1] + data[at:]
        else:
            data = args[0]
    path.write_bytes(data)
    store = SampleStore(tmp_path)
    assert all(written.get(key) == record for key, record in store.records.items())
    store.add({"key": "new", "score": 1.0})  # appending after damage starts a fresh line
    assert "new" in SampleStore(tmp_path).records


def test_an_unreadable_store_is_one_user_error(tmp_path):
    (tmp_path / "samples.jsonl").mkdir()
    with pytest.raises(UserError, match="samples.jsonl"):
        SampleStore(tmp_path)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))


def test_the_fingerprint_follows_weights_and_config_not_the_path(tmp_path, bpe_tokenizer):
    model = tiny_llama()
    same = weights_fingerprint(model)
    assert weights_fingerprint(copy.deepcopy(model)) == same
    for folder in ("a", "b"):
        model.save_pretrained(tmp_path / folder)
        bpe_tokenizer.save_pretrained(tmp_path / folder)
        assert weights_fingerprint(load_model(str(tmp_path / folder), device="cpu", dtype="float32")[0]) == same
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.layers[0].mlp.up_proj.weight[3, 5] += 1e-3  # one value, most likely not among the sampled ones
    assert weights_fingerprint(changed) != same
    rescaled = copy.deepcopy(model)
    rescaled.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert weights_fingerprint(rescaled) != same
    assert weights_fingerprint(model.to(torch.bfloat16)) != same


def test_output_folders_and_settings_that_cannot_work_are_refused_before_any_sample(tmp_path):
    import os

    from lctk.evals.settings import EvalSettings
    from lctk.evals.store import check_output_dir

    os.symlink(tmp_path / "nowhere", tmp_path / "link")
    with pytest.raises(UserError, match="eval output folder: cannot create .*link: it is a link to .*nowhere"):
        check_output_dir(tmp_path / "link")
    with pytest.raises(UserError, match=r"--lengths: '1000000000' must be from 1 to 33554432 tokens"):
        EvalSettings(lengths="1000000000")
    with pytest.raises(UserError, match="--max-new-tokens: 64 tokens leave no room for a prompt at the shortest length, 64"):
        EvalSettings(lengths="64,1k", max_new_tokens=64)
    with pytest.raises(UserError, match=r"^--batch-size: must be at least 1, got 0$"):
        EvalSettings(batch_size=0)
    with pytest.raises(UserError, match=r"^--limit: at most 1000000 samples per length"):
        EvalSettings(limit=10**12)  # every job is listed up front: this was a MemoryError minutes later


def test_a_results_or_report_file_lctk_did_not_write_is_never_replaced(tmp_path):
    from lctk.evals.store import check_output_dir

    (tmp_path / "report.md").write_text("# my notes\n")
    with pytest.raises(UserError, match="holds a report.md that lctk did not write"):
        check_output_dir(tmp_path)
    (tmp_path / "report.md").write_text("# lctk eval: model\n")
    (tmp_path / "results.json").write_text('{"results": {}, "versions": {"lctk": "0.1"}}')
    check_output_dir(tmp_path)  # an earlier eval's: rerunning resumes and rewrites them
    (tmp_path / "results.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="holds a results.json that lctk did not write"):
        check_output_dir(tmp_path)


@pytest.mark.parametrize("damage", ["torn last line", "edited record", "garbage line"])
def test_a_damaged_record_is_dropped_from_the_file_once_a_sample_is_redone(tmp_path, damage):
    written_store(tmp_path)
    path = tmp_path / "samples.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    if damage == "torn last line":
        lines[-1] = lines[-1][: len(lines[-1]) // 2]
    elif damage == "edited record":
        lines[1] = lines[1].replace(b'"score": 1.0', b'"score": 9.0')
    else:
        lines.insert(2, b"\x00\xff not a record\n")
    path.write_bytes(b"".join(lines))
    store = SampleStore(tmp_path)
    assert store.damaged == 1
    redone = next(r for r in RECORDS if r["key"] not in store.records) if damage != "garbage line" else RECORDS[0]
    store.add(redone)
    again = SampleStore(tmp_path)  # the next eval into the folder: nothing to warn about
    assert again.damaged == 0 and again.records == {r["key"]: r for r in written_store(None).records.values()}
    assert list(tmp_path.iterdir()) == [path]  # the rewrite left no temporary file
    assert path.read_text().count("\n") == len(RECORDS)
    again.add({"key": "k9", "score": 0.5})  # later samples are appended as before
    assert path.read_text().count("\n") == len(RECORDS) + 1 and "k9" in SampleStore(tmp_path).records


def test_results_written_when_the_disk_is_full_keep_the_old_file_and_leave_no_temporary(tmp_path, monkeypatch):
    from disk_faults import failing_writes

    from lctk.evals.store import write_json

    write_json(tmp_path / "results.json", {"old": 1})
    with failing_writes(monkeypatch, tmp_path, allowed=5), pytest.raises(UserError) as error:
        write_json(tmp_path / "results.json", {"results": list(range(1000))})
    assert str(error.value) == f"no space left on device writing {tmp_path / 'results.json'}"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    assert (tmp_path / "results.json").read_text() == '{\n  "old": 1\n}'


def test_an_output_folder_lctk_cannot_write_in_is_refused_before_any_sample(tmp_path, monkeypatch):
    from disk_faults import unwritable

    from lctk.evals.store import check_output_dir

    (tmp_path / "eval").mkdir()
    written_store(tmp_path / "eval")
    for read_only, cause in ((False, "permission denied"), (True, "read-only file system")):
        with unwritable(monkeypatch, tmp_path, read_only=read_only):
            with pytest.raises(UserError, match=rf"^eval output folder: cannot write in {tmp_path}/eval \({cause}\)$"):
                check_output_dir(tmp_path / "eval")
            with pytest.raises(UserError, match=rf"^eval output folder: cannot create {tmp_path}/new: {tmp_path} is "):
                check_output_dir(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]
