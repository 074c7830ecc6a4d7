"""The README's paper-scale runbook, run line by line on the CPU: two gloo ranks instead of 8 GPUs,
``profiles/paper.yaml`` shrunk by ``--set`` overrides (never a copy of the profile) to 32 synthetic
DataComp-style pairs and a 12-image ImageNet-style folder."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from gsclip_lib import distributed
from gsclip_lib.data.image_text_shards import write_image_text_shards

REPO = Path(__file__).resolve().parents[2]
START, END = "<!-- runbook:start", "<!-- runbook:end -->"
LEVELS = {3136: 12, 1600: 8, 900: 4, 400: 2}  # the paper's levels -> the shrunk ones
CLASSES = ("stripes", "checkerboard", "diagonal")


def runbook_lines() -> list[str]:
    """The shell lines of the README's runbook block, without comments."""
    text = (REPO / "README.md").read_text()
    block = text[text.index(START) : text.index(END)]
    lines = []
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith(("<!--", "```")):
            lines.append(line)
    return lines


def texture(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:  # [size, size, 3] uint8
    rows, cols = np.mgrid[0:size, 0:size]
    mask = [rows % 4 < 2, (rows // 3 + cols // 3) % 2 == 0, (rows - cols) % 6 < 3][kind]
    base = rng.integers(0, 40, size=(size, size, 3))
    return (base + 200 * mask[..., None]).clip(0, 255).astype(np.uint8)


def write_datacomp_like(folder: Path, count: int = 32, per_shard: int = 8) -> str:
    """JPEG, caption and a uid per sample, shards named as DataComp's: 00000000.tar, ..."""
    rng = np.random.default_rng(0)
    samples = (
        (f"{i:09d}", texture(i % 3, 40, rng), f"a photo of {CLASSES[i % 3]}", {"uid": f"{i:032x}"})
        for i in range(count)
    )
    written = write_image_text_shards(samples, str(folder / "%08d.tar"), per_shard, image_format="jpg")
    return str(folder / f"{{00000000..{len(written) - 1:08d}}}.tar")


def write_imagenet_like(root: Path, per_class: int = 4) -> None:
    rng = np.random.default_rng(1)
    for kind, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(texture(kind, 48, rng)).save(root / name / f"val_{i}.JPEG", quality=90)


def overrides(work: Path, train_shards: str) -> list[str]:
    values = {
        "paths.reports": str(work / "reports"),
        "fit_photos.photos": ["astronaut"],
        "fit_photos.image_size": 32,
        "fit_photos.splat_counts": [64, 16],
        "fit_photos.prune_refit_iterations": 1,
        "fit_photos.compare_random_init": False,
        "fit_photos.optimizer.iterations": 3,
        "fit_photos.optimizer.backend": "auto",  # the profile's triton_tiled needs CUDA
        "fit.optimizer.backend": "auto",
        "data.shards_dir": str(work / "shards"),
        "data.train_shards": train_shards,
        "data.imagenet_dir": str(work / "imagenet"),
        "data.image_size": 28,
        "fit.out_dir": str(work / "splats"),
        "fit.num_splats": LEVELS[3136],
        "fit.batch_size": 16,
        "fit.optimizer.iterations": 4,
        "prune.levels": [LEVELS[1600], LEVELS[900], LEVELS[400]],
        "prune.refit_iterations": 2,
        "prune.compare_fit_small": False,
        "model.name": "gsclip-vit-tiny-28-p7",
        "model.pretrained": "",
        "pretrain.checkpoint_dir": str(work / "rgb"),
        "pretrain.optim.epochs": 1,
        "pretrain.optim.batch_size": 4,
        "pretrain.optim.warmup_steps": 1,
        "pretrain.optim.checkpoint_every": 2,
        "pretrain.loader.num_workers": 1,
        "pretrain.loader.samples_per_epoch": 0,
        "align.encoder.num_latents": 16,
        "align.encoder.resampler_layers": 1,
        "align.checkpoint_dir": str(work / "align"),
        "align.distill.batch_size": 4,
        "align.distill.epochs": 1,
        "align.distill.warmup_steps": 1,
        "align.distill.checkpoint_every": 2,
        "align.contrastive.batch_size": 4,
        "align.contrastive.epochs": 1,
        "align.contrastive.warmup_steps": 1,
        "align.contrastive.checkpoint_every": 2,
        "align.loader.num_workers": 1,
        "align.loader.samples_per_epoch": 0,
        "evaluate.batch_size": 16,
    }
    return [f"--set={key}={json.dumps(value) if isinstance(value, (list, str)) else value}"
            for key, value in values.items()]


def command(line: str, extra: list[str]) -> list[str] | None:
    """The runbook line as this test runs it: torchrun with 2 ranks, levels mapped; None to skip it."""
    words = shlex.split(line)
    if words[0] in (".", "source", "make"):  # the venv is this interpreter; gpu-check is tested on its own
        return None
    if words[0] == "torchrun":
        assert words[1] == "--nproc_per_node=8", line
        words = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *words[2:]]
    elif words[0] == "python":
        words = [sys.executable, *words[1:]]
    else:
        raise AssertionError(f"the runbook has a line this test does not know how to run: {line}")
    if "--level" in words:
        index = words.index("--level") + 1
        words[index] = str(LEVELS[int(words[index])])
    return words + extra


def test_readme_runbook_runs_end_to_end_with_two_ranks(tmp_path):
    train_shards = write_datacomp_like(tmp_path / "datacomp")
    write_imagenet_like(tmp_path / "imagenet")
    extra = overrides(tmp_path, train_shards)
    env = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    ran = []
    readme = (REPO / "README.md").read_text()
    for line in runbook_lines():
        words = command(line, extra)
        if words is None:
            continue
        done = subprocess.run(words, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        ran.append(words[words.index("gsclip_lib.stages.cli") + 1] if "gsclip_lib.stages.cli" in words else "pages")
    assert ran == ["fit_photos", "prepare", "fit", "prune", "pretrain", "align", "align", "align", "align", "evaluate", "pages"]
    assert (REPO / "README.md").read_text() == readme, "the runbook's pages must leave the README's results alone"

    reports = tmp_path / "reports"
    pretrain = json.loads((reports / "pretrain" / "metrics.json").read_text())
    assert pretrain["world_size"] == 2 and pretrain["train_images"] == 32 and pretrain["steps"] == 4
    for level in LEVELS.values():
        align = json.loads((reports / "align" / f"N{level}" / "metrics.json").read_text())
        assert align["level"] == level and align["pairs"] == 32
    evaluate = json.loads((reports / "evaluate" / "metrics.json").read_text())
    assert "imagenet" in json.dumps(evaluate)
    assert (reports / "report" / "results.md").is_file()
