"""Which files of the project each DVC stage runs: the import closure of its stage module or notebook.

DVC reruns a stage when one of its declared dependencies changes, so a stage must declare every
module it executes, and no other (or an unrelated change reruns it). This module reads a
notebook's code cells and every project module they reach through ``import`` statements anywhere
in the code (lazy imports inside functions too), follows them to the bottom, and adds the data files
a module reads or compiles beside itself (the model configs, the C++ kernel's source). ``tests/pipeline/test_dependencies.py`` checks
``dvc.yaml`` against it; after changing imports, update ``dvc.yaml`` with

    python -m gsclip_lib.pipeline.dependencies --write

(``--check`` only reports the differences and exits 1 when there are some).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import sys
from pathlib import Path

PACKAGES = ("gsclip_lib", "kernels")  # the project's own code; everything else is a library
# Files a module reads or compiles at run time, beside its own code.
DATA_FILES = {
    "gsclip_lib/models/rgb_clip.py": ["gsclip_lib/models/model_configs"],
    "kernels/rasterize_cpu.py": ["kernels/csrc"],
}


def _module_file(root: Path, name: str) -> Path | None:
    """The file of module ``name`` (a.b.c) under ``root``: a.b.c.py or a/b/c/__init__.py."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    as_file = root.joinpath(*parts).with_suffix(".py")
    if as_file.is_file():
        return as_file
    as_package = root.joinpath(*parts, "__init__.py")
    return as_package if as_package.is_file() else None


def _imported_modules(tree: ast.AST) -> set[str]:
    """Every module an ``import`` or ``from ... import`` of ``tree`` may load (including ``a.b`` for
    ``from a import b`` when ``b`` is a submodule: the caller keeps the names that are files)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _with_parents(name: str) -> list[str]:
    """``a.b.c`` and the packages Python imports before it: ``a``, ``a.b``."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def closure(root: Path, sources: list[str]) -> list[str]:
    """The project files (paths relative to ``root``) that importing ``sources`` (code) executes."""
    found: dict[str, Path] = {}
    pending: list[str] = []
    for source in sources:
        pending.extend(_imported_modules(ast.parse(source)))
    while pending:
        name = pending.pop()
        for module in _with_parents(name):
            if module in found:
                continue
            path = _module_file(root, module)
            if path is None:
                continue
            found[module] = path
            pending.extend(_imported_modules(ast.parse(path.read_text(encoding="utf-8"))))
    files = {path.relative_to(root).as_posix() for path in found.values()}
    for module_file in list(files):
        files.update(DATA_FILES.get(module_file, []))
    return sorted(files)


# The parameter schema is not a dependency of any stage. It holds no value of its own (every value is
# spelled in params.yaml, which tests/test_params.py enforces), and DVC tracks each stage's parameter
# groups by value; the fit and prune fingerprints likewise hold the resolved values instead. So an edit
# to the schema (a check, a message, a comment) reruns no stage, while a new field, which must also be
# added to params.yaml, reruns exactly the stages that read its group.
SCHEMA_FILE = "gsclip_lib/params.py"


def code_fingerprint(module: str) -> str:
    """A hash of every project file that importing ``module`` executes, the parameter schema aside:
    changes when the code that computes the stage's outputs does.

    Stages that resume from their own finished outputs keep it with them, beside the resolved values of
    their parameters, so that outputs made by other code or other values are never kept. Drawing code
    is not in it: stages draw nothing (``gsclip_lib.pages`` does).
    """
    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for relative in closure(root, [f"import {module}"]):
        if relative == SCHEMA_FILE:
            continue
        path = root / relative
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def notebook_code(path: Path) -> list[str]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]


def is_code_path(entry: str) -> bool:
    return entry.split("/", 1)[0] in PACKAGES


CLI_STAGE = re.compile(r"-m gsclip_lib\.stages\.cli (\w+)")


def stage_sources(root: Path, dvc_yaml: dict) -> dict[str, list[str]]:
    """DVC stage name (as in dvc.yaml, before foreach expansion) -> the code it starts from: a page's
    notebook cells, or, for a stage that runs ``python -m gsclip_lib.stages.cli <stage>``, the
    command line and that stage's module."""
    sources = {}
    for name, stage in dvc_yaml["stages"].items():
        body = stage.get("do", stage)
        notebooks = [dep for dep in body.get("deps", [])
                     if isinstance(dep, str) and dep.startswith("notebooks/") and dep.endswith(".ipynb")]
        command = CLI_STAGE.search(" ".join(str(body.get("cmd", "")).split()))
        if notebooks:
            sources[name] = notebook_code(root / notebooks[0])
        elif command:
            sources[name] = ["import gsclip_lib.stages.cli", f"import gsclip_lib.stages.{command.group(1)}"]
    return sources


def expected_code_deps(root: Path, dvc_yaml: dict) -> dict[str, list[str]]:
    """For every stage of ``dvc_yaml``, the code files it executes."""
    return {name: [file for file in closure(root, sources) if file != SCHEMA_FILE]
            for name, sources in stage_sources(root, dvc_yaml).items()}


def declared_code_deps(dvc_yaml: dict) -> dict[str, list[str]]:
    declared = {}
    for name, stage in dvc_yaml["stages"].items():
        body = stage.get("do", stage)
        declared[name] = sorted(dep for dep in body.get("deps", []) if isinstance(dep, str) and is_code_path(dep))
    return declared


def differences(root: Path) -> dict[str, dict[str, list[str]]]:
    """Per stage, the code files dvc.yaml is missing and those it lists but the stage never runs."""
    import yaml

    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text())
    expected = expected_code_deps(root, dvc_yaml)
    declared = declared_code_deps(dvc_yaml)
    found = {}
    for name, files in expected.items():
        missing = sorted(set(files) - set(declared.get(name, [])))
        extra = sorted(set(declared.get(name, [])) - set(files))
        if missing or extra:
            found[name] = {"missing": missing, "extra": extra}
    return found


def write_code_deps(root: Path) -> None:
    """Rewrite the code entries of every stage's deps in dvc.yaml, keeping everything else."""
    from ruamel.yaml import YAML

    editor = YAML()
    editor.preserve_quotes = True
    editor.width = 4096
    editor.indent(mapping=2, sequence=4, offset=2)
    path = root / "dvc.yaml"
    document = editor.load(path.read_text())
    expected = expected_code_deps(root, editor.load(path.read_text()))
    for name, stage in document["stages"].items():
        body = stage["do"] if "do" in stage else stage
        deps = body["deps"]
        first = next((i for i, dep in enumerate(deps) if isinstance(dep, str) and is_code_path(dep)), len(deps))
        kept = [dep for dep in deps if not (isinstance(dep, str) and is_code_path(dep))]
        position = min(first, len(kept))
        deps.clear()
        deps.extend(kept[:position] + expected[name] + kept[position:])
    with path.open("w") as stream:
        editor.dump(document, stream)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--check", action="store_true", help="report differences; exit 1 if there are some")
    action.add_argument("--write", action="store_true", help="rewrite the code deps of dvc.yaml")
    args = parser.parse_args(argv)
    root = Path.cwd()
    if args.write:
        write_code_deps(root)
        return 0
    found = differences(root)
    if args.check:
        for name, diff in found.items():
            print(f"{name}: missing {diff['missing']}, not run {diff['extra']}")
        return 1 if found else 0
    import yaml

    print(yaml.safe_dump(expected_code_deps(root, yaml.safe_load((root / "dvc.yaml").read_text())), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
