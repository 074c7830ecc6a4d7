"""The splat tower ablation: every variant is a valid change of params.yaml, and the table reads right."""

from pathlib import Path

import pytest

from benchmarks.tower_ablation import VARIANTS, main, markdown_table, variant_params

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_is_a_valid_params_yaml(name, tmp_path):
    params = variant_params(ROOT / "params.yaml", VARIANTS[name][1], tmp_path / name)
    assert params.align.checkpoint_dir == str(tmp_path / name)
    if name != "default":
        assert VARIANTS[name][1], f"{name} changes nothing"


def test_variants_change_what_they_say():
    base = variant_params(ROOT / "params.yaml", [], Path("x")).align
    previous = variant_params(ROOT / "params.yaml", VARIANTS["previous_default"][1], Path("x")).align
    assert (previous.encoder.latents, previous.distill_target) == ("learned", "embedding")
    assert (base.encoder.latents, base.distill_target) == ("teacher_grid", "tokens")


def test_markdown_table_sorts_and_relates():
    report = {
        "level": 22, "rgb_top1": 0.8, "render_back_top1": 0.75,
        "variants": {
            "a": {"description": "first", "top1": 0.70, "align_cpu_seconds": 100.0},
            "b": {"description": "second", "top1": 0.76, "align_cpu_seconds": 90.0},
        },
    }
    lines = markdown_table(report).splitlines()
    assert lines[2] == "| b | second | 76.0 % | 0.950 | +1.0 | 90 |"
    assert lines[3] == "| a | first | 70.0 % | 0.875 | -5.0 | 100 |"
    assert lines[-1].startswith("| (RGB on the splats rendered back) | | 75.0 % | 0.938")


def test_unknown_variants_and_missing_runs_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--variants", "nonsense"])
    assert "unknown variants ['nonsense']" in capsys.readouterr().err
    params = tmp_path / "params.yaml"
    text = (ROOT / "params.yaml").read_text().replace("checkpoint_dir: data/models/rgb", f"checkpoint_dir: {tmp_path}/rgb")
    params.write_text(text)
    with pytest.raises(SystemExit, match="is missing: run the default pipeline first"):
        main(["--params", str(params), "--variants", "default"])
