"""Robust-accuracy curve of a linear classifier: closed form against a PGD loop.

    python -m benchmarks.robust_curve [--n 10000 --d 1000 --num-eps 100 --pgd-steps 10]

A binary linear classifier (a noisy copy of the labelling teacher, so the curve falls
from about 90% to 0) on ``n`` Gaussian points in ``d`` dimensions, robust accuracy at
``--num-eps`` radii for L∞ and L2 perturbations:

* closed form: ``jaxeff.robust.robust_accuracy(w, x, y, eps=eps_vector, p=p)``, the whole
  curve in one jitted call, exact;
* PGD: for each ε (``lax.map`` over the radii, one jitted call), ``--pgd-steps`` steps of
  projected gradient ascent on the margin loss ``-y f(x + δ)`` from ``δ = 0``, step
  ``2.5 ε / steps`` (sign steps for L∞, normalised gradient steps for L2), projection by
  ``jaxeff.robust.project``, gradients by ``jax.grad`` of the model as a black box; the
  accuracy of ``f(x + δ)`` is the attack's estimate.

Both run in float32; times are medians of ``--repeats`` runs after compilation. The PGD
curve is an upper bound on the robust accuracy; on a linear model it is tight, so the
curves agree up to points whose margin is within rounding of ``ε ||w||_q``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff import robust


def problem(n, d, seed=0):
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=d)
    x = rng.normal(size=(n, d))
    y = np.sign(x @ teacher)
    w = teacher + 0.5 * rng.normal(size=d)
    return (jnp.asarray(a, jnp.float32) for a in (w, x, y))


def pgd_curve(w, x, y, eps_values, p, steps):
    """Robust accuracy at each radius estimated by a plain projected-gradient attack."""

    def apply_fn(inputs):
        return inputs @ w

    def attack_loss(delta):
        return -jnp.sum(y * apply_fn(x + delta))

    def accuracy_at(eps):
        step = 2.5 * eps / steps

        def body(_, delta):
            g = jax.grad(attack_loss)(delta)
            if p == jnp.inf:
                direction = jnp.sign(g)
            else:
                norms = jnp.linalg.norm(g, axis=1, keepdims=True)
                direction = g / jnp.maximum(norms, 1e-12)
            return robust.project(delta + step * direction, p, eps, batch_dims=1)

        delta = jax.lax.fori_loop(0, steps, body, jnp.zeros_like(x))
        return jnp.mean(y * apply_fn(x + delta) > 0)

    return jax.lax.map(accuracy_at, eps_values)


def timed(fn, *args, repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return out, statistics.median(times), compile_s


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--d", type=int, default=1000)
    parser.add_argument("--num-eps", type=int, default=100)
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    w, x, y = problem(args.n, args.d)
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.platform} ({device.device_kind}); float32")
    print(f"n={args.n} d={args.d} radii={args.num_eps} pgd steps={args.pgd_steps}")
    for p in (jnp.inf, 2):
        radii = robust.certified_radius(w, x, y, p=p)
        top = float(jnp.quantile(radii, 0.99))
        eps_values = jnp.linspace(0.0, top, args.num_eps)
        # The data are arguments, not closed-over constants, so nothing is precomputed at
        # compile time.
        closed = jax.jit(lambda w, x, y, e, p=p: robust.robust_accuracy(w, x, y, eps=e, p=p))
        pgd = jax.jit(lambda w, x, y, e, p=p: pgd_curve(w, x, y, e, p, args.pgd_steps))
        data = (w, x, y, eps_values)
        exact, closed_s, closed_compile = timed(closed, *data, repeats=args.repeats)
        attacked, pgd_s, pgd_compile = timed(pgd, *data, repeats=args.repeats)
        gap = np.asarray(attacked) - np.asarray(exact)
        name = "Linf" if p == jnp.inf else "L2"
        print(
            f"{name:>4s}: closed form {1e3 * closed_s:9.2f} ms"
            f" (first call {1e3 * closed_compile:5.0f})"
            f" | PGD {1e3 * pgd_s:10.1f} ms (first call {1e3 * pgd_compile:5.0f})"
            f" | speed-up {pgd_s / closed_s:8.0f}x"
            f" | accuracy {float(exact[0]):.3f} -> {float(exact[-1]):.3f}"
            f" | PGD - exact: max {gap.max():+.4f}, min {gap.min():+.4f}"
        )


if __name__ == "__main__":
    main()
