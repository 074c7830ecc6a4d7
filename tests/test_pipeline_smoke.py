"""The whole DVC pipeline, through papermill, on the tiny profile, as a user runs it.

Runs in a copy of the project's files (git-tracked and not ignored), so the working tree is never
touched. The profile is applied the documented way, ``python -m gsclip_lib.stages.profiles tiny``
(``dvc exp run -S ...``), with a small ImageNet-style folder (three Fashion-MNIST classes and one
corrupt file) as the second evaluation set. Asserts that every metrics file exists with sane values,
that every executed notebook ran without error and shows its figures, that the tiny RGB model beats
chance, that a second ``dvc repro`` runs nothing, and that a changed parameter or a changed library
module reruns exactly the stages that depend on it.
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

from gsclip_lib.data.fashion_mnist import load_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
FOLDER_CLASSES = {1: "trouser", 8: "bag", 7: "sneaker"}  # Fashion-MNIST label -> folder name
FOLDER_IMAGES_PER_CLASS = 4


def _write_image_folder(root: Path, fashion_mnist: Path) -> None:
    """root/<class>/<n>.png from Fashion-MNIST's test split, and one file that is not an image."""
    images, labels = load_fashion_mnist(fashion_mnist, "test")
    for label, name in FOLDER_CLASSES.items():
        (root / name).mkdir(parents=True)
        for number, index in enumerate(np.flatnonzero(labels == label)[-FOLDER_IMAGES_PER_CLASS:]):
            Image.fromarray(images[index]).save(root / name / f"{number}.png")
    (root / "bag" / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # papermill from the venv
    env.update(GIT_AUTHOR_NAME="gsclip", GIT_AUTHOR_EMAIL="gsclip@localhost", GIT_COMMITTER_NAME="gsclip",
               GIT_COMMITTER_EMAIL="gsclip@localhost")
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)


def _would_run(project: Path) -> set[str]:
    dry = _run([sys.executable, "-m", "dvc", "repro", "--dry", "--force-downstream"], project)
    assert dry.returncode == 0, dry.stdout[-4000:] + dry.stderr[-4000:]
    return set(re.findall(r"Running stage '([^']+)'", dry.stdout))


@pytest.mark.slow
def test_tiny_pipeline_runs_end_to_end(tmp_path, fashion_mnist):
    listing = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]  # tracked or not ignored
    files = subprocess.run(listing, cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    project = tmp_path / "project"
    for name in set(files):
        source = ROOT / name
        if source.is_file():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, project / name)
    (project / "dvc.lock").unlink(missing_ok=True)
    shutil.rmtree(project / "reports", ignore_errors=True)
    _write_image_folder(tmp_path / "folder", fashion_mnist)
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        assert _run(command, project).returncode == 0

    first = _run([sys.executable, "-m", "gsclip_lib.stages.profiles", "tiny", "-S",
                  f"data.imagenet_dir={tmp_path / 'folder'}"], project)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]

    params = yaml.safe_load((project / "params.yaml").read_text())  # the experiment's values
    tiny = yaml.safe_load((ROOT / "profiles" / "tiny.yaml").read_text())
    assert params["data"]["train_size"] == tiny["data"]["train_size"] != 6000
    reports = project / params["paths"]["reports"]
    levels = [params["fit"]["num_splats"], *params["prune"]["levels"]]
    metrics = {path.relative_to(reports).as_posix(): json.loads(path.read_text()) for path in reports.rglob("metrics.json")}
    expected = {"fit_photos/metrics.json", "prepare/metrics.json", "fit/metrics.json", "pretrain/metrics.json",
                "evaluate/metrics.json", "report/metrics.json"}
    expected.add("prune/metrics.json")
    expected |= {f"align/N{level}/metrics.json" for level in levels}
    assert expected <= set(metrics)

    prepared = metrics["prepare/metrics.json"]["splits"]
    assert prepared["train"]["images"] == params["data"]["train_size"]
    folder_images = len(FOLDER_CLASSES) * FOLDER_IMAGES_PER_CLASS
    assert prepared["imagenet"]["images"] == folder_images and prepared["imagenet"]["classes"] == 3
    assert prepared["imagenet"]["skipped"]["undecodable_image"] + prepared["imagenet"]["skipped"]["truncated_image"] == 1
    assert metrics["fit/metrics.json"]["train"]["mean_psnr"] > 10
    assert metrics["fit/metrics.json"]["imagenet"]["images"] == folder_images
    pruned = metrics["prune/metrics.json"]
    for level in params["prune"]["levels"]:
        rows = pruned["levels"][f"N{level}"]
        assert rows["imagenet"]["images"] == folder_images
        assert rows["eval"]["mean_psnr_before"] > rows["eval"]["mean_psnr"] > 5
        assert rows["eval"]["mean_psnr"] > rows["eval"]["mean_psnr_pruned"], "the refit must recover some of the cut"
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
    assert evaluation["sets"]["eval"]["rgb"]["top1"] > 0.2, "the tiny RGB model must beat chance (10 %) clearly"

    executed = sorted((reports / "notebooks").glob("*.ipynb"))
    assert len(executed) == 4 + 1 + len(levels) + 2  # 00-03, 04, 05s, 06-07
    for notebook in executed:
        outputs = [o for c in json.loads(notebook.read_text())["cells"] for o in c.get("outputs", [])]
        assert not [o for o in outputs if o.get("output_type") == "error"], notebook.name
        assert any("image/png" in o.get("data", {}) for o in outputs), f"{notebook.name} shows no figure"
        stream = sum(len("".join(o.get("text", ""))) for o in outputs if o.get("output_type") == "stream")
        assert stream < 5000, f"{notebook.name} holds {stream} characters of stream output (progress redraws?)"
    for split in ("eval", "imagenet"):
        assert (reports / "report" / "figures" / f"zero_shot_vs_ratio_{split}.png").stat().st_size > 1000
    assert "| set | representation |" in (reports / "report" / "results.md").read_text()

    second = _run([sys.executable, "-m", "dvc", "repro"], project)
    assert second.returncode == 0 and "Running stage" not in second.stdout, second.stdout

    # A parameter changed: exactly the fit and the stages downstream of it would run.
    original = (project / "params.yaml").read_text()
    changed = yaml.safe_load(original)
    changed["fit"]["optimizer"]["iterations"] += 1
    (project / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    after_fit = {"fit", "prune", "align_fitted", "evaluate", "report"}
    after_fit |= {f"align@{level}" for level in params["prune"]["levels"]}
    assert _would_run(project) == after_fit
    (project / "params.yaml").write_text(original)

    # A library module changed: the stages that import it, and what depends on them, no others.
    for module, stages in (
        ("gsclip_lib/evaluation/zero_shot.py", {"evaluate", "report"}),
        ("gsclip_lib/splats/codec.py", after_fit | {"fit_photos"}),
        ("gsclip_lib/models/splat_encoder.py", {"align_fitted", "evaluate", "report"}
         | {f"align@{level}" for level in params["prune"]["levels"]}),
    ):
        source = (project / module).read_text()
        (project / module).write_text(source + "\n# changed\n")
        assert _would_run(project) == stages, module
        (project / module).write_text(source)
    assert _would_run(project) == set()
