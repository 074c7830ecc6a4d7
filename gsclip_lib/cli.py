"""Run one pipeline stage from the command line, for many processes under ``torchrun``.

The notebooks are what ``dvc repro`` runs and what a reader reads; on a multi-GPU machine the heavy
stages run through this entry point instead, with exactly the same library calls and parameters:

    torchrun --nproc_per_node=8 -m gsclip_lib.cli fit --params params-paper.yaml
    torchrun --nproc_per_node=8 -m gsclip_lib.cli pretrain --params params-paper.yaml
    torchrun --nproc_per_node=8 -m gsclip_lib.cli align --level 3136 --params params-paper.yaml

Each process reads its rank from torchrun's environment (gloo on the CPU, NCCL on GPUs); fitting
splits the shards across ranks, training wraps the model in DDP. Rank 0 writes the stage's metrics
JSON where the notebook would.
"""

from __future__ import annotations

import argparse
import time

from gsclip_lib import distributed
from gsclip_lib.clip_models import RgbModelConfig
from gsclip_lib.clip_stages import AlignStageConfig, EvaluateConfig, run_align_level, run_evaluation, run_pretrain
from gsclip_lib.config import load_stage_config
from gsclip_lib.data_stages import (
    DataConfig,
    FitStageConfig,
    PruneStageConfig,
    fit_splat_level,
    prepare_data,
    prune_splat_level,
)
from gsclip_lib.paths import PathsConfig
from gsclip_lib.reporting import write_json
from gsclip_lib.rgb_pretrain import PretrainConfig

STAGES = ("prepare", "fit", "prune", "pretrain", "align", "evaluate")


def run_stage(stage: str, params: str, level: int | None) -> dict:
    def group(name, cls):
        return load_stage_config(params, name, cls)

    if stage in ("prune", "align") and level is None:
        raise SystemExit(f"the {stage} stage needs --level")
    data = group("data", DataConfig)
    if stage == "prepare":
        return prepare_data(data)
    if stage == "fit":
        return fit_splat_level(group("fit", FitStageConfig), data)
    if stage == "prune":
        return prune_splat_level(group("fit", FitStageConfig), group("prune", PruneStageConfig), data, level)
    models = (group("model", RgbModelConfig), group("pretrain", PretrainConfig))
    if stage == "pretrain":
        return run_pretrain(*models)
    if stage == "align":
        return run_align_level(*models, group("fit", FitStageConfig), group("align", AlignStageConfig), level)
    return run_evaluation(
        *models, data, group("fit", FitStageConfig), group("prune", PruneStageConfig),
        group("align", AlignStageConfig), group("evaluate", EvaluateConfig),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    parser.add_argument("--level", type=int, default=None, help="splat count, for prune and align")
    args = parser.parse_args(argv)
    info = distributed.init_distributed()
    started = time.perf_counter()
    try:
        metrics = run_stage(args.stage, args.params, args.level)
        if info.rank == 0:
            metrics["stage_seconds"] = round(time.perf_counter() - started, 1)
            metrics["world_size"] = info.world_size
            folder = args.stage if args.level is None else f"{args.stage}/N{args.level}"
            reports = load_stage_config(args.params, "paths", PathsConfig).stage_dir(folder)
            write_json(reports / "metrics.json", metrics)
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()
