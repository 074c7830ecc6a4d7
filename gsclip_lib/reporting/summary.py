"""Gather every stage's metrics JSON for the report page: training curves, stage times, throughput."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
            throughput[f"photo {count}"] = 1.0 / level["fit_seconds_per_image"]
    return throughput
