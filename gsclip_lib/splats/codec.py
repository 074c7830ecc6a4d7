"""Store one image's splats as a small fp16 binary record (METHOD.md section 1, compression ratio).

The paper counts a splat image as ``N * (5 + C) * 2`` bytes: every valid splat's 5 + C numbers in
fp16. This module writes exactly those bytes, behind a short header that makes a record
self-describing and checkable, so that "bytes stored" is something measured on a real file rather
than a formula. :func:`payload_bytes` is the paper's accounting; :func:`record_bytes` adds the
header.

Record layout (all integers and floats little-endian):

=======  =====================  ==========================  =======================================
offset   size (bytes)           field                       meaning
=======  =====================  ==========================  =======================================
0        4                      magic                       ``b"GSPL"``
4        1                      version (u8)                :data:`FORMAT_VERSION`, currently 2
5        1                      channels C (u8)             colour channels, 1..255
6        2                      height H (u16)              source image height in pixels, 1..65535
8        2                      width W (u16)               source image width in pixels, 1..65535
10       4                      splat count N (u32)         number of (valid) splats stored
14       4                      CRC32 (u32)                 ``zlib.crc32`` of bytes 0-13 and the payload
18       N * (5 + C) * 2        payload                     N rows of 5 + C fp16 values:
                                                            ``x, y, l11, l21, l22, c_0 .. c_{C-1}``
=======  =====================  ==========================  =======================================

The checksum covers the header's other fields as well as the payload (version 2; version 1 checked
the payload alone, so a flipped bit in the size or count went unseen), and it is checked before any
field is trusted beyond the record's length. The header is :data:`HEADER_BYTES` = 18 bytes. Units follow :mod:`gsclip_lib.splats.container`: positions and
Cholesky factors in pixels, colours in image units. Only valid splats are written, in slot order;
invalid (pruned or padded) slots cost nothing. A decoded record is all-valid float32 splats.

fp16 precision to keep in mind: the spacing of fp16 values is ``2**-10`` relative, so a position
near x = 200 px is stored to within 1/16 px; magnitudes above 65504 do not fit and are refused on
encode, and values below about 6e-8 flush to zero (a Cholesky diagonal that small is a degenerate
splat anyway).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from gsclip_lib.splats.container import Splats

MAGIC = b"GSPL"
FORMAT_VERSION = 2
_HEADER = struct.Struct("<4sBBHHII")  # magic, version, C, H, W, N, CRC32
HEADER_BYTES = _HEADER.size  # 18
_CRC_OFFSET = 14  # the CRC field's first byte: the fields before it are checksummed
SPLAT_GEOMETRY_VALUES = 5  # x, y, l11, l21, l22
FP16_MAX = 65504.0
_MAX_U16 = 0xFFFF
_MAX_U8 = 0xFF
_MAX_U32 = 0xFFFFFFFF
# Padding slots added by decode_batch: identity Cholesky so a renderer that forgets the valid mask
# divides by 1 rather than 0 (0 * NaN would poison the whole image), zero colour.
_PAD_CHOLESKY = (1.0, 0.0, 1.0)


class CodecError(ValueError):
    """A splat record cannot be written or read; the message says what is wrong."""


@dataclass(frozen=True)
class DecodedSplats:
    """One decoded record: its splats and the size of the image they describe."""

    splats: Splats  # batch of 1, float32, every slot valid
    height: int
    width: int

    @property
    def num_splats(self) -> int:
        return self.splats.num_slots

    @property
    def channels(self) -> int:
        return self.splats.channels


def payload_bytes(num_splats: int, channels: int) -> int:
    """Bytes of N splats in fp16, ``N * (5 + C) * 2``: what the paper counts."""
    return num_splats * (SPLAT_GEOMETRY_VALUES + channels) * 2


def record_bytes(num_splats: int, channels: int) -> int:
    """Bytes of a whole record: header plus payload."""
    return HEADER_BYTES + payload_bytes(num_splats, channels)


def source_bytes(height: int, width: int, channels: int) -> int:
    """Bytes of the uint8 source image, ``H * W * C``."""
    return height * width * channels


def compression_ratio(source_bytes: int, stored_bytes: int) -> float:
    """``source_bytes / stored_bytes``; e.g. 224x224x3 over 3136 fp16 RGB splats gives 3.0."""
    if stored_bytes <= 0:
        raise ValueError(f"stored bytes must be positive, got {stored_bytes}")
    return source_bytes / stored_bytes


def encode_splats(splats: Splats, image_index: int, height: int, width: int) -> bytes:
    """The record of image ``image_index`` of the batch: header + its valid splats in fp16."""
    if not 0 <= image_index < splats.batch_size:
        raise CodecError(
            f"image index {image_index} out of range for a batch of {splats.batch_size}"
        )
    _check_header_fields(height, width, splats.channels)
    valid = splats.valid[image_index]  # [N]
    rows = torch.cat(
        [
            splats.positions[image_index][valid],
            splats.cholesky[image_index][valid],
            splats.colours[image_index][valid],
        ],
        dim=-1,
    ).detach()  # [N_valid, 5 + C]
    num_splats = rows.shape[0]
    if num_splats > _MAX_U32:
        raise CodecError(f"too many splats for one record: {num_splats} > {_MAX_U32}")
    _check_fits_fp16(rows, image_index)
    payload = rows.to(device="cpu", dtype=torch.float16).numpy().astype("<f2", copy=False).tobytes()
    fields = _HEADER.pack(MAGIC, FORMAT_VERSION, splats.channels, height, width, num_splats, 0)[:_CRC_OFFSET]
    crc = _record_crc(fields, payload)
    return _HEADER.pack(MAGIC, FORMAT_VERSION, splats.channels, height, width, num_splats, crc) + payload


def _record_crc(fields: bytes, payload: bytes) -> int:
    """The record's checksum: the header's fields before the CRC, then the payload."""
    return zlib.crc32(payload, zlib.crc32(fields))


def header_fields(record: bytes) -> dict[str, int]:
    """A record's header as stored: ``version``, ``channels``, ``height``, ``width``, ``num_splats``,
    ``crc32``. Only the length and the magic are checked here (CodecError); :func:`decode_splats`
    checks the rest."""
    record = bytes(record)
    if len(record) < HEADER_BYTES:
        if not MAGIC.startswith(record[: len(MAGIC)]):
            raise CodecError(_foreign_message(record))
        raise CodecError(
            f"truncated: expected at least {HEADER_BYTES} bytes (the header), got {len(record)}"
        )
    magic, version, channels, height, width, num_splats, crc = _HEADER.unpack_from(record)
    if magic != MAGIC:
        raise CodecError(_foreign_message(record))
    return {"version": version, "channels": channels, "height": height, "width": width, "num_splats": num_splats,
            "crc32": crc}


def decode_splats(record: bytes, device: torch.device | str | None = None) -> DecodedSplats:
    """Read one record back as float32 splats (batch of 1, all valid) on ``device`` (or the CPU)."""
    if not isinstance(record, (bytes, bytearray, memoryview)):
        raise CodecError(f"a splat record is bytes, got {type(record).__name__}")
    record = bytes(record)
    header = header_fields(record)
    version, channels, height, width = header["version"], header["channels"], header["height"], header["width"]
    num_splats, crc = header["num_splats"], header["crc32"]
    if version != FORMAT_VERSION:
        raise CodecError(
            f"unsupported splat record version {version}; this reader handles version "
            f"{FORMAT_VERSION}"
        )
    if channels == 0 or height == 0 or width == 0:
        raise CodecError(
            f"corrupt header: channels {channels}, height {height}, width {width} (all must be > 0)"
        )
    expected = record_bytes(num_splats, channels)
    if len(record) < expected:
        raise CodecError(
            f"truncated: expected {expected} bytes for {num_splats} splats x {channels} channels, "
            f"got {len(record)} (or the header's count is corrupt)"
        )
    if len(record) > expected:
        raise CodecError(
            f"{len(record) - expected} trailing bytes after a record of {expected} bytes "
            "(records must be stored one per blob; or the header's count is corrupt)"
        )
    actual_crc = _record_crc(record[:_CRC_OFFSET], record[HEADER_BYTES:])
    if actual_crc != crc:
        raise CodecError(
            f"corrupt record: CRC32 {actual_crc:#010x} of its {len(record)} bytes does not match the header's "
            f"{crc:#010x}"
        )
    payload = record[HEADER_BYTES:]
    values = np.frombuffer(payload, dtype="<f2").reshape(
        num_splats, SPLAT_GEOMETRY_VALUES + channels
    )
    rows = torch.from_numpy(values.astype(np.float32)).to(device or "cpu")[None]  # [1, N, 5 + C]
    splats = Splats.from_tensors(rows[..., 0:2], rows[..., 2:5], rows[..., 5:])
    return DecodedSplats(splats=splats, height=height, width=width)


def encode_batch(splats: Splats, height: int, width: int) -> list[bytes]:
    """One record per image of the batch (all images share ``height`` x ``width``)."""
    return [encode_splats(splats, index, height, width) for index in range(splats.batch_size)]


def decode_batch(
    records: Sequence[bytes],
    num_slots: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[Splats, int, int]:
    """Decode records of same-sized images into one batch padded with invalid slots.

    Returns ``(splats, height, width)`` with ``splats`` of shape ``[B, num_slots, ...]``;
    ``num_slots`` defaults to the largest splat count. Padding slots are invalid, at position 0 with
    an identity Cholesky factor and zero colour. Raises :class:`CodecError` if the records disagree
    on height, width or channels, or if one holds more than ``num_slots`` splats.
    """
    if len(records) == 0:
        raise CodecError("no records to decode (empty batch)")
    decoded = [decode_splats(record, device=device) for record in records]
    first = decoded[0]
    for index, item in enumerate(decoded[1:], start=1):
        if (item.height, item.width, item.channels) != (first.height, first.width, first.channels):
            raise CodecError(
                f"records disagree: record 0 is {first.height}x{first.width} with C = "
                f"{first.channels}, record {index} is {item.height}x{item.width} with C = "
                f"{item.channels}"
            )
    most = max(item.num_splats for item in decoded)
    if num_slots is None:
        num_slots = most
    if most > num_slots:
        raise CodecError(f"a record holds {most} splats, more than num_slots = {num_slots}")

    batch, channels = len(decoded), first.channels
    target = first.splats.device
    positions = torch.zeros(batch, num_slots, 2, device=target)
    cholesky = torch.tensor(_PAD_CHOLESKY, device=target).repeat(batch, num_slots, 1)
    colours = torch.zeros(batch, num_slots, channels, device=target)
    valid = torch.zeros(batch, num_slots, dtype=torch.bool, device=target)
    for index, item in enumerate(decoded):
        count = item.num_splats
        positions[index, :count] = item.splats.positions[0]
        cholesky[index, :count] = item.splats.cholesky[0]
        colours[index, :count] = item.splats.colours[0]
        valid[index, :count] = True
    return Splats(positions, cholesky, colours, valid), first.height, first.width


def _check_header_fields(height: int, width: int, channels: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise CodecError(f"image {name} must be an int, got {value!r}")
        if not 0 < value <= _MAX_U16:
            raise CodecError(f"image {name} {value} does not fit the record (1..{_MAX_U16})")
    if not 0 < channels <= _MAX_U8:
        raise CodecError(f"channel count {channels} does not fit the record (1..{_MAX_U8})")


def _check_fits_fp16(rows: Tensor, image_index: int) -> None:
    """Refuse values fp16 cannot hold, rather than silently storing inf."""
    finite = torch.isfinite(rows)
    if not bool(finite.all()):
        row = int((~finite).any(-1).nonzero()[0])
        raise CodecError(
            f"image {image_index}: non-finite splat value (NaN or inf) in valid splat number {row}"
        )
    magnitude = rows.abs()
    if bool((magnitude > FP16_MAX).any()):
        raise CodecError(
            f"image {image_index}: splat value {float(magnitude.max()):.6g} overflows fp16 "
            f"(|value| must be <= {FP16_MAX:g})"
        )


def _foreign_message(record: bytes) -> str:
    return (
        f"not a gsclip splat record: starts with {record[: len(MAGIC)]!r}, expected magic {MAGIC!r}"
    )
