"""benchmarks/command.py in its quick mode: it measures the command and checks the agreement on 20 of
the default run's evaluation images (skipped without the default run's outputs)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NEEDS = ["data/models/align/N22/splat_encoder.pt", "data/models/rgb/model.pt", "data/shards/eval-000000.tar",
         "data/splats/fitted/N22/eval", "reports/evaluate/per_image.csv"]


def test_quick_benchmark_measures_the_command_and_finds_it_agrees(tmp_path):
    missing = [name for name in NEEDS if not (ROOT / name).exists()]
    if missing:
        pytest.skip(f"benchmarks.command needs the default run's outputs (make repro); missing: {', '.join(missing)}")
    out = tmp_path / "command.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.command", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["quick"] is True and result["command"].endswith("--quick --out " + str(out))
    assert result["agreement"]["bytes"]["images"] == 20 == result["agreement"]["bytes"]["bytes_identical"]
    assert result["agreement"]["top1"]["agree_with_evaluate"] == result["agreement"]["top1"]["images"] == 20
    one = result["one_file"]
    assert len(one["wall_seconds"]) == 1 and one["best_seconds"] > 0 and one["cold_cache_seconds"] > 0
    assert [run["classifier_cached"] for run in one["runs"]] == [False, True]  # built once, then read
    assert result["many_files"]["files"] == 20 and result["many_files"]["files_per_second"] > 0
    assert set(result["verdicts"]) == {"one_file_under_target", "one_file_from_cache", "files_per_second_at_target",
                                       "bytes_identical", "top1_agrees"}
    assert result["verdicts"]["one_file_from_cache"] is True
    assert "bytes identical: 20/20" in done.stdout and result["machine"]["cpu_count"] >= 1
