"""The README's code examples run as written (with fewer steps)."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).parent.parent / "README.md"


def section_code(title: str) -> str:
    text = README.read_text()
    body = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert blocks, f"no python block under {title!r}"
    return blocks[0]


def test_gradient_clustering_example_trains_a_model_jaxeff_did_not_define():
    code = section_code("Gradient clustering")
    assert "range(500)" in code
    namespace = {}
    exec(compile(code.replace("range(500)", "range(40)"), "README.md", "exec"), namespace)
    assert np.isfinite(float(namespace["loss"]))
    sampler = namespace["sampler"]
    sizes = sampler.cluster_sizes
    assert sizes.sum() == len(namespace["y"]) and (sizes > 0).sum() > 1  # clusters in use
    assert int(namespace["opt_state"][0].clusters.count) == 40


def test_dp_sgd_example_trains_privately_and_reports_its_epsilon():
    import dp_accounting

    code = section_code("Differentially private SGD")
    assert "steps = 64 / len(y), 1.0, 300" in code
    namespace = {}
    code = code.replace("steps = 64 / len(y), 1.0, 300", "steps = 64 / len(y), 1.0, 60")
    exec(compile(code, "README.md", "exec"), namespace)
    q = namespace["q"]
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.0)), 60
    )
    expected = dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(1e-5)
    assert namespace["epsilon"] == expected
    assert namespace["accuracy"] > 0.5  # chance is 0.1
    assert namespace["sampler"].next_step == 60


def test_ci_runs_the_readme_test_command_step_by_step():
    body = README.read_text().split("## Two commands\n", 1)[1].split("\n## ", 1)[0]
    install, test = re.findall(r"```bash\n(.*?)\n```", body, flags=re.S)[:2]
    assert 'pip install -e ".[experiments]"' in install  # the quickstart needs no test extras
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    steps = [s.strip() for s in test.split("&&")]
    assert steps[0] == ". .venv/bin/activate"
    for step in steps[1:]:
        assert step in ci, f"README's test step {step!r} is not a line of .ci/run"
    positions = [ci.index(step) for step in steps[1:]]
    assert positions == sorted(positions), "the steps run in another order in .ci/run"
