"""VSE++ train step on the precomp model against the machine's dense matmul throughput.

    python -m benchmarks.vsepp_step [--batch 128 --rounds 6 --unroll 1 --torch]

The reference setting: batch 128, 4096-d image features, word embeddings of 300, GRU
1024, vocabulary 10k, 12-token captions, Adam with gradient clipping at 2. One run
measures, in interleaved rounds (so that a busy machine slows all of them alike):

* the throughput of a 2048×2048 float32 matrix product in this process;
* the jitted train step (``jaxeff.train.make_train_step``) with the sum of hinges (SH,
  VSE0), the max of hinges (MH, VSE++), the top-5 hardest negatives and the SH→MH blend:
  time per step, its matrix-product work (counted from the step's jaxpr, loops included)
  per second, and that as a fraction of the matmul throughput;
* where the MH step's time goes: the forward pass, forward + backward, the GRU layer
  alone (input projection and time loop, forward + backward), the optimizer update
  alone, the matrix products of the step timed one by one (the floor for the step), the
  host's dispatch
  time, the cost of a NumPy batch (host to device) over a device one, and the minor page
  faults per step;
* with ``--torch`` and PyTorch installed, the same model, loss and optimizer in PyTorch
  (``nn.GRU`` on packed sequences, as the reference code), on the same device.

With ``--hugepages`` the script also runs itself again with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` and prints both: XLA on CPU allocates each
step's temporary buffer afresh (over 100 MB here), and glibc maps it with 4 KiB pages, so
every step pays a page fault per 4 KiB; transparent huge pages remove most of that.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import resource
import subprocess
import sys
import time

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxeff import losses
from jaxeff import train as jt
from jaxeff.models import vse_model
from jaxeff.models.gru import gru_sequence, resolve_unroll

MATMUL_SIZE = 2048


# ----------------------------------------------------------------------------------------
# Work counted from a jaxpr.
# ----------------------------------------------------------------------------------------
def _sub_jaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _sub_jaxprs(v)


def _total_flops(products) -> float:
    """FLOPs of ``{(lhs shape, rhs shape, dimension numbers): count}``: ``2·M·N·K`` each,
    i.e. twice the lhs size times the rhs's free (neither contracted nor batch) size."""
    total = 0.0
    for (lhs, rhs, ((_, rhs_contract), (_, rhs_batch))), count in products.items():
        free = math.prod(d for i, d in enumerate(rhs) if i not in (*rhs_contract, *rhs_batch))
        total += count * 2.0 * math.prod(lhs) * free
    return total


def dot_shapes(jaxpr, times: int = 1) -> collections.Counter:
    """``{(lhs shape, rhs shape, dimension numbers): count}`` of the jaxpr's products, scan
    bodies counted once per step and, of a ``cond``'s branches, the costliest."""
    found = collections.Counter()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            shapes = (eqn.invars[0].aval.shape, eqn.invars[1].aval.shape)
            found[(*shapes, eqn.params["dimension_numbers"])] += times
        elif name == "cond":  # one branch runs
            branches = [dot_shapes(j, times) for j in _sub_jaxprs(eqn.params["branches"])]
            found.update(max(branches, key=_total_flops))
        else:
            inner = times * (eqn.params["length"] if name == "scan" else 1)
            for value in eqn.params.values():
                for sub in _sub_jaxprs(value):
                    found.update(dot_shapes(sub, inner))
    return found


def matmul_flops(jaxpr) -> float:
    """FLOPs of every ``dot_general`` in ``jaxpr`` (see :func:`dot_shapes`)."""
    return _total_flops(dot_shapes(jaxpr))


# ----------------------------------------------------------------------------------------
# The JAX step and its parts.
# ----------------------------------------------------------------------------------------
def make_loss(max_violation, top_k=None):
    def loss_fn(model, batch, hparams):
        img, cap = model(batch["image"], batch["tokens"], batch["lengths"])
        scores = losses.similarity_matrix(img, cap)
        hard = hparams["w"] if max_violation == "blend" else max_violation
        return losses.hinge_loss(scores, max_violation=hard, top_k=top_k), {}

    return loss_fn


VARIANTS = {
    "SH (VSE0)": make_loss(False),
    "MH (VSE++)": make_loss(True),
    "MH top-5": make_loss(True, top_k=5),
    "SH->MH blend": make_loss("blend"),
}
HPARAMS = {"w": np.float32(0.5)}


def make_tx():
    return optax.chain(optax.clip_by_global_norm(2.0), optax.adam(2e-4))


def build_model(args):
    return vse_model(
        image_encoder="precomp",
        img_dim=args.img_dim,
        vocab_size=args.vocab,
        word_dim=300,
        embed_size=args.embed,
        gru_unroll=args.unroll,
        rngs=0,
    )


class Stepper:
    """A jitted train step run in place on its own copy of the state."""

    def __init__(self, loss_fn, batch, args):
        tx = make_tx()
        self.graphdef, self.state = jt.create_train_state(build_model(args), tx)
        self.loss_fn = loss_fn
        self.step = jt.make_train_step(self.graphdef, loss_fn, tx)
        self.batch = batch
        self.jaxpr = jax.make_jaxpr(self.step.jitted)(self.state, batch, HPARAMS).jaxpr
        self.flops = matmul_flops(self.jaxpr)

    def __call__(self):
        self.state, metrics = self.step(self.state, self.batch, HPARAMS)
        return metrics


def part_functions(stepper, args):
    """Jitted pieces of ``stepper``'s step, each a zero-argument callable."""
    graphdef, state = stepper.graphdef, jax.tree.map(jnp.copy, stepper.state)
    loss_fn, batch = stepper.loss_fn, stepper.batch

    def loss_of(params):
        model = nnx.merge(graphdef, params, state.model_state, copy=True)
        return loss_fn(model, batch, HPARAMS)[0]

    forward = jax.jit(loss_of)
    backward = jax.jit(jax.grad(loss_of))
    grads = backward(state.params)
    tx = make_tx()
    opt_state = tx.init(state.params)

    def apply(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    optimizer = jax.jit(apply, donate_argnums=(0, 1))
    opt_args = [jax.tree.map(jnp.copy, state.params), opt_state]

    def run_optimizer():
        opt_args[0], opt_args[1] = optimizer(opt_args[0], opt_args[1], grads)
        return opt_args[0]

    rng = np.random.default_rng(1)
    h, b, length = args.embed, args.batch, args.length
    rec_args = [
        jnp.asarray(rng.normal(size=(length, b, 300)), jnp.float32),
        jnp.asarray(rng.normal(size=(300, 3 * h)) / math.sqrt(300), jnp.float32),
        jnp.zeros((3 * h,), jnp.float32),
        jnp.asarray(rng.normal(size=(h, 3 * h)) / math.sqrt(h), jnp.float32),
        jnp.zeros((3 * h,), jnp.float32),
    ]
    mask = jnp.ones((length, b, 1), bool)

    def layer(x, *params):
        out = gru_sequence(x, mask, *params, jnp.zeros((b, h)), resolve_unroll(args.unroll))
        return jnp.sum(out[-1] ** 2)

    rec = jax.jit(jax.grad(layer, argnums=(0, 1, 2, 3, 4)))
    products = []
    for (lhs, rhs, dims), count in dot_shapes(stepper.jaxpr).items():
        x = jnp.ones(lhs, jnp.float32)
        y = jnp.ones(rhs, jnp.float32)
        fn = jax.jit(lambda x, y, dims=dims: jax.lax.dot_general(x, y, dims))
        products.append((count, fn, x, y))

    def all_products():
        out = None
        for count, fn, x, y in products:
            for _ in range(count):
                out = fn(x, y)
        return out

    rec_flops = 3 * length * 2.0 * b * (h + 300) * 3 * h
    return {
        "forward": (lambda: forward(state.params), None),
        "forward + backward": (lambda: backward(state.params), None),
        "GRU layer fwd+bwd": (lambda: rec(*rec_args), rec_flops),
        "optimizer (clip + adam)": (run_optimizer, None),
        "the step's matmuls alone": (all_products, stepper.flops),
    }


def timed(fn, repeats):
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


# ----------------------------------------------------------------------------------------
# The same model in PyTorch.
# ----------------------------------------------------------------------------------------
def torch_stepper(max_violation, batch, args):
    """A PyTorch train step of the same model, or ``None`` when PyTorch is missing."""
    try:
        import torch
    except ImportError:
        return None
    from torch import nn

    device = "cuda" if jax.devices()[0].platform == "gpu" and torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(args.img_dim, args.embed)
            self.embed = nn.Embedding(args.vocab, 300)
            self.gru = nn.GRU(300, args.embed, batch_first=True)

        def forward(self, images, tokens, lengths):
            img = nn.functional.normalize(self.fc(images), dim=1)
            packed = nn.utils.rnn.pack_padded_sequence(
                self.embed(tokens), lengths, batch_first=True, enforce_sorted=False
            )
            _, h = self.gru(packed)
            return img, nn.functional.normalize(h[0], dim=1)

    model = Model().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    images = torch.as_tensor(batch["image"], device=device)
    tokens = torch.as_tensor(batch["tokens"], dtype=torch.long, device=device)
    lengths = torch.as_tensor(batch["lengths"], dtype=torch.long)  # on the host, as packing wants
    eye = torch.eye(args.batch, dtype=torch.bool, device=device)

    def step():
        img, cap = model(images, tokens, lengths)
        scores = img @ cap.t()
        diag = scores.diag()
        cost_s = (0.2 + scores - diag[:, None]).clamp(min=0).masked_fill(eye, 0)
        cost_im = (0.2 + scores - diag[None, :]).clamp(min=0).masked_fill(eye, 0)
        if max_violation:
            loss = cost_s.max(1)[0].sum() + cost_im.max(0)[0].sum()
        else:
            loss = cost_s.sum() + cost_im.sum()
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        return loss

    def run():
        step()
        if device == "cuda":
            torch.cuda.synchronize()

    return run, f"PyTorch {torch.__version__} on {device}"


# ----------------------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--img-dim", type=int, default=4096)
    parser.add_argument("--embed", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--length", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=4, help="steps per round")
    parser.add_argument(
        "--unroll",
        type=int,
        default=None,
        help="GRU steps per loop iteration (default: by backend)",
    )
    parser.add_argument("--variants", default="all", help="'all' or e.g. 'SH,MH'")
    parser.add_argument("--torch", action="store_true", help="also time PyTorch (if installed)")
    parser.add_argument("--hugepages", action="store_true", help="also run with huge pages")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    b = args.batch
    host_batch = {
        "image": rng.normal(size=(b, args.img_dim)).astype(np.float32),
        "tokens": rng.integers(4, args.vocab, size=(b, args.length)).astype(np.int32),
        "lengths": rng.integers(6, args.length + 1, size=b).astype(np.int32),
    }
    host_batch["lengths"][0] = args.length
    batch = jax.device_put(host_batch)
    wanted = args.variants.split(",")
    names = [n for n in VARIANTS if args.variants == "all" or n.split(" (")[0] in wanted]
    device = jax.devices()[0]
    print(
        f"VSE++ precomp train step, B={b}, {args.img_dim}-d features, GRU {args.embed}, "
        f"vocab {args.vocab}, {args.length} tokens, unroll {resolve_unroll(args.unroll)}, "
        f"{device.platform} ({device.device_kind}), {os.cpu_count()} CPU cores, "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}"
    )

    a = jnp.ones((MATMUL_SIZE, MATMUL_SIZE), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    timers = {"matmul": lambda: matmul(a)}
    steppers = {name: Stepper(VARIANTS[name], batch, args) for name in names}
    timers.update(steppers)
    focus = "MH (VSE++)" if "MH (VSE++)" in steppers else names[0]  # the step taken apart
    focused = steppers[focus]
    timers["NumPy batch"] = Stepper(VARIANTS[focus], host_batch, args)
    parts = part_functions(focused, args)
    timers.update({name: fn for name, (fn, _) in parts.items()})
    torch_runs = {}
    if args.torch:
        for name, hard in (("SH (VSE0)", False), ("MH (VSE++)", True)):
            made = torch_stepper(hard, host_batch, args)
            if made is None:
                print("PyTorch is not installed; skipping it.")
                break
            torch_runs[name] = made[0]
            torch_label = made[1]
            timers[f"torch {name}"] = made[0]

    for fn in timers.values():  # compile and warm up
        for _ in range(2):
            jax.block_until_ready(fn())
    seconds = {name: [] for name in timers}
    for _ in range(args.rounds):
        for name, fn in timers.items():
            seconds[name].append(timed(fn, args.steps))
    med = {name: float(np.median(s)) for name, s in seconds.items()}
    best = {name: float(np.min(s)) for name, s in seconds.items()}

    # Page faults and dispatch time of that step, measured apart from the rounds.
    jax.block_until_ready(focused())
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    dispatch = []
    for _ in range(args.steps):
        start = time.perf_counter()
        metrics = focused()
        dispatch.append(time.perf_counter() - start)
        jax.block_until_ready(metrics)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.steps

    peak = 2.0 * MATMUL_SIZE**3 / best["matmul"]
    print(
        f"matmul {MATMUL_SIZE}x{MATMUL_SIZE}: {peak / 1e9:.0f} GFLOP/s "
        f"(best of {args.rounds} rounds; {2.0 * MATMUL_SIZE**3 / med['matmul'] / 1e9:.0f} median)"
    )
    print(f"step matrix-product work: {focused.flops / 1e9:.1f} GFLOP (forward + backward)")
    print(f"{'':<26}{'ms/step':>9}{'(median)':>10}{'GFLOP/s':>9}{'of matmul':>11}")
    for name in names:
        flops = steppers[name].flops
        print(
            f"  {name:<24}{best[name] * 1e3:9.1f}{med[name] * 1e3:10.1f}"
            f"{flops / best[name] / 1e9:9.0f}{flops / best[name] / peak:11.2f}"
        )
    print(f"Where the {focus} step's time goes (best of rounds, ms):")
    for name, (_, flops) in parts.items():
        extra = f"  ({flops / best[name] / peak:.2f} of matmul)" if flops else ""
        print(f"  {name:<30}{best[name] * 1e3:8.1f}{extra}")
    print(f"  {'whole step':<30}{best[focus] * 1e3:8.1f}")
    host_cost = best["NumPy batch"] - best[focus]
    print(
        f"  host: dispatch {np.median(dispatch) * 1e3:.2f} ms per step; a NumPy batch "
        f"(host to device) adds {host_cost * 1e3:+.1f} ms; "
        f"{faults:.0f} minor page faults per step"
    )
    if torch_runs:
        print(f"{torch_label}, same model, loss and optimizer:")
        for name in torch_runs:
            t = best[f"torch {name}"]
            flops = steppers[name].flops if name in steppers else focused.flops
            ours = best.get(name, float("nan"))
            print(
                f"  {name:<24}{t * 1e3:9.1f} ms/step  {flops / t / peak:.2f} of matmul;  "
                f"jaxeff is {t / ours:.2f}x as fast"
            )
    if args.hugepages and "hugetlb" not in os.environ.get("GLIBC_TUNABLES", ""):
        env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
        argv = [a for a in sys.argv[1:] if a not in ("--hugepages", "--torch")]
        print("\nAgain with transparent huge pages for glibc's large allocations:", flush=True)
        subprocess.run([sys.executable, "-m", "benchmarks.vsepp_step", *argv], env=env, check=True)


if __name__ == "__main__":
    main()
