"""The executed notebooks as web pages: ``make report`` writes ``reports/html/index.html``.

Each executed notebook of ``paths.reports/notebooks`` becomes one HTML page through nbconvert, its
figures embedded (they are PNG outputs of the notebook), and an index page lists them in pipeline
order with the results table the report stage wrote. Open ``reports/html/index.html`` in a browser.
"""

from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path

from gsclip_lib.atomic_files import write_text
from gsclip_lib.errors import GsclipError
from gsclip_lib.params import load_params


def notebook_pages(notebooks: Path, out_dir: Path) -> list[tuple[str, Path]]:
    """Convert every executed notebook of ``notebooks`` to ``out_dir/<name>.html``; (title, page) pairs."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab")
    pages = []
    for path in sorted(notebooks.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        body, _ = exporter.from_notebook_node(notebook)
        page = out_dir / f"{path.stem}.html"
        write_text(page, body)
        title = next(
            (cell.source.lstrip("# ").splitlines()[0] for cell in notebook.cells
             if cell.cell_type == "markdown" and cell.source.startswith("#")),
            path.stem,
        )
        pages.append((f"{path.stem}: {title}", page))
    return pages


def index_page(pages: list[tuple[str, Path]], results_md: Path | None) -> str:
    """The index: a link per page, then the results block the report page wrote (its Markdown tables
    and conclusions rendered by mistune, the Markdown renderer nbconvert itself uses)."""
    import mistune

    items = "\n".join(f'<li><a href="{page.name}">{html.escape(title)}</a></li>' for title, page in pages)
    results = ""
    if results_md is not None and results_md.is_file():
        results = "<h2>Results</h2>" + mistune.html(results_md.read_text(encoding="utf-8"))
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>gsclip report</title><style>{style}</style>"
            f"</head><body><h1>gsclip: the executed pipeline</h1><ol>{items}</ol>{results}</body></html>\n")


def write_report(params_path: str | Path = "params.yaml") -> Path:
    """Write the pages and the index; return the index's path."""
    params = load_params(params_path)
    reports = Path(params.paths.reports)
    notebooks = reports / "notebooks"
    if not any(notebooks.glob("*.ipynb")):
        raise GsclipError(f"no executed notebook in {notebooks}: run `make repro` (dvc repro) first")
    out_dir = reports / "html"
    pages = notebook_pages(notebooks, out_dir)
    index = out_dir / "index.html"
    write_text(index, index_page(pages, params.stage_dir("report") / "results.md"))
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        index = write_report(args.params)
    except GsclipError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
