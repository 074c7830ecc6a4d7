"""The classifier cache (gsclip_lib.evaluation.cached_classifier): a cached classifier predicts what
the one built from the models predicts, on records of other batch sizes and splat counts than it was
traced with; any changed input makes a new entry; a damaged entry is rebuilt; ``--no-cache`` and
``cache=False`` neither read nor write it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gsclip_lib import api
from gsclip_lib.evaluation import cached_classifier
from gsclip_lib.splats.codec import decode_splats, encode_splats
from gsclip_lib.splats.container import Splats

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "v2-gray-28x28-3splats.gsplat"


@pytest.fixture(scope="module")
def records(tiny_project) -> list[bytes]:
    """Nine eval records of the tiny fit (22 splats) and two with fewer splats (3, and 13 kept of 22)."""
    from gsclip_lib.data.splat_shards import splat_dataset

    params = tiny_project.params
    stored = [sample.record for sample in splat_dataset(str(params.splat_dir(params.fit.num_splats, "eval")),
                                                        rank=0, world_size=1)][:9]
    splats = decode_splats(stored[0]).splats
    fewer = Splats(splats.positions[:, :13], splats.cholesky[:, :13], splats.colours[:, :13], splats.valid[:, :13])
    return stored + [GOLDEN.read_bytes(), encode_splats(fewer, 0, 28, 28)]


def entries(folder) -> list[str]:
    return sorted(path.name for path in folder.glob(f"*{cached_classifier.SUFFIX}")) if folder.exists() else []


def test_a_cached_classifier_predicts_what_the_built_one_does(tiny_project, records, classifier_cache):
    level, params = tiny_project.level_dir, tiny_project.params_path
    built = api.load_classifier(level, params=params, cache=False)
    assert not built.cached and entries(classifier_cache) == []
    first = api.load_classifier(level, params=params)
    assert not first.cached and len(entries(classifier_cache)) == 1
    cached = api.load_classifier(level, params=params)
    assert cached.cached
    assert (cached.class_names, cached.image_shape) == (built.class_names, built.image_shape)
    assert cached.temperature == pytest.approx(built.temperature) and torch.equal(cached.weights, built.weights)
    for batch_size in (1, 4, 256):
        expected = api.classify(records, built, top=10, batch_size=batch_size)
        got = api.classify(records, cached, top=10, batch_size=batch_size)
        assert [p.labels for p in got] == [p.labels for p in expected]
        assert [p.probabilities for p in got] == [pytest.approx(p.probabilities, abs=1e-5) for p in expected]


def test_any_changed_input_makes_a_new_entry_and_a_damaged_one_is_rebuilt(tiny_project, tmp_path, monkeypatch,
                                                                         records, capsys):
    monkeypatch.setenv("GSCLIP_CACHE_DIR", str(tmp_path / "cache"))
    level, params = tiny_project.level_dir, tiny_project.params_path
    api.load_classifier(level, params=params)
    (tmp_path / "names.txt").write_text("\n".join(f"thing {index}" for index in range(10)))
    renamed = api.load_classifier(level, str(tmp_path / "names.txt"), params=params)
    assert not renamed.cached and renamed.class_names[0] == "thing 0" and len(entries(tmp_path / "cache")) == 2
    (tmp_path / "names.txt").write_text("\n".join(f"other {index}" for index in range(10)))
    assert not api.load_classifier(level, str(tmp_path / "names.txt"), params=params).cached
    assert len(entries(tmp_path / "cache")) == 3

    for entry in (tmp_path / "cache").iterdir():
        entry.write_bytes(entry.read_bytes()[:1000])  # cut short
    capsys.readouterr()
    rebuilt = api.load_classifier(level, params=params)
    assert not rebuilt.cached and "ignoring the unreadable classifier cache" in capsys.readouterr().err
    assert api.load_classifier(level, params=params).cached


def test_the_command_says_where_its_classifier_came_from_and_no_cache_writes_nothing(
        tiny_project, records, gsclip, tmp_path, monkeypatch):
    monkeypatch.setenv("GSCLIP_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "a.gsplat").write_bytes(records[0])
    arguments = ("classify", tmp_path / "a.gsplat", "--model", tiny_project.level_dir, "--params",
                 tiny_project.params_path, "--json")
    status, out, err = gsclip(*arguments, "--no-cache")
    assert status == 0, err
    assert json.loads(out)["classifier_cached"] is False and entries(tmp_path / "cache") == []
    runs = [json.loads(gsclip(*arguments)[1]) for _ in range(2)]
    assert [run["classifier_cached"] for run in runs] == [False, True]
    assert runs[0]["files"] == runs[1]["files"]


def test_a_cached_classifier_needs_no_open_clip(tiny_project, tmp_path):
    script = ("import sys; from gsclip_lib import api; "
              f"c = api.load_classifier({str(tiny_project.level_dir)!r}, params={str(tiny_project.params_path)!r}); "
              "print(c.cached, 'open_clip' in sys.modules, 'torchvision' in sys.modules)")
    env = {**os.environ, "GSCLIP_CACHE_DIR": str(tmp_path / "cache")}
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
            for _ in range(2)]
    assert [run.stdout.split() for run in runs] == [["False", "True", "True"], ["True", "False", "False"]], runs
