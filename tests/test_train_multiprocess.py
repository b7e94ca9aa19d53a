"""A real 2-process cluster on localhost (gloo CPU collectives), 2 CPU devices each.

Checks that the data-parallel step with each process feeding its half of the batch
matches one process on the whole batch, that only process 0 writes metrics, and that a
checkpoint saved and restored by both processes round-trips.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxeff.train import create_train_state, make_train_step, read_metrics

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)

    import jax.numpy as jnp
    import optax
    from flax import nnx
    sys.path.insert(0, sys.argv[4])
    from _train_models import MLP, make_batch, mse_loss as loss_fn
    from jaxeff.train import (Checkpointer, MetricWriter, check_finite, create_train_state,
                              data_sharding, make_mesh, make_train_step, replicate,
                              replicated_sharding, shard_batch)

    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
    mesh = make_mesh()
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    graphdef, state = create_train_state(MLP(nnx.Rngs(0)), tx)
    state = replicate(state, mesh)
    step = make_train_step(graphdef, loss_fn, tx, state_sharding=replicated_sharding(mesh),
                           batch_sharding=data_sharding(mesh))
    losses = []
    with MetricWriter(workdir) as writer:
        for i in range(3):
            full = make_batch(i, n=16)
            local = {k: v[8 * process_id: 8 * (process_id + 1)] for k, v in full.items()}
            state, metrics = step(state, shard_batch(local, mesh), {"weight": 1.0 + i})
            check_finite(metrics, i)
            writer.write(i, metrics)
            losses.append(float(metrics["loss"]))

    ckpt = Checkpointer(os.path.join(workdir, "ckpt"))
    ckpt.save(3, state, extra={"seed": 0})
    ckpt.wait_until_finished()
    restored, extra = ckpt.restore(state)
    ckpt.close()
    same = jax.tree.map(lambda a, b: jnp.array_equal(a, b), restored, state)
    kernel = state.params["fc2"]["kernel"][...]
    print("RESULT " + json.dumps({
        "losses": losses,
        "kernel_sum": float(jnp.sum(kernel)),
        "restored_equal": bool(all(jax.tree.leaves(same))),
        "extra": extra,
    }), flush=True)
    """
)


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def reference(num_steps=3):
    from _train_models import MLP, make_batch, mse_loss

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    graphdef, state = create_train_state(MLP(nnx.Rngs(0)), tx)
    step = make_train_step(graphdef, mse_loss, tx)
    losses = []
    for i in range(num_steps):
        state, metrics = step(state, make_batch(i, n=16), {"weight": 1.0 + i})
        losses.append(float(metrics["loss"]))
    return losses, float(jax.numpy.sum(state.params["fc2"]["kernel"][...]))


#: Seconds the whole cluster may take: it needs 5 s on an idle 2-core machine and 13 s on a
#: busy one (mostly imports and compiles, in both processes at once); slow CI runners get
#: a wide margin on top.
CLUSTER_TIMEOUT_S = 300


def run_cluster(workdir, logdir, num_processes=2, timeout=CLUSTER_TIMEOUT_S):
    """Runs WORKER as processes 0..n-1 of one cluster; returns each process's stdout.

    The processes share ``workdir``; their stdout and stderr go to files in ``logdir``.

    Fails the test, with every process's stderr, as soon as one process exits non-zero (its
    peers would otherwise wait for it until the coordinator gives up) or when the cluster
    has not finished within ``timeout`` seconds. No process outlives the call.
    """
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    port = str(free_port())
    workdir.mkdir(parents=True, exist_ok=True)
    logdir.mkdir(parents=True, exist_ok=True)
    logs = [(logdir / f"process{i}.out", logdir / f"process{i}.err") for i in range(num_processes)]
    procs = []
    try:
        for pid, (out, err) in enumerate(logs):
            with open(out, "w") as stdout, open(err, "w") as stderr:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", WORKER, str(pid), port, str(workdir), TESTS_DIR],
                        env=env,
                        stdout=stdout,
                        stderr=stderr,
                    )
                )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.2)
        codes = [p.poll() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    if codes != [0] * num_processes:
        status = ["still running (killed)" if c is None else f"exit code {c}" for c in codes]
        report = "\n".join(
            f"--- process {i}: {s}; stderr tail:\n{err.read_text()[-3000:]}"
            for i, (s, (_, err)) in enumerate(zip(status, logs, strict=True))
        )
        pytest.fail(f"{num_processes}-process cluster on localhost (limit {timeout} s):\n{report}")
    return [out.read_text() for out, _ in logs]


def test_two_process_data_parallel_matches_single_process(tmp_path):
    workdir = tmp_path / "work"
    outputs = run_cluster(workdir, tmp_path / "logs")

    results = []
    for pid, out in enumerate(outputs):
        lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
        assert lines, f"process {pid} printed no RESULT line; stdout:\n{out[-3000:]}"
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))

    ref_losses, ref_kernel_sum = reference()
    for result in results:
        np.testing.assert_allclose(result["losses"], ref_losses, rtol=1e-5)
        np.testing.assert_allclose(result["kernel_sum"], ref_kernel_sum, rtol=1e-5, atol=1e-6)
        assert result["restored_equal"] and result["extra"] == {"seed": 0}

    rows = read_metrics(workdir)  # written by process 0 only: one line per step
    assert [r["step"] for r in rows] == [0, 1, 2]
    np.testing.assert_allclose([r["loss"] for r in rows], ref_losses, rtol=1e-5)
