"""Cost of one gradient-variance measurement against one training step, on the digits MLP.

    python -m benchmarks.gvar_measure [--rounds 20 --num_draws 10 --batch_size 32]

The model and data of ``experiments/gvar/configs/default.py``: scikit-learn's digits
(1438 training images), an MLP 64-128-128-10, plain SGD with batch ``B``. Timed, each as
a jit-compiled call on one device:

* one training step (``jaxeff.train.make_train_step``, SGD, batch ``B``);
* one measurement (``jaxeff.gvar.measure_variance``, ``m`` draws for the mean and ``m``
  for the variance) of SGD-``B``, SGD-``2B`` and SVRG-``B``;
* SVRG's snapshot (the full gradient over the training set);
* the exact statistics (``jaxeff.gvar.gradient_moments`` over the training set, from
  per-example sums of squares, then ``exact_variance``).

Times are the best of ``--rounds`` rounds after compilation; ratios are against the
training step. A measurement costs about ``2m`` mini-batch gradients (``4m`` for SVRG,
whose draws take two), so the ratio for SGD-B is near ``2m`` when a step is dominated by
its gradient, and lower when per-call overhead dominates (tiny models on CPU).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax
from flax import nnx

from experiments.gvar import train as gvar_train
from experiments.gvar.configs import default
from jaxeff import gvar
from jaxeff import train as jt


def best_time(fn, rounds: int) -> float:
    jax.block_until_ready(fn())  # compile
    best = np.inf
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--num_draws", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args(argv)

    config = default.get_config()
    config.batch_size = args.batch_size
    config.gvar.estimators = "sgd,sgd_2b,svrg"  # the estimators timed (see above)
    data = gvar_train.load_data(config)
    device = jax.devices()[0]
    train_data = jax.device_put(data.train, device)
    model = gvar_train.build_model(config, data, 0)
    example_loss = gvar_train.make_example_loss(config)
    tx = optax.sgd(config.learning_rate)
    graphdef, state = jt.create_train_state(model, tx)
    state = jax.device_put(state, device)

    def train_loss(model, batch, hparams):
        return example_loss(model, batch).mean(), {}

    step = jt.make_train_step(graphdef, train_loss, tx, donate=False)
    batch = jax.device_put({k: v[: args.batch_size] for k, v in data.train.items()}, device)
    model_state = state.model_state

    def params_loss(params, batch):
        return example_loss(nnx.merge(graphdef, params, model_state), batch)

    params = state.params
    estimators = gvar_train.make_estimators(config, params_loss)
    svrg = estimators["svrg"]
    svrg_init = jax.jit(svrg.init)
    svrg_state = svrg_init(params, train_data)
    key = jax.random.key(0)
    m = args.num_draws

    times = {"train step": best_time(lambda: step(state, batch)[1]["loss"], args.rounds)}
    for name, est in estimators.items():
        est_state = svrg_state if name == "svrg" else None
        times[f"measure {name} (m={m})"] = best_time(
            lambda est=est, s=est_state: (
                gvar.measure_variance(est, s, params, train_data, key, num_draws=m).variance
            ),
            args.rounds,
        )
    times["svrg snapshot (full gradient)"] = best_time(
        lambda: svrg_init(params, train_data).mean_grad, args.rounds
    )

    def exact():
        moments = gvar.gradient_moments(
            params_loss, params, train_data, chunk_size=config.gvar.chunk_size
        )
        return gvar.exact_variance(moments, batch_size=config.batch_size).variance

    times["exact statistics (per-example sum_sq)"] = best_time(exact, max(3, args.rounds // 4))

    n = gvar.num_examples(data.train)
    print(
        f"digits MLP 64-128-128-10, N={n}, B={args.batch_size}, m={m}, "
        f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})"
    )
    base = times["train step"]
    for name, seconds in times.items():
        print(f"  {name:<40} {seconds * 1e3:9.3f} ms   {seconds / base:8.1f}x step")
    return times


if __name__ == "__main__":
    main()
