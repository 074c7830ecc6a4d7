"""Every bad input the issue lists gets one line on stderr and exit status 2, and leaves no file
behind: not an image, an unreadable image, an image too small for its splats, a folder that is not a
trained level, a class file of the wrong length, a damaged or unknown-version .gsplat, an output path
in a missing folder."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "v2-gray-28x28-3splats.gsplat"


def files_under(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


def assert_refused(result: tuple[int, str, str], *fragments: str) -> None:
    status, out, err = result
    assert status == 2, (out, err)
    assert out == "" and err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("gsclip: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture
def work(tmp_path) -> Path:
    """A folder with a good 28x28 image and a good record, watched for leftovers."""
    Image.fromarray((np.arange(28 * 28) % 251).astype(np.uint8).reshape(28, 28)).save(tmp_path / "good.png")
    (tmp_path / "good.gsplat").write_bytes(GOLDEN.read_bytes())
    return tmp_path


def test_a_file_that_is_not_an_image(work, gsclip):
    (work / "notes.png").write_text("not an image at all")
    before = files_under(work)
    assert_refused(gsclip("encode", work / "notes.png", "--splats", 22, "-o", work / "notes.gsplat"),
                   "notes.png is not an image")
    assert files_under(work) == before


def test_an_unreadable_image_and_a_missing_one(work, gsclip):
    data = (work / "good.png").read_bytes()
    (work / "cut.png").write_bytes(data[: len(data) // 2])  # a PNG cut short
    before = files_under(work)
    assert_refused(gsclip("encode", work / "good.png", work / "cut.png", "--splats", 22, "-o", work / "out"),
                   "cut.png is not an image that can be read")
    assert_refused(gsclip("encode", work / "absent.png", "--splats", 22, "-o", work / "a.gsplat"), "absent.png")
    assert files_under(work) == before  # the good image was not written either: all are read first


def test_an_image_too_small_for_its_splats(work, gsclip):
    Image.fromarray(np.full((4, 4), 128, np.uint8)).save(work / "tiny.png")
    before = files_under(work)
    assert_refused(gsclip("encode", work / "tiny.png", "--splats", 22, "-o", work / "t.gsplat"),
                   "4x4 = 16 pixels, too small for 22 splats")
    assert_refused(gsclip("encode", work / "good.png", "--splats", 1000, "-o", work / "g.gsplat"),
                   "more splats than pixels")
    assert files_under(work) == before


def test_a_folder_that_is_not_a_trained_level(work, gsclip, tiny_project):
    params = tiny_project.params_path
    (work / "level").mkdir()
    assert_refused(gsclip("classify", work / "good.gsplat", "--model", work / "level", "--params", params),
                   "is not a trained level", "splat_encoder.pt")
    (work / "level" / "splat_encoder.pt").write_bytes(b"no weights here")
    assert_refused(gsclip("classify", work / "good.gsplat", "--model", work / "level", "--params", params),
                   "is not a trained level")


def test_a_class_file_of_the_wrong_length(work, gsclip, tiny_project):
    (work / "names.txt").write_text("cat\ndog\nbird\n")
    assert_refused(gsclip("classify", work / "good.gsplat", "--model", tiny_project.level_dir,
                          "--classes", work / "names.txt", "--params", tiny_project.params_path),
                   "names 3 classes", "10")


def test_a_record_with_a_bad_checksum_or_an_unknown_version(work, gsclip):
    record = bytearray(GOLDEN.read_bytes())
    record[-1] ^= 0x01
    (work / "flipped.gsplat").write_bytes(bytes(record))
    record = bytearray(GOLDEN.read_bytes())
    record[4] = 9
    (work / "future.gsplat").write_bytes(bytes(record))
    before = files_under(work)
    for command in (["info"], ["render", "-o", work / "x.png"], ["classify", "--model", work]):
        assert_refused(gsclip(command[0], work / "flipped.gsplat", *command[1:]), "flipped.gsplat", "CRC32")
        assert_refused(gsclip(command[0], work / "future.gsplat", *command[1:]), "unsupported splat record version 9")
    assert files_under(work) == before


def test_an_output_path_in_a_missing_folder(work, gsclip):
    missing = work / "no" / "such"
    assert_refused(gsclip("encode", work / "good.png", "--splats", 22, "-o", missing / "g.gsplat"),
                   "the folder", "does not exist")
    assert_refused(gsclip("encode", work / "good.png", work / "good.png", "--splats", 22, "-o", missing),
                   "does not exist")
    assert_refused(gsclip("render", work / "good.gsplat", "-o", missing / "g.png"), "does not exist")
    assert_refused(gsclip("compare", work / "good.png", "--splats", 22, "-o", missing / "c.png"), "does not exist")
    assert not (work / "no").exists()


def test_a_bad_option_is_one_line_too(gsclip):
    assert_refused(gsclip("encode"), "required")
    assert_refused(gsclip("render", "a.gsplat", "-o", "a.png", "--size", "big"), "invalid int value")


def test_the_installed_script_exits_2_without_a_traceback(work):
    record = bytearray(GOLDEN.read_bytes())
    record[20] ^= 0x10
    (work / "flipped.gsplat").write_bytes(bytes(record))
    script = Path(sys.executable).parent / "gsclip"
    done = subprocess.run([str(script), "info", str(work / "flipped.gsplat")], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ}, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "corrupt record: CRC32" in done.stderr


def test_zero_and_negative_sizes_are_refused_not_taken_as_defaults(work, gsclip):
    before = files_under(work)
    assert_refused(gsclip("encode", work / "good.png", "--splats", 22, "--size", 0, "-o", work / "z.gsplat"),
                   "image size must be a positive number of pixels, got 0")
    assert_refused(gsclip("encode", work / "good.png", "--splats", 22, "--batch-size", 0, "-o", work / "z.gsplat"),
                   "--batch-size must be a positive integer, got 0")
    assert_refused(gsclip("render", work / "good.gsplat", "--size", 0, "-o", work / "z.png"),
                   "render size must be a positive number of pixels, got 0")
    assert_refused(gsclip("classify", work / "good.gsplat", "--model", work, "--batch-size", -1),
                   "--batch-size must be a positive integer, got -1")
    assert files_under(work) == before


def test_a_damaged_folder_record_a_binary_class_file_and_a_wrong_rgb_model(work, gsclip, tiny_project):
    params = tiny_project.params_path
    (work / "images").mkdir()
    (work / "images" / "good.png").write_bytes((work / "good.png").read_bytes())
    (work / "shards").mkdir()
    (work / "shards" / "config.json").write_text("{ cut short")
    assert_refused(gsclip("encode", work / "images", "--splats", 22, "-o", work / "shards", "--params", params),
                   "config.json cannot be read")
    assert sorted(path.name for path in (work / "shards").iterdir()) == ["config.json"]
    (work / "names.bin").write_bytes(bytes(range(128, 256)))
    assert_refused(gsclip("classify", work / "good.gsplat", "--model", tiny_project.level_dir,
                          "--classes", work / "names.bin", "--params", params), "cannot read the class names")
    (work / "model.pt").write_bytes(b"not a checkpoint")
    assert_refused(gsclip("classify", work / "good.gsplat", "--model", tiny_project.level_dir,
                          "--rgb", work / "model.pt", "--params", params), "model.pt is not a trained RGB model")
