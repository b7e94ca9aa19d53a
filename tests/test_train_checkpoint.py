"""Tests for jaxeff.train.checkpoint: round trip, best-by-metric, crash and resume, sharding."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxeff.train import (
    Checkpointer,
    abstract_like,
    create_train_state,
    make_mesh,
    replicate,
)


class Net(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(8, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(self.bn(self.fc(x)))


def fresh_state(seed=0):
    return create_train_state(Net(nnx.Rngs(seed, dropout=seed + 1)), optax.adam(1e-3))[1]


def state_at(step, seed=0):
    """A state whose float arrays all equal ``step`` (so each saved step is recognisable)."""
    state = fresh_state(seed)
    filled = jax.tree.map(
        lambda x: x * 0 + step if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x,
        state,
    )
    return filled.replace(step=jax.numpy.asarray(step, jax.numpy.int32))


def assert_tree_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_restore_round_trip(tmp_path):
    state = fresh_state(0)
    state = state.replace(step=state.step + 5)
    extra = {"data": {"epoch": 2, "index": 417}, "seed": 3, "config": {"lr": 2e-4}}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step is None
        ckpt.save(5, state, extra=extra)
        ckpt.wait_until_finished()
        assert ckpt.latest_step == 5
        restored, restored_extra = ckpt.restore(fresh_state(seed=9))
    assert_tree_equal(restored, state)
    assert restored_extra == extra
    # The RNG key of the dropout layer survives as a typed key.
    key = restored.model_state["drop"]["rngs"]["key"][...]
    assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)


def test_keeps_only_latest_and_best_by_metric(tmp_path):
    rsums = [1.0, 5.0, 3.0, 7.0, float("nan"), 2.0]
    with Checkpointer(tmp_path, best_metric="rsum", best_mode="max") as ckpt:
        saved_best = [
            ckpt.save(s, state_at(s), extra={"s": s}, metrics={"rsum": r, "loss": -r})
            for s, r in enumerate(rsums, start=1)
        ]
        ckpt.wait_until_finished()
        assert saved_best == [True, True, False, True, False, False]
        assert (ckpt.best_step, ckpt.best_value) == (4, 7.0)
        assert ckpt.latest_step == 6
    # One directory per step: the latest and the best, nothing else.
    assert sorted(os.listdir(tmp_path), key=int) == ["4", "6"]

    reopened = Checkpointer(tmp_path, best_metric="rsum", best_mode="max")
    assert (reopened.best_step, reopened.best_value) == (4, 7.0)
    best, extra = reopened.restore(fresh_state(), which="best")
    assert int(best.step) == 4 and extra == {"s": 4}
    np.testing.assert_array_equal(best.params["fc"]["kernel"][...], 4.0)
    latest, extra = reopened.restore(fresh_state())
    assert int(latest.step) == 6 and extra == {"s": 6}
    assert not reopened.save(7, state_at(7), metrics={"rsum": 6.5})  # 6.5 < 7: not best
    reopened.close()


def test_keep_two_best_in_min_mode(tmp_path):
    losses = [0.9, 0.5, 0.7, 0.2, 0.8]
    with Checkpointer(
        tmp_path, best_metric="loss", best_mode="min", keep_best=2, keep_latest=2
    ) as ckpt:
        for s, v in enumerate(losses, start=1):
            ckpt.save(s, state_at(s), metrics={"loss": v})
        ckpt.wait_until_finished()
        assert ckpt.best_step == 4
        assert ckpt.best_value == 0.2
    # The two best (2, 4) and the two latest (4, 5).
    assert sorted(os.listdir(tmp_path), key=int) == ["2", "4", "5"]
    reopened = Checkpointer(tmp_path, best_metric="loss", best_mode="min", keep_best=2)
    assert (reopened.best_step, reopened.best_value) == (4, 0.2)
    reopened.close()


def test_ties_go_to_the_later_step_and_survive_reopening(tmp_path):
    with Checkpointer(tmp_path, best_metric="rsum") as ckpt:
        assert ckpt.save(1, state_at(1), metrics={"rsum": 5.0})
        assert ckpt.save(2, state_at(2), metrics={"rsum": 5.0})
        ckpt.save(3, state_at(3))  # no evaluation at this step
        ckpt.wait_until_finished()
        assert ckpt.best_step == 2
    assert sorted(os.listdir(tmp_path), key=int) == ["2", "3"]
    assert Checkpointer(tmp_path, best_metric="rsum").best_step == 2


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="best_mode"):
        Checkpointer(tmp_path, best_metric="rsum", best_mode="largest")
    with pytest.raises(ValueError, match="keep_latest"):
        Checkpointer(tmp_path, keep_latest=0)
    with Checkpointer(tmp_path, best_metric="rsum") as ckpt:
        with pytest.raises(TypeError, match="extra"):
            ckpt.save(1, state_at(1), extra={"f": object()})
        with pytest.raises(KeyError, match="rsum"):
            ckpt.save(2, state_at(2), metrics={"r1": 3.0})
        with pytest.raises(FileNotFoundError, match="best"):
            ckpt.restore(fresh_state(), which="best")
    with Checkpointer(tmp_path / "other") as ckpt:
        with pytest.raises(FileNotFoundError, match="latest"):
            ckpt.restore(fresh_state())
        with pytest.raises(ValueError, match="best_metric"):
            ckpt.restore(fresh_state(), which="best")


CRASHING_RUN = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    from test_train_checkpoint import state_at
    from jaxeff.train import Checkpointer

    ckpt = Checkpointer({directory!r})
    for step in (1, 2, 3):
        ckpt.save(step, state_at(step), extra={{"data_index": 10 * step, "seed": 42}})
    ckpt.wait_until_finished()
    ckpt.save(4, state_at(4), extra={{"data_index": 40, "seed": 42}})  # asynchronous
    os._exit(0)  # killed while step 4 may still be being written
    """
)


def test_resume_after_crash_in_fresh_process(tmp_path):
    directory = str(tmp_path / "run")
    script = CRASHING_RUN.format(tests=os.path.dirname(__file__), directory=directory)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)

    # A half-written checkpoint from a kill mid-save: orbax's uncommitted tmp directory.
    partial = os.path.join(directory, "9.orbax-checkpoint-tmp")
    os.makedirs(os.path.join(partial, "state"))
    with open(os.path.join(partial, "state", "garbage"), "w") as f:
        f.write("truncated")

    ckpt = Checkpointer(directory)
    step = ckpt.latest_step
    assert step in (3, 4)  # 4 only if its write finished before the kill
    state, extra = ckpt.restore(fresh_state(seed=5))
    assert extra == {"data_index": 10 * step, "seed": 42}
    assert int(state.step) == step
    assert_tree_equal(state, state_at(step))

    # The resumed run saves its next steps over any leftover temporary directories.
    for next_step in (4, 9):
        ckpt.save(next_step, state_at(next_step), extra={"data_index": 10 * next_step})
    ckpt.close()
    assert Checkpointer(directory).latest_step == 9
    assert sorted(os.listdir(directory)) == ["9"]  # the orphaned tmp directory is gone


FAILING_BACKGROUND_SAVE = textwrap.dedent(
    """
    import resource, signal, sys, time
    import numpy as np
    from jaxeff.train import Checkpointer, CheckpointWriteError

    ckpt = Checkpointer({directory!r})
    ckpt.save(1, {{"w": np.zeros(4, np.float32)}})
    ckpt.wait_until_finished()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full disk: writes fail, EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    big = np.random.default_rng(0).normal(size=4 << 20).astype(np.float32)  # 16 MB
    ckpt.save(2, {{"w": big}})  # returns at once; the write fails in the background
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            ckpt.check_for_errors()
        except CheckpointWriteError as e:
            print("STOPPED:", e)
            sys.exit(3)
        time.sleep(0.01)
    sys.exit(0)
    """
)


def test_failed_background_save_is_reported_by_check_for_errors(tmp_path):
    directory = str(tmp_path / "run")
    script = FAILING_BACKGROUND_SAVE.format(directory=directory)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"STOPPED: Writing a checkpoint under {directory} failed" in proc.stdout
    assert "File too large" in proc.stdout
    ckpt = Checkpointer(directory)
    assert ckpt.latest_step == 1  # the last good checkpoint stays
    state, _ = ckpt.restore({"w": np.zeros(4, np.float32)})
    np.testing.assert_array_equal(state["w"], np.zeros(4))
    ckpt.close()


def test_restore_into_sharded_target(tmp_path):
    state = state_at(3)
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(3, jax.device_put(state, jax.devices()[0]))

        mesh = make_mesh()
        replicated_target = replicate(fresh_state(), mesh)
        restored, _ = ckpt.restore(replicated_target)
        assert_tree_equal(restored, state)
        for leaf in jax.tree.leaves(restored):
            assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8

        # Shard the (8, 4) kernel's first axis over the 8 devices; restore from shapes only.
        target = abstract_like(replicated_target)
        row = NamedSharding(mesh, PartitionSpec("data"))
        kernel = target.params["fc"]["kernel"]
        target.params["fc"]["kernel"].set_value(
            jax.ShapeDtypeStruct(kernel.shape, kernel.dtype, sharding=row)
        )
        restored, _ = ckpt.restore(target)
        restored_kernel = restored.params["fc"]["kernel"][...]
        assert restored_kernel.sharding.spec == PartitionSpec("data")
        assert restored_kernel.addressable_shards[0].data.shape == (1, 4)
        assert_tree_equal(restored, state)
