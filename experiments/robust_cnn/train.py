"""Fourier-L∞, L∞ and L2 attacks on a small CNN: ``train_and_evaluate(config, workdir)``.

Faghri, Gowal, Vasconcelos, Fleet, Pedregosa, Le Roux, "Bridging the Gap Between
Adversarial Robustness and Optimization Bias", https://arxiv.org/abs/2102.08868, CIFAR-10
experiments: a standard-trained CNN is attacked by projected gradient ascent within
``||δ||_p <= ε`` for each norm of ``config.attack.norms`` (:data:`NORMS`) and each radius
of its grid ``config.attack.eps.<norm>``, with :func:`jaxeff.robust.pgd_attack`. The Fourier-L∞ ball
bounds the modulus of every coefficient of the per-channel orthonormal 2-D DFT of ``δ``,

.. math::

  ||\\delta||_{F\\infty} = \\max_{c, k} |(F \\delta_{:, :, c})[k]| \\le \\epsilon,

and its attack steps along ``F⁻¹(G / |G|)`` (``G`` the DFT of the gradient) and clips the
modulus of each coefficient at ε. Lp-bounded adversarial perturbations tend to
concentrate in the Fourier domain, which the paper explains through the linear case,
while the Fourier-L∞ ball allows modulus ε on *every* coefficient: at the same ε its
perturbations spread their energy over all frequencies. The spectrum figure shows the
mean ``|F δ| / ε`` of both, and ``results.json`` the share of the energy held by the top
10% of coefficients (:func:`top_share`; 0.1 for a flat spectrum).

Robust accuracy. An attacked test point counts as broken at ``ε`` when the attack
succeeded at some radius ``ε' <= ε`` of the grid (a perturbation in the smaller ball lies
in the larger one), so each curve is non-increasing and starts, at ``ε = 0``, at the
clean accuracy of the attacked points; every value is an upper bound on the true robust
accuracy. With ``model.name = "linear"`` the exact robust accuracy is known in closed
form (:func:`jaxeff.robust.robust_accuracy`) and is recorded next to the attack's: without
the box (``attack.clip = False``) a multi-targeted attack (``attack.multi_targeted``: one
attack toward each other class, Gowal et al., "An Alternative Surrogate Loss for PGD-based
Adversarial Testing", arXiv 1910.09338) reaches it exactly; with the box the closed form
is a lower bound.

On many processes (``jaxeff.train.distributed.initialize_distributed`` first, as
``main.py`` does) the same code runs on every process. Training is data parallel over
every device of every process: each process feeds its share of each global batch, the
parameters are replicated, so the run trains the model of one process (the same batches,
the same numbers up to the order of float reductions). The clean evaluation and the
attacks are split by rows (:func:`split_rows`): each process attacks its slice of every
global batch on its own devices, and the per-row results are reassembled in order on
every process (:func:`jaxeff.train.distributed.gather_rows`). An attack's random start at
a row depends only on the seed, the norm, the radius and the row's index in the test set
(:func:`attack_batch`), so the curves, spectra and saved perturbations do not depend on
how the rows are split over processes, devices or batches. Process 0 alone writes
files, and no process reads one back: ``config.json`` is checked on process 0, which tells
the others (:func:`jaxeff.train.distributed.broadcast_from_process_zero`).

The run reads top to bottom: config, data, model and optimizer, sharding, update step,
checkpoint (a rerun resumes, or skips finished training), loop, clean evaluation,
attacks, results and plots.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.robust_cnn import models, plots
from jaxeff import robust
from jaxeff import train as jt
from jaxeff.data import digits, mnist_cifar
from jaxeff.train import distributed

__all__ = [
    "NORMS",
    "AttackSettings",
    "RowSplit",
    "abs_spectra",
    "attack_batch",
    "attack_settings",
    "cumulative_success",
    "is_correct",
    "load_data",
    "mean_abs_spectrum",
    "split_rows",
    "top_share",
    "train_and_evaluate",
    "validate_config",
]

#: Perturbation norms by config name: the ``p`` of :func:`jaxeff.robust.pgd_attack`.
NORMS = {"linf": math.inf, "l2": 2.0, "l1": 1.0, "fourier_inf": "fourier_inf"}
#: The norms of the spectrum figure (they share their radii).
SPECTRUM_NORMS = ("linf", "fourier_inf")
#: Attack losses (``config.attack.loss``).
LOSSES = ("cross_entropy", "margin")
#: File names in the workdir.
RESULTS, ATTACKS = "results.json", "attacks.npz"
ROBUST_PLOT, SPECTRUM_PLOT = "robust_accuracy.png", "spectrum.png"
#: PRNG of the initialisation: XLA's RngBitGenerator, which compiles in a fraction of
#: threefry's time on CPU (its numbers may differ across XLA versions and backends; a
#: run's weights live in its checkpoint).
PRNG_IMPL = "rbg"
#: PRNG of the attacks' random starts, one key per row: threefry, whose numbers for a key
#: do not depend on the other keys drawn with it in one batched (vmapped) call, nor on
#: the sharding (RngBitGenerator's do), so neither does a row's attack.
ATTACK_PRNG_IMPL = "threefry2x32"
#: Share of the spectrum's coefficients whose energy share ``results.json`` reports.
TOP_FRACTION = 0.1
# Fields a rerun in the same workdir may change: none changes what training computes
# (the learning rate is constant, so neither does the run's length).
RESUMABLE_FIELDS = (
    "log_every",
    "checkpoint_every",
    "num_steps",
    "data.data_dir",
    "eval.batch_size",
    "eval.num_examples",
    "eval.save_examples",
)


# ----------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------
def attack_norms(config) -> tuple[str, ...]:
    """The norm names of ``config.attack.norms``, checked."""
    names = tuple(config.attack.norms)
    unknown = [n for n in names if n not in NORMS]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(
            f"config.attack.norms must be distinct names from {tuple(NORMS)}, got "
            f"{config.attack.norms!r}."
        )
    return names


def eps_grid(config, name: str) -> np.ndarray:
    """The radii ``config.attack.eps.<name>``: finite, ``>= 0`` and increasing."""
    if name not in config.attack.eps:
        raise ValueError(f"config.attack.eps.{name} must hold the radii of the {name!r} attack.")
    values = config.attack.eps[name]
    try:
        grid = np.asarray(values, np.float64)
    except (TypeError, ValueError):
        grid = np.asarray([])
    if (
        grid.ndim != 1
        or not grid.size
        or not np.all(np.isfinite(grid))
        or np.any(grid < 0)
        or np.any(np.diff(grid) <= 0)
    ):
        raise ValueError(
            f"config.attack.eps.{name} must be increasing radii >= 0 (a tuple), got {values!r}."
        )
    return grid


def validate_config(config) -> None:
    """Checks every field at start-up, before any data is read or anything compiled."""
    jt.check_numbers(
        config,
        positive=["learning_rate", "attack.step_size"],
        fraction=["data.test_fraction"],
    )
    jt.check_numbers(
        config,
        integers={
            "seed": 0,
            "data.seed": 0,
            "data.max_examples": 0,
            "batch_size": 1,
            "num_steps": 1,
            "log_every": 1,
            "checkpoint_every": 1,
            "eval.batch_size": 1,
            "eval.num_examples": 0,
            "eval.save_examples": 0,
            "attack.steps": 0,
            "attack.restarts": 1,
            "attack.batch_size": 1,
            "attack.seed": 0,
        },
    )
    if config.data.name == "digits":
        pass
    elif config.data.name in mnist_cifar.IMAGE_DATASETS:
        if not config.data.data_dir:
            raise ValueError(
                f"config.data.data_dir must name the tfds data directory where "
                f"{config.data.name!r} was prepared (as array_record); see "
                "jaxeff.data.mnist_cifar."
            )
    else:
        raise ValueError(
            f"config.data.name must be 'digits' or one of {mnist_cifar.IMAGE_DATASETS}, got "
            f"{config.data.name!r}."
        )
    if config.model.name not in ("cnn", "linear"):
        raise ValueError(f"config.model.name must be 'cnn' or 'linear', got {config.model.name!r}.")
    if config.model.name == "cnn":
        features = tuple(config.model.features)
        if not features or any(
            isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in features
        ):
            raise ValueError(
                f"config.model.features must be positive channel counts, got "
                f"{config.model.features!r}."
            )
        jt.check_numbers(config, integers={"model.dense": 1})
    names = attack_norms(config)
    for name in names:
        eps_grid(config, name)
    if all(n in names for n in SPECTRUM_NORMS):
        jt.check_numbers(config, positive=["attack.spectrum_eps"])
        for name in SPECTRUM_NORMS:
            if not np.any(np.isclose(eps_grid(config, name), config.attack.spectrum_eps)):
                raise ValueError(
                    f"config.attack.spectrum_eps ({config.attack.spectrum_eps!r}) must be one "
                    f"of the radii config.attack.eps.{name}."
                )
    if config.attack.loss not in LOSSES:
        raise ValueError(f"config.attack.loss must be one of {LOSSES}, got {config.attack.loss!r}.")
    for field in ("random_start", "multi_targeted", "clip"):
        if not isinstance(config.attack[field], bool):
            raise ValueError(f"config.attack.{field} must be a bool, got {config.attack[field]!r}.")
    if config.attack.restarts > 1 and not config.attack.random_start:
        raise ValueError(
            "config.attack.restarts > 1 needs config.attack.random_start=True (each restart "
            "starts at its own random point)."
        )
    if config.attack.multi_targeted and config.attack.loss != "margin":
        raise ValueError(
            "config.attack.multi_targeted attacks the margin z_t - z_y toward each other "
            "class t; set config.attack.loss='margin'."
        )
    distributed.check_global_batch(config.batch_size)


# ----------------------------------------------------------------------------------------
# Data: images in [0, 1] (float32 for digits, uint8 for tfds sets), integer labels.
# ----------------------------------------------------------------------------------------
class Data(NamedTuple):
    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    num_classes: int


def load_data(config) -> Data:
    """The training and test splits of ``config.data``."""
    data = config.data
    if data.name == "digits":
        splits = digits.load_digits(test_fraction=data.test_fraction, seed=data.seed)
        train, test, num_classes = splits["train"], splits["test"], digits.DIGITS_CLASSES
    else:
        train, test = (
            mnist_cifar.load_image_classification(data.name, data_dir=data.data_dir, split=split)
            for split in ("train", "test")
        )
        num_classes = mnist_cifar.num_classes(data.name, data_dir=data.data_dir)
    if data.max_examples:
        train = {k: v[: data.max_examples] for k, v in train.items()}
    if len(test["label"]) == 0:
        raise ValueError(f"The test split of {data.name!r} is empty (config.data.test_fraction).")
    return Data(train, test, num_classes)


def batch_indices(size: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Rows of training batch ``step``: a seeded permutation per epoch of ``size // batch_size``
    batches, a pure function of ``(seed, step)`` so a resumed run needs only its step."""
    steps_per_epoch = size // batch_size
    epoch, position = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(size)
    return order[position * batch_size : (position + 1) * batch_size]


class RowSplit(NamedTuple):
    """This process's rows of an evaluation split over processes (:func:`split_rows`)."""

    rows: np.ndarray  # (num_batches · local_batch,) row indices, padding rows point at 0
    mask: np.ndarray  # (num_batches · local_batch,) bool, false on padding rows
    num_batches: int  # global batches, each of num_processes · local_batch rows
    local_batch: int  # rows of each global batch this process computes

    def batches(self):
        """``(rows, mask)`` of each global batch, this process's slice: one shape for all."""
        for t in range(self.num_batches):
            part = slice(t * self.local_batch, (t + 1) * self.local_batch)
            yield self.rows[part], self.mask[part]


def split_rows(
    num_rows: int,
    batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    local_devices: int | None = None,
) -> RowSplit:
    """The rows process ``p`` of ``P`` computes: its slice of every global batch.

    The rows ``0 .. N-1`` are cut into ``T = ceil(N / G)`` global batches of ``G = P·s``
    rows, ``s`` the smallest multiple of the process's device count ``L`` with ``P·s >=
    min(batch_size, N)``; process ``p`` computes rows ``[t·G + p·s, t·G + (p+1)·s)`` of
    batch ``t``, those past ``N`` padded (with row 0) and masked out. This is the layout
    :func:`jaxeff.train.distributed.gather_rows` reassembles.

    Args:
      num_rows: ``N >= 1``.
      batch_size: the requested rows per global batch (rounded up to whole devices).
      process_index: ``p``; default ``jax.process_index()``.
      process_count: ``P``; default ``jax.process_count()``.
      local_devices: ``L``; default ``jax.local_device_count()``.

    Returns:
      A :class:`RowSplit`.
    """
    p = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    devices = jax.local_device_count() if local_devices is None else local_devices
    if num_rows < 1 or batch_size < 1 or devices < 1 or not 0 <= p < count:
        raise ValueError(
            f"split_rows needs num_rows >= 1, batch_size >= 1, local_devices >= 1 and "
            f"0 <= process_index < process_count, got {num_rows}, {batch_size}, {devices}, "
            f"{p}, {count}."
        )
    local_batch = -(-min(batch_size, num_rows) // (count * devices)) * devices
    global_batch = count * local_batch
    num_batches = -(-num_rows // global_batch)
    starts = np.arange(num_batches)[:, None] * global_batch + p * local_batch
    rows = (starts + np.arange(local_batch)[None, :]).reshape(-1)
    mask = rows < num_rows
    return RowSplit(np.where(mask, rows, 0), mask, num_batches, local_batch)


def _gather(local, split: RowSplit, *, num_batches: int | None = None) -> np.ndarray:
    """Every process's rows of ``local`` (this process's ``split`` rows, in order) in
    global order, padding removed; ``num_batches`` keeps only the first global batches."""
    num_batches = split.num_batches if num_batches is None else num_batches
    size = num_batches * split.local_batch
    rows, _ = distributed.gather_rows(
        np.asarray(local)[:size], split.mask[:size], num_batches=num_batches
    )
    return rows


# ----------------------------------------------------------------------------------------
# Model.
# ----------------------------------------------------------------------------------------
def build_model(config, data: Data) -> nnx.Module:
    shape = data.train["image"].shape[1:]
    if config.model.name == "linear":
        return models.LinearClassifier(shape, data.num_classes)
    return models.CNN(
        shape,
        tuple(config.model.features),
        config.model.dense,
        data.num_classes,
        rngs=nnx.Rngs(jax.random.key(config.seed, impl=PRNG_IMPL)),
    )


def train_loss(model, batch, hparams):
    del hparams
    logits = model(batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return jnp.mean(loss), {"accuracy": accuracy}


def _train_devices(batch_size: int):
    """Every device of every process on several processes (``validate_config`` checks
    that they divide the batch); on one, the most devices that divide the batch."""
    devices = jax.devices()
    if jax.process_count() > 1:
        return devices
    count = max(k for k in range(1, len(devices) + 1) if batch_size % k == 0)
    return devices[:count]


# ----------------------------------------------------------------------------------------
# Attacks.
# ----------------------------------------------------------------------------------------
class AttackSettings(NamedTuple):
    """The static settings of one attack program (hashable: compiled once per value)."""

    p: float | str
    steps: int
    restarts: int
    step_size: float  # α / ε
    loss: str
    multi_targeted: bool
    clip: bool
    random_start: bool
    num_classes: int


def attack_settings(config, name: str, num_classes: int) -> AttackSettings:
    """The :class:`AttackSettings` of norm ``name`` in ``config.attack``."""
    a = config.attack
    return AttackSettings(
        p=NORMS[name],
        steps=a.steps,
        restarts=a.restarts,
        step_size=float(a.step_size),
        loss=a.loss,
        multi_targeted=a.multi_targeted,
        clip=a.clip,
        random_start=a.random_start,
        num_classes=num_classes,
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "settings"))
def attack_batch(params, model_state, x, y, index, eps, key, *, graphdef, settings: AttackSettings):
    """PGD on one batch: ``(x_adv, success)``, radius ``eps`` and step ``settings.step_size · ε``.

    Each row is attacked on its own (``jax.vmap``), with its random starts drawn from
    ``fold_in(key, index_i)``, ``index_i`` the row's number in the attacked set: a row's
    attack does not depend on the other rows of its batch, so neither does it on how the
    rows are cut into batches or split over devices and processes.

    Untargeted: one :func:`jaxeff.robust.pgd_attack` on ``settings.loss``. Multi-targeted:
    each example is attacked toward every other class ``t`` with the loss ``z_t - z_y`` (as
    one batch of ``K - 1`` copies); the example is broken if any target succeeds, and its
    ``x_adv`` is the first successful one, or the one with the largest margin
    ``max_{j≠y} z_j - z_y`` if none succeeds. The data, indices, radius, key and weights
    are traced: one program per model structure, batch shape and settings.
    """
    s = settings
    model = nnx.merge(graphdef, params, model_state)

    def attack_row(x, y, row):
        common = dict(
            eps=eps,
            p=s.p,
            steps=s.steps,
            step_size=s.step_size * eps,
            restarts=s.restarts,
            key=jax.random.fold_in(key, row) if s.random_start else None,
            clip=(0.0, 1.0) if s.clip else None,
        )
        if not s.multi_targeted:
            result = robust.pgd_attack(model, x[None], y[None], loss=s.loss, **common)
            return result.x_adv[0], result.success[0]
        k = s.num_classes
        xs, ys = jnp.repeat(x[None], k - 1, axis=0), jnp.full((k - 1,), y)
        targets = (y + jnp.arange(1, k)) % k

        def target_margin(logits, labels):
            target = jnp.take_along_axis(logits, targets[:, None], axis=1)
            true = jnp.take_along_axis(logits, labels[:, None], axis=1)
            return (target - true)[:, 0]

        result = robust.pgd_attack(model, xs, ys, loss=target_margin, **common)
        true = result.logits[:, y]
        others = jnp.where(jnp.arange(k) == y, -jnp.inf, result.logits)
        margin = jnp.max(others, axis=1) - true
        broken = jnp.any(result.success)
        pick = jnp.where(broken, jnp.argmax(result.success), jnp.argmax(margin))
        return result.x_adv[pick], broken

    return jax.vmap(attack_row)(x, y, index)


@functools.partial(jax.jit, static_argnames="graphdef")
def is_correct(params, model_state, x, y, *, graphdef):
    """Per example, whether the true logit is strictly the largest, ``z_y > max_{j≠y} z_j``
    (the rule of :func:`jaxeff.robust.pgd_attack`: a tie counts as an error)."""
    logits = nnx.merge(graphdef, params, model_state)(x)
    true = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
    others = jnp.where(jnp.arange(logits.shape[1]) == y[:, None], -jnp.inf, logits)
    return true > jnp.max(others, axis=1)


def cumulative_success(success) -> np.ndarray:
    """Per-radius attack successes to "broken at some radius ``<= ε``".

    .. math::

      \\text{broken}[e, i] = \\bigvee_{e' \\le e} \\text{success}[e', i]

    A perturbation found at ``ε_{e'} <= ε_e`` lies in the larger ball too, so the robust
    accuracy ``1 - mean_i broken[e, i]`` is non-increasing along increasing radii.

    Args:
      success: ``(E, N)`` bools, row ``e`` the attack's successes at the ``e``-th radius.

    Returns:
      ``(E, N)`` bools.
    """
    success = np.asarray(success, bool)
    if success.ndim != 2:
        raise ValueError(f"`success` must have shape (num_eps, num_examples), got {success.shape}.")
    return np.logical_or.accumulate(success, axis=0)


def abs_spectra(delta) -> np.ndarray:
    """Per example, the mean modulus of the perturbation's DFT over channels.

    .. math::

      A_i[k] = \\frac{1}{C} \\sum_c |(F \\delta_{i, :, :, c})[k]|

    with ``F`` the orthonormal 2-D DFT of :func:`jaxeff.robust.dft` (per channel).

    Args:
      delta: ``(N, H, W, C)`` perturbations.

    Returns:
      ``(N, H, W)``, zero frequency first (as ``np.fft.fft2``).
    """
    delta = np.asarray(delta)
    if delta.ndim != 4:
        raise ValueError(f"`delta` must be (N, H, W, C) perturbations, got shape {delta.shape}.")
    return np.abs(np.fft.fft2(delta, axes=(1, 2), norm="ortho")).mean(axis=3)


def mean_abs_spectrum(delta) -> np.ndarray:
    """Mean modulus of the perturbations' DFT over examples and channels.

    .. math::

      S[k] = \\frac{1}{N C} \\sum_{i, c} |(F \\delta_{i, :, :, c})[k]|

    with ``F`` the orthonormal 2-D DFT of :func:`jaxeff.robust.dft` (per channel): the mean
    of :func:`abs_spectra` over examples.

    Args:
      delta: ``(N, H, W, C)`` perturbations.

    Returns:
      ``(H, W)``, zero frequency in the centre (``np.fft.fftshift``).
    """
    return np.fft.fftshift(abs_spectra(delta).mean(axis=0))


def top_share(spectrum, fraction: float = TOP_FRACTION) -> float:
    """Share of ``Σ spectrum²`` held by its largest ``fraction`` of coefficients: about
    ``fraction`` for a flat spectrum, near 1 for one concentrated on a few frequencies."""
    energy = np.sort(np.square(np.asarray(spectrum, np.float64)).ravel())[::-1]
    count = max(1, int(round(fraction * energy.size)))
    total = energy.sum()
    return float(energy[:count].sum() / total) if total > 0 else float("nan")


# ----------------------------------------------------------------------------------------
# Train and evaluate.
# ----------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str, *, allow_config_change: bool = False) -> dict:
    """Trains the model (or restores it), then attacks it at every radius of every norm.

    A rerun in the same workdir resumes training from the latest checkpoint, or skips it
    when the checkpoint is at ``num_steps``, and evaluates again; SIGTERM saves and returns
    ``{"preempted": True, "step": N}``; a NaN loss stops the run before that state is
    saved; a workdir made by a different config is refused unless ``allow_config_change``
    (the ``eval`` fields, the logging and checkpoint intervals and ``num_steps`` may change;
    a workdir whose model was trained longer than ``num_steps`` is refused).

    Writes into ``workdir``: ``config.json``; ``checkpoints/``; ``metrics.jsonl`` and
    TensorBoard events (training loss and accuracy every ``log_every`` steps; at the end
    ``clean_accuracy`` and ``robust_accuracy/<norm>/<ε>``); ``results.json``;
    ``attacks.npz`` (per norm: ``<norm>/eps``, ``<norm>/success`` the per-radius successes
    ``(E, N)``, ``<norm>/delta`` the perturbations of the first ``eval.save_examples``
    attacked points ``(E, n, H, W, C)``; ``index``, ``label`` and ``image`` of the attacked
    points); ``robust_accuracy.png``; ``spectrum.png`` (with both L∞ and Fourier-L∞).
    On many processes process 0 alone writes them (orbax writes the checkpoints from every
    process), and every process returns the same results, those of one process.

    Returns:
      ``{"clean_accuracy", "attacked_clean_accuracy", "num_attacked", "attacks": {norm:
      {"eps", "robust_accuracy", "attack_accuracy", ["closed_form"]}}, "spectrum": {norm:
      {"eps", "mean_abs", "top_share"}}, "trained_steps": steps trained by this call,
      "params": the trained parameters (host), "preempted": False}``, or
      ``{"preempted": True, "step": N}``.
    """
    # Config: checked, and bound to the workdir, before anything is built ----------------
    start_time = time.perf_counter()
    validate_config(config)
    may_differ = (
        RESUMABLE_FIELDS
        + tuple(f"attack.{k}" for k in config.attack.keys())
        + tuple(f"attack.eps.{k}" for k in config.attack.eps.keys())
    )
    # Process 0 alone reads and writes config.json; the others learn its verdict.
    changes = distributed.broadcast_from_process_zero(
        lambda: jt.bind_config_to_workdir(
            config, workdir, may_differ=may_differ, allow_changes=allow_config_change
        )
    )
    if changes:
        jt.announce(f"Continuing {workdir} with changed config fields: {', '.join(changes)}.")
    norms = attack_norms(config)

    # Data ------------------------------------------------------------------------------
    data = load_data(config)
    num_train = len(data.train["label"])
    if config.batch_size > num_train:
        raise ValueError(
            f"config.batch_size ({config.batch_size}) exceeds the {num_train} training examples."
        )

    # Model and optimizer ----------------------------------------------------------------
    model = build_model(config, data)
    tx = optax.adam(config.learning_rate)
    graphdef, state = jt.create_train_state(model, tx)

    # Sharding: parameters replicated, batch split along the data axis of every device ----
    mesh = jt.make_mesh(devices=_train_devices(config.batch_size))
    state = jt.replicate(state, mesh)
    train_step = jt.make_train_step(
        graphdef,
        train_loss,
        tx,
        state_sharding=jt.replicated_sharding(mesh),
        batch_sharding=jt.data_sharding(mesh),
    )

    # Checkpoint: resume, or skip finished training ---------------------------------------
    ckpt = jt.Checkpointer(os.path.join(workdir, "checkpoints"))
    if ckpt.latest_step is not None:
        if ckpt.latest_step > config.num_steps:
            raise ValueError(
                f"{workdir} holds a model trained for {ckpt.latest_step} steps, more than "
                f"config.num_steps={config.num_steps}; use a new workdir."
            )
        state, _ = ckpt.restore(state)
        jt.announce(f"Resumed from step {int(state.step)} of {config.num_steps} ({workdir}).")
    first_step = int(state.step)

    # Loop -------------------------------------------------------------------------------
    writer = jt.MetricWriter(workdir)
    guard = jt.FiniteGuard()  # no diverged state is ever evaluated or saved
    pending = []
    steps_per_epoch = num_train // config.batch_size
    with (
        jt.finish_saves_on_error(ckpt, writer),
        jt.PreemptionSignal(ckpt) as preempted,
        jt.progress_bar(config.num_steps, initial=first_step, desc="train") as bar,
    ):
        for step in range(first_step, config.num_steps):
            rows = batch_indices(num_train, config.batch_size, config.seed, step)
            share = config.batch_size // jax.process_count()  # this process's slice
            rows = rows[jax.process_index() * share : (jax.process_index() + 1) * share]
            batch = {
                "image": models.as_float(data.train["image"][rows]),
                "label": data.train["label"][rows],
            }
            state, metrics = train_step(state, jt.shard_batch(batch, mesh))
            done = step + 1
            guard.update(done, metrics)
            pending.append(metrics)
            if done % config.log_every == 0 or done == config.num_steps:
                guard.check(state.params)
                summary = jt.mean_metrics(pending)
                writer.write(done, {**summary, "epoch": done / steps_per_epoch})
                pending = []
                bar.set_postfix(loss=f"{summary['loss']:.4f}")
            stop = preempted(done)
            if stop or done % config.checkpoint_every == 0 or done == config.num_steps:
                guard.check(state.params)
                ckpt.save(done, state)
            ckpt.check_for_errors()  # a failed background save stops the run here
            bar.update(1)
            if stop:
                writer.close()
                ckpt.close()
                jt.announce(
                    f"Preempted at step {done}: checkpoint saved in {workdir}; run the same "
                    "command again to resume."
                )
                return {"preempted": True, "step": done}
        guard.check(state.params)
    ckpt.close()
    writer.close()
    train_seconds = time.perf_counter() - start_time

    # Evaluation: each process's rows of every global batch on its own devices ----------
    local_mesh = jt.make_mesh(devices=jax.local_devices())
    params = jt.replicate(jax.device_get(state.params), local_mesh)
    model_state = jt.replicate(jax.device_get(state.model_state), local_mesh)
    test_images, test_labels = data.test["image"], data.test["label"]
    num_test = len(test_labels)

    # Clean accuracy ---------------------------------------------------------------------
    split = split_rows(num_test, config.eval.batch_size)
    right = []
    for rows, _ in split.batches():
        batch = {"x": models.as_float(test_images[rows]), "y": test_labels[rows].astype(np.int32)}
        batch = jt.shard_batch(batch, local_mesh)
        right.append(np.asarray(is_correct(params, model_state, **batch, graphdef=graphdef)))
    correct = _gather(np.concatenate(right), split)
    clean_accuracy = float(np.mean(correct))

    # Attacks: every norm, every radius, this process's rows of every global batch --------
    num_attacked = min(config.eval.num_examples or num_test, num_test)
    attacked = np.arange(num_attacked)
    x_all = models.as_float(test_images[attacked])
    y_all = test_labels[attacked].astype(np.int32)
    split = split_rows(num_attacked, config.attack.batch_size)
    saved = min(config.eval.save_examples, num_attacked)
    # The global batches that hold the saved points: only their perturbations are gathered.
    saved_batches = -(-saved // (split.local_batch * jax.process_count()))
    key = jax.random.key(config.attack.seed, impl=ATTACK_PRNG_IMPL)
    linear_weights = None  # (W, b) of a linear model: its exact robust accuracy
    if config.model.name == "linear":
        linear_weights = nnx.merge(graphdef, *jax.device_get((params, model_state))).weights()
    arrays = {
        "index": attacked,
        "label": y_all,
        "image": x_all[:saved],
    }
    attacks, spectra = {}, {}
    spectrum_eps = config.attack.get("spectrum_eps")
    want_spectrum = all(n in norms for n in SPECTRUM_NORMS)
    attack_start = time.perf_counter()
    for name in norms:
        p = NORMS[name]
        grid = eps_grid(config, name)
        settings = attack_settings(config, name, data.num_classes)
        norm_key = jax.random.fold_in(key, list(NORMS).index(name))
        spectrum_at = None
        if want_spectrum and name in SPECTRUM_NORMS:
            spectrum_at = int(np.argmin(np.abs(grid - spectrum_eps)))
        success, deltas, moduli = [], [], None  # this process's rows
        for e, eps in enumerate(grid):
            eps_key = jax.random.fold_in(norm_key, e)
            found, moved = [], []
            for rows, _ in split.batches():
                batch = {"x": x_all[rows], "y": y_all[rows], "index": rows.astype(np.int32)}
                batch = jt.shard_batch(batch, local_mesh)
                x_adv, ok = attack_batch(
                    params, model_state, batch["x"], batch["y"], batch["index"],
                    jnp.float32(eps), eps_key, graphdef=graphdef, settings=settings,
                )  # fmt: skip
                found.append(np.asarray(ok))
                moved.append(np.asarray(x_adv) - x_all[rows])
            success.append(np.concatenate(found))
            delta = np.concatenate(moved)
            deltas.append(delta[: saved_batches * split.local_batch])
            if e == spectrum_at:
                moduli = abs_spectra(delta)
        success = _gather(np.stack(success, axis=1), split).T  # (E, N)
        broken = cumulative_success(success)
        attacks[name] = {
            "eps": grid.tolist(),
            "robust_accuracy": (1.0 - broken.mean(axis=1)).tolist(),
            "attack_accuracy": (1.0 - success.mean(axis=1)).tolist(),
        }
        if linear_weights is not None:
            w, bias = linear_weights
            exact = robust.robust_accuracy(w, x_all, y_all, eps=grid, p=p, b=bias)
            attacks[name]["closed_form"] = np.asarray(exact, np.float64).tolist()
        arrays[f"{name}/eps"] = grid
        arrays[f"{name}/success"] = success
        arrays[f"{name}/delta"] = np.zeros((len(grid), 0, *x_all.shape[1:]), np.float32)
        if saved:
            saved_deltas = _gather(np.stack(deltas, axis=1), split, num_batches=saved_batches)
            arrays[f"{name}/delta"] = np.swapaxes(saved_deltas[:saved], 0, 1).astype(np.float32)
        if spectrum_at is not None:
            spectrum = np.fft.fftshift(_gather(moduli, split).mean(axis=0))  # mean_abs_spectrum
            spectra[name] = {
                "eps": float(grid[spectrum_at]),
                "mean_abs": spectrum.tolist(),
                "top_share": top_share(spectrum),
            }
            arrays[f"{name}/spectrum"] = spectrum
        jt.announce(
            f"{name}: robust accuracy "
            + ", ".join(
                f"{eps:g}: {acc:.3f}"
                for eps, acc in zip(grid, attacks[name]["robust_accuracy"], strict=True)
            )
        )
    attack_seconds = time.perf_counter() - attack_start

    # Results ----------------------------------------------------------------------------
    attacked_clean = float(np.mean(correct[attacked]))
    scalars = {"clean_accuracy": clean_accuracy, "attacked_clean_accuracy": attacked_clean}
    for name, curve in attacks.items():
        for eps, acc in zip(curve["eps"], curve["robust_accuracy"], strict=True):
            scalars[f"robust_accuracy/{name}/{eps:g}"] = acc
    with jt.MetricWriter(workdir) as writer:
        writer.write(config.num_steps, scalars)
    results = {
        "clean_accuracy": clean_accuracy,
        "attacked_clean_accuracy": attacked_clean,
        "num_attacked": num_attacked,
        "attacks": attacks,
        "spectrum": {
            name: {k: v for k, v in s.items() if k != "mean_abs"} for name, s in spectra.items()
        },
        "steps": config.num_steps,
        "trained_steps": config.num_steps - first_step,
        "times": {"train_s": train_seconds, "attacks_s": attack_seconds},
    }
    if jax.process_index() == 0:  # every process holds the results; process 0 writes them
        with open(os.path.join(workdir, RESULTS), "w") as f:
            json.dump(results, f, indent=2)
        np.savez(os.path.join(workdir, ATTACKS), **arrays)
        title = f"{config.data.name}, {config.model.name}, {config.attack.steps} PGD steps"
        plots.plot_robust_accuracy(
            attacks, os.path.join(workdir, ROBUST_PLOT), clean_accuracy=attacked_clean, title=title
        )
        if spectra:
            plots.plot_spectra(spectra, os.path.join(workdir, SPECTRUM_PLOT), title=title)
    return {
        **results,
        "spectrum": spectra,
        "params": jax.device_get(state.params),
        "preempted": False,
    }
