"""One way to run a stage's computation, from ``dvc repro`` or from ``torchrun``.

A stage module (``gsclip_lib.stages.fit``, ``...prune``, ...) has a ``run(params, ...)`` function that
does the work and returns a :class:`StageResult`: its metrics and its tables. It draws nothing: the
pages (``gsclip_lib.pages``, executed as the notebooks) read what it wrote and draw it, so an edit to
a figure or a page's words reruns no fitting and no training. The :class:`StageRun` around it does
what every stage needs the same way:

- finds the project root (the folder holding ``dvc.yaml`` and ``params.yaml``) and works from there;
- reads the parameters (:func:`gsclip_lib.params.load_params`: ``params.yaml``, an optional profile,
  ``--set`` overrides) and starts the clock;
- saves every table (CSV) and text to the stage's folder, ``paths.reports/<stage>[/N<level>]``;
- writes the metrics JSON with the stage's wall time and the world size, atomically, on rank 0 only.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gsclip_lib import distributed
from gsclip_lib.atomic_files import write_csv, write_json, write_text
from gsclip_lib.config import find_project_root
from gsclip_lib.params import Params, load_params

__all__ = ["StageResult", "StageRun", "find_project_root"]


@dataclass
class StageResult:
    """What a stage's ``run`` returns: metrics for the JSON and tables for the pages."""

    metrics: dict[str, Any]
    tables: dict[str, Any] = field(default_factory=dict)  # file stem -> pandas DataFrame (saved as CSV)
    texts: dict[str, str] = field(default_factory=dict)  # file name -> text
    extra_json: dict[str, Any] = field(default_factory=dict)  # file name -> JSON-able data


class StageRun:
    """The frame of one run of one stage (see the module docstring)."""

    def __init__(
        self,
        stage: str,
        params_path: str | Path = "params.yaml",
        *,
        level: int | None = None,
        profile: str | Path | None = None,
        overrides: tuple[str, ...] | list[str] = (),
    ) -> None:
        self.started = time.perf_counter()
        params_path = Path(params_path)
        if not params_path.is_absolute() and not params_path.is_file():
            root = find_project_root()
            os.chdir(root)  # relative paths in params.yaml are relative to the project root
        elif not params_path.is_absolute():
            params_path = params_path.resolve()
        self.stage = stage
        self.level = level
        self.params: Params = load_params(params_path, profile=profile, overrides=overrides)
        self.out_dir = self.params.stage_dir(stage, level)
        self.is_main = distributed.is_main()

    def finish(self, result: StageResult) -> dict[str, Any]:
        """Write the tables, texts and ``metrics.json`` (rank 0); return the metrics."""
        if self.is_main:
            for name, table in result.tables.items():
                write_csv(self.out_dir / f"{name}.csv", table)
            for name, text in result.texts.items():
                write_text(self.out_dir / name, text)
            for name, data in result.extra_json.items():
                write_json(self.out_dir / name, data)
        metrics = dict(result.metrics)
        metrics["stage_seconds"] = round(time.perf_counter() - self.started, 1)
        metrics["world_size"] = distributed.rank_and_world_size()[1]
        if self.is_main:
            write_json(self.out_dir / "metrics.json", metrics)
        return metrics
