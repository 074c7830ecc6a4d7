"""Skip counts: how many samples a reader kept, and how many it skipped, by reason.

Reading shards never stops on bad data: a sample decoder raises :class:`SkipSample` with a reason,
the reader drops the sample and counts it in a :class:`SkipCounts`, and the counts reach the stage's
metrics. The sample-level reasons are raised by the decoders of each format
(:mod:`gsclip_lib.data.image_text_shards`, :mod:`gsclip_lib.data.splat_shards`); ``cut_samples``,
``corrupt_shards`` and ``unreadable_shards`` are counted while a tar stream is read
(:func:`gsclip_lib.data.tar_shards.iter_tar_samples`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable


@dataclass
class SkipCounts:
    """Samples read (``good``) and skipped, by reason; shard-level failures in the last two fields."""

    good: int = 0
    empty_image: int = 0  # the image member is 0 bytes
    undecodable_image: int = 0  # PIL cannot identify the bytes as an image
    truncated_image: int = 0  # a format recognizes it, but it does not decode (truncated, corrupt)
    no_image: int = 0  # no image (or splat record) member at all
    bad_splats: int = 0  # a splat record that the codec refuses (splat shards only)
    missing_caption: int = 0  # no .txt member, or only whitespace in it
    bad_text: int = 0  # the caption is not UTF-8
    bad_metadata: int = 0  # .json is not a JSON object (or .cls not an integer)
    cut_samples: int = 0  # a member of the sample was cut off by a broken tar stream
    corrupt_shards: int = 0  # shards whose tar stream broke; the rest of such a shard is skipped
    unreadable_shards: int = 0  # shards that could not be opened at all

    SHARD_FIELDS = ("corrupt_shards", "unreadable_shards")

    @property
    def skipped(self) -> int:
        """Samples skipped, all reasons (shard-level counts are not samples and are left out)."""
        counts = self.as_dict()
        return sum(value for name, value in counts.items() if name != "good" and name not in self.SHARD_FIELDS)

    def count(self, reason: str) -> None:
        setattr(self, reason, getattr(self, reason) + 1)

    def copy(self) -> "SkipCounts":
        return dataclasses.replace(self)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    # Plain attribute arithmetic: these run once per sample read, where dataclasses.asdict's deep copy shows.
    def __add__(self, other: "SkipCounts") -> "SkipCounts":
        return SkipCounts(*(getattr(self, name) + getattr(other, name) for name in _COUNT_FIELDS))

    def __sub__(self, other: "SkipCounts") -> "SkipCounts":
        return SkipCounts(*(getattr(self, name) - getattr(other, name) for name in _COUNT_FIELDS))

    @classmethod
    def total(cls, counts: Iterable["SkipCounts"]) -> "SkipCounts":
        result = cls()
        for item in counts:
            result = result + item
        return result


_COUNT_FIELDS = tuple(f.name for f in dataclasses.fields(SkipCounts))
REASONS = tuple(name for name in _COUNT_FIELDS if name != "good")


class SkipSample(Exception):
    """Raised by a sample decoder: the sample is skipped and counted under ``reason``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; choose one of {REASONS}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
