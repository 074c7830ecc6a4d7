"""The one way gsclip writes a file: whole or not at all.

:func:`atomic_output` opens a hidden temporary file in the destination's own folder
(``.<name>.<random>.partial``: same filesystem, so the final rename is atomic), hands it to the
caller, then flushes it, ``fsync``\\ s it, gives it mode 0644 and renames it over the destination.
If anything fails on the way the temporary file is removed and the destination is untouched, so a
crash never leaves a half-written metrics file, checkpoint, figure or shard under its final name.
Every output of the pipeline goes through it: JSON and CSV, text, torch checkpoints, PNG figures and
the webdataset shards (:mod:`gsclip_lib.data.image_text_shards`, :mod:`gsclip_lib.data.splat_shards`).
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator

PARTIAL_SUFFIX = ".partial"
FILE_MODE = 0o644


def partial_files(path: str | os.PathLike) -> list[str]:
    """Temporary files that writes of ``path`` left behind (a killed process leaves them)."""
    folder, name = os.path.split(os.fspath(path))
    pattern = os.path.join(glob.escape(folder or "."), f".{glob.escape(name)}.*{PARTIAL_SUFFIX}")
    return glob.glob(pattern)


@contextmanager
def atomic_output(path: str | os.PathLike, *, clear_leftovers: bool = False) -> Iterator[BinaryIO]:
    """A binary stream whose bytes appear at ``path`` only if the ``with`` block completes.

    ``clear_leftovers`` first removes the temporary files of earlier, killed writes of ``path``
    (only for outputs that one process owns, such as one rank's shard).
    """
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    if clear_leftovers:
        for stale in partial_files(path):
            os.remove(stale)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}{PARTIAL_SUFFIX}")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(handle, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
            os.fchmod(stream.fileno(), FILE_MODE)  # whatever the umask: readable by all, like any output
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_output(path) as stream:
        stream.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by None, recursively: JSON has none."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """``data`` as indented JSON; NaN and inf are written as null."""
    return write_text(path, json.dumps(finite_or_none(data), indent=2, allow_nan=False) + "\n")


def write_csv(path: str | os.PathLike, table: Any) -> Path:
    """A pandas DataFrame as CSV, without its index."""
    return write_text(path, table.to_csv(index=False))


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` of ``obj``, atomically."""
    import torch  # imported here: the writers above serve stages that never load torch

    with atomic_output(path) as stream:
        torch.save(obj, stream)
    return Path(path)


def save_figure(figure: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """A matplotlib figure as PNG, atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return write_bytes(path, buffer.getvalue())
