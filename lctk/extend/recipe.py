"""The `extend:` section of an extend recipe (run / data / train / checkpoint / logging / eval are the shared
sections of `lctk.recipe.Recipe`; `train` holds the optimiser settings of the continued-training stages).

    extend:
      model: runs/quickstart/final        # HF folder: an lctk model or a Llama-family model
      factor: 4                           # new length = factor x the original length (or `length: 2048`)
      rope: {method: yarn, beta_fast: 32, beta_slow: 1}      # attention layers (lctk.extend.rope)
      recurrent:                          # Mamba-2 layers, applied in order (lctk.extend.recurrent)
        - {method: state_norm, margin: 1.0}
        - {method: calibrate_dt, grid: [0.5, 1, 2], sweeps: 1}
      calibration: {text: builtin, rows: 2}   # text for state_norm (in-length) and calibrate_dt (target length)
      long_share: 0.5                     # continued training: share of rows cut from long documents
      stages:                             # optional continued training at growing lengths
        - {seq_len: 2x, steps: 100, lr: 3e-4, rope: {factor: 2}}
        - {seq_len: 4x, steps: 100}

Lengths written `Nx` are N times the model's original length (here and in `eval.lengths`). A stage trains at
its seq_len with the rope method at its own `rope.factor` (default: extend.factor); the finished model gets
extend.factor. Rows mix long documents (cut at seq_len) with short ones (cut at the original length and packed,
boundaries kept) in the share long_share : 1 - long_share, so the model keeps its short-context skill.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from lctk.extend.recurrent import check_recurrent
from lctk.extend.rope import MAX_FACTOR, check_factor, check_rope
from lctk.recipe import EvalSection, Recipe, Section, TrainSection

_TIMES = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*[xX]\s*$")


def tokens_at(value: int | str, original: int) -> int:
    """A length in tokens: an integer, or "Nx" = N times the original length."""
    if isinstance(value, str):
        return int(round(float(_TIMES.match(value).group(1)) * original))
    return value


def _check_length(value: int | str) -> None:
    if isinstance(value, str):
        if not _TIMES.match(value) or not 1 <= float(_TIMES.match(value).group(1)) <= MAX_FACTOR:
            raise ValueError(f"expected tokens or 'Nx' (N times the original length, 1 <= N <= {MAX_FACTOR}), got {value!r}")
    elif value < 2:
        raise ValueError(f"must be at least 2 tokens, got {value}")


class RopeParams(Section):
    beta_fast: float | None = Field(None, strict=False)
    beta_slow: float | None = Field(None, strict=False)
    attention_factor: float | None = Field(None, strict=False)
    low_freq_factor: float | None = Field(None, strict=False)
    high_freq_factor: float | None = Field(None, strict=False)
    rope_theta: float | None = Field(None, strict=False)

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(exclude={"method", "factor"}).items() if v is not None}


class RopeSection(RopeParams):
    method: str

    @model_validator(mode="after")
    def _valid(self) -> RopeSection:
        check_rope(self.method, self.params())
        return self


class StageRope(RopeParams):
    """A stage's RoPE: extend.rope's method, its parameters overridden here, at `factor`."""

    factor: float | None = Field(None, strict=False)


class RecurrentStep(Section):
    method: str
    scale: float | list[float | None] | None = None
    margin: float | None = Field(None, strict=False)
    every: int | None = None
    window: int | None = None
    grid: list[float] | None = None
    sweeps: int | None = None

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(exclude={"method"}).items() if v is not None}

    @model_validator(mode="after")
    def _valid(self) -> RecurrentStep:
        check_recurrent(self.method, self.params())
        return self


class CalibrationSection(Section):
    text: str = Field("builtin", description="'builtin' (its training split) or a local .txt file")
    rows: int = Field(2, gt=0, description="sequences per calibration batch")


class StageSection(Section):
    seq_len: int | str
    steps: int | None = Field(None, gt=0, description="default: train.steps")
    lr: float | None = Field(None, gt=0, strict=False, description="default: train.lr")
    rope: StageRope | None = None
    long_share: float | None = Field(None, ge=0, le=1, strict=False)

    @model_validator(mode="after")
    def _valid(self) -> StageSection:
        try:
            _check_length(self.seq_len)
        except ValueError as error:
            raise ValueError(f"seq_len: {error}") from None
        if self.rope is not None and self.rope.factor is not None:
            check_factor(self.rope.factor)
        return self


class ExtendSection(Section):
    model: str
    factor: float | None = Field(None, strict=False)
    length: int | None = Field(None, gt=1)
    rope: RopeSection | None = None
    recurrent: list[RecurrentStep] = Field(default_factory=list)
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    long_share: float = Field(0.5, ge=0, le=1, strict=False)
    stages: list[StageSection] = Field(default_factory=list)

    @model_validator(mode="after")
    def _valid(self) -> ExtendSection:
        if (self.factor is None) == (self.length is None):
            raise ValueError("factor: give exactly one of extend.factor or extend.length")
        if self.factor is not None:
            check_factor(self.factor)
        if self.rope is None and not self.recurrent and not self.stages:
            raise ValueError("rope: nothing to do: give extend.rope, extend.recurrent or extend.stages")
        methods = [step.method for step in self.recurrent]
        if {"state_norm", "state_window"} <= set(methods):  # each caps the state its own way
            raise ValueError(f"recurrent.{methods.index('state_window')}.method: state_window cannot be combined "
                             "with state_norm")
        if any(stage.rope is not None for stage in self.stages) and self.rope is None:
            raise ValueError("stages: a stage's rope settings need extend.rope (the method)")
        return self


class ExtendEvalSection(EvalSection):
    """The shared eval section with extend's defaults: per-position loss, passkey and state statistics at 1x, 2x,
    4x and 8x the original length, before and after."""

    suites: list[str] = Field(default_factory=lambda: ["perplexity", "passkey", "state-collapse"])
    lengths: list[Any] = Field(default_factory=lambda: ["1x", "2x", "4x", "8x"])
    limit: int | None = Field(5, gt=0)


class ExtendRecipe(Recipe):
    kind: Literal["extend"] = "extend"
    extend: ExtendSection
    eval: ExtendEvalSection = Field(default_factory=ExtendEvalSection)
    # optimiser settings of the stages: a training-free extension needs no train section
    train: TrainSection = Field(default_factory=lambda: TrainSection(steps=1000))

    @model_validator(mode="after")
    def _stage_steps(self) -> ExtendRecipe:
        for index, stage in enumerate(self.extend.stages):
            if stage.steps is None and "train" not in self.model_fields_set:
                raise ValueError(f"extend.stages.{index}.steps: give the stage's steps, or train.steps for every stage")
        return self
