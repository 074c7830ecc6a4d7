"""Page ``05_align_splats``: the splat tower of every level, distilled then aligned, and its curves."""

from __future__ import annotations

import pandas as pd

from gsclip_lib.pages.frame import PageContent, read_json
from gsclip_lib.params import Params, level_name
from gsclip_lib.reporting import figures, paper
from gsclip_lib.reporting.tables import Column, markdown_table

COLUMNS = (
    Column("level", "level", "text"),
    Column("pairs", "pairs", "int"),
    Column("distill_steps", "distill steps", "int"),
    Column("distill_final", "distill: final error", "float", 3),
    Column("contrastive_steps", "align steps", "int"),
    Column("contrastive_loss", "align: final loss", "float", 3),
    Column("batch_accuracy", "align: batch accuracy %", "percent", 1),
    Column("trainable_share", "trainable share %", "percent", 1),
    Column("seconds", "seconds", "float", 0),
)


def distill_error(metrics: dict) -> float:
    """Stage 1's last logged error: the relative squared error of the tokens (``distill_target:
    tokens``) or ``2 - 2 cos`` of the embeddings (``embedding``), whichever the run logged."""
    final = metrics["distill"]["final"]
    return final.get("relative_error", final.get("loss"))


def level_row(name: str, metrics: dict) -> dict:
    return {"level": name, "pairs": metrics["pairs"], "distill_steps": metrics["distill"]["steps"],
            "distill_final": distill_error(metrics), "contrastive_steps": metrics["contrastive"]["steps"],
            "contrastive_loss": metrics["contrastive"]["final_loss"],
            "batch_accuracy": metrics["contrastive"]["final"].get("batch_accuracy"),
            "trainable_share": metrics["parameter_shares"]["trainable_share"], "seconds": metrics["seconds"]}


def findings(rows: list[dict], unfrozen_blocks: int) -> list[str]:
    reference = paper.TRAINABLE_SHARE["v2" if unfrozen_blocks else "v1"]
    shares = ", ".join(f"{row['level']} {100 * row['trainable_share']:.1f} %" for row in rows)
    return [
        f"Trainable share of the splat CLIP: {shares} (the paper: {100 * reference:.1f} % with ViT-B/16); "
        "an architecture count, not an estimate.",
        "Each level is one training run; the losses are the last logged values, not estimates with an interval. "
        "The towers' accuracy, with intervals and paired tests, is on the evaluation page (06).",
    ]


def build(params: Params) -> PageContent:
    metrics = {level_name(level): read_json(params.stage_dir("align", level) / "metrics.json")
               for level in params.levels()}
    rows = [level_row(name, level) for name, level in metrics.items()]
    missing_accuracy = any(row["batch_accuracy"] is None for row in rows)
    notes = ["–: the run logged no batch accuracy."] if missing_accuracy else []
    content = PageContent(findings=findings(rows, params.align.encoder.unfreeze_first_blocks))
    content.tables["levels"] = markdown_table(pd.DataFrame(rows), COLUMNS, notes=notes)
    curves = {}
    for name, level in metrics.items():
        curves[f"distill {name}"] = level["distill"]["history"]
        curves[f"align {name}"] = level["contrastive"]["history"]
    content.figures["training_curves"] = figures.plot_training_curves(curves)
    return content
