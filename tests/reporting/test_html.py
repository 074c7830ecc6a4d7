"""`make report`: the executed notebooks as HTML pages with their figures, and an index."""

import base64
import io
from pathlib import Path

import nbformat
import pytest
from matplotlib.figure import Figure

from gsclip_lib.errors import GsclipError
from gsclip_lib.reporting.html import index_page, notebook_pages, write_report


def _executed_notebook(path) -> None:
    figure = Figure(figsize=(2, 2))
    figure.subplots().plot([0, 1], [1, 0])
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    notebook = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("stage.show(figure, 'curve')")
    cell.outputs = [nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(buffer.getvalue()).decode()})]
    notebook.cells = [nbformat.v4.new_markdown_cell("# Fitting photographs\n\nWhat it shows."), cell]
    nbformat.write(notebook, path)


def test_pages_embed_the_figures_and_the_index_links_them(tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    _executed_notebook(notebooks / "00_fit_photos.ipynb")
    pages = notebook_pages(notebooks, tmp_path / "html")
    assert [title for title, _ in pages] == ["00_fit_photos: Fitting photographs"]
    assert "data:image/png;base64," in pages[0][1].read_text()
    results = tmp_path / "results.md"
    results.write_text("**On the eval set:**\n\n| set | top1 |\n| --- | ---: |\n| eval | 83.3 |\n\n- a conclusion\n")
    index = index_page(pages, results)
    assert '<a href="00_fit_photos.html">' in index and "<strong>On the eval set:</strong>" in index
    assert ">83.3</td>" in index and "<li>a conclusion</li>" in index


def test_a_report_before_any_run_says_what_to_do(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GsclipError, match="run `make repro`"):
        write_report(tmp_path / "params.yaml")
