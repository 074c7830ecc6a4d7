"""The whole DVC pipeline, through papermill, on the tiny profile, as a user runs it.

Runs in a copy of the project's files (git-tracked and not ignored), so the working tree is never
touched. The profile is applied the documented way, ``python -m gsclip_lib.stages.profiles tiny``
(``dvc exp run -S ...``), with a small ImageNet-style folder (three Fashion-MNIST classes and one
corrupt file) as the second evaluation set. Asserts that every metrics file exists with sane values,
that every executed page passes the page checks (no error, no stderr, no progress residue, no raw
table, its figures once each), that the tiny RGB model beats chance, that a second ``dvc repro`` runs
nothing, that a changed parameter or library module reruns exactly the stages that depend on it,
that an edit to a figure function reruns pages only (zero fit and training steps), that an edit to
the fit's maths refits, and that a ``dvc repro`` killed in the middle of the fit resumes.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from gsclip_lib.data.fashion_mnist import load_fashion_mnist
from gsclip_lib.reporting.page_check import page_problems

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
    project = _copy_of_the_project(tmp_path / "project")
    _write_image_folder(tmp_path / "folder", fashion_mnist)
    first = _run([sys.executable, "-m", "gsclip_lib.stages.profiles", "tiny", "-S",
                  f"data.imagenet_dir={tmp_path / 'folder'}"], project)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]

    params = yaml.safe_load((project / "params.yaml").read_text())  # the experiment's values
    tiny = yaml.safe_load((ROOT / "profiles" / "tiny.yaml").read_text())
    assert params["data"]["train_size"] == tiny["data"]["train_size"] != 6000
    reports = project / params["paths"]["reports"]
    _check_metrics(reports, params)
    _check_pages(reports, project, params)
    _check_what_reruns(project, params)
    _check_a_figure_edit_redraws_pages_only(project)
    _check_a_fit_edit_refits(project, reports)
    _check_a_killed_fit_resumes(project, reports, params)


def _copy_of_the_project(project: Path) -> Path:
    """The project's files (tracked, or not ignored) in a fresh git repository, without a run's outputs."""
    listing = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]  # tracked or not ignored
    files = subprocess.run(listing, cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in set(files):
        source = ROOT / name
        if source.is_file():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, project / name)
    (project / "dvc.lock").unlink(missing_ok=True)
    shutil.rmtree(project / "reports", ignore_errors=True)
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        assert _run(command, project).returncode == 0

    return project


def _check_metrics(reports: Path, params: dict) -> None:
    levels = [params["fit"]["num_splats"], *params["prune"]["levels"]]
    metrics = {path.relative_to(reports).as_posix(): json.loads(path.read_text()) for path in reports.rglob("metrics.json")}
    expected = {"fit_photos/metrics.json", "prepare/metrics.json", "fit/metrics.json", "pretrain/metrics.json",
                "evaluate/metrics.json"}
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



def _check_pages(reports: Path, project: Path, params: dict) -> None:
    levels = [params["fit"]["num_splats"], *params["prune"]["levels"]]
    executed = sorted((reports / "notebooks").glob("*.ipynb"))
    assert len(executed) == 8  # one page per notebook
    for notebook in executed:
        assert page_problems(notebook) == [], notebook.name
    for split in ("eval", "imagenet"):
        assert (reports / "figures" / "report" / f"zero_shot_vs_ratio_{split}.png").stat().st_size > 1000
    block = (reports / "report" / "results.md").read_text()
    assert "| set | representation |" in block and "McNemar's exact test" in block
    assert block.strip() in (project / "README.md").read_text(), "the report page writes the README's block"
    headline = json.loads((reports / "evaluate" / "headline.json").read_text())
    assert set(headline["top1"]) == {"rgb"} | {f"N{level}" for level in levels}



def _check_what_reruns(project: Path, params: dict) -> None:
    second = _run([sys.executable, "-m", "dvc", "repro"], project)
    assert second.returncode == 0 and "Running stage" not in second.stdout, second.stdout

    aligns = {"align_fitted"} | {f"align@{level}" for level in params["prune"]["levels"]}
    # A parameter changed: exactly the fit and the stages downstream of it would run.
    original = (project / "params.yaml").read_text()
    changed = yaml.safe_load(original)
    changed["fit"]["optimizer"]["iterations"] += 1
    (project / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    after_fit = {"fit", "fit_page", "prune", "prune_page", "align_page", "evaluate", "evaluate_page", "report"} | aligns
    assert _would_run(project) == after_fit
    (project / "params.yaml").write_text(original)

    # A library module changed: the stages that import it, and what depends on them, no others.
    for module, stages in (
        ("gsclip_lib/evaluation/zero_shot.py", {"evaluate", "evaluate_page", "report"}),
        ("gsclip_lib/models/splat_encoder.py", aligns | {"align_page", "evaluate", "evaluate_page", "report"}),
        ("gsclip_lib/reporting/comparisons.py", {"evaluate_page", "report"}),
        ("gsclip_lib/params.py", set()),  # the schema: its values are tracked in params.yaml, by group
    ):
        source = (project / module).read_text()
        (project / module).write_text(source + "\n# changed\n")
        assert _would_run(project) == stages, module
        (project / module).write_text(source)
    assert _would_run(project) == set()



def _check_a_figure_edit_redraws_pages_only(project: Path) -> None:
    pages = {"fit_photos_page", "prepare_page", "fit_page", "prune_page", "pretrain_page", "align_page",
             "evaluate_page", "report"}
    # A figure edited: the pages are redrawn, and no stage that fits or trains runs.
    figures = project / "gsclip_lib" / "reporting" / "figures.py"
    figures.write_text(figures.read_text() + "\n# a figure edited\n")
    redraw = _run([sys.executable, "-m", "dvc", "repro"], project)
    assert redraw.returncode == 0, redraw.stdout[-4000:] + redraw.stderr[-4000:]
    assert set(re.findall(r"Running stage '([^']+)'", redraw.stdout)) == pages
    assert _would_run(project) == set()



def _check_a_fit_edit_refits(project: Path, reports: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    aligns = {"align_fitted"} | {f"align@{level}" for level in params["prune"]["levels"]}
    # The fit's maths edited: the fit reruns, and refits rather than keeping shards of the old code.
    fitting = project / "gsclip_lib" / "splats" / "fitting.py"
    fitting.write_text(fitting.read_text() + "\n# the fit's maths edited\n")
    assert {"fit", "prune"} | aligns <= _would_run(project)
    refit = _run([sys.executable, "-m", "dvc", "repro", "fit"], project)
    assert refit.returncode == 0, refit.stdout[-4000:] + refit.stderr[-4000:]
    fitted = json.loads((reports / "fit" / "metrics.json").read_text())
    assert fitted["resumed"]["train"] is False and fitted["train"]["shards_skipped"] == 0



def _check_a_killed_fit_resumes(project: Path, reports: Path, params: dict) -> None:
    original = (project / "params.yaml").read_text()
    fitting = project / "gsclip_lib" / "splats" / "fitting.py"
    # A dvc repro killed in the middle of the fit resumes from the finished shards.
    fitting.write_text(fitting.read_text() + "\n# edited again\n")
    slow = yaml.safe_load(original)
    slow["fit"]["batch_size"] = 50  # two batches a shard, and more steps: time to stop between shards
    slow["fit"]["optimizer"]["iterations"] = 60
    (project / "params.yaml").write_text(yaml.safe_dump(slow, sort_keys=False))
    train = project / params["fit"]["out_dir"] / "fitted" / f"N{params['fit']['num_splats']}" / "train"
    started = time.time()

    killed = _start([sys.executable, "-m", "dvc", "repro", "fit"], project)
    deadline = time.monotonic() + 600
    while _finished_since(train, started) < 1 and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert killed.poll() is None, "the fit ended before it could be killed"
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    finished = _finished_since(train, started)
    resumed = _run([sys.executable, "-m", "dvc", "repro", "fit"], project)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    fitted = json.loads((reports / "fit" / "metrics.json").read_text())
    shards = params["data"]["train_size"] // params["data"]["images_per_shard"]
    assert 1 <= finished < shards and fitted["train"]["shards_skipped"] == finished
    assert fitted["train"]["shards_written"] == shards - finished and fitted["train"]["images"] == params["data"]["train_size"]




def _finished_since(train: Path, started: float) -> int:
    """Shards of ``train`` finished after ``started`` (the folder still holds the last run's at first)."""
    count = 0
    for path in train.glob("*.tar.stats.json"):
        try:
            count += path.stat().st_mtime >= started
        except FileNotFoundError:  # the fit is clearing the last run's shards
            pass
    return count


def _start(command: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
