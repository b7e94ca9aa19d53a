"""DP-SGD's clipped gradient: jaxeff (book-keeping, ghost) against jax-privacy and plain grad.

    python -m benchmarks.dp_clipping [--steps 5 --only mlp --budget 20]

Cases (the models of :mod:`benchmarks.pergrad_engine`, unmodified):

* MLP 784-512-512-10 as a plain params dict, B = 128 and B = 1024;
* the same MLP in flax linen, B = 128;
* the linen transformer: vocabulary 1000, width 256, 4 layers, T = 128, B = 32, tied head;
* the VSE++ text encoder (GRU 1024 under ``lax.scan``), B = 128.

Variants, each compiled (``jax.jit(...).lower(...).compile()``), all with ``C = 1`` and the
sum divided by ``B``:

* ``plain``: ``jax.grad`` of the mean loss, the baseline of every ratio;
* ``jaxeff book-keeping`` / ``jaxeff ghost``: :func:`jaxeff.privacy.clipped_grad`;
* ``jax-privacy``: ``jax_privacy.clipped_grad`` with its defaults (``vmap`` over all
  examples at once);
* ``jax-privacy mb=m``: the same in sequential microbatches of ``m`` examples, ``m`` the
  largest power of two whose per-example gradients fit in 512 MiB.

Times are the best of up to ``--steps`` calls (fewer when one call takes more than
``--budget`` / ``--steps`` seconds); memory is the executable's temporary buffers plus
outputs (``memory_analysis()``), the peak XLA plans for.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import jax_privacy

from benchmarks.pergrad_engine import (
    compile_all,
    mlp_linen,
    mlp_plain,
    mnist_batch,
    transformer,
    vse_text,
)
from jaxeff.privacy import clipped_grad

MICROBATCH_BYTES = 512 * 2**20


def mlp_plain_1024():
    loss_fn, params, _ = mlp_plain()
    return loss_fn, params, mnist_batch(1024)


CASES = {
    "mlp B=128": mlp_plain,
    "mlp B=1024": mlp_plain_1024,
    "mlp linen": mlp_linen,
    "transformer": transformer,
    "vse text": vse_text,
}


def microbatch_size(params, size):
    per_example = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    m = 1
    while 2 * m <= size and 2 * m * per_example <= MICROBATCH_BYTES:
        m *= 2
    return m


def variants(loss_fn, params, batch):
    size = jax.tree.leaves(batch)[0].shape[0]
    book = clipped_grad(loss_fn, l2_clip_norm=1.0, normalize_by=size)
    ghost = clipped_grad(loss_fn, l2_clip_norm=1.0, normalize_by=size, method="ghost")

    def one(p, b):
        return loss_fn(p, b)[0]

    theirs = jax_privacy.clipped_grad(one, l2_clip_norm=1.0, normalize_by=size)
    m = microbatch_size(params, size)
    theirs_mb = jax_privacy.clipped_grad(
        one, l2_clip_norm=1.0, normalize_by=size, microbatch_size=m
    )
    fns = {
        "plain": lambda p, b: jax.grad(lambda q: jnp.mean(loss_fn(q, b)))(p),
        "jaxeff book-keeping": lambda p, b: book(p, b)[0],
        "jaxeff ghost": lambda p, b: ghost(p, b)[0],
        "jax-privacy": theirs,
    }
    if m < size:
        fns[f"jax-privacy mb={m}"] = theirs_mb
    return fns


def measure(fn, args, steps, budget):
    ((compiled, mib),) = compile_all({"fn": fn}, args).values()
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    best = time.perf_counter() - start
    calls = int(min(steps, max(1, budget / max(best, 1e-9))))
    for _ in range(calls):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - start)
    return best, mib, out


def max_difference(a, b):
    diffs = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)
    return max(jax.tree.leaves(diffs))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per variant")
    parser.add_argument("--only", default=None, help="run the cases whose name contains this")
    args = parser.parse_args(argv)
    print(f"{jax.devices()[0].device_kind}, {jax.device_count()} device(s)")
    print(f"{'case':<12} {'variant':<20} {'ms':>10} {'ratio':>8} {'MiB':>8} {'mem ratio':>9}")
    for case, make in CASES.items():
        if args.only and args.only not in case:
            continue
        loss_fn, params, batch = make()
        results = {}
        for name, fn in variants(loss_fn, params, batch).items():
            results[name] = measure(fn, (params, batch), args.steps, args.budget)
        base_s, base_mib, _ = results["plain"]
        reference = results["jax-privacy"][2]
        for name, (seconds, mib, out) in results.items():
            mem = "" if mib is None else f"{mib:8.1f} {mib / base_mib:9.2f}"
            print(f"{case:<12} {name:<20} {1e3 * seconds:10.2f} {seconds / base_s:8.2f} {mem}")
            if name.startswith("jaxeff"):
                diff = max_difference(out, reference)
                print(f"{case:<12}   max |{name} - jax-privacy| = {diff:.1e}")


if __name__ == "__main__":
    main()
