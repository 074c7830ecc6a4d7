"""Page ``04_pretrain_rgb``: the RGB CLIP's training (or the weights it exported), and its curve."""

from __future__ import annotations

import pandas as pd

from gsclip_lib.pages.frame import PageContent, read_json
from gsclip_lib.params import Params
from gsclip_lib.reporting import figures
from gsclip_lib.reporting.tables import Column, markdown_table

COLUMNS = (
    Column("model", "model", "text"),
    Column("parameters", "parameters", "int"),
    Column("train_images", "pairs per epoch", "int"),
    Column("steps", "steps", "int"),
    Column("global_batch_size", "batch", "int"),
    Column("final_loss", "final loss", "float", 3),
    Column("final_logit_scale", "logit scale", "float", 1),
    Column("seconds", "seconds", "float", 0),
    Column("images_per_second", "pairs/s", "float", 0),
)


def findings(metrics: dict) -> list[str]:
    if metrics.get("exported"):
        return [f"No training: the weights of {metrics['source']} were exported as the teacher."]
    history = metrics["history"]
    first = history[0]["loss"] if history else None
    lines = [f"{metrics['model']} ({metrics['parameters']:,} parameters) trained for {metrics['steps']:,} steps "
             f"of {metrics['global_batch_size']} pairs in {metrics['seconds']:.0f} s."]
    if first is not None:
        lines.append(f"The contrastive loss fell from {first:.3f} at step {history[0]['step']} to "
                     f"{metrics['final_loss']:.3f} (one run; no interval: a training curve, not an estimate).")
    lines.append("Its zero-shot accuracy, with interval, is on the evaluation page (06).")
    return lines


def build(params: Params) -> PageContent:
    metrics = read_json(params.stage_dir("pretrain") / "metrics.json")
    content = PageContent(findings=findings(metrics))
    if not metrics.get("exported"):
        content.tables["training"] = markdown_table(pd.DataFrame([metrics])[[c.key for c in COLUMNS]], COLUMNS)
        content.figures["loss"] = figures.plot_training_curves({"pretrain RGB CLIP": metrics["history"]})
    return content
