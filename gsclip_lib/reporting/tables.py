"""Readable Markdown tables from pandas DataFrames, for the executed notebooks and the README.

Raw pandas output puts ``22.0`` where a count belongs, six decimals on a PSNR, ``NaN`` in empty
cells and lets a wide table run off the page. :func:`markdown_table` formats every cell on purpose
instead; :func:`format_number` is the same number formatting for use in prose.

Cell kinds (:attr:`Column.kind`):

``"int"``
    whole numbers with thousands separators (``12,800``); ``22.0`` prints as ``22``, and a value
    with a fraction is refused rather than rounded.
``"float"``
    ``digits`` decimals with thousands separators (``1,234.5``).
``"percent"``
    fractions (``0.831``) printed as percentages without the sign (``83.1``); the column's title
    must carry the ``%``. Values outside [-1, 1] are refused: they are almost certainly already
    percentages. Negative values are allowed so that differences of fractions can be shown.
``"text"``
    ``str(value)``, never truncated.
``"auto"``
    for a column: ``"int"`` when every value is a whole number, ``"float"`` when every value is a
    number, otherwise each cell on its own (numbers as for a single value, anything else as text).
    For a single value: ``"int"`` for a whole number, ``"float"`` for any other number, ``"text"``
    for anything else (``bool`` included).

Missing cells (``None``, ``NaN``, ``pd.NA``) print as ``missing`` and must be explained by a note.
The DataFrame's index is not shown; call ``frame.reset_index()`` first to show it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

KINDS = ("int", "float", "percent", "text", "auto")


@dataclass(frozen=True)
class Column:
    """One column of a :func:`markdown_table`: which DataFrame column, its header and its format."""

    key: str  # DataFrame column
    title: str  # header shown
    kind: str = "auto"  # "int" | "float" | "percent" | "text" | "auto"
    digits: int = 1  # decimals for float/percent

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"column {self.key!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.digits < 0:
            raise ValueError(f"column {self.key!r}: digits must be >= 0, got {self.digits}")
        if self.kind == "percent" and "%" not in self.title:
            raise ValueError(f"column {self.key!r}: a percent column's title must carry the % sign, got {self.title!r}")


def is_missing(value: Any) -> bool:
    """Whether ``value`` is a missing cell: ``None``, ``NaN``, ``pd.NA`` or ``pd.NaT``."""
    if value is None:
        return True
    try:
        result = pd.isna(value)
    except (TypeError, ValueError):
        return False
    # A list or an array in a cell gives an array here: it is a value, not a missing one.
    return bool(result) if isinstance(result, (bool, np.bool_)) else False


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _is_whole(value: Any) -> bool:
    return _is_number(value) and (isinstance(value, numbers.Integral) or float(value).is_integer())


def _no_negative_zero(text: str) -> str:
    """``-0.0`` (a small negative number rounded away) prints as ``0.0``."""
    if text.startswith("-") and not any(char in "123456789" for char in text):
        return text[1:]
    return text


def format_number(value: Any, kind: str = "auto", digits: int = 1) -> str:
    """``value`` formatted as a cell of a column of ``kind`` (see the module's docstring).

    Raises ValueError for a missing value (it needs the table's ``missing`` mark and a note), for a
    non-number in a numeric kind, for a value with a fractional part in ``"int"`` and for a
    ``"percent"`` outside [-1, 1].
    """
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    if is_missing(value):
        raise ValueError(f"missing value {value!r} has no number format; mark it in a table with a note")
    if kind == "text" or (kind == "auto" and not _is_number(value)):
        return str(value)
    if not _is_number(value):
        raise ValueError(f"{value!r} is not a number (kind {kind!r})")
    if kind == "auto":
        kind = "int" if _is_whole(value) else "float"
    if kind == "int":
        if not _is_whole(value):
            raise ValueError(f"{value!r} is not a whole number (kind 'int'); use kind 'float'")
        return f"{int(value):,}"
    if kind == "percent":
        if math.isfinite(value) and abs(value) > 1:
            raise ValueError(f"{value!r} is not a fraction in [-1, 1] (kind 'percent' takes 0.831 for 83.1%)")
        value = value * 100
    return _no_negative_zero(f"{float(value):,.{digits}f}")


def _column_kind(values: list[Any], kind: str) -> str:
    """The kind an ``"auto"`` column resolves to: ``int``, ``float``, or ``auto`` (cell by cell)."""
    if kind != "auto":
        return kind
    present = [value for value in values if not is_missing(value)]
    if present and all(_is_whole(value) for value in present):
        return "int"
    if present and all(_is_number(value) for value in present):
        return "float"
    return "auto"


def _escape(text: str) -> str:
    """A cell's text safe inside a Markdown table row: ``|`` escaped, line breaks as ``<br>``."""
    return text.replace("|", "\\|").replace("\r\n", "<br>").replace("\n", "<br>")


def _format_column(values: list[Any], column: Column, kind: str, missing: str) -> list[str]:
    """The cells of one column, already resolved to ``kind``."""
    cells = []
    for value in values:
        if is_missing(value):
            cells.append(_escape(missing))
            continue
        try:
            cells.append(_escape(format_number(value, kind, column.digits)))
        except ValueError as error:
            raise ValueError(f"column {column.key!r}: {error}") from error
    return cells


def _check_columns(frame: pd.DataFrame, columns: Sequence[Column], max_columns: int) -> None:
    if not columns:
        raise ValueError("a table needs at least one column")
    if len(columns) > max_columns:
        raise ValueError(
            f"table has {len(columns)} columns, more than {max_columns}: split it into narrower tables"
        )
    absent = [column.key for column in columns if column.key not in frame.columns]
    if absent:
        raise ValueError(f"columns not in the DataFrame: {', '.join(map(repr, absent))}")
    repeated = [column.key for column in columns if list(frame.columns).count(column.key) > 1]
    if repeated:
        raise ValueError(f"columns appearing more than once in the DataFrame: {', '.join(map(repr, repeated))}")


def markdown_table(
    frame: pd.DataFrame,
    columns: Sequence[Column] | None = None,
    *,
    missing: str = "–",
    max_columns: int = 10,
    notes: Sequence[str] = (),
) -> str:
    """``frame`` as a GitHub Markdown table, every cell formatted by its :class:`Column`.

    ``columns=None`` shows every column with kind ``"auto"`` under its own name. Numeric columns
    are right-aligned. Missing cells print as ``missing``; a table with any missing cell needs
    ``notes`` explaining them (ValueError otherwise). ``notes`` are printed after the table, one
    paragraph each. Raises ValueError for more than ``max_columns`` columns, for a column key the
    frame lacks, and for a value its column's kind cannot format.
    """
    if columns is None:
        columns = [Column(key=label, title=str(label)) for label in frame.columns]
    _check_columns(frame, columns, max_columns)
    values = [frame[column.key].tolist() for column in columns]
    kinds = [_column_kind(cells, column.kind) for cells, column in zip(values, columns, strict=True)]
    unexplained = [column.key for cells, column in zip(values, columns, strict=True) if any(map(is_missing, cells))]
    if unexplained and not notes:
        raise ValueError(
            f"missing cells in columns {', '.join(map(repr, unexplained))} and no note explains them: pass notes=[...]"
        )
    body = [_format_column(*args, missing) for args in zip(values, columns, kinds, strict=True)]
    lines = [
        "| " + " | ".join(_escape(column.title) for column in columns) + " |",
        "|" + "|".join(" ---: " if kind in ("int", "float", "percent") else " --- " for kind in kinds) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in zip(*body, strict=True)]
    return "\n".join(lines) + "\n" + "".join(f"\n{note}\n" for note in notes)
