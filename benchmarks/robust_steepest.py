"""Steepest descent to the max-margin classifier of its norm, against cvxpy.

    python -m benchmarks.robust_steepest [--dims 100 1000 --n 25 --seeds 3]

Data as in the reference experiments: ``x ~ N(0, I)``, ``n = 25`` points in ``d``
dimensions, labels ``sign(<x, w_teacher>)`` from a random teacher, zero init, logistic
loss. For gradient descent (L2 steps), coordinate descent (L1) and sign descent (L∞),
the figure of merit is the normalised margin in the optimiser's own norm relative to the
cvxpy max-margin in that norm, ``min_i y_i <w, x_i> / ||w|| / γ*``, and the goal is 0.99.

Four ways to run each optimiser, in float32 (``--x64`` for float64):

* ``fixed``: unnormalised steps ``-η ||g||_* d*(g)``, ``η = 4 / max_i ||x_i||_*²`` (one
  over the smoothness of the mean logistic loss in the norm), 5000 steps;
* ``linesearch``: unnormalised steps with the Armijo backtracking line search whose step
  may grow without bound (``steepest_descent(..., linesearch=True)``), 5000 steps;
* ``normalized``: unit steps ``-η d*(g)`` (``normalize=True``), ``η = c / max_i ||x_i||_*``
  so that no margin moves by more than ``c`` per step (``c = 1`` for L2 and L∞, ``0.3``
  for L1);
* ``loss-normalized``: unnormalised steps with ``η_t = η / L(w_t)``, i.e. steepest descent
  on ``log L`` with ``η = 3 / max_i ||x_i||_*²``.

The unit step is the same for ``L`` and ``log L`` (it ignores the gradient's scale), so the
last two take gradients of ``log L`` computed stably: in float32 the logistic gradient
underflows once margins pass ~90, which freezes plain-loss runs short of 0.99 (the line
search on ``L`` stops there; with ``--x64`` it does not). The line search cannot run on
``log L`` instead: ``log L`` falls without bound along the max-margin direction, so the
accepted step keeps doubling until ``w`` overflows.

Reported: steps to reach 0.99 (or the ratio reached within ``--max-steps``), the time of
that many steps after compilation, and cvxpy's solve time (median of 3, including its
problem construction). ``--json PATH`` also writes the rows as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff import robust

TARGET = 0.99
OPTIMISERS = (("gradient descent", 2.0), ("coordinate descent", 1.0), ("sign descent", math.inf))
UNIT_STEP = {2.0: 1.0, 1.0: 0.3, math.inf: 1.0}
LOSS_NORMALIZED_STEP = 3.0


def synthetic(d, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    return x, np.sign(x @ rng.normal(size=d))


def log_logistic(margins):
    """``log(softplus(-m))``, finite for large margins (it tends to ``-m``)."""
    large = margins > 15
    safe = jnp.where(large, 0.0, margins)
    return jnp.where(large, -margins, jnp.log(jax.nn.softplus(-safe)))


def make_losses(x, y):
    def loss(w):
        return jnp.mean(jax.nn.softplus(-y * (x @ w)))

    def log_loss(w):
        return jax.nn.logsumexp(log_logistic(y * (x @ w))) - jnp.log(x.shape[0])

    return loss, log_loss


def make_runner(tx, objective, x, y, norm, reference, linesearch, steps):
    """Jitted runs from ``(w, state)``: the margin ratio after each of ``steps`` steps, and
    ``w`` after a given number of steps (untracked, for timing)."""

    def step(w, state):
        value, grad = jax.value_and_grad(objective)(w)
        extra = dict(value=value, grad=grad, value_fn=objective) if linesearch else {}
        updates, state = tx.update(grad, state, w, **extra)
        return w + updates, state

    def ratio(w):
        return jnp.min(y * (x @ w)) / robust.norm(w, norm) / reference

    @jax.jit
    def tracked(w, state):
        def body(carry, _):
            w, state = step(*carry)
            return (w, state), ratio(w)

        return jax.lax.scan(body, (w, state), None, length=steps)[1]

    @jax.jit
    def untracked(w, state, steps):
        return jax.lax.fori_loop(0, steps, lambda _, c: step(*c), (w, state))[0]

    return tracked, untracked


def measure(name, tx, objective, x, y, norm, reference, *, steps, linesearch=False):
    tracked, untracked = make_runner(tx, objective, x, y, norm, reference, linesearch, steps)
    w0 = jnp.zeros(x.shape[1], x.dtype)
    ratios = np.asarray(tracked(w0, tx.init(w0)))
    reached = np.flatnonzero(ratios >= TARGET)
    k = int(reached[0]) + 1 if reached.size else steps
    start = time.perf_counter()
    jax.block_until_ready(untracked(w0, tx.init(w0), 1))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(untracked(w0, tx.init(w0), k))
        times.append(time.perf_counter() - start)
    return {
        "method": name,
        "steps": k if reached.size else None,
        "ratio": float(ratios[k - 1]),
        "best_ratio": float(np.max(ratios)),
        "time_s": statistics.median(times),
        "compile_s": compile_s,
    }


def cvxpy_time(x, y, norm):
    times, solution = [], None
    for _ in range(3):
        start = time.perf_counter()
        solution = robust.max_margin(x, y, norm=norm)
        times.append(time.perf_counter() - start)
    return solution, statistics.median(times)


def run(d, n, seed, max_steps, baseline_steps):
    x_np, y_np = synthetic(d, n, seed)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    loss, log_loss = make_losses(x, y)
    rows = []
    for label, norm in OPTIMISERS:
        solution, solve_s = cvxpy_time(x_np, y_np, norm)
        scale = float(jnp.max(robust.dual_norm(x, norm, batch_dims=1)))
        common = dict(x=x, y=y, norm=norm, reference=solution.margin)
        methods = [
            ("fixed", robust.steepest_descent(4 / scale**2, norm=norm), loss, baseline_steps),
            (
                "linesearch",
                robust.steepest_descent(1.0, norm=norm, linesearch=True),
                loss,
                None,
            ),
            (
                "normalized",
                robust.steepest_descent(UNIT_STEP[norm] / scale, norm=norm, normalize=True),
                log_loss,
                max_steps,
            ),
            (
                "loss-normalized",
                robust.steepest_descent(LOSS_NORMALIZED_STEP / scale**2, norm=norm),
                log_loss,
                max_steps,
            ),
        ]
        for name, tx, objective, steps in methods:
            row = measure(
                name,
                tx,
                objective,
                steps=steps or baseline_steps,
                linesearch=name == "linesearch",
                **common,
            )
            row.update(d=d, n=n, seed=seed, optimiser=label, cvxpy_s=solve_s)
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def format_row(row):
    steps = f"{row['steps']:>6d}" if row["steps"] else "     -"
    return (
        f"d={row['d']:<5d} seed={row['seed']} {row['optimiser']:<19s} {row['method']:<16s}"
        f" steps to {TARGET}: {steps}  ratio {row['ratio']:.4f} (best {row['best_ratio']:.4f})"
        f"  time {1e3 * row['time_s']:8.1f} ms  compile {1e3 * row['compile_s']:6.0f} ms"
        f"  cvxpy {1e3 * row['cvxpy_s']:6.1f} ms"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--n", type=int, default=25)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=20_000)
    parser.add_argument("--baseline-steps", type=int, default=5000)
    parser.add_argument("--json", type=str, default=None)
    parser.add_argument("--x64", action="store_true", help="run in float64")
    args = parser.parse_args()
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    dtype = "float64" if args.x64 else "float32"
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {dtype}; target {TARGET}")
    rows = []
    for d in args.dims:
        for seed in range(args.seeds):
            rows += run(d, args.n, seed, args.max_steps, args.baseline_steps)
    print("\nmedian over seeds (steps to 0.99 / time; '-' = not reached):")
    for d in args.dims:
        for label, _ in OPTIMISERS:
            solve = statistics.median(
                r["cvxpy_s"] for r in rows if r["d"] == d and r["optimiser"] == label
            )
            print(f"d={d:<5d} {label:<19s} cvxpy {1e3 * solve:7.1f} ms")
            for method in ("fixed", "linesearch", "normalized", "loss-normalized"):
                mine = [
                    r
                    for r in rows
                    if r["d"] == d and r["optimiser"] == label and r["method"] == method
                ]
                ratios = statistics.median(r["ratio"] for r in mine)
                if all(r["steps"] for r in mine):
                    steps = statistics.median(r["steps"] for r in mine)
                    ms = 1e3 * statistics.median(r["time_s"] for r in mine)
                    print(
                        f"    {method:<16s} {steps:7.0f} steps {ms:8.1f} ms  (ratio {ratios:.4f})"
                    )
                else:
                    print(f"    {method:<16s}       - (ratio reached {ratios:.4f})")
    if args.json:
        with open(args.json, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
