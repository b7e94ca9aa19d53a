r"""Quickstart: hard negatives (VSE++) vs the sum of hinges (VSE0) on generated data.

    python -m experiments.quickstart [--workdir runs/quickstart] [--seeds 3]

Builds the near-twin shapes dataset (families of 8 images that differ in one attribute:
swapped positions, swapped colours, swapped shapes, ...), then trains the same model
twice per seed: with the sum of hinges (SH, VSE0) and with the max of hinges (MH,
VSE++, after an SH warm-up that avoids MH's collapse from scratch). Prints the test
retrieval table side by side with the paired R@1 gain, and writes
``<workdir>/results.json``, ``dev_curves.png`` and ``test_recalls.png``. Each run also
leaves ``metrics.jsonl`` and TensorBoard events in its own folder.

Faghri et al., "VSE++: Improving Visual-Semantic Embeddings with Hard Negatives",
BMVC 2018, https://arxiv.org/abs/1707.05612.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from absl import logging

from experiments.vsepp import plots, train
from experiments.vsepp.configs import shapes
from jaxeff import retrieval


def run_configs(steps: int, families: int, eval_families: int = 125):
    """The compared runs: name -> config."""
    sh = shapes.get_config()
    sh.loss.max_violation = False
    sh.loss.warmup_steps = 0
    mh = shapes.get_config()
    mh.loss.warmup_steps = steps // 3
    for config in (sh, mh):
        config.num_steps = steps
        config.eval_every = max(steps // 6, 1)
        config.checkpoint_every = config.eval_every
        config.data.train_families = families
        config.data.dev_families = config.data.test_families = eval_families
    return {"VSE0 (SH)": sh, "VSE++ (MH)": mh}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/quickstart")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per loss (paired)")
    parser.add_argument("--steps", type=int, default=3000, help="training steps per run")
    parser.add_argument("--families", type=int, default=1024, help="training families of 8")
    parser.add_argument("--eval-families", type=int, default=125, help="dev/test families of 8")
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.WARNING)  # keep checkpointing chatter out of the way

    tests, histories = {}, {}
    start = time.time()
    for seed in range(args.seeds):
        for name, config in run_configs(args.steps, args.families, args.eval_families).items():
            config.seed = seed
            config.data.data_dir = os.path.join(args.workdir, "tfds")  # built once, shared
            workdir = os.path.join(args.workdir, name.split()[0].lower(), f"seed{seed}")
            print(f"== {name}, seed {seed} -> {workdir}", flush=True)
            result = train.train_and_evaluate(config, workdir)
            if result["preempted"]:
                print("Preempted: run the same command again to continue where it stopped.")
                return None
            tests.setdefault(name, []).append(result["test"])
            histories.setdefault(name, []).append(result["history"])
            if result["collapsed"]:
                print(f"   warning: {name} collapsed (all similarities equal)")

    table = {name: retrieval.average(runs) for name, runs in tests.items()}
    print(f"\nTest set, mean over {args.seeds} seed(s), {time.time() - start:.0f} s in all:")
    print(retrieval.format_table(table))
    sh, mh = tests["VSE0 (SH)"], tests["VSE++ (MH)"]
    gains = {
        d: [getattr(b, d).r1 - getattr(a, d).r1 for a, b in zip(sh, mh, strict=True)]
        for d in ("i2t", "t2i")
    }
    for d, g in gains.items():
        print(
            f"MH - SH, {d} R@1: {np.mean(g):+.1f} points (per seed: "
            + ", ".join(f"{x:+.1f}" for x in g)
            + ")"
        )

    os.makedirs(args.workdir, exist_ok=True)
    plots.plot_dev_curves(histories, os.path.join(args.workdir, "dev_curves.png"))
    plots.plot_test_recalls(tests, os.path.join(args.workdir, "test_recalls.png"))
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(
            {
                "seeds": args.seeds,
                "steps": args.steps,
                "test": {n: [r.as_dict() for r in runs] for n, runs in tests.items()},
                "r1_gain_mh_minus_sh": gains,
            },
            f,
            indent=2,
        )
    print(f"Plots and results in {args.workdir}/")
    return table, gains


if __name__ == "__main__":
    main()
