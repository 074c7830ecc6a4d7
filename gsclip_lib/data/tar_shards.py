"""Reading webdataset tar shards, whatever their samples hold: shard specs, raw samples, rank split.

A shard is a tar in which one sample is a group of consecutive members sharing a key
(``<key>.jpg``, ``<key>.txt``, ...). This module finds the shards a spec names
(:func:`expand_shard_spec`), turns a tar stream into raw samples (:func:`iter_tar_samples`) and
reads the samples of this rank's shards through a format's decoder (:class:`ShardDataset`). The
formats are :mod:`gsclip_lib.data.image_text_shards` and :mod:`gsclip_lib.data.splat_shards`; the
training stages stream the same raw samples in a shuffled, resumable order instead
(:mod:`gsclip_lib.data.streaming`).

Broken shards are counted, never raised (:class:`gsclip_lib.data.skip_counts.SkipCounts`). A shard
whose tar stream breaks (truncated file, garbage header, missing end-of-archive marker) counts once
in ``corrupt_shards``: the samples completed before the break are kept, the sample the break cut is
counted in ``cut_samples``, the rest of the shard is skipped. A local path that does not exist is an
error when the spec is read; a shard that exists, or a URL, that cannot be opened counts in
``unreadable_shards``.

Splitting: rank ``r`` of ``world_size`` takes shards ``r, r + world_size, ...`` of the spec, in its
order, and each DataLoader worker takes every ``num_workers``-th of those
(``webdataset.split_by_worker``; not with ``split_by_worker=False``). Ranks therefore see disjoint
samples whose union is the whole set, as ``torchrun`` needs; a rank or worker left without a shard
yields nothing, so use at least ``world_size * num_workers`` shards.

How the counts travel. With ``DataLoader(num_workers=0)`` (the default CPU path) the dataset's
``skip_counts`` attribute is exact: it is reset when an iteration starts and updated live.
DataLoader workers are separate processes whose attributes the main process never sees, so each
sample also carries ``skips``: the counts its worker accumulated since the sample before it
(``good = 1`` for itself, plus the bad samples and shards met in between). A worker holds one
sample back, so the last sample it yields also carries its trailing skips. A format's collate
function sums the ``skips`` of a batch, and summing the batches of a whole pass gives exactly the
totals, for any number of workers, as long as the pass runs to its end and every worker yields at
least one good sample (a worker whose shards hold no good sample at all has nothing to carry its
counts).
"""

from __future__ import annotations

import glob
import logging
import os
import tarfile
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import webdataset as wds
from torch.utils.data import IterableDataset
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from gsclip_lib.data.skip_counts import SkipCounts, SkipSample
from gsclip_lib.distributed import resolve_rank
from gsclip_lib.errors import InputError

logger = logging.getLogger(__name__)

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")

# A shard spec: a glob, a brace pattern, a folder, one path or URL, or a list of any of these.
ShardSpec = str | os.PathLike | Sequence[str | os.PathLike]


# ----------------------------------------------------------------------------------------------
# Shard lists and splitting


def expand_shard_spec(spec: ShardSpec) -> list[str]:
    """The shard paths or URLs a spec names, in order.

    ``spec`` is a brace pattern (``data/train-{000000..000009}.tar``; several joined by ``::``), a
    local glob (``data/train-*.tar``), one path, a folder (its ``*.tar``, ``*.tar.gz``, ``*.tgz`` files, sorted, hidden ones left out) or a
    list of any of these. Anything webdataset can open works (``pipe:...``, ``https://...``).
    """
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        if not text.strip():
            raise InputError("the shard spec is empty")
        if os.path.isdir(text):
            shards = list_shards(text)
            if not shards:
                raise InputError(f"the shard folder {text!r} holds no .tar, .tar.gz or .tgz file")
            return shards
        local = "://" not in text and not text.startswith("pipe:")
        if local and any(ch in text for ch in "*?["):
            matches = sorted(glob.glob(text))
            if not matches:
                raise InputError(f"no shard matches {text!r}")
            return matches
        urls = list(expand_urls(text))
        missing = [url for url in urls if local and not os.path.isfile(url)]
        if missing:
            raise InputError(
                f"the shard spec {text!r} names {len(missing)} file(s) that do not exist (first: {missing[0]}); "
                "give a folder, a glob, a brace pattern of existing files, or a URL"
            )
        return urls
    if isinstance(spec, Sequence):
        shards: list[str] = []
        for item in spec:
            shards.extend(expand_shard_spec(item))
        return shards
    raise InputError(f"cannot read a shard spec of type {type(spec).__name__}: {spec!r}")


def list_shards(folder: str | os.PathLike) -> list[str]:
    """The complete shards in ``folder``, sorted; hidden files (unfinished writes) are left out."""
    names = sorted(
        name for name in os.listdir(folder) if not name.startswith(".") and name.endswith(SHARD_SUFFIXES)
    )
    return [os.path.join(os.fspath(folder), name) for name in names]


def shards_for_rank(shards: Sequence[str], rank: int, world_size: int) -> list[str]:
    """Rank ``rank``'s share: every ``world_size``-th shard from position ``rank``."""
    return list(shards[rank::world_size])


# ----------------------------------------------------------------------------------------------
# Tar streams into raw samples


@dataclass
class RawSample:
    """One sample as stored: its key, its members' bytes by lower-case extension, its shard."""

    key: str
    members: dict[str, bytes]
    url: str


class _WatchedTarInfo(tarfile.TarInfo):
    """Records how a stream ended: tarfile reads a truncated or garbled header as a quiet end.

    For a header cut short by the end of the stream it also keeps the member's name when the name
    field (the header's first 100 bytes) arrived whole: that tells whether the cut member belonged
    to the sample being read or began a new one. The body is ``TarInfo.fromtarfile`` with the header
    block kept in hand.
    """

    @classmethod
    def fromtarfile(cls, tarfile_):
        block = tarfile_.fileobj.read(tarfile.BLOCKSIZE)
        try:
            info = cls.frombuf(block, tarfile_.encoding, tarfile_.errors)
        except tarfile.EOFHeaderError:  # a zero block: the proper end-of-archive marker
            tarfile_.gsclip_end = None
            raise
        except tarfile.HeaderError as error:  # empty, truncated or invalid header
            tarfile_.gsclip_end = error
            truncated = isinstance(error, tarfile.TruncatedHeaderError) and len(block) >= _NAME_FIELD
            tarfile_.gsclip_cut_name = block[:_NAME_FIELD].split(b"\0", 1)[0].decode("utf-8", "replace") if truncated else None
            raise
        info.offset = tarfile_.fileobj.tell() - tarfile.BLOCKSIZE
        return info._proc_member(tarfile_)


_NAME_FIELD = 100  # bytes of a tar header's name field


def iter_tar_samples(url: str, counts: SkipCounts) -> Iterator[RawSample]:
    """The samples of one shard; a broken stream ends the shard and is counted, never raised.

    Members are grouped into samples by key, as webdataset does (``base_plus_ext``: the key is the
    name up to the first dot of its file name). When the stream breaks, the sample it breaks is
    counted in ``cut_samples`` and dropped, never passed on with members missing: the sample whose
    member was being read, or, when a header was cut, the sample that header's name belongs to.
    Where nothing tells (a header cut inside its name, a garbled header), the sample being collected
    is taken as cut, since more of its members may have followed. Samples that ended before the
    break are yielded as usual. Checking for the end-of-archive marker catches truncation at a
    header, which Python's tarfile otherwise takes for the end of the archive.
    """
    try:
        stream = gopen(url, "rb")
    except Exception as error:  # noqa: BLE001 - any failure to open is a bad shard, not a crash
        counts.count("unreadable_shards")
        logger.warning("skipping shard %s: cannot open it (%s)", url, error)
        return
    pending: RawSample | None = None
    reading: str | None = None  # key of the member whose data is being read
    archive = None
    try:
        archive = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_WatchedTarInfo)
        for info in archive:
            if not info.isreg():
                continue
            name = info.name
            key, extension = base_plus_ext(name)
            if key is None or os.path.basename(name).startswith("__"):  # webdataset's metadata members
                continue
            extension = extension.lower()
            reading = key
            data = archive.extractfile(info).read()
            reading = None
            if pending is not None and key != pending.key:
                yield pending
                pending = None
            if pending is None:
                pending = RawSample(key=key, members={}, url=url)
            # A repeated member name keeps the first copy, as a reader of the first sample would.
            pending.members.setdefault(extension, data)
        ended = getattr(archive, "gsclip_end", None)  # set only when the stream ended on a header
        if ended is not None:
            raise tarfile.ReadError(f"no end-of-archive marker: {ended}")
    except Exception as error:  # noqa: BLE001 - tarfile, gzip and zlib errors all mean a broken shard
        counts.count("corrupt_shards")
        where = pending.key if pending else "its start"
        logger.warning("shard %s is corrupt after %s: %s; skipping the rest of it", url, where, error)
        # Which sample the break fell in: the member being read, or the one whose header was cut
        # (when its name arrived whole); unknown otherwise.
        cut_name = getattr(archive, "gsclip_cut_name", None) if archive is not None else None
        cut_key = reading if reading is not None else (base_plus_ext(cut_name)[0] if cut_name else None)
        if pending is not None and cut_key is not None and cut_key != pending.key:
            counts.count("cut_samples")  # a new sample began and was cut; the pending one had ended
        elif pending is not None or cut_key is not None:
            # The break fell inside the pending sample, or nothing says whether more of its members
            # were to follow: it is cut, never passed on.
            counts.count("cut_samples")
            pending = None
    finally:
        stream.close()
    if pending is not None:
        yield pending


# ----------------------------------------------------------------------------------------------
# The reader


@dataclass(frozen=True)
class ShardSelection:
    """Which shards of a spec this process reads: the keywords every shard reader takes
    (:class:`ShardDataset` and its formats, :func:`gsclip_lib.data.splat_shards.splat_dataset`)."""

    rank: int | None = None  # None: this process's, as gsclip_lib.distributed.resolve_rank finds it
    world_size: int | None = None  # None: the number of processes, found the same way
    split_by_worker: bool = True  # DataLoader workers share the rank's shards; False: each reads them all


class ShardDataset(IterableDataset):
    """Samples of tar shards split by rank and DataLoader worker, with skips counted, not raised.

    ``selection`` is the keywords of :class:`ShardSelection` (``rank``, ``world_size``,
    ``split_by_worker``). Subclasses turn a :class:`RawSample` into their sample type in
    :meth:`decode_sample` (raising :class:`SkipSample` to skip it); the sample type needs a
    ``skips`` attribute (see the module docstring for what it carries). ``skip_counts`` holds the
    counts of the latest iteration run in this process.
    """

    def __init__(self, spec: ShardSpec, **selection: Any) -> None:
        super().__init__()
        chosen = ShardSelection(**selection)
        self.shards = expand_shard_spec(spec)
        if not self.shards:
            raise InputError(f"the shard spec {spec!r} names no shard")
        self.rank, self.world_size = resolve_rank(chosen.rank, chosen.world_size)
        self.split_by_worker = chosen.split_by_worker
        self.skip_counts = SkipCounts()

    def rank_shards(self) -> list[str]:
        """This rank's shards, in the spec's order (before the split among DataLoader workers)."""
        return shards_for_rank(self.shards, self.rank, self.world_size)

    def decode_sample(self, raw: RawSample) -> Any:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Any]:
        counts = SkipCounts()
        self.skip_counts = counts
        shards = self.rank_shards()
        if self.split_by_worker:
            shards = list(wds.split_by_worker(shards))
        return self._decoded(shards, counts)

    def _decoded(self, shards: list[str], counts: SkipCounts) -> Iterator[Any]:
        reported = SkipCounts()
        held = None  # one sample held back so the last one can carry the trailing skips
        for url in shards:
            for raw in iter_tar_samples(url, counts):
                try:
                    sample = self.decode_sample(raw)
                except SkipSample as skip:
                    counts.count(skip.reason)
                    logger.debug("skipping sample %s of %s: %s", raw.key, raw.url, skip)
                    continue
                if held is not None:
                    held.skips, reported = counts - reported, counts.copy()
                    yield held
                counts.good += 1
                held = sample
        if held is not None:
            held.skips = counts - reported
            yield held
