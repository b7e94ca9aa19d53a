"""Gradient variance on many devices and many hosts: the numbers of one device.

On the 8 forced CPU devices of the test process, with meshes of auto and explicit axes:
``gvar.measure`` of the SGD and GC estimators on a dataset sharded over the devices, and
the GC training step (``value_grad_and_stats`` with the cluster centres as directions,
``gradient_clustering``, SGD) jitted on a sharded batch. Per-example statistics, a
clustering pass and an online update on sharded batches are checked in
tests/test_pergrad.py and tests/test_clustering.py.

On a real 2-process cluster on localhost (``run_cluster`` of tests/test_train_multiprocess.py:
gloo, 2 CPU devices per process), one launch for everything, each process feeding its
half of every global batch, on both kinds of mesh: the per-example statistics gathered
from the processes, a clustering pass, an online update and the GC training step equal
one process on the whole batch; and the gradient-variance experiment
(``experiments.gvar.train.train_and_evaluate``, GC-sampled batches, the GC estimator
measured), stopped and resumed on the 2 processes, ends with the parameters, records and
evaluations of one uninterrupted process, with only process 0 writing files and no process
reading one back (every file access recorded with Python's audit hooks).
"""

import functools
import json
import os
import re
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import test_train_multiprocess as multiprocess
from flax import nnx
from jax.experimental import multihost_utils
from test_clustering import MLP, mlp_data, xent

from experiments.gvar import train
from experiments.gvar.configs import default
from jaxeff import clustering, gvar, pergrad
from jaxeff import train as jt

AXIS_TYPES = ("auto", "explicit")


def assert_trees_close(got, want, rtol=1e-5, atol=1e-6):
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        if jnp.issubdtype(jnp.asarray(b).dtype, jnp.integer):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        else:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


@functools.cache
def mlp_loss():
    """``loss_fn(params, batch) -> (B,)``: the cross-entropy of the test MLP at its
    ``nnx.Param`` s (one function object, so every jitted pass that takes it compiles once)."""
    graphdef, _, rest = nnx.split(MLP(nnx.Rngs(0)), nnx.Param, ...)

    def loss_fn(params, batch):
        return xent(nnx.merge(graphdef, params, rest), batch)

    return loss_fn


def random_state(params, k, seed=0):
    """A :class:`jaxeff.clustering.ClusterState` with random centres for every leaf of the
    MLP (factors ``(K, *S_j)``, keyed by parameter path) and random sizes."""
    rng = np.random.default_rng(seed)
    shapes = clustering.cluster_leaves(mlp_loss(), params, mlp_data(2))
    centres = {
        path: tuple(
            jnp.asarray(rng.normal(size=(k, *shape)) * scale, jnp.float32)
            for shape, scale in zip(split, (1.0, 0.3), strict=False)  # a bias: one factor
        )
        for path, split in shapes.items()
    }
    return clustering.ClusterState(
        centres, jnp.asarray(rng.integers(1, 20, k), jnp.float32), jnp.zeros((), jnp.int32)
    )


# ----------------------------------------------------------------------------------------
# gvar.measure on a dataset sharded over 8 devices.
# ----------------------------------------------------------------------------------------
def make_estimators():
    return {
        "sgd": gvar.sgd_estimator(mlp_loss(), batch_size=4),
        "gc": clustering.gc_estimator(
            mlp_loss(), batch_size=8, num_clusters=3, num_passes=2, chunk_size=16
        ),
    }


def measure_all(estimators, params, data):
    states = {name: est.init(params, data) for name, est in estimators.items()}
    stats = gvar.measure(estimators, states, params, data, jax.random.key(5), num_draws=3)
    return states, stats


@pytest.fixture(scope="module")
def measured_on_one_device():
    model = MLP(nnx.Rngs(0))
    return model, measure_all(make_estimators(), nnx.state(model, nnx.Param), mlp_data(32))


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_measure_on_a_sharded_dataset_equals_one_device(measured_on_one_device, axis_type):
    model, (want_states, want) = measured_on_one_device
    mesh = jt.make_mesh(axis_type=axis_type)
    assert mesh.size == 8
    data = jt.shard_batch(mlp_data(32), mesh)  # 4 examples per device
    params = jt.replicate(nnx.state(model, nnx.Param), mesh)
    with jax.set_mesh(mesh):
        got_states, got = measure_all(make_estimators(), params, data)
    # The same clusters (every example's), so the same stratified draws and statistics.
    np.testing.assert_array_equal(got_states["gc"].assignments, want_states["gc"].assignments)
    assert_trees_close(got_states["gc"].clusters, want_states["gc"].clusters)
    assert list(got) == ["sgd", "gc"]
    for name in got:
        assert_trees_close(got[name], want[name])
    assert float(want["gc"].variance) < float(want["sgd"].variance)  # not a trivial match


# ----------------------------------------------------------------------------------------
# The GC training step, jitted, on a batch sharded over 8 devices.
# ----------------------------------------------------------------------------------------
def make_gc_step(tx, **jit_options):
    """Weighted loss, gradient and statistics in one pass; the clusters move, then SGD."""

    def step(params, opt_state, batch):
        loss, grads, stats = pergrad.value_grad_and_stats(
            mlp_loss(),
            params,
            batch,
            weights=batch["weights"],
            directions=opt_state[0].clusters.centres,
            with_sum_sq=False,
        )
        updates, opt_state = tx.update(grads, opt_state, params, per_example_stats=stats)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, **jit_options)


def gc_batches(num_steps=3, size=16):
    """Batches with positive, unequal example weights (as a stratified sampler gives)."""
    for i in range(num_steps):
        weights = np.random.default_rng(100 + i).uniform(0.5, 1.5, size) / size
        yield {**mlp_data(size, seed=i), "weights": weights.astype(np.float32)}


def run_gc_steps(place_state=lambda x: x, place_batch=lambda x: x):
    params = nnx.state(MLP(nnx.Rngs(0)), nnx.Param)
    gc = clustering.gradient_clustering(mlp_loss(), mlp_data(16), num_clusters=4, decay=0.5)
    tx = optax.chain(gc, optax.sgd(0.1))
    step = make_gc_step(tx)
    params, opt_state = place_state((params, tx.init(params)))
    losses = []
    for batch in gc_batches():  # the first step seeds the centres, the others move them
        params, opt_state, loss = step(params, opt_state, place_batch(batch))
        losses.append(loss)
    return params, opt_state, losses


@pytest.fixture(scope="module")
def gc_steps_on_one_device():
    return run_gc_steps()


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_gc_training_step_on_a_sharded_batch_equals_one_device(gc_steps_on_one_device, axis_type):
    want = gc_steps_on_one_device
    mesh = jt.make_mesh(axis_type=axis_type)
    params, opt_state, losses = run_gc_steps(
        lambda tree: jt.replicate(tree, mesh), lambda batch: jt.shard_batch(batch, mesh)
    )
    assert params["fc1"]["kernel"][...].sharding.is_fully_replicated
    assert opt_state[0].clusters.sizes.sharding.is_fully_replicated
    assert_trees_close((params, opt_state, losses), want)
    assignments = np.asarray(want[1][0].assignments)
    assert int(want[1][0].clusters.count) == 3 and len(set(assignments.tolist())) > 1


def entry_all_gathers(hlo: str) -> list[str]:
    """The result types of the all-gathers in compiled HLO's entry computation: those run on
    every call, outside any branch or loop."""
    entry = hlo[hlo.index("\nENTRY") :]
    entry = entry[: entry.index("\n}")]
    return re.findall(r"= (\w+\[[\d,]*\])\S* all-gather(?:-start)?\(", entry)


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_gc_training_step_on_a_sharded_batch_gathers_only_the_distances(axis_type):
    """Per step, the sharded GC step gathers the B x K distances (the examples are assigned
    one after another on every device) and nothing else: the assignments it returns are
    computed whole on every device, never gathered back from the batch's split (the
    step's outputs replicated, as a training loop keeps its state)."""
    mesh = jt.make_mesh(axis_type=axis_type)
    params = nnx.state(MLP(nnx.Rngs(0)), nnx.Param)
    tx = optax.chain(
        clustering.gradient_clustering(mlp_loss(), mlp_data(16), num_clusters=4), optax.sgd(0.1)
    )
    state = jt.replicate((params, tx.init(params)), mesh)
    batch = jt.shard_batch(next(gc_batches()), mesh)
    step = make_gc_step(tx, out_shardings=jt.replicated_sharding(mesh))
    hlo = step.lower(*state, batch).compile().as_text()
    assert entry_all_gathers(hlo) == ["f32[16,4]"]


# ----------------------------------------------------------------------------------------
# A real 2-process cluster: each process feeds its half of every global batch.
# ----------------------------------------------------------------------------------------
#: Run by each process of the cluster (``run_cluster`` passes its id, the port, the shared
#: workdir and this directory): joins the cluster, then :func:`cluster_work`.
WORKER = textwrap.dedent(
    """
    import json, os, sys
    process_id, port, workdir, tests_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    os.environ.update(JAXEFF_COORDINATOR_ADDRESS=f"localhost:{port}", JAXEFF_NUM_PROCESSES="2",
                      JAXEFF_PROCESS_ID=str(process_id))
    sys.path[:0] = [tests_dir, os.path.dirname(tests_dir)]
    from jaxeff.train import distributed
    assert distributed.initialize_distributed()
    import test_gvar_multihost
    print("RESULT " + json.dumps(test_gvar_multihost.cluster_work(workdir)), flush=True)
    """
)
#: Files of the experiment's workdir that process 0 writes for itself.
OWN_FILES = ("config.json", "metrics.jsonl", train.RECORDS, train.PLOT, train.RESULTS)
NUM_STEPS, STOP_AT = 12, 6


def gvar_config(**fields):
    """The digits MLP, GC-sampled batches re-clustered every 4 steps, the GC estimator
    measured every 6 steps, checkpoints every 6 steps."""
    config = default.get_config()
    config.data.max_examples = 240
    config.model.hidden = (16,)
    config.batch_size = 16
    config.learning_rate = 0.1
    config.num_steps = NUM_STEPS
    config.log_every = 3
    config.checkpoint_every = STOP_AT
    config.sampler = "gc"
    config.gc.recluster_every = 4
    config.gc.num_passes = 1
    config.gvar.measure_every = STOP_AT
    config.gvar.num_draws = 4
    config.gvar.estimators = "gc"
    config.gvar.exact = False
    config.gvar.chunk_size = 128
    config.update(fields)
    return config


def leaves(tree) -> list:
    """The leaves of ``tree`` as nested lists (the global value of an array spread over
    processes)."""

    def value(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return x

    return [np.asarray(value(x)).tolist() for x in jax.tree.leaves(tree)]


def on_one_batch(params, batch, state) -> dict:
    """Per-example statistics of ``batch`` with ``state``'s centres as directions, a
    clustering pass over it and an online update from it."""
    stats = pergrad.per_example_stats(mlp_loss(), params, batch, directions=state.centres)
    passed, pass_assignments = clustering.clustering_pass(mlp_loss(), params, [batch], state)
    online, online_assignments = jax.jit(clustering.online_update)(state, stats)
    return {
        "losses": stats.losses,
        "total_sq_norms": stats.total_sq_norms,
        "dots": stats.dots,
        "pass": passed,
        "pass_assignments": pass_assignments,
        "online": online,
        "online_assignments": online_assignments,
    }


class FileLog:
    """Records ``(kind, path relative to root)`` of every file opened, renamed, made or
    removed under ``root`` while ``on`` (Python's audit hooks)."""

    def __init__(self, root):
        self.root, self.on, self.accesses = os.path.abspath(root), False, set()
        sys.addaudithook(self)

    def __call__(self, event, args):
        if not self.on:
            return
        if event == "open" and isinstance(args[0], str | bytes | os.PathLike):
            path, mode, flags = args
            write = (mode is not None and any(c in mode for c in "wax+")) or (
                mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            )
            self.add("write" if write else "read", path)
        elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
            self.add("write", args[0])

    def add(self, kind, path):
        path = os.path.abspath(os.fsdecode(path))
        if path == self.root or path.startswith(self.root + os.sep):
            self.accesses.add((kind, os.path.relpath(path, self.root)))


def cluster_work(workdir) -> dict:
    """What each process of the cluster computes; the same on both (see the module docstring)."""
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
    me = jax.process_index()

    def half(tree):  # this process's rows of a global batch of 16
        return jax.tree.map(lambda x: x[8 * me : 8 * (me + 1)], tree)

    params = nnx.state(MLP(nnx.Rngs(0)), nnx.Param)
    state = random_state(params, 4)
    out = {}
    for axis_type in AXIS_TYPES:
        mesh = jt.make_mesh(axis_type=axis_type)
        batch = jt.shard_batch(half(mlp_data(16)), mesh)
        with jax.set_mesh(mesh):
            pieces = on_one_batch(params, batch, jt.replicate(state, mesh))
        pieces["gc_step"] = run_gc_steps(
            lambda tree, mesh=mesh: jt.replicate(tree, mesh),
            lambda batch, mesh=mesh: jt.shard_batch(half(batch), mesh),
        )
        out[axis_type] = {name: leaves(value) for name, value in pieces.items()}

    # The experiment, stopped at STOP_AT and resumed, every file access recorded.
    run_dir = os.path.join(workdir, "gvar")
    files = FileLog(run_dir)
    files.on = True
    first = train.train_and_evaluate(gvar_config(num_steps=STOP_AT), run_dir)
    resumed = train.train_and_evaluate(gvar_config(), run_dir)
    files.on = False
    out["experiment"] = {
        "first_records": first["records"],
        "records": resumed["records"],
        "evaluations": resumed["evaluations"],
        "final": resumed["final"],
        "params": leaves(resumed["params"]),
    }
    out["files"] = sorted(files.accesses)
    return out


def assert_leaves_close(got, want_tree, rtol=1e-5, atol=1e-6):
    want = jax.tree.leaves(want_tree)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        b = np.asarray(b)
        if np.issubdtype(b.dtype, np.integer):
            np.testing.assert_array_equal(np.asarray(a), b)
        else:
            np.testing.assert_allclose(np.asarray(a, b.dtype), b, rtol=rtol, atol=atol)


def assert_records_close(got, want, rtol=1e-5):
    """Records (or evaluations) of the same steps, with the same numbers up to ``rtol``."""

    def keys(rows):
        return [(r["step"], r.get("estimator")) for r in rows]

    assert keys(got) == keys(want)
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for key, value in b.items():
            if isinstance(value, float):
                assert a[key] == pytest.approx(value, rel=rtol), (b["step"], key)
            else:
                assert a[key] == value, (b["step"], key)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, gc_steps_on_one_device):
    """``(results, reference)``: both processes' results (one launch), and what one process
    computes on the whole batches, meanwhile (the cluster's processes wait on each other
    often enough to leave a core idle)."""
    root = tmp_path_factory.mktemp("gvar_cluster")
    with pytest.MonkeyPatch.context() as patch, ThreadPoolExecutor(1) as pool:
        patch.setattr(multiprocess, "WORKER", WORKER)
        launched = pool.submit(multiprocess.run_cluster, root / "work", root / "logs")
        params = nnx.state(MLP(nnx.Rngs(0)), nnx.Param)
        reference = on_one_batch(params, mlp_data(16), random_state(params, 4))
        reference["gc_step"] = gc_steps_on_one_device
        reference["experiment"] = train.train_and_evaluate(gvar_config(), str(root / "one"))
        outputs = launched.result()  # fails the test as run_cluster does
    results = []
    for pid, out in enumerate(outputs):
        lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
        assert lines, f"process {pid} printed no RESULT line; stdout:\n{out[-3000:]}"
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
    return results, reference


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_two_processes_cluster_and_step_like_one(cluster, axis_type):
    results, reference = cluster
    want = {k: v for k, v in reference.items() if k != "experiment"}
    for result in results:  # both processes hold every number
        got = result[axis_type]
        assert got.keys() == want.keys()
        for name, value in want.items():
            assert_leaves_close(got[name], value)
    assert len(set(np.asarray(want["pass_assignments"]).tolist())) > 1


def test_two_processes_resume_the_experiment_to_one_process_numbers(cluster):
    results, reference = cluster
    want = reference["experiment"]
    steps = list(range(0, NUM_STEPS + 1, STOP_AT))
    assert sorted({r["step"] for r in want["records"]}) == steps
    for result in results:
        got = result["experiment"]
        # Step 0's record was measured before the stop and restored from the checkpoint.
        assert [r["step"] for r in got["first_records"]] == [0, STOP_AT]
        assert_records_close(got["records"], want["records"])
        assert_records_close(got["evaluations"], want["evaluations"])
        assert got["final"] == pytest.approx(want["final"], rel=1e-5)
        assert_leaves_close(got["params"], want["params"], rtol=1e-5, atol=1e-6)
    assert results[0]["experiment"] == results[1]["experiment"]


def test_only_process_zero_writes_and_nobody_reads_its_files(cluster):
    zero, one = ({tuple(a) for a in result["files"]} for result in cluster[0])
    written = {path for kind, path in zero if kind == "write"}
    for name in OWN_FILES:
        assert name in written or any(p.startswith(f"{name}.tmp") for p in written), name
    assert any(p.startswith("tensorboard") for p in written)
    # Process 1 writes nothing but its part of the checkpoints (orbax's multi-host protocol).
    assert {p for kind, p in one if kind == "write" and not p.startswith("checkpoints")} == set()
    # No process reads back a record, a metric or a result; process 1 not even the config.
    for accesses, own in ((zero, OWN_FILES[1:]), (one, OWN_FILES)):
        read = {p for kind, p in accesses if kind == "read"}
        assert not read & set(own), read
        assert not any(p.startswith("tensorboard") for p in read)
