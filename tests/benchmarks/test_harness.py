"""The benchmarks' shared harness (benchmarks/harness.py): provenance, machine, load average, the
child-process protocol, memory, the paper profile's splat counts and the terminal tables. No
assertion depends on the machine's speed."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from benchmarks import harness
from benchmarks.harness import ChildFailed, run_in_child

ROOT = Path(__file__).resolve().parents[2]


def test_git_info_is_one_full_hash_and_a_dirty_flag() -> None:
    info = harness.git_info()
    assert set(info) == {"commit", "dirty"}
    assert info["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", info["commit"])
    assert info["dirty"] is None or isinstance(info["dirty"], bool)


def test_file_provenance_names_the_file_and_its_last_commit() -> None:
    provenance = harness.file_provenance(ROOT / "params.yaml")
    assert provenance["path"] == "params.yaml"
    assert len(provenance["sha256"]) == 64
    assert provenance["last_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", provenance["last_commit"])
    assert isinstance(provenance["modified_since_commit"], bool)


def test_machine_info_has_the_shared_fields() -> None:
    machine = harness.machine_info()
    assert {"cpu_model", "cpu_count", "cpus_usable", "torch_version", "triton_version", "torch_threads",
            "python_version", "platform", "date", "git"} <= set(machine)
    assert machine["cpu_count"] >= 1 and machine["cpu_model"]
    assert machine["git"] == harness.git_info()
    assert machine["date"][:4].isdigit()


def test_timed_section_records_the_load_around_the_run() -> None:
    record = harness.timed_section(lambda value: {"value": value}, 3)
    assert record["value"] == 3
    assert len(record["load_average"]["before"]) == len(record["load_average"]["after"]) == 3
    assert record["section_seconds"] >= 0


def test_a_child_returns_its_result_and_its_own_peak_memory() -> None:
    pid = run_in_child("os:getpid")
    assert pid.value != os.getpid(), "the function ran in another process"
    assert pid.peak_rss_kib > 0 and pid.seconds >= 0
    flops = run_in_child("benchmarks.cost_model:flops_backward", kwargs={"channels": 3})
    assert flops.value == 38
    assert run_in_child("torch:get_num_threads", threads=1).value == 1


def test_a_failing_child_is_one_clear_error() -> None:
    with pytest.raises(ChildFailed) as raised:
        run_in_child("json:loads", args=["{not json"])
    first_line = str(raised.value).splitlines()[0]
    assert first_line.startswith("json:loads failed in a child process: JSONDecodeError: ")
    assert "Traceback" in str(raised.value), "the child's traceback comes along, below the first line"
    with pytest.raises(ChildFailed, match=r"os:_exit failed in a child process \(exit status 3\)"):
        run_in_child("os:_exit", args=[3])  # dies without writing a result


def test_peak_memory_is_a_high_water_mark() -> None:
    assert harness.peak_rss_kib() >= 0.99 * harness.current_rss_kib() > 0


def test_the_paper_splat_counts_come_from_the_profile() -> None:
    profile = yaml.safe_load((ROOT / "profiles/paper.yaml").read_text())
    expected = (profile["fit"]["num_splats"], *sorted(profile["prune"]["levels"], reverse=True))
    assert harness.paper_splat_counts() == expected
    assert harness.paper_params().data.image_size == profile["data"]["image_size"]


def test_tables_format_every_cell() -> None:
    assert harness.fmt(None, ".2f") == harness.fmt(float("nan"), ".2f") == "n/a"
    assert harness.fmt(1.234, ".1f") == "1.2"
    assert harness.ratio(1.0, 0.0) is None and harness.ratio(None, 2.0) is None and harness.ratio(3.0, 2.0) == 1.5
    table = harness.format_table(["name", "value"], [["a", 1.0], ["longer", None]], ["", ".2f"]).splitlines()
    assert table == ["  name    value", "  a        1.00", "  longer    n/a"]
