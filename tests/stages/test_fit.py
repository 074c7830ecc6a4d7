"""The fit stage: one splat shard per image shard, resuming a killed fit, refitting what changed."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import gsclip_lib.stages.fit as fit_stage
from gsclip_lib.data.image_text_shards import ImageTextShards, write_image_text_shards
from gsclip_lib.data.tar_shards import list_shards
from gsclip_lib.data.splat_shards import splat_dataset, verify_splat_shard
from gsclip_lib.errors import InputError
from gsclip_lib.stages import fit, prepare

SIZE, SPLATS = 8, 16
REPO = Path(__file__).resolve().parents[2]


def image_shards(folder: Path, count: int, per_shard: int) -> list[str]:
    """``count`` smooth RGB images of ``SIZE`` x ``SIZE`` with captions and labels, as shards."""
    grid = np.linspace(0, 1, SIZE)
    samples = []
    for i in range(count):
        phase = i / count
        image = np.stack(
            [np.outer(grid, grid) * (1 - phase), np.outer(grid, 1 - grid) * phase + 0.2,
             np.full((SIZE, SIZE), 0.1 * (i % 5))],
            axis=-1,
        )
        samples.append((f"img{i:03d}", (image * 255).round().astype(np.uint8), f"caption {i}", {"label": i % 3}))
    return write_image_text_shards(samples, str(folder / "train-%06d.tar"), per_shard)


@pytest.fixture
def small(defaults):
    """8x8 RGB images, and fits of 2 steps through the dense twin (the machinery is under test)."""
    params = defaults.params("data.image_size=8", "data.channels=3")
    settings = defaults.fit_settings(iterations=2, backend="dense", log_every=1)
    return params.data, settings


def test_fit_writes_one_splat_shard_per_image_shard(tmp_path, small, shard_samples):
    data, settings = small
    sources = image_shards(tmp_path / "images", 10, 4)
    stats = fit_stage.fit_split(str(tmp_path / "images"), tmp_path / "gs", SPLATS, settings, 3, data, progress=False)
    assert (stats.shards_written, stats.images, stats.dropped_fits) == (3, 10, 0)
    assert [os.path.basename(p) for p in list_shards(tmp_path / "gs")] == [os.path.basename(s) for s in sources]
    _, meta = shard_samples(list_shards(tmp_path / "gs")[1])["img005"]
    assert meta["N"] == SPLATS and (meta["C"], meta["H"], meta["W"]) == (3, SIZE, SIZE)
    assert meta["label"] == 2 and meta["source_shard"] == "train-000001.tar" and np.isfinite(meta["psnr"])
    assert [verify_splat_shard(path) for path in list_shards(tmp_path / "gs")] == [4, 4, 2]


def test_splat_samples_carry_their_source_image_bytes(tmp_path, small):
    """Training pairs a splat sample with its image without an index: the fit copies the image
    member as stored (no re-encoding) into the splat sample."""
    import tarfile

    data, settings = small
    sources = image_shards(tmp_path / "images", 5, 5)
    fit_stage.fit_split(str(tmp_path / "images"), tmp_path / "gs", SPLATS, settings, 5, data, progress=False)
    members = {}
    for path in (sources[0], list_shards(tmp_path / "gs")[0]):
        with tarfile.open(path) as archive:
            members[path] = {info.name: archive.extractfile(info).read() for info in archive.getmembers()}
    source, splats = members.values()
    pngs = sorted(name for name in source if name.endswith(".png"))
    assert len(pngs) == 5 and all(splats[name] == source[name] for name in pngs)
    assert {name.rsplit(".", 1)[1] for name in splats} == {"gs", "png", "txt", "json"}


def test_dropped_fits_are_counted_and_left_out(tmp_path, small, monkeypatch, shard_samples):
    data, settings = small
    image_shards(tmp_path / "images", 5, 5)
    from gsclip_lib.splats import records

    real_fit = records.fit_splats

    def fit_dropping_the_first(images, num_splats, settings, **kwargs):
        result = real_fit(images, num_splats, settings, **kwargs)
        splats = result.splats.with_valid(result.splats.valid.clone())
        splats.valid[0] = False
        return replace(result, splats=splats, dropped=[0])

    monkeypatch.setattr(records, "fit_splats", fit_dropping_the_first)
    stats = fit_stage.fit_split(str(tmp_path / "images"), tmp_path / "gs", SPLATS, settings, 2, data, progress=False)
    assert (stats.images, stats.dropped_fits) == (2, 3)
    assert sorted(shard_samples(list_shards(tmp_path / "gs")[0])) == ["img001", "img003"]


def test_ranks_fit_disjoint_shards(tmp_path, small, monkeypatch):
    data, settings = small
    image_shards(tmp_path / "images", 6, 2)
    written = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        written.append(fit_stage.fit_split(str(tmp_path / "images"), tmp_path / "gs", SPLATS, settings, 8, data,
                                           progress=False))
    assert [s.shards_written for s in written] == [2, 1] and [s.images for s in written] == [4, 2]
    assert len(list_shards(tmp_path / "gs")) == 3


KILLABLE_FIT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import gsclip_lib.splats.records as records
    import gsclip_lib.stages.fit as module
    from gsclip_lib.params import load_params

    real_fit, calls = records.fit_splats, []

    def fit_that_hangs(*args, **kwargs):
        # Two batches per shard: call 3 is the first batch of the second shard, call 4 hangs there,
        # with the second shard half written under its temporary name.
        calls.append(1)
        if len(calls) == 4:
            open(sys.argv[3], "w").close()
            time.sleep(600)
        return real_fit(*args, **kwargs)

    records.fit_splats = fit_that_hangs
    params = load_params(sys.argv[4], overrides=["data.image_size={size}", "data.channels=3"])
    settings = params.fit.optimizer.replace(iterations=2, backend="dense")
    module.fit_split(sys.argv[1], Path(sys.argv[2]), {splats}, settings, 2, params.data, progress=False)
    """
)


def test_a_killed_fit_leaves_no_partial_shard_and_resumes(tmp_path, small):
    data, settings = small
    image_shards(tmp_path / "images", 12, 4)
    out, hanging = tmp_path / "gs", tmp_path / "hanging"
    script = tmp_path / "fit.py"
    script.write_text(KILLABLE_FIT.format(splats=SPLATS, size=SIZE))
    env = {**os.environ, "PYTHONPATH": str(REPO), "GSCLIP_COMPILE": "0"}
    command = [sys.executable, str(script), str(tmp_path / "images"), str(out), str(hanging), str(REPO / "params.yaml")]
    process = subprocess.Popen(command, env=env)
    try:
        deadline = time.monotonic() + 120
        while not hanging.exists():
            assert process.poll() is None, "the fitting process ended before it was killed"
            assert time.monotonic() < deadline, "the fitting process never reached its second shard"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL

    names = sorted(os.listdir(out))
    partial = [name for name in names if name.startswith(".train-000001.tar.") and name.endswith(".partial")]
    assert len(partial) == 1, names  # the half-written shard exists only under its temporary name
    assert [name for name in names if not name.startswith(".")] == ["train-000000.tar", "train-000000.tar.stats.json"]
    first = out / "train-000000.tar"
    assert verify_splat_shard(first) == 4
    first_bytes, first_mtime = first.read_bytes(), first.stat().st_mtime_ns

    resumed = fit_stage.fit_split(str(tmp_path / "images"), out, SPLATS, settings.replace(log_every=25), 2, data,
                                  progress=False)
    # The statistics describe the whole split, the resumed shard included, as an uninterrupted fit's do.
    straight = fit_stage.fit_split(str(tmp_path / "images"), tmp_path / "straight", SPLATS, settings, 2, data,
                                   progress=False)
    assert (resumed.shards_skipped, resumed.shards_written, resumed.images) == (1, 2, 12)
    assert (resumed.psnr_count, resumed.record_bytes) == (straight.psnr_count, straight.record_bytes)
    assert resumed.mean_psnr == pytest.approx(straight.mean_psnr, abs=1e-9)
    assert sorted(name for name in os.listdir(out) if name.endswith(".tar")) == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert first.read_bytes() == first_bytes and first.stat().st_mtime_ns == first_mtime
    assert [sample.key for sample in splat_dataset(out)] == [f"img{i:03d}" for i in range(12)]
    assert [verify_splat_shard(path) for path in list_shards(out)] == [4, 4, 4]


@pytest.fixture
def tiny(defaults, tmp_path):
    """A tiny slice of Fashion-MNIST, prepared, with short fits."""
    return defaults.params(
        f"data.shards_dir={tmp_path}/shards", "data.train_size=40", "data.eval_size=20", "data.images_per_shard=16",
        "data.seed=1", f"fit.out_dir={tmp_path}/splats", "fit.batch_size=16", "fit.optimizer.iterations=4",
        "fit.optimizer.log_every=2", "prune.levels=[11]",
    )


def test_fit_stage_resumes_and_refits_what_changed(fashion_mnist, tiny, monkeypatch):
    prepare.run(tiny, progress=False)
    result = fit.run(tiny, progress=False)
    metrics = result.metrics
    assert metrics["resumed"] == {"train": False, "eval": False}
    assert metrics["train"]["images"] == 40 and metrics["eval"]["images"] == 20
    assert metrics["train"]["payload_bytes"] == 22 * 6 * 2
    assert metrics["train"]["ratio_payload"] == pytest.approx(784 / 264, abs=1e-3)
    assert metrics["train"]["mean_psnr"] > 12.0
    assert metrics["train"]["mean_psnr_low"] < metrics["train"]["mean_psnr"] < metrics["train"]["mean_psnr_high"]

    # Nothing changed: every finished shard is kept, nothing is refitted, and the metrics still
    # describe the whole split.
    rerun = fit.fit_level(tiny, progress=False)
    assert rerun["resumed"] == {"train": True, "eval": True}
    assert rerun["train"]["shards_written"] == 0 and rerun["train"]["shards_skipped"] == 3
    for split in ("train", "eval"):
        for key in ("images", "mean_psnr", "record_bytes_mean", "dropped_fits", "skipped"):
            assert rerun[split][key] == metrics[split][key], (split, key)

    # Another version of the fitting code must not reuse shards either.
    monkeypatch.setattr(fit, "code_fingerprint", lambda module: "other code")
    assert fit.fit_level(tiny, progress=False)["resumed"] == {"train": False, "eval": False}
    monkeypatch.undo()

    # A changed fit setting must not reuse shards made under the old one.
    changed = tiny.replace(fit=tiny.fit.replace(optimizer=tiny.fit.optimizer.replace(iterations=5)))
    assert fit.fit_level(changed, progress=False)["resumed"] == {"train": False, "eval": False}
    saved = json.loads((changed.splat_dir(22, "train") / "config.json").read_text())
    assert saved["fit"]["optimizer"]["iterations"] == 5

    # Another subset under the same shard names and the same settings: nothing may be reused either.
    prepare.run(changed.replace(data=changed.data.replace(seed=5)), progress=False)
    again = fit.fit_level(changed, progress=False)
    assert again["resumed"] == {"train": False, "eval": False} and again["train"]["shards_written"] == 3
    keys = {sample.key for sample in splat_dataset(str(changed.splat_dir(22, "train")))}
    assert keys == {sample.key for sample in ImageTextShards(changed.data.train_spec(), channels=1)}


def test_a_missing_input_folder_is_an_error_before_anything_is_written(defaults, tmp_path):
    params = defaults.params("data.train_shards=/nonexistent/shards/", f"fit.out_dir={tmp_path}/splats")
    with pytest.raises(InputError, match="'/nonexistent/shards/' names 1 file"):
        fit.run(params, progress=False)
    assert not (tmp_path / "splats").exists()
