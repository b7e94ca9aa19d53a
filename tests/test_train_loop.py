"""A whole big_vision-style train loop on 8 devices: a killed run resumes to the same result."""

import jax
import numpy as np
import optax
from _train_models import MLP, mse_loss
from flax import nnx

from jaxeff import train as jt


def batches(start):
    """A deterministic input stream that can start at any position (its checkpoint state)."""
    position = start
    while True:
        rng = np.random.default_rng(position)
        yield (
            position,
            {
                "x": rng.normal(size=(16, 3)).astype(np.float32),
                "y": rng.normal(size=(16, 2)).astype(np.float32),
            },
        )
        position += 1


def train(workdir, num_steps, *, stop_after=None):
    # Mesh, model, optimizer and sharding.
    mesh = jt.make_mesh()
    sched = optax.piecewise_constant_schedule(1e-2, {4: 0.1})
    tx = optax.chain(optax.clip_by_global_norm(2.0), optax.adam(sched))
    graphdef, state = jt.create_train_state(MLP(nnx.Rngs(0, dropout=1), dropout=0.2), tx)
    state = jt.replicate(state, mesh)
    step_fn = jt.make_train_step(
        graphdef,
        mse_loss,
        tx,
        state_sharding=jt.replicated_sharding(mesh),
        batch_sharding=jt.data_sharding(mesh),
    )
    # Checkpoint: resume from the latest one if there is one.
    ckpt = jt.Checkpointer(workdir / "ckpt", best_metric="mse", best_mode="min")
    start, extra = 0, {"data": 0}
    if ckpt.latest_step is not None:
        state, extra = ckpt.restore(state)
        start = int(state.step)
    writer = jt.MetricWriter(workdir)
    # Loop.
    for step, (position, batch) in zip(
        range(start, num_steps), batches(extra["data"]), strict=False
    ):
        hparams = {"weight": min(1.0, 0.5 + 0.1 * step)}
        state, metrics = step_fn(state, jt.shard_batch(batch, mesh), hparams)
        jt.check_finite(metrics, step)
        writer.write(step + 1, metrics)
        ckpt.save(step + 1, state, extra={"data": position + 1}, metrics=metrics)
        if stop_after is not None and step + 1 == stop_after:
            break  # "preempted"
    writer.close()
    ckpt.close()
    return state


def test_killed_run_resumes_to_the_same_result(tmp_path):
    straight = train(tmp_path / "a", 6)
    train(tmp_path / "b", 6, stop_after=3)
    resumed = train(tmp_path / "b", 6)
    assert int(resumed.step) == int(straight.step) == 6
    for x, y in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)
    rows_a, rows_b = jt.read_metrics(tmp_path / "a"), jt.read_metrics(tmp_path / "b")
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([r["loss"] for r in rows_b], [r["loss"] for r in rows_a], rtol=1e-6)
    best = int(np.argmin([r["mse"] for r in rows_a])) + 1
    assert (
        jt.Checkpointer(tmp_path / "b" / "ckpt", best_metric="mse", best_mode="min").best_step
        == best
    )
