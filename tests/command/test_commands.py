"""What each ``gsclip`` subcommand reports and writes, and the Python API behind it, on small images."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gsclip_lib import api
from gsclip_lib.data.splat_shards import splat_dataset
from gsclip_lib.splats.codec import record_bytes
from gsclip_lib.splats.quality import psnr_uint8

STEPS = 8  # short fits: these tests check the plumbing, the agreement tests the pipeline's settings


@pytest.fixture(scope="module")
def images(tmp_path_factory, tiny_project) -> list[Path]:
    """Five of the tiny eval split's 28x28 images."""
    return sorted(tiny_project.eval_pngs.glob("*.png"))[:5]


def test_encode_reports_bytes_ratio_psnr_and_seconds_and_info_reads_them_back(images, gsclip, tiny_project, tmp_path):
    params = tiny_project.params_path
    status, out, err = gsclip("encode", images[0], "--splats", 22, "--steps", STEPS, "-o", tmp_path / "a.gsplat",
                              "--params", params, "--json")
    assert status == 0, err
    (row,) = json.loads(out)["images"]
    assert row["bytes"] == record_bytes(22, 1) == 282 and row["payload_bytes"] == 264
    assert row["ratio"] == pytest.approx(784 / 282, abs=1e-4) and row["payload_ratio"] == pytest.approx(2.9697, abs=1e-4)
    assert 5 < row["psnr_stored_db"] <= row["psnr_db"] + 0.5 and row["seconds"] > 0
    status, out, _ = gsclip("info", tmp_path / "a.gsplat", "--json")
    info = json.loads(out)
    assert status == 0 and (info["splats"], info["channels"], info["height"], info["width"]) == (22, 1, 28, 28)
    assert (info["format_version"], info["bytes"], info["checksum_ok"]) == (2, 282, True)
    assert info["crc32"] == f"{int.from_bytes((tmp_path / 'a.gsplat').read_bytes()[14:18], 'little'):#010x}"
    status, text, _ = gsclip("info", tmp_path / "a.gsplat")
    assert "22 splats, 1 channel(s), image 28x28" in text and "checksum ok" in text


def test_render_draws_the_stored_image_at_any_size_and_its_ellipses(images, gsclip, tmp_path, tiny_project):
    status, out, err = gsclip("encode", images[1], "-n", 22, "--steps", STEPS, "-o", tmp_path / "b.gsplat",
                              "--params", tiny_project.params_path, "--json")
    assert status == 0, err
    (row,) = json.loads(out)["images"]
    with Image.open(images[1]) as source:
        original = np.asarray(source.convert("L"))
    for size, expected in ((None, (28, 28)), (84, (84, 84))):
        out = tmp_path / f"b{size}.png"
        status, _, err = gsclip("render", tmp_path / "b.gsplat", "-o", out, *(["--size", size] if size else []))
        assert status == 0, err
        with Image.open(out) as picture:
            assert picture.size == expected
            pixels = np.asarray(picture)
        if size is None:  # the stored picture is the image encode measured, to 8-bit rounding
            assert psnr_uint8(original, pixels) == pytest.approx(row["psnr_stored_db"], abs=0.2)
        else:  # scaling the splats, not the pixels: block means of the large render give the small one
            blocks = pixels.astype(np.float64).reshape(28, 3, 28, 3).mean(axis=(1, 3))
            small = np.asarray(Image.open(tmp_path / "bNone.png"), dtype=np.float64)
            assert np.abs(blocks - small).mean() < 6
    status, out, _ = gsclip("render", tmp_path / "b.gsplat", "-o", tmp_path / "e.png", "--ellipses", "--size", 100,
                            "--json")
    assert status == 0 and json.loads(out)["ellipses"] is True
    with Image.open(tmp_path / "e.png") as picture:
        assert picture.size == (100, 100) and np.asarray(picture).std() > 0


def test_compare_puts_jpeg_and_a_thumbnail_at_the_splats_bytes(images, gsclip, tmp_path, tiny_project):
    status, out, err = gsclip("compare", images[2], "-n", 22, "--steps", STEPS, "-o", tmp_path / "c.png",
                              "--params", tiny_project.params_path, "--json")
    assert status == 0, err
    result = json.loads(out)
    rows = {row["method"]: row for row in result["rows"]}
    assert result["budget_bytes"] == rows["splats"]["bytes"] == 282 and set(rows) == {"splats", "jpeg", "thumbnail"}
    assert rows["thumbnail"]["bytes"] <= 282 and all(row["psnr_db"] > 0 for row in rows.values())
    assert rows["jpeg"]["fits_budget"] == (rows["jpeg"]["bytes"] <= 282)
    assert Image.open(tmp_path / "c.png").size[0] > 400


def test_a_folder_becomes_shards_and_a_second_run_resumes(tmp_path, images, gsclip, tiny_project):
    folder = tmp_path / "in"
    folder.mkdir()
    for path in images:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    args = ["encode", folder, "-n", 22, "--steps", STEPS, "-o", tmp_path / "out", "--per-shard", 2,
            "--params", tiny_project.params_path, "--json"]
    status, out, err = gsclip(*args)
    first = json.loads(out)
    assert status == 0 and (first["shards"], first["shards_kept"], first["skipped_files"]) == (3, 0, 1)
    shards = sorted((tmp_path / "out").glob("splats-*.tar"))
    written = {path.name: path.read_bytes() for path in shards}
    shards[1].unlink()  # as if the run had stopped before this shard
    status, out, _ = gsclip(*args)
    again = json.loads(out)
    assert (again["shards_kept"], again["total"]["images"]) == (2, 2)
    assert {path.name: path.read_bytes() for path in sorted((tmp_path / "out").glob("splats-*.tar"))} == written
    samples = list(splat_dataset(str(tmp_path / "out"), rank=0, world_size=1))
    assert [sample.key for sample in samples] == sorted(path.stem for path in images)
    assert samples[0].metadata["source_file"] == images[0].name and samples[0].image.extension == "png"
    status, _, err = gsclip(*[arg if arg != STEPS else STEPS + 1 for arg in args])
    assert status == 2 and "holds shards of other images or settings" in err


def test_the_api_encodes_decodes_renders_and_classifies(tiny_project):
    params = tiny_project.params
    image = api.read_image(sorted(tiny_project.eval_pngs.glob("*.png"))[0], api.image_settings(params))  # [1, 28, 28]
    encoded = api.encode(image, 22, params=params, steps=STEPS)
    decoded = api.decode(encoded.record)
    assert decoded.splats.positions.shape == (1, 22, 2) and (decoded.height, decoded.width) == (28, 28)
    assert api.render(encoded.record).shape == (1, 28, 28) and api.render(decoded, 56).shape == (1, 56, 56)
    classifier = api.load_classifier(tiny_project.level_dir, "fashion_mnist", params=tiny_project.params_path)
    (prediction,) = api.classify([encoded.record], classifier, top=3)
    assert len(prediction.labels) == 3 and list(prediction.probabilities) == sorted(prediction.probabilities, reverse=True)
    assert prediction.names[0] == classifier.class_names[prediction.labels[0]]
    many = api.classify([encoded.record] * 3, classifier, top=10)
    assert sum(many[0].probabilities) == pytest.approx(1.0, abs=1e-5) and many[0] == many[2]


def test_classify_text_names_top_classes_with_probabilities(tiny_project, gsclip, tmp_path):
    record = api.encode(sorted(tiny_project.eval_pngs.glob("*.png"))[3], 22,
                        params=tiny_project.params_path, steps=STEPS).record
    (tmp_path / "d.gsplat").write_bytes(record)
    status, text, err = gsclip("classify", tmp_path / "d.gsplat", "--model", tiny_project.level_dir, "--top", 2,
                               "--params", tiny_project.params_path)
    assert status == 0, err
    assert "d.gsplat (282 bytes, 2.78x): " in text and text.count(" %") == 2 and "ms per image" in text
