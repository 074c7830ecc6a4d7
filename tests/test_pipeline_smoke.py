"""The whole DVC pipeline, through papermill, on the tiny profile (params-tiny.yaml).

Runs in a copy of the project's tracked files, so the working tree is never touched. A small
ImageNet-style folder (three Fashion-MNIST classes and one corrupt file) is the second evaluation
set. Asserts that every metrics file exists with its keys and sane values, that every executed
notebook ran without error, that a second `dvc repro` runs nothing, and that changing a fit
parameter would rerun only the stages that depend on it.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from gsclip_lib.fashion_mnist import load_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


FOLDER_CLASSES = {1: "trouser", 8: "bag", 7: "sneaker"}  # Fashion-MNIST label -> folder name
FOLDER_IMAGES_PER_CLASS = 4


def _write_image_folder(root: Path) -> None:
    """root/<class>/<n>.png from Fashion-MNIST's test split, and one file that is not an image."""
    images, labels = load_fashion_mnist(str(FASHION_MNIST.parent), "test")
    for label, name in FOLDER_CLASSES.items():
        (root / name).mkdir(parents=True)
        for number, index in enumerate(np.flatnonzero(labels == label)[-FOLDER_IMAGES_PER_CLASS:]):
            Image.fromarray(images[index]).save(root / name / f"{number}.png")
    (root / "bag" / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")


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
    params = yaml.safe_load((ROOT / "params-tiny.yaml").read_text())
    _write_image_folder(tmp_path / "folder")
    params["data"]["imagenet_dir"] = str(tmp_path / "folder")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "dvc.lock").unlink(missing_ok=True)
    shutil.rmtree(tmp_path / "reports", ignore_errors=True)
    assert _run(["git", "init", "-q"], tmp_path).returncode == 0
    if not (tmp_path / ".dvc" / "config").is_file():
        assert _run([sys.executable, "-m", "dvc", "init", "-q"], tmp_path).returncode == 0

    first = _run([sys.executable, "-m", "dvc", "repro"], tmp_path)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]

    reports = tmp_path / params["paths"]["reports"]
    levels = [params["fit"]["num_splats"], *params["prune"]["levels"]]
    metrics = {path.relative_to(reports).as_posix(): json.loads(path.read_text()) for path in reports.rglob("metrics.json")}
    expected = {"fit_photos/metrics.json", "prepare/metrics.json", "fit/metrics.json", "pretrain/metrics.json",
                "evaluate/metrics.json"}
    expected |= {f"prune/N{level}/metrics.json" for level in params["prune"]["levels"]}
    expected |= {f"align/N{level}/metrics.json" for level in levels}
    assert expected <= set(metrics)

    prepared = metrics["prepare/metrics.json"]["splits"]
    assert prepared["train"]["images"] == params["data"]["train_size"]
    folder_images = len(FOLDER_CLASSES) * FOLDER_IMAGES_PER_CLASS
    assert prepared["imagenet"]["images"] == folder_images and prepared["imagenet"]["classes"] == 3
    assert prepared["imagenet"]["skipped"]["undecodable_image"] + prepared["imagenet"]["skipped"]["truncated_image"] == 1
    assert metrics["fit/metrics.json"]["train"]["mean_psnr"] > 10
    assert metrics["fit/metrics.json"]["imagenet"]["images"] == folder_images
    for level in params["prune"]["levels"]:
        assert metrics[f"prune/N{level}/metrics.json"]["imagenet"]["images"] == folder_images
    evaluation = metrics["evaluate/metrics.json"]
    assert set(evaluation["sets"]) == {"eval", "imagenet"}
    expected_images = {"eval": params["data"]["eval_size"], "imagenet": folder_images}
    for split, scores in evaluation["sets"].items():
        assert scores["classes"] == (10 if split == "eval" else 3)
        assert scores["rgb"]["images"] == expected_images[split]
        assert 0.0 <= scores["rgb"]["top1"] <= scores["rgb"]["top5"] <= 1.0
        assert set(scores["levels"]) == {f"N{level}" for level in levels}
        for name, level in scores["levels"].items():
            assert level["ratio_payload"] == pytest.approx(784 / (int(name[1:]) * 12), abs=1e-3)
            assert level["images"] == expected_images[split]
            assert 0.0 <= level["top1"] <= level["top5"] <= 1.0
        assert {row["method"] for row in scores["baselines"]} == {"jpeg", "thumbnail"}
    for stage, stage_metrics in metrics.items():
        assert stage_metrics.get("stage_seconds", 1) > 0, stage

    for notebook in (reports / "notebooks").glob("*.ipynb"):
        cells = json.loads(notebook.read_text())["cells"]
        errors = [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, notebook.name
    for split in ("eval", "imagenet"):
        assert (reports / "figures" / f"zero_shot_vs_ratio_{split}.png").stat().st_size > 1000

    second = _run([sys.executable, "-m", "dvc", "repro"], tmp_path)
    assert second.returncode == 0
    assert "Running stage" not in second.stdout, second.stdout

    # One fit parameter changed: exactly the stages downstream of the fit would run.
    params["fit"]["optimizer"]["iterations"] += 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dry = _run([sys.executable, "-m", "dvc", "repro", "--dry"], tmp_path)
    assert dry.returncode == 0, dry.stdout[-4000:] + dry.stderr[-4000:]
    would_run = set(re.findall(r"Running stage '([^']+)'", dry.stdout))
    downstream = {"fit", "align_fitted", "evaluate", "figures"}
    downstream |= {f"prune@{level}" for level in params["prune"]["levels"]}
    downstream |= {f"align@{level}" for level in params["prune"]["levels"]}
    assert would_run == downstream, dry.stdout
