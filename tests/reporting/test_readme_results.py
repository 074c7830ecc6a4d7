"""The README's results block is what the committed run's files give, and the report page writes it."""

from pathlib import Path

import pytest

from gsclip_lib.errors import InputError
from gsclip_lib.pages import report
from gsclip_lib.params import load_params

ROOT = Path(__file__).resolve().parents[2]


def test_readme_results_block_equals_what_the_committed_metrics_give(monkeypatch):
    monkeypatch.chdir(ROOT)  # params.yaml's paths are the project root's
    generated = report.readme_block(report.annotated_sets(load_params("params.yaml")))
    assert report.committed_block(ROOT / "README.md") == generated, (
        "README.md's results block differs from the committed metrics: run `dvc repro` (the report page "
        "rewrites it) and commit README.md with the metrics"
    )
    assert "95 % CI" in generated and "McNemar's exact test" in generated


def test_the_block_is_replaced_between_its_markers_only():
    text = f"# title\n\nbefore\n\n{report.BEGIN}\nold numbers\n{report.END}\n\nafter\n"
    replaced = report.replace_block(text, "new numbers\n")
    assert replaced == f"# title\n\nbefore\n\n{report.BEGIN}\nnew numbers\n{report.END}\n\nafter\n"
    assert report.replace_block(replaced, "new numbers\n") == replaced
    with pytest.raises(InputError, match="no results markers"):
        report.replace_block("# a README without markers\n", "x")
