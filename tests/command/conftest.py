"""A tiny project for the command's tests: the prepare and fit stages run on the tiny profile in a
temporary folder, and a level whose models are freshly initialized (seed 0), saved the way the
pretrain and align stages save theirs. Built once per session; nothing is written to the repository."""

import json
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from gsclip_lib.command.main import main
from gsclip_lib.params import Params, load_params, params_dict

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class TinyProject:
    folder: Path
    params_path: Path  # absolute paths inside, all under folder
    params: Params
    level_dir: Path  # the N22 level: splat_encoder.pt
    eval_pngs: Path  # the eval split's images as <key>.png files, the bytes the shards store
    labels: dict[str, int]  # eval key -> label


@pytest.fixture(autouse=True)
def classifier_cache(tmp_path_factory, monkeypatch) -> Path:
    """Every command test's classifier cache in a new folder of its own, never the user's."""
    folder = tmp_path_factory.mktemp("classifier_cache")
    monkeypatch.setenv("GSCLIP_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def gsclip(capsys):
    """``gsclip(*argv)``: the command run in this process; its exit status, stdout and stderr."""

    def run(*argv) -> tuple[int, str, str]:
        capsys.readouterr()
        status = main([str(arg) for arg in argv])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


def _extract_pngs(shards: list[Path], folder: Path) -> dict[str, int]:
    folder.mkdir()
    labels = {}
    for shard in shards:
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                key, extension = member.name.split(".", 1)
                data = archive.extractfile(member).read()
                if extension == "png":
                    (folder / member.name).write_bytes(data)
                elif extension == "json":
                    labels[key] = json.loads(data)["label"]
    return labels


def _save_untrained_level(params: Params) -> None:
    from gsclip_lib.models.rgb_clip import create_rgb_clip, save_rgb_clip
    from gsclip_lib.models.splat_encoder import build_splat_encoder, save_splat_encoder
    from gsclip_lib.stages.align import measure_feature_statistics

    torch.manual_seed(0)
    rgb = create_rgb_clip(params.model, device="cpu")
    save_rgb_clip(rgb, params.pretrain.model_path())
    level = params.fit.num_splats
    stats, _, height, width = measure_feature_statistics(str(params.splat_dir(level, "train")), 0, 1)
    encoder = build_splat_encoder(rgb, params.align.encoder, stats, (height, width))
    save_splat_encoder(encoder, params.align.tower_path(level), logit_scale=math.log(100.0), text_state=None)


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory, fashion_mnist) -> TinyProject:
    from gsclip_lib.stages.cli import run_stage

    folder = tmp_path_factory.mktemp("tiny_project")
    places = {"paths.reports": "reports", "data.shards_dir": "shards", "fit.out_dir": "splats",
              "pretrain.checkpoint_dir": "models/rgb", "align.checkpoint_dir": "models/align"}
    overrides = [f"{key}={folder / value}" for key, value in places.items()]
    params = load_params(ROOT / "params.yaml", profile=ROOT / "profiles" / "tiny.yaml", overrides=overrides)
    params_path = folder / "params.yaml"
    params_path.write_text(yaml.safe_dump(params_dict(params), sort_keys=False))
    for stage in ("prepare", "fit"):
        run_stage(stage, str(params_path))
    _save_untrained_level(params)
    labels = _extract_pngs(sorted((folder / "shards").glob("eval-*.tar")), folder / "eval_png")
    return TinyProject(folder, params_path, params, params.align.level_dir(params.fit.num_splats),
                       folder / "eval_png", labels)
