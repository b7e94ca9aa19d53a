"""Per-example gradient statistics: the fast path vs a plain gradient step vs vmap(grad).

    python -m benchmarks.pergrad_stats [--steps 10 --directions 32]

Three unmodified flax nnx models, side by side in one run:

* MLP 784-512-512-10, B = 128;
* CNN, 3 conv (3x3; 32, 64 stride 2, 64 stride 2) + 1 dense on 32x32x3, B = 128;
* a Dense layer over a sequence (B = 32, T = 64, d = 512), mean pooling, a dense head.

For each: the plain jitted gradient of the mean loss (``jax.grad``); the fast path
(``jaxeff.pergrad.per_example_stats``: per-example norms, per-coordinate sums of squares
and K rank-1 inner products per layer), also with norms only; and ``vmap(grad)``
per-example gradients (``jaxeff.pergrad.per_example_grads``). Times are the best of
``--steps`` interleaved rounds after compilation; memory is the compiled executable's temporary
buffers plus its outputs (``memory_analysis()``; inputs excluded), where per-example
arrays live. Ratios are against the plain gradient.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxeff.pergrad import direction_shapes, per_example_grads, per_example_stats


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(784, 512, rngs=rngs)
        self.fc2 = nnx.Linear(512, 512, rngs=rngs)
        self.fc3 = nnx.Linear(512, 10, rngs=rngs)

    def __call__(self, x):
        return self.fc3(jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(x)))))


class CNN(nnx.Module):
    def __init__(self, rngs):
        self.c1 = nnx.Conv(3, 32, (3, 3), rngs=rngs)
        self.c2 = nnx.Conv(32, 64, (3, 3), strides=2, rngs=rngs)
        self.c3 = nnx.Conv(64, 64, (3, 3), strides=2, rngs=rngs)
        self.fc = nnx.Linear(8 * 8 * 64, 10, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.c1(x))
        h = jax.nn.relu(self.c2(h))
        h = jax.nn.relu(self.c3(h))
        return self.fc(h.reshape(h.shape[0], -1))


class SequenceDense(nnx.Module):
    def __init__(self, rngs, d=512):
        self.token = nnx.Linear(d, d, rngs=rngs)
        self.head = nnx.Linear(d, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.mean(jax.nn.relu(self.token(x)), axis=1))


def per_example_loss(model, batch):
    logits = model(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def make_case(name, rng):
    if name == "MLP 784-512-512-10":
        model, shape = MLP(nnx.Rngs(0)), (128, 784)
    elif name == "CNN 3conv+1dense":
        model, shape = CNN(nnx.Rngs(0)), (128, 32, 32, 3)
    else:
        model, shape = SequenceDense(nnx.Rngs(0)), (32, 64, 512)
    batch = {
        "x": rng.normal(size=shape).astype(np.float32),
        "y": rng.integers(0, 10, size=shape[0]).astype(np.int32),
    }
    return model, batch


def time_round_robin(variants, steps):
    """Best time of each variant over ``steps`` rounds, one call of each per round.

    Interleaving the variants and keeping the best of each makes the ratios robust to
    other load on the machine (medians moved by 2x between runs on a shared CPU).
    """
    for fn, args in variants.values():
        jax.block_until_ready(fn(*args))  # compile and warm up
    times = {label: [] for label in variants}
    for _ in range(steps):
        for label, (fn, args) in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[label].append(time.perf_counter() - start)
    return {label: min(ts) for label, ts in times.items()}


def peak_bytes(fn, args):
    """Temporary buffers plus outputs of the compiled function (inputs excluded)."""
    analysis = fn.lower(*args).compile().memory_analysis()
    if analysis is None:
        return float("nan")
    return analysis.temp_size_in_bytes + analysis.output_size_in_bytes


def run_case(name, args, rng):
    model, batch = make_case(name, rng)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    directions = {
        path: (
            rng.normal(size=(args.directions, d_in)).astype(np.float32),
            rng.normal(size=(args.directions, d_out)).astype(np.float32),
        )
        for path, (d_in, d_out) in direction_shapes(model).items()
    }

    @jax.jit
    def plain_grad(params, batch):
        def mean_loss(p):
            return jnp.mean(per_example_loss(nnx.merge(graphdef, p, rest), batch))

        return jax.grad(mean_loss)(params)

    def stats_fn(with_sum_sq, use_directions):
        @jax.jit
        def fn(params, batch, directions):
            model = nnx.merge(graphdef, params, rest)
            return per_example_stats(
                model,
                per_example_loss,
                batch,
                directions=directions if use_directions else None,
                with_sum_sq=with_sum_sq,
            )

        return fn

    def example_loss(params, example):
        one = jax.tree.map(lambda x: x[None], example)
        return per_example_loss(nnx.merge(graphdef, params, rest), one)[0]

    @jax.jit
    def vmap_grads(params, batch):
        return per_example_grads(example_loss, params, batch)

    variants = {
        "plain gradient": (plain_grad, (params, batch)),
        "fast: norms only": (stats_fn(False, False), (params, batch, directions)),
        f"fast: norms+sum_sq+{args.directions} dots": (
            stats_fn(True, True),
            (params, batch, directions),
        ),
        "vmap per-example grads": (vmap_grads, (params, batch)),
    }
    size = jax.tree.leaves(batch)[0].shape[0]
    print(f"\n{name}, B={size}")
    times = time_round_robin(variants, args.steps)
    base_time = base_mem = None
    for label, (fn, fn_args) in variants.items():
        seconds = times[label]
        memory = peak_bytes(fn, fn_args)
        base_time = base_time or seconds
        base_mem = base_mem or memory
        print(
            f"  {label:<30} {1000 * seconds:8.2f} ms  x{seconds / base_time:6.2f}   "
            f"temp+out {memory / 2**20:8.1f} MiB  x{memory / base_mem:6.2f}"
        )
    fast = times[f"fast: norms+sum_sq+{args.directions} dots"]
    print(f"  vmap / fast (norms+sum_sq+dots): x{times['vmap per-example grads'] / fast:.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--directions", type=int, default=32)
    parser.add_argument(
        "--cases",
        default="MLP 784-512-512-10,CNN 3conv+1dense,Dense over sequence",
        help="comma-separated subset of the cases",
    )
    args = parser.parse_args()
    print(
        f"per-example gradient statistics on {jax.devices()[0].platform} "
        f"({jax.device_count()} device(s)), K = {args.directions} directions per layer"
    )
    rng = np.random.default_rng(0)
    for name in args.cases.split(","):
        run_case(name.strip(), args, rng)


if __name__ == "__main__":
    main()
