"""A profile becomes `dvc exp run -S` arguments that set exactly its values."""

from pathlib import Path

import pytest
import yaml

from gsclip_lib.config import compose, lay_over, parse_override, read_yaml
from gsclip_lib.errors import GsclipError
from gsclip_lib.stages.profiles import dvc_set_arguments, main, resolve_profile

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["tiny", "paper"])
def test_set_arguments_reproduce_the_profile(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    profile = resolve_profile(name)
    arguments = dvc_set_arguments(profile)
    assert arguments[::2] == ["-S"] * (len(arguments) // 2)
    values = read_yaml(ROOT / "params.yaml")
    for assignment in arguments[1::2]:
        values = lay_over(values, parse_override(assignment), assignment)
    assert values == compose(ROOT / "params.yaml", profile)


def test_unknown_profiles_and_keys_fail_before_dvc_runs(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(ROOT)
    with pytest.raises(GsclipError, match="no profile 'huge'; known: paper, tiny"):
        resolve_profile("huge")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"fit": {"num_splat": 3}}))
    assert main([str(bad), "--dry"]) == 2
    assert "unknown key fit.num_splat" in capsys.readouterr().err


def test_dry_run_prints_the_command(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["tiny", "--dry", "--temp"]) == 0
    printed = capsys.readouterr().out
    assert " -m dvc exp run -S " in printed and printed.strip().endswith("--temp")
