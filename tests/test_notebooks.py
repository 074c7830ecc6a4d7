"""End-to-end: each stage notebook runs through papermill on tiny parameters and writes its outputs."""

import json
from pathlib import Path

import papermill
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _tiny_params(tmp_path: Path) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["paths"]["reports"] = str(tmp_path / "reports")
    params["fit_photos"].update(
        photos=["astronaut", "coffee"], image_size=32, splat_counts=[64, 16], prune_finetune_iterations=3
    )
    params["fit_photos"]["optimizer"].update(iterations=6, log_every=2)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.slow
def test_fit_photos_notebook_runs_and_writes_sane_metrics(tmp_path):
    params_path = _tiny_params(tmp_path)
    executed = tmp_path / "reports" / "notebooks" / "00_fit_photos.ipynb"
    executed.parent.mkdir(parents=True)
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "00_fit_photos.ipynb"),
        str(executed),
        parameters={"params_path": str(params_path)},
        cwd=str(ROOT),
        progress_bar=False,
    )
    out = tmp_path / "reports" / "fit_photos"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["photos"] == 2
    assert set(metrics["levels"]) == {"N64", "N16"}
    for name, level in metrics["levels"].items():
        count = int(name[1:])
        assert level["payload_bytes"] == count * 8 * 2
        assert level["ratio_payload"] == pytest.approx(32 * 32 * 3 / (count * 16), abs=1e-3)
        assert level["record_bytes"] == level["payload_bytes"] + 18
        assert 8.0 < level["psnr"] < 60.0
        assert abs(level["psnr_after_codec"] - level["psnr"]) < 0.5
        assert level["jpeg_bytes"] <= level["payload_bytes"] or level["jpeg_quality"] is None
    assert metrics["levels"]["N16"]["psnr_pruned_from_largest"] is not None
    assert metrics["levels"]["N64"]["psnr_pruned_from_largest"] is None
    assert metrics["stage_seconds"] > 0
    for figure in ("gallery.png", "psnr_vs_size.png", "psnr_history.png"):
        assert (out / figure).stat().st_size > 1000
    notebook = json.loads(executed.read_text())
    errors = [o for c in notebook["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
