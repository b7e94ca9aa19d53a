"""Cost of drawing and updating host-side weighted batches against naive O(N) versions.

    python -m benchmarks.clustering_sampler [--num_examples 1000000 --num_clusters 100]

Per step, for ``N`` examples, ``K`` clusters and a batch of ``B``:

* stratified draw: :class:`jaxeff.clustering.samplers.StratifiedSampler` (member lists,
  ``O(B + K)``) against a draw that finds each cluster's members in the assignments
  (``np.flatnonzero``, ``O(N K)``) -- the naive way to sample from changing clusters;
* stratified update of the ``B`` examples just seen: incremental (``O(B)``) against a
  full rebuild from the assignments (``O(N log N)``);
* importance draw: :class:`jaxeff.clustering.samplers.ImportanceSampler` (sum trees,
  ``O(B log N)``) against ``rng.choice(N, B, p=p)`` with ``p`` renormalised from the
  scores (``O(N)``); and its update of ``B`` scores (``O(B log N)``).

Times are the median of ``--rounds`` steps; ratios are naive / ours.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from jaxeff.clustering.samplers import ImportanceSampler, StratifiedSampler


def median_time(fn, rounds: int) -> float:
    fn(0)
    times = []
    for step in range(1, rounds + 1):
        start = time.perf_counter()
        fn(step)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_examples", type=int, default=1_000_000)
    parser.add_argument("--num_clusters", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    n, k, b, rounds = args.num_examples, args.num_clusters, args.batch_size, args.rounds
    rng = np.random.default_rng(0)
    assignments = rng.integers(0, k, n).astype(np.int32)
    scores = rng.uniform(0.1, 2.0, n).astype(np.float32)

    # -- stratified ---------------------------------------------------------------------
    sampler = StratifiedSampler(n, batch_size=b, num_clusters=k, seed=0)
    sampler.update(assignments)
    ours_draw = median_time(sampler.batch, rounds)

    def naive_draw(step):
        draw_rng = np.random.default_rng([0, step])
        sizes = np.bincount(assignments, minlength=k)
        per_cluster = b // k
        picked = []
        for cluster in range(k):
            members = np.flatnonzero(assignments == cluster)
            picked.append(members[draw_rng.integers(0, len(members), per_cluster)])
        return np.concatenate(picked), sizes

    naive_draw_time = median_time(naive_draw, max(3, rounds // 5))

    def ours_update(step):
        seen = sampler.batch(1000 + step).indices
        sampler.update(rng.integers(0, k, len(seen)), seen)

    def naive_update(step):
        seen = rng.integers(0, n, b)
        assignments[seen] = rng.integers(0, k, b)
        sampler.update(assignments)

    ours_update_time = median_time(ours_update, rounds)
    naive_update_time = median_time(naive_update, max(3, rounds // 5))

    # -- importance ---------------------------------------------------------------------
    importance = ImportanceSampler(n, batch_size=b, seed=0, smoothing=0.1)
    importance.update(scores)
    ours_importance = median_time(importance.batch, rounds)

    def naive_importance(step):
        draw_rng = np.random.default_rng([0, step])
        p = 0.9 * scores / scores.sum(dtype=np.float64) + 0.1 / n
        p /= p.sum()
        indices = draw_rng.choice(n, b, p=p)
        return indices, 1.0 / (n * b * p[indices])

    naive_importance_time = median_time(naive_importance, max(3, rounds // 5))

    def importance_update(step):
        seen = importance.batch(1000 + step).indices
        importance.update(rng.uniform(0.1, 2.0, len(seen)), seen)

    importance_update_time = median_time(importance_update, rounds)

    results = {
        "stratified_draw_ms": 1e3 * ours_draw,
        "stratified_draw_naive_ms": 1e3 * naive_draw_time,
        "stratified_draw_ratio": naive_draw_time / ours_draw,
        "stratified_update_ms": 1e3 * ours_update_time,
        "stratified_update_rebuild_ms": 1e3 * naive_update_time,
        "stratified_update_ratio": naive_update_time / ours_update_time,
        "importance_draw_ms": 1e3 * ours_importance,
        "importance_draw_naive_ms": 1e3 * naive_importance_time,
        "importance_draw_ratio": naive_importance_time / ours_importance,
        "importance_update_ms": 1e3 * importance_update_time,
    }
    print(f"N={n} K={k} B={b}")
    for name, value in results.items():
        print(f"  {name:32s} {value:10.3f}")
    return results


if __name__ == "__main__":
    main()
