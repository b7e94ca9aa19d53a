"""Per-example gradient statistics: the fast path vs a plain gradient step vs vmap(grad).

    python -m benchmarks.pergrad_stats [--steps 10 --directions 32]

Three unmodified flax nnx models, side by side in one run:

* MLP 784-512-512-10, B = 128;
* CNN, 3 conv (3x3; 32, 64 stride 2, 64 stride 2) + 1 dense on 32x32x3, B = 128;
* a Dense layer over a sequence (B = 32, T = 64, d = 512), mean pooling, a dense head.

For each: the plain jitted gradient of the weighted loss ``Σ_i w_i ℓ_i`` (``jax.grad``);
the fast path (``jaxeff.pergrad.per_example_stats``: per-example norms, per-coordinate
sums of squares and K inner products per parameter, rank 1 on a kernel), also with norms only; the
weighted gradient and the same statistics from one pass
(``jaxeff.pergrad.value_grad_and_stats``); the plain training step
(``jaxeff.train.make_train_step`` with Adam, weighted per-example losses) and the same
step with ``per_example_stats=True`` (directions read from the optimizer state); and
``vmap(grad)`` per-example gradients (``jaxeff.pergrad.per_example_grads``). Times are
the best of ``--steps`` interleaved rounds after compilation; memory is the compiled
executable's temporary buffers plus its outputs (``memory_analysis()``; inputs
excluded), where per-example arrays live; MFLOP is XLA's operation count
(``cost_analysis()``), which does not depend on the machine's load but counts a loop
body once, so it undercounts the variants that form per-example gradients in chunks
(``lax.scan``: Conv and sequence layers with sums of squares). Ratios are against the
plain gradient.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxeff.pergrad import (
    direction_shapes,
    per_example_grads,
    per_example_stats,
    value_grad_and_stats,
)
from jaxeff.train import create_train_state, make_train_step


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


def step_loss(model, batch, hparams):
    return per_example_loss(model, batch), {}


def holding(directions):
    """An ExtraArgs transform whose state holds the directions (as cluster centres would)."""

    def init(params):
        return directions

    def update(updates, state, params=None, **extra):
        return updates, state

    return optax.GradientTransformationExtraArgs(init, update)


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
        "weights": rng.uniform(0, 2 / shape[0], size=shape[0]).astype(np.float32),
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


def compiled_costs(fn, args):
    """``(bytes, flops)``: temporary buffers plus outputs of the compiled function (inputs
    excluded), and XLA's count of its floating-point operations (machine-independent, so
    its ratios hold when the timings are noisy)."""
    compiled = fn.lower(*args).compile()
    analysis = compiled.memory_analysis()
    memory = float("nan")
    if analysis is not None:
        memory = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
    costs = compiled.cost_analysis()
    costs = costs[0] if isinstance(costs, list | tuple) else costs
    return memory, float((costs or {}).get("flops", float("nan")))


def run_case(name, args, rng):
    model, batch = make_case(name, rng)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, batch):  # the model's loss as a function of its parameters
        return per_example_loss(nnx.merge(graphdef, params, rest), batch)

    directions = {
        path: tuple(rng.normal(size=(args.directions, *f)).astype(np.float32) for f in split)
        for path, split in direction_shapes(loss_fn, params, batch).items()
    }

    @jax.jit
    def plain_grad(params, batch):
        def weighted_loss(p):
            losses = per_example_loss(nnx.merge(graphdef, p, rest), batch)
            return jnp.sum(batch["weights"] * losses)

        return jax.grad(weighted_loss)(params)

    def stats_fn(with_sum_sq, use_directions):
        @jax.jit
        def fn(params, batch, directions):
            return per_example_stats(
                loss_fn,
                params,
                batch,
                directions=directions if use_directions else None,
                with_sum_sq=with_sum_sq,
            )

        return fn

    @jax.jit
    def grad_and_stats(params, batch, directions):
        return value_grad_and_stats(
            loss_fn, params, batch, weights=batch["weights"], directions=directions
        )

    tx = optax.chain(holding(directions), optax.adam(1e-3))
    step_graphdef, state = create_train_state(model, tx)
    plain_step = make_train_step(step_graphdef, step_loss, tx, donate=False)
    stats_step = make_train_step(
        step_graphdef,
        step_loss,
        tx,
        donate=False,
        per_example_stats=True,
        directions_fn=lambda state: state.opt_state[0],
    )

    def example_loss(params, example):
        one = jax.tree.map(lambda x: x[None], example)
        return per_example_loss(nnx.merge(graphdef, params, rest), one)[0]

    @jax.jit
    def vmap_grads(params, batch):
        return per_example_grads(example_loss, params, batch)

    full = f"norms+sum_sq+{args.directions} dots"
    variants = {
        "plain gradient": (plain_grad, (params, batch)),
        "stats: norms only": (stats_fn(False, False), (params, batch, directions)),
        f"stats: {full}": (stats_fn(True, True), (params, batch, directions)),
        f"grad+stats: {full}": (grad_and_stats, (params, batch, directions)),
        "plain train step": (plain_step.jitted, (state, batch, {})),
        f"train step+stats: {full}": (stats_step.jitted, (state, batch, {})),
        "vmap per-example grads": (vmap_grads, (params, batch)),
    }
    size = jax.tree.leaves(batch)[0].shape[0]
    print(f"\n{name}, B={size}")
    times = time_round_robin(variants, args.steps)
    base_time = base_mem = base_flops = None
    for label, (fn, fn_args) in variants.items():
        seconds = times[label]
        memory, flops = compiled_costs(fn, fn_args)
        base_time = base_time or seconds
        base_mem = base_mem or memory
        base_flops = base_flops or flops
        print(
            f"  {label:<38} {1000 * seconds:8.2f} ms  x{seconds / base_time:6.2f}   "
            f"temp+out {memory / 2**20:8.1f} MiB  x{memory / base_mem:6.2f}   "
            f"{flops / 1e6:9.1f} MFLOP  x{flops / base_flops:6.2f}"
        )
    fast = times[f"stats: {full}"]
    step_ratio = times[f"train step+stats: {full}"] / times["plain train step"]
    grad_ratio = times[f"grad+stats: {full}"] / times["plain gradient"]
    print(f"  vmap / stats ({full}): x{times['vmap per-example grads'] / fast:.1f}")
    print(f"  train step with stats / plain train step: x{step_ratio:.2f}")
    print(f"  grad+stats / plain gradient: x{grad_ratio:.2f}")


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
