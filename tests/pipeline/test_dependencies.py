"""dvc.yaml lists exactly the code each stage runs: the import closure of its notebook."""

import textwrap
from pathlib import Path

from gsclip_lib.pipeline.dependencies import closure, differences

ROOT = Path(__file__).resolve().parents[2]


def test_dvc_yaml_declares_every_module_a_stage_runs_and_no_other():
    found = differences(ROOT)
    assert not found, (
        f"dvc.yaml's code deps differ from the notebooks' imports: {found}; "
        "run `python -m gsclip_lib.pipeline.dependencies --write`"
    )


def test_closure_follows_lazy_imports_and_parent_packages(tmp_path):
    (tmp_path / "gsclip_lib" / "inner").mkdir(parents=True)
    (tmp_path / "kernels").mkdir()
    (tmp_path / "gsclip_lib" / "__init__.py").write_text("")
    (tmp_path / "gsclip_lib" / "inner" / "__init__.py").write_text("")
    (tmp_path / "gsclip_lib" / "inner" / "a.py").write_text(textwrap.dedent("""
        import numpy
        def later():
            from kernels.fast import go  # imported only when called: still part of what runs
            return go()
    """))
    (tmp_path / "kernels" / "fast.py").write_text("import gsclip_lib.unused_missing\n")
    (tmp_path / "gsclip_lib" / "b.py").write_text("x = 1\n")
    files = closure(tmp_path, ["from gsclip_lib.inner import a\n"])
    assert files == ["gsclip_lib/__init__.py", "gsclip_lib/inner/__init__.py", "gsclip_lib/inner/a.py", "kernels/fast.py"]


def test_the_rgb_model_brings_its_configs():
    files = closure(ROOT, ["from gsclip_lib.models import rgb_clip\n"])
    assert "gsclip_lib/models/model_configs" in files and "gsclip_lib/reporting/figures.py" not in files


def test_the_cpu_rasterizer_brings_the_source_it_compiles():
    files = closure(ROOT, ["from gsclip_lib.splats.render import render_splats\n"])
    assert "kernels/rasterize_cpu.py" in files and "kernels/csrc" in files
