"""Page ``07_report``: the paper's main result redrawn with our intervals, the results table, the
conclusions, and the README's results block, all generated from this run's files.

:func:`readme_block` is the Markdown between the README's markers (:data:`BEGIN`, :data:`END`);
the page writes it to ``reports/report/results.md`` and into ``README.md``, and a test checks that
the committed README holds exactly what the committed metrics give.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from gsclip_lib.atomic_files import write_text
from gsclip_lib.errors import InputError
from gsclip_lib.pages.evaluate import annotated_sets
from gsclip_lib.pages.frame import PageContent, read_csv
from gsclip_lib.params import Params
from gsclip_lib.reporting import comparisons, figures, zero_shot_figures
from gsclip_lib.reporting.summary import collect_reports, fitting_throughput, stage_seconds, training_histories

BEGIN = "<!-- results: written by the report page (notebooks/07_report.ipynb) from the run's metrics; do not edit -->"
END = "<!-- end of results -->"


def readme_block(sets: dict[str, tuple[dict, pd.DataFrame]]) -> str:
    """The README's results: per evaluation set (from :func:`annotated_sets`) the table with intervals,
    then the conclusions."""
    parts = []
    for split, (scores, hits) in sets.items():
        parts.append(f"**Zero-shot top-1 on the `{split}` set** ({len(hits):,} images; 95 % Wilson intervals):\n")
        parts.append(comparisons.results_markdown(comparisons.results_frame(split, scores)))
        parts.append("\n".join(f"- {line}" for line in comparisons.conclusions(split, scores, hits)) + "\n")
    return "\n".join(parts)


def replace_block(text: str, block: str) -> str:
    """``text`` with what lies between :data:`BEGIN` and :data:`END` replaced by ``block``."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise InputError(f"the README has no results markers ({BEGIN!r} ... {END!r})")
    return text[: start + len(BEGIN)] + "\n" + block.rstrip("\n") + "\n" + text[end:]


def committed_block(readme: Path) -> str:
    """What the README holds between the markers now."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise InputError(f"{readme} has no results markers")
    return text[start + len(BEGIN): end].strip("\n") + "\n"


def write_results(params: Params, block: str, readme: str | Path = "README.md") -> None:
    """Write ``block`` to ``reports/report/results.md`` and between the markers of ``readme`` (the
    project's README when the pipeline runs; ``""`` leaves every README alone, as the paper-scale
    ``python -m gsclip_lib.pages.cli`` does)."""
    write_text(params.stage_dir("report") / "results.md", block)
    if readme:
        path = Path(readme)
        if not path.is_file():
            raise InputError(f"{path} is missing: the report page writes the results block into it (readme=\"\" skips it)")
        write_text(path, replace_block(path.read_text(encoding="utf-8"), block))


def relative_figure(sets: dict[str, tuple[dict, pd.DataFrame]]):
    """The paper's main result, redrawn: relative top-1 against compression, ours beside the paper's."""
    rows = [row for split, (scores, _) in sets.items() for row in comparisons.relative_rows(split, scores)]
    return zero_shot_figures.plot_relative_against_paper(
        rows, title="Top-1 relative to RGB pixels against compression: ours (95 % intervals) and the paper's")


def build(params: Params) -> PageContent:
    """The page's figures, tables and conclusions, and the README block (``texts["readme_block"]``)."""
    collected = collect_reports(params)
    sets = annotated_sets(params)
    content = PageContent()
    content.texts["readme_block"] = readme_block(sets)
    content.figures["relative_vs_paper"] = relative_figure(sets)
    for split, (scores, hits) in sets.items():
        content.tables[f"results_{split}"] = comparisons.results_markdown(comparisons.results_frame(split, scores))
        content.figures[f"zero_shot_vs_ratio_{split}"] = zero_shot_figures.plot_zero_shot_against_ratio(
            scores, title=f"Zero-shot top-1 against compression ({split}, 95 % intervals)")
        content.findings += comparisons.conclusions(split, scores, hits)
    photos = read_csv(params.stage_dir("fit_photos") / "table.csv")
    content.figures["psnr_vs_size"] = figures.plot_psnr_against_size(photos)
    content.figures["training_curves"] = figures.plot_training_curves(training_histories(collected))
    content.figures["stage_times"] = figures.plot_stage_times(stage_seconds(collected), fitting_throughput(collected))
    content.findings += fitting_conclusions(params)
    return content


def fitting_conclusions(params: Params) -> list[str]:
    """The fitting findings beside the zero-shot ones: (b) on the evaluation images, with its test."""
    from gsclip_lib.pages.prune import pruning_findings

    if not params.prune.compare_fit_small:
        return []
    return ["Finding (b), on the evaluation images: " + line[0].lower() + line[1:]
            for line in pruning_findings(read_csv(params.stage_dir("prune") / "fit_small.csv"))]
