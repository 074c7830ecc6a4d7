"""The stage runner from any folder, and a page drawn from what the command-line stage wrote."""

import json
from pathlib import Path

import papermill
import pytest
import yaml

from gsclip_lib.errors import ConfigError
from gsclip_lib.reporting.page_check import page_problems
from gsclip_lib.stages.cli import main
from gsclip_lib.pipeline.runner import StageRun, find_project_root

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
def test_the_page_draws_what_the_command_line_stage_wrote(fashion_mnist, tmp_path):
    values = yaml.safe_load((ROOT / "params.yaml").read_text())
    values["paths"]["reports"] = str(tmp_path / "reports")
    values["data"].update(shards_dir=str(tmp_path / "shards"), train_size=30, eval_size=10)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(values))
    assert main(["prepare", "--params", str(params)]) == 0
    metrics = json.loads((tmp_path / "reports" / "prepare" / "metrics.json").read_text())
    assert metrics["splits"]["train"]["images"] == 30 and metrics["stage_seconds"] >= 0
    assert not (tmp_path / "reports" / "figures").exists(), "a computing stage draws nothing"
    executed = tmp_path / "executed.ipynb"
    papermill.execute_notebook(str(ROOT / "notebooks" / "01_prepare_data.ipynb"), str(executed),
                               parameters={"params_path": str(params)}, cwd=str(ROOT), progress_bar=False)
    assert (tmp_path / "reports" / "figures" / "prepare" / "samples.png").stat().st_size > 1000
    assert page_problems(executed) == []
    text = executed.read_text()
    assert "train: 30 images in 1 shard(s); none skipped." in text
