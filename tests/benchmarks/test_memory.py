"""The memory benchmark on tiny data: every child (benchmarks.harness.run_in_child) reads the whole
data set once per training stage, and the JSON holds the peaks and ratios (no size is asserted: memory
depends on the machine). The end-to-end run skips the variant (each child spends seconds importing
open_clip); the variant's plan and its override's way to the child are checked on their own."""

import json
import os
from pathlib import Path

import pytest

from benchmarks import memory
from benchmarks.harness import ChildRun

SIZES = (64, 128)
PER_SHARD, BATCH = 32, 32
NO_CACHE = "align [align.cache_text_embeddings=false]"  # the default variant


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("memory")
    out = folder / "memory.json"
    result = memory.main([
        "--out", str(out), "--work", str(folder / "work"), "--sizes", ",".join(map(str, SIZES)),
        "--per-shard", str(PER_SHARD), "--batch-size", str(BATCH), "--no-variants",
    ])
    return result, json.loads(out.read_text()), folder / "work"


def test_the_json_is_the_report_and_names_the_run(report):
    result, saved, _ = report
    assert saved == json.loads(json.dumps(result))
    assert saved["sizes"] == list(SIZES) and saved["bound"] == memory.BOUND
    assert saved["command"].startswith("python -m benchmarks.memory --out ")
    assert saved["machine"]["cpu_count"] >= 1
    assert saved["data"]["shards"] == max(SIZES) // PER_SHARD
    assert saved["data"]["distinct_captions"] > max(SIZES) // 2  # DataComp-like: captions mostly distinct
    assert saved["data"]["mean_jpeg_bytes"] > 0 and saved["data"]["mean_splat_record_bytes"] > 0


def test_every_child_reads_every_sample_once_per_training_stage(report):
    runs = report[1]["runs"]
    assert set(runs) == {"pretrain", "align"} and report[1]["variants"] == []
    for stage, names in (("pretrain", ["pretrain"]), ("align", ["distill", "contrastive"])):
        assert set(runs[stage]) == {str(size) for size in SIZES}
        for size in SIZES:
            run = runs[stage][str(size)]
            assert run["stage"] == stage and run["size"] == size and run["overrides"] == []
            assert [record["stage"] for record in run["stages"]] == names
            assert run["samples_read"] == size * len(names)
            assert run["steps"] == size // BATCH * len(names)
            assert 0 < run["baseline_rss_kib"] <= run["peak_rss_kib"]
            assert run["seconds"] > 0 and len(run["load_average"]["after"]) == 3
            for record in run["stages"]:
                assert record["samples_read"] == size
                assert record["good_samples_counted_by_stage"] == size  # the stage's own count agrees
                assert record["batches_read"] == record["steps"] == record["steps_per_epoch"] == size // BATCH
                # ru_maxrss and VmRSS come from counters the kernel syncs lazily: equal within a little
                assert run["peak_rss_kib"] >= record["peak_rss_kib"] >= 0.99 * record["max_sampled_rss_kib"] > 0
                trace = record["rss_trace_kib"]
                assert trace[0][0] == BATCH and trace[-1][0] == size
                assert all(rss > 0 for _, rss in trace)
    # params.yaml caches caption embeddings (one miss per distinct caption).
    cache = runs["align"][str(max(SIZES))]["metrics"]["text_cache"]
    assert cache["misses"] + cache["hits"] >= max(SIZES) // 2 and cache["size"] >= 1


def test_summary_has_peaks_and_ratios_per_stage(report):
    summary = report[1]["summary"]
    assert set(summary) == {"pretrain", "align", "align.distill", "align.contrastive"}
    for entry in summary.values():
        assert set(entry["peak_rss_kib"]) == {str(size) for size in SIZES}
        assert all(value > 0 for value in entry["peak_rss_kib"].values())
        assert entry["peak_ratio"] > 0
        assert entry["within_bound"] == (entry["peak_ratio"] <= memory.BOUND)
        assert set(entry["growth_above_baseline_kib"]) == {str(size) for size in SIZES}


def test_the_default_variant_runs_align_without_the_caption_cache(monkeypatch):
    args, sizes, plan = memory.parse_arguments(["--sizes", "64,128", "--per-shard", "32", "--batch-size", "32"])
    assert plan[-1] == (NO_CACHE, "align", ["align.cache_text_embeddings=false"])
    calls = []
    monkeypatch.setattr(memory, "run_in_child",
                        lambda target, kwargs: calls.append((target, kwargs)) or ChildRun({"stage": "align"}, 7, 0.1))
    run = memory.measure(args, "align", 64, Path("w"), plan[-1][2])
    assert calls == [("benchmarks.memory:run_child", {
        "stage": "align", "size": 64, "work": "w", "per_shard": 32, "image_size": args.image_size,
        "splats": args.splats, "batch_size": 32, "overrides": ["align.cache_text_embeddings=false"]})]
    assert run == {"stage": "align", "peak_rss_kib": 7, "overrides": ["align.cache_text_embeddings=false"]}


def test_the_data_is_reused_when_present(report):
    work = report[2]
    settings = json.loads((work / "data" / "manifest.json").read_text())["settings"]
    shard = work / "data" / "splats" / "train-000000.tar"
    before = os.stat(shard).st_mtime_ns
    manifest = memory.write_data(work, {**settings, "samples": min(SIZES)})  # fewer samples: reused
    assert manifest["settings"]["samples"] == max(SIZES) and os.stat(shard).st_mtime_ns == before


def test_the_shard_spec_names_the_first_shards(tmp_path):
    spec = memory.shard_spec(tmp_path, "images", 3000, 1000)
    assert spec.endswith("images/train-{000000..000002}.tar")


def test_thin_keeps_ends_and_bounds_the_length():
    trace = [[i, i] for i in range(100)]
    thinned = memory.thin(trace, points=10)
    assert len(thinned) == 10 and thinned[0] == [0, 0] and thinned[-1] == [99, 99]
    assert memory.thin(trace[:5], points=10) == trace[:5]


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "100"], "at least two"),
    (["--sizes", "50,100", "--per-shard", "40"], "multiple of --per-shard"),
    (["--sizes", "32,64", "--per-shard", "32", "--batch-size", "64"], "at least one batch"),
    (["--stages", "nonsense"], "unknown stages"),
    (["--variant", "align-no-equals"], "a variant is STAGE:GROUP.KEY=VALUE"),
])
def test_bad_arguments_are_refused(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        memory.main(["--out", str(tmp_path / "x.json"), "--work", str(tmp_path / "w"), *argv])
    assert message in capsys.readouterr().err
