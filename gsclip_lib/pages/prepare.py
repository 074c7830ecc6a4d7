"""Page ``01_prepare_data``: the image-text shards written, read back, with every skip counted."""

from __future__ import annotations

import pandas as pd

from gsclip_lib.pages.frame import PageContent, read_json
from gsclip_lib.params import Params
from gsclip_lib.reporting import figures
from gsclip_lib.reporting.tables import Column, markdown_table

COLUMNS = (
    Column("split", "split", "text"),
    Column("images", "images", "int"),
    Column("shards", "shards", "int"),
    Column("classes", "classes", "int"),
    Column("skipped", "skipped", "int"),
    Column("reasons", "skip reasons", "text"),
)


def skipped(split: dict) -> dict[str, int]:
    return {reason: count for reason, count in split["skipped"].items() if reason != "good" and count}


def split_frame(metrics: dict) -> pd.DataFrame:
    rows = []
    for name, split in metrics["splits"].items():
        reasons = skipped(split)
        rows.append({"split": name, "images": split["images"], "shards": split["shards"],
                     "classes": split.get("classes", len(split.get("per_class", []))),
                     "skipped": sum(reasons.values()),
                     "reasons": ", ".join(f"{reason} {count}" for reason, count in reasons.items()) or "none"})
    return pd.DataFrame(rows)


def samples_figure(params: Params, split: str):
    """The first samples of a prepared split as the shard reader returns them, with their captions."""
    from gsclip_lib.data.image_text_shards import ImageTextShards

    data = params.data
    reader = ImageTextShards(data.prepared_shards(split), channels=data.channels, rank=0, world_size=1)
    return figures.plot_captioned_samples([sample for _, sample in zip(range(16), reader)])


def build(params: Params) -> PageContent:
    metrics = read_json(params.stage_dir("prepare") / "metrics.json")
    lines = []
    for name, split in metrics["splits"].items():
        reasons = skipped(split)
        detail = ", ".join(f"{count} {reason}" for reason, count in reasons.items())
        lines.append(f"{name}: {split['images']:,} images in {split['shards']} shard(s); "
                     + (f"{sum(reasons.values())} skipped ({detail})." if reasons else "none skipped."))
    content = PageContent(findings=lines)
    content.tables["splits"] = markdown_table(split_frame(metrics), COLUMNS)
    if metrics["splits"]:
        split = "train" if "train" in metrics["splits"] else next(iter(metrics["splits"]))
        content.figures["samples"] = samples_figure(params, split)
    return content
