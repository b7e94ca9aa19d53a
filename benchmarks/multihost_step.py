"""VSE++ train step on 1 device, 8 devices and 2 processes × 4 devices: speed and traffic.

    python -m benchmarks.multihost_step [--batch 128 --steps 10]

The experiment's own step (``experiments.vsepp.train.make_step``: state replicated, batch
split over the data axis) at one global batch, in three layouts of CPU devices, each in
a fresh process (the device count is fixed when JAX starts):

* 1 process, 1 device;
* 1 process, 8 devices (``--xla_force_host_platform_device_count=8``);
* 2 processes × 4 devices, a real cluster on localhost over gloo
  (``python -m experiments.launch.local``).

For each: steps per second, the time to save and to restore a checkpoint (every process
takes part, synchronous writes), and the collectives of the compiled step read from its
HLO (``jitted.lower(...).compile().as_text()``): bytes all-reduced per step against the
parameter bytes, to show the step does one gradient all-reduce and no more, and the
bytes all-gathered (the caption embeddings and the similarity scores the hinge loss needs
on every device). The fake CPU devices share this machine's cores, so 8 devices are not
8 times faster; the point is what the layouts cost relative to each other.

The model is the reference precomp one: 4096-d image features, word embeddings of 300, a
GRU of 1024, a vocabulary of 10k, 12-token captions, Adam with gradient clipping.
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
    dimensions) and the rest, ``"other_shapes"``.
    """
    out = {op: {"count": 0, "bytes": 0} for op in _COLLECTIVES}
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
                break
    # The compiler may all-reduce a gradient in a transposed layout: match dims as sets.
    unmatched = [sorted(dims) for dims in param_shapes]
    gradient_bytes, other = 0, []
    for dtype, dims in reduced:
        if sorted(dims) in unmatched:
            unmatched.remove(sorted(dims))
            gradient_bytes += _bytes(dtype, dims)
        else:
            other.append(f"{dtype}[{','.join(map(str, dims))}]")
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


# ----------------------------------------------------------------------------------------
# The three layouts, one after the other.
# ----------------------------------------------------------------------------------------
def run_layout(args, *, devices: int, processes: int, axis_type: str = "auto") -> dict:
    from experiments.launch import local

    command = [sys.executable, "-m", "benchmarks.multihost_step", "--worker"]
    command += ["--batch", str(args.batch), "--steps", str(args.steps)]
    command += ["--img_dim", str(args.img_dim), "--vocab", str(args.vocab)]
    command += ["--axis_type", axis_type]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--img_dim", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--axis_type", default="auto", choices=["auto", "explicit"])
    parser.add_argument("--ckpt_dir", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    layouts = [
        ("1 process x 1 device", dict(devices=1, processes=1)),
        ("1 process x 8 devices", dict(devices=8, processes=1)),
        ("1 process x 8 devices, explicit", dict(devices=8, processes=1, axis_type="explicit")),
        ("2 processes x 4 devices", dict(devices=8, processes=2)),
    ]
    rows = []
    for name, layout in layouts:
        r = run_layout(args, **layout)
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
