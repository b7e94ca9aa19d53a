"""Fourier-L∞ PGD on a small CNN: the compiled attack vs the same attack in a Python loop.

    python -m benchmarks.robust_attack [--steps 10 --batch 128 --rounds 3]
    python -m benchmarks.robust_attack --sweep_only [--sweep_steps 1,5,10,20,40]

A CNN (3 conv + 1 dense, random weights) on a batch of ``--batch`` 32x32x3 images in
[0, 1], labelled with the model's own predictions (clean accuracy 1). One random start,
``--steps`` steps of length ε/4, ε = 8/255 (``--eps255``), cross-entropy loss. Side by side:

* ``jaxeff``: :func:`jaxeff.robust.pgd_attack`, one compiled program for the whole attack,
  looping (``unroll=False``) or with the steps written out (``unroll=True``): XLA:CPU runs a
  convolution's gradient inside a while loop 1.5-3x slower than outside one;
* ``python loop``: the same steps un-jitted, a Python loop calling ``jax.value_and_grad``
  and the library's ``maximizing_direction``/``project`` op by op;
* ``foolbox``: the loop of foolbox 3 (``BaseGradientDescent``, JAX through eagerpy), with
  the Fourier-L∞ step and projection plugged in (foolbox has no Fourier-domain attack).
  Also its built-in ``LinfPGD`` against ``pgd_attack(p=jnp.inf)``, a like-for-like pair.
  foolbox is optional (``pip install foolbox``); without it those rows are skipped.

The Fourier-L∞ rows use no input box: foolbox clips to the box after projecting, which
can leave a Fourier ball, while ``pgd_attack`` alternates the two (see its docstring);
the jaxeff attack with the box ``[0, 1]`` is timed on its own. The L∞ rows clip to
``[0, 1]`` in both libraries. Times are the best of ``--rounds`` interleaved rounds after
a warm-up call (which includes compilation for jaxeff, reported apart).

Unroll sweep (the measurement behind ``pgd_attack``'s ``unroll=None`` default): for each
step count of ``--sweep_steps`` (one restart, box ``[0, 1]``), L∞ and Fourier-L∞, on the
CNN above and on a digits-sized CNN (8x8x1 images, two 3x3 convolutions, batch 256): the
compile time (CPU seconds of an ahead-of-time compile) and the run time (best of
``--rounds`` interleaved calls) of the looped and the unrolled program, the speedup of
unrolling, and the number of calls after which its extra compile time is paid back
(negative: unrolling also compiled faster). Then what ``unroll=None`` picks for each step
count (it unrolls on CPU up to 32 steps when a forward pass costs at least 20 MFLOP).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.pergrad_stats import CNN, time_round_robin
from jaxeff.robust.attacks import _forward_flops, _split_model, _unroll_default, pgd_attack
from jaxeff.robust.norms import maximizing_direction, norm
from jaxeff.robust.projections import project

P = "fourier_inf"


def python_loop_attack(model, x, y, *, eps, steps, step_size, key):
    """The jaxeff attack's steps (one random start, no box) as a plain Python loop."""

    def loss(z):
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(model(z), y))

    noise = jax.random.uniform(jax.random.fold_in(key, 0), x.shape, x.dtype, -1, 1)
    delta = project(noise * eps, P, eps, batch_dims=1)
    for _ in range(steps):
        g = jax.grad(loss)(x + delta)
        delta = project(delta + step_size * maximizing_direction(g, P, batch_dims=1), P, eps,
                        batch_dims=1)  # fmt: skip
    return x + delta


def foolbox_attacks(steps, step_size):
    """foolbox's PGD loop with the Fourier-L∞ step and projection, and its LinfPGD; None
    when foolbox is not installed."""
    try:
        import eagerpy as ep
        import foolbox as fb
        from foolbox.attacks.gradient_descent_base import BaseGradientDescent
    except ImportError:
        return None

    class FourierLinf(fb.distances.Distance):
        def __call__(self, references, perturbed):
            (x, z), restore = ep.astensors_(references, perturbed)
            return restore(ep.astensor(norm(z.raw - x.raw, P, batch_dims=1)))

        def clip_perturbation(self, references, perturbed, epsilon):
            (x, z), restore = ep.astensors_(references, perturbed)
            return restore(ep.astensor(x.raw + project(z.raw - x.raw, P, epsilon, batch_dims=1)))

    class FourierLinfPGD(BaseGradientDescent):
        distance = FourierLinf()

        def get_random_start(self, x0, epsilon):
            noise = ep.uniform(x0, x0.shape, -epsilon, epsilon)
            return x0 + ep.astensor(project(noise.raw, P, epsilon, batch_dims=1))

        def normalize(self, gradients, *, x, bounds):
            return ep.astensor(maximizing_direction(gradients.raw, P, batch_dims=1))

        def project(self, x, x0, epsilon):
            return x0 + ep.astensor(project((x - x0).raw, P, epsilon, batch_dims=1))

    fourier = FourierLinfPGD(rel_stepsize=0.0, abs_stepsize=step_size, steps=steps,
                             random_start=True)  # fmt: skip
    linf = fb.attacks.LinfPGD(abs_stepsize=step_size, steps=steps, random_start=True)
    return fb, fourier, linf


class DigitsCNN(nnx.Module):
    """A CNN sized for 8x8x1 digits: two 3x3 convolutions (the second strided), a head."""

    def __init__(self, rngs):
        self.c1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
        self.c2 = nnx.Conv(16, 32, (3, 3), strides=2, rngs=rngs)
        self.fc = nnx.Linear(4 * 4 * 32, 10, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.c2(jax.nn.relu(self.c1(x))))
        return self.fc(h.reshape(h.shape[0], -1))


def compiled_attack(model, x, y, *, p, steps, eps, unroll):
    """``(compiled program, compile CPU seconds)`` of the whole attack on ``x``.

    The attack is compiled ahead of time inside an outer ``jax.jit`` (so compilation is
    timed apart from running); CPU time rather than wall time, so that other load on the
    machine does not inflate it (XLA compiles on one thread).
    """

    def attack(z):
        return pgd_attack(model, z, y, eps=eps, p=p, steps=steps, step_size=eps / 4,
                          key=jax.random.key(0), clip=(0.0, 1.0), unroll=unroll).x_adv  # fmt: skip

    start = time.process_time()
    program = jax.jit(attack).lower(x).compile()
    return program, time.process_time() - start


def unroll_sweep(name, model, x, steps_list, rounds, eps):
    """Looped against unrolled ``pgd_attack`` for each step count; prints one row each."""
    y = jnp.argmax(nnx.jit(lambda m, z: m(z))(model, x), axis=1)
    model_fn, state = _split_model(model)
    flops = _forward_flops(model_fn, state, x)
    print(
        f"  {name}: batch {'x'.join(map(str, x.shape))} ({flops / 1e6:.0f} MFLOP per forward "
        "pass), one restart, box [0, 1]"
    )
    print(
        f"    {'norm':<12}{'steps':>6}{'compile loop':>14}{'compile unrolled':>18}"
        f"{'run loop':>11}{'run unrolled':>14}{'speedup':>9}{'paid back after':>17}"
    )
    for p, label in ((jnp.inf, "L∞"), (P, "Fourier-L∞")):
        for steps in steps_list:
            programs, compile_s = {}, {}
            for unroll in (False, True):
                programs[unroll], compile_s[unroll] = compiled_attack(
                    model, x, y, p=p, steps=steps, eps=eps, unroll=unroll
                )
            runs = time_round_robin({u: (f, (x,)) for u, f in programs.items()}, rounds)
            (c_loop, c_unrolled), (r_loop, r_unrolled) = compile_s.values(), runs.values()
            saved = r_loop - r_unrolled
            calls = (c_unrolled - c_loop) / saved if saved > 0 else float("inf")
            print(
                f"    {label:<12}{steps:>6}{c_loop:>13.2f}s{c_unrolled:>17.2f}s"
                f"{1000 * r_loop:>9.1f}ms{1000 * r_unrolled:>12.1f}ms{r_loop / r_unrolled:>8.2f}x"
                f"{calls:>12.1f} calls"
            )
    picks = ", ".join(
        f"{s}: {'unrolled' if _unroll_default(model_fn, state, x, s, 1) else 'loop'}"
        for s in steps_list
    )
    print(f"    unroll=None picks (steps: program) {picks}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--eps255", type=float, default=8.0, help="ε in units of 1/255")
    parser.add_argument("--sweep_steps", default="1,5,10,20,40",
                        help="step counts of the unroll sweep (empty: no sweep)")  # fmt: skip
    parser.add_argument("--sweep_only", action="store_true", help="run the unroll sweep only")
    args = parser.parse_args()
    eps = args.eps255 / 255
    step_size = eps / 4
    model = CNN(nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(0, 1, size=(args.batch, 32, 32, 3)).astype(np.float32))
    sweep_steps = [int(s) for s in args.sweep_steps.split(",") if s.strip()]
    if sweep_steps:
        print(f"Unroll sweep on {jax.devices()[0].platform}, eps = {args.eps255:g}/255, step eps/4")
        unroll_sweep("CNN 3conv+1dense", model, x, sweep_steps, args.rounds, eps)
        digits = jnp.asarray(rng.uniform(0, 1, size=(256, 8, 8, 1)).astype(np.float32))
        unroll_sweep("digits CNN 2conv+1dense", DigitsCNN(nnx.Rngs(0)), digits, sweep_steps,
                     args.rounds, eps)  # fmt: skip
    if args.sweep_only:
        return
    y = jnp.argmax(nnx.jit(lambda m, z: m(z))(model, x), axis=1)
    key = jax.random.key(0)
    common = dict(eps=eps, steps=args.steps, step_size=step_size, key=key)
    print(
        f"PGD on {jax.devices()[0].platform} ({jax.device_count()} device(s)): CNN 3conv+1dense, "
        f"batch {args.batch}x32x32x3, {args.steps} steps, eps = {args.eps255:g}/255, step eps/4"
    )

    def jaxeff_attack(p, clip=None, unroll=False):
        return lambda: pgd_attack(model, x, y, p=p, clip=clip, unroll=unroll, **common).x_adv

    for unroll in (False, True):
        start = time.perf_counter()
        jax.block_until_ready(jaxeff_attack(P, unroll=unroll)())
        print(
            f"  jaxeff Fourier-L∞{', unrolled' if unroll else ''}: first call (compile + run) "
            f"{time.perf_counter() - start:.2f} s"
        )

    variants = {
        "jaxeff Fourier-L∞ (compiled)": (jaxeff_attack(P), ()),
        "jaxeff Fourier-L∞, unrolled": (jaxeff_attack(P, unroll=True), ()),
        "jaxeff Fourier-L∞, box [0,1]": (jaxeff_attack(P, (0.0, 1.0)), ()),
        "python loop Fourier-L∞": (
            lambda: python_loop_attack(
                model, x, y, eps=eps, steps=args.steps, step_size=step_size, key=key
            ),
            (),
        ),  # fmt: skip
    }
    library = foolbox_attacks(args.steps, step_size)
    if library is None:
        print("  foolbox is not installed (pip install foolbox): its rows are skipped")
    else:
        fb, fourier, linf = library
        unbounded = fb.JAXModel(lambda z: model(z), bounds=(-np.inf, np.inf))
        boxed = fb.JAXModel(lambda z: model(z), bounds=(0.0, 1.0))
        variants["foolbox Fourier-L∞ (its loop)"] = (
            lambda: fourier(unbounded, x, y, epsilons=eps)[1],
            (),
        )
        variants["jaxeff L∞, box [0,1]"] = (jaxeff_attack(jnp.inf, (0.0, 1.0)), ())
        variants["jaxeff L∞, box [0,1], unrolled"] = (
            jaxeff_attack(jnp.inf, (0.0, 1.0), unroll=True),
            (),
        )
        variants["foolbox LinfPGD, box [0,1]"] = (lambda: linf(boxed, x, y, epsilons=eps)[1], ())

    times = time_round_robin(variants, args.rounds)
    forward = nnx.jit(lambda m, z: m(z))
    for label, seconds in times.items():
        x_adv = variants[label][0]()
        accuracy = float(jnp.mean(jnp.argmax(forward(model, x_adv), axis=1) == y))
        print(
            f"  {label:<32} {1000 * seconds:9.1f} ms/batch   accuracy under attack {accuracy:.3f}"
        )
    for suffix in (" (compiled)", ", unrolled"):
        base = times[f"jaxeff Fourier-L∞{suffix}"]
        loop = times["python loop Fourier-L∞"] / base
        print(f"  python loop / jaxeff Fourier-L∞{suffix}: x{loop:.2f}")
        if library is not None:
            ratio = times["foolbox Fourier-L∞ (its loop)"] / base
            print(f"  foolbox / jaxeff Fourier-L∞{suffix}: x{ratio:.2f}")
    if library is not None:
        for suffix in ("", ", unrolled"):
            ratio = times["foolbox LinfPGD, box [0,1]"] / times[f"jaxeff L∞, box [0,1]{suffix}"]
            print(f"  foolbox LinfPGD / jaxeff L∞{suffix}: x{ratio:.2f}")


if __name__ == "__main__":
    main()
