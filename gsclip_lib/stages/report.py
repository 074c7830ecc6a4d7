"""Stage ``report``: the pipeline's results in one place, drawn from every stage's metrics.

The table of results (the README's, written as ``results.md``), fit quality against splat count and
bytes beside JPEG, examples at every level, zero-shot accuracy against compression ratio (the
paper's main result, redrawn, with the matched-bytes baselines), the training curves of every
training stage, and the wall time of every stage with the fitting throughput.
"""

from __future__ import annotations

import pandas as pd

from gsclip_lib.params import Params
from gsclip_lib.reporting import figures
from gsclip_lib.reporting.summary import (
    collect_reports,
    fitting_throughput,
    markdown_table,
    results_table,
    stage_seconds,
    training_histories,
)
from gsclip_lib.stages.fit import example_figure
from gsclip_lib.stages.runner import StageResult


def run(params: Params, *, progress: bool = True) -> StageResult:
    """The ``report`` stage (see the module docstring)."""
    collected = collect_reports(params)
    table = results_table(collected)
    photos = pd.read_csv(params.stage_dir("fit_photos") / "table.csv")
    made = {
        "psnr_vs_size": figures.plot_psnr_against_size(photos),
        "levels": example_figure(params, params.levels(), count=5),
    }
    for split, scores in collected["evaluate"]["sets"].items():
        title = f"Zero-shot top-1 against compression ({split})"
        made[f"zero_shot_vs_ratio_{split}"] = figures.plot_zero_shot_against_ratio(scores, title=title)
    made["training_curves"] = figures.plot_training_curves(training_histories(collected))
    seconds = stage_seconds(collected)
    made["stage_times"] = figures.plot_stage_times(seconds, fitting_throughput(collected))
    metrics = {
        "stage_seconds": seconds,  # the runner adds this stage's own time
        "total_minutes": round(sum(seconds.values()) / 60, 2),
        "results": table.to_dict(orient="records"),
    }
    return StageResult(metrics={"stages": metrics}, figures=made, tables={"results": table},
                       texts={"results.md": markdown_table(table)}, summary=table)
