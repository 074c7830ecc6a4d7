"""One way to run a stage, from a notebook or from the command line.

A stage module (``gsclip_lib.stages.fit``, ``...prune``, ...) has a ``run(params, ...)`` function that
does the work and returns a :class:`StageResult`: its metrics, its figures and its tables. The
:class:`StageRun` around it does what every stage needs the same way:

- finds the project root (the folder holding ``dvc.yaml`` and ``params.yaml``) and works from there,
  so a notebook opened with ``jupyter lab`` in ``notebooks/`` reads the same files as ``dvc repro``;
- reads the parameters (:func:`gsclip_lib.params.load_params`: ``params.yaml``, an optional profile,
  ``--set`` overrides) and starts the clock;
- shows figures and tables inline when it runs in a notebook, and saves every figure (PNG, under
  ``figures/``) and table (CSV) to the stage's report folder, ``paths.reports/<stage>[/N<level>]``;
- writes the metrics JSON with the stage's wall time and the world size, atomically, on rank 0 only.

The notebook and the command line therefore produce the same files from the same parameters.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gsclip_lib import distributed
from gsclip_lib.atomic_files import save_figure, write_csv, write_json, write_text
from gsclip_lib.errors import ConfigError
from gsclip_lib.params import Params, load_params
from gsclip_lib.progress import in_notebook

PROJECT_MARKERS = ("dvc.yaml", "params.yaml")


@dataclass
class StageResult:
    """What a stage's ``run`` returns: metrics for the JSON, figures and tables for the report."""

    metrics: dict[str, Any]
    figures: dict[str, Any] = field(default_factory=dict)  # file stem -> matplotlib Figure
    tables: dict[str, Any] = field(default_factory=dict)  # file stem -> pandas DataFrame (saved as CSV)
    texts: dict[str, str] = field(default_factory=dict)  # file name -> text (e.g. a Markdown table)
    summary: Any = None  # a DataFrame the notebook shows after the run (not saved)
    comparison: Any = None  # a DataFrame: our numbers beside the paper's, where it has some


def find_project_root(start: str | Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the working directory) that holds
    ``dvc.yaml`` and ``params.yaml``."""
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if all((folder / marker).is_file() for marker in PROJECT_MARKERS):
            return folder
    raise ConfigError(f"no gsclip project (a folder with {' and '.join(PROJECT_MARKERS)}) at or above {here}")


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
        self.shown: set[str] = set()  # figures already saved by show()

    def figure_path(self, name: str) -> Path:
        """Where figure ``name`` is saved: ``<stage folder>/figures/<name>.png``."""
        return self.out_dir / "figures" / f"{name}.png"

    def show(self, figure: Any, name: str) -> None:
        """Save ``figure`` as ``figures/<name>.png`` in the stage's folder and show it inline in a notebook."""
        path = self.figure_path(name)
        if self.is_main:
            save_figure(figure, path)
        self.shown.add(name)
        if in_notebook() and path.is_file():
            from IPython.display import Image, display

            display(Image(filename=str(path)))

    def show_table(self, table: Any) -> None:
        """Show a DataFrame (or anything displayable) in a notebook; nothing elsewhere."""
        if table is not None and in_notebook():
            from IPython.display import display

            display(table)

    def show_markdown(self, lines: list[str] | str) -> None:
        """Show Markdown in a notebook (several lines as a bulleted list); print it elsewhere."""
        text = lines if isinstance(lines, str) else "\n".join(f"- {line}" for line in lines)
        if in_notebook():
            from IPython.display import Markdown, display

            display(Markdown(text))
        else:
            print(text)

    def finish(self, result: StageResult) -> dict[str, Any]:
        """Save what :meth:`show` did not, then write ``metrics.json``; return the metrics."""
        for name, figure in result.figures.items():
            if name not in self.shown and self.is_main:
                save_figure(figure, self.figure_path(name))
        if self.is_main:
            for name, table in result.tables.items():
                write_csv(self.out_dir / f"{name}.csv", table)
            for name, text in result.texts.items():
                write_text(self.out_dir / name, text)
        metrics = dict(result.metrics)
        metrics["stage_seconds"] = round(time.perf_counter() - self.started, 1)
        metrics["world_size"] = distributed.rank_and_world_size()[1]
        if self.is_main:
            write_json(self.out_dir / "metrics.json", metrics)
        if result.comparison is not None and in_notebook():
            from IPython.display import display

            display(result.comparison)
        return metrics

