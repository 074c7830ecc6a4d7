"""The README's walk-through ("Splats from the command line") runs as written from the project root,
and its outputs are what it says: two splat counts of the astronaut, their pictures, and the coat
classified from its 282 bytes. It needs the default run's models and shards (``make repro``)."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
NEEDS = [ROOT / "data" / "models" / "align" / "N22" / "splat_encoder.pt", ROOT / "data" / "models" / "rgb" / "model.pt",
         ROOT / "data" / "shards" / "eval-000000.tar"]


def walkthrough() -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- walkthrough[^>]*-->\n```bash\n(.*?)```\n<!-- end walkthrough -->", text, re.S)
    assert found, "README.md has no walk-through block between its markers"
    return found.group(1)


def test_the_readme_walkthrough_runs_as_written(tmp_path):
    missing = [str(path.relative_to(ROOT)) for path in NEEDS if not path.is_file()]
    if missing:
        pytest.skip(f"the walk-through needs the default run's outputs (make repro); missing: {', '.join(missing)}")
    script = walkthrough()
    done = subprocess.run(["bash", "-e", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (demo,) = [path for path in tmp_path.iterdir() if (path / "astronaut.png").is_file()]  # its mktemp -d
    sizes = {count: (demo / f"astronaut-{count}.gsplat").stat().st_size for count in (256, 64)}
    assert sizes == {256: 18 + 256 * 8 * 2, 64: 18 + 64 * 8 * 2}  # the bytes the comment states
    for count in (256, 64):
        with Image.open(demo / f"astronaut-{count}.png") as picture:
            assert picture.size == (256, 256)
    assert (demo / "coat.gsplat").stat().st_size == 282
    assert "22 splats, 1 channel(s), image 28x28" in done.stdout and "checksum ok" in done.stdout
    classified = re.search(r"coat\.gsplat \(282 bytes, 2\.78x\): (\w[\w/ -]*?) ([\d.]+) %", done.stdout)
    assert classified and classified.group(1) == "coat", done.stdout  # the coat's label in the shard's .json
    assert json.loads(subprocess.run(["tar", "-xOf", "data/shards/eval-000000.tar", "eval000014.json"], cwd=ROOT,
                                     capture_output=True, text=True).stdout)["class_name"] == "coat"
