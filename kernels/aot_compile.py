"""Every Triton kernel compiled ahead of time for the GPUs this project targets, on any machine.

The triton wheel ships NVIDIA's ``ptxas`` and ``cuobjdump``, so a kernel compiles to a cubin for an
A100 (``sm_80``) or an H100 (``sm_90``) with no GPU and no network. :func:`compile_all` does that for
every kernel of ``kernels/`` at the specializations its launcher uses (gray and RGB), and reads back
what the hardware will see (:class:`KernelResources`): registers per thread, spilled bytes, shared
memory, and how many blocks of the kernel fit on one streaming multiprocessor at once.

Register budgets (:data:`REGISTER_BUDGETS`). A thread's registers decide how many warps an SM can
hold (65,536 registers per SM on both targets, allocated per warp in units of 256): at 255 registers
a block of 128 threads leaves room for 2 blocks, 8 warps of 64; at 128 registers for 4 blocks. The
kernels that serve the fit (the tile-culled forward and backward, the colour adjoint) stream splats
through a loop of loads and ``exp``; 16 resident warps (4 blocks of 4 warps, or 2 of 8 for the tiled
backward and the adjoint, one thread per pixel of a 16x16 tile) are what lets one block's loads
overlap another's arithmetic, so their budget is 128. The dense kernels, which read every splat at every
pixel, are held to the same 128 (their block shape is chosen for it). No kernel may spill at all: a
spill turns a register read into a local-memory round trip inside the innermost loop.

``make test`` compiles everything and fails on an error, a spill or a register count over budget
(``tests/kernels/test_aot_compile.py``); ``make gpu-check`` writes the same table into its JSON.
Run it with ``TRITON_INTERPRET`` unset or 0 (the interpreter replaces the kernels):
``python -m kernels.aot_compile`` prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TARGETS = {"sm_80": 80, "sm_90": 90}  # A100, H100
REGISTERS_PER_SM = 65_536
REGISTER_UNIT = 256  # registers are allocated per warp in multiples of this
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SHARED_BYTES_PER_SM = {80: 164 * 1024, 90: 228 * 1024}  # what one SM can give its blocks
WARP_SIZE = 32

# Kernel -> its register budget (see the module docstring for why): 16 resident warps.
REGISTER_BUDGETS = {
    "_rasterize_fwd_kernel": 128,
    "_rasterize_bwd_kernel": 128,
    "_tiled_fwd_kernel": 128,
    "_tiled_bwd_kernel": 128,
    "_colour_adjoint_kernel": 128,
}

# Pointer arguments by name, as the launchers pass them; every other non-constexpr argument is a size
# (int32) except the squared cutoff (fp32).
_POINTER_TYPES = {
    "valid_ptr": "*u8",
    "tile_offsets_ptr": "*i64",
    "tile_splats_ptr": "*i32",
}
_FLOAT_SCALARS = {"cutoff_sq"}


class CompileError(RuntimeError):
    """A kernel did not compile for a target, or its resources could not be read."""


@dataclass(frozen=True)
class KernelBuild:
    """One specialization of one kernel: the values of its ``tl.constexpr`` arguments."""

    module: str  # e.g. "kernels.rasterize_triton"
    kernel: str  # the @triton.jit function's name
    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int = 4  # Triton's default, which the launchers keep unless they say otherwise

    @property
    def label(self) -> str:
        values = ", ".join(f"{name}={value}" for name, value in self.constexprs)
        return f"{self.kernel}[{values}]"


@dataclass(frozen=True)
class KernelResources:
    """What one compiled kernel asks of an SM, as ``cuobjdump -res-usage`` reads it from the cubin."""

    kernel: str
    specialization: str
    target: str
    registers: int  # per thread
    spill_bytes: int  # stack frame + local memory per thread: 0 means nothing spilled
    shared_bytes: int  # per block
    threads_per_block: int
    blocks_per_sm: int
    occupancy: float  # resident warps / the SM's 64

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def kernel_builds(channels: tuple[int, ...] = (1, 3)) -> list[KernelBuild]:
    """Every Triton kernel at the specializations its launcher makes for ``channels``."""
    from kernels import rasterize_triton as dense
    from kernels import colour_adjoint_triton as adjoint
    from kernels import rasterize_triton_tiled as tiled

    builds = []
    for c in channels:
        colour = (("C", c), ("C_PAD", _next_power_of_two(c)))
        builds += [
            KernelBuild(dense.__name__, "_rasterize_fwd_kernel",
                        colour + (("HAS_CUTOFF", True), ("BLOCK_P", dense._FWD_BLOCK_P), ("BLOCK_N", dense._FWD_BLOCK_N))),
            KernelBuild(dense.__name__, "_rasterize_bwd_kernel",
                        colour + (("HAS_CUTOFF", True), ("BLOCK_P", dense._BWD_BLOCK_P), ("BLOCK_N", dense._BWD_BLOCK_N))),
            KernelBuild(tiled.__name__, "_tiled_fwd_kernel",
                        colour + (("TILE", tiled.DEFAULT_TILE_SIZE),
                                  ("BLOCK_N", tiled.forward_block_n(tiled.DEFAULT_TILE_SIZE)))),
            KernelBuild(tiled.__name__, "_tiled_bwd_kernel",
                        colour + (("TILE", tiled.DEFAULT_TILE_SIZE),
                                  ("BLOCK_N", tiled.backward_block_n(tiled.DEFAULT_TILE_SIZE))),
                        num_warps=tiled.BACKWARD_WARPS),
        ]
        # The adjoint's launcher compiles the cutoff test away for cutoff = inf: both variants.
        builds += [KernelBuild(adjoint.__name__, "_colour_adjoint_kernel",
                               colour + (("HAS_CUTOFF", has_cutoff), ("TILE", adjoint.TILE_SIZE),
                                         ("BLOCK_N", adjoint._BLOCK_N)), num_warps=adjoint.NUM_WARPS)
                   for has_cutoff in (True, False)]
    return builds


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


def _signature(jit_function: Any, constexprs: dict[str, Any]) -> dict[str, str]:
    signature = {}
    for name in jit_function.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = _POINTER_TYPES.get(name, "*fp32")
        else:
            signature[name] = "fp32" if name in _FLOAT_SCALARS else "i32"
    return signature


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.is_file():
        raise CompileError(f"{path} is missing: the triton wheel ships {name}; reinstall triton")
    return str(path)


def compile_kernel(build: KernelBuild, target: str) -> KernelResources:
    """``build`` compiled for ``target`` (one of :data:`TARGETS`), and the resources it needs."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise CompileError("TRITON_INTERPRET is set: the interpreter replaces the kernels; unset it to compile")
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arch = TARGETS[target]
    jit_function = getattr(importlib.import_module(build.module), build.kernel)
    constexprs = dict(build.constexprs)
    source = ASTSource(fn=jit_function, signature=_signature(jit_function, constexprs),
                       constexprs={(jit_function.arg_names.index(name),): value for name, value in constexprs.items()})
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, WARP_SIZE),
                                  options={"num_warps": build.num_warps})
    except Exception as error:  # noqa: BLE001 - any compiler failure is reported the same way
        raise CompileError(f"{build.label} does not compile for {target}: {error}") from error
    usage = _resource_usage(compiled.asm["cubin"])
    threads = build.num_warps * WARP_SIZE
    blocks = blocks_per_sm(usage["REG"], usage["SHARED"], build.num_warps, arch)
    return KernelResources(
        kernel=build.kernel, specialization=build.label, target=target, registers=usage["REG"],
        spill_bytes=usage["STACK"] + usage["LOCAL"], shared_bytes=usage["SHARED"], threads_per_block=threads,
        blocks_per_sm=blocks, occupancy=blocks * build.num_warps / MAX_WARPS_PER_SM,
    )


def _resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        listing = subprocess.run([_tool("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True)
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", listing.stdout))
    if set(found) != {"REG", "STACK", "SHARED", "LOCAL"}:
        raise CompileError(f"cuobjdump reported no resource usage: {listing.stdout.strip()} {listing.stderr.strip()}")
    return {name: int(value) for name, value in found.items()}


def blocks_per_sm(registers: int, shared_bytes: int, num_warps: int, arch: int) -> int:
    """Blocks of ``num_warps`` warps that fit on one SM at once, by registers, shared memory and the
    SM's limits on warps and blocks."""
    per_warp = math.ceil(registers * WARP_SIZE / REGISTER_UNIT) * REGISTER_UNIT
    by_registers = (REGISTERS_PER_SM // per_warp) // num_warps if per_warp else MAX_BLOCKS_PER_SM
    by_shared = SHARED_BYTES_PER_SM[arch] // shared_bytes if shared_bytes else MAX_BLOCKS_PER_SM
    return min(by_registers, by_shared, MAX_WARPS_PER_SM // num_warps, MAX_BLOCKS_PER_SM)


def compile_all(targets: tuple[str, ...] = tuple(TARGETS)) -> list[KernelResources]:
    """Every kernel build on every target (see :func:`kernel_builds`)."""
    return [compile_kernel(build, target) for build in kernel_builds() for target in targets]


def problems(resources: list[KernelResources]) -> list[str]:
    """What breaks the rules of the module docstring: spills, and registers over a kernel's budget."""
    found = []
    for row in resources:
        budget = REGISTER_BUDGETS[row.kernel]
        if row.spill_bytes:
            found.append(f"{row.specialization} on {row.target} spills {row.spill_bytes} bytes per thread")
        if row.registers > budget:
            found.append(f"{row.specialization} on {row.target} uses {row.registers} registers, budget {budget}")
    return found


def resources_report() -> dict[str, Any]:
    """Every kernel's resources on every target, the budgets, and the problems (JSON-able)."""
    rows = compile_all()
    return {"rows": [row.as_dict() for row in rows], "budgets": REGISTER_BUDGETS, "problems": problems(rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.aot_compile", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        rows = compile_all()
    except CompileError as error:
        print(f"error: {error}")
        return 2
    if args.json:
        report = {"rows": [row.as_dict() for row in rows], "budgets": REGISTER_BUDGETS, "problems": problems(rows)}
        print(json.dumps(report))
        return 1 if report["problems"] else 0
    print(f"{'kernel':<64} {'target':<6} {'regs':>4} {'budget':>6} {'spill':>5} {'shared':>6} {'blocks/SM':>9} {'occupancy':>9}")
    for row in rows:
        print(f"{row.specialization:<64} {row.target:<6} {row.registers:>4} {REGISTER_BUDGETS[row.kernel]:>6} "
              f"{row.spill_bytes:>5} {row.shared_bytes:>6} {row.blocks_per_sm:>9} {row.occupancy:>9.3f}")
    found = problems(rows)
    for line in found:
        print(f"error: {line}")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
