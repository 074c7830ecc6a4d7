"""Progress bars that suit a terminal, a log file and an executed notebook alike.

- In a Jupyter kernel (the notebooks ``dvc repro`` executes through papermill, or ``jupyter lab``) a
  bar is one line of output that is *updated in place* through a display id: a live notebook shows
  it moving, and the executed notebook stores only its last state, not one redraw per step.
- In a terminal it is an ordinary tqdm bar.
- Anywhere else (CI logs, ``torchrun`` output sent to a file) it redraws at most every
  ``LOG_INTERVAL`` seconds, so a log holds a few lines per bar.
"""

from __future__ import annotations

import io
import sys
from typing import Any

from tqdm import tqdm

NOTEBOOK_INTERVAL = 1.0  # seconds between updates of a notebook bar
LOG_INTERVAL = 30.0  # seconds between redraws when output goes to a file or pipe


def in_notebook() -> bool:
    """Whether this process runs inside a Jupyter kernel."""
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ipython = shell.get_ipython() if hasattr(shell, "get_ipython") else None
    return ipython is not None and "IPKernelApp" in getattr(ipython, "config", {})


class _NotebookLineBar(tqdm):
    """A tqdm bar drawn as one ``text/plain`` output that each refresh replaces."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from IPython.display import display

        kwargs["file"] = io.StringIO()  # tqdm's own printer writes nowhere; display() draws
        kwargs.setdefault("mininterval", NOTEBOOK_INTERVAL)
        kwargs.setdefault("ncols", 100)
        kwargs.setdefault("ascii", False)  # a StringIO has no encoding, and tqdm would fall back to #
        self._handle = None
        if not kwargs.get("disable"):
            self._handle = display({"text/plain": ""}, raw=True, display_id=True)
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if self._handle is not None:
            self._handle.update({"text/plain": msg if msg is not None else self.__str__()}, raw=True)
        return True

    def close(self) -> None:
        if self.disable:
            return
        super().close()
        if self._handle is not None:
            self._handle.update({"text/plain": self.__str__()}, raw=True)  # the final count stays


def progress_bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` drawn the way the output's destination suits (module docstring)."""
    if in_notebook():
        return _NotebookLineBar(iterable, **kwargs)
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_INTERVAL)
    return tqdm(iterable, **kwargs)


def report(message: str) -> None:
    """A line of progress news (a restart, a skipped file) that does not break a running bar."""
    tqdm.write(message, file=sys.stdout if in_notebook() else sys.stderr)
