"""A real 2-process cluster on localhost (gloo CPU collectives), 2 CPU devices each.

Checks that the data-parallel step with each process feeding its half of the batch
matches one process on the whole batch, on meshes with auto and explicit axes; that only
process 0 writes metrics; that a checkpoint saved and restored by both processes
round-trips; and the helpers of jaxeff.train.distributed: joining the cluster from the
launcher's environment variables, process 0's broadcast (of a value, and of a failure),
preparation in turn, and the reassembly of rows computed per process.
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

from jaxeff.train import create_train_state, distributed, make_train_step, read_metrics

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    # The variables experiments.launch.local sets; gloo is chosen by initialize_distributed.
    os.environ.update(JAXEFF_COORDINATOR_ADDRESS=f"localhost:{port}", JAXEFF_NUM_PROCESSES="2",
                      JAXEFF_PROCESS_ID=str(process_id))
    from jaxeff.train import distributed
    assert distributed.initialize_distributed()
    import jax
    assert jax.config.jax_cpu_collectives_implementation == "gloo"

    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    sys.path.insert(0, sys.argv[4])
    from _train_models import MLP, make_batch, mse_loss as loss_fn
    from jaxeff.train import (Checkpointer, MetricWriter, check_finite, create_train_state,
                              data_sharding, make_mesh, make_train_step, replicate,
                              replicated_sharding, shard_batch)
    from jaxeff.train.sharding import local_rows

    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
    out = {}

    # Process 0 decides, everyone learns the decision (or its failure).
    out["broadcast"] = distributed.broadcast_from_process_zero(
        lambda: {"from": jax.process_index(), "pair": (1, 2)})
    def refuse():
        raise ValueError("config differs")
    try:
        distributed.broadcast_from_process_zero(refuse)
    except Exception as e:
        out["broadcast_error"] = f"{type(e).__name__}: {e}"

    # In turn: process 0 prepares (slowly) before process 1 starts.
    log = os.path.join(workdir, "turns.txt")
    def prepare():
        with open(log, "a") as f:
            f.write(f"start {process_id}\\n")
        time.sleep(0.5 if process_id == 0 else 0.0)
        with open(log, "a") as f:
            f.write(f"end {process_id}\\n")
        return process_id
    out["in_turn"] = distributed.run_in_turn(prepare)
    def fail_on_1():
        if process_id == 1:
            raise OSError("disk full")
    try:
        distributed.run_in_turn(fail_on_1, what="Preparing the data")
    except Exception as e:
        out["in_turn_error"] = f"{type(e).__name__}: {e}"

    # Rows computed per process for its slice of 3 global batches of 4 rows (2 each); the
    # last batch holds 1 real row (process 0's).
    real = 9
    rows = np.array([t * 4 + process_id * 2 + j for t in range(3) for j in range(2)])
    gathered, counts = distributed.gather_rows(rows[:, None] * 10.0, rows < real, num_batches=3)
    out["gathered"] = gathered[:, 0].tolist()
    out["counts"] = counts.tolist()

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    for axis_type in ("auto", "explicit"):
        mesh = make_mesh(axis_type=axis_type)
        graphdef, state = create_train_state(MLP(nnx.Rngs(0)), tx)
        state = replicate(state, mesh)
        step = make_train_step(graphdef, loss_fn, tx, state_sharding=replicated_sharding(mesh),
                               batch_sharding=data_sharding(mesh))
        losses = []
        with MetricWriter(os.path.join(workdir, axis_type)) as writer:
            for i in range(3):
                full = make_batch(i, n=16)
                local = {k: v[8 * process_id: 8 * (process_id + 1)] for k, v in full.items()}
                batch = shard_batch(local, mesh)
                if i == 0:  # each process gets back its own rows of a computed result
                    twice = local_rows(jax.jit(lambda x: 2 * x)(batch["x"]))
                    out[f"local_rows_{axis_type}"] = bool(np.array_equal(twice, 2 * local["x"]))
                state, metrics = step(state, batch, {"weight": 1.0 + i})
                check_finite(metrics, i)
                writer.write(i, metrics)
                losses.append(float(metrics["loss"]))
        out[f"losses_{axis_type}"] = losses
        out[f"kernel_sum_{axis_type}"] = float(jnp.sum(state.params["fc2"]["kernel"][...]))

    ckpt = Checkpointer(os.path.join(workdir, "ckpt"))
    ckpt.save(3, state, extra={"seed": 0})
    ckpt.wait_until_finished()
    restored, extra = ckpt.restore(state)
    ckpt.close()
    same = jax.tree.map(lambda a, b: jnp.array_equal(a, b), restored, state)
    out.update(restored_equal=bool(all(jax.tree.leaves(same))), extra=extra)
    print("RESULT " + json.dumps(out), flush=True)
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
    for pid, result in enumerate(results):
        for axis_type in ("auto", "explicit"):
            np.testing.assert_allclose(result[f"losses_{axis_type}"], ref_losses, rtol=1e-5)
            np.testing.assert_allclose(
                result[f"kernel_sum_{axis_type}"], ref_kernel_sum, rtol=1e-5, atol=1e-6
            )
            assert result[f"local_rows_{axis_type}"]
        assert result["restored_equal"] and result["extra"] == {"seed": 0}
        # Process 0's value reached both, as JSON (the tuple became a list).
        assert result["broadcast"] == {"from": 0, "pair": [1, 2]}
        want_error = (
            "ValueError: config differs"
            if pid == 0
            else "RuntimeError: Process 0 failed: ValueError: config differs"
        )
        assert result["broadcast_error"] == want_error
        assert result["in_turn"] == pid
        want_error = (
            "RuntimeError: Preparing the data failed on process(es) [1]; see their error output."
            if pid == 0
            else "OSError: disk full"
        )
        assert result["in_turn_error"] == want_error
        assert result["gathered"] == [10.0 * i for i in range(9)]
        assert result["counts"] == [5, 4]
    # Process 1 started only after process 0 had finished.
    turns = (workdir / "turns.txt").read_text().split("\n")[:4]
    assert turns == ["start 0", "end 0", "start 1", "end 1"]

    for axis_type in ("auto", "explicit"):  # written by process 0 only: one line per step
        rows = read_metrics(workdir / axis_type)
        assert [r["step"] for r in rows] == [0, 1, 2]
        np.testing.assert_allclose([r["loss"] for r in rows], ref_losses, rtol=1e-5)


# ----------------------------------------------------------------------------------------
# initialize_distributed on one process: nothing happens.
# ----------------------------------------------------------------------------------------
@pytest.fixture
def no_cluster(monkeypatch):
    """No cluster environment and none of the launcher's variables."""
    monkeypatch.setattr(distributed, "_cluster_environment", lambda: None)
    for name in (
        distributed.COORDINATOR_ADDRESS_ENV,
        distributed.NUM_PROCESSES_ENV,
        distributed.PROCESS_ID_ENV,
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_initializes_nothing(no_cluster):
    assert distributed.initialize_distributed() is False
    assert distributed.initialize_distributed(num_processes=1) is False
    no_cluster.setenv(distributed.NUM_PROCESSES_ENV, "1")
    assert distributed.initialize_distributed() is False
    assert not jax.distributed.is_initialized()
    # The helpers are plain calls on one process.
    assert distributed.broadcast_from_process_zero(lambda: (1, "a")) == [1, "a"]
    assert distributed.run_in_turn(lambda: 7) == 7
    rows, counts = distributed.gather_rows(np.arange(6.0), np.arange(6) < 5, num_batches=2)
    assert rows.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0] and counts.tolist() == [5]


def test_incomplete_cluster_description_is_named(no_cluster):
    with pytest.raises(ValueError, match="also pass num_processes, process_id"):
        distributed.initialize_distributed(coordinator_address="localhost:1234")
    no_cluster.setenv(distributed.PROCESS_ID_ENV, "1")
    with pytest.raises(ValueError, match="also pass coordinator_address, num_processes"):
        distributed.initialize_distributed()
    with pytest.raises(ValueError, match=r"`process_id` must be in \[0, 2\), got 2"):
        distributed.initialize_distributed(
            coordinator_address="localhost:1234", num_processes=2, process_id=2
        )
    no_cluster.setenv(distributed.NUM_PROCESSES_ENV, "two")
    with pytest.raises(ValueError, match="JAXEFF_NUM_PROCESSES='two'"):
        distributed.initialize_distributed()
    assert not jax.distributed.is_initialized()


def test_global_batch_must_split_over_every_device_of_many_processes(monkeypatch):
    distributed.check_global_batch(12)  # one process: any batch
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    distributed.check_global_batch(16)
    with pytest.raises(ValueError, match=r"config\.batch_size \(12\) .* 8 devices"):
        distributed.check_global_batch(12)
    with pytest.raises(ValueError, match=r"`batch` \(12\)"):
        distributed.check_global_batch(12, name="`batch`")
