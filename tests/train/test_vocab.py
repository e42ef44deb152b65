"""A model section that cannot hold the tokenizer's ids is refused before the run writes anything."""

from __future__ import annotations

import sys

import pytest


def test_a_vocab_smaller_than_the_tokenizer_names_model_vocab_size(tmp_path, monkeypatch, capsys, make_recipe):
    from lctk.cli import main

    path = make_recipe(tmp_path, model={"vocab_size": 10})
    monkeypatch.setattr(sys, "argv", ["lctk", "train", str(path)])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.vocab_size: 10 is smaller than the tokenizer's 257 tokens"), err
    assert not (tmp_path / "runs").exists()
