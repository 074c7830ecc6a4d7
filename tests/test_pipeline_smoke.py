"""The whole DVC pipeline, through papermill, on the tiny profile (params-tiny.yaml).

Runs in a copy of the project's tracked files, so the working tree is never touched. Asserts that
every metrics file exists with its keys and sane values, that every executed notebook ran without
error, and that a second `dvc repro` runs nothing.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # papermill from the venv
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.is_file(), reason="Fashion-MNIST not installed (make test installs it)")
def test_tiny_pipeline_runs_end_to_end(tmp_path):
    listing = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]  # tracked or not ignored
    files = subprocess.run(listing, cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in set(files):
        source = ROOT / name
        if source.is_file():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, tmp_path / name)
    shutil.copy2(ROOT / "params-tiny.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.lock").unlink(missing_ok=True)
    shutil.rmtree(tmp_path / "reports", ignore_errors=True)
    assert _run(["git", "init", "-q"], tmp_path).returncode == 0
    if not (tmp_path / ".dvc" / "config").is_file():
        assert _run([sys.executable, "-m", "dvc", "init", "-q"], tmp_path).returncode == 0

    first = _run([sys.executable, "-m", "dvc", "repro"], tmp_path)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]

    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    reports = tmp_path / params["paths"]["reports"]
    levels = [params["fit"]["num_splats"], *params["prune"]["levels"]]
    metrics = {path.relative_to(reports).as_posix(): json.loads(path.read_text()) for path in reports.rglob("metrics.json")}
    expected = {"fit_photos/metrics.json", "prepare/metrics.json", "fit/metrics.json", "pretrain/metrics.json",
                "evaluate/metrics.json"}
    expected |= {f"prune/N{level}/metrics.json" for level in params["prune"]["levels"]}
    expected |= {f"align/N{level}/metrics.json" for level in levels}
    assert expected <= set(metrics)

    assert metrics["prepare/metrics.json"]["splits"]["train"]["images"] == params["data"]["train_size"]
    assert metrics["fit/metrics.json"]["train"]["mean_psnr"] > 10
    evaluation = metrics["evaluate/metrics.json"]
    assert 0.0 <= evaluation["rgb"]["top1"] <= evaluation["rgb"]["top5"] <= 1.0
    assert set(evaluation["levels"]) == {f"N{level}" for level in levels}
    for name, level in evaluation["levels"].items():
        assert level["ratio_payload"] == pytest.approx(784 / (int(name[1:]) * 12), abs=1e-3)
        assert 0.0 <= level["top1"] <= level["top5"] <= 1.0
    assert {row["method"] for row in evaluation["baselines"]} == {"jpeg", "thumbnail"}
    for stage, stage_metrics in metrics.items():
        assert stage_metrics.get("stage_seconds", 1) > 0, stage

    for notebook in (reports / "notebooks").glob("*.ipynb"):
        cells = json.loads(notebook.read_text())["cells"]
        errors = [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, notebook.name
    assert (reports / "figures" / "zero_shot_vs_ratio.png").stat().st_size > 1000

    second = _run([sys.executable, "-m", "dvc", "repro"], tmp_path)
    assert second.returncode == 0
    assert "Running stage" not in second.stdout, second.stdout
