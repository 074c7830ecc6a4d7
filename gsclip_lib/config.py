"""Typed stage configs loaded from params.yaml.

Each pipeline stage reads one group of ``params.yaml`` into one frozen dataclass whose fields mirror
the group's keys (nested groups become nested dataclasses). Unknown keys, missing keys and values of
the wrong type are errors that name the key, so a typo in ``params.yaml`` or in
``dvc exp run -S ...`` fails at once instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def read_params(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"parameter file not found: {path}")
    with path.open() as handle:
        params = yaml.safe_load(handle)
    if not isinstance(params, dict):
        raise ValueError(f"{path} must hold a mapping of parameter groups, got {type(params).__name__}")
    return params


def build_config(cls: type[T], values: Any, where: str) -> T:
    """Instantiate dataclass ``cls`` from a mapping, recursively, checking keys and types."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping of keys, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown key(s) in {where}: {unknown}; expected {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, field in fields.items():
        key = f"{where}.{name}"
        if name not in values:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ValueError(f"missing key {key}")
            continue
        kwargs[name] = _convert(hints[name], values[name], key)
    try:
        return cls(**kwargs)
    except ValueError as error:
        raise ValueError(f"invalid {where}: {error}") from error


def load_stage_config(path: str | Path, group: str, cls: type[T]) -> T:
    """The ``group`` section of the parameter file at ``path`` as a ``cls``."""
    params = read_params(path)
    if group not in params:
        raise ValueError(f"{path} has no group {group!r}; it has {sorted(params)}")
    return build_config(cls, params[group], group)


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build_config(hint, value, key)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, key)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(f"{key}: {value!r} fits none of {hint}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1]
        return tuple(_convert(item, entry, f"{key}[{i}]") for i, entry in enumerate(value))
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has an unsupported type {hint}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config as plain data, the shape it has in params.yaml (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))
