"""What every benchmark shares: provenance, the machine, load average, child processes, peak memory,
the paper's splat counts and the tables printed to the terminal. The FLOP and byte model lives
beside it, in :mod:`benchmarks.cost_model`.

- **Git** (:func:`git_info`, :func:`file_provenance`): the commit as a full hash and a separate
  ``dirty`` flag (tracked files differing from it). Read-only: ``git --no-optional-locks``.
- **Machine** (:func:`machine_info`): CPU model, cores, torch and triton versions, threads, Python,
  platform, the date and :func:`git_info`; every JSON records it under ``machine``.
- **Load average** (:func:`timed_section`): before and after a section, with its seconds: on a
  shared machine timings are noisy, and the load says how noisy.
- **Child processes** (:func:`run_in_child`), one protocol: the parent starts ``python -m
  benchmarks.harness`` (``OMP_NUM_THREADS`` set) with a JSON request on stdin (``"module:function"``,
  arguments, a result path); the child calls the function and writes ``{"value", "peak_rss_kib",
  "seconds"}`` or ``{"error", "traceback"}`` there; any failure is one :class:`ChildFailed`.
- **Peak memory** (:func:`peak_rss_kib`), one method: the resident-set high-water mark of a fresh
  child process, ``getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux) read in the child. It counts
  every byte the process holds (torch's allocator, numpy, Python objects, loader buffers), which
  ``tracemalloc`` (Python allocations only) misses; the measured stages run on the CPU, where
  ``torch.cuda.max_memory_allocated`` says nothing. ``ru_maxrss`` never goes down, hence a fresh
  process per measurement. :func:`current_rss_kib` (``VmRSS``) only traces memory during a run.
- **The paper's splat counts** (:func:`paper_splat_counts`): ``fit.num_splats`` and ``prune.levels``
  of ``profiles/paper.yaml`` over ``params.yaml``, through :func:`gsclip_lib.params.load_params`.
- **Terminal tables** (:func:`fmt`, :func:`ratio`, :func:`format_table`).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import importlib
import importlib.metadata
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
PAPER_PROFILE = ROOT / "profiles" / "paper.yaml"


# --- git -----------------------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    """``git args`` in the repository: its stdout stripped, or None when git fails or is missing."""
    try:
        done = subprocess.run(["git", "--no-optional-locks", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_info() -> dict[str, Any]:
    """``{"commit": full hash or None, "dirty": tracked files differ from it (None without git)}``."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def file_provenance(path: str | Path) -> dict[str, Any]:
    """An input file: its path, the last commit that touched it, whether it differs from that commit,
    and its SHA-256."""
    path = Path(path).resolve()
    relative = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    return {
        "path": relative,
        "last_commit": _git("log", "-1", "--format=%H", "--", relative) or None,
        "modified_since_commit": bool(_git("status", "--porcelain", "--", relative)),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


# --- machine and timing context ------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:  # the installed version, without importing the package (triton's import is slow)
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Where and when a benchmark ran: the fields every benchmark's JSON records under ``machine``."""
    import torch

    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_version": torch.__version__,
        "triton_version": _version("triton"),
        "torch_threads": torch.get_num_threads(),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_info(),
    }


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """How the benchmark was started, as one shell line."""
    return " ".join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def timed_section(run: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``run(*args, **kwargs)``'s record, with the load average before and after and its seconds."""
    before, started = list(os.getloadavg()), time.perf_counter()
    record = run(*args, **kwargs)
    record["load_average"] = {"before": before, "after": list(os.getloadavg())}
    record["section_seconds"] = time.perf_counter() - started
    return record


# --- memory --------------------------------------------------------------------------------------


def peak_rss_kib() -> int:
    """This process's resident-set high-water mark so far (``ru_maxrss``; KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def current_rss_kib() -> int:
    """This process's resident set size now (``VmRSS``, KiB): for traces, never as a peak."""
    with open("/proc/self/status") as stream:
        for line in stream:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise OSError("no VmRSS in /proc/self/status")


# --- child processes -----------------------------------------------------------------------------


class ChildFailed(RuntimeError):
    """A function run by :func:`run_in_child` failed; the message names it and the child's error."""


@dataclass(frozen=True)
class ChildRun:
    value: Any  # what the function returned, through JSON
    peak_rss_kib: int  # the child's resident-set high-water mark at the function's return
    seconds: float  # wall time of the call in the child (imports excluded)


def run_in_child(target: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None, *,
                 threads: int = 1, timeout: float | None = None, env: dict[str, str] | None = None) -> ChildRun:
    """Call ``target`` (``"package.module:function"``) with JSON-able arguments in a fresh Python process
    (``threads`` threads, ``env`` over ours) and return what it returned (JSON-able) and its peak memory."""
    env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with tempfile.TemporaryDirectory(prefix="gsclip-child-") as folder:
        result_path = Path(folder) / "result.json"
        request = {"target": target, "args": list(args), "kwargs": kwargs or {}, "result": str(result_path)}
        try:
            done = subprocess.run([sys.executable, "-m", "benchmarks.harness"], input=json.dumps(request), cwd=ROOT,
                                  env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as error:
            raise ChildFailed(f"{target} in a child process: no result within {timeout} s") from error
        result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    if "error" in result:
        raise ChildFailed(f"{target} failed in a child process: {result['error']}\n{result['traceback']}")
    if done.returncode != 0 or "value" not in result:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ChildFailed(f"{target} failed in a child process (exit status {done.returncode}): {last}\n"
                          f"{done.stderr[-3000:]}")
    return ChildRun(result["value"], result["peak_rss_kib"], result["seconds"])


def _child_main() -> int:
    """The child's side of :func:`run_in_child`: the request on stdin, the answer in its result file."""
    request = json.loads(sys.stdin.read())  # threads: OMP_NUM_THREADS, which torch reads on import
    try:
        module, _, name = request["target"].partition(":")
        function = getattr(importlib.import_module(module), name)
        started = time.perf_counter()
        value = function(*request["args"], **request["kwargs"])
        answer = {"value": value, "peak_rss_kib": peak_rss_kib(), "seconds": time.perf_counter() - started}
        text, status = json.dumps(answer), 0
    except Exception as error:  # every failure goes back to the parent as one error
        text, status = json.dumps({"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}), 1
    Path(request["result"]).write_text(text)
    return status


# --- the paper profile ---------------------------------------------------------------------------


@functools.cache
def paper_params() -> Any:
    """``params.yaml`` with ``profiles/paper.yaml`` laid over it."""
    from gsclip_lib.params import load_params

    return load_params(ROOT / "params.yaml", profile=PAPER_PROFILE)


def paper_splat_counts() -> tuple[int, ...]:
    """The paper's levels, largest first: the profile's ``fit.num_splats``, then ``prune.levels``."""
    return tuple(paper_params().levels())


# --- terminal tables -----------------------------------------------------------------------------


def fmt(value: Any, spec: str = "") -> str:
    """``value`` formatted with ``spec``; ``n/a`` for None, NaN and inf."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or not denominator > 0:
        return None
    return numerator / denominator


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], specs: Sequence[str] | None = None,
                 indent: int = 2) -> str:
    """Rows under a header, columns as wide as their widest cell: the first left-aligned, the rest
    right-aligned; each cell through :func:`fmt` with its column's spec."""
    specs = list(specs or [""] * len(header))
    cells = [[fmt(value, spec) for value, spec in zip(row, specs)] for row in rows]
    widths = [max([len(name), *(len(row[i]) for row in cells)]) for i, name in enumerate(header)]

    def line(values: Sequence[str]) -> str:
        return " " * indent + "  ".join(
            value.ljust(width) if i == 0 else value.rjust(width) for i, (value, width) in enumerate(zip(values, widths)))

    return "\n".join([line(list(header)), *(line(row) for row in cells)])


if __name__ == "__main__":
    sys.exit(_child_main())
