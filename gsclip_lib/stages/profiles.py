"""Run the DVC pipeline on a profile: ``dvc exp run`` with the profile's values set.

A profile (``profiles/tiny.yaml``, ``profiles/paper.yaml``) holds only the keys it changes. The
command line stages read it directly (``--profile``); DVC, which tracks the values of
``params.yaml``, runs it as an experiment: ``dvc exp run -S key=value ...`` with one ``-S`` per key of
the profile. DVC writes those values into ``params.yaml`` for the run (comments kept) and records the
experiment (``dvc exp show``); ``git checkout params.yaml`` returns to the defaults, and
``--temp`` runs it in a temporary copy that leaves the workspace alone.

    python -m gsclip_lib.stages.profiles profiles/tiny.yaml          # make repro PROFILE=tiny
    python -m gsclip_lib.stages.profiles profiles/tiny.yaml --dry    # print the command only

The profile is validated against ``params.yaml`` first, so a misspelt key fails before DVC starts.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from gsclip_lib.config import flatten, read_yaml
from gsclip_lib.errors import GsclipError
from gsclip_lib.params import load_params


def resolve_profile(name: str) -> Path:
    """``tiny`` or ``profiles/tiny.yaml`` as the profile's path."""
    path = Path(name)
    if path.is_file():
        return path
    candidate = Path("profiles") / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in Path("profiles").glob("*.yaml"))
    raise GsclipError(f"no profile {name!r}; known: {', '.join(known) or 'none'} (in profiles/)")


def dvc_set_arguments(profile: Path, params_path: str | Path = "params.yaml") -> list[str]:
    """``["-S", "group.key=value", ...]`` for every key of ``profile`` (validated first)."""
    load_params(params_path, profile=profile)
    arguments = []
    for key, value in flatten(read_yaml(profile)).items():
        arguments += ["-S", f"{key}={json.dumps(value, separators=(',', ':'))}"]
    return arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gsclip_lib.stages.profiles", description=__doc__.splitlines()[0])
    parser.add_argument("profile", help="a profile name (tiny, paper) or a path")
    parser.add_argument("--dry", action="store_true", help="print the dvc command instead of running it")
    args, dvc_args = parser.parse_known_args(argv)  # the rest goes to dvc exp run (e.g. --temp)
    try:
        command = [sys.executable, "-m", "dvc", "exp", "run", *dvc_set_arguments(resolve_profile(args.profile)), *dvc_args]
    except GsclipError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.dry:
        print(shlex.join(command))
        return 0
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
