"""Gradient clustering: a GC training step against a plain SGD step, a pass against an epoch.

    python -m benchmarks.clustering_step [--rounds 20 --num_examples 10000 --quick]

The MLP 784-512-512-10 and the CNN (3 conv + 1 dense on 32x32x3) of
``benchmarks/pergrad_stats.py`` in flax nnx, and the same MLP in flax linen trained by an
ordinary optax loop; batch ``B = 128``, ``K = 10`` clusters on every parameter leaf
(``jaxeff.clustering.cluster_leaves``), an in-memory synthetic data set of ``N`` examples
shaped as each model's input. Every step is a function of ``loss_fn(params, batch)``: the
nnx models through ``nnx.split``, the linen one through ``model.apply``. Faghri, Duvenaud,
Fleet, Ba, "A Study of Gradient Variance in Deep Learning", https://arxiv.org/abs/2007.04532.

1. One training step, each a single jit-compiled call with parameters and optimizer state
   donated:

   * (a) plain SGD: ``jax.value_and_grad`` of the mean loss, ``optax.sgd`` update;
   * (b) GC: the loss weighted by the stratified weights,
     ``jaxeff.pergrad.value_grad_and_stats(..., directions=centres, with_sum_sq=False)``
     and ``optax.chain(jaxeff.clustering.gradient_clustering(...), optax.sgd(...))``,
     whose first transform assigns the batch and moves the clusters online;
   * (c) the real per-step cost of (b): the host-side draw of
     ``StratifiedSampler.batch`` and the gather of its examples from the in-memory data
     before the step, and ``StratifiedSampler.update`` with the step's assignments after
     it (which waits for the step); next to it (a) with a uniform host-side draw and the
     same gather.

   Then where the time of a GC step goes: the plain gradient alone, the weighted gradient
   with the statistics (``value_grad_and_stats``), the statistics alone
   (``per_example_stats``), the ``gradient_clustering`` update alone (assignment and
   online update from given statistics), and the sampler's draw + gather and update.

2. One batch-mode ``jaxeff.clustering.clustering_pass`` over the ``N`` examples (chunks
   of ``--pass_chunk`` examples, and of ``B``, jit-compiled per chunk; the last chunk
   padded and masked) against one epoch of plain SGD training over the same examples
   (``⌊N/B⌋`` steps of (a)); both read their batches from the host arrays.

Times: ``--rounds`` (``--pass_rounds`` for part 2) interleaved rounds, one call of each
variant per round, after compilation and warm-up; the best and the median are printed,
with ratios against (a) (against the epoch in part 2).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

from benchmarks.pergrad_stats import CNN, MLP, per_example_loss
from jaxeff.clustering import (
    cluster_leaves,
    clustering_pass,
    gradient_clustering,
    init_clusters,
)
from jaxeff.clustering.samplers import StratifiedSampler
from jaxeff.pergrad import per_example_stats, value_grad_and_stats


def nnx_case(model_cls, shape):
    """``(loss_fn(params, batch), params, input shape)`` of an nnx model."""
    graphdef, params, rest = nnx.split(model_cls(nnx.Rngs(0)), nnx.Param, ...)

    def loss_fn(params, batch):
        return per_example_loss(nnx.merge(graphdef, params, rest), batch)

    return loss_fn, params, shape


def linen_mlp_case():
    """The MLP 784-512-512-10 in flax linen."""
    model = nn.Sequential([nn.Dense(512), nn.relu, nn.Dense(512), nn.relu, nn.Dense(10)])
    params = model.init(jax.random.key(0), jnp.zeros((1, 784)))["params"]

    def loss_fn(params, batch):
        logits = model.apply({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    return loss_fn, params, (784,)


CASES = {
    "MLP 784-512-512-10": lambda: nnx_case(MLP, (784,)),
    "linen MLP 784-512-512-10": linen_mlp_case,
    "CNN 3conv+1dense": lambda: nnx_case(CNN, (32, 32, 3)),
}
#: --quick checks that the script runs, within seconds: the MLP only (compiling the CNN's
#: steps alone takes longer), unless --cases names others.
QUICK_CASE = "MLP 784-512-512-10"


# -- timing ----------------------------------------------------------------------------
def time_interleaved(variants, rounds, warmup=2):
    """``{label: (best, median)}`` seconds of each thunk over ``rounds`` interleaved rounds.

    Each thunk runs ``warmup`` times first (compilation), then once per round; a thunk
    returns what to wait for. Interleaving and keeping the best makes the ratios robust
    to other load on a shared machine; the median shows the typical call.
    """
    for fn in variants.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times = {label: [] for label in variants}
    for _ in range(rounds):
        for label, fn in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[label].append(time.perf_counter() - start)
    return {label: (min(ts), float(np.median(ts))) for label, ts in times.items()}


def print_table(times, base, unit_scale=1e3, unit="ms"):
    best_base, median_base = times[base]
    print(f"  {'':<52} {'best ' + unit:>10} {'median ' + unit:>10}  {'x best':>7} {'x median':>8}")
    for label, (best, median) in times.items():
        print(
            f"  {label:<52} {unit_scale * best:10.2f} {unit_scale * median:10.2f}  "
            f"{best / best_base:7.2f} {median / median_base:8.2f}"
        )


# -- the steps -------------------------------------------------------------------------
def copy_tree(tree):
    """Fresh buffers, so that donating them leaves the originals alive."""
    return jax.tree.map(jnp.copy, tree)


def make_sgd_step(loss_fn, tx):
    """(a): ``jax.value_and_grad`` of the mean loss and the optax update, one jit, donated."""

    def step(params, opt_state, batch):
        def mean_loss(p):
            return jnp.mean(loss_fn(p, batch))

        loss, grads = jax.value_and_grad(mean_loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def make_gc_step(loss_fn, tx):
    """(b): weighted loss, gradient and statistics in one pass, GC + SGD; one jit, donated."""

    def step(params, opt_state, batch):
        loss, grads, stats = value_grad_and_stats(
            loss_fn,
            params,
            batch,
            weights=batch["weights"],
            directions=opt_state[0].clusters.centres,
            with_sum_sq=False,
        )
        updates, opt_state = tx.update(grads, opt_state, params, per_example_stats=stats)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


class Trainer:
    """Parameters and optimizer state of its own, advanced by a donated step."""

    def __init__(self, step, params, opt_state):
        self.step, self.params, self.opt_state = step, copy_tree(params), copy_tree(opt_state)

    def __call__(self, batch):
        self.params, self.opt_state, loss = self.step(self.params, self.opt_state, batch)
        return loss


def make_data(shape, num_examples, rng):
    return {
        "x": rng.normal(size=(num_examples, *shape)).astype(np.float32),
        "y": rng.integers(0, 10, size=num_examples).astype(np.int32),
    }


def gather(data, indices):
    return {name: values[indices] for name, values in data.items()}


class Case:
    """One model, its data and the functions both parts share (compiled once)."""

    def __init__(self, name, args, rng):
        self.name = name
        self.loss_fn, self.params, shape = CASES[name]()
        self.data = make_data(shape, args.num_examples, rng)
        self.sgd = optax.sgd(args.learning_rate)
        self.sgd_step = make_sgd_step(self.loss_fn, self.sgd)


# -- 1. one step -----------------------------------------------------------------------
def run_steps(case, args, rng):
    loss_fn, params = case.loss_fn, case.params
    b, k, n = args.batch_size, args.num_clusters, args.num_examples
    data, sgd, sgd_step = case.data, case.sgd, case.sgd_step
    example = gather(data, np.arange(b))
    gc = gradient_clustering(loss_fn, example, num_clusters=k)
    gc_tx = optax.chain(gc, optax.sgd(args.learning_rate))
    gc_step = make_gc_step(loss_fn, gc_tx)

    # The sampler starts from random clusters, as after a clustering pass; the fixed batch
    # of (a) and (b) is its first draw.
    sampler = StratifiedSampler(n, batch_size=b, num_clusters=k, seed=0)
    sampler.update(rng.integers(0, k, n).astype(np.int32))
    sample = sampler.batch(0)
    batch = {**gather(data, sample.indices), "weights": sample.weights}
    device_batch = jax.device_put(batch)

    plain = Trainer(sgd_step, params, sgd.init(params))
    clustered = Trainer(gc_step, params, gc_tx.init(params))
    clustered(device_batch)  # the first update seeds the centres
    real = Trainer(gc_step, clustered.params, clustered.opt_state)
    plain_real = Trainer(sgd_step, params, sgd.init(params))
    steps = itertools.count(1)
    uniform = np.random.default_rng(1)

    def real_gc_step():
        sample = sampler.batch(next(steps))
        loss = real({**gather(data, sample.indices), "weights": sample.weights})
        sampler.update(np.asarray(real.opt_state[0].assignments), indices=sample.indices)
        return loss

    # The same with the update one step late: the sampler's contract allows it (an update
    # acts from the next batch not yet drawn), and the host's draw, gather and update then
    # run while the device computes the step just dispatched.
    late_sampler = StratifiedSampler(n, batch_size=b, num_clusters=k, seed=0)
    late_sampler.set_state(sampler.get_state())
    late = Trainer(gc_step, clustered.params, clustered.opt_state)
    pending = []

    def late_gc_step():
        sample = late_sampler.batch(late_sampler.next_step)
        loss = late({**gather(data, sample.indices), "weights": sample.weights})
        if pending:
            assignments, indices = pending.pop()
            late_sampler.update(np.asarray(assignments), indices=indices)
        # A copy: the next step donates the optimizer state that holds the assignments.
        pending.append((jnp.copy(late.opt_state[0].assignments), sample.indices))
        return loss

    def real_sgd_step():
        return plain_real(gather(data, uniform.integers(0, n, b)))

    # Where the time goes: the parts of (b) and (c) alone, on fixed inputs.
    gc_state = copy_tree(clustered.opt_state[0])  # (b) donates its own
    centres = gc_state.clusters.centres

    @jax.jit
    def grad_only(params, batch):
        return jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)

    @jax.jit
    def grad_and_stats(params, batch, centres):
        return value_grad_and_stats(
            loss_fn,
            params,
            batch,
            weights=batch["weights"],
            directions=centres,
            with_sum_sq=False,
        )

    @jax.jit
    def stats_only(params, batch, centres):
        # All of it is returned: what is not an output would be compiled away.
        return per_example_stats(loss_fn, params, batch, directions=centres, with_sum_sq=False)

    _, grads, stats = grad_and_stats(params, device_batch, centres)

    @jax.jit
    def gc_update(grads, gc_state, stats):
        return gc.update(grads, gc_state, None, per_example_stats=stats)

    draws = itertools.count(10**6)
    new_ids = itertools.cycle([rng.integers(0, k, b).astype(np.int32) for _ in range(64)])

    def draw_and_gather():
        sample = sampler.batch(next(draws))
        return {**gather(data, sample.indices), "weights": sample.weights}

    def sampler_update():
        sampler.update(next(new_ids), indices=sample.indices)

    variants = {
        "(a) SGD step": lambda: plain(device_batch),
        "(b) GC step": lambda: clustered(device_batch),
        "(c) GC step + sampler draw, gather, update": real_gc_step,
        "    (c), the update one step late": late_gc_step,
        "    (a) + uniform host draw, gather": real_sgd_step,
        "parts: gradient of the mean loss": lambda: grad_only(params, device_batch),
        "parts: weighted gradient + statistics": lambda: grad_and_stats(
            params, device_batch, centres
        ),
        "parts: statistics alone": lambda: stats_only(params, device_batch, centres),
        "parts: gradient_clustering update alone": lambda: gc_update(grads, gc_state, stats),
        "parts: sampler draw + gather (host)": draw_and_gather,
        "parts: sampler update (host)": sampler_update,
    }
    leaves = ", ".join(cluster_leaves(loss_fn, params, example))
    print(f"\n{case.name}: B={b}, K={k}, N={n}, clustered leaves: {leaves}")
    times = time_interleaved(variants, args.rounds)
    print_table(times, "(a) SGD step")
    ratio = times["(b) GC step"][0] / times["(a) SGD step"][0]
    real_ratio = (
        times["(c) GC step + sampler draw, gather, update"][0]
        / times["    (a) + uniform host draw, gather"][0]
    )
    verdict = "within" if ratio <= 1.3 else "ABOVE"
    print(f"  GC step / SGD step: x{ratio:.2f} ({verdict} the goal of x1.3)")
    print(f"  with the host-side sampling, GC / SGD: x{real_ratio:.2f}")
    if ratio > 1.3:
        base = times["parts: gradient of the mean loss"][0]
        print(
            "  above x1.3: statistics alone "
            f"x{times['parts: statistics alone'][0] / base:.2f}, gradient + statistics "
            f"x{times['parts: weighted gradient + statistics'][0] / base:.2f}, GC update "
            f"x{times['parts: gradient_clustering update alone'][0] / base:.2f} "
            "of the plain gradient"
        )
    return ratio


# -- 2. a clustering pass against an epoch ---------------------------------------------
def chunked(data, size):
    """Chunks of ``size`` examples with a ``mask``; the last one padded (one compilation)."""
    n = len(data["y"])
    chunks = []
    for start in range(0, n, size):
        rows = np.arange(start, start + size)
        valid = rows < n
        chunk = gather(data, np.where(valid, rows, n - 1))
        chunks.append({**chunk, "mask": valid})
    return chunks


def run_pass(case, args):
    loss_fn, params, data = case.loss_fn, case.params, case.data
    b, n = args.batch_size, args.num_examples
    epoch_batches = [gather(data, np.arange(start, start + b)) for start in range(0, n - b + 1, b)]
    trainer = Trainer(case.sgd_step, params, case.sgd.init(params))

    def epoch(batches):
        for batch in batches:
            loss = trainer(batch)
        return loss

    clusters = init_clusters(
        loss_fn,
        params,
        epoch_batches[0],
        num_clusters=args.num_clusters,
        key=jax.random.key(0),
    )

    def one_pass(chunks):
        state, assignments = clustering_pass(loss_fn, params, chunks, clusters)
        return state

    # {label: (thunk, its data)}; warmed up (compiled) on the first two items only.
    variants = {
        f"epoch of SGD training ({len(epoch_batches)} steps of B={b})": (epoch, epoch_batches)
    }
    for size in dict.fromkeys([args.pass_chunk, b]):
        chunks = chunked(data, size)
        variants[f"clustering pass, chunks of {size}"] = (one_pass, chunks)
    for fn, items in variants.values():
        jax.block_until_ready(fn(items[:2]))
    variants = {label: functools.partial(fn, items) for label, (fn, items) in variants.items()}
    print(f"\n{case.name}: one clustering pass vs one epoch, N={n}, K={args.num_clusters}")
    times = time_interleaved(variants, args.pass_rounds, warmup=0)
    base = next(iter(times))
    print_table(times, base, unit_scale=1.0, unit="s")
    ratio = times[f"clustering pass, chunks of {args.pass_chunk}"][0] / times[base][0]
    print(f"  clustering pass / epoch: x{ratio:.2f}")
    return ratio


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_clusters", type=int, default=10)
    parser.add_argument("--num_examples", type=int, default=10_000)
    parser.add_argument("--pass_chunk", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20, help="rounds of the step timings")
    parser.add_argument("--pass_rounds", type=int, default=3, help="rounds of pass and epoch")
    parser.add_argument("--learning_rate", type=float, default=0.01)
    parser.add_argument(
        "--cases",
        default=None,
        help=f"comma-separated subset of the models (default: all; with --quick: {QUICK_CASE})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, to check that the script runs"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.num_clusters, args.num_examples = 16, 4, 200
        args.pass_chunk, args.rounds, args.pass_rounds = 16, 2, 1
        args.cases = args.cases or QUICK_CASE
    counts = ("batch_size", "num_clusters", "num_examples", "pass_chunk", "rounds", "pass_rounds")
    for name in counts:
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    if args.num_examples < args.batch_size:
        parser.error(f"--num_examples must be at least --batch_size ({args.batch_size}).")
    names = [name.strip() for name in (args.cases or ",".join(CASES)).split(",")]
    for name in names:
        if name not in CASES:
            parser.error(f"--cases must name models of {list(CASES)}, got {name!r}.")
    print(
        f"gradient clustering on {jax.devices()[0].platform} ({jax.device_count()} "
        f"device(s)), B={args.batch_size}, K={args.num_clusters}, N={args.num_examples}"
    )
    rng = np.random.default_rng(0)
    ratios = {}
    for name in names:
        case = Case(name, args, rng)
        ratios[name] = (run_steps(case, args, rng), run_pass(case, args))
    return ratios


if __name__ == "__main__":
    main()
