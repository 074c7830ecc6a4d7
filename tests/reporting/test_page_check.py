"""The page check of executed notebooks, on small fake notebooks written as JSON."""

import base64
import json
import subprocess
import sys

import pytest

from gsclip_lib.reporting.page_check import main, page_problems

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n first figure").decode()
OTHER_PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n second figure").decode()
TABLE = "| Level | Splats | Top-1 (%) |\n| --- | ---: | ---: |\n| N22 | 12,800 | 83.1 |\n"


def _figure(png: str = PNG) -> dict:
    return {"output_type": "display_data", "metadata": {}, "data": {"image/png": png, "text/plain": ["<Figure>"]}}


def _markdown(text: str) -> dict:
    data = {"text/markdown": text, "text/plain": "<IPython.core.display.Markdown object>"}
    return {"output_type": "display_data", "metadata": {}, "data": data}


def _stream(text: str, name: str = "stdout") -> dict:
    return {"output_type": "stream", "name": name, "text": text}


def _result(data: dict) -> dict:
    return {"output_type": "execute_result", "execution_count": 1, "metadata": {}, "data": data}


def _write(tmp_path, *outputs: dict, name: str = "page.ipynb") -> str:
    """A notebook with a Markdown cell and one code cell per output."""
    cells = [{"cell_type": "markdown", "metadata": {}, "source": ["# Results"]}]
    for number, output in enumerate(outputs):
        cells.append({
            "cell_type": "code", "execution_count": number, "metadata": {},
            "source": [f"show_{number}()\n", "more()"], "outputs": [output],
        })
    path = tmp_path / name
    path.write_text(json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": cells}))
    return str(path)


def _only(problems: list[str], fragment: str) -> str:
    """The single problem, checked to contain ``fragment``."""
    assert len(problems) == 1, problems
    assert fragment in problems[0], problems[0]
    return problems[0]


def test_clean_notebook_has_no_problems(tmp_path):
    path = _write(tmp_path, _stream("fitted 12,800 splats\n"), _figure(), _markdown(TABLE))
    assert page_problems(path) == []


def test_error_output(tmp_path):
    error = {"output_type": "error", "ename": "KeyError", "evalue": "'top5'", "traceback": ["..."]}
    problem = _only(page_problems(_write(tmp_path, _figure(), error)), "error output: KeyError")
    assert problem.startswith("cell 3 (`show_1()`)")


def test_stderr_output_is_quoted_to_80_characters(tmp_path):
    warning = "TqdmWarning: IProgress not found. Please update jupyter and ipywidgets. " * 3
    problem = _only(page_problems(_write(tmp_path, _figure(), _stream(warning, "stderr"))), "stderr output")
    assert "TqdmWarning: IProgress not found" in problem
    assert warning[:80] in problem and warning[:81] not in problem


@pytest.mark.parametrize(
    "text",
    ["100%|██████████| 10/10 [00:01<00:00, 9.8it/s]\n", " 45%|████ ", "fit: 3/10 [00:04, 1.2s/it]", "step 1\rstep 2\n"],
)
def test_progress_bar_residue_in_stream(tmp_path, text):
    _only(page_problems(_write(tmp_path, _figure(), _stream(text))), "progress-bar residue")


def test_progress_bar_residue_in_displayed_output(tmp_path):
    output = _result({"text/plain": "  0%|          | 0/10 [00:00<?, ?it/s]"})
    _only(page_problems(_write(tmp_path, _figure(), output)), "progress-bar residue")


def test_progress_bar_on_stderr_is_reported_as_both(tmp_path):
    problems = page_problems(_write(tmp_path, _figure(), _stream("100%|█| 1/1 [00:00, 5.0it/s]", "stderr")))
    assert len(problems) == 2
    assert "stderr output" in problems[0] and "progress-bar residue" in problems[1]


def test_widget_output(tmp_path):
    data = {"application/vnd.jupyter.widget-view+json": {"model_id": "abc"}, "text/plain": "HBox(children=())"}
    _only(page_problems(_write(tmp_path, _figure(), _result(data))), "widget")


def test_raw_dataframe_html(tmp_path):
    html = '<div>\n<table border="1" class="dataframe">\n<thead><tr><th>level</th></tr></thead></table>\n</div>'
    output = _result({"text/html": html, "text/plain": "  level\n0   N22"})
    _only(page_problems(_write(tmp_path, _figure(), output)), "raw pandas DataFrame")


def test_raw_dataframe_text(tmp_path):
    plain = "    a   b\n0   1   2\n..\n99  1   2\n\n[100 rows x 2 columns]"
    _only(page_problems(_write(tmp_path, _figure(), _result({"text/plain": plain}))), "DataFrame repr")


def test_raw_series_text(tmp_path):
    plain = "N22    0.83\nN11    0.70\nName: top1, dtype: float64"
    _only(page_problems(_write(tmp_path, _figure(), _result({"text/plain": plain}))), "Series repr")


def test_nan_in_text_plain(tmp_path):
    _only(page_problems(_write(tmp_path, _figure(), _result({"text/plain": "{'psnr': NaN}"}))), "NaN")


def test_nan_in_markdown_prose(tmp_path):
    _only(page_problems(_write(tmp_path, _figure(), _markdown("The PSNR is NaN here.\n"))), "NaN in Markdown text")


@pytest.mark.parametrize("cell", ["NaN", "nan"])
def test_nan_in_markdown_table_row(tmp_path, cell):
    table = TABLE + f"| N11 | 3,200 | {cell} |\n"
    _only(page_problems(_write(tmp_path, _figure(), _markdown(table))), "NaN in a Markdown table row")


def test_nan_inside_a_word_is_fine(tmp_path):
    table = TABLE + "| nanoscale | 3,200 | 70.0 |\n"
    assert page_problems(_write(tmp_path, _figure(), _markdown(table))) == []


@pytest.mark.parametrize("cut", ["a very long descrip…", "a very long descrip..."])
def test_cut_cell_in_markdown_table_row(tmp_path, cut):
    table = TABLE + f"| {cut} | 3,200 | 70.0 |\n"
    _only(page_problems(_write(tmp_path, _figure(), _markdown(table))), "cut cell")


def test_wide_markdown_table(tmp_path):
    header = "| " + " | ".join(f"c{i}" for i in range(16)) + " |\n"
    table = header + "|" + "---|" * 16 + "\n" + "| " + " | ".join("1" * 16) + " |\n"
    _only(page_problems(_write(tmp_path, _figure(), _markdown(table))), "16 columns")


def test_ten_columns_with_escaped_pipes_fit(tmp_path):
    row = "| a\\|b | " + " | ".join("1" * 9) + " |\n"
    table = row.replace("a\\|b", "h") + "|" + "---|" * 10 + "\n" + row
    assert page_problems(_write(tmp_path, _figure(), _markdown(table))) == []


def test_too_few_figures(tmp_path):
    _only(page_problems(_write(tmp_path, _markdown(TABLE))), "0 figure(s)")
    path = _write(tmp_path, _figure(), _figure(OTHER_PNG))
    assert page_problems(path, min_figures=2) == []
    _only(page_problems(path, min_figures=3), "2 figure(s)")
    assert page_problems(_write(tmp_path, _markdown(TABLE)), min_figures=0) == []


def test_figure_shown_twice(tmp_path):
    problem = _only(page_problems(_write(tmp_path, _figure(), _figure(OTHER_PNG), _figure())), "same figure")
    assert problem.startswith("cell 4") and "cell 2" in problem


def test_figure_shown_twice_across_line_wrapping(tmp_path):
    wrapped = [PNG[:10] + "\n", PNG[10:] + "\n"]
    _only(page_problems(_write(tmp_path, _figure(), _figure(wrapped))), "same figure")


def test_main_prints_problems_with_the_file_name_and_exits_1(tmp_path, capsys):
    clean = _write(tmp_path, _figure(), name="clean.ipynb")
    dirty = _write(tmp_path, _stream("warning\n", "stderr"), name="dirty.ipynb")
    assert main([clean]) == 0
    assert capsys.readouterr().out == ""
    assert main([clean, dirty]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{dirty}: ") for line in lines)
    assert main([dirty, "--min-figures", "0"]) == 1
    assert main([str(tmp_path / "absent.ipynb")]) == 1
    assert "cannot read" in capsys.readouterr().out


def test_runs_as_a_module(tmp_path):
    dirty = _write(tmp_path, _stream("warning\n", "stderr"))
    run = subprocess.run(
        [sys.executable, "-m", "gsclip_lib.reporting.page_check", dirty],
        capture_output=True, text=True, check=False,
    )
    assert run.returncode == 1
    assert run.stdout.startswith(f"{dirty}: cell 2")
