"""Recipes: the YAML files that drive `lctk train` (and distill / extend), validated by pydantic.

`load_recipe(path, overrides)` is the single entry point: it reads the YAML (syntax errors name file:line), applies
`--set a.b=c` overrides (the value is parsed as YAML), picks the recipe kind and validates it. Every problem becomes
one `UserError` line naming the key, e.g. `train.lrr: unknown key (did you mean 'lr'?)`.

Kinds: a recipe with a top-level `distill:` section is a distill recipe, one with `extend:` an extend recipe, any
other a train recipe (`kind:` may say it explicitly). A kind is a `Recipe` subclass registered in `RECIPE_KINDS` as
"module:Class"; distill and extend add their own sections by subclassing `Recipe` and reuse the shared ones below.
Sections are strict (`Section`): unknown keys are errors and values are not coerced across types (YAML already
gives typed values), except where a field says otherwise.

No run starts from defaults alone: a train recipe needs `model:` and `train:` (steps or tokens), a distill recipe
`distill:` and `train:`, an extend recipe `extend:` (and `train:` when a stage takes its steps from it). The other
sections have defaults: `data` is the builtin text at seq_len 512, `tokenizer` bpe:8192, no eval suites.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from lctk.data.tasks import check_task
from lctk.errors import UserError
from lctk.schema import Section, describe_error, suggest
from lctk.sizes import parse_size


def _yaml_float(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads 1e-3 as a string; take such strings as the numbers they spell."""
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", value):
        return float(value)
    return value


def _float32(value: float) -> float:
    """Recipe numbers end up in float32 tensors (learning rates, weights, scales): one past float32's range would
    only fail mid-run."""
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"{value:g} is beyond the range of float32 numbers ({FLOAT32_MAX:.3g})")
    return value


FLOAT32_MAX = 3.4028234663852886e38
Float = Annotated[float, BeforeValidator(_yaml_float), AfterValidator(_float32)]
Beta = Annotated[Float, Field(ge=0, lt=1)]  # an Adam moment's decay


class RunSection(Section):
    name: str = "run"
    output_dir: str | None = None  # default runs/<name>
    seed: int = Field(0, ge=0, lt=2**32)  # numpy's seed range (accelerate's set_seed seeds numpy too)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        # a name that is a path could put the run (and what --overwrite deletes) anywhere: paths go in run.output_dir
        if name.strip() in ("", ".", "..") or any(c in name for c in "/\\\0"):
            raise ValueError(f"must be a plain folder name (no '/', '..' or absolute path; put paths in "
                             f"run.output_dir), got {name!r}")
        if len(name.encode()) > 255:  # found here, not when the folder is made after the data is tokenised
            raise ValueError(f"is {len(name.encode())} bytes long; a folder name may have at most 255")
        return name

    @property
    def dir(self) -> Path:
        return Path(self.output_dir).expanduser() if self.output_dir else Path("runs") / self.name  # not a "~" folder


FROM_TOKENIZER = ("use_cache", "pad_token_id", "bos_token_id", "eos_token_id")  # set by lctk, not by recipes


def _model_fields() -> dict[str, Any]:
    """The recipe's `model:` keys: HybridConfig's own settings (so a mixer section added to HybridConfig is accepted
    here with no change), all optional: unset keys take HybridConfig's defaults."""
    from lctk.models.config import HybridConfig

    fields: dict[str, Any] = {}
    for name, annotation in HybridConfig.__annotations__.items():
        if name in FROM_TOKENIZER:
            continue
        hint = eval(annotation, {}) if isinstance(annotation, str) else annotation  # annotations are "int | None" etc.
        hint = Float if hint is float else hint
        fields[name] = (hint | None, None)
    fields["rope_theta"] = (Float | None, None)  # shorthand for rope_parameters.rope_theta
    fields["init_from"] = (str | None, Field(None, description="start from this checkpoint / HF folder"))
    return fields


ModelSection = create_model("ModelSection", __base__=Section, **_model_fields())


def _count(value: Any) -> Any:
    """Accept 10_000, "10k", "5M", "1.5B" for token counts (the field checks integers itself)."""
    if isinstance(value, str):
        try:
            return parse_size(value, base=1000)
        except ValueError:
            raise ValueError(f"expected a count such as 500000, 500k or 2M, got {value!r}") from None
    return value


class TrainSection(Section):
    steps: int | None = Field(None, gt=0)
    tokens: int | None = Field(None, gt=0, description="alternative to steps: total training tokens")
    batch_size: int = Field(8, gt=0, description="rows per process (per context-parallel group) per micro-step")
    grad_accum: int = Field(1, gt=0)
    lr: Float = Field(3e-4, gt=0)
    min_lr_ratio: Float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    decay_fraction: Float = Field(0.2, gt=0, le=1, description="wsd: share of the steps spent decaying")
    weight_decay: Float = Field(0.1, ge=0)
    betas: tuple[Beta, Beta] = Field((0.9, 0.95), strict=False)
    eps: Float = Field(1e-8, gt=0)
    clip: Float | None = Field(1.0, gt=0, description="max grad norm; null disables clipping")
    precision: Literal["fp32", "bf16"] = "bf16"
    activation_checkpointing: bool = False
    recompute_segment: int | None = Field(
        None, gt=0, description="lctk hybrids: rows longer than this run norm + MLP and Mamba-2 in recomputed segments")
    compile: bool = False
    max_bad_steps: int = Field(10, gt=0, description="non-finite losses in a row that stop the run")
    context_parallel: int = Field(1, gt=0, description="processes that split each row (world = data parallel x this)")

    _tokens_count = field_validator("tokens", mode="before")(_count)

    @model_validator(mode="after")
    def _length(self) -> TrainSection:
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("steps: give exactly one of train.steps or train.tokens")
        return self

    def total_steps(self, seq_len: int, world_size: int) -> int:
        if self.steps is not None:
            return self.steps
        per_step = self.batch_size * self.grad_accum * world_size * seq_len
        return max(1, -(-self.tokens // per_step))


class GenerateSection(Section):
    """A `generate:` source (distill recipes only): continuations sampled from the teacher, prompted by the first
    `prompt_tokens` tokens of text pieces of `prompts` (builtin or a local text source), until `tokens` new tokens
    have been asked for (rows that end at end-of-text give fewer). See lctk.data.generated."""

    prompts: str = Field("builtin", description="builtin, or a local txt/jsonl/parquet/csv file or folder")
    field: str = "text"  # the column holding the prompt text (jsonl, parquet)
    tokens: int = Field(gt=0, description="new tokens to generate in all (the number of prompts x max_new_tokens)")
    prompt_tokens: int = Field(32, gt=0)
    max_new_tokens: int = Field(256, gt=0)
    temperature: Float = Field(1.0, ge=0, description="0: greedy")
    top_p: Float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: no top-k cut")
    batch_size: int = Field(32, gt=0, description="rows generated together per process")
    seed: int = Field(0, ge=0, lt=2**32, description="prompt order and sampling (independent of run.seed)")

    _tokens_count = field_validator("tokens", mode="before")(_count)

    @field_validator("prompts")
    @classmethod
    def _prompt_text(cls, prompts: str) -> str:
        if prompts != "builtin" and not Path(prompts).expanduser().exists():
            raise ValueError(f"{prompts!r} is neither builtin nor an existing file or folder")
        return prompts

    def prompt_source(self) -> Source:
        return Source(text=self.prompts, field=self.field)


class Source(Section):
    """One data source: exactly one of `text` (builtin, a local txt/jsonl/parquet/csv file, a folder of them or a
    `datasets.save_to_disk` folder), `hub` (a dataset name, streamed by `datasets.load_dataset`), `task` (a
    synthetic task, see lctk.data.tasks) or `generate` (the teacher's own continuations, distill recipes only).
    Text and generated sources are stored once in a token store (lctk.data.store, lctk.data.generated)."""

    text: str | None = None
    hub: str | None = None
    task: str | None = None
    generate: GenerateSection | None = None
    weight: Float = Field(1.0, gt=0)
    field: str = "text"  # the column holding the text (jsonl, parquet, hub)
    config: str | None = None  # hub dataset configuration
    split: str = "train"
    revision: str | None = None  # hub dataset revision (branch, tag or commit); pin it to rebuild when it changes
    max_documents: int | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, gt=0, description="stop reading the source after this many tokens")
    options: dict[str, Any] = Field(default_factory=dict)  # task settings, see lctk.data.tasks

    _tokens_count = field_validator("max_tokens", mode="before")(_count)

    @model_validator(mode="after")
    def _one_kind(self) -> Source:
        given = [k for k in ("text", "hub", "task", "generate") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a source needs exactly one of text, hub, task or generate")
        if self.task is None and self.options:
            raise ValueError("options: only a task source takes options")
        if self.task is not None:
            check_task(self.task, self.options)
        return self

    @property
    def label(self) -> str:
        return self.text or self.hub or self.task or f"teacher generations prompted by {self.generate.prompts}"


class DataSection(Section):
    seq_len: int = Field(512, gt=1)
    sources: list[Source] = Field(default_factory=lambda: [Source(text="builtin")], min_length=1)
    held_out: Float = Field(0.01, ge=0, lt=0.5, description="share of text documents kept for the held-out loss")
    cache_dir: str | None = None  # default: lctk's cache folder

    @model_validator(mode="after")
    def _task_lengths(self) -> DataSection:
        for index, source in enumerate(self.sources):
            for key in ("min_length", "max_length") if source.task else ():
                length = source.options.get(key)
                if length is not None and length > self.seq_len:
                    raise ValueError(
                        f"sources.{index}.options.{key}: {length} tokens do not fit data.seq_len {self.seq_len}"
                    )
            if source.generate is not None and source.generate.prompt_tokens >= self.seq_len:
                raise ValueError(f"sources.{index}.generate.prompt_tokens: {source.generate.prompt_tokens} tokens "
                                 f"leave nothing to generate in rows of data.seq_len {self.seq_len}")
        return self


class CheckpointSection(Section):
    every: int | None = Field(500, gt=0, description="steps between checkpoints; null: only at the end")
    keep_last: int = Field(2, gt=0)


class WandbSection(Section):
    # None: WANDB_MODE / WANDB_PROJECT when set, else disabled / "lctk" (lctk.train.tracking)
    mode: Literal["offline", "online", "disabled"] | None = None
    project: str | None = None
    entity: str | None = None
    name: str | None = None  # default: run.name
    tags: list[str] = Field(default_factory=list)


class LoggingSection(Section):
    every: int = Field(10, gt=0)
    wandb: WandbSection = Field(default_factory=WandbSection)
    trackers: list[str] = Field(default_factory=list, description="more accelerate trackers: tensorboard, mlflow, ...")


class EvalSection(Section):
    """Eval suites (lctk.evals) run on the final model, and on the untrained one too when `before` is true."""

    suites: list[str] = Field(default_factory=list)
    lengths: list[Any] = Field(default_factory=lambda: ["1x"], description="tokens, '4k', or 'Nx' times data.seq_len")
    limit: int | None = Field(None, gt=0, description="samples per length (and depth)")
    before: bool = True
    held_out_loss: bool = True
    options: dict[str, Any] = Field(default_factory=dict)  # more lctk.evals.settings.EvalSettings fields

    # EvalSettings fields that come from this section's own keys or the run
    SET_BY_RUN: typing.ClassVar = ("suites", "lengths", "limit", "seed", "allow_longer")

    def token_lengths(self, seq_len: int) -> list[int]:
        return [_length_in_tokens(value, seq_len) for value in self.lengths]

    def settings(self, reference_length: int, seed: int, default_limit: int | None = None):
        """The EvalSettings of this section: lengths resolved against reference_length (data.seq_len, or the length a
        model was trained at), lengths past the model's limit allowed (measuring there is the point)."""
        from lctk.evals.settings import EvalSettings

        limit = self.limit or default_limit
        return EvalSettings(suites=tuple(self.suites), lengths=self.token_lengths(reference_length), seed=seed,
                            allow_longer=True, **({"limit": limit} if limit else {}), **self.options)

    def run(self, model, tokenizer, reference_length: int, seed: int, out_dir: Path, name: str,
            default_limit: int | None = None) -> dict:
        """Run this section's suites on `model` into out_dir (what train, distill and extend end with)."""
        from lctk.evals.runner import run_suites

        settings = self.settings(reference_length, seed, default_limit)
        return run_suites(model, tokenizer, settings, output_dir=out_dir, model_name=name, progress=False)

    @field_validator("lengths")
    @classmethod
    def _valid_lengths(cls, values: list[Any]) -> list[Any]:
        for value in values:
            _length_in_tokens(value, 1)
        return values

    @field_validator("suites")
    @classmethod
    def _known_suites(cls, names: list[str]) -> list[str]:
        if names:
            from lctk.evals.settings import parse_suites

            try:
                parse_suites(names)
            except UserError as error:
                raise ValueError(str(error).removeprefix("--suite: ")) from None
        return names

    @field_validator("options")
    @classmethod
    def _known_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        from lctk.evals.settings import EvalSettings

        known = [f.name for f in dataclasses.fields(EvalSettings) if f.init and f.name not in cls.SET_BY_RUN]
        for name in options:
            if name not in known:
                raise ValueError(f"{name}: unknown eval option{suggest(name, known)}; known: {', '.join(known)}")
        return options

    @model_validator(mode="after")
    def _option_values(self) -> EvalSection:
        """Each option's value gets the checks `lctk eval` makes on its flag, here rather than after training."""
        from lctk.evals.settings import MAX_LENGTH, EvalSettings

        planned = {"suites": self.suites, "lengths": [MAX_LENGTH], "limit": self.limit or 1}  # lengths: checked above
        for name, value in self.options.items():
            if not (self.suites or name == "lm_eval"):
                continue
            try:
                EvalSettings(**planned, **{name: value})
            except UserError as error:
                raise ValueError(f"options.{name}: {str(error).split(': ', 1)[-1]}") from None
            except (TypeError, ValueError):  # e.g. a string where a number goes
                raise ValueError(f"options.{name}: not a valid value for this option, got {value!r}") from None
        return self


def _length_in_tokens(value: Any, seq_len: int) -> int:
    try:
        return parse_size(value, base=1024, relative_to=seq_len)
    except ValueError:
        raise ValueError(f"expected a length such as 4096, '4k' or '2x' (times data.seq_len), got {value!r}") from None


class Recipe(Section):
    """Sections every kind shares."""

    kind: str | None = None  # each kind's class narrows it to its own name
    run: RunSection = Field(default_factory=RunSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    eval: EvalSection = Field(default_factory=EvalSection)

    @model_validator(mode="after")
    def _generate_needs_a_teacher(self) -> Recipe:
        for index, source in enumerate(self.data.sources):
            if source.generate is not None and self.kind != "distill":
                raise ValueError(f"data.sources.{index}.generate: only a distill recipe has a teacher to generate "
                                 f"from (this is a {self.kind} recipe)")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class TrainRecipe(Recipe):
    kind: Literal["train"] = "train"
    model: ModelSection
    tokenizer: str = Field("bpe:8192", description="'bytes', 'bpe:<vocab size>' or a local tokenizer folder")

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_spec(cls, spec: str) -> str:
        from lctk.data.tokenizer import check_tokenizer_spec

        check_tokenizer_spec(spec)
        return spec

    @model_validator(mode="after")
    def _model_shape(self) -> TrainRecipe:
        if self.model.init_from is None:
            # raises on an impossible shape; the vocabulary is a lower bound until the tokenizer is known
            rows = self.train.batch_size * -(-self.data.seq_len // self.train.context_parallel)
            _check_fits(self.hybrid_config(vocab_size=self.model.vocab_size or 256), rows)
            return self
        ignored = [name for name, value in self.model if value is not None and name != "init_from"]
        if ignored:  # the loaded model keeps its own config: a setting next to init_from would silently do nothing
            raise ValueError(f"model.{ignored[0]}: init_from keeps the loaded model's config; remove {ignored[0]}")
        return self

    def hybrid_config(self, vocab_size: int, **token_ids: Any):
        """The HybridConfig this recipe describes."""
        from lctk.models.config import HybridConfig

        settings = {k: v for k, v in self.model.model_dump(exclude={"init_from"}).items() if v is not None}
        settings["vocab_size"] = self.model.vocab_size or vocab_size
        try:
            return HybridConfig(**settings, **token_ids)
        except (ValueError, TypeError) as error:  # HybridConfig names the bad setting: "mamba2.head_dim: ..."
            raise UserError(f"model.{error}") from None


def _check_fits(config, tokens: int) -> None:
    """A model or batch too large for this machine fails here in one line, not in the allocator (or the OOM killer)
    mid-run: the model is first built on the CPU in fp32, so its weights alone must fit in the machine's memory, and a
    micro-step of `tokens` keeps at least one fp32 hidden state per token and layer for the backward pass, which must
    fit in the host's or the GPU's memory."""
    import psutil
    import torch

    from lctk.models.modeling import parameter_count

    try:
        count = parameter_count(config)
    except (OverflowError, RuntimeError, TypeError):  # a size past what torch can index, e.g. hidden_size: 1e30
        count = float("inf")
    memory = psutil.virtual_memory().total
    if 4 * count > memory:
        raise UserError(
            f"model: {count:.3g} parameters need {4 * count / 2**30:.3g} GiB in fp32, more than this machine's "
            f"{memory / 2**30:.3g} GiB of memory (see hidden_size, intermediate_size, vocab_size and the pattern)"
        )
    activations = 4 * tokens * config.hidden_size * len(config.pattern)
    memory = max(memory, torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0)
    if activations > memory:
        raise UserError(
            f"train.batch_size: {tokens} tokens per micro-step (train.batch_size x data.seq_len) need at least "
            f"{activations / 2**30:.3g} GiB of activations for this model, more than the {memory / 2**30:.3g} GiB here"
        )


RECIPE_KINDS: dict[str, str] = {
    "train": "lctk.recipe:TrainRecipe",
    "distill": "lctk.distill.recipe:DistillRecipe",
    "extend": "lctk.extend.recipe:ExtendRecipe",
}


def recipe_kind(raw: dict[str, Any]) -> str:
    if raw.get("kind") is not None:
        kind = raw["kind"]
        if not isinstance(kind, str) or kind not in RECIPE_KINDS:
            raise UserError(f"kind: unknown recipe kind {kind!r}{suggest(str(kind), RECIPE_KINDS)}; known: {', '.join(RECIPE_KINDS)}")
        return kind
    return next((kind for kind in RECIPE_KINDS if kind != "train" and kind in raw), "train")


def recipe_class(kind: str) -> type[Recipe]:
    module_name, class_name = RECIPE_KINDS[kind].split(":")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ModuleNotFoundError, AttributeError):
        raise UserError(f"kind: {kind} recipes are not supported by this version of lctk") from None


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = (), kind: str | None = None) -> Recipe:
    """Read, override and validate a recipe. `kind` forces the recipe kind (the command knows which it runs)."""
    raw = read_yaml(path)
    for override in overrides:
        apply_override(raw, override)
    found = recipe_kind(raw)  # an explicit `kind:` must be known even where the command forces the kind
    if kind is not None and raw.get("kind") not in (None, kind):
        raise UserError(f"kind: {path} is a recipe of kind {found}; run it with `lctk {found}`")
    kind = kind or found
    schema = recipe_class(kind)
    if not raw:  # an empty file starts no run on defaults
        required = [name for name, field in schema.model_fields.items() if field.is_required()]
        raise UserError(f"{path}: the recipe is empty; {kind} recipes need at least {' and '.join(required)}")
    raw.setdefault("kind", kind)
    return validate_recipe(raw, schema)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a recipe that sets a key twice is refused (YAML 1.2 forbids it too),
    since which value wins is no safer a guess than a typo."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may repeat
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            if isinstance(key, typing.Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file {path} not found")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UserError(f"{where}: YAML syntax error: {error.problem or error.context}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not a readable YAML file ({type(error).__name__})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a mapping of sections (run:, model:, data:, train:, ...), got {type(raw).__name__}")
    return raw


def apply_override(raw: dict[str, Any], override: str) -> None:
    """`a.b.c=value`: set a nested key (list items by index), creating mappings on the way; value parsed as YAML."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {override!r}: expected KEY=VALUE, e.g. train.steps=100")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text  # not YAML: take it as a plain string
    parts = key.strip().split(".")
    if not all(parts):
        raise UserError(f"--set {override!r}: {key.strip()!r} has an empty part; keys are joined by single dots")
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        here = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"--set {key}: {here} is not an index of a list of {len(node)} items")
            index = int(part)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise UserError(f"--set {key}: {'.'.join(parts[:depth])} is a value, not a section")


def validate_recipe(raw: dict[str, Any], schema: type[Recipe]) -> Recipe:
    try:
        return schema.model_validate(raw)
    except ValidationError as error:
        raise UserError(describe_error(error, schema)) from None
