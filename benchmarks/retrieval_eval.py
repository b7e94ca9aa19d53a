"""Retrieval evaluation at COCO 5K scale: jaxeff vs a per-query numpy implementation.

    python -m benchmarks.retrieval_eval [--images 5000 --dim 1024]

Both implementations score 5K images against 25K captions (random unit embeddings,
captions near their image so ranks are non-trivial). The numpy baseline follows the
VSE++ evaluation code: for each image query (and for each group of 5 caption queries)
score everything and argsort. Each runs in its own process so peak memory (max RSS) is
its own. Prints times, the speed-up, peak memory, whether the metrics agree and how many
ranks differ (only float32 near-ties can: the dot products are summed in another order).

The baseline is independent of jaxeff: it computes its own scores and reads each query's
own score out of that query's row. It breaks exact ties by argsort's order where jaxeff
counts them against the model; random embeddings have no exact ties, so the two agree.
jaxeff scores each pair twice (once in an image's row, once in a caption's row), so that
each query's threshold and the scores compared with it come from one computation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def make_embeddings(n, d, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, d)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    captions = np.repeat(images, 5, axis=0) + rng.normal(size=(5 * n, d)).astype(np.float32)
    captions /= np.linalg.norm(captions, axis=1, keepdims=True)
    return images, captions


def numpy_ranks(images, captions):
    n = len(images)
    i2t = np.zeros(n, np.int64)
    for i in range(n):
        order = np.argsort(captions @ images[i])[::-1]
        i2t[i] = min(np.where(order == c)[0][0] for c in range(5 * i, 5 * i + 5))
    t2i = np.zeros(5 * n, np.int64)
    for i in range(n):
        scores = captions[5 * i : 5 * i + 5] @ images.T
        for j in range(5):
            order = np.argsort(scores[j])[::-1]
            t2i[5 * i + j] = np.where(order == i)[0][0]
    return i2t, t2i


def jaxeff_ranks(images, captions):
    from jaxeff import retrieval

    return retrieval.retrieval_ranks(images, captions)


def run_one(impl, n, d, out):
    images, captions = make_embeddings(n, d)
    fn = {"numpy": numpy_ranks, "jaxeff": jaxeff_ranks}[impl]
    start = time.perf_counter()
    i2t, t2i = fn(images, captions)
    seconds = time.perf_counter() - start
    # jaxeff compiles on the first call; an evaluation every epoch reuses the compiled code.
    again = None
    if impl == "jaxeff":
        start = time.perf_counter()
        fn(images, captions)
        again = time.perf_counter() - start
    np.savez(out, i2t=i2t, t2i=t2i)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"impl": impl, "seconds": seconds, "again": again, "peak_rss_mb": peak_mb}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--impl", choices=["numpy", "jaxeff"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        return run_one(args.impl, args.images, args.dim, args.out)

    results, ranks = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for impl in ("jaxeff", "numpy"):
            out = os.path.join(tmp, f"{impl}.npz")
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.retrieval_eval",
                "--impl",
                impl,
                "--images",
                str(args.images),
                "--dim",
                str(args.dim),
                "--out",
                out,
            ]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[impl] = json.loads(line.strip().splitlines()[-1])
            ranks[impl] = dict(np.load(out))
    from jaxeff.retrieval import rank_metrics

    metrics = {impl: [rank_metrics(r[k]) for k in ("i2t", "t2i")] for impl, r in ranks.items()}
    differ = {k: ranks["jaxeff"][k] != ranks["numpy"][k] for k in ("i2t", "t2i")}
    max_gap = max(
        int(np.max(np.abs(ranks["jaxeff"][k] - ranks["numpy"][k]), initial=0)) for k in differ
    )
    print(f"retrieval ranks, {args.images} images x {5 * args.images} captions, d={args.dim}")
    for impl, r in results.items():
        again = f" (compiled: {r['again']:.2f} s)" if r["again"] else ""
        print(f"  {impl:<7} {r['seconds']:8.2f} s{again}   peak RSS {r['peak_rss_mb']:6.0f} MB")
    base = results["numpy"]["seconds"]
    print(
        f"  speed-up (numpy / jaxeff): {base / results['jaxeff']['seconds']:.1f}x first call, "
        f"{base / results['jaxeff']['again']:.1f}x compiled"
    )
    gap = np.max(np.abs(np.subtract(metrics["jaxeff"], metrics["numpy"])))
    print(f"  R@1/5/10, medr, meanr: largest difference {gap:.2g}")
    print(
        f"  ranks that differ: i2t {differ['i2t'].sum()}/{differ['i2t'].size}, t2i "
        f"{differ['t2i'].sum()}/{differ['t2i'].size}, by at most {max_gap} (float32 near-ties: "
        f"the two sum the {args.dim} products in different orders)"
    )
    full_matrix_mb = args.images * 5 * args.images * 4 / 2**20
    print(f"  (a full float32 score matrix alone would take {full_matrix_mb:.0f} MB)")


if __name__ == "__main__":
    main()
