r"""Quickstart: one short run per research result, on data that ships with jaxeff or its
dependencies.

    python -m experiments.quickstart [--workdir runs/quickstart] [--seeds 3]
        [--sections vsepp,gvar,robust]

* ``vsepp``: hard negatives (VSE++) vs the sum of hinges (VSE0) on generated near-twin
  shape scenes (families of 8 images that differ in one attribute). The same model is
  trained twice per seed, with the sum of hinges (SH, VSE0) and with the max of hinges
  (MH, VSE++, after an SH warm-up that avoids MH's collapse from scratch); prints the test
  retrieval table with the paired R@1 gain and writes ``dev_curves.png`` and
  ``test_recalls.png``. Faghri et al., "VSE++: Improving Visual-Semantic Embeddings with
  Hard Negatives", BMVC 2018, https://arxiv.org/abs/1707.05612.
* ``gvar``: gradient variance of SGD with batch B, SGD with 2B, SVRG, gradient clustering
  (stratified batches over gradient clusters), importance sampling and SGD's exact
  variance along one SGD run of an MLP on scikit-learn's digits; prints the mean of each
  over the run and writes ``gradient_variance.png``; then trains with uniform and with GC
  batches on the digits with 10 images repeated 100 times and prints GC's steps to
  uniform's training loss against uniform's (``experiments.sampling_speed``). Faghri,
  Duvenaud, Fleet, Ba, "A Study of Gradient Variance in Deep Learning",
  https://arxiv.org/abs/2007.04532.
* ``robust``: gradient descent, coordinate descent and sign descent on separable Gaussian
  data (d = 100, d/n = 4) against the L2, L1 and L∞ max-margin classifiers (cvxpy): each
  optimiser ends at the max-margin solution of its own norm and is the most robust under
  the dual norm's perturbations. Faghri et al., "Bridging the Gap Between Adversarial
  Robustness and Optimization Bias", https://arxiv.org/abs/2102.08868.

Everything lands in ``<workdir>/results.json``; each run also leaves ``metrics.jsonl`` and
TensorBoard events in its own folder.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np
from absl import logging

from experiments.gvar import train as gvar_train
from experiments.gvar.configs import default as gvar_default
from experiments.robust import train as robust_train
from experiments.robust.configs import quick as robust_quick
from experiments.sampling_speed import train as speed_train
from experiments.sampling_speed.configs import quickstart as speed_quickstart
from experiments.vsepp import plots, train
from experiments.vsepp.configs import shapes
from jaxeff import gvar, retrieval
from jaxeff.train import distributed

SECTIONS = ("vsepp", "gvar", "robust")


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


class Preempted(Exception):
    """A run stopped on SIGTERM after saving; rerunning the quickstart continues it."""


# ----------------------------------------------------------------------------------------
# Hard negatives (VSE++).
# ----------------------------------------------------------------------------------------
def vsepp_section(args) -> dict:
    """SH and SH→MH per seed; the test table, the paired R@1 gain and two plots."""
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
                raise Preempted
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
    if jax.process_index() == 0:
        plots.plot_dev_curves(histories, os.path.join(args.workdir, "dev_curves.png"))
        plots.plot_test_recalls(tests, os.path.join(args.workdir, "test_recalls.png"))
    return {
        "table": table,
        "gains": gains,
        "json": {
            "seeds": args.seeds,
            "steps": args.steps,
            "test": {n: [r.as_dict() for r in runs] for n, runs in tests.items()},
            "r1_gain_mh_minus_sh": gains,
        },
    }


# ----------------------------------------------------------------------------------------
# Gradient variance.
# ----------------------------------------------------------------------------------------
def gvar_section(args) -> dict:
    """One SGD run on digits, its estimators measured along the way; a table and a plot."""
    config = gvar_default.get_config()
    config.num_steps = args.gvar_steps
    config.gvar.measure_every = max(args.gvar_steps // 30, 1)
    config.gvar.svrg_snapshot_every = max(args.gvar_steps // 6, 1)
    config.checkpoint_every = args.gvar_steps
    workdir = os.path.join(args.workdir, "gvar")
    print(f"== gradient variance, digits MLP, batch {config.batch_size} -> {workdir}", flush=True)
    start = time.time()
    result = gvar_train.train_and_evaluate(config, workdir)
    if result["preempted"]:
        raise Preempted
    records = result["records"]
    names = list(dict.fromkeys(r["estimator"] for r in records))
    mean = {
        name: float(np.mean([r["variance"] for r in records if r["estimator"] == name]))
        for name in names
    }
    steps = len({r["step"] for r in records})
    print(f"\nMean over {steps} measured steps, {time.time() - start:.0f} s:")
    print(f"{'estimator':<12} {'variance':>10} {'/ SGD-B':>8}")
    for name in names:
        print(f"{name:<12} {mean[name]:10.3g} {mean[name] / mean['sgd']:8.2f}")
    if jax.process_index() == 0:
        gvar.plot_records(
            records,
            os.path.join(args.workdir, "gradient_variance.png"),
            title=f"digits MLP, batch {config.batch_size}",
        )
    speed = steps_to_target(args) if jax.process_index() == 0 else None
    json_out = {"mean_variance": mean, "steps_to_target": speed}
    return {"mean_variance": mean, "test": result["final"], "json": json_out}


def steps_to_target(args) -> dict:
    """GC's steps to uniform's training loss on duplicated digits, against uniform's own
    (``experiments.sampling_speed``, one seed, 600 steps at the default ``--gvar-steps``)."""
    config = speed_quickstart.get_config()
    unit = max(round(args.gvar_steps / 120), 1)  # steps between evaluations: 25
    config.eval_every, config.refresh_every = unit, 4 * unit
    config.num_steps, config.target_step = 24 * unit, 12 * unit
    result = speed_train.train_and_evaluate(config, os.path.join(args.workdir, "sampling_speed"))
    rows = {s: r["per_seed"][0] for s, r in result["regimes"]["duplicates"]["samplers"].items()}
    uniform, gc = rows["uniform"], rows["gc"]
    reached = (
        f"in {gc['step_to_loss']} steps ({gc['seconds_to_loss']:.2f} s, clustering included)"
        if gc["step_to_loss"] is not None
        else f"not within {config.num_steps} steps"
    )
    print(
        f"GC on duplicated digits reaches uniform's training loss at step {config.target_step} "
        f"{reached}; uniform: {uniform['step_to_loss']} steps ({uniform['seconds_to_loss']:.2f} s)"
    )
    return {
        "target_step": config.target_step,
        "uniform": {k: uniform[k] for k in ("step_to_loss", "seconds_to_loss")},
        "gc": {k: gc[k] for k in ("step_to_loss", "seconds_to_loss")},
    }


# ----------------------------------------------------------------------------------------
# Robustness and optimisation bias of linear models.
# ----------------------------------------------------------------------------------------
def robust_section(args) -> dict:
    """Steepest descent in L2/L1/L∞ vs the max-margin classifiers at d/n = 4; a table."""
    config = robust_quick.get_config()
    config.num_seeds = args.seeds
    workdir = os.path.join(args.workdir, "robust")
    print(f"== optimisation bias of linear models, d/n = 4 -> {workdir}", flush=True)
    result = robust_train.train_and_evaluate(config, workdir)  # prints its table
    return {"summary": result["summary"], "json": {"summary": result["summary"]}}


# ----------------------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/quickstart")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    parser.add_argument("--seeds", type=int, default=1, help="VSE++: seeds per loss (paired)")
    parser.add_argument("--steps", type=int, default=4500, help="VSE++: training steps per run")
    parser.add_argument("--families", type=int, default=1024, help="VSE++: families of 8")
    parser.add_argument("--eval-families", type=int, default=125, help="VSE++: dev/test families")
    parser.add_argument("--gvar-steps", type=int, default=3000, help="gradient variance: steps")
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {list(SECTIONS)}")
    logging.set_verbosity(logging.WARNING)  # keep checkpointing chatter out of the way
    # Under `python -m experiments.launch.local` or on a pod the processes join one
    # cluster; every section runs unchanged and process 0 writes the files.
    distributed.initialize_distributed()

    os.makedirs(args.workdir, exist_ok=True)
    run = {"vsepp": vsepp_section, "gvar": gvar_section, "robust": robust_section}
    results, seconds = {}, {}
    try:
        for name in sections:
            start = time.time()
            results[name] = run[name](args)
            seconds[name] = round(time.time() - start, 1)
    except Preempted:
        print("Preempted: run the same command again to continue where it stopped.")
        return None
    if jax.process_index() == 0:
        with open(os.path.join(args.workdir, "results.json"), "w") as f:
            summary = {"seconds": seconds, **{k: v["json"] for k, v in results.items()}}
            json.dump(summary, f, indent=2)
        print(f"Sections took {seconds} seconds. Plots and results in {args.workdir}/")
    return results


if __name__ == "__main__":
    main()
