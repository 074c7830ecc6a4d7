"""Readable Markdown tables: number formats, missing cells, width, escaping and column checks."""

import math

import numpy as np
import pandas as pd
import pytest

from gsclip_lib.reporting.tables import (
    Column,
    format_number,
    is_missing,
    markdown_table,
)


def _rows(table: str) -> list[list[str]]:
    """The cells of every row of a Markdown table (header first, separator dropped)."""
    lines = [line for line in table.splitlines() if line.startswith("|")]
    del lines[1]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


# format_number


@pytest.mark.parametrize(
    ("value", "kind", "expected"),
    [
        (12800, "auto", "12,800"),
        (22.0, "auto", "22"),
        (np.float64(22.0), "auto", "22"),
        (np.int64(1234567), "auto", "1,234,567"),
        (22.0, "int", "22"),
        (-3000, "int", "-3,000"),
        (23.456789, "auto", "23.5"),
        (23.456789, "float", "23.5"),
        (3, "float", "3.0"),
        (1234.5678, "float", "1,234.6"),
        (0.8313, "percent", "83.1"),
        (1.0, "percent", "100.0"),
        (-0.05, "percent", "-5.0"),
        (-0.04, "float", "0.0"),
        ("N22", "auto", "N22"),
        (True, "auto", "True"),
        (2024, "text", "2024"),
    ],
)
def test_format_number(value, kind, expected):
    assert format_number(value, kind) == expected


def test_format_number_digits():
    assert format_number(23.456789, "float", digits=3) == "23.457"
    assert format_number(0.8317, "percent", digits=2) == "83.17"
    assert format_number(23.456789, "float", digits=0) == "23"


@pytest.mark.parametrize(
    ("value", "kind", "message"),
    [
        (22.5, "int", "whole number"),
        ("abc", "float", "not a number"),
        (83.1, "percent", "fraction"),
        (None, "auto", "missing"),
        (float("nan"), "float", "missing"),
        (1, "fancy", "kind"),
    ],
)
def test_format_number_refuses(value, kind, message):
    with pytest.raises(ValueError, match=message):
        format_number(value, kind)


def test_is_missing():
    assert all(is_missing(value) for value in (None, float("nan"), np.nan, pd.NA, pd.NaT))
    assert not any(is_missing(value) for value in (0, 0.0, "", "nan", [1, 2], math.inf))


# markdown_table


def test_counts_print_as_integers_with_separators():
    frame = pd.DataFrame({"splats": [22.0, 12800.0], "images": [1000, 50]})
    rows = _rows(markdown_table(frame))
    assert rows == [["splats", "images"], ["22", "1,000"], ["12,800", "50"]]


def test_floats_have_digits_decimals():
    frame = pd.DataFrame({"psnr": [23.456789, 31.0]})
    assert _rows(markdown_table(frame))[1:] == [["23.5"], ["31.0"]]
    table = markdown_table(frame, [Column("psnr", "PSNR (dB)", "float", digits=2)])
    assert _rows(table) == [["PSNR (dB)"], ["23.46"], ["31.00"]]


def test_int_column_refuses_a_fraction_and_names_the_column():
    frame = pd.DataFrame({"count": [22.0, 22.5]})
    with pytest.raises(ValueError, match="'count'.*whole number"):
        markdown_table(frame, [Column("count", "Count", "int")])


def test_percent_prints_fractions_without_sign():
    frame = pd.DataFrame({"top1": [0.8313, 0.7]})
    rows = _rows(markdown_table(frame, [Column("top1", "Top-1 (%)", "percent")]))
    assert rows == [["Top-1 (%)"], ["83.1"], ["70.0"]]
    assert all("%" not in cell for row in rows[1:] for cell in row)


def test_percent_refuses_a_percentage_and_a_title_without_sign():
    with pytest.raises(ValueError, match="fraction"):
        markdown_table(pd.DataFrame({"top1": [83.1]}), [Column("top1", "Top-1 (%)", "percent")])
    with pytest.raises(ValueError, match="%"):
        Column("top1", "Top-1", "percent")


def test_missing_cells_need_a_note():
    frame = pd.DataFrame({"level": ["N22", "N11"], "psnr": [23.4, np.nan]})
    with pytest.raises(ValueError, match="'psnr'.*note"):
        markdown_table(frame)


def test_missing_cells_print_as_the_mark_followed_by_the_notes():
    frame = pd.DataFrame({"level": ["N22", None], "psnr": [23.4, np.nan]})
    table = markdown_table(frame, notes=["– : not measured at this level."])
    assert _rows(table)[1:] == [["N22", "23.4"], ["–", "–"]]
    assert "NaN" not in table and "nan" not in table and "None" not in table
    assert table.rstrip().endswith("– : not measured at this level.")
    assert _rows(markdown_table(frame, missing="n/a", notes=["n/a: not run"]))[2] == ["n/a", "n/a"]


def test_nullable_integer_column_with_missing_cell():
    frame = pd.DataFrame({"bytes": pd.array([264, None], dtype="Int64")})
    assert _rows(markdown_table(frame, notes=["–: none"]))[1:] == [["264"], ["–"]]


def test_too_many_columns_raises_naming_the_count():
    frame = pd.DataFrame({f"c{i}": [i] for i in range(16)})
    with pytest.raises(ValueError, match="16 columns"):
        markdown_table(frame)
    assert markdown_table(frame, max_columns=16)
    markdown_table(frame.iloc[:, :10])


def test_pipes_are_escaped():
    frame = pd.DataFrame({"name": ["a|b"], "x|y": [1]})
    table = markdown_table(frame)
    assert "a\\|b" in table and "x\\|y" in table
    assert table.splitlines()[2] == "| a\\|b | 1 |"


def test_line_breaks_do_not_break_the_row():
    table = markdown_table(pd.DataFrame({"note": ["one\ntwo"]}))
    assert table.splitlines()[2] == "| one<br>two |"


def test_text_cells_are_never_truncated():
    long = "a very long description of a configuration " * 10
    table = markdown_table(pd.DataFrame({"description": [long]}))
    assert long in table and "…" not in table and "..." not in table


def test_columns_none_uses_every_column_with_its_name():
    frame = pd.DataFrame({"level": ["N22"], "top1": [0.83], "splats": [22.0]})
    table = markdown_table(frame)
    assert _rows(table) == [["level", "top1", "splats"], ["N22", "0.8", "22"]]
    assert table.splitlines()[1] == "| --- | ---: | ---: |"


def test_columns_choose_order_titles_and_subset():
    frame = pd.DataFrame({"a": [1], "b": [2], "c": [3]})
    assert _rows(markdown_table(frame, [Column("c", "Cee"), Column("a", "Ay")])) == [["Cee", "Ay"], ["3", "1"]]


def test_unknown_column_key_raises_naming_it():
    frame = pd.DataFrame({"a": [1]})
    with pytest.raises(ValueError, match="'top5'"):
        markdown_table(frame, [Column("a", "A"), Column("top5", "Top-5 (%)", "percent")])


def test_mixed_auto_column_formats_each_cell():
    frame = pd.DataFrame({"value": ["n/a", 22.0, 3.14159]})
    assert _rows(markdown_table(frame))[1:] == [["n/a"], ["22"], ["3.1"]]


def test_empty_frame_gives_the_header_only():
    table = markdown_table(pd.DataFrame({"a": []}), [Column("a", "A", "int")])
    assert table == "| A |\n| ---: |\n"


def test_bad_kind_and_no_columns_raise():
    with pytest.raises(ValueError, match="kind"):
        Column("a", "A", "money")
    with pytest.raises(ValueError, match="at least one column"):
        markdown_table(pd.DataFrame({"a": [1]}), [])
