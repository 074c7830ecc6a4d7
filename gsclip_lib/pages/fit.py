"""Page ``02_fit_splats``: every split fitted at the largest level, its quality and throughput."""

from __future__ import annotations

import pandas as pd

from gsclip_lib.pages.frame import PageContent, level_examples, read_json
from gsclip_lib.params import Params
from gsclip_lib.reporting.tables import Column, markdown_table

SPLIT_COLUMNS = (
    Column("split", "split", "text"),
    Column("images", "images", "int"),
    Column("mean_psnr", "mean PSNR (dB)", "float", 2),
    Column("interval", "95 % CI (dB)", "text"),
    Column("payload_bytes", "bytes per image", "int"),
    Column("ratio_payload", "ratio", "float", 2),
    Column("images_per_second", "images/s", "float", 1),
    Column("dropped_fits", "dropped fits", "int"),
    Column("shards", "shards fitted / kept", "text"),
)


def interval_text(row: dict, key: str = "mean_psnr") -> str:
    """``25.8-26.0`` from a row's ``<key>_low``/``<key>_high``; "–" when it has none."""
    low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
    return f"{low:.2f}–{high:.2f}" if low is not None and high is not None else "–"


def split_frame(metrics: dict, splits: list[str]) -> pd.DataFrame:
    """One row per split of the fit stage's metrics."""
    rows = []
    for split in splits:
        row = metrics[split]
        rows.append({"split": split, **{column.key: row.get(column.key) for column in SPLIT_COLUMNS[1:]},
                     "interval": interval_text(row),
                     "shards": f"{row['shards_written']} / {row['shards_skipped']}"})
    return pd.DataFrame(rows)


def findings(metrics: dict, splits: list[str]) -> list[str]:
    """The fit's quality per split, with its interval, and what was resumed or dropped."""
    lines = []
    for split in splits:
        row = metrics[split]
        lines.append(f"{split}: {row['images']:,} images fitted with {row['splats']} splats ({row['payload_bytes']} "
                     f"bytes, {row['ratio_payload']:.2f}x smaller than the pixels) to a mean PSNR of "
                     f"{row['mean_psnr']:.2f} dB (95 % CI {interval_text(row)}, normal approximation over images).")
        if row["dropped_fits"]:
            lines.append(f"{split}: {row['dropped_fits']:,} fits turned non-finite and were dropped.")
        if row["shards_skipped"]:
            lines.append(f"{split}: {row['shards_skipped']} finished shards were kept from an earlier run (resumed).")
    lines.append("The paper fits 224x224 RGB photos (notebook 00); these 28x28 gray fits have no counterpart "
                 "number in the paper.")
    return lines


def build(params: Params) -> PageContent:
    metrics = read_json(params.stage_dir("fit") / "metrics.json")
    splits = list(params.splat_splits())
    content = PageContent(findings=findings(metrics, splits))
    content.tables["splits"] = markdown_table(split_frame(metrics, splits), SPLIT_COLUMNS)
    content.figures["examples"] = level_examples(params, [params.fit.num_splats])
    return content
