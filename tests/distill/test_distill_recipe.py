"""The distill section's defaults follow the references; older recipes' freeze booleans keep their meaning."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lctk.distill.recipe import DistillSection


def test_defaults_train_every_converted_mixer_and_probe_100_steps():
    section = DistillSection(teacher="t", stages=[{"replace": 1, "by": "mmr"}, {"replace": "+1", "by": "loo-layer"}])
    assert section.freeze == "mixers" and section.stages[0].freeze is None
    assert section.stages[0].probe_steps == 100 and section.end_to_end.steps == 0


def test_older_freeze_booleans_read_as_new_and_none():
    section = DistillSection(teacher="t", freeze=True, stages=[{"replace": 1, "freeze": False}])
    assert (section.freeze, section.stages[0].freeze) == ("new", "none")
    with pytest.raises(ValidationError, match="freeze"):
        DistillSection(teacher="t", freeze="some", stages=[{"replace": 1}])
