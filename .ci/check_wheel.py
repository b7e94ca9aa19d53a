"""The built wheel holds the package and its py.typed, and nothing of the repository else.

python .ci/check_wheel.py dist/jaxeff-*.whl
"""

import sys
import zipfile


def main(path):
    names = zipfile.ZipFile(path).namelist()
    tops = {name.split("/")[0] for name in names}
    stray = sorted(t for t in tops if t != "jaxeff" and not t.endswith(".dist-info"))
    assert not stray, f"the wheel holds {stray} (only jaxeff/ belongs in it)"
    assert "jaxeff/py.typed" in names, "the wheel lacks jaxeff/py.typed"
    for part in ("tests", "notebooks", "experiments", "benchmarks", "runs"):
        found = [n for n in names if f"/{part}/" in n or n.startswith(f"{part}/")]
        assert not found, f"the wheel holds {found[:3]}"
    print(f"{path}: {len(names)} files, no tests, runs or notebooks, py.typed present")


if __name__ == "__main__":
    main(sys.argv[1])
