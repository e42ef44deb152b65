"""`lctk eval` against disk faults: an output folder it cannot write in is refused before any sample, and a disk
that fills up mid-run (samples.jsonl, results.json, plots, report.md) is one `error:` line naming the file, exit
code 2, no temporary file left; the rerun reuses the finished samples and completes."""

import json

import pytest
from disk_faults import failing_writes, leftovers, unwritable
from test_cli import PASSKEY_RUN, lctk, save_llama


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, bpe_tokenizer):
    folder = tmp_path_factory.mktemp("tiny-llama")
    save_llama(folder, bpe_tokenizer, seed=0)
    return folder


PLOTS = ("--suite", "passkey,perplexity", "--lengths", "128", "--limit", "1", "--depths", "0.5",
         "--max-new-tokens", "4")


@pytest.mark.parametrize("read_only", [False, True])
def test_an_output_folder_lctk_cannot_write_in_is_refused_before_any_sample(monkeypatch, capsys, llama_dir, tmp_path,
                                                                            read_only):
    cause = "read-only file system" if read_only else "permission denied"
    with unwritable(monkeypatch, tmp_path, read_only=read_only):
        code, _, err = lctk(monkeypatch, capsys, "--model", llama_dir, *PASSKEY_RUN, "--output", tmp_path / "out")
    assert code == 2
    assert err.strip() == f"error: eval output folder: cannot create {tmp_path}/out: {tmp_path} is not writable ({cause})"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("file", ["samples.jsonl", "results.json", "passkey_heatmap.png", "report.md"])
def test_a_disk_that_fills_up_mid_run_is_one_line_and_the_rerun_completes(monkeypatch, capsys, llama_dir, tmp_path,
                                                                          file):
    out = tmp_path / "out"
    out.mkdir()
    written = f".{file}.*.tmp" if file == "results.json" else file  # results.json is written aside and renamed
    with failing_writes(monkeypatch, out, name=written):
        code, _, err = lctk(monkeypatch, capsys, "--model", llama_dir, *PLOTS, "--output", out)
    assert code == 2 and "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert line == f"error: no space left on device writing {out / file}"
    assert leftovers(tmp_path) == []
    code, _, err = lctk(monkeypatch, capsys, "--model", llama_dir, *PLOTS, "--output", out)
    assert code == 0, err
    assert set(json.loads((out / "results.json").read_text())["results"]) == {"passkey", "perplexity"}
