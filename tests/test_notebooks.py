"""The source notebooks are thin pages; a page executed through papermill shows its figures and words, no noise."""

import json
from pathlib import Path

import papermill
import pytest
import yaml

from gsclip_lib.reporting.page_check import page_problems
from gsclip_lib.stages.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _outputs(notebook: Path) -> list[dict]:
    return [output for cell in json.loads(notebook.read_text())["cells"] for output in cell.get("outputs", [])]


def test_source_notebooks_are_thin_and_have_no_outputs():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = [cell for cell in cells if cell["cell_type"] == "code"]
        assert not any(cell.get("outputs") or cell.get("execution_count") for cell in code), path.name
        source = "\n".join("".join(cell["source"]) for cell in code)
        assert "def " not in source and "class " not in source, f"{path.name}: logic belongs in the library"
        assert any("parameters" in cell.get("metadata", {}).get("tags", []) for cell in code), path.name
        assert cells[0]["cell_type"] == "markdown" and "".join(cells[0]["source"]).startswith("# "), path.name
        assert "METHOD.md" in "".join("".join(cell["source"]) for cell in cells), f"{path.name} cites no method notes"


@pytest.mark.slow
def test_fit_photos_page_shows_what_the_stage_wrote(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["paths"]["reports"] = str(tmp_path / "reports")
    params["fit_photos"].update(
        photos=["astronaut", "coffee"], image_size=32, splat_counts=[64, 16], prune_refit_iterations=3
    )
    params["fit_photos"]["optimizer"].update(iterations=6, log_every=2)
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params))
    assert main(["fit_photos", "--params", str(params_path)]) == 0
    out = tmp_path / "reports" / "fit_photos"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["photos"] == 2 and set(metrics["levels"]) == {"N64", "N16"}
    for name, level in metrics["levels"].items():
        count = int(name[1:])
        assert level["payload_bytes"] == count * 8 * 2
        assert level["ratio_payload"] == pytest.approx(32 * 32 * 3 / (count * 16), abs=1e-3)
        assert level["record_bytes"] == level["payload_bytes"] + 18
        assert 8.0 < level["psnr"] < 60.0
        assert abs(level["psnr_after_codec"] - level["psnr"]) < 0.5
    assert metrics["levels"]["N16"]["psnr_pruned_from_larger"] is not None
    assert metrics["levels"]["N64"]["psnr_pruned_from_larger"] is None
    assert metrics["levels"]["N64"]["psnr_random_init"] is not None
    assert metrics["levels"]["N16"]["steps"] == 6 + 3  # the direct fit gets the pruned route's steps

    executed = tmp_path / "reports" / "notebooks" / "00_fit_photos.ipynb"
    executed.parent.mkdir(parents=True)
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "00_fit_photos.ipynb"), str(executed),
        parameters={"params_path": str(params_path)}, cwd=str(ROOT), progress_bar=False,
    )
    for figure in ("gallery", "psnr_vs_size", "psnr_history", "findings"):
        assert (tmp_path / "reports" / "figures" / "fit_photos" / f"{figure}.png").stat().st_size > 1000
    assert page_problems(executed, min_figures=4) == []
    outputs = _outputs(executed)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 4  # each figure once, inline
    words = "".join("".join(o.get("data", {}).get("text/markdown", "")) for o in outputs)
    top = metrics["levels"]["N64"]
    assert f"At 64 splats the fit reaches {top['psnr']:.2f} dB (range" in words  # generated from the metrics
    assert "over 2 photos" in words and "| splats |" in words
