"""Run one pipeline stage from the command line, one process or many under ``torchrun``.

The notebooks are what ``dvc repro`` runs and what a reader reads; on a multi-GPU machine the heavy
stages run through this entry point instead, with exactly the same library calls and parameters:

    torchrun --nproc_per_node=8 -m gsclip_lib.stages.cli fit --profile profiles/paper.yaml
    torchrun --nproc_per_node=8 -m gsclip_lib.stages.cli align --level 3136 --profile profiles/paper.yaml
    python -m gsclip_lib.stages.cli prune --set prune.refit_iterations=20

Each process reads its rank from torchrun's environment (gloo on the CPU, NCCL on GPUs); fitting
splits the shards across ranks, training wraps the model in DDP. Rank 0 writes the stage's metrics,
figures and tables where the notebook would (:class:`gsclip_lib.pipeline.runner.StageRun`).

A mistake of the user's (a bad parameter, a missing file, unusable input) is printed as one line
naming it, with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from gsclip_lib import distributed
from gsclip_lib.errors import GsclipError
from gsclip_lib.pipeline.runner import StageRun

STAGES = ("fit_photos", "prepare", "fit", "prune", "pretrain", "align", "evaluate")
LEVEL_STAGES = ("align",)


def run_stage(stage: str, params: str, *, level: int | None = None, profile: str | None = None,
              overrides: list[str] | None = None) -> dict:
    """Run ``stage`` as its notebook does; return the metrics it wrote."""
    if stage not in STAGES:
        raise GsclipError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    if (stage in LEVEL_STAGES) != (level is not None):
        needs = "needs --level N" if stage in LEVEL_STAGES else "takes no --level"
        raise GsclipError(f"the {stage} stage {needs}")
    run = StageRun(stage, params, level=level, profile=profile, overrides=overrides or [])
    module = importlib.import_module(f"gsclip_lib.stages.{stage}")
    result = module.run(run.params, level=level) if level is not None else module.run(run.params)
    return run.finish(result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gsclip_lib.stages.cli", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    parser.add_argument("--profile", default=None, help="a profile laid over it, e.g. profiles/paper.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="GROUP.KEY=VALUE",
                        help="override one value (YAML syntax); may be repeated")
    parser.add_argument("--level", type=int, default=None, help="splat count, for align")
    args = parser.parse_args(argv)
    distributed.init_distributed()
    try:
        run_stage(args.stage, args.params, level=args.level, profile=args.profile, overrides=args.overrides)
    except (GsclipError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
