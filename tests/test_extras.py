"""A feature whose extra is missing names the extra; the core never imports an extra.

Each case runs in a fresh interpreter with the optional package blocked: a finder ahead
of all others fails ``import name`` (and ``import name.sub``) as Python does when the
package is not installed.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

from jaxeff._extras import require

# The smoke test CI runs in an environment holding the wheel alone: its checks run here too.
_SMOKE = pathlib.Path(__file__).parent.parent / ".ci" / "smoke_core.py"
_spec = importlib.util.spec_from_file_location("smoke_core", _SMOKE)
smoke = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(smoke)
CORE_MODULES = smoke.CORE_MODULES

# (code that reaches the feature, the extra it must name, the package to block): the
# smoke test's cases, then one per other optional package and import site.
CASES = [
    *smoke.NEEDS_EXTRA,
    ("import jaxeff.data", "data", "grain"),
    ("import jaxeff.data", "data", "PIL"),
    ("import jaxeff.clustering as c; c.ImportanceSampler", "data", "grain"),
    ("import jaxeff.train", "train", "orbax"),
    ("import jaxeff.train", "train", "tqdm"),
    (
        "from jaxeff.train import MetricWriter; MetricWriter(__import__('tempfile').mkdtemp())",
        "train",
        "tensorboardX",
    ),
    ("import jaxeff.privacy", "privacy", "jax_privacy"),
    ("from jaxeff.data import load_digits; load_digits()", "experiments", "sklearn"),
]
EXTRA_PACKAGES = [
    "tensorflow_datasets",
    "array_record",
    "grain",
    "PIL",
    "cvxpy",
    "ml_collections",
    "tqdm",
    "tensorboardX",
    "matplotlib",
    "dp_accounting",
    "jax_privacy",
    "sklearn",
]


BLOCKER = """
import importlib.abc, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in BLOCKED:
            raise ModuleNotFoundError(f"No module named {top!r}", name=top)

sys.meta_path.insert(0, Blocker())
"""


@pytest.fixture(scope="module")
def outcomes():
    """``{(code, blocked): (returncode, last line of stderr)}``, one interpreter per case."""
    runs = [(code, (package,)) for code, _, package in CASES]
    core = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in CORE_MODULES)
    core += "import jaxeff.clustering, jaxeff.robust\n"
    core += "assert jaxeff.robust.steepest_descent and jaxeff.clustering.gradient_clustering\n"
    runs.append((core, tuple(EXTRA_PACKAGES)))

    def start(code, blocked):
        script = f"BLOCKED = {set(blocked)!r}\n{BLOCKER}\n{code}"
        return subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    found, width = {}, max(2, os.cpu_count() or 1)
    for i in range(0, len(runs), width):  # a few interpreters at a time
        procs = {run: start(*run) for run in runs[i : i + width]}
        for run, proc in procs.items():
            _, err = proc.communicate(timeout=600)
            lines = err.decode().strip().splitlines()
            found[run] = (proc.returncode, lines[-1] if lines else "")
    return found


@pytest.mark.parametrize(("code", "extra", "package"), CASES)
def test_missing_extra_is_named(outcomes, code, extra, package):
    returncode, last = outcomes[code, (package,)]
    assert returncode != 0, f"{code!r} ran with {package} blocked"
    assert last.startswith("ImportError:"), last  # not a bare ModuleNotFoundError
    assert f'pip install "jaxeff[{extra}]"' in last, last


def test_core_modules_import_without_any_extra(outcomes):
    (result,) = [v for (_, blocked), v in outcomes.items() if len(blocked) > 1]
    assert result[0] == 0, result[1]


def test_lazy_names_are_the_functions_not_the_modules():
    import importlib

    from jaxeff import clustering, robust
    from jaxeff.clustering import samplers
    from jaxeff.robust import max_margin

    module = importlib.import_module("jaxeff.robust.max_margin")
    assert max_margin is robust.max_margin is module.max_margin  # the function, not the module
    assert clustering.StratifiedSampler is samplers.StratifiedSampler
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        robust.nothing  # noqa: B018


def test_require_translates_only_the_missing_package(tmp_path, monkeypatch):
    # An installed package that fails on a missing dependency of its own is not the
    # extra's fault: its ModuleNotFoundError propagates unchanged.
    (tmp_path / "brokenpkg").mkdir()
    (tmp_path / "brokenpkg" / "__init__.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        require("brokenpkg", extra="data", feature="f")
    with pytest.raises(ImportError, match='f needs absentpkg_xyz, .*"jaxeff\\[robust\\]"'):
        require("absentpkg_xyz.sub", extra="robust", feature="f")
    assert require("json", extra="data", feature="f").dumps([1]) == "[1]"


@pytest.mark.parametrize(
    "check",
    [
        smoke.check_requirements,
        smoke.check_losses,
        smoke.check_per_example_stats,
        smoke.check_scan_per_example_stats,
        smoke.check_gradient_clustering,
        smoke.check_steepest_descent,
    ],
)
def test_core_smoke_checks(check):
    check()
