"""The strict pydantic base of recipe sections and option schemas, and the one-line description of a validation error.

A leaf module: `lctk.recipe` and the option schemas that live next to their code (`lctk.data.tasks`) both build on
it, so those import it rather than each other.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, ValidationError


class Section(BaseModel):
    # inf and nan are never a sensible rate, weight, length or scale: every float of every section must be finite
    model_config = ConfigDict(extra="forbid", strict=True, frozen=False, allow_inf_nan=False)


def describe_error(error: ValidationError, schema: type[BaseModel]) -> str:
    """The first validation problem as one line naming the key."""
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"]]
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"{'.'.join(loc)}: unknown key{suggest(loc[-1], _fields_at(schema, first['loc'][:-1]))}"
    if first["type"] == "missing":
        return f"{'.'.join(loc)}: required key missing"
    named = re.match(r"^([\w.]+): (.*)$", message)
    if first["type"] == "value_error" and named:  # a validator naming a key inside its section: "steps: ..."
        return f"{'.'.join([*loc, named.group(1)])}: {named.group(2)}"
    got = first.get("input")
    shown = f", got {got!r}" if not isinstance(got, dict | list) and first["type"] != "value_error" else ""
    return f"{'.'.join(loc) or 'recipe'}: {message[:1].lower()}{message[1:]}{shown}"


def _fields_at(schema: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the section at `loc` (for did-you-mean), following nested models, lists and optionals."""
    node: Any = schema
    for part in loc:
        node = _unwrap(node)
        if isinstance(part, int) and typing.get_origin(node) is list:
            node = typing.get_args(node)[0]
        elif isinstance(node, type) and issubclass(node, BaseModel) and part in node.model_fields:
            node = node.model_fields[part].annotation
        else:
            return []
    node = _unwrap(node)
    return list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []


def _unwrap(annotation: Any) -> Any:
    """X | None -> X (the one model among the union's members)."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        models = [a for a in members if isinstance(a, type) and issubclass(a, BaseModel)]
        return (models or members)[0]
    return annotation


def suggest(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
