"""Faults caused for real on the training CLI: SIGKILL, SIGTERM, a full disk, a NaN.

Each test runs ``python -m experiments.vsepp.main`` as a child process on tiny generated
data, breaks it at chosen points, reruns the same command and checks that the finished
run is bit-identical to an uninterrupted one: the final parameters, the best step, the
test numbers, and the examples of every step (no batch skipped or repeated).
"""

import json
import os
import resource
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments.vsepp import evaluate
from jaxeff import train as jt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 24
CONFIG = """
from experiments.vsepp.configs import shapes


def get_config():
    config = shapes.get_config()
    config.data.train_families = 16
    config.data.dev_families = 4
    config.data.test_families = 4
    config.data.data_dir = {data_dir!r}
    config.batch_size = 32
    config.model.cnn_features = (8, 16)
    config.model.word_dim = 16
    config.model.embed_size = 32
    config.num_steps = {num_steps}
    config.loss.warmup_steps = 8
    config.lr_decay_fraction = 0.5
    config.learning_rate = 1e-3
    config.log_every = 1
    config.eval_every = 8
    config.checkpoint_every = 3
    return config
"""


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    path = root / "tiny.py"
    path.write_text(CONFIG.format(data_dir=str(root / "tfds"), num_steps=NUM_STEPS))
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory, monkeypatch_module):
    """Restarted runs load their compiled steps from JAX's persistent cache (as a resumed
    job on a cluster would), so each restart costs seconds, not a recompilation."""
    cache = tmp_path_factory.mktemp("jax_cache")
    monkeypatch_module.setenv("JAX_COMPILATION_CACHE_DIR", str(cache))
    monkeypatch_module.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    monkeypatch_module.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def reference(config_path, tmp_path_factory):
    """An uninterrupted run (it also prepares the shared dataset)."""
    workdir = tmp_path_factory.mktemp("reference")
    proc = start(config_path, workdir)
    assert finish(proc) == 0, output(workdir)
    return workdir


# ----------------------------------------------------------------------------------------
# Running and breaking the CLI.
# ----------------------------------------------------------------------------------------
def start(config_path, workdir, *flags, preexec_fn=None):
    os.makedirs(workdir, exist_ok=True)
    n = len([f for f in os.listdir(workdir) if f.startswith("stdout")])
    out = open(os.path.join(workdir, f"stdout.{n}"), "w")
    err = open(os.path.join(workdir, f"stderr.{n}"), "w")
    cmd = [sys.executable, "-m", "experiments.vsepp.main", f"--config={config_path}"]
    return subprocess.Popen(
        [*cmd, f"--workdir={workdir}", *flags],
        cwd=ROOT,
        stdout=out,
        stderr=err,
        preexec_fn=preexec_fn,
    )


def finish(proc, timeout=300) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        proc.kill()


def output(workdir) -> str:
    """Everything the runs in ``workdir`` printed (for assertion messages)."""
    texts = []
    for name in sorted(os.listdir(workdir)):
        if name.startswith(("stdout", "stderr")):
            with open(os.path.join(workdir, name)) as f:
                texts.append(f"--- {name}\n{f.read()[-3000:]}")
    return "\n".join(texts)


def train_rows(workdir) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    return [r for r in jt.read_metrics(path) if "loss" in r] if os.path.exists(path) else []


def logged_step(workdir) -> int:
    rows = train_rows(workdir)
    return rows[-1]["step"] if rows else 0


def dev_logged(workdir, step) -> bool:
    path = os.path.join(workdir, "metrics.jsonl")
    return os.path.exists(path) and any(
        r["step"] >= step and "dev_rsum" in r for r in jt.read_metrics(path)
    )


def saving(workdir) -> bool:
    """An orbax temporary directory exists: a checkpoint is being written right now."""
    ckpts = os.path.join(workdir, "checkpoints")
    return os.path.isdir(ckpts) and any("tmp" in name for name in os.listdir(ckpts))


def break_when(proc, condition, sig, timeout=300) -> None:
    """Sends ``sig`` to ``proc`` as soon as ``condition()`` holds; fails if it never does."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if condition():
            proc.send_signal(sig)
            return
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"the run ended (code {proc.returncode}) before the break point was reached")


# ----------------------------------------------------------------------------------------
# What a finished run must equal.
# ----------------------------------------------------------------------------------------
def final_state(workdir):
    *_, state = evaluate.load_run(str(workdir), which="latest")
    return state


def assert_same_run(workdir, reference):
    for name in ("results.json", "config.json"):
        with open(os.path.join(workdir, name)) as a, open(os.path.join(reference, name)) as b:
            assert json.load(a) == json.load(b), name
    got, want = final_state(workdir), final_state(reference)
    assert int(got.step) == int(want.step) == NUM_STEPS
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # Steps redone after a kill are logged twice; the last line is the resumed run's.
    digests = lambda d: {r["step"]: (r["data_digest"], r["loss"]) for r in train_rows(d)}
    got, want = digests(workdir), digests(reference)
    assert sorted(want) == list(range(1, NUM_STEPS + 1))
    assert got == want


# ----------------------------------------------------------------------------------------
# Tests.
# ----------------------------------------------------------------------------------------
def test_sigkill_at_many_points_resumes_bit_identical(config_path, reference, tmp_path):
    workdir = tmp_path / "killed"
    break_points = [
        lambda: logged_step(workdir) >= 2,  # before the first checkpoint
        lambda: logged_step(workdir) >= 4 and saving(workdir),  # inside a save
        lambda: dev_logged(workdir, 8),  # after the dev evaluation, before its save
        lambda: logged_step(workdir) >= 13 and saving(workdir),  # inside a later save
        lambda: logged_step(workdir) >= 22,  # between saves, near the end
    ]
    for condition in break_points:
        proc = start(config_path, workdir)
        break_when(proc, condition, signal.SIGKILL)
        assert finish(proc) == -signal.SIGKILL, output(workdir)
        # A kill never loses a committed best checkpoint.
        best = jt.Checkpointer(workdir / "checkpoints", best_metric="dev_rsum")
        if dev_logged(workdir, 8) and best.latest_step is not None and best.latest_step >= 8:
            assert best.best_step is not None
    proc = start(config_path, workdir)
    assert finish(proc) == 0, output(workdir)
    assert "Resumed from step" in output(workdir)
    assert_same_run(workdir, reference)


def test_sigterm_saves_exits_cleanly_and_resumes(config_path, reference, tmp_path):
    workdir = tmp_path / "preempted"
    for at in (5, 14):
        proc = start(config_path, workdir)
        break_when(proc, lambda at=at: logged_step(workdir) >= at, signal.SIGTERM)
        assert finish(proc) == 0, output(workdir)
        stopped = logged_step(workdir)
        assert f"Preempted at step {stopped}" in output(workdir)
        # The checkpoint is at the step the run stopped, not at an earlier save.
        assert jt.Checkpointer(workdir / "checkpoints").latest_step == stopped
    proc = start(config_path, workdir)
    assert finish(proc) == 0, output(workdir)
    assert_same_run(workdir, reference)


def _limit_file_size():
    """A file system that refuses to grow any file past 128 KB (the checkpoint's size)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (128 * 1024, 128 * 1024))


def test_failed_save_stops_at_once_and_keeps_the_last_checkpoint(config_path, reference, tmp_path):
    workdir = tmp_path / "full"
    proc = start(config_path, workdir)
    break_when(proc, lambda: logged_step(workdir) >= 4, signal.SIGTERM)
    assert finish(proc) == 0, output(workdir)
    good = jt.Checkpointer(workdir / "checkpoints").latest_step
    assert good is not None

    proc = start(config_path, workdir, preexec_fn=_limit_file_size)
    assert finish(proc) == 1, output(workdir)
    with open(workdir / "stderr.1") as f:
        err = f.read()
    assert err.count("CheckpointWriteError:") == 1, err[-3000:]
    assert f"under {workdir / 'checkpoints'} failed" in err
    # It stopped at the first save after the resume (every 3 steps), not later.
    first_save = (good // 3 + 1) * 3
    assert logged_step(workdir) < first_save + 3, output(workdir)
    assert jt.Checkpointer(workdir / "checkpoints").latest_step == good

    proc = start(config_path, workdir)
    assert finish(proc) == 0, output(workdir)
    assert_same_run(workdir, reference)


def test_divergence_is_reported_and_never_saved(config_path, tmp_path):
    workdir = tmp_path / "nan"
    # Saved every step, logged never: only the check before each save stands in the way.
    # Adam moves every weight by about the learning rate: at step 1 the entries are
    # finite but their norm overflows, which the step reports as non-finite.
    flags = ("--config.learning_rate=1e38", "--config.checkpoint_every=1", "--config.log_every=50")
    proc = start(config_path, workdir, *flags)
    assert finish(proc) == 1, output(workdir)
    with open(workdir / "stderr.0") as f:
        err = f.read()
    assert "FloatingPointError: Non-finite loss or gradients at step 1" in err
    assert "param_norm=inf" in err
    assert jt.Checkpointer(workdir / "checkpoints").latest_step is None
