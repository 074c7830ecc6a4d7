"""The one atomic writer: whole files, mode 0644, nothing left behind on failure."""

import json
import math
import os
import stat

import pytest

from gsclip_lib.atomic_files import atomic_output, partial_files, save_torch, write_json, write_text


def test_a_written_file_is_whole_and_readable_by_all(tmp_path):
    old = os.umask(0o077)  # even under a strict umask, outputs are published 0644
    try:
        path = write_text(tmp_path / "sub" / "a.txt", "hello")
        checkpoint = save_torch({"x": 1}, tmp_path / "last.pt")
    finally:
        os.umask(old)
    assert path.read_text() == "hello"
    for written in (path, checkpoint):
        assert stat.S_IMODE(written.stat().st_mode) == 0o644
    assert partial_files(path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "sub"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_text(tmp_path / "metrics.json", "old")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_output(path) as stream:
            stream.write(b"half of the new")
            raise RuntimeError("crash")
    assert path.read_text() == "old" and partial_files(path) == []


def test_leftovers_of_a_killed_write_are_cleared_on_request(tmp_path):
    path = tmp_path / "shard.tar"
    leftover = tmp_path / ".shard.tar.abc123.partial"
    leftover.write_bytes(b"killed")
    assert partial_files(path) == [str(leftover)]
    with atomic_output(path) as stream:
        stream.write(b"one")
    assert leftover.exists()  # another writer's temporary file is not touched by default
    with atomic_output(path, clear_leftovers=True) as stream:
        stream.write(b"two")
    assert not leftover.exists() and path.read_bytes() == b"two"


def test_json_has_no_nan(tmp_path):
    path = write_json(tmp_path / "m.json", {"a": math.nan, "b": [1.0, math.inf], "c": {"d": -math.inf}})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "c": {"d": None}}
