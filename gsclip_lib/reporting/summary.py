"""Gather every stage's metrics JSON for the report stage and the README's results table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from gsclip_lib.errors import InputError
from gsclip_lib.params import Params, level_name

# The stages with one metrics file each; align has one per level.
STAGES = ("fit_photos", "prepare", "fit", "prune", "pretrain", "evaluate")


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"metrics file missing: {path} (run `dvc repro` to produce it)")
    return json.loads(path.read_text())


def collect_reports(params: Params) -> dict[str, Any]:
    """Every stage's metrics, keyed by stage (``prune``, ``align/N22``, ...)."""
    collected = {stage: _read(params.stage_dir(stage) / "metrics.json") for stage in STAGES}
    for level in params.levels():
        collected[f"align/{level_name(level)}"] = _read(params.stage_dir("align", level) / "metrics.json")
    return collected


def training_histories(collected: dict[str, Any]) -> dict[str, list[dict]]:
    """Loss curves of every training stage: the RGB pretraining and both stages of every level."""
    histories = {"pretrain RGB CLIP": collected["pretrain"].get("history", [])}
    for stage, metrics in collected.items():
        if stage.startswith("align/"):
            level = stage.split("/")[1]
            histories[f"distill {level}"] = metrics["distill"]["history"]
            histories[f"align {level}"] = metrics["contrastive"]["history"]
    return histories


def stage_seconds(collected: dict[str, Any]) -> dict[str, float]:
    return {stage: float(metrics.get("stage_seconds", 0.0)) for stage, metrics in collected.items()}


def fitting_throughput(collected: dict[str, Any]) -> dict[str, float]:
    """Images per second of every fitting step that reports it."""
    throughput = {}
    fit = collected["fit"]
    for split, stats in fit.items():
        if isinstance(stats, dict) and stats.get("images_per_second"):
            throughput[f"fit N{stats['splats']} {split}"] = stats["images_per_second"]
    for count, level in collected["fit_photos"].get("levels", {}).items():
        if level.get("fit_seconds_per_image"):
            throughput[f"photo 224px {count}"] = 1.0 / level["fit_seconds_per_image"]
    return throughput


def results_table(collected: dict[str, Any]) -> pd.DataFrame:
    """One row per evaluation set and representation: bytes, ratio, zero-shot top-1 and top-5; each
    splat level is followed by its render-back control (the RGB model on the splats drawn back).

    The README's table. ``set`` is the evaluation split (``eval``: the labelled evaluation shards;
    ``imagenet``: the ImageNet-style folder).
    """
    rows = []
    for split, scores in collected["evaluate"]["sets"].items():
        source = scores["rgb"]["source_bytes"]
        rows.append({
            "set": split,
            "representation": "RGB pixels",
            "bytes": source,
            "ratio": 1.0,
            "top1": scores["rgb"]["top1"],
            "top5": scores["rgb"]["top5"],
        })
        for name, level in scores["levels"].items():
            rows.append({
                "set": split,
                "representation": f"splats {name}",
                "bytes": level["payload_bytes"],
                "ratio": level["ratio_payload"],
                "top1": level["top1"],
                "top5": level["top5"],
            })
            back = level.get("render_back")
            if back:
                rows.append({
                    "set": split,
                    "representation": f"splats {name} rendered back, RGB model",
                    "bytes": level["payload_bytes"],
                    "ratio": level["ratio_payload"],
                    "top1": back["top1"],
                    "top5": back["top5"],
                })
        for row in scores.get("baselines", []):
            over = row.get("over_budget_images", 0)
            note = f" (over budget: {over} of {row['images']} images)" if over else ""
            rows.append({
                "set": split,
                "representation": f"{row['method']} at {row['level']} budget{note}",
                "bytes": row["mean_bytes"],
                "ratio": source / row["mean_bytes"],
                "top1": row["top1"],
                "top5": row["top5"],
            })
    table = pd.DataFrame(rows)
    table[["top1", "top5"]] = (100 * table[["top1", "top5"]]).round(1)
    table["ratio"] = table["ratio"].round(2)
    table["bytes"] = table["bytes"].round(1)
    return table


def markdown_table(table: pd.DataFrame) -> str:
    """``table`` as a GitHub Markdown table (numbers as pandas prints them), for the README."""
    header = [str(column) for column in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for row in table.itertuples(index=False):
        cells = [str(value).replace("|", "\\|") for value in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
