"""Image-text shards: writing, reading DataComp's layout, bad data counted not raised, rank split."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from gsclip_lib.data.image_decoding import resize_and_center_crop
from gsclip_lib.data.image_text_shards import EncodedImage, ImageTextShards, collate_image_text, write_image_text_shards
from gsclip_lib.data.skip_counts import SkipCounts
from gsclip_lib.data.tar_shards import expand_shard_spec
from gsclip_lib.errors import InputError


def encoded(image: Image.Image | np.ndarray, image_format: str, **options) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def write_tar(path, members: list[tuple[str, bytes]]) -> bytes:
    """A tar of ``members`` in the given order, written to ``path``; returns its bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def member_offsets(data: bytes) -> dict[str, tuple[int, int, int]]:
    """name -> (header offset, data offset, size) of each member of a tar held in ``data``."""
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return {m.name: (m.offset, m.offset_data, m.size) for m in archive.getmembers()}


def random_image(seed: int, shape=(8, 8, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def good_members(key: str, seed: int, caption: str | None = None) -> list[tuple[str, bytes]]:
    caption = caption if caption is not None else f"caption of {key}"
    return [
        (f"{key}.jpg", encoded(random_image(seed, (12, 12, 3)), "JPEG")),
        (f"{key}.txt", caption.encode()),
        (f"{key}.json", json.dumps({"uid": key}).encode()),
    ]


def test_round_trip_is_lossless_and_keeps_captions_and_labels(tmp_path):
    samples = [
        (f"sample{i:03d}", random_image(i), f"caption {i}: naïve café 猫 {'x' * i}", {"label": i % 4, "extra": i})
        for i in range(10)
    ]
    paths = write_image_text_shards(iter(samples), str(tmp_path / "train-%06d.tar"), 4)
    assert [os.path.basename(p) for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert sorted(os.listdir(tmp_path)) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    with tarfile.open(paths[0]) as archive:
        assert archive.getnames()[:3] == ["sample000.json", "sample000.png", "sample000.txt"]

    dataset = ImageTextShards(str(tmp_path / "train-{000000..000002}.tar"))
    read = list(dataset)
    assert [sample.key for sample in read] == [key for key, *_ in samples]
    for sample, (key, image, caption, metadata) in zip(read, samples):
        pixels = (sample.image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(pixels, image)
        assert sample.caption == caption
        assert sample.label == metadata["label"]
        assert sample.metadata == metadata
    assert dataset.skip_counts == SkipCounts(good=10)
    # The same shards named as a folder or a list read the same samples.
    assert [s.key for s in ImageTextShards(tmp_path)] == [s.key for s in read]
    assert expand_shard_spec([paths[2], paths[0]]) == [paths[2], paths[0]]


def test_grayscale_round_trip_and_jpeg_option(tmp_path):
    gray = [(f"g{i}", random_image(i, (9, 7)), f"gray {i}", {}) for i in range(3)]
    paths = write_image_text_shards(gray, str(tmp_path / "gray-%02d.tar"), 10)
    read = list(ImageTextShards(paths, channels=1))
    for sample, (_, image, _, _) in zip(read, gray):
        assert sample.image.shape == (1, 9, 7)
        np.testing.assert_array_equal((sample.image[0] * 255).round().to(torch.uint8).numpy(), image)
        assert sample.label is None

    smooth = np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (16, 1))[..., None].repeat(3, axis=2)
    paths = write_image_text_shards([("j", smooth, "jpeg", {"label": 1})], str(tmp_path / "jpg-%02d.tar"), 10, image_format="jpg")
    with tarfile.open(paths[0]) as archive:
        assert "j.jpg" in archive.getnames()
    (sample,) = list(ImageTextShards(paths))
    error = (sample.image.permute(1, 2, 0) * 255 - torch.from_numpy(smooth).float()).abs().mean()
    assert error < 3.0, f"JPEG at quality 95 should be close to the source, mean error {error:.2f}"


def test_encoded_images_are_stored_byte_for_byte(tmp_path):
    jpeg = encoded(random_image(3, (12, 10, 3)), "JPEG", quality=80)
    paths = write_image_text_shards(
        [("file", EncodedImage(jpeg, "jpeg"), "a photo of a cat.", {"label": 2})], str(tmp_path / "f-%02d.tar"), 10
    )
    with tarfile.open(paths[0]) as archive:
        assert archive.extractfile("file.jpeg").read() == jpeg
    (sample,) = list(ImageTextShards(paths))
    assert sample.image.shape == (3, 12, 10) and sample.label == 2
    with pytest.raises(ValueError, match="extension"):
        EncodedImage(jpeg, "JPEG")
    with pytest.raises(ValueError, match="needs bytes"):
        EncodedImage(b"", "png")


def test_interrupted_write_publishes_only_complete_shards(tmp_path):
    def samples():
        for i in range(6):
            yield f"s{i}", random_image(i), f"caption {i}", {}
        raise RuntimeError("the source broke")

    with pytest.raises(RuntimeError, match="the source broke"):
        write_image_text_shards(samples(), str(tmp_path / "part-%03d.tar"), 4)
    # Shard 0 (4 samples) was complete; shard 1 (2 of 4) was not and must not appear, nor any scratch.
    assert os.listdir(tmp_path) == ["part-000.tar"]
    assert [s.key for s in ImageTextShards(tmp_path / "part-000.tar")] == ["s0", "s1", "s2", "s3"]
    assert write_image_text_shards([], str(tmp_path / "empty-%03d.tar"), 4) == []
    with pytest.raises(ValueError, match="would not read back"):
        write_image_text_shards([("a.b", random_image(0), "c", {})], str(tmp_path / "dot-%03d.tar"), 4)


def test_datacomp_like_shard_reads_as_it_is(tmp_path):
    photo = np.zeros((24, 40, 3), dtype=np.uint8)
    photo[:, :20] = (200, 30, 30)
    photo[:, 20:] = (30, 30, 200)
    keys = ["000000000", "000000001"]
    metadata = {
        "uid": "4c9e2b7f0d6a4f1e9b3c8a7d6e5f4a3b",
        "url": "https://example.com/photo.jpg",
        "key": keys[0],
        "status": "success",
        "error_message": None,
        "width": 40,
        "height": 24,
        "original_width": 400,
        "original_height": 240,
        "exif": "{}",
        "sha256": "ab" * 32,
    }
    write_tar(
        tmp_path / "00000000.tar",
        [
            (f"{keys[0]}.jpg", encoded(photo, "JPEG", quality=95)),
            (f"{keys[0]}.txt", b"a red and blue flag"),
            (f"{keys[0]}.json", json.dumps(metadata).encode()),
            (f"{keys[1]}.webp", encoded(photo, "WEBP", lossless=True)),
            (f"{keys[1]}.txt", b"the same flag as webp"),
            (f"{keys[1]}.json", json.dumps({**metadata, "key": keys[1]}).encode()),
        ],
    )
    read = list(ImageTextShards(str(tmp_path / "{00000000..00000000}.tar"), image_size=16, resize_mode="center_crop"))
    assert [s.key for s in read] == keys
    assert [s.caption for s in read] == ["a red and blue flag", "the same flag as webp"]
    assert all(s.label is None and s.image.shape == (3, 16, 16) for s in read)
    assert read[0].metadata["uid"] == metadata["uid"] and read[0].metadata["original_width"] == 400
    expected = np.asarray(resize_and_center_crop(Image.fromarray(photo), 16), dtype=np.float32) / 255
    np.testing.assert_allclose(read[1].image.permute(1, 2, 0).numpy(), expected, atol=1e-6)  # lossless webp
    assert read[0].image[0, 8, 1] > 0.7 and read[0].image[2, 8, 14] > 0.7  # red left, blue right

    squashed = list(ImageTextShards(tmp_path / "00000000.tar", image_size=16, resize_mode="resize"))
    assert squashed[0].image.shape == (3, 16, 16)
    assert not torch.allclose(squashed[1].image, read[1].image), "resize squashes, centre crop crops"


@pytest.fixture
def corrupt_shards(tmp_path):
    """Shards with every kind of bad sample; returns (shard paths, expected counts, good keys)."""
    photo = random_image(7, (12, 12, 3))
    jpeg, png = encoded(photo, "JPEG"), encoded(photo, "PNG")
    bad = (
        good_members("a-good0", 0)
        + [("a-truncjpg.jpg", jpeg[: len(jpeg) // 2]), ("a-truncjpg.txt", b"cut jpeg")]
        + [("a-truncpng.png", png[: len(png) // 2]), ("a-truncpng.txt", b"cut png")]
        + [("a-junk.jpg", b"these bytes are no image at all" * 4), ("a-junk.txt", b"junk")]
        + [("a-empty.png", b""), ("a-empty.txt", b"zero bytes")]
        + good_members("a-good1", 1)
        + [("a-nocap.jpg", jpeg), ("a-nocap.json", b"{}")]
        + [("a-blankcap.jpg", jpeg), ("a-blankcap.txt", b"  \n")]
        + [("a-latin1.jpg", jpeg), ("a-latin1.txt", "café".encode("latin-1"))]
        + [("a-noimage.txt", b"a caption alone"), ("a-noimage.json", b"{}")]
        + [("a-badjson.jpg", jpeg), ("a-badjson.txt", b"ok"), ("a-badjson.json", b"{not json")]
        + good_members("a-good2", 2)
    )
    shard_a = tmp_path / "a.tar"
    write_tar(shard_a, bad)

    # Truncated inside the data of b-cut's image: b-cut is lost, the three before it are kept.
    members_b = good_members("b-good0", 3) + good_members("b-good1", 4) + good_members("b-good2", 5) + good_members("b-cut", 6)
    data = write_tar(tmp_path / "full-b.tar", members_b)
    header, start, size = member_offsets(data)["b-cut.jpg"]
    (tmp_path / "b.tar").write_bytes(data[: start + size // 2])

    # Truncated inside a header after its name: Python's tarfile would take this for a clean end of
    # archive; the name says c-lost began, so c-good1 had ended and c-lost is the cut sample.
    members_c = good_members("c-good0", 8) + good_members("c-good1", 9) + good_members("c-lost", 10)
    data = write_tar(tmp_path / "full-c.tar", members_c)
    header, start, size = member_offsets(data)["c-lost.jpg"]
    (tmp_path / "c.tar").write_bytes(data[: header + 100])

    (tmp_path / "d.tar").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())

    # Truncated inside the caption of f-cut, whose image was complete: f-cut is dropped as cut.
    members_f = good_members("f-good0", 11) + good_members("f-cut", 12, caption="long caption " * 80)
    data = write_tar(tmp_path / "full-f.tar", members_f)
    header, start, size = member_offsets(data)["f-cut.txt"]
    (tmp_path / "f.tar").write_bytes(data[: start + size // 2])

    # A URL that cannot be opened (a local path that does not exist is refused when the spec is read).
    shards = [str(tmp_path / name) for name in ("a.tar", "b.tar", "c.tar", "d.tar")]
    shards += [f"file://{tmp_path}/missing.tar", str(tmp_path / "f.tar")]
    expected = SkipCounts(
        good=9,
        truncated_image=2,
        undecodable_image=1,
        empty_image=1,
        missing_caption=2,
        bad_text=1,
        no_image=1,
        bad_metadata=1,
        cut_samples=3,
        corrupt_shards=4,
        unreadable_shards=1,
    )
    good_keys = ["a-good0", "a-good1", "a-good2", "b-good0", "b-good1", "b-good2", "c-good0", "c-good1", "f-good0"]
    return shards, expected, good_keys


def test_bad_samples_and_broken_shards_are_counted_and_good_ones_kept(corrupt_shards):
    shards, expected, good_keys = corrupt_shards
    dataset = ImageTextShards(shards, image_size=8)
    read = list(dataset)
    assert [s.key for s in read] == good_keys
    assert dataset.skip_counts == expected
    assert dataset.skip_counts.skipped == 12
    # Each sample carries the counts since the previous one, so the per-sample counts add up exactly.
    assert SkipCounts.total(s.skips for s in read) == expected
    assert collate_image_text(read).skips == expected


def test_skip_counts_add_up_across_dataloader_workers(corrupt_shards):
    shards, expected, good_keys = corrupt_shards
    loader = DataLoader(ImageTextShards(shards, image_size=8), batch_size=2, num_workers=2, collate_fn=collate_image_text)
    batches = list(loader)
    assert sorted(key for batch in batches for key in batch.keys) == sorted(good_keys)
    assert SkipCounts.total(batch.skips for batch in batches) == expected
    assert batches[0].images.shape[1:] == (3, 8, 8) and batches[0].labels.dtype == torch.int64


def test_odd_image_modes_are_converted_not_dropped(tmp_path):
    size = (4, 4)
    gray = Image.new("L", size, 100)
    palette = Image.new("P", size, 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0, 0, 0] * 254)
    transparent_palette = Image.new("P", size, 0)
    transparent_palette.putpalette([0, 0, 0, 10, 200, 30] + [0, 0, 0] * 254)
    rgba = Image.new("RGBA", size, (0, 0, 255, 255))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red: white on a white page
    wide = np.full((4, 4), 65535, dtype=np.uint16)
    wide[0, 0] = 0
    sixteen = Image.fromarray(wide)
    cmyk = Image.new("CMYK", size, (0, 255, 255, 0))  # no black, full magenta and yellow: red
    members = []
    for key, image, image_format, options in [
        ("gray", gray, "PNG", {}),
        ("palette", palette, "PNG", {}),
        ("palettealpha", transparent_palette, "PNG", {"transparency": 0}),
        ("rgba", rgba, "PNG", {}),
        ("sixteen", sixteen, "PNG", {}),
        ("cmyk", cmyk, "JPEG", {"quality": 100}),
    ]:
        members += [(f"{key}.{'jpg' if image_format == 'JPEG' else 'png'}", encoded(image, image_format, **options)), (f"{key}.txt", key.encode())]
    write_tar(tmp_path / "modes.tar", members)
    assert Image.open(io.BytesIO(members[8][1])).mode.startswith("I;16"), "the test must store a 16-bit PNG"

    dataset = ImageTextShards(tmp_path / "modes.tar")
    read = {sample.key: sample.image for sample in dataset}
    assert dataset.skip_counts == SkipCounts(good=6)
    assert all(image.shape == (3, 4, 4) for image in read.values())
    torch.testing.assert_close(read["gray"], torch.full((3, 4, 4), 100 / 255))
    torch.testing.assert_close(read["palette"][:, 2, 2], torch.tensor([10, 200, 30]) / 255)
    torch.testing.assert_close(read["palettealpha"][:, 2, 2], torch.ones(3))
    torch.testing.assert_close(read["rgba"][:, 0, 0], torch.ones(3))
    torch.testing.assert_close(read["rgba"][:, 1, 1], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(read["sixteen"][:, 0, 0], torch.zeros(3))
    torch.testing.assert_close(read["sixteen"][:, 1, 1], torch.ones(3))
    # JPEG's CMYK round trip is not exact; red stays red within a few levels.
    assert read["cmyk"][0].min() > 0.95 and read["cmyk"][1:].max() < 0.05
    gray_channel = list(ImageTextShards(tmp_path / "modes.tar", channels=1))
    assert all(sample.image.shape == (1, 4, 4) for sample in gray_channel)


def test_ranks_read_disjoint_samples_that_cover_everything(tmp_path):
    samples = [(f"k{i:02d}", random_image(i, (4, 4, 3)), f"c{i}", {"label": i}) for i in range(14)]
    paths = write_image_text_shards(samples, str(tmp_path / "s-%03d.tar"), 3)
    assert len(paths) == 5
    seen = [[s.key for s in ImageTextShards(paths, rank=rank, world_size=2)] for rank in (0, 1)]
    assert set(seen[0]).isdisjoint(seen[1])
    assert set(seen[0]) | set(seen[1]) == {key for key, *_ in samples}
    # Rank r reads shards r, r + 2, ... in the spec's order.
    assert seen[0] == ["k00", "k01", "k02", "k06", "k07", "k08", "k12", "k13"]


def test_a_reader_takes_only_the_selection_keywords(tmp_path):
    paths = write_image_text_shards([("k", random_image(0, (4, 4, 3)), "c", {})], str(tmp_path / "s-%03d.tar"), 3)
    with pytest.raises(TypeError, match="shuffle_buffer"):
        ImageTextShards(paths, shuffle_buffer=8)


@pytest.mark.parametrize(
    "member, cut",
    [
        ("s-cut.json", 40),  # inside the .json header's name: nothing says whose member it was
        ("s-cut.json", 300),  # inside the .json header, after its name: a member of s-cut was cut
        ("s-cut.txt", 200),  # the caption's header: not a "missing caption", a cut sample
        ("s-next.jpg", 200),  # the header of the next sample's first member: s-cut had ended
    ],
)
def test_a_sample_cut_by_a_broken_stream_is_counted_never_passed_on(tmp_path, member, cut):
    members = good_members("s-good", 0) + good_members("s-cut", 1) + good_members("s-next", 2)
    members[5] = ("s-cut.json", json.dumps({"uid": "s-cut", "label": 4}).encode())
    data = write_tar(tmp_path / "full.tar", members)
    header, _, _ = member_offsets(data)[member]
    (tmp_path / "cut.tar").write_bytes(data[: header + cut])
    dataset = ImageTextShards(str(tmp_path / "cut.tar"), image_size=8)
    read = list(dataset)
    survived = ["s-good", "s-cut"] if member == "s-next.jpg" else ["s-good"]
    assert [sample.key for sample in read] == survived
    assert all(sample.label is None or sample.key == "s-cut" and sample.label == 4 for sample in read)
    counts = dataset.skip_counts
    assert (counts.cut_samples, counts.corrupt_shards, counts.missing_caption, counts.good) == (1, 1, 0, len(survived))


def test_a_spec_that_names_no_existing_file_is_an_error_before_anything_is_read(tmp_path):
    for spec in ("/nonexistent/shards/", str(tmp_path / "train-{000000..000002}.tar"), str(tmp_path / "*.tar"), ""):
        with pytest.raises(InputError, match="shard"):
            expand_shard_spec(spec)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no .tar"):
        expand_shard_spec(str(tmp_path / "empty"))
