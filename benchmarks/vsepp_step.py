"""VSE++ train step on the precomp model: steps per second, and MH's cost over SH.

    python -m benchmarks.vsepp_step [--batch 128 --steps 20]

The reference setting: batch 128, 4096-d image features, word embeddings of 300, GRU
1024, vocabulary 10k, 12-token captions, Adam with gradient clipping. The same jitted step
(jaxeff.train.make_train_step) runs with the sum of hinges (SH, VSE0), the max of hinges
(MH, VSE++), top-5 hardest negatives, and the SH→MH blend used during warm-up; the loss
is a small part of the step, so MH should cost about the same as SH.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax

from jaxeff import losses
from jaxeff import train as jt
from jaxeff.models import vse_model


def make_loss(max_violation, top_k=None):
    def loss_fn(model, batch, hparams):
        img, cap = model(batch["image"], batch["tokens"], batch["lengths"])
        scores = losses.similarity_matrix(img, cap)
        hard = hparams["w"] if max_violation == "blend" else max_violation
        return losses.hinge_loss(scores, max_violation=hard, top_k=top_k), {}

    return loss_fn


def time_steps(loss_fn, batch, args):
    model = vse_model(
        image_encoder="precomp",
        img_dim=args.img_dim,
        vocab_size=args.vocab,
        word_dim=300,
        embed_size=args.embed,
        rngs=0,
    )
    tx = optax.chain(optax.clip_by_global_norm(2.0), optax.adam(2e-4))
    graphdef, state = jt.create_train_state(model, tx)
    step = jt.make_train_step(graphdef, loss_fn, tx)
    hp = {"w": np.float32(0.5)}
    for _ in range(3):  # compile and warm up
        state, metrics = step(state, batch, hp)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch, hp)
    jax.block_until_ready(metrics)
    return args.steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--img-dim", type=int, default=4096)
    parser.add_argument("--embed", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--length", type=int, default=12)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    b = args.batch
    batch = {
        "image": rng.normal(size=(b, args.img_dim)).astype(np.float32),
        "tokens": rng.integers(4, args.vocab, size=(b, args.length)).astype(np.int32),
        "lengths": rng.integers(6, args.length + 1, size=b).astype(np.int32),
        "image_id": np.arange(b, dtype=np.int32),
    }
    variants = {
        "SH (VSE0)": make_loss(False),
        "MH (VSE++)": make_loss(True),
        "MH top-5": make_loss(True, top_k=5),
        "SH->MH blend": make_loss("blend"),
    }
    print(
        f"VSE++ precomp train step, B={b}, {args.img_dim}-d features, GRU {args.embed}, "
        f"vocab {args.vocab}, {args.length} tokens, {jax.devices()[0].platform}"
    )
    rates = {}
    for name, loss_fn in variants.items():
        rates[name] = time_steps(loss_fn, batch, args)
        print(
            f"  {name:<13} {rates[name]:6.2f} steps/s  ({1000 / rates[name]:6.1f} ms/step)  "
            f"cost vs SH: {rates['SH (VSE0)'] / rates[name]:.3f}x"
        )


if __name__ == "__main__":
    main()
