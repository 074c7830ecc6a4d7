"""Check an executed notebook for what should not reach a reader's page.

The executed notebooks under ``reports/notebooks/`` are what users read, so they should hold no
tracebacks, no warnings or log lines, no progress-bar residue, no raw pandas output, no ``NaN`` or
cut cells in tables, no table too wide for the page, and their figures, each shown once.

The notebook is read as plain JSON (nbformat 4 layout), not through nbformat, to keep this light.
Run it as ``python -m gsclip_lib.reporting.page_check NOTEBOOK...``: it prints one problem a line,
prefixed with the notebook's path, and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

# The widest Markdown table a page takes (as gsclip_lib.reporting.tables.markdown_table's default).
MAX_TABLE_COLUMNS = 10
QUOTE_CHARS = 80

_PROGRESS = re.compile(r"\d+%\||it/s\]|s/it\]|\r")
_DATAFRAME_HTML = re.compile(r"<table\b[^>]*\bclass=\"[^\"]*\bdataframe\b")
_DATAFRAME_TEXT = re.compile(r"\[\d+ rows x \d+ columns\]")
_SERIES_TEXT = re.compile(r"(?:^|\n|, )dtype: \w+\s*\Z")
_NAN_WORD = re.compile(r"\bNaN\b")
_NAN_CELL = re.compile(r"\bnan\b", re.IGNORECASE)
_CELL_SPLIT = re.compile(r"(?<!\\)\|")
_RICH_OUTPUTS = ("display_data", "execute_result")


def _text(value: Any) -> str:
    """An nbformat multiline string (a string or a list of lines) as one string."""
    return "".join(value) if isinstance(value, list) else str(value)


def _quote(text: str) -> str:
    """The first characters of ``text`` on one line, quoted."""
    return repr(" ".join(text.split())[:QUOTE_CHARS])


def _where(number: int, cell: dict[str, Any]) -> str:
    """``cell 4 (`plot(curves)`)``: the cell's position (from 1) and the start of its source."""
    lines = _text(cell.get("source", "")).strip().splitlines()
    start = lines[0][:40] if lines else ""
    return f"cell {number} (`{start}`)" if start else f"cell {number}"


def _outputs(notebook: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every output of every cell, with where it is."""
    for number, cell in enumerate(notebook.get("cells", []), start=1):
        for output in cell.get("outputs", []) or []:
            yield _where(number, cell), output


def _table_columns(row: str) -> int:
    """How many cells a Markdown table row has (escaped ``\\|`` does not split)."""
    inner = row.strip()
    inner = inner.removeprefix("|")
    inner = inner[:-1] if inner.endswith("|") and not inner.endswith("\\|") else inner
    return len(_CELL_SPLIT.split(inner))


def _markdown_problems(text: str) -> list[str]:
    """NaN, ``nan`` and cut cells in table rows, tables too wide, NaN in the prose around them."""
    problems, widest = [], 0
    for line in text.splitlines():
        if not line.lstrip().startswith("|"):
            if _NAN_WORD.search(line):
                problems.append(f"NaN in Markdown text: {_quote(line)}")
            continue
        widest = max(widest, _table_columns(line))
        if _NAN_CELL.search(line):
            problems.append(f"NaN in a Markdown table row: {_quote(line)}")
        if "…" in line or "..." in line:
            problems.append(f"cut cell ('…' or '...') in a Markdown table row: {_quote(line)}")
    if widest > MAX_TABLE_COLUMNS:
        problems.append(f"Markdown table with {widest} columns (at most {MAX_TABLE_COLUMNS} fit a page): split it")
    return problems


def _rich_problems(data: dict[str, Any]) -> list[str]:
    """Problems in the data of a display_data or execute_result output."""
    problems = []
    plain, html = _text(data.get("text/plain", "")), _text(data.get("text/html", ""))
    if _PROGRESS.search(plain) or _PROGRESS.search(html):
        problems.append(f"progress-bar residue in a displayed output: {_quote(plain or html)}")
    if _DATAFRAME_HTML.search(html):
        problems.append("raw pandas DataFrame (HTML table of class 'dataframe'): format it as a Markdown table")
    if _DATAFRAME_TEXT.search(plain):
        problems.append(f"raw pandas DataFrame repr: {_quote(plain)}")
    elif _SERIES_TEXT.search(plain):
        problems.append(f"raw pandas Series repr: {_quote(plain)}")
    if _NAN_WORD.search(plain):
        problems.append(f"NaN in a text output: {_quote(plain)}")
    if "application/vnd.jupyter.widget-view+json" in data:
        problems.append("Jupyter widget output (a notebook progress bar?): it shows as nothing on a static page")
    if "text/markdown" in data:
        problems += _markdown_problems(_text(data["text/markdown"]))
    return problems


def _output_problems(output: dict[str, Any]) -> list[str]:
    """Problems of one output other than its figures."""
    kind = output.get("output_type")
    if kind == "error":
        return [f"error output: {output.get('ename', '?')}: {_quote(_text(output.get('evalue', '')))}"]
    if kind == "stream":
        text = _text(output.get("text", ""))
        problems = [f"stderr output: {_quote(text)}"] if output.get("name") == "stderr" else []
        if _PROGRESS.search(text):
            problems.append(f"progress-bar residue in {output.get('name', 'stream')} text: {_quote(text)}")
        return problems
    if kind in _RICH_OUTPUTS:
        return _rich_problems(output.get("data", {}) or {})
    return []


def _figure_problems(notebook: dict[str, Any], min_figures: int) -> list[str]:
    """Too few image/png outputs, and any image/png shown twice."""
    problems, seen = [], {}
    for where, output in _outputs(notebook):
        png = (output.get("data") or {}).get("image/png") if output.get("output_type") in _RICH_OUTPUTS else None
        if png is None:
            continue
        digest = hashlib.sha256("".join(_text(png).split()).encode()).hexdigest()
        if digest in seen:
            problems.append(f"{where}: the same figure shown again (first shown in {seen[digest]})")
        else:
            seen[digest] = where
    count = len(seen) + len(problems)
    if count < min_figures:
        problems.append(f"{count} figure(s) (image/png outputs), expected at least {min_figures}")
    return problems


def page_problems(notebook: str | Path, *, min_figures: int = 1) -> list[str]:
    """One human-readable line per problem of the executed ``notebook``; an empty list when clean.

    Raises OSError when the file cannot be read and ValueError when it is not JSON.
    """
    content = json.loads(Path(notebook).read_text(encoding="utf-8"))
    if not isinstance(content, dict):
        raise ValueError(f"{notebook}: not a notebook (the JSON is not an object)")
    problems = []
    for where, output in _outputs(content):
        problems += [f"{where}: {problem}" for problem in _output_problems(output)]
    return problems + _figure_problems(content, min_figures)


def main(argv: Sequence[str] | None = None) -> int:
    """Print every problem of every notebook named, one a line; 1 if there is any, else 0."""
    parser = argparse.ArgumentParser(
        prog="python -m gsclip_lib.reporting.page_check",
        description="Check executed notebooks for what should not reach a reader's page.",
    )
    parser.add_argument("notebooks", nargs="+", type=Path, help="executed .ipynb files")
    parser.add_argument("--min-figures", type=int, default=1, help="figures each notebook must show (default 1)")
    args = parser.parse_args(argv)
    failed = False
    for path in args.notebooks:
        try:
            problems = page_problems(path, min_figures=args.min_figures)
        except (OSError, ValueError) as error:
            problems = [f"cannot read the notebook: {error}"]
        for problem in problems:
            print(f"{path}: {problem}")
        failed = failed or bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
