"""Where the pipeline writes: the ``paths`` group of params.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PathsConfig:
    reports: str = "reports"  # executed notebooks, metrics JSON, plot data, figures

    def stage_dir(self, stage: str) -> Path:
        """The folder a stage writes its outputs to (created if missing)."""
        folder = Path(self.reports) / stage
        folder.mkdir(parents=True, exist_ok=True)
        return folder
