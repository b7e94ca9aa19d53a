"""A tiny model, loss and batches shared by the jaxeff.train tests."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class MLP(nnx.Module):
    """3 -> 8 -> 2 MLP, optionally with batch norm (state) and dropout (RNG)."""

    def __init__(self, rngs, din=3, dhidden=8, dout=2, batch_norm=False, dropout=0.0):
        self.fc1 = nnx.Linear(din, dhidden, rngs=rngs)
        self.bn = nnx.BatchNorm(dhidden, rngs=rngs) if batch_norm else None
        self.drop = nnx.Dropout(dropout, rngs=rngs) if dropout else None
        self.fc2 = nnx.Linear(dhidden, dout, rngs=rngs)

    def __call__(self, x):
        h = self.fc1(x)
        if self.bn is not None:
            h = self.bn(h)
        h = jax.nn.relu(h)
        if self.drop is not None:
            h = self.drop(h)
        return self.fc2(h)


def mse_loss(model, batch, hparams):
    err = jnp.mean((model(batch["x"]) - batch["y"]) ** 2)
    return hparams["weight"] * err, {"mse": err}


def make_batch(seed, n=16):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(n, 3)).astype(np.float32),
        "y": rng.normal(size=(n, 2)).astype(np.float32),
    }
