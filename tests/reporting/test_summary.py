"""The report page's view of all metrics: collection, training curves, stage times and throughput."""

import pytest

from gsclip_lib.atomic_files import write_json
from gsclip_lib.errors import InputError
from gsclip_lib.reporting.summary import (
    collect_reports,
    fitting_throughput,
    stage_seconds,
    training_histories,
)


def _scores(top1: float) -> dict:
    return {"top1": top1, "top5": 1.0}


@pytest.fixture
def reports(tmp_path):
    write_json(tmp_path / "fit_photos/metrics.json", {"stage_seconds": 60.0, "levels": {"400": {"fit_seconds_per_image": 2.0}}})
    write_json(tmp_path / "prepare/metrics.json", {"stage_seconds": 5.0})
    write_json(tmp_path / "fit/metrics.json", {
        "stage_seconds": 100.0, "resumed": {"train": False},
        "train": {"splats": 22, "images_per_second": 40.0}, "imagenet": {"splats": 22, "images_per_second": 20.0},
    })
    write_json(tmp_path / "pretrain/metrics.json", {"stage_seconds": 120.0, "history": [{"step": 0, "loss": 4.0}]})
    write_json(tmp_path / "prune/metrics.json", {"stage_seconds": 10.0})
    for level in (22, 11):
        write_json(tmp_path / f"align/N{level}/metrics.json", {
            "stage_seconds": 50.0,
            "distill": {"history": [{"step": 0, "loss": 1.0}]},
            "contrastive": {"history": [{"step": 0, "loss": 3.0}]},
        })
    level = {"payload_bytes": 264, "ratio_payload": 2.9697, **_scores(0.7)}
    with_render_back = {**level, "render_back": _scores(0.75)}
    write_json(tmp_path / "evaluate/metrics.json", {"stage_seconds": 30.0, "sets": {
        "eval": {"classes": 10, "rgb": {"source_bytes": 784, **_scores(0.83)}, "levels": {"N22": with_render_back},
                 "baselines": [{"level": "N22", "method": "jpeg", "mean_bytes": 261.6, "over_budget_images": 0,
                                "images": 1000, **_scores(0.8)},
                               {"level": "N22", "method": "thumbnail", "mean_bytes": 300.0, "over_budget_images": 7,
                                "images": 1000, **_scores(0.6)}]},
        "imagenet": {"classes": 3, "rgb": {"source_bytes": 784, **_scores(0.9)}, "levels": {"N22": level}, "baselines": []},
    }})
    return tmp_path


@pytest.fixture
def params(reports, defaults):
    """params.yaml with its reports in ``reports``, levels N22 (fitted) and N11 (pruned)."""
    return defaults.params(f"paths.reports={reports}", "fit.num_splats=22", "prune.levels=[11]")


def test_times_throughput_and_curves(params):
    collected = collect_reports(params)
    assert set(collected) == {"fit_photos", "prepare", "fit", "pretrain", "evaluate", "prune", "align/N22", "align/N11"}
    seconds = stage_seconds(collected)
    assert seconds["fit"] == 100.0 and seconds["align/N11"] == 50.0 and sum(seconds.values()) == 425.0
    assert fitting_throughput(collected) == {"fit N22 train": 40.0, "fit N22 imagenet": 20.0, "photo 400": 0.5}
    assert set(training_histories(collected)) == {"pretrain RGB CLIP", "distill N22", "align N22", "distill N11", "align N11"}


def test_a_missing_stage_is_named(reports, params):
    (reports / "align/N11/metrics.json").unlink()
    with pytest.raises(InputError, match="metrics file missing: .*align/N11/metrics.json"):
        collect_reports(params)
    (reports / "prepare/metrics.json").unlink()
    with pytest.raises(InputError, match="metrics file missing: .*prepare/metrics.json"):
        collect_reports(params)
