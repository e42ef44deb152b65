"""Every saved lctk model carries auto_map and the code files it names: a fresh interpreter that never imports lctk
loads it with trust_remote_code, and lctk's own loader loads it without --trust-remote-code, never running the
folder's files."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from lctk import HybridConfig, HybridForCausalLM
from lctk.models.loading import load_causal_lm, open_model
from lctk.models.remote_code import AUTO_MAP, CODE_FILES
from lctk.train.checkpoint import save_hf_folder

FRESH = """
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
assert "lctk" not in sys.modules
config = AutoConfig.from_pretrained({folder!r}, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained({folder!r}, trust_remote_code=True)
print(type(model).__name__, config.pattern)
torch.save(model(torch.tensor([[1, 2, 3, 4]])).logits, {out!r})
"""


def tiny(tmp_path):
    torch.manual_seed(0)
    model = HybridForCausalLM(HybridConfig(pattern="MA", vocab_size=64, hidden_size=32, num_attention_heads=2)).eval()
    save_hf_folder(model, None, tmp_path / "final")
    return model, tmp_path / "final"


def test_a_fresh_interpreter_loads_a_saved_model_with_trust_remote_code(tmp_path):
    model, folder = tiny(tmp_path)
    assert json.loads((folder / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert {name: (folder / name).read_text() for name in CODE_FILES} == CODE_FILES
    out = tmp_path / "logits.pt"
    done = subprocess.run(
        [sys.executable, "-c", FRESH.format(folder=str(folder), out=str(out))], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["HybridForCausalLM", "MA"]
    with torch.no_grad():
        assert torch.equal(torch.load(out), model(torch.tensor([[1, 2, 3, 4]])).logits)


def test_lctks_loader_loads_its_own_folders_without_the_flag_and_runs_none_of_their_files(tmp_path):
    _, folder = tiny(tmp_path)
    ran = tmp_path / "ran"
    for name in CODE_FILES:  # whatever the files say, the installed lctk is what runs
        (folder / name).write_text(f"import pathlib\npathlib.Path({str(ran)!r}).touch()\n")
    assert isinstance(load_causal_lm(open_model(str(folder), "--model"), "--model"), HybridForCausalLM)
    assert not ran.exists()


def test_a_reloaded_model_saves_the_same_folder(tmp_path):
    _, folder = tiny(tmp_path)
    again = tmp_path / "again"
    load_causal_lm(open_model(str(folder), "--model"), "--model").save_pretrained(again)
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in folder.iterdir())
