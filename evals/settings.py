"""EvalSettings: everything about an eval run that needs no model, in one object checked once.

`lctk eval` builds it from its flags, a recipe's `eval` section from its keys (lctk.recipe.EvalSection.settings),
the Python API directly; run_suites takes it and records it in results.json ("settings"). Suites and lengths may be
written as their flags are (`suites="passkey,niah"`, `lengths="1k,4k"`); a value that cannot work is a UserError
naming the flag, raised when the object is made, so a run fails before its first sample.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from lctk.errors import UserError
from lctk.evals.suites import SUITES
from lctk.sizes import parse_bytes, parse_size
from lctk.tasks import niah, passkey, ruler
from lctk.tasks.tokens import CHAT_MODES

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_LIMIT = 10
MAX_LIMIT = 10**6  # samples per length (and depth)
MAX_LENGTH = 2**25  # tokens (32m): past any model's context, and a prompt that long would not fit in memory to build


@dataclass(frozen=True)
class EvalSettings:
    suites: tuple[str, ...] = ("passkey",)  # as asked: suites, NIAH / RULER task names, passkey variants
    lengths: tuple[int, ...] = (1024,)  # tokens; none without suites (lm-eval tasks alone)
    limit: int = DEFAULT_LIMIT  # samples per length (per length and depth for grids)
    seed: int = 0
    depths: tuple[float, ...] = DEFAULT_DEPTHS
    batch_size: int | str = "auto"  # rows per batch of the batched suites; "auto": as many as memory_budget holds
    memory_budget: int | str | None = None  # bytes ("4GB") for "auto" batches; None: evals.batching.default_budget
    max_new_tokens: int | None = None  # None: each suite's default
    allow_longer: bool = False  # lengths above the model's position limit
    exact: bool = False  # check every prompt against a whole-text tokenisation
    chat_template: str = "auto"  # wrap text prompts in the tokenizer's chat template: auto (when it has one), on, off
    haystack: str | None = None  # the user's essay text (file or folder) for RULER's essay haystack
    qa_data: str | None = None  # folder with RULER's squad.json / hotpotqa.json (else the hub, when online)
    lm_eval: str | None = None  # lm-evaluation-harness tasks, comma separated
    lm_eval_limit: int | None = None  # documents per lm-eval task (None: all)
    lm_eval_include: str | None = None  # a folder of lm-eval task YAML files
    suite_names: tuple[str, ...] = field(init=False)  # the suites that run, in order
    tasks: dict[str, list[str]] = field(init=False)  # suite -> sub-tasks asked for (empty: all)

    def __post_init__(self) -> None:
        names, tasks = parse_suites(self.suites, allow_none=bool(self.lm_eval))
        normal = {
            "suites": tuple(_items(self.suites)),
            "lengths": tuple(parse_lengths(self.lengths)) if names else (),
            "depths": _depths(self.depths),
            "haystack": _existing("--haystack", self.haystack),
            "qa_data": _existing("--qa-data", self.qa_data),
            "lm_eval_include": None if self.lm_eval_include is None else str(self.lm_eval_include),
            "batch_size": _batch_size(self.batch_size),
            "memory_budget": None if self.memory_budget is None else _memory_budget(self.memory_budget),
            "suite_names": tuple(names),
            "tasks": tasks,
        }
        for name, value in normal.items():
            object.__setattr__(self, name, value)
        self._check()

    def _check(self) -> None:
        if self.limit < 1:
            raise UserError(f"--limit: must be at least 1, got {self.limit}")
        if self.limit > MAX_LIMIT:  # every job is listed up front
            raise UserError(f"--limit: at most {MAX_LIMIT} samples per length, got {self.limit}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens: must be at least 1, got {self.max_new_tokens}")
        if self.max_new_tokens is not None and self.lengths and self.max_new_tokens >= min(self.lengths):
            raise UserError(f"--max-new-tokens: {self.max_new_tokens} tokens leave no room for a prompt at the "
                            f"shortest length, {min(self.lengths)} tokens")
        if self.chat_template not in CHAT_MODES:
            raise UserError(f"--chat-template: use one of {', '.join(CHAT_MODES)}, got {self.chat_template!r}")
        if self.lm_eval_limit is not None and self.lm_eval_limit < 1:
            raise UserError(f"--lm-eval-limit: must be at least 1, got {self.lm_eval_limit}")
        if self.lm_eval:
            from lctk.evals.lm_eval_bridge import plan_lm_eval

            plan_lm_eval(self.lm_eval, self.lm_eval_include)

    def record(self) -> dict:
        """The settings as given (JSON): EvalSettings(**record) makes them again."""
        derived = {f.name for f in fields(self) if not f.init}
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in asdict(self).items() if name not in derived}


def parse_lengths(spec: str | Iterable[int | str]) -> list[int]:
    """'1k,4k,16k' -> [1024, 4096, 16384] (k = 1024, m = 1024^2; plain integers are tokens)."""
    lengths = []
    for item in _items(spec):
        try:
            value = parse_size(item, base=1024)
        except ValueError as error:
            raise UserError(f"--lengths: {error} (use e.g. 1k,4k,16k; k = 1024 tokens)") from None
        if value > MAX_LENGTH:
            raise UserError(f"--lengths: {item!r} must be from 1 to {MAX_LENGTH} tokens (32m)")
        lengths.append(value)
    if not lengths:
        raise UserError("--lengths: give at least one length, e.g. 1k,4k")
    return sorted(set(lengths))


def parse_suites(spec: str | Iterable[str], allow_none: bool = False) -> tuple[list[str], dict[str, list[str]]]:
    """Suite names and task names (a niah task selects it in niah, vt / cwe / fwe / qa_1 / qa_2 in ruler, a passkey
    variant in passkey) -> (suites in order, sub-tasks per suite).
    allow_none: no suite is fine (lm-eval tasks alone)."""
    names = [name for name in _items(spec) if name]
    suites, tasks = [], {}
    for name in names:
        suite = "niah" if name in niah.TASKS else "ruler" if name in ruler.TASKS else name
        suite = "passkey" if name in passkey.VARIANTS else suite
        if suite not in SUITES:
            known = ", ".join([*SUITES, "niah_<task>", *ruler.TASKS, *passkey.VARIANTS])
            raise UserError(f"--suite: unknown suite {name!r}; known: {known}")
        if suite not in suites:
            suites.append(suite)
        if name != suite:
            tasks.setdefault(suite, []).append(name)
    if "passkey" in tasks and "passkey" in names:  # "passkey" next to a variant runs both variants
        tasks["passkey"].insert(0, "passkey")
    if not suites and not allow_none:
        raise UserError("--suite: give at least one suite, e.g. passkey,niah (or none with --lm-eval TASKS)")
    return suites, tasks


def _items(spec) -> list:
    """A comma-separated string or an iterable -> its items (strings stripped)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    return [item.strip() if isinstance(item, str) else item for item in items]


def _batch_size(value) -> int | str:
    if value == "auto":
        return value
    try:
        rows = int(value)
    except (TypeError, ValueError):
        raise UserError(f"--batch-size: a number of rows or auto, got {value!r}") from None
    if rows < 1:
        raise UserError(f"--batch-size: must be at least 1, got {rows}")
    return rows


def _memory_budget(value) -> int:
    try:
        return parse_bytes(value)
    except ValueError as error:
        raise UserError(f"--memory-budget: {error}") from None


def _depths(values) -> tuple[float, ...]:
    depths = tuple(float(d) for d in values)
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise UserError(f"--depths: every depth must be within 0..1, got {list(depths)}")
    return depths


def _existing(flag: str, path) -> str | None:
    if path is not None and not Path(path).exists():
        raise UserError(f"{flag}: {path} does not exist")
    return None if path is None else str(path)
