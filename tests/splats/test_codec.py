"""Tests of the fp16 splat record (gsclip_lib/splats/codec.py)."""

import math
import struct

import pytest
import torch
from skimage import data, transform

from gsclip_lib.splats.codec import (
    FP16_MAX,
    HEADER_BYTES,
    CodecError,
    compression_ratio,
    decode_batch,
    decode_splats,
    encode_batch,
    encode_splats,
    payload_bytes,
    record_bytes,
    source_bytes,
)
from gsclip_lib.splats.container import Splats
from kernels.rasterize_torch import rasterize_dense_torch


def fitted_astronaut_splats(size: int = 64, cell: int = 4) -> tuple[Splats, torch.Tensor]:
    """Splats fitted to a real photo at the paper's density (a splat per 4x4 cell, as 3136 on 224).

    A jittered grid of anisotropic splats with colours solved by least squares: the render is linear
    in the colours, so rendering unit colours gives the design matrix. This yields realistic
    magnitudes, including the negative colours a fit produces.
    """
    image = torch.from_numpy(
        transform.resize(data.astronaut(), (size, size), anti_aliasing=True)
    ).float()  # [H, W, 3]
    grid = size // cell
    centres = (torch.arange(grid) + 0.5) * cell
    grid_y, grid_x = torch.meshgrid(centres, centres, indexing="ij")
    slots = grid * grid
    positions = torch.stack([grid_x, grid_y], -1).reshape(1, slots, 2)
    positions = positions + (torch.rand(1, slots, 2) - 0.5) * cell / 2
    scale = cell / 2 * (0.8 + 0.4 * torch.rand(1, slots, 2))
    shear = 0.3 * cell * (torch.rand(1, slots) - 0.5)
    cholesky = torch.stack([scale[..., 0], shear, scale[..., 1]], -1)
    valid = torch.ones(1, slots, dtype=torch.bool)
    basis = rasterize_dense_torch(
        positions, cholesky, torch.eye(slots)[None], valid, size, size
    )  # [1, N, H, W]
    design = basis[0].reshape(slots, -1).T.double()  # [H*W, N]
    colours = torch.linalg.lstsq(design, image.reshape(-1, 3).double()).solution.float()
    return Splats.from_tensors(positions, cholesky, colours[None]), image.permute(2, 0, 1)[None]


# --- byte accounting ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_splats", "ratio"), [(3136, 3.00), (1600, 5.88), (900, 10.45), (400, 23.52)]
)
def test_paper_compression_ratios_on_payload_bytes(num_splats: int, ratio: float) -> None:
    source = source_bytes(224, 224, 3)
    assert source == 150528
    assert payload_bytes(num_splats, 3) == num_splats * 8 * 2
    assert round(compression_ratio(source, payload_bytes(num_splats, 3)), 2) == ratio
    # The header costs a little: the whole record compresses slightly less, by under 0.1 %.
    record_ratio = compression_ratio(source, record_bytes(num_splats, 3))
    assert record_ratio < compression_ratio(source, payload_bytes(num_splats, 3))
    assert record_ratio > ratio * 0.99


def test_header_is_18_bytes_and_record_length_is_exact(random_splats) -> None:
    assert HEADER_BYTES == 18
    splats = random_splats(1, 37, 3)
    assert len(encode_splats(splats, 0, 19, 23)) == record_bytes(37, 3) == 18 + 37 * 8 * 2


def test_compression_ratio_rejects_zero_bytes() -> None:
    with pytest.raises(ValueError, match="positive"):
        compression_ratio(100, 0)


# --- round trip -----------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_round_trip_equals_fp16_rounding(channels: int, random_splats) -> None:
    splats = random_splats(3, 37, channels)
    for index, record in enumerate(encode_batch(splats, 19, 23)):
        decoded = decode_splats(record)
        assert (decoded.height, decoded.width, decoded.channels) == (19, 23, channels)
        assert decoded.splats.positions.dtype == torch.float32
        assert bool(decoded.splats.valid.all())
        for name in ("positions", "cholesky", "colours"):
            expected = getattr(splats, name)[index : index + 1].half().float()
            torch.testing.assert_close(getattr(decoded.splats, name), expected, rtol=0, atol=0)


def test_decode_places_splats_on_requested_device(random_splats) -> None:
    decoded = decode_splats(encode_splats(random_splats(1, 5, 3), 0, 8, 8), device="cpu")
    assert decoded.splats.device == torch.device("cpu")


def test_render_survives_save_and_load_within_fp16_error() -> None:
    splats, image = fitted_astronaut_splats()
    size = image.shape[-1]
    restored, height, width = decode_batch(encode_batch(splats, size, size))
    assert (height, width) == (size, size)
    before = rasterize_dense_torch(*_fields(splats), size, size)
    after = rasterize_dense_torch(*_fields(restored), size, size)
    # Measured on this 64x64 case: max |before - after| = 0.0065, render-vs-render PSNR 58 dB, and
    # the fit's PSNR against the photo moves by < 0.001 dB. Positions dominate the error: fp16
    # spacing is 2**-5 px for x in [32, 64), i.e. up to 1/64 px rounding, times a Gaussian slope of
    # at most ~0.6 / sigma per unit colour, summed over a few overlapping splats. 0.02 leaves 3x
    # margin.
    # (At 224x224 with 3136 splats positions round to 1/16 px; the same check measured 0.033 max,
    # 47 dB render-vs-render and a 0.006 dB change of the fit's PSNR.)
    torch.testing.assert_close(after, before, rtol=0, atol=0.02)
    assert _psnr(before, after) > 50.0
    assert abs(_psnr(before, image) - _psnr(after, image)) < 0.01


def test_invalid_slots_are_dropped_and_not_counted(random_splats) -> None:
    splats = random_splats(2, 37, 3)
    valid = torch.rand(2, 37) < 0.6
    valid[1] = False
    valid[1, [3, 30]] = True
    splats = splats.with_valid(valid)
    records = encode_batch(splats, 19, 23)
    for index, record in enumerate(records):
        count = int(valid[index].sum())
        assert len(record) == record_bytes(count, 3)
        decoded = decode_splats(record).splats
        assert decoded.num_slots == count
        torch.testing.assert_close(
            decoded.positions[0], splats.positions[index][valid[index]].half().float()
        )

    batch, _, _ = decode_batch(records, num_slots=40)
    assert batch.num_slots == 40
    assert batch.counts().tolist() == valid.sum(1).tolist()
    torch.testing.assert_close(
        batch.colours[batch.valid],
        splats.colours[valid].half().float(),
    )
    # Padding slots must not poison a render that multiplies by the mask (0 * NaN = NaN).
    render = rasterize_dense_torch(*_fields(batch), 19, 23)
    assert bool(torch.isfinite(render).all())


def test_empty_image_round_trips_to_zero_splats(random_splats) -> None:
    splats = random_splats(1, 4, 3).with_valid(torch.zeros(1, 4, dtype=torch.bool))
    record = encode_splats(splats, 0, 8, 8)
    assert len(record) == HEADER_BYTES
    assert decode_splats(record).num_splats == 0


def test_decode_batch_rejects_mismatched_records(random_splats) -> None:
    rgb = encode_splats(random_splats(1, 5, 3), 0, 19, 23)
    with pytest.raises(CodecError, match="records disagree"):
        decode_batch([rgb, encode_splats(random_splats(1, 5, 3), 0, 19, 24)])
    with pytest.raises(CodecError, match="records disagree"):
        decode_batch([rgb, encode_splats(random_splats(1, 5, 1), 0, 19, 23)])
    with pytest.raises(CodecError, match="more than num_slots = 4"):
        decode_batch([rgb], num_slots=4)
    with pytest.raises(CodecError, match="empty batch"):
        decode_batch([])


# --- damaged and foreign records ------------------------------------------------------------------


@pytest.fixture
def record(random_splats) -> bytes:
    return encode_splats(random_splats(1, 37, 3), 0, 19, 23)


def test_truncated_record_says_expected_and_got(record: bytes) -> None:
    short = record[:-5]
    expected = f"truncated: expected {len(record)} bytes.*got {len(short)}"
    with pytest.raises(CodecError, match=expected):
        decode_splats(short)
    with pytest.raises(CodecError, match="truncated: expected at least 18 bytes.*got 10"):
        decode_splats(record[:10])


def test_foreign_bytes_are_named_as_foreign() -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(64)
    with pytest.raises(CodecError, match="not a gsclip splat record"):
        decode_splats(png)
    with pytest.raises(CodecError, match="not a gsclip splat record"):
        decode_splats(b"\xff\xd8")  # shorter than a header, still recognisably not ours


def test_flipped_payload_byte_is_corrupt(record: bytes) -> None:
    damaged = bytearray(record)
    damaged[HEADER_BYTES + 11] ^= 0x01
    with pytest.raises(CodecError, match="corrupt"):
        decode_splats(bytes(damaged))


def test_trailing_garbage_is_rejected(record: bytes) -> None:
    with pytest.raises(CodecError, match="3 trailing bytes"):
        decode_splats(record + b"abc")


def test_unknown_version_is_rejected(record: bytes) -> None:
    damaged = bytearray(record)
    damaged[4] = 9
    with pytest.raises(CodecError, match="unsupported splat record version 9"):
        decode_splats(bytes(damaged))


def test_every_flipped_bit_of_the_size_and_count_is_caught(record: bytes) -> None:
    # Version 1 checked the payload alone: a flipped bit in H or W decoded as another image size.
    for byte in range(6, 14):  # height, width, splat count
        for bit in range(8):
            damaged = bytearray(record)
            damaged[byte] ^= 1 << bit
            with pytest.raises(CodecError, match="corrupt"):
                decode_splats(bytes(damaged))


def test_what_is_not_bytes_is_a_codec_error() -> None:
    for value in ("GSPL...", None, 12, [1, 2]):
        with pytest.raises(CodecError, match="a splat record is bytes"):
            decode_splats(value)


def test_header_fields_are_little_endian_at_documented_offsets(record: bytes) -> None:
    magic, version, channels, height, width, count = struct.unpack_from("<4sBBHHI", record)
    assert (magic, version, channels, height, width, count) == (b"GSPL", 2, 3, 19, 23, 37)


# --- values a record cannot hold ------------------------------------------------------------------


def test_fp16_overflow_is_refused_on_encode(random_splats) -> None:
    splats = random_splats(1, 5, 3)
    splats.colours[0, 2, 1] = 70000.0
    with pytest.raises(CodecError, match="overflows fp16"):
        encode_splats(splats, 0, 8, 8)
    splats.colours[0, 2, 1] = FP16_MAX  # the largest finite fp16 is fine
    assert decode_splats(encode_splats(splats, 0, 8, 8)).splats.colours[0, 2, 1] == FP16_MAX


def test_overflow_in_an_invalid_slot_is_ignored(random_splats) -> None:
    splats = random_splats(1, 5, 3)
    splats.positions[0, 4] = 1e9
    valid = torch.tensor([[True, True, True, True, False]])
    assert decode_splats(encode_splats(splats.with_valid(valid), 0, 8, 8)).num_splats == 4


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_values_are_refused_on_encode(bad: float, random_splats) -> None:
    splats = random_splats(1, 5, 3)
    splats.cholesky[0, 3, 0] = bad
    with pytest.raises(CodecError, match="non-finite"):
        encode_splats(splats, 0, 8, 8)


def test_header_limits_are_enforced_on_encode(random_splats) -> None:
    with pytest.raises(CodecError, match="height 65536 does not fit"):
        encode_splats(random_splats(1, 5, 3), 0, 65536, 8)
    with pytest.raises(CodecError, match="width 0 does not fit"):
        encode_splats(random_splats(1, 5, 3), 0, 8, 0)
    with pytest.raises(CodecError, match="channel count 256 does not fit"):
        encode_splats(random_splats(1, 2, 256), 0, 8, 8)
    with pytest.raises(CodecError, match="image index 1 out of range"):
        encode_splats(random_splats(1, 5, 3), 1, 8, 8)


def _fields(splats: Splats) -> tuple[torch.Tensor, ...]:
    return splats.positions, splats.cholesky, splats.colours, splats.valid


def _psnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    return -10 * math.log10(float(((reference - test) ** 2).mean()))
