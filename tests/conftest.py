"""Test set-up shared by the whole suite.

TRITON_INTERPRET must be set before the module that defines the Triton kernels is imported, so it is
set here, at the top of the first file pytest loads. On a machine with CUDA, export
TRITON_INTERPRET=0 to test the compiled kernels instead.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)
