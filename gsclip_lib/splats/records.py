"""Images to stored splat records: a batch fitted under one optimizer, each kept fit encoded.

The one path from pixels to bytes, shared by the fit stage (:mod:`gsclip_lib.stages.fit`) and the
``gsclip encode`` command (:mod:`gsclip_lib.api`), so that both write the same bytes for the same
image and settings; and the metadata a splat shard stores beside each record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from gsclip_lib.atomic_files import finite_or_none
from gsclip_lib.params import FitSettings
from gsclip_lib.splats.codec import CodecError, encode_splats, payload_bytes
from gsclip_lib.splats.container import Splats
from gsclip_lib.splats.fitting import FitResult, fit_splats


@dataclass(frozen=True)
class FittedRecords:
    """A batch's records, ``None`` where an image's fit was dropped (non-finite) or its splats do not
    fit in fp16 (``unstorable`` names those, with the codec's reason), and the fit itself."""

    records: list[bytes | None]
    kept_splats: list[int]  # valid splats per image (0 where no record)
    unstorable: dict[int, str]
    splats: Splats  # the fit's splats, on the CPU
    fit: FitResult


def fit_records(images: Tensor, num_splats: int, settings: FitSettings, *, progress: bool = False,
                description: str = "fit") -> FittedRecords:  # images [B, C, H, W] in [0, 1]
    """Fit ``num_splats`` splats to every image of a same-sized batch and encode each kept fit."""
    batch, _, height, width = images.shape
    result = fit_splats(images, num_splats, settings, progress=progress, description=description)
    splats = result.splats.to("cpu")
    records: list[bytes | None] = [None] * batch
    unstorable: dict[int, str] = {}
    for index in sorted(set(range(batch)) - set(result.dropped)):
        try:
            records[index] = encode_splats(splats, index, height, width)
        except CodecError as error:
            unstorable[index] = str(error)
    kept = [int(splats.valid[index].sum()) if record is not None else 0 for index, record in enumerate(records)]
    return FittedRecords(records, kept, unstorable, splats, result)


def shard_metadata(record: bytes, num_splats: int, channels: int, height: int, width: int, psnr: float, *,
                   key: str, label: int | None, image_size: int, resize_mode: str,
                   **source: str) -> dict[str, Any]:
    """The ``.json`` a splat shard stores beside a record: its shape, quality, bytes and source
    (``source`` names where the image came from: ``source_shard`` or ``source_file``)."""
    return {"N": num_splats, "C": channels, "H": height, "W": width, "psnr": finite_or_none(psnr),
            "bytes": len(record), "payload_bytes": payload_bytes(num_splats, channels), "source_key": key,
            **source, "label": label, "image_size": image_size, "resize_mode": resize_mode}
