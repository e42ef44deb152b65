"""Recipes: loading, overrides, and one-line errors naming the key for every kind of bad input."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lctk.errors import UserError
from lctk.recipe import TrainRecipe, apply_override, load_recipe, validate_recipe

RECIPES = sorted(p for p in (Path(__file__).parents[1] / "recipes").glob("**/*.yaml") if p.parent.name != "accelerate")

BASE = {
    "run": {"name": "t"},
    "model": {"pattern": "MA", "hidden_size": 64, "num_attention_heads": 2, "mamba2": {"head_dim": 16}},
    "tokenizer": "bytes",
    "data": {"seq_len": 64, "sources": [{"text": "builtin"}, {"task": "passkey", "weight": 0.5}]},
    "train": {"steps": 10, "lr": "1e-3"},
}


def write(tmp_path: Path, content) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


def error_of(tmp_path: Path, content, overrides=()) -> str:
    with pytest.raises(UserError) as caught:
        load_recipe(write(tmp_path, content), overrides)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_is_valid(path):
    recipe = load_recipe(path)
    assert recipe.kind in ("train", "distill", "extend")


def test_a_recipe_loads_with_defaults_and_scientific_floats(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE))
    assert isinstance(recipe, TrainRecipe)
    assert recipe.train.lr == 1e-3 and recipe.train.schedule == "cosine"
    assert recipe.run.dir == Path("runs/t")
    assert recipe.data.sources[1].weight == 0.5
    config = recipe.hybrid_config(vocab_size=300)
    assert config.mamba2["head_dim"] == 16 and config.vocab_size == 300


def test_overrides_set_nested_keys_list_items_and_parse_values_as_yaml(tmp_path):
    recipe = load_recipe(
        write(tmp_path, BASE),
        ["train.steps=7", "model.hidden_size=32", "data.sources.1.weight=2", "train.betas=[0.8, 0.9]", "run.name=x"],
    )
    assert recipe.train.steps == 7 and recipe.model.hidden_size == 32
    assert recipe.data.sources[1].weight == 2.0 and recipe.train.betas == (0.8, 0.9) and recipe.run.name == "x"


def test_a_run_folder_under_home_is_not_a_folder_named_tilde(tmp_path):
    assert load_recipe(write(tmp_path, BASE), ["run.output_dir=~/runs/x"]).run.dir == Path.home() / "runs" / "x"


def test_tokens_budget_accepts_suffixes_and_gives_steps(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE), ["train.steps=null", "train.tokens=1M", "train.batch_size=4"])
    assert recipe.train.tokens == 1_000_000
    assert recipe.train.total_steps(seq_len=64, world_size=2) == -(-1_000_000 // (4 * 2 * 64))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lrr=0.1", "train.lrr: unknown key (did you mean 'lr'?)"),
        ("trian.steps=3", "trian: unknown key (did you mean 'train'?)"),
        ("model.hiden_size=3", "model.hiden_size: unknown key (did you mean 'hidden_size'?)"),
        ("data.sources.0.wieght=3", "data.sources.0.wieght: unknown key (did you mean 'weight'?)"),
        ("train.steps=abc", "train.steps: input should be a valid integer"),
        ("train.lr=-1", "train.lr: input should be greater than 0"),
        ("train.precision=fp8", "train.precision: input should be 'fp32' or 'bf16'"),
        ("model.mamba2.head_dim=7", "model.mamba2.head_dim:"),
        ("model.hidden_size=65", "model.hidden_size:"),
        ("model.pattern=MXA", "model.pattern:"),
        ("data.sources.1.task=pasky", "data.sources.1.task: unknown task 'pasky' (did you mean 'passkey'?)"),
        ("data.sources.1.options={min_lenght: 3}", "data.sources.1.options.min_lenght: unknown key"),
        ("data.sources.0.hub=x/y", "data.sources.0: a source needs exactly one of text, hub, task or generate"),
        ("train.tokens=5", "train.steps: give exactly one of train.steps or train.tokens"),
        ("tokenizer=bpe:12", "tokenizer: expected bpe:<vocab size>"),
        ("eval.lengths=[2y]", "eval.lengths: expected a length"),
        ("kind=trian", "kind: unknown recipe kind 'trian' (did you mean 'train'?)"),
        ("eval.suites=[pasky]", "eval.suites: unknown suite 'pasky'"),
        ("eval.options={batch_sise: 2}", "eval.options.batch_sise: unknown eval option (did you mean 'batch_size'?)"),
        # accepted nonsense until issue 12
        ("kind=[1]", "kind: unknown recipe kind [1]"),
        ("train.lr=.inf", "train.lr: input should be a finite number, got inf"),
        ("data.sources.1.weight=.nan", "data.sources.1.weight: input should be a finite number"),
        ("train.betas=[0.9, 1.5]", "train.betas.1: input should be less than 1"),
        ("run.seed=-1", "run.seed: input should be greater than or equal to 0"),
        ("model.num_key_value_heads=0", "model.num_key_value_heads: must be a positive integer, got 0"),
        ("model.head_dim=0", "model.head_dim: must be a positive integer, got 0"),
        ("model.intermediate_size=-4", "model.intermediate_size: must be a positive integer, got -4"),
        ("model.initializer_range=-0.02", "model.initializer_range: must be a positive finite number"),
        ("model.rms_norm_eps=-1", "model.rms_norm_eps: must be a positive finite number, got -1"),
        ("model.mamba2.dt_max=0", "model.mamba2.dt_max: must be a positive finite number, got 0"),
        ("model.hidden_size=10000000", "model: 2.61e+15 parameters need"),
        ("data.sources.1.options={min_length: 40, max_length: 10}",
         "data.sources.1.options.min_length: 40 is more than max_length 10"),
        ("data.sources.1.options={max_length: 65}", "data.sources.1.options.max_length: 65 tokens do not fit data.seq_len 64"),
        ("data.sources.1.options={min_length: 100}", "data.sources.1.options.min_length: 100 tokens do not fit"),
        ("data.sources.0.options={min_length: 3}", "data.sources.0.options: only a task source takes options"),
        ("model.init_from=runs/x/final", "model.pattern: init_from keeps the loaded model's config; remove pattern"),
        ("model.hidden_size=1000000000000000000000000000000", "model: inf parameters need"),  # past torch's sizes
        ("train.lr=1e300", "train.lr: 1e+300 is beyond the range of float32 numbers"),
        ("data.seq_len=1000000000", "train.batch_size: 8000000000 tokens per micro-step (train.batch_size x data.seq_len)"),
        # eval option values are checked before training, not after it
        ("eval={suites: [passkey], options: {batch_size: 0}}", "eval.options.batch_size: must be at least 1, got 0"),
        ("eval={suites: [passkey], options: {max_new_tokens: -1}}", "eval.options.max_new_tokens: must be at least 1"),
        ("eval={suites: [niah], options: {depths: abc}}", "eval.options.depths: not a valid value for this option"),
    ],
)
def test_bad_values_name_their_key_in_one_line(tmp_path, override, expected):
    assert error_of(tmp_path, BASE, [override]).startswith(expected)


@pytest.mark.parametrize(
    ("content", "kind", "expected"),
    [
        ("", "train", "the recipe is empty; train recipes need at least train and model"),  # no default run
        ("# nothing yet\n", "distill", "the recipe is empty; distill recipes need at least train and distill"),
        ({"train": {"steps": 5}}, None, "model: required key missing"),
        ({**BASE, "kind": "extend"}, "train", "is a recipe of kind extend; run it with `lctk extend`"),
        ({**BASE, "kind": "foo"}, "distill", "kind: unknown recipe kind 'foo'"),
        ({**BASE, "kind": "train"}, "distill", "is a recipe of kind train; run it with `lctk train`"),
    ],
)
def test_a_run_needs_its_sections_and_its_own_kind(tmp_path, content, kind, expected):
    with pytest.raises(UserError, match=re.escape(expected)):
        load_recipe(write(tmp_path, content), kind=kind)


EXTEND = {"extend": {"model": "m", "factor": 2, "rope": {"method": "yarn"}}}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["extend.factor=1e12"], "extend.factor: must be at most 1024"),
        (["extend.factor=.inf"], "extend.factor: input should be a finite number"),
        (["extend.stages=[{seq_len: 2x}]"], "extend.stages.0.steps: give the stage's steps, or train.steps"),
        (["extend.stages=[{seq_len: 0.5x, steps: 2}]"], "extend.stages.0.seq_len: expected tokens or 'Nx'"),
        (["extend.stages=[{seq_len: 100000x, steps: 2}]"], "extend.stages.0.seq_len: expected tokens or 'Nx'"),
        (["kind=foo"], "kind: unknown recipe kind 'foo'"),
        (["extend.recurrent=[{method: state_norm}, {method: state_window}]"],
         "extend.recurrent.1.method: state_window cannot be combined with state_norm"),
    ],
)
def test_extend_recipes_refuse_nonsense(tmp_path, overrides, expected):
    assert error_of(tmp_path, EXTEND, overrides).startswith(expected)


DISTILL = {"train": {"steps": 2}, "distill": {"teacher": "t", "stages": [{"replace": 1}]}}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("distill.stages.0={layers: [-1]}", "distill.stages.0.layers.0: input should be greater than or equal to 0"),
        ("distill.stages.0={layers: []}", "distill.stages.0.layers: list should have at least 1 item"),
        ("distill.evidence.passkey_depths=[1.5]", "distill.evidence.passkey_depths.0: input should be less than or equal to 1"),
        ("distill.evidence.cache_lengths=[0]", "distill.evidence.cache_lengths.0: input should be greater than 0"),
        ("distill.evidence.passkey_lengths=[abc]", "distill.evidence.passkey_lengths: expected a length"),
        ("distill.loss.temperature=.inf", "distill.loss.temperature: input should be a finite number"),
        ("train=null", "train: input should be"),
    ],
)
def test_distill_recipes_refuse_nonsense(tmp_path, override, expected):
    assert error_of(tmp_path, DISTILL, [override]).startswith(expected)


def test_a_training_free_extend_recipe_needs_no_train_section_and_stages_take_train_steps(tmp_path):
    assert load_recipe(write(tmp_path, EXTEND)).kind == "extend"
    recipe = load_recipe(write(tmp_path, EXTEND), ["extend.stages=[{seq_len: 2x}]", "train.steps=3"])
    assert recipe.train.steps == 3


def test_the_extend_flag_form_refuses_a_foreign_kind():
    from lctk.extend.command import recipe_from_flags
    from lctk.extend.recipe import ExtendRecipe

    raw = recipe_from_flags("m", ["yarn"], 4.0, None)
    apply_override(raw, "kind=foo")
    with pytest.raises(UserError, match=r"^kind: input should be 'extend', got 'foo'"):
        validate_recipe(raw, ExtendRecipe)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    message = error_of(tmp_path, "run:\n  name: x\ntrain: {steps: 3\nmodel: {}\n")
    assert message.startswith(f"{tmp_path / 'recipe.yaml'}:") and "YAML syntax error" in message
    line = int(message.split(":")[1])
    assert line in (3, 4)


def test_missing_file_and_non_mapping_recipe(tmp_path):
    with pytest.raises(UserError, match="recipe file .*nope.yaml not found"):
        load_recipe(tmp_path / "nope.yaml")
    assert "a recipe is a mapping of sections" in error_of(tmp_path, "- a\n- b\n")


def test_malformed_overrides(tmp_path):
    path = write(tmp_path, BASE)
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        load_recipe(path, ["train.steps"])
    with pytest.raises(UserError, match="not an index"):
        load_recipe(path, ["data.sources.5.weight=1"])
    with pytest.raises(UserError, match="train.steps is a value, not a section"):
        load_recipe(path, ["train.steps.x=1"])
    with pytest.raises(UserError, match="'train..steps' has an empty part"):
        load_recipe(path, ["train..steps=1"])


@pytest.mark.parametrize(("duplicate", "key"), [("train:\n  steps: 3\n", "train"), ("  steps: 200000\n", "steps")])
def test_a_key_given_twice_is_refused_naming_it(tmp_path, duplicate, key):
    rest = yaml.safe_dump({k: v for k, v in BASE.items() if k != "train"})
    message = error_of(tmp_path, rest + "train:\n  steps: 2\n" + duplicate)
    assert re.fullmatch(rf".*recipe.yaml:\d+:\d+: YAML syntax error: duplicate key '{key}'", message), message
    merged = "train:\n  <<: {steps: 2}\n  <<: {lr: 0.001}\n"  # YAML merge keys may repeat
    assert load_recipe(write(tmp_path, rest + merged)).train.steps == 2


def test_apply_override_creates_sections():
    raw: dict = {}
    apply_override(raw, "logging.wandb.mode=online")
    assert raw == {"logging": {"wandb": {"mode": "online"}}}


# --- malformed recipes thrown at the loader and the CLI -------------------------------------------------------

SECTIONS = ["run", "model", "data", "train", "checkpoint", "logging", "eval"]
junk = st.one_of(
    st.text(max_size=8),
    st.integers(-5, 5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def _paths(node, prefix=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield (*prefix, index)
            yield from _paths(value, (*prefix, index))


BASE_PATHS = list(_paths(BASE))


@st.composite
def mutated_recipes(draw):
    """The base recipe with one key replaced by junk, or an extra junk key, or a junk top-level document."""
    kind = draw(st.sampled_from(["replace", "extra", "document"]))
    if kind == "document":
        return draw(st.one_of(junk, st.text(max_size=40)))
    recipe = yaml.safe_load(yaml.safe_dump(BASE))
    if kind == "replace":
        path = draw(st.sampled_from(BASE_PATHS))
    else:
        parent = draw(st.sampled_from([(), *[(s,) for s in SECTIONS if s in BASE]]))
        path = (*parent, draw(st.text(alphabet="abcxyz_", min_size=1, max_size=6)))
    node = recipe
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = draw(junk)
    return recipe


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutated_recipes())
def test_malformed_recipes_load_or_fail_with_one_line(tmp_path, content):
    path = tmp_path / "fuzz.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    try:
        load_recipe(path)
    except UserError as error:
        assert "\n" not in str(error) and str(error)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({**BASE, "train": {"steps": "many"}}, "train.steps"),
        ({**BASE, "modle": {}}, "modle: unknown key (did you mean 'model'?)"),
        ("train: [1, 2\n", "YAML syntax error"),
        ({**BASE, "model": {**BASE["model"], "num_attention_heads": 3}}, "model."),
    ],
)
def test_the_cli_prints_one_line_and_exits_2(tmp_path, monkeypatch, capsys, content, expected):
    from lctk.cli import main

    path = write(tmp_path, content)
    monkeypatch.setattr(sys, "argv", ["lctk", "train", str(path)])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and "\n" not in err and "Traceback" not in err
