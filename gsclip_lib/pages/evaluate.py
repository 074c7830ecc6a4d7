"""Page ``06_evaluate``: zero-shot accuracy of every representation with its interval, the tower's
paired comparisons, its relative accuracy beside the paper's, and what the run shows."""

from __future__ import annotations

from gsclip_lib.params import Params
from gsclip_lib.pages.frame import PageContent, read_csv, read_json
from gsclip_lib.reporting import comparisons, paper, zero_shot_figures
from gsclip_lib.reporting.tables import Column, markdown_table

TOKEN_COLUMNS = (
    Column("level", "level", "text"),
    Column("num_splats", "splats read", "int"),
    Column("splat_tokens", "tokens (splat tower)", "int"),
    Column("rgb_tokens", "tokens (RGB tower)", "int"),
    Column("splat_mflops", "MFLOP per image (splat tower)", "float", 1),
    Column("rgb_mflops", "MFLOP per image (RGB tower)", "float", 1),
)


def annotated_sets(params: Params) -> dict[str, tuple[dict, object]]:
    """Per evaluation set: its scores with intervals (:func:`comparisons.with_intervals`) and its
    per-image hits table."""
    folder = params.stage_dir("evaluate")
    metrics = read_json(folder / "metrics.json")
    table = read_csv(folder / "per_image.csv")
    sets = {}
    for split, scores in metrics["sets"].items():
        hits = table[table["set"] == split].dropna(axis=1, how="all").reset_index(drop=True)
        hits = hits.astype({column: "int8" for column in hits.columns if column not in ("key", "set")})
        sets[split] = (comparisons.with_intervals(scores, hits), hits)
    return sets


def token_table(metrics: dict) -> str:
    """Tokens and attention cost of both towers per level (the evaluate stage's ``tokens``)."""
    import pandas as pd

    rows = []
    for level, report in metrics.get("tokens", {}).items():
        rows.append({"level": level, "num_splats": report["num_splats"], "splat_tokens": report["splat_tokens"],
                     "rgb_tokens": report["rgb_tokens"], "splat_mflops": report["splat_total_flops"] / 1e6,
                     "rgb_mflops": report["rgb_total_flops"] / 1e6})
    frame = pd.DataFrame(rows)
    columns = [column for column in TOKEN_COLUMNS if column.key in frame]
    return markdown_table(frame, columns) if rows else ""


def build(params: Params) -> PageContent:
    """The page: a results table, three figures and the sentences per evaluation set."""
    content = PageContent()
    content.tables["tokens"] = token_table(read_json(params.stage_dir("evaluate") / "metrics.json"))
    for split, (scores, hits) in annotated_sets(params).items():
        content.tables[f"results_{split}"] = comparisons.results_markdown(comparisons.results_frame(split, scores))
        content.figures[f"zero_shot_vs_ratio_{split}"] = zero_shot_figures.plot_zero_shot_against_ratio(
            scores, title=f"Zero-shot top-1 against compression ({split}, 95 % intervals)")
        content.figures[f"relative_accuracy_{split}"] = zero_shot_figures.plot_relative_accuracy(
            scores, paper.RELATIVE_ZERO_SHOT, title=f"(c) Top-1 relative to RGB pixels ({split})")
        rows = [item.as_plot_row() for item in comparisons.level_comparisons(scores, hits) if item.test]
        content.figures[f"tower_differences_{split}"] = zero_shot_figures.plot_tower_differences(
            rows, title=f"(d) The tower minus each other representation, same images ({split})")
        content.texts[f"levels_{split}"] = "\n".join(
            f"- {line}" for line in comparisons.level_sentences(split, scores, hits))
        content.findings += comparisons.conclusions(split, scores, hits)
    return content
