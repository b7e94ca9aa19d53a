"""Attacks on a small CNN, end to end at tiny size: balls, curves, the closed form, resume.

The perturbations are checked against an independent numpy reference (the per-channel
orthonormal 2-D DFT written with ``np.fft``); a linear model in the same pipeline is
checked against its exact robust accuracy (:func:`jaxeff.robust.certified_radius`).

The tiny digits run on the 8 forced CPU devices of the test process is also run through
``python -m experiments.robust_cnn.main``: as two processes of one CPU device each (under
``experiments.launch.local``) and as one process of one device, with the same numbers,
with only process 0 writing files and no process reading one back (every file access
recorded with Python's audit hooks).
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx
from test_data_classification import write_tiny_image_dataset

from experiments.robust_cnn import models, train
from experiments.robust_cnn.configs import cifar10, default, linear
from jaxeff import robust
from jaxeff import train as jt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"
EPS = {"linf": (0.0, 0.03, 0.1), "l2": (0.0, 0.3, 1.0), "fourier_inf": (0.0, 0.03, 0.1)}
#: The tiny digits run: config fields as ``override`` keywords.
TINY = dict(
    data__max_examples=200,
    model__features=(8, 16),
    model__dense=32,
    batch_size=32,
    learning_rate=0.01,
    num_steps=24,
    log_every=8,
    checkpoint_every=12,
    eval__num_examples=40,
    eval__save_examples=40,
    attack__steps=3,
    attack__step_size=0.5,
    attack__batch_size=40,
    attack__spectrum_eps=0.1,
    **{f"attack__eps__{name}": grid for name, grid in EPS.items()},
)


def override(config, **fields):
    for key, value in fields.items():
        node = config
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def tiny_digits(**fields):
    return override(default.get_config(), **{**TINY, **fields})


def tiny_flags():
    """The tiny digits run as ``--config.<field>=<value>`` overrides of configs/default.py."""
    return [f"--config.{key.replace('__', '.')}={value!r}" for key, value in TINY.items()]


def dft_modulus(delta):
    """``|F δ|`` per example and channel, the orthonormal 2-D DFT over (H, W) by numpy."""
    h, w = delta.shape[-3:-1]
    return np.abs(np.fft.fft2(delta.astype(np.float64), axes=(-3, -2))) / np.sqrt(h * w)


def perturbation_size(delta, name):
    flat = delta.reshape(*delta.shape[:-3], -1).astype(np.float64)
    if name == "linf":
        return np.abs(flat).max(axis=-1)
    if name == "l2":
        return np.sqrt(np.square(flat).sum(axis=-1))
    return dft_modulus(delta).reshape(*delta.shape[:-3], -1).max(axis=-1)


def trained_model(config, params):
    """The experiment's model with the returned parameters, rebuilt here."""
    data = train.load_data(config)
    graphdef, _, model_state = nnx.split(train.build_model(config, data), nnx.Param, ...)
    return nnx.merge(graphdef, params, model_state), data


def strictly_correct(logits, y):
    logits = np.asarray(logits)
    true = logits[np.arange(len(y)), y]
    other = np.where(np.arange(logits.shape[1]) == y[:, None], -np.inf, logits).max(axis=1)
    return true > other, true - other


def check_attacks(workdir, results, *, clip=True):
    """The per-norm invariants of a finished run, from its files."""
    arrays = np.load(os.path.join(workdir, train.ATTACKS))
    image = arrays["image"]
    clean = results["attacked_clean_accuracy"]
    assert results["num_attacked"] == len(arrays["label"]) == len(image)
    for name, curve in results["attacks"].items():
        robust_accuracy = np.asarray(curve["robust_accuracy"])
        success = arrays[f"{name}/success"]
        np.testing.assert_array_equal(arrays[f"{name}/eps"], curve["eps"])
        # At ε = 0 the attack cannot move: exactly the clean accuracy of these points.
        assert curve["eps"][0] == 0.0 and robust_accuracy[0] == pytest.approx(clean, abs=1e-12)
        assert np.all(np.diff(robust_accuracy) <= 0) and np.all(robust_accuracy <= clean)
        broken = np.logical_or.accumulate(success, axis=0)
        np.testing.assert_allclose(robust_accuracy, 1 - broken.mean(axis=1))
        np.testing.assert_allclose(curve["attack_accuracy"], 1 - success.mean(axis=1))
        for eps, delta in zip(curve["eps"], arrays[f"{name}/delta"], strict=True):
            size = perturbation_size(delta, name)
            assert np.all(size <= eps * (1 + 1e-5) + 1e-6), (name, eps, size.max())
            if clip:
                assert np.all(image + delta >= -1e-6) and np.all(image + delta <= 1 + 1e-6)
    return arrays


# ----------------------------------------------------------------------------- digits CNN


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("robust_cnn_digits"))
    return workdir, train.train_and_evaluate(tiny_digits(), workdir)


def test_digits_run_attacks_stay_in_their_balls_and_lower_accuracy(digits_run):
    workdir, results = digits_run
    for name in (train.RESULTS, train.ATTACKS, "config.json", "metrics.jsonl"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    for name in (train.ROBUST_PLOT, train.SPECTRUM_PLOT):
        with open(os.path.join(workdir, name), "rb") as f:
            assert f.read(8) == PNG, name
    saved = json.load(open(os.path.join(workdir, train.RESULTS)))
    assert saved["attacks"] == results["attacks"]
    arrays = check_attacks(workdir, results)

    # Clean accuracy recomputed from the returned parameters, on every test image.
    config = tiny_digits()
    model, data = trained_model(config, results["params"])
    x, y = data.test["image"], data.test["label"]
    correct, _ = strictly_correct(model(x), y)
    assert results["clean_accuracy"] == pytest.approx(correct.mean())
    assert results["attacked_clean_accuracy"] == pytest.approx(correct[:40].mean())
    assert results["clean_accuracy"] > 0.3  # chance is 0.1
    np.testing.assert_array_equal(arrays["image"], x[:40])

    image = arrays["image"]
    for name, curve in results["attacks"].items():
        # The largest radius breaks points in every norm, and each success is a real one:
        # the saved point is misclassified (points within rounding of a tie left out).
        assert curve["robust_accuracy"][-1] < results["attacked_clean_accuracy"] - 0.05, name
        right, margin = strictly_correct(model(image + arrays[f"{name}/delta"][-1]), y[:40])
        clear = np.abs(margin) > 1e-4
        np.testing.assert_array_equal(~right[clear], arrays[f"{name}/success"][-1][clear])
        # Points the attack broke used most of the ball (no collapse on saturated pixels).
        size = perturbation_size(arrays[f"{name}/delta"][-1], name)
        assert np.median(size) > 0.5 * curve["eps"][-1], (name, size)

    # The spectra: recomputed from the saved perturbations (all points are saved); the
    # Fourier-L∞ perturbations spread over the frequencies, the L∞ ones concentrate.
    for name in train.SPECTRUM_NORMS:
        spectrum = np.fft.fftshift(dft_modulus(arrays[f"{name}/delta"][-1]).mean(axis=(0, 3)))
        np.testing.assert_allclose(arrays[f"{name}/spectrum"], spectrum, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(results["spectrum"][name]["mean_abs"], spectrum, rtol=1e-5)
        assert results["spectrum"][name]["eps"] == 0.1
    shares = {name: results["spectrum"][name]["top_share"] for name in train.SPECTRUM_NORMS}
    assert shares["fourier_inf"] < shares["linf"], shares

    metrics = jt.read_metrics(workdir)
    assert [m["step"] for m in metrics if "loss" in m] == [8, 16, 24]
    final = metrics[-1]
    assert final["clean_accuracy"] == pytest.approx(results["clean_accuracy"])
    assert final["robust_accuracy/fourier_inf/0.1"] == pytest.approx(
        results["attacks"]["fourier_inf"]["robust_accuracy"][-1]
    )
    assert any(f.startswith("events.out") for f in os.listdir(os.path.join(workdir, "tensorboard")))


def test_rerun_skips_training_and_resumed_training_matches(digits_run, tmp_path):
    workdir, first = digits_run
    losses_before = [m for m in jt.read_metrics(workdir) if "loss" in m]
    programs = train.attack_batch._cache_size()
    again = train.train_and_evaluate(tiny_digits(), workdir)
    assert first["trained_steps"] == 24 and again["trained_steps"] == 0
    assert [m for m in jt.read_metrics(workdir) if "loss" in m] == losses_before
    assert again["attacks"] == first["attacks"]  # same weights, same keys: same attack
    assert train.attack_batch._cache_size() == programs  # restored weights: no recompile
    # A model trained longer than the config asks is refused, not silently evaluated.
    with pytest.raises(ValueError, match="trained for 24 steps"):
        train.train_and_evaluate(tiny_digits(num_steps=12), workdir)
    # Half the steps, then a rerun with all of them: the same weights bit for bit.
    short = dict(attack__norms=("linf",))
    half = train.train_and_evaluate(tiny_digits(num_steps=12, **short), str(tmp_path))
    resumed = train.train_and_evaluate(tiny_digits(**short), str(tmp_path))
    assert half["trained_steps"] == 12 and resumed["trained_steps"] == 12
    for a, b in zip(
        jax.tree.leaves(resumed["params"]), jax.tree.leaves(first["params"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert resumed["attacks"]["linf"] == first["attacks"]["linf"]


# ----------------------------------------------------------------------------- many processes

#: ``python -c`` program run by each launched process: ``python -m
#: experiments.robust_cnn.main`` with the flags that follow the repository root and a log
#: directory, recording every file opened, renamed, made or removed under the workdir
#: (Python's audit hooks) into ``<log dir>/files<process id>.json`` at exit.
AUDITED_MAIN = textwrap.dedent(
    """
    import atexit, json, os, runpy, sys
    root, log_dir = sys.argv.pop(1), sys.argv.pop(1)
    sys.path.insert(0, root)
    workdir = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir=")][0]
    prefix = os.path.abspath(workdir) + os.sep
    accesses = set()

    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path, mode, flags = args
            write = (mode is not None and any(c in mode for c in "wax+")) or (
                mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
            path, write = args[0], True
        else:
            return
        path = os.path.abspath(os.fsdecode(path))
        if path.startswith(prefix):
            accesses.add(("write" if write else "read", path[len(prefix):]))

    def save():
        name = "files%s.json" % os.environ["JAXEFF_PROCESS_ID"]
        with open(os.path.join(log_dir, name), "w") as f:
            json.dump(sorted(accesses), f)

    atexit.register(save)
    sys.addaudithook(hook)
    runpy.run_module("experiments.robust_cnn.main", run_name="__main__", alter_sys=True)
    """
)
#: Files of the workdir that process 0 writes for itself.
OWN_FILES = (
    "config.json",
    "metrics.jsonl",
    train.RESULTS,
    train.ATTACKS,
    train.ROBUST_PLOT,
    train.SPECTRUM_PLOT,
)


@pytest.fixture(scope="module")
def launched_runs(tmp_path_factory):
    """``{"two_processes": (workdir, logs), "one_device": (workdir, logs)}``: the tiny digits
    run launched as 2 processes of 1 CPU device, and meanwhile as 1 process of 1 device."""
    from experiments.launch import local

    root = tmp_path_factory.mktemp("robust_cnn_launched")
    config = os.path.join(ROOT, "experiments/robust_cnn/configs/default.py")

    def command(name):
        workdir, logs = root / name, root / f"{name}_logs"
        logs.mkdir()
        flags = [f"--config={config}", f"--workdir={workdir}", *tiny_flags()]
        return [sys.executable, "-c", AUDITED_MAIN, ROOT, str(logs), *flags], workdir, logs

    one, one_workdir, one_logs = command("one_device")
    env = local.process_env(0, 1, local.free_port(), cpu_devices=1)  # a single process
    with open(one_logs / "process0.out", "w") as out, open(one_logs / "process0.err", "w") as err:
        single = subprocess.Popen(one, env=env, stdout=out, stderr=err)
    try:
        two, two_workdir, two_logs = command("two_processes")
        outcome = local.launch(two, num_processes=2, cpu_devices=1, log_dir=str(two_logs))
        errors = [(two_logs / f"process{i}.err").read_text()[-3000:] for i in range(2)]
        assert outcome == ([0, 0], None), errors
        single.wait(timeout=300)
    finally:
        if single.poll() is None:
            single.kill()
        single.wait()
    assert single.returncode == 0, (one_logs / "process0.err").read_text()[-3000:]
    return {"two_processes": (two_workdir, two_logs), "one_device": (one_workdir, one_logs)}


def assert_numbers_close(got, want, where="results"):
    """Nested dicts and lists with the same keys, lengths and strings, numbers within
    float rounding."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            assert_numbers_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_numbers_close(a, b, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9), where
    else:
        assert got == want, where


def assert_same_run(workdir, want_run):
    """The results, saved attacks and training curve of a run of the tiny digits config
    equal those of ``want_run`` (``digits_run``: its workdir and what it returned)."""
    want_workdir, results = want_run
    got = json.load(open(os.path.join(workdir, train.RESULTS)))
    want = {k: v for k, v in results.items() if k not in ("params", "preempted", "times")}
    want["spectrum"] = {
        name: {k: v for k, v in spectrum.items() if k != "mean_abs"}
        for name, spectrum in results["spectrum"].items()
    }
    del got["times"]
    assert_numbers_close(got, json.loads(json.dumps(want)))
    saved, expected = (np.load(os.path.join(w, train.ATTACKS)) for w in (workdir, want_workdir))
    assert sorted(saved.files) == sorted(expected.files)
    for name in expected.files:
        if expected[name].dtype.kind in "biu":  # successes, indices, labels: exactly
            np.testing.assert_array_equal(saved[name], expected[name], err_msg=name)
        else:  # perturbations and spectra: up to float rounding
            np.testing.assert_allclose(saved[name], expected[name], rtol=1e-5, atol=1e-6)
    # Every point's attack moved it, so the perturbations compared are not all zero.
    assert np.all(np.abs(expected["linf/delta"][-1]).max(axis=(1, 2, 3)) > 0.05)
    losses, expected_losses = (
        [m for m in jt.read_metrics(w) if "loss" in m] for w in (workdir, want_workdir)
    )
    assert_numbers_close(losses, expected_losses, "metrics")


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_two_processes_give_the_one_process_run_and_only_process_zero_writes(
    digits_run, launched_runs
):
    """Data-parallel training over both processes, the attacks split by rows and gathered:
    the numbers of the single process (on 8 devices), written by process 0 alone."""
    workdir, logs = launched_runs["two_processes"]
    # The flags gave the tiny config.
    assert json.load(open(workdir / "config.json")) == json.loads(jt.config_to_json(tiny_digits()))
    assert_same_run(str(workdir), digits_run)
    printed = [(logs / f"process{i}.out").read_text() for i in range(2)]
    assert "robust accuracy" in printed[0] and "clean accuracy" in printed[0]
    assert "clean accuracy" not in printed[1]  # process 0 alone prints the table
    zero, one = ({tuple(a) for a in json.load(open(logs / f"files{i}.json"))} for i in range(2))
    written = {path for kind, path in zero if kind == "write"}
    for name in OWN_FILES:
        assert name in written or any(p.startswith(f"{name}.tmp") for p in written), name
    assert any(p.startswith("tensorboard") for p in written)
    # Process 1 writes nothing but its part of the checkpoints (orbax's multi-host protocol).
    assert {p for kind, p in one if kind == "write" and not p.startswith("checkpoints")} == set()
    for accesses in (zero, one):  # no process reads back a config, result or metric
        read = {p for kind, p in accesses if kind == "read"}
        assert not read & set(OWN_FILES), read
        assert not any(p.startswith("tensorboard") for p in read), read


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_eight_devices_give_the_one_device_run(digits_run, launched_runs):
    """The in-process run trains on 8 devices and attacks 5 rows per device; one device
    does all of it: the same numbers."""
    assert len(train._train_devices(TINY["batch_size"])) == jax.device_count() == 8
    assert train.split_rows(40, TINY["attack__batch_size"]).local_batch == 40
    workdir, logs = launched_runs["one_device"]
    assert_same_run(str(workdir), digits_run)
    assert json.load(open(logs / "files0.json"))  # the audited main did run


@pytest.mark.parametrize("num_rows, batch_size, devices", [(10, 4, 1), (9, 7, 2), (5, 100, 3)])
def test_split_rows_gives_every_row_once_in_the_order_gather_rows_restores(
    num_rows, batch_size, devices
):
    for processes in (1, 2, 3):
        splits = [
            train.split_rows(
                num_rows,
                batch_size,
                process_index=p,
                process_count=processes,
                local_devices=devices,
            )
            for p in range(processes)
        ]
        s = splits[0].local_batch
        # Whole devices, and the smallest global batch that holds min(batch_size, N) rows.
        assert s % devices == 0 and processes * s >= min(batch_size, num_rows)
        assert processes * (s - devices) < min(batch_size, num_rows)
        # gather_rows's order: batch by batch, process by process, padding dropped.
        order = []
        for t in range(splits[0].num_batches):
            for split in splits:
                rows, mask = list(split.batches())[t]
                assert len(rows) == s and np.all(rows[~mask] == 0)
                order += rows[mask].tolist()
        assert order == list(range(num_rows))
    with pytest.raises(ValueError, match="process_index"):
        train.split_rows(4, 2, process_index=2, process_count=2)


# ----------------------------------------------------------------------------- linear


def test_linear_model_attacks_reach_the_closed_form(tmp_path):
    config = linear.get_config()
    override(
        config,
        data__max_examples=300,
        num_steps=60,
        learning_rate=0.05,
        log_every=30,
        checkpoint_every=60,
        eval__num_examples=24,
        eval__save_examples=24,
        attack__steps=6,
        attack__step_size=1.0,
        attack__batch_size=24,
        attack__spectrum_eps=0.1,
    )
    for name, grid in {**EPS, "l2": (0.0, 0.25, 0.5)}.items():
        config.attack.eps[name] = grid
    results = train.train_and_evaluate(config, str(tmp_path))
    model, data = trained_model(config, results["params"])
    w, b = model.weights()
    x, y = models.as_float(data.test["image"][:24]), data.test["label"][:24]
    arrays = check_attacks(str(tmp_path), results, clip=False)
    for name, curve in results["attacks"].items():
        p = train.NORMS[name]
        radius = np.asarray(robust.certified_radius(w, x, y, p=p, b=b))
        eps = np.asarray(curve["eps"])[:, None]
        exact = radius[None, :] <= eps  # broken under the worst case
        np.testing.assert_allclose(curve["closed_form"], 1 - exact.mean(axis=1), atol=1e-12)
        # Per point, the attack succeeds exactly where the closed form says it can, away
        # from the boundary (a point whose certified radius is within 0.1% of ε).
        clear = np.abs(radius[None, :] - eps) > 1e-3 * np.maximum(eps, 1e-9)
        assert clear.mean() > 0.95, name
        np.testing.assert_array_equal(arrays[f"{name}/success"][clear], exact[clear], err_msg=name)
        assert 0 < exact[-1].mean() < 1, name  # the largest radius breaks some points, not all
        if clear.all():
            assert curve["robust_accuracy"] == pytest.approx(curve["closed_form"], abs=1e-6)


# ----------------------------------------------------------------------------- CIFAR-10


def test_cifar10_from_tfds_files(tmp_path):
    written = write_tiny_image_dataset("cifar10", tmp_path / "tfds", {"train": 16, "test": 8})
    config = cifar10.get_config()
    eps = (0.0, 8 / 255, 32 / 255)
    override(
        config,
        data__data_dir=str(tmp_path / "tfds"),
        model__features=(4, 8, 8),
        model__dense=16,
        batch_size=8,
        num_steps=4,
        log_every=2,
        checkpoint_every=4,
        eval__num_examples=0,
        eval__save_examples=8,
        attack__norms=("fourier_inf",),
        attack__steps=2,
        attack__step_size=0.5,
        attack__batch_size=8,
        attack__eps__fourier_inf=eps,
    )
    workdir = str(tmp_path / "run")
    results = train.train_and_evaluate(config, workdir)
    arrays = check_attacks(workdir, results)
    images, _ = written["test"]
    stored = np.round(arrays["image"] * 255).astype(np.uint8)
    order = np.argsort(stored[:, 0, 0, 0])  # the first pixel is the row number
    np.testing.assert_array_equal(stored[order], images)
    assert results["num_attacked"] == 8 and arrays["fourier_inf/delta"].shape == (3, 8, 32, 32, 3)
    # Every channel's own spectrum is bounded (the ball is per channel, not of the sum).
    modulus = dft_modulus(arrays["fourier_inf/delta"][-1])
    assert modulus.max() <= 32 / 255 * (1 + 1e-5)
    assert np.all(modulus.max(axis=(1, 2)) > 0.5 * 32 / 255)


# ----------------------------------------------------------------------------- units, errors


def test_cumulative_success_and_top_share():
    success = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]], bool)
    expected = np.array([[0, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]], bool)
    np.testing.assert_array_equal(train.cumulative_success(success), expected)
    with pytest.raises(ValueError, match="success"):
        train.cumulative_success(success[0])
    assert train.top_share(np.ones((8, 8))) == pytest.approx(6 / 64)  # round(0.1 · 64) = 6
    peaked = np.zeros((8, 8))
    peaked[0, 0], peaked[1, 1] = 3.0, 1.0
    assert train.top_share(peaked) == pytest.approx(1.0)
    assert train.top_share(peaked, fraction=1 / 64) == pytest.approx(0.9)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(attack__norms=("linf", "fourier_2")), "config.attack.norms"),
        (dict(attack__norms=("linf", "linf")), "config.attack.norms"),
        (dict(attack__eps__linf=(0.0, 0.2, 0.1)), "config.attack.eps.linf"),
        (dict(attack__eps__linf=(-0.1, 0.2)), "config.attack.eps.linf"),
        (dict(attack__spectrum_eps=0.05), "config.attack.spectrum_eps"),
        (dict(attack__step_size=-1.0), "config.attack.step_size"),
        (dict(attack__steps=-1), "config.attack.steps"),
        (dict(attack__restarts=2, attack__random_start=False), "random_start"),
        (dict(attack__multi_targeted=True), "config.attack.loss='margin'"),
        (dict(attack__loss="hinge"), "config.attack.loss"),
        (dict(data__name="svhn"), "config.data.name"),
        (dict(data__name="cifar10"), "config.data.data_dir"),
        (dict(model__name="resnet"), "config.model.name"),
        (dict(model__features=(8, 0)), "config.model.features"),
        (dict(batch_size=0), "config.batch_size"),
        (dict(learning_rate=float("nan")), "config.learning_rate"),
    ],
)
def test_bad_config_is_refused_by_field(fields, match, tmp_path):
    with pytest.raises(ValueError, match=re.escape(match)):
        train.train_and_evaluate(tiny_digits(**fields), str(tmp_path))
    assert not os.listdir(tmp_path)  # refused before anything is written


def test_missing_eps_grid_and_bad_image_size_are_refused(tmp_path):
    config = tiny_digits(attack__norms=("linf", "l1"))
    del config.attack.eps["l1"]
    with pytest.raises(ValueError, match=r"config\.attack\.eps\.l1"):
        train.validate_config(config)
    with pytest.raises(ValueError, match=r"config\.model\.features"):
        train.train_and_evaluate(tiny_digits(model__features=(4, 4, 4, 4)), str(tmp_path))
