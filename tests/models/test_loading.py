"""lctk.models.loading: a damaged model folder is one UserError naming the file, a local typo fails at once, and no
model folder's own code runs unless asked."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lctk import HybridConfig, HybridForCausalLM
from lctk.errors import UserError
from lctk.models.loading import load_causal_lm, open_model, trusting_remote_code


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-hybrid")
    torch.manual_seed(0)
    HybridForCausalLM(HybridConfig(pattern="MA", vocab_size=64, hidden_size=32, num_attention_heads=2)).save_pretrained(folder)
    return folder


def load(folder):
    return load_causal_lm(open_model(str(folder), "--model"), "--model")


def copy(model_dir, tmp_path):
    target = tmp_path / "copy"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(model_dir, target)
    return target


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def edit_weights(folder, change):
    weights = load_file(folder / "model.safetensors")
    change(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_a_sound_folder_loads(model_dir):
    assert isinstance(load(model_dir), HybridForCausalLM)


def _header(folder, header: dict) -> None:
    text = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + bytes(4))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "model.safetensors").write_bytes(b""), "model.safetensors is empty"),
        (lambda f: os.truncate(f / "model.safetensors", 3000), "model.safetensors is truncated: 3000 bytes"),
        (lambda f: (f / "model.safetensors").write_bytes(os.urandom(4000)), "model.safetensors is not a safetensors file"),
        (lambda f: (f / "model.safetensors").unlink(), "no weights (model.safetensors) in"),
        (lambda f: ((f / "model.safetensors").unlink(), (f / "model.safetensors").mkdir()), "model.safetensors is not a file"),
        (lambda f: _header(f, {"w": {"dtype": "F32", "shape": "abc", "data_offsets": [0, 4]}}), "bad tensor shapes"),
        (lambda f: (f / "config.json").write_bytes(os.urandom(200)), "config.json is not valid JSON"),
        (lambda f: (f / "config.json").write_text("[1, 2]"), "config.json holds a JSON list"),
        (lambda f: edit_config(f, hidden_size=64), "do not match its config.json: model.embed_tokens.weight is (64, 32)"),
        (lambda f: edit_config(f, vocab_size=10**12), "do not match its config.json: model.embed_tokens.weight"),
        (lambda f: edit_weights(f, lambda w: w.pop("model.norm.weight")), "1 missing tensor(s), e.g. model.norm.weight"),
        (lambda f: edit_weights(f, lambda w: w.update(extra=torch.zeros(2))), "1 unexpected tensor(s), e.g. extra"),
    ],
)
def test_damaged_folders_are_one_user_error_naming_the_file(model_dir, tmp_path, damage, message):
    folder = copy(model_dir, tmp_path)
    damage(folder)
    with pytest.raises(UserError) as error:
        load(folder)
    assert str(error.value).startswith("--model: ") and message in str(error.value), error.value
    assert str(folder) in str(error.value) and "\n" not in str(error.value)


def _mutations():
    """(file, how) pairs: cut a file short, overwrite bytes somewhere, replace it by random bytes, or set a config
    key to a value of another size or type."""
    cut = st.tuples(st.just("cut"), st.sampled_from(["model.safetensors", "config.json"]), st.floats(0, 0.999))
    flip = st.tuples(st.just("flip"), st.sampled_from(["model.safetensors", "config.json"]), st.floats(0, 1), st.binary(min_size=1, max_size=16))
    noise = st.tuples(st.just("noise"), st.sampled_from(["model.safetensors", "config.json"]), st.binary(max_size=64))
    key = st.sampled_from(["hidden_size", "vocab_size", "num_attention_heads", "intermediate_size", "pattern", "model_type"])
    value = st.one_of(st.integers(-2, 200), st.sampled_from(["MM", "MAM", "A", "llama", "", None]), st.floats(allow_nan=True))
    config = st.tuples(st.just("config"), key, value)
    return st.lists(st.one_of(cut, flip, noise, config), min_size=1, max_size=3)


def _apply(folder, mutation):
    kind, *args = mutation
    if kind == "config":
        try:
            edit_config(folder, **{args[0]: args[1]})
        except ValueError:  # config.json already damaged by an earlier mutation
            pass
        return
    path = folder / args[0]
    data = path.read_bytes()
    if kind == "cut":
        path.write_bytes(data[: int(args[1] * len(data))])
    elif kind == "flip":
        at = int(args[1] * len(data))
        path.write_bytes(data[:at] + args[2] + data[at + len(args[2]) :])
    else:
        path.write_bytes(args[1])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_mutations())
def test_any_damaged_folder_loads_or_is_one_user_error(model_dir, tmp_path, mutations):
    folder = copy(model_dir, tmp_path)
    for mutation in mutations:
        _apply(folder, mutation)
    try:
        load(folder)
    except UserError as error:
        assert str(error).startswith("--model: ") and "\n" not in str(error)


@pytest.mark.parametrize("path", ["runs/no-such-run", "./missing", "a/b/c", "nosuchorg/nosuchmodel", "~/nowhere"])
def test_a_missing_local_path_fails_in_seconds_without_the_hub(monkeypatch, path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: even an org/name that looks like a hub name is not looked up
    started = time.perf_counter()
    with pytest.raises(UserError, match=f"^--model: model folder not found: {path}$"):
        open_model(path, "--model")
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("path", ["", " "])
def test_an_empty_path_is_not_the_current_folder(path):
    with pytest.raises(UserError, match="^distill.teacher: give a model folder, got an empty path$"):
        open_model(path, "distill.teacher")


def test_a_model_folders_own_code_runs_only_when_trusted(model_dir, tmp_path):
    folder = copy(model_dir, tmp_path)
    ran = tmp_path / "ran"
    (folder / "custom.py").write_text(
        f"import pathlib\npathlib.Path({str(ran)!r}).touch()\n"
        "from lctk.models.config import HybridConfig\n\nclass CustomConfig(HybridConfig):\n    model_type = 'custom'\n"
    )
    edit_config(folder, model_type="custom", auto_map={"AutoConfig": "custom.CustomConfig"})
    with pytest.raises(UserError, match="--trust-remote-code|trust_remote_code"):
        open_model(str(folder), "--model")
    assert not ran.exists()
    with trusting_remote_code(True):
        try:
            open_model(str(folder), "--model")
        except UserError:
            pass  # the custom config need not build a model; that its code ran is the point
    assert ran.exists()


def test_train_init_from_a_damaged_folder_is_one_line(model_dir, tmp_path):
    from types import SimpleNamespace

    from lctk.train.run import _build_model

    folder = copy(model_dir, tmp_path)
    os.truncate(folder / "model.safetensors", 500)
    recipe = SimpleNamespace(model=SimpleNamespace(init_from=str(folder)))
    with pytest.raises(UserError, match=f"^model.init_from: {folder}/model.safetensors is truncated"):
        _build_model(recipe, tokenizer=None)


@pytest.mark.parametrize("command", ["eval", "train", "distill", "extend"])
def test_every_command_that_loads_a_model_has_the_trust_flag(command):
    from typer.testing import CliRunner

    from lctk.cli import app

    assert "--trust-remote-code" in CliRunner().invoke(app, [command, "--help"], terminal_width=200).output
