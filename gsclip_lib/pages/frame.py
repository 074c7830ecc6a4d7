"""The frame of one page (an executed notebook): parameters, the stage's files, showing and saving.

A page module builds a :class:`PageContent` from a run's files; the notebook shows its parts in the
order it wants through :class:`Page`, which saves every figure as
``paths.reports/figures/<stage>/<name>.png`` and shows that PNG once. Tables and words are Markdown, so a page holds no raw
DataFrame output, and no figure is drawn twice.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gsclip_lib.atomic_files import save_figure
from gsclip_lib.config import find_project_root
from gsclip_lib.errors import InputError
from gsclip_lib.params import Params, load_params


@dataclass
class PageContent:
    """What a page shows: Markdown tables and words, figures by file stem, the closing findings."""

    tables: dict[str, str] = field(default_factory=dict)  # name -> Markdown table (with its notes)
    figures: dict[str, Any] = field(default_factory=dict)  # file stem -> matplotlib Figure
    findings: list[str] = field(default_factory=list)  # "What this run shows", one sentence each
    texts: dict[str, str] = field(default_factory=dict)  # name -> Markdown paragraph


def read_json(path: Path) -> dict[str, Any]:
    """A stage's JSON file, or one line saying which stage to run when it is missing."""
    if not path.is_file():
        raise InputError(f"{path} is missing: run `dvc repro` to produce it")
    return json.loads(path.read_text())


def read_csv(path: Path):
    """A stage's CSV table, or one line saying it is missing."""
    import pandas as pd

    if not path.is_file():
        raise InputError(f"{path} is missing: run `dvc repro` to produce it")
    return pd.read_csv(path)


def quiet_libraries() -> None:
    """Keep library chatter (deprecation notices, font cache messages) out of the pages' output:
    a page shows results, and the stages' logs keep the warnings of the runs that made them."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("matplotlib").setLevel(logging.ERROR)


class Page:
    """One page's frame (see the module docstring)."""

    def __init__(self, stage: str, params_path: str | Path = "params.yaml") -> None:
        params_path = Path(params_path)
        if not params_path.is_absolute() and not params_path.is_file():
            os.chdir(find_project_root())  # params.yaml's relative paths are the project root's
        quiet_libraries()
        self.stage = stage
        self.params: Params = load_params(params_path)
        self.figures = Path(self.params.paths.reports) / "figures" / stage

    def show(self, figure: Any, name: str) -> None:
        """Save ``figure`` as ``<figures>/<name>.png`` and show that PNG."""
        path = save_figure(figure, self.figures / f"{name}.png")
        from IPython.display import Image, display

        display(Image(filename=str(path)))

    def markdown(self, text: str) -> None:
        """Show Markdown (a table from :mod:`gsclip_lib.reporting.tables`, a paragraph)."""
        from IPython.display import Markdown, display

        display(Markdown(text))

    def findings(self, lines: list[str]) -> None:
        """The page's closing "What this run shows", one bullet per sentence."""
        self.markdown("\n".join(f"- {line}" for line in lines) if lines else "Nothing to report.")


def level_examples(params: Params, counts: list[int], count: int = 6):
    """The first images of the shown evaluation split beside their splats at each of ``counts``."""
    from gsclip_lib.data.splat_shards import read_level_examples
    from gsclip_lib.reporting.splat_figures import plot_level_examples

    split = params.shown_split()
    examples = read_level_examples(
        {level: params.splat_dir(level, split) for level in counts}, params.splat_splits()[split],
        image_size=params.data.image_size, channels=params.data.channels, resize_mode=params.data.resize_mode,
        count=count,
    )
    settings = params.fit.optimizer
    return plot_level_examples(examples.images, examples.splats, examples.captions, cutoff=settings.cutoff,
                               backend=settings.backend)
