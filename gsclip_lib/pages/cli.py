"""Execute every page (notebook) on a run's files, outside DVC: the last line of the paper-scale runbook.

    python -m gsclip_lib.pages.cli --profile profiles/paper.yaml [--set group.key=value ...]

The parameters (``params.yaml``, the profile, the overrides) are resolved once and written to
``paths.reports/params.resolved.yaml``; each notebook of ``notebooks/`` is executed by papermill with
that file into ``paths.reports/notebooks/``, as ``dvc repro`` would, except that the README's results
block (the default run's) is left alone. A mistake of the user's is one line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gsclip_lib.atomic_files import write_text
from gsclip_lib.errors import GsclipError
from gsclip_lib.params import load_params

NOTEBOOKS = Path("notebooks")


def execute_pages(params_file: Path, reports: Path) -> list[Path]:
    """Every notebook of ``notebooks/`` executed with ``params_file``; the executed notebooks."""
    import papermill

    executed = []
    for notebook in sorted(NOTEBOOKS.glob("*.ipynb")):
        output = reports / "notebooks" / notebook.name
        output.parent.mkdir(parents=True, exist_ok=True)
        parameters = {"params_path": str(params_file)}
        if "readme" in papermill.inspect_notebook(str(notebook)):
            parameters["readme"] = ""  # the README's block holds the default run's results, not these
        papermill.execute_notebook(str(notebook), str(output), parameters=parameters, progress_bar=False,
                                   log_output=False)
        executed.append(output)
    return executed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gsclip_lib.pages.cli", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    parser.add_argument("--profile", default=None, help="a profile laid over it, e.g. profiles/paper.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="GROUP.KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        import yaml

        params = load_params(args.params, profile=args.profile, overrides=args.overrides)
        reports = Path(params.paths.reports)
        resolved = reports / "params.resolved.yaml"
        write_text(resolved, yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
        for page in execute_pages(resolved.resolve(), reports):
            print(f"wrote {page}")
    except GsclipError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
