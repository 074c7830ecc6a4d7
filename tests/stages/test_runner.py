"""The stage runner: the same files from a notebook and from the command line, from any folder."""

import json
from pathlib import Path

import papermill
import pytest
import yaml

from gsclip_lib.errors import ConfigError
from gsclip_lib.stages.cli import main
from gsclip_lib.stages.runner import StageRun, find_project_root

ROOT = Path(__file__).resolve().parents[2]


def test_the_project_root_is_found_from_a_subfolder(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT / "notebooks")
    assert find_project_root() == ROOT
    run = StageRun("fit", "params.yaml")  # what a kernel started in notebooks/ does
    assert Path.cwd() == ROOT and run.out_dir == Path("reports/fit")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no gsclip project"):
        find_project_root()


@pytest.mark.slow
def test_notebook_and_command_line_write_the_same_metrics(fashion_mnist, tmp_path):
    params = {}
    for run in ("notebook", "cli"):
        values = yaml.safe_load((ROOT / "params.yaml").read_text())
        values["paths"]["reports"] = str(tmp_path / run)
        values["data"].update(shards_dir=str(tmp_path / f"{run}-shards"), train_size=30, eval_size=10)
        params[run] = tmp_path / f"{run}.yaml"
        params[run].write_text(json.dumps(values))
    executed = tmp_path / "executed.ipynb"
    papermill.execute_notebook(str(ROOT / "notebooks" / "01_prepare_data.ipynb"), str(executed),
                               parameters={"params_path": str(params["notebook"])}, cwd=str(ROOT),
                               progress_bar=False)
    assert main(["prepare", "--params", str(params["cli"])]) == 0
    written = {run: json.loads((tmp_path / run / "prepare" / "metrics.json").read_text()) for run in params}
    for metrics in written.values():
        assert metrics.pop("stage_seconds") >= 0
    assert written["notebook"] == written["cli"]
    for run in params:
        assert (tmp_path / run / "prepare" / "figures" / "samples.png").stat().st_size > 1000
    outputs = [o for c in json.loads(executed.read_text())["cells"] for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert not [o for o in outputs if o.get("output_type") == "error"]
