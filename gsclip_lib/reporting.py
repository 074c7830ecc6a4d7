"""Writing stage outputs: whole files or nothing (temporary name, then rename)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd


def _atomic_write(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            write(stream)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as JSON atomically; NaN and inf become null (JSON has no such numbers)."""
    return _atomic_write(Path(path), lambda stream: json.dump(_finite_or_none(data), stream, indent=2))


def write_csv(path: str | Path, table: pd.DataFrame) -> Path:
    return _atomic_write(Path(path), lambda stream: table.to_csv(stream, index=False))


def write_text_atomic(path: str | Path, text: str) -> Path:
    return _atomic_write(Path(path), lambda stream: stream.write(text))
