"""Train steps on 1 device, 8 devices and 2 processes × 4 devices: speed and traffic.

    python -m benchmarks.multihost_step [--batch 128 --steps 10 --which all]

Two steps (``--which vsepp``, ``--which gvar``, or both), each at one global batch (state
replicated, batch split over the data axis), in three layouts of CPU devices, each in a
fresh process (the device count is fixed when JAX starts):

* 1 process, 1 device;
* 1 process, 8 devices (``--xla_force_host_platform_device_count=8``);
* 2 processes × 4 devices, a real cluster on localhost over gloo
  (``python -m experiments.launch.local``).

For each: steps per second and the collectives of the compiled step read from its HLO
(``jitted.lower(...).compile().as_text()``): bytes all-reduced per step against the
parameter bytes, to show the step does one gradient all-reduce and what else it reduces,
and the bytes all-gathered. The fake CPU devices share this machine's cores, so 8 devices
are not 8 times faster; the point is what the layouts cost relative to each other.

VSE++ (``--which vsepp``): the experiment's own step (``experiments.vsepp.train.make_step``)
on the reference precomp model: 4096-d image features, word embeddings of 300, a GRU of
1024, a vocabulary of 10k, 12-token captions, Adam with gradient clipping. Also the time
to save and to restore a checkpoint (every process takes part, synchronous writes); the
all-gathers are the caption embeddings and the similarity scores the hinge loss needs on
every device.

Gradient variance (``--which gvar``): the MLP 784-512-512-10 of
``benchmarks/pergrad_stats.py``, two steps jitted with the state replicated and the batch
split over the data axis, parameters and optimizer state donated:

* SGD: ``jax.value_and_grad`` of the mean loss, ``optax.sgd``;
* GC: the loss weighted per example (as stratified batches are), the gradient and the
  per-example statistics from one pass (``jaxeff.pergrad.value_grad_and_stats`` with
  ``directions=`` the cluster centres, no sums of squares), then
  ``optax.chain(jaxeff.clustering.gradient_clustering(...), optax.sgd(...))``, which
  assigns the batch's examples and moves the ``--num_clusters`` centres online (Faghri
  et al., "A Study of Gradient Variance in Deep Learning", arXiv 2007.04532).

Both all-reduce the gradients once. The GC step reduces the per-cluster sums of the
batch's mean layer inputs and backprop signals, ``K (d_in + d_out)`` per layer, in that
same all-reduce, and gathers the ``B × K`` distances (its examples are assigned one after
another): one all-reduce and one all-gather run per step. The counts are those of the
compiled program, which also holds the choice of the seeds for the first step behind a
``lax.cond``: its reductions of the candidates' distances never run later. No checkpoint is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

RESULT = "RESULT "
_DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "s32": 4, "u32": 4}
_DTYPE_BYTES.update({"s8": 1, "u8": 1, "pred": 1, "s16": 2, "u16": 2, "u64": 8})
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def _shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """``(dtype, dims)`` of every array type in an HLO type string."""
    return [
        (dtype, tuple(int(d) for d in filter(None, dims.split(","))))
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", text)
    ]


def _bytes(dtype: str, dims: tuple[int, ...]) -> int:
    size = _DTYPE_BYTES.get(dtype, 4)
    for d in dims:
        size *= d
    return size


def collectives(hlo: str, param_shapes: list[tuple[int, ...]]) -> dict[str, dict]:
    """``{op: {"count", "bytes"}}`` of the collectives in compiled HLO text.

    Counts each op once (``-start`` of an asynchronous pair, not its ``-done``) and
    measures the bytes of its result (all shapes of a tuple). The all-reduced arrays are
    also split into gradients (one per parameter, matched by shape up to the order of its
    dimensions) and the rest, ``"other_shapes"``; the all-gathered ones are listed in
    ``"shapes"``.
    """
    out = {op: {"count": 0, "bytes": 0} for op in _COLLECTIVES}
    out["all-gather"]["shapes"] = []
    reduced = []
    for line in hlo.splitlines():
        for op in _COLLECTIVES:
            match = re.search(rf"=\s*(.*?)\s+{op}(?:-start)?\(", line)
            if match:
                shapes = _shapes(match.group(1))
                out[op]["count"] += 1
                out[op]["bytes"] += sum(_bytes(*s) for s in shapes)
                if op == "all-reduce":
                    reduced += shapes
                elif op == "all-gather":
                    out[op]["shapes"] += [f"{t}[{','.join(map(str, d))}]" for t, d in shapes]
                break
    # Exact shapes first; then, as the compiler may all-reduce a gradient in a transposed
    # layout, the dims as sets (so that a (10, 512) array does not take a (512, 10)
    # gradient's place).
    unmatched = [tuple(dims) for dims in param_shapes]
    is_gradient = [False] * len(reduced)
    for exact in (True, False):
        for i, (_, dims) in enumerate(reduced):
            found = [
                j
                for j, want in enumerate(unmatched)
                if (want == dims if exact else sorted(want) == sorted(dims))
            ]
            if not is_gradient[i] and found:
                unmatched.pop(found[0])
                is_gradient[i] = True
    gradient_bytes = sum(_bytes(*r) for r, g in zip(reduced, is_gradient, strict=True) if g)
    other = [
        f"{dtype}[{','.join(map(str, dims))}]"
        for (dtype, dims), g in zip(reduced, is_gradient, strict=True)
        if not g
    ]
    out["all-reduce"].update(
        gradient_bytes=gradient_bytes, missing_gradients=len(unmatched), other_shapes=other
    )
    return out


# ----------------------------------------------------------------------------------------
# One layout, inside its own process(es).
# ----------------------------------------------------------------------------------------
def worker(args) -> None:
    from jaxeff.train import distributed

    distributed.initialize_distributed()  # the launcher's variables, if any
    import jax
    import numpy as np

    from experiments.vsepp import train
    from experiments.vsepp.configs import default
    from jaxeff import train as jt

    config = default.get_config()
    config.batch_size = args.batch
    config.model.img_dim = args.img_dim
    tx, _ = train.make_optimizer(config, num_steps=1000, steps_per_epoch=100)
    graphdef, state = jt.create_train_state(train.build_model(config, args.vocab, 0), tx)
    mesh = jt.make_mesh(axis_type=args.axis_type)
    state = jt.replicate(state, mesh)
    step = train.make_step(graphdef, config, tx, mesh)

    # This process's slice of one global batch.
    local = args.batch // jax.process_count()
    rng = np.random.default_rng(jax.process_index())
    batch = jt.shard_batch(
        {
            "image": rng.normal(size=(local, args.img_dim)).astype(np.float32),
            "tokens": rng.integers(4, args.vocab, (local, 12)).astype(np.int32),
            "lengths": rng.integers(3, 13, (local,)).astype(np.int32),
            "image_id": (jax.process_index() * local + np.arange(local)).astype(np.int32),
        },
        mesh,
    )
    hparams = {"hard_weight": np.float32(1.0)}
    hlo = step.jitted.lower(state, batch, hparams).compile().as_text()
    for _ in range(2):  # compile and warm up
        state, metrics = step(state, batch, hparams)
    jax.block_until_ready(metrics["loss"])
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch, hparams)
    jax.block_until_ready(metrics["loss"])
    steps_per_s = args.steps / (time.perf_counter() - start)

    ckpt = jt.Checkpointer(os.path.join(args.ckpt_dir, "ckpt"), async_save=False)
    start = time.perf_counter()
    ckpt.save(1, state)
    ckpt.wait_until_finished()
    save_s = time.perf_counter() - start
    start = time.perf_counter()
    restored, _ = ckpt.restore(state)
    jax.block_until_ready(restored)
    restore_s = time.perf_counter() - start
    ckpt.close()

    params = sum(x.size for x in jax.tree.leaves(state.params))
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params))
    result = {
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "axis_type": args.axis_type,
        "steps_per_s": steps_per_s,
        "save_s": save_s,
        "restore_s": restore_s,
        "params": params,
        "param_bytes": param_bytes,
        "collectives": collectives(hlo, [tuple(x.shape) for x in jax.tree.leaves(state.params)]),
    }
    if jax.process_index() == 0:
        print(RESULT + json.dumps(result), flush=True)


def gvar_worker(args) -> None:
    """The SGD and GC steps on the MLP of benchmarks/pergrad_stats.py, in this layout."""
    from jaxeff.train import distributed

    distributed.initialize_distributed()  # the launcher's variables, if any
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from benchmarks.pergrad_stats import MLP, per_example_loss
    from jaxeff import train as jt
    from jaxeff.clustering import gradient_clustering
    from jaxeff.pergrad import value_grad_and_stats

    model = MLP(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    mesh = jt.make_mesh(axis_type=args.axis_type)
    replicated, split = jt.replicated_sharding(mesh), jt.data_sharding(mesh)

    def loss_fn(params, batch):  # the model's per-example loss of its parameters
        return per_example_loss(nnx.merge(graphdef, params, rest), batch)

    global_batch = {  # the shapes of one global batch
        "x": jax.ShapeDtypeStruct((args.batch, 784), jnp.float32),
        "y": jax.ShapeDtypeStruct((args.batch,), jnp.int32),
        "weights": jax.ShapeDtypeStruct((args.batch,), jnp.float32),
    }
    sgd = optax.sgd(0.01)
    gc = optax.chain(
        gradient_clustering(loss_fn, global_batch, num_clusters=args.num_clusters),
        optax.sgd(0.01),
    )

    def sgd_step(params, opt_state, batch):
        def mean_loss(p):
            return jnp.mean(loss_fn(p, batch))

        loss, grads = jax.value_and_grad(mean_loss)(params)
        updates, opt_state = sgd.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def gc_step(params, opt_state, batch):
        loss, grads, stats = value_grad_and_stats(
            loss_fn,
            params,
            batch,
            weights=batch["weights"],
            directions=opt_state[0].clusters.centres,
            with_sum_sq=False,
        )
        updates, opt_state = gc.update(grads, opt_state, params, per_example_stats=stats)
        return optax.apply_updates(params, updates), opt_state, loss

    # This process's slice of one global batch, weighted as a stratified batch is.
    local = args.batch // jax.process_count()
    rng = np.random.default_rng(jax.process_index())
    host = {
        "x": rng.normal(size=(local, 784)).astype(np.float32),
        "y": rng.integers(0, 10, local).astype(np.int32),
        "weights": rng.uniform(0.5, 1.5, local).astype(np.float32) / args.batch,
    }
    batch = jt.shard_batch(host, mesh)
    param_shapes = [tuple(x.shape) for x in jax.tree.leaves(params)]
    result = {
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "axis_type": args.axis_type,
        "params": sum(x.size for x in jax.tree.leaves(params)),
        "param_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)),
    }
    for name, fn, tx in (("sgd", sgd_step, sgd), ("gc", gc_step, gc)):
        step = jax.jit(
            fn,
            in_shardings=(replicated, replicated, split),
            out_shardings=(replicated, replicated, replicated),
            donate_argnums=(0, 1),
        )
        state = jt.replicate((params, tx.init(params)), mesh)
        state = jax.tree.map(jnp.copy, state)  # fresh buffers to donate
        hlo = step.lower(*state, batch).compile().as_text()
        for _ in range(2):  # compile, warm up (GC: the first call seeds the centres)
            *state, loss = step(*state, batch)
        jax.block_until_ready(loss)
        start = time.perf_counter()
        for _ in range(args.steps):
            *state, loss = step(*state, batch)
        jax.block_until_ready(loss)
        result[name] = {
            "steps_per_s": args.steps / (time.perf_counter() - start),
            "collectives": collectives(hlo, param_shapes),
        }
    if jax.process_index() == 0:
        print(RESULT + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------
# The three layouts, one after the other.
# ----------------------------------------------------------------------------------------
def run_layout(args, *, which: str, devices: int, processes: int, axis_type: str = "auto") -> dict:
    from experiments.launch import local

    command = [sys.executable, "-m", "benchmarks.multihost_step", "--worker", which]
    command += ["--batch", str(args.batch), "--steps", str(args.steps)]
    command += ["--img_dim", str(args.img_dim), "--vocab", str(args.vocab)]
    command += ["--num_clusters", str(args.num_clusters), "--axis_type", axis_type]
    with tempfile.TemporaryDirectory() as tmp:
        command += ["--ckpt_dir", tmp]
        if processes == 1:
            env = dict(os.environ, JAX_PLATFORMS="cpu")
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            codes, out, err = [done.returncode], done.stdout, done.stderr
        else:
            logs = os.path.join(tmp, "logs")
            codes, _ = local.launch(
                command, num_processes=processes, cpu_devices=devices // processes, log_dir=logs
            )
            with open(os.path.join(logs, "process0.out")) as f:
                out = f.read()
            with open(os.path.join(logs, "process0.err")) as f:
                err = f.read()
    lines = [x for x in out.splitlines() if x.startswith(RESULT)]
    if codes != [0] * processes or not lines:
        raise RuntimeError(f"layout {processes}x{devices // processes} failed:\n{err[-3000:]}")
    return json.loads(lines[-1].removeprefix(RESULT))


LAYOUTS = [
    ("1 process x 1 device", dict(devices=1, processes=1)),
    ("1 process x 8 devices", dict(devices=8, processes=1)),
    ("1 process x 8 devices, explicit", dict(devices=8, processes=1, axis_type="explicit")),
    ("2 processes x 4 devices", dict(devices=8, processes=2)),
]


def traffic(c: dict, param_bytes: int) -> str:
    """One table cell: what a compiled step's collectives move, per step."""
    reduce = c["all-reduce"]
    gradients, other = reduce["gradient_bytes"], reduce["bytes"] - reduce["gradient_bytes"]
    others = sum(c[k]["count"] for k in _COLLECTIVES[2:])
    return (
        f"all-reduce {reduce['count']} ops {reduce['bytes'] / 1e6:6.3f} MB: gradients "
        f"{gradients / 1e6:.3f} MB = {gradients / param_bytes:.3f} x params "
        f"({reduce['missing_gradients']} missing), other {len(reduce['other_shapes'])} arrays "
        f"{other / 1e6:.3f} MB = {other / param_bytes:.3f} x params | all-gather "
        f"{c['all-gather']['count']} ops {c['all-gather']['bytes'] / 1e6:.3f} MB | "
        f"other collectives {others}"
    )


def gvar_table(args) -> None:
    rows = []
    for name, layout in LAYOUTS:
        r = run_layout(args, which="gvar", **layout)
        rows.append((name, r))
        for step in ("sgd", "gc"):
            print(
                f"{name:<33} {step.upper():<3} {r[step]['steps_per_s']:7.1f} steps/s | "
                f"{traffic(r[step]['collectives'], r['param_bytes'])}",
                flush=True,
            )
    print()
    for name, r in rows[1:]:
        c = r["gc"]["collectives"]
        print(f"{name}: GC step all-reduces besides the gradients: ", end="")
        print(", ".join(c["all-reduce"]["other_shapes"]))
        print(f"{name}: GC step all-gathers: {', '.join(c['all-gather']['shapes'])}")
    r = rows[0][1]
    print(
        f"MLP 784-512-512-10, batch {args.batch}, K = {args.num_clusters} clusters; "
        f"{r['params'] / 1e6:.2f}M parameters = {r['param_bytes'] / 1e6:.2f} MB (float32); "
        "MB = 1e6 bytes per step, from the result shapes of the compiled collectives."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--img_dim", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--num_clusters", type=int, default=10)
    parser.add_argument("--which", default="all", choices=["all", "vsepp", "gvar"])
    parser.add_argument("--axis_type", default="auto", choices=["auto", "explicit"])
    parser.add_argument("--ckpt_dir", default=None)
    parser.add_argument("--worker", choices=["vsepp", "gvar"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        (worker if args.worker == "vsepp" else gvar_worker)(args)
        return
    if args.which in ("all", "vsepp"):
        vsepp_table(args)
    if args.which == "all":
        print()
    if args.which in ("all", "gvar"):
        gvar_table(args)


def vsepp_table(args) -> None:
    rows = []
    for name, layout in LAYOUTS:
        r = run_layout(args, which="vsepp", **layout)
        rows.append((name, r))
        c = r["collectives"]
        reduce = c["all-reduce"]
        others = sum(c[k]["count"] for k in _COLLECTIVES[2:])
        print(
            f"{name:<33} {r['steps_per_s']:5.2f} steps/s | save {r['save_s']:4.2f} s, "
            f"restore {r['restore_s']:4.2f} s | all-reduce {reduce['count']} ops "
            f"{reduce['bytes'] / 1e6:6.2f} MB: gradients {reduce['gradient_bytes'] / 1e6:.2f} MB"
            f" = {reduce['gradient_bytes'] / r['param_bytes']:.3f} x params"
            f" ({reduce['missing_gradients']} missing), other {len(reduce['other_shapes'])} "
            f"arrays | all-gather {c['all-gather']['count']} ops "
            f"{c['all-gather']['bytes'] / 1e6:.3f} MB | other collectives {others}",
            flush=True,
        )
    print()
    for name, r in rows[1:]:
        other = r["collectives"]["all-reduce"]["other_shapes"]
        print(f"{name}: all-reduced besides the gradients: {', '.join(other)}")
    r = rows[0][1]
    print(
        f"batch {args.batch}; {r['params'] / 1e6:.2f}M parameters = "
        f"{r['param_bytes'] / 1e6:.2f} MB (float32); MB = 1e6 bytes per step, from the "
        "result shapes of the compiled collectives."
    )


if __name__ == "__main__":
    main()
