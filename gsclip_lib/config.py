"""Typed configuration read from YAML: the machinery behind :mod:`gsclip_lib.params`.

``params.yaml`` is the one source of values. A *profile* (``profiles/tiny.yaml``,
``profiles/paper.yaml``) holds only the keys it changes and is laid over it; ``--set key=value``
overrides are laid over both. The result is validated by pydantic v2 models derived from
:class:`ConfigModel`: every key is required (a missing key is an error naming it, never a silent
default), unknown keys are errors, types are strict (``"224"`` is not an int, ``1`` is not a
boolean), numbers must be finite, and ranges and choices are declared on the fields. pydantic's
errors carry the key path; :func:`validate_config` turns them into one line such as
``params.yaml: fit.optimizer.lr_positions: Input should be a finite number (got inf)``.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from gsclip_lib.errors import ConfigError

ModelT = TypeVar("ModelT", bound="ConfigModel")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader reading ``1e-06`` as a number, as YAML 1.2 (and every YAML writer) does:
    YAML 1.1 wants a dot in the mantissa, so ``json.dumps`` or DVC's ``-S`` output would read as text."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml_text(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigModel(BaseModel):
    """Base of every config: frozen, no extra keys, strict types, finite numbers, no defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    def replace(self: ModelT, **changes: Any) -> ModelT:
        """A validated copy with some fields changed (nested models as dicts or models)."""
        values = self.model_dump()
        values.update({k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in changes.items()})
        return validate_config(type(self), values, f"{type(self).__name__}.replace")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file holding a mapping; a missing or malformed file is a :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parameter file not found: {path}")
    try:
        values = load_yaml_text(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of parameter groups, got {type(values).__name__}")
    return values


def lay_over(base: dict[str, Any], overlay: dict[str, Any], source: str, where: str = "") -> dict[str, Any]:
    """``base`` with the keys of ``overlay`` replaced, recursively; a key ``base`` lacks is an error.

    A profile or override may only change keys that ``params.yaml`` declares: a typo must fail, not
    add a key nobody reads. A mapping replaces a mapping key by key; any other value replaces whole.
    """
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in merged:
            choices = ", ".join(sorted(map(str, merged))) or "none"
            raise ConfigError(f"{source}: unknown key {path} (params.yaml has: {choices})")
        if isinstance(value, dict) and isinstance(merged[key], dict):
            merged[key] = lay_over(merged[key], value, source, path)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_override(text: str) -> dict[str, Any]:
    """``"fit.optimizer.iterations=150"`` as the nested mapping ``{"fit": {"optimizer": {...}}}``.

    The value is read as YAML, so ``[11, 6]``, ``true`` and ``1e-3`` mean what they do in the file.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like group.key=value")
    try:
        value = load_yaml_text(raw)
    except yaml.YAMLError:
        raise ConfigError(f"override {text!r}: the value is not valid YAML") from None
    nested: dict[str, Any] = {}
    cursor = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def flatten(values: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Nested mappings as ``{"group.key.sub": value}`` (lists are leaves)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def compose(
    params_path: str | Path, profile: str | Path | None = None, overrides: Iterable[str] = ()
) -> dict[str, Any]:
    """``params.yaml``, then the profile laid over it, then the overrides, as one plain mapping."""
    values = read_yaml(params_path)
    if profile:
        values = lay_over(values, read_yaml(profile), str(profile))
    for text in overrides:
        values = lay_over(values, parse_override(text), f"--set {text}")
    return values


def validate_config(cls: type[ModelT], values: Any, source: str) -> ModelT:
    """``cls`` built from ``values``; every problem found is named, by key path, in one line."""
    try:
        return cls.model_validate(values)
    except ValidationError as error:
        raise ConfigError(f"{source}: " + "; ".join(_describe(problem) for problem in error.errors())) from None


def _describe(problem: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
    kind = problem["type"]
    if kind == "missing":
        return f"missing key {key}"
    if kind == "extra_forbidden":
        return f"unknown key {key}"
    message = problem["msg"].removeprefix("Value error, ")
    value = problem.get("input")
    if isinstance(value, (dict, list)) or value is None:
        return f"{key}: {message}"
    return f"{key}: {message} (got {value!r})"


PROJECT_MARKERS = ("dvc.yaml", "params.yaml")


def find_project_root(start: str | Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the working directory) that holds
    ``dvc.yaml`` and ``params.yaml``: where ``params.yaml``'s relative paths are read from."""
    import os

    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if all((folder / marker).is_file() for marker in PROJECT_MARKERS):
            return folder
    raise ConfigError(f"no gsclip project (a folder with {' and '.join(PROJECT_MARKERS)}) at or above {here}")
