"""The DP-SGD experiment end to end at tiny size: ε, accuracy, records, plot, resume.

ε is checked against dp-accounting's PLD accountant called here on the event built here;
one step against a reference that clips ``vmap(grad)``'s per-example gradients by hand;
the per-evaluation counts against a sampler of our own; the resumed runs (half the steps
then all, and a preemption between two evaluations) against the uninterrupted one, bit
for bit.
"""

import json
import os
import re
import subprocess
import sys

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.dp import train
from experiments.dp.configs import cnn, default, quick
from jaxeff import privacy
from jaxeff import train as jt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"
SIGMAS = (0.6, 1.0, 2.0)
RUNS = ("sigma_0.6", "sigma_1", "sigma_2", "non_private", "clip_only")


def override(config, **fields):
    for key, value in fields.items():
        node = config
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def tiny(**fields):
    return override(quick.get_config(), **fields)


def pld_epsilon(sigma, q, steps, delta=1e-5):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    return dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(delta)


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for name in a:
        for x, y in zip(jax.tree.leaves(a[name]), jax.tree.leaves(b[name]), strict=True):
            np.testing.assert_array_equal(x, y, err_msg=name)


def comparable(results):
    """The results without timings, parameters and the steps trained by this call."""
    drop = ("times", "params", "trained_steps", "preempted")
    return {k: v for k, v in results.items() if k not in drop}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("dp_quick"))
    results = train.train_and_evaluate(tiny(), workdir)
    return workdir, results, train.train_step._cache_size()


# ----------------------------------------------------------------------------- the quick run


def test_epsilon_is_dp_accountings_and_falls_with_sigma(quick_run):
    _, results, _ = quick_run
    num_train = results["num_train"]
    q = 64 / num_train
    assert num_train == 1438 and results["sampling_rate"] == q
    assert [row["noise_multiplier"] for row in results["private"]] == list(SIGMAS)
    finals = []
    for row in results["private"]:
        # The accountant's own answer for the event of the run, computed here.
        assert row["epsilon"] == pytest.approx(pld_epsilon(row["noise_multiplier"], q, 60), 1e-9)
        curve = results["curves"][row["run"]]
        assert [r["step"] for r in curve] == [30, 60]
        assert row["epsilon"] == curve[-1]["epsilon"]
        epsilons = [r["epsilon"] for r in curve]
        assert all(0 < a < b for a, b in zip(epsilons, epsilons[1:], strict=False)), epsilons
        finals.append(row["epsilon"])
    assert finals[0] > finals[1] > finals[2] > 0, finals
    sigma_2 = results["curves"]["sigma_2"][0]["epsilon"]
    assert sigma_2 == pytest.approx(pld_epsilon(2.0, q, 30), rel=1e-9)


def test_accuracy_records_and_plot(quick_run):
    workdir, results, programs = quick_run
    assert set(results["curves"]) == set(RUNS)
    # Above chance (0.1) for every run; the plain gradient, neither clipped nor noised,
    # is the best (measured 0.94 against 0.80 to 0.85).
    accuracies = {row["run"]: row["test_accuracy"] for row in results["private"]}
    accuracies.update({k: v["test_accuracy"] for k, v in results["baselines"].items()})
    assert all(a > 0.5 for a in accuracies.values()), accuracies
    assert accuracies["non_private"] > max(v for k, v in accuracies.items() if k != "non_private")

    # The counts of each evaluation, against the draws of a sampler built here.
    sampler = privacy.PoissonSampler(1438, 64 / 1438, results["batch_size"], seed=0)
    drawn = np.array([sampler.num_drawn(t) for t in range(60)])
    assert drawn.max() <= results["batch_size"]  # padded_batch_size: no overflow here
    for name, curve in results["curves"].items():
        assert [r["examples"] for r in curve] == [drawn[:30].sum(), drawn[30:].sum()], name
        for r in curve:
            assert r["non_finite"] == 0 and r["overflow"] == 0 and r["overflowed"] == 0
            assert np.isfinite(r["train_loss"]) and r["train_loss"] > 0
            if name == "non_private":
                assert r["clipped_fraction"] == 0.0 and "epsilon" not in r
            else:
                assert 0.0 < r["clipped_fraction"] <= 1.0, (name, r)
        assert curve[-1]["test_loss"] < curve[0]["test_loss"], name

    # Files: results.json holds the returned numbers; each run's JSON lines hold its
    # records (plus the wall-clock time), next to its TensorBoard events; the plot is a PNG.
    saved = json.load(open(os.path.join(workdir, train.RESULTS)))
    assert {k: v for k, v in saved.items() if k != "times"} == comparable(results)
    for name, curve in results["curves"].items():
        run_dir = os.path.join(workdir, train.RUNS_DIR, name)
        lines = jt.read_metrics(run_dir)
        assert [{k: v for k, v in line.items() if k != "time"} for line in lines] == curve
        assert any(
            f.startswith("events.out") for f in os.listdir(os.path.join(run_dir, "tensorboard"))
        )
    with open(os.path.join(workdir, train.PLOT), "rb") as f:
        assert f.read(8) == PNG
    assert os.path.exists(os.path.join(workdir, "config.json"))
    # One program for every σ and the clip-only run, one for the plain gradient.
    assert programs == 2


def test_one_step_is_the_clipped_noisy_mean_of_the_reference():
    """``train_step`` against ``vmap(grad)`` clipped by hand, plus the privatizer's noise
    (the same key), divided by ``qN``, then the first momentum-SGD step ``-η g``."""
    config = tiny()
    data = train.load_data(config)
    model = train.build_model(config)
    images, labels = data["train"]["image"], data["train"]["label"]
    params = model.init(jax.random.key(0), images[:1])["params"]
    q, num_train = 64 / 1438, 1438
    sampler = privacy.PoissonSampler(num_train, q, 104, seed=3)
    sample = sampler.batch(0)
    batch = {"image": images[sample.indices], "label": labels[sample.indices]}
    real = sample.weights == 1
    assert 0 < real.sum() < 104

    def one_loss(p, x, y):
        return train.example_losses(model, p, {"image": x[None], "label": y[None]})[0]

    per_example = jax.vmap(jax.grad(one_loss), in_axes=(None, 0, 0))(
        params, batch["image"], batch["label"]
    )
    leaves = [np.asarray(g, np.float64).reshape(104, -1) for g in jax.tree.leaves(per_example)]
    norms = np.sqrt(sum(np.sum(g**2, 1) for g in leaves))
    clip = float(np.median(norms[real]))  # some examples clipped, some not
    assert (norms[real] > clip * 1.01).any() and (norms[real] < clip * 0.99).any()
    scale = np.where(real, np.minimum(1.0, clip / norms), 0.0) / (q * num_train)
    clipped = jax.tree.map(lambda g: np.einsum("b...,b->...", np.asarray(g), scale), per_example)
    plain = jax.tree.map(
        lambda g: np.einsum("b...,b->...", np.asarray(g), real / (q * num_train)), per_example
    )

    common = dict(
        model=model,
        normalize_by=q * num_train,
        method="book-keeping",
        optimizer="sgd",
        learning_rate=0.1,
        momentum=0.9,
    )
    key = jax.random.key(7)
    for spec, sigma, mean in (
        (train.StepSpec(l2_clip_norm=clip, **common), 2.0, clipped),
        (train.StepSpec(l2_clip_norm=clip, **common), 0.0, clipped),
        (train.StepSpec(l2_clip_norm=None, **common), 0.0, plain),
    ):
        stddev = sigma * clip / (q * num_train)
        tx = train.make_optimizer(spec, stddev, key)
        opt_state = tx.init(params)
        # The privatizer's noise for this state: what it adds to a zero gradient.
        noise, _ = tx.update(jax.tree.map(jnp.zeros_like, params), opt_state, params)
        noise = jax.tree.map(lambda u: -np.asarray(u) / 0.1, noise)  # undo -η
        expected = jax.tree.map(lambda p, g, z: np.asarray(p) - 0.1 * (g + z), params, mean, noise)
        copies = jax.tree.map(jnp.copy, (params, opt_state))
        new, _, totals, metrics = train.train_step(
            *copies, train.zero_totals(), {**batch, "weights": sample.weights},
            jnp.float32(stddev), spec=spec,
        )  # fmt: skip
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert bool(metrics["finite"]) and int(totals["examples"]) == real.sum()
        want = (real & (norms > clip)).sum() if spec.l2_clip_norm else 0
        assert int(totals["clipped"]) == want
        if sigma:
            assert max(float(np.max(np.abs(z))) for z in jax.tree.leaves(noise)) > stddev


# ----------------------------------------------------------------------------- resume


def test_resumed_runs_match_the_uninterrupted_run(quick_run, tmp_path, monkeypatch):
    workdir, first, _ = quick_run
    # Half the steps, then all of them.
    half = train.train_and_evaluate(tiny(num_steps=30), str(tmp_path / "half"))
    assert half["trained_steps"] == dict.fromkeys(RUNS, 30)
    resumed = train.train_and_evaluate(tiny(), str(tmp_path / "half"))
    assert resumed["trained_steps"] == dict.fromkeys(RUNS, 30)
    assert comparable(resumed) == comparable(first)
    assert_same_params(resumed["params"], first["params"])

    # Preempted at step 45 of the first run, between two evaluations and one step after
    # no checkpoint: the sums since the last evaluation travel in the checkpoint.
    monkeypatch.setattr(jt.PreemptionSignal, "__call__", lambda self, step: step == 45)
    stopped = train.train_and_evaluate(tiny(), str(tmp_path / "preempted"))
    assert stopped == {"preempted": True, "run": "sigma_0.6", "step": 45}
    monkeypatch.undo()
    resumed = train.train_and_evaluate(tiny(), str(tmp_path / "preempted"))
    assert resumed["trained_steps"] == {**dict.fromkeys(RUNS, 60), "sigma_0.6": 15}
    assert comparable(resumed) == comparable(first)
    assert_same_params(resumed["params"], first["params"])

    # A finished workdir: nothing trained, nothing logged again, the same results.
    lines = len(jt.read_metrics(os.path.join(workdir, train.RUNS_DIR, "sigma_1")))
    again = train.train_and_evaluate(tiny(), workdir)
    assert again["trained_steps"] == dict.fromkeys(RUNS, 0)
    assert comparable(again) == comparable(first)
    assert len(jt.read_metrics(os.path.join(workdir, train.RUNS_DIR, "sigma_1"))) == lines
    with pytest.raises(ValueError, match="trained for 60 steps"):
        train.train_and_evaluate(tiny(num_steps=30), workdir)
    with pytest.raises(ValueError, match="learning_rate"):
        train.train_and_evaluate(tiny(learning_rate=0.2), workdir)


# ----------------------------------------------------------------------------- overflow


def test_overflow_is_counted_per_evaluation(tmp_path):
    """A padded batch of the expected size overflows at about half the steps: the records
    count the drawn examples it dropped, as the sampler's own draws say."""
    config = tiny(
        batch_size=64,
        num_steps=20,
        eval_every=10,
        checkpoint_every=20,
        privacy__noise_multipliers=(2.0,),
        privacy__baselines=(),
    )
    results = train.train_and_evaluate(config, str(tmp_path))
    sampler = privacy.PoissonSampler(1438, 64 / 1438, 64, seed=0)
    drawn = np.array([sampler.num_drawn(t) for t in range(20)])
    dropped = np.maximum(drawn - 64, 0)
    assert dropped.sum() > 0
    curve = results["curves"]["sigma_2"]
    assert [r["overflow"] for r in curve] == [dropped[:10].sum(), dropped[10:].sum()]
    assert [r["overflowed"] for r in curve] == [dropped[:10].sum(), dropped.sum()]
    assert [r["examples"] for r in curve] == [
        np.minimum(drawn[:10], 64).sum(),
        np.minimum(drawn[10:], 64).sum(),
    ]
    assert results["private"][0]["overflowed"] == dropped.sum()


# ----------------------------------------------------------------------------- entry point


def test_main_prints_the_table(tmp_path):
    workdir = tmp_path / "main"
    command = [
        sys.executable, "-m", "experiments.dp.main",
        "--config=" + os.path.join(ROOT, "experiments/dp/configs/quick.py"),
        f"--workdir={workdir}", "--config.num_steps=4", "--config.eval_every=2",
        "--config.privacy.noise_multipliers=(2.0,)", "--config.privacy.baselines=()",
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    epsilon = pld_epsilon(2.0, 64 / 1438, 4)
    assert re.search(rf"sigma_2\s+2\s+{epsilon:.3f}\s+0\.\d{{4}}", done.stdout), done.stdout
    assert json.load(open(workdir / train.RESULTS))["private"][0]["epsilon"] == pytest.approx(
        epsilon, rel=1e-9
    )


# ----------------------------------------------------------------------------- config


def test_configs_validate():
    for module in (default, cnn, quick):
        train.validate_config(module.get_config())
    assert cnn.get_config().model.name == "cnn"


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(privacy__noise_multipliers=()), "config.privacy.noise_multipliers"),
        (dict(privacy__noise_multipliers=(1.0, 1.0)), "config.privacy.noise_multipliers"),
        (dict(privacy__noise_multipliers=(0.0,)), "config.privacy.noise_multipliers"),
        (dict(privacy__baselines=("public",)), "config.privacy.baselines"),
        (dict(privacy__l2_clip_norm=0.0), "config.privacy.l2_clip_norm"),
        (dict(privacy__delta=1.0), "config.privacy.delta"),
        (dict(privacy__accountant="moments"), "config.privacy.accountant"),
        (dict(privacy__method="vmap"), "config.privacy.method"),
        (dict(model__name="resnet"), "config.model.name"),
        (dict(model__name="cnn", model__features=(4, 4, 4, 4)), "config.model.features"),
        (dict(model__hidden=(0,)), "config.model.hidden"),
        (dict(optimizer="lbfgs"), "config.optimizer"),
        (dict(momentum=1.0), "config.momentum"),
        (dict(num_steps=0), "config.num_steps"),
        (dict(batch_size=-1), "config.batch_size"),
        (dict(learning_rate=float("nan")), "config.learning_rate"),
    ],
)
def test_bad_config_is_refused_by_field(fields, match, tmp_path):
    with pytest.raises(ValueError, match=re.escape(match)):
        train.train_and_evaluate(tiny(**fields), str(tmp_path))
    assert not os.listdir(tmp_path)  # refused before anything is written


def test_expected_batch_above_the_training_set_is_refused(tmp_path):
    with pytest.raises(ValueError, match="config.expected_batch_size"):
        train.train_and_evaluate(tiny(expected_batch_size=5000), str(tmp_path))
