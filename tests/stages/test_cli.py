"""The command-line stages (what torchrun runs): the notebook's files, and user errors in one line."""

import json
from pathlib import Path

import pytest

from gsclip_lib.stages.cli import main


def _overrides(tmp_path) -> list[str]:
    """A tiny run in ``tmp_path``: 20 + 10 images, 8 splats, 2 fitting steps."""
    values = [
        f"paths.reports={tmp_path}/reports", f"data.shards_dir={tmp_path}/shards", "data.train_size=20",
        "data.eval_size=10", "data.images_per_shard=10", f"fit.out_dir={tmp_path}/splats", "fit.num_splats=8",
        "fit.batch_size=10", "fit.optimizer.iterations=2", "prune.levels=[4, 2]", "prune.refit_iterations=2",
    ]
    return [argument for value in values for argument in ("--set", value)]


def test_data_stages_from_the_command_line(fashion_mnist, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)  # a relative params path is found from the project root
    params = str(Path(__file__).resolve().parents[2] / "params.yaml")
    for stage in (["prepare"], ["fit"], ["prune"]):
        assert main([*stage, "--params", params, *_overrides(tmp_path)]) == 0
    reports = tmp_path / "reports"
    fitted = json.loads((reports / "fit" / "metrics.json").read_text())
    assert fitted["train"]["images"] == 20 and fitted["eval"]["images"] == 10 and fitted["world_size"] == 1
    pruned = json.loads((reports / "prune" / "metrics.json").read_text())
    for level, parent in ((4, 8), (2, 4)):  # the cascade: each level from the one above
        row = pruned["levels"][f"N{level}"]["eval"]
        assert row["payload_bytes"] == level * 12 and row["images"] == 10 and row["pruned_from"] == parent
        assert row["total_steps"] == 2 + 2 * (1 if level == 4 else 2)
        assert row["psnr_cost"] == pytest.approx(row["mean_psnr_before"] - row["mean_psnr"])
    assert set(pruned["fit_small"]) == {"N4", "N2"}
    assert not (reports / "figures").exists(), "a computing stage draws nothing"


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["align"], "the align stage needs --level N"),
        (["prune", "--level", "4"], "the prune stage takes no --level"),
        (["fit", "--level", "3"], "the fit stage takes no --level"),
        (["fit", "--set", "fit.num_splat=3"], "unknown key fit.num_splat"),
        (["fit", "--set", "fit.optimizer.lr_positions=.inf"], "fit.optimizer.lr_positions: Input should be a finite number"),
        (["fit", "--params", "missing.yaml"], "parameter file not found: missing.yaml"),
        (["fit", "--profile", "profiles/none.yaml"], "parameter file not found: profiles/none.yaml"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(arguments, message, capsys):
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error
    assert error.count("\n") == 1 and "Traceback" not in error
