"""The .gsplat format of FORMAT.md, on the committed golden files: every version this reader supports
decodes to exactly the stored values and encodes back to exactly the stored bytes; version 1 (no
longer read) and damaged files are refused with their messages."""

import json
import struct
import zlib
from pathlib import Path

import pytest
import torch

from gsclip_lib import api
from gsclip_lib.errors import InputError
from gsclip_lib.splats.codec import FORMAT_VERSION, CodecError, decode_splats, encode_splats, header_fields
from gsclip_lib.splats.container import Splats

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
EXPECTED = json.loads((GOLDEN / "expected.json").read_text())["files"]
READABLE = sorted(name for name, item in EXPECTED.items() if "refused" not in item)
REFUSED = sorted(name for name, item in EXPECTED.items() if "refused" in item)


def test_every_golden_file_is_listed_and_the_current_version_has_one():
    assert sorted(path.stem for path in GOLDEN.glob("*.gsplat")) == sorted(EXPECTED)
    assert {EXPECTED[name]["version"] for name in READABLE} == {FORMAT_VERSION}
    assert {EXPECTED[name]["version"] for name in REFUSED} == {1}


@pytest.mark.parametrize("name", READABLE)
def test_a_supported_golden_file_decodes_to_its_values_and_encodes_back_to_its_bytes(name):
    record = (GOLDEN / f"{name}.gsplat").read_bytes()
    expected = EXPECTED[name]
    rows = torch.tensor(expected["rows"])  # [N, 5 + C]
    decoded = decode_splats(record)
    assert (decoded.height, decoded.width, decoded.channels) == (expected["height"], expected["width"],
                                                                 expected["channels"])
    stored = torch.cat([decoded.splats.positions, decoded.splats.cholesky, decoded.splats.colours], -1)[0]
    assert torch.equal(stored, rows)
    splats = Splats.from_tensors(rows[None, :, 0:2], rows[None, :, 2:5], rows[None, :, 5:])
    assert encode_splats(splats, 0, expected["height"], expected["width"]) == record
    header = header_fields(record)
    assert f"{header['crc32']:#010x}" == expected["crc32"] and len(record) == expected["bytes"]


@pytest.mark.parametrize("name", READABLE)
def test_the_documented_layout_reads_a_golden_file_without_the_codec(name):
    """FORMAT.md alone suffices: little-endian header, CRC over bytes 0-13 then the payload, fp16 rows."""
    record = (GOLDEN / f"{name}.gsplat").read_bytes()
    magic, version, channels, height, width, count, crc = struct.unpack("<4sBBHHII", record[:18])
    assert (magic, version) == (b"GSPL", 2) and len(record) == 18 + count * (5 + channels) * 2
    assert zlib.crc32(record[18:], zlib.crc32(record[:14])) == crc
    values = struct.unpack(f"<{count * (5 + channels)}e", record[18:])
    assert [list(values[i:i + 5 + channels]) for i in range(0, len(values), 5 + channels)] == EXPECTED[name]["rows"]


@pytest.mark.parametrize("name", REFUSED)
def test_version_1_is_refused_with_a_clear_message(name):
    record = (GOLDEN / f"{name}.gsplat").read_bytes()
    with pytest.raises(CodecError, match=EXPECTED[name]["refused"] + "; this reader handles version 2"):
        decode_splats(record)
    with pytest.raises(InputError, match=f"{name}.gsplat: unsupported splat record version 1"):
        api.read_record(GOLDEN / f"{name}.gsplat")


def test_a_flipped_bit_anywhere_but_the_magic_and_version_fails_the_checksum_or_the_length():
    record = (GOLDEN / f"{READABLE[0]}.gsplat").read_bytes()
    for byte in range(5, len(record)):
        damaged = bytearray(record)
        damaged[byte] ^= 0x04
        with pytest.raises(CodecError, match="CRC32|truncated|trailing|corrupt header"):
            decode_splats(bytes(damaged))
