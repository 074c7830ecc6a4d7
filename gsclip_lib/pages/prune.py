"""Page ``03_prune_splats``: the cascade of smaller levels, what pruning costs, and finding (b):
pruning a larger fit against fitting the small count directly, paired on the same images."""

from __future__ import annotations

import pandas as pd

from gsclip_lib.evaluation.statistics import mean_difference
from gsclip_lib.pages.fit import interval_text
from gsclip_lib.pages.frame import PageContent, level_examples, read_csv, read_json
from gsclip_lib.params import Params
from gsclip_lib.reporting import figures, paper
from gsclip_lib.reporting.tables import Column, markdown_table

LEVEL_COLUMNS = (
    Column("level", "level", "text"),
    Column("split", "split", "text"),
    Column("images", "images", "int"),
    Column("mean_psnr_before", "PSNR above (dB)", "float", 2),
    Column("mean_psnr_pruned", "pruned, no refit (dB)", "float", 2),
    Column("mean_psnr", "refitted (dB)", "float", 2),
    Column("interval", "95 % CI (dB)", "text"),
    Column("psnr_cost", "cost (dB)", "float", 2),
    Column("ratio_payload", "ratio", "float", 2),
)


def level_frame(metrics: dict) -> pd.DataFrame:
    """One row per (level, split) of the cascade."""
    rows = []
    for name, splits in metrics["levels"].items():
        for split, row in splits.items():
            rows.append({"level": f"{row['pruned_from']} → {row['splats']}", "split": split,
                         **{column.key: row.get(column.key) for column in LEVEL_COLUMNS[2:]},
                         "interval": interval_text(row)})
    return pd.DataFrame(rows)


def pruning_findings(paired: pd.DataFrame) -> list[str]:
    """Finding (b) per level: mean PSNR of pruned-and-refitted minus fitted directly, same images."""
    lines, disagree = [], []
    for level, rows in paired.groupby("level", sort=False):
        result = mean_difference((rows["pruned_psnr"] - rows["direct_psnr"]).to_numpy())
        verdict = {"above": "pruning the larger fit is ahead", "below": "fitting directly is ahead"}.get(
            result.verdict, result.verdict)
        lines.append(f"{level}, equal steps: pruned from the larger fit minus fitted directly {result.describe('dB')}: "
                     f"{verdict}.")
        if result.verdict != "above":
            disagree.append(level)
    if disagree:
        lines.append(f"The paper finds that pruning a large fit beats fitting few splats; this run does not show it "
                     f"at {', '.join(disagree)}.")
    else:
        lines.append("The paper finds that pruning a large fit beats fitting few splats; so does this run, at every level.")
    return lines


def cost_findings(metrics: dict, split: str) -> list[str]:
    """What each cut costs on the shown split, beside the paper's "60-80 % pruned costs 2-5 dB"."""
    low, high = paper.PRUNE_COST_DB["cost_db"]
    lines = []
    for row in (splits[split] for splits in metrics["levels"].values()):
        share = 1 - row["splats"] / row["pruned_from"]
        lines.append(f"{split}: {row['pruned_from']} → {row['splats']} splats ({100 * share:.0f} % pruned) costs "
                     f"{row['psnr_cost']:.2f} dB after the refit ({row['mean_psnr_before']:.2f} → {row['mean_psnr']:.2f} dB, "
                     f"95 % CI of the result {interval_text(row)}); the paper reports {low:g}-{high:g} dB for 60-80 % "
                     "pruned at 224x224.")
    return lines


def build(params: Params) -> PageContent:
    folder = params.stage_dir("prune")
    metrics = read_json(folder / "metrics.json")
    split = params.shown_split()
    content = PageContent(findings=cost_findings(metrics, split))
    content.tables["levels"] = markdown_table(level_frame(metrics), LEVEL_COLUMNS)
    content.figures["psnr_by_level"] = figures.plot_pruning(metrics, params.fit.num_splats, split)
    if params.prune.compare_fit_small:
        paired = read_csv(folder / "fit_small.csv")
        content.figures["pruned_vs_direct"] = figures.plot_paired_psnr(
            paired, title=f"(b) Pruned and refitted minus fitted directly, equal steps ({split})")
        content.findings += pruning_findings(paired)
    content.figures["examples"] = level_examples(params, params.levels())
    return content
