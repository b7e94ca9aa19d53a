"""Prints the core dependencies pinned at their lower bounds, for pip: ``jax==X jaxlib==X ...``.

The bounds are read from ``[project] dependencies`` in pyproject.toml, where they are
written once; jaxlib is pinned with jax, at the same version. CI installs the wheel with
these pins in a fresh environment and runs the core smoke test there, so every lower
bound is one that was tested.

    python .ci/oldest_requirements.py
"""

import pathlib
import re
import sys
import tomllib

PYPROJECT = pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"


def oldest(dependencies):
    pins = []
    for requirement in dependencies:
        name, spec = re.fullmatch(r"\s*([A-Za-z0-9._-]+)\s*(.*?)\s*", requirement).groups()
        bounds = [s.strip()[2:].strip() for s in spec.split(",") if s.strip().startswith(">=")]
        if ";" in spec or len(bounds) != 1:
            sys.exit(f"pyproject.toml: {requirement!r} needs one lower bound `>=`, no marker")
        pins.append(f"{name}=={bounds[0]}")
        if name == "jax":
            pins.append(f"jaxlib=={bounds[0]}")
    return pins


def main():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    print(" ".join(oldest(project["dependencies"])))


if __name__ == "__main__":
    main()
