"""Progress bars that suit both a terminal and an executed notebook.

Papermill records every redraw of a text progress bar into the executed notebook, so outside a
terminal the bar redraws at most every ``NOTEBOOK_INTERVAL`` seconds; in a terminal it updates as
usual.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

NOTEBOOK_INTERVAL = 15.0  # seconds between redraws when stderr is not a terminal


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)`` with a redraw interval chosen for where the output goes."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", NOTEBOOK_INTERVAL)
    return tqdm(iterable, **kwargs)
