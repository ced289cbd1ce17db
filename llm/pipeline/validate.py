"""YAML files into typed settings: read as YAML 1.2, validated by pydantic, every error one line.

YAML 1.2 (ruamel.yaml, the reader DVC itself uses for `params.yaml` and `dvc exp run -S`) reads
`4e-4` and `5e-05` as numbers; PyYAML's YAML 1.1 reads them as strings. A validation error names
the dotted key (`finetune_spam.pooling`) and what is allowed, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from llm.errors import ConfigError, first_line

M = TypeVar("M", bound=BaseModel)


class Settings(BaseModel):
    """Base of every settings section: no unknown keys, no coercion ("5" is not 5), no NaN or
    infinity, immutable, and each field's docstring becomes its description in the JSON Schema."""

    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, allow_inf_nan=False, use_attribute_docstrings=True
    )


def parse_yaml(text: str) -> Any:
    """YAML 1.2 text parsed as DVC parses it (`4e-4` is a float); raises ruamel's YAMLError."""
    return YAML(typ="safe", pure=True).load(text)


def read_yaml(path: str | Path) -> Any:
    """The parsed YAML 1.2 file; an unreadable or malformed file is one line naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return parse_yaml(text)
    except YAMLError as exc:
        first = first_line(exc)
        raise ConfigError(f"{path} is not valid YAML: {first}") from None


def _model_at(model: type[BaseModel] | None, loc: tuple) -> type[BaseModel] | None:
    """The settings model that holds the value at `loc` (None where that is not a model)."""
    for part in loc:
        if model is None:
            return None
        root = model.model_fields.get("root")
        if root is not None and getattr(root.annotation, "__origin__", None) is dict:  # {name: Section}
            model = root.annotation.__args__[1]
        else:
            field = model.model_fields.get(part) if isinstance(part, str) else None
            model = field.annotation if field else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
    return model


def one_line(exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    """The first error of a pydantic ValidationError as `key must …, got …`."""
    err = exc.errors(include_url=False)[0]
    loc = tuple(p for p in err["loc"] if p != "__root__")
    key = ".".join(str(p) for p in loc) or "the file"
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    got = f"the string {value!r}" if isinstance(value, str) else repr(value)
    if kind == "missing":
        return f"missing key {key}"
    if kind in ("extra_forbidden", "invalid_key"):  # invalid_key: a key that is not a string (`1:`)
        parent = _model_at(model, loc[:-1])
        allowed = ", ".join(parent.model_fields) if parent is not None else ""
        return f"unknown key {key}" + (f"; allowed: {allowed}" if allowed else "")
    if kind == "literal_error":
        options = ", ".join(part.strip("'") for part in ctx["expected"].replace(" or ", ", ").split(", "))
        return f"{key} must be one of {options}; got {value!r}"
    messages = {
        "int_type": "must be an integer",
        "float_type": "must be a number",
        "bool_type": "must be true or false",
        "string_type": "must be a string",
        "finite_number": "must be a finite number",
        "list_type": "must be a list",
        "too_short": "must not be empty",
        "string_too_short": "must not be empty",
        "model_type": "must be a mapping",
        "dict_type": "must be a mapping",
        "model_attributes_type": "must be a mapping",
    }
    if kind in messages:
        return f"{key} {messages[kind]}, got {got}"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        shown = f"{limit:g}" if isinstance(limit, float) else str(limit)
        return f"{key} must be {bounds[kind]} {shown}, got {value!r}"
    if kind == "value_error" and isinstance(ctx.get("error"), Exception):  # raised by a validator
        message = str(ctx["error"])
        if not loc or message.startswith(key):
            return message
        holder = _model_at(model, loc)  # a model-level check that names one of its own fields
        if holder is not None and message.split(" ", 1)[0] in holder.model_fields:
            return f"{key}.{message}"
        return f"{key} {message}"
    return f"{key}: {err['msg']}, got {got}"


def validate(model: type[M], raw: Any) -> M:
    """`model` built from parsed YAML, or ConfigError with one line naming the key."""
    try:
        return model.model_validate({} if raw is None else raw)
    except ValidationError as exc:
        raise ConfigError(one_line(exc, model)) from None


def missing_keys(model: type[BaseModel], raw: Any, prefix: str = "") -> list[str]:
    """The keys of `model` (nested settings too) that the parsed YAML `raw` does not write, as
    `section.key`, in the model's order. `raw` must already validate against `model`."""
    missing = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        if not isinstance(raw, dict) or name not in raw:
            missing.append(key)
            continue
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            missing += missing_keys(sub, raw[name], f"{key}.")
    return missing


def load(model: type[M], path: str | Path) -> M:
    """`model` from a YAML file; errors are one line starting with the file's name."""
    raw = read_yaml(path)
    try:
        return validate(model, raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
