"""Every Triton kernel compiles ahead of time for an A100 (sm_80) and an H100 (sm_90), here, without
a GPU: no spills, registers within budget (kernels/aot_compile.py says why each budget)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.aot_compile import (
    REGISTER_BUDGETS,
    TARGETS,
    KernelResources,
    blocks_per_sm,
    kernel_builds,
    problems,
)

REPO = Path(__file__).resolve().parents[2]


def _compile_in_a_fresh_process(*arguments: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # this process runs the interpreter; the child compiles
    return subprocess.run([sys.executable, "-m", "kernels.aot_compile", *arguments], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def compiled() -> dict:
    result = _compile_in_a_fresh_process("--json")
    assert result.stdout.strip(), result.stderr[-3000:]
    return json.loads(result.stdout) | {"returncode": result.returncode}


def test_every_kernel_compiles_for_every_target_without_spilling_within_budget(compiled):
    rows = compiled["rows"]
    built = {(row["specialization"], row["target"]) for row in rows}
    assert built == {(build.label, target) for build in kernel_builds() for target in TARGETS}
    assert set(REGISTER_BUDGETS) == {build.kernel for build in kernel_builds()}
    assert compiled["problems"] == [] and compiled["returncode"] == 0, compiled["problems"]
    for row in rows:
        assert 0 < row["registers"] <= REGISTER_BUDGETS[row["kernel"]] and row["spill_bytes"] == 0
        assert row["blocks_per_sm"] >= 1 and 0 < row["occupancy"] <= 1


def test_occupancy_follows_the_register_file():
    # 65,536 registers per SM, allocated per warp in units of 256; blocks of 4 warps.
    assert blocks_per_sm(255, 1024, 4, 90) == 2
    assert blocks_per_sm(128, 1024, 4, 90) == 4
    assert blocks_per_sm(64, 0, 4, 80) == 8
    assert blocks_per_sm(32, 0, 4, 80) == 16  # the SM's 64 warps are the limit
    assert blocks_per_sm(32, 100 * 1024, 4, 80) == 1  # shared memory is


def test_spills_and_registers_over_budget_are_problems():
    def row(registers: int, spill: int) -> KernelResources:
        return KernelResources("_tiled_fwd_kernel", "tiled[C=3]", "sm_90", registers, spill, 0, 128, 4, 0.25)

    assert problems([row(128, 0)]) == []
    assert problems([row(129, 0)]) == ["tiled[C=3] on sm_90 uses 129 registers, budget 128"]
    assert problems([row(64, 16)]) == ["tiled[C=3] on sm_90 spills 16 bytes per thread"]


def test_the_interpreter_is_refused_with_one_line():
    from kernels.aot_compile import CompileError, compile_kernel

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("this suite runs the interpreter; on a GPU machine it may not")
    with pytest.raises(CompileError, match="TRITON_INTERPRET is set"):
        compile_kernel(kernel_builds()[0], "sm_90")
