"""Gradient variance during SGD training: ``train_and_evaluate(config, workdir)``.

Faghri, Duvenaud, Fleet, Ba, "A Study of Gradient Variance in Deep Learning",
https://arxiv.org/abs/2007.04532. One plain-SGD training run; every
``gvar.measure_every`` steps the estimators of ``gvar.estimators`` are measured at the
current parameters with :func:`jaxeff.gvar.measure` (``m`` draws for the mean, ``m``
more for the variance). The measurement has its own PRNG stream (``gvar.seed``), reads a
copy of the parameters on one device and never touches the training batches or the
optimizer state, so a run with measurements trains exactly as one without.

Estimators (names in the records):

* ``sgd``: mini-batches of ``batch_size`` uniform draws;
* ``sgd_2b``: the same with twice the batch (half the variance with replacement);
* ``svrg``: batch ``batch_size`` with SVRG's control variate; its snapshot (anchor
  parameters and full gradient) is taken every ``gvar.svrg_snapshot_every`` steps, after
  any measurement at that step, so a measurement at step ``t`` uses the snapshot of the
  last multiple of ``svrg_snapshot_every`` before ``t`` (no SVRG record at step 0). At
  the snapshot itself SVRG's variance would be exactly 0;
* ``gc``: gradient clustering: the training set clustered by gradient at the measured
  parameters (``gc.num_clusters`` clusters, ``gc.num_passes`` batch-mode passes,
  :func:`jaxeff.clustering.gc_estimator`), then stratified batches of ``batch_size``
  weighted ``N_k/(N n_k)``;
* ``importance``: ``batch_size`` draws with probability proportional to each example's
  gradient norm (or loss, ``gvar.importance_score``) at the measured parameters, weighted
  ``1/(N b p_i)`` (:func:`jaxeff.clustering.importance_estimator`);
* ``exact_sgd`` (``gvar.exact``): SGD-``batch_size``'s exact statistics from the
  per-example sums of squares over the whole training set (:func:`jaxeff.gvar.exact_variance`).

Training batches (``sampler``): ``"uniform"`` walks seeded epochs; ``"gc"`` draws them
stratified over gradient clusters (:class:`jaxeff.clustering.StratifiedSampler`, weights
``N_k/(N n_k)`` in the loss), re-clustering the training set every ``gc.recluster_every``
steps from the previous centres. Both see ``batch_size`` examples per step, so their loss
curves compare at equal numbers of examples seen.

On many hosts (``jaxeff.train.distributed.initialize_distributed`` first, as the entry
points do) the same code runs on every process: each loads the training set, feeds its
share of every global batch (its rows of the epoch's batch, or its slots of the stratified
batch) to the data-parallel step over every device of every process, and repeats the
clustering, the measurement and the evaluation on one device of its own, at the same
parameters with the same keys, so every process holds the same numbers. Process 0 alone
writes files, and no process reads one back: the records and evaluations travel in
memory and in the checkpoints.

The loop reads top to bottom: config, data, model and optimizer, sharding, update step,
measurement, checkpoint/resume, loop, results.
"""

from __future__ import annotations

import functools
import json
import os
from typing import NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.gvar import models
from jaxeff import clustering, gvar
from jaxeff import train as jt
from jaxeff.data import classification, digits, mnist_cifar
from jaxeff.train import distributed

#: Estimators a run can measure (``config.gvar.estimators``).
ESTIMATORS = ("sgd", "sgd_2b", "svrg", "gc", "importance")
#: How training batches are drawn (``config.sampler``).
SAMPLERS = ("uniform", "gc")
#: Estimators whose state does not depend on the parameters.
STATELESS = ("sgd", "sgd_2b")
#: The record name of SGD's exact statistics.
EXACT = "exact_sgd"
#: File names in the workdir.
RECORDS, PLOT, RESULTS = "gvar.jsonl", "gvar.png", "results.json"
# Fields a run may change when it continues in the same workdir: none of them changes
# what a training step computes (the learning rate is constant, so neither does the
# run's length).
RESUMABLE_FIELDS = (
    "log_every",
    "checkpoint_every",
    "num_steps",
    "data.data_dir",
    "gvar.chunk_size",
)


# ----------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------
def estimator_names(config) -> tuple[str, ...]:
    """The estimators of ``config.gvar.estimators`` (a comma-separated string)."""
    names = tuple(n.strip() for n in str(config.gvar.estimators).split(",") if n.strip())
    unknown = [n for n in names if n not in ESTIMATORS]
    if unknown or len(set(names)) != len(names):
        raise ValueError(
            f"config.gvar.estimators must be distinct names from {ESTIMATORS}, got "
            f"{config.gvar.estimators!r}."
        )
    return names


def validate_config(config) -> None:
    """Checks every field at start-up, before any data is read or anything compiled."""
    jt.check_numbers(
        config,
        positive=[
            "batch_size",
            "learning_rate",
            "num_steps",
            "log_every",
            "checkpoint_every",
            "gvar.num_draws",
            "gvar.chunk_size",
            "gc.num_clusters",
        ],
        non_negative=[
            "seed",
            "data.seed",
            "data.max_examples",
            "data.duplicates",
            "data.duplicate_copies",
            "gvar.measure_every",
            "gvar.seed",
            "gvar.importance_smoothing",
            "gc.num_passes",
            "gc.min_fraction",
            "gc.seed",
        ],
        fraction=["data.test_fraction", "gvar.importance_smoothing"],
    )
    for field in ("batch_size", "num_steps", "num_draws", "measure_every"):
        node = config.gvar if field in ("num_draws", "measure_every") else config
        if isinstance(node[field], bool) or not isinstance(node[field], int):
            prefix = "gvar." if node is config.gvar else ""
            raise ValueError(f"config.{prefix}{field} must be an integer, got {node[field]!r}.")
    if not 0.0 <= config.data.label_noise <= 1.0:
        raise ValueError(
            f"config.data.label_noise must lie in [0, 1], got {config.data.label_noise!r}."
        )
    if not 0.0 < config.data.imbalance <= 1.0:
        raise ValueError(
            f"config.data.imbalance must lie in (0, 1], got {config.data.imbalance!r}."
        )
    name = config.data.name
    if name == "linreg":
        jt.check_numbers(
            config,
            positive=["data.dim", "data.num_examples", "data.num_test"],
            non_negative=["data.noise"],
        )
        if config.model.name != "linear":
            raise ValueError(
                "config.data.name='linreg' needs config.model.name='linear', got "
                f"{config.model.name!r}."
            )
        if config.data.label_noise or config.data.imbalance != 1.0:
            raise ValueError(
                "config.data.label_noise and config.data.imbalance need classes; linear "
                "regression's noise is config.data.noise."
            )
    else:
        if name != "digits" and not config.data.data_dir:
            raise ValueError(
                f"config.data.data_dir must name the tfds data directory where {name!r} was "
                "prepared (as array_record); see jaxeff.data.mnist_cifar."
            )
        if config.model.name not in ("mlp", "cnn"):
            raise ValueError(
                f"config.model.name must be 'mlp' or 'cnn' for classification, got "
                f"{config.model.name!r}."
            )
    names = estimator_names(config)
    if "svrg" in names:
        jt.check_numbers(config, positive=["gvar.svrg_snapshot_every"])
    if config.sampler not in SAMPLERS:
        raise ValueError(f"config.sampler must be one of {SAMPLERS}, got {config.sampler!r}.")
    if config.sampler == "gc":
        jt.check_numbers(config, positive=["gc.recluster_every"])
    if "gc" in names or config.sampler == "gc":
        if not config.gc.min_fraction < 1:
            raise ValueError(
                f"config.gc.min_fraction must be below 1, got {config.gc.min_fraction!r}."
            )
        if config.gc.allocation not in ("equal", "proportional"):
            raise ValueError(
                "config.gc.allocation must be 'equal' or 'proportional', got "
                f"{config.gc.allocation!r}."
            )
    if "importance" in names and config.gvar.importance_score not in ("grad_norm", "loss"):
        raise ValueError(
            "config.gvar.importance_score must be 'grad_norm' or 'loss', got "
            f"{config.gvar.importance_score!r}."
        )
    distributed.check_global_batch(config.batch_size)


# ----------------------------------------------------------------------------------------
# Data: whole training set in memory; batches by a seeded permutation per epoch.
# ----------------------------------------------------------------------------------------
class Data(NamedTuple):
    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    num_classes: int | None  # None: regression


def generate_linreg(*, dim, num_train, num_test, noise, seed):
    """``x ~ N(0, I/dim)``, teacher ``w* ~ N(0, I)``, ``y = w*·x + noise · ε``."""
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=dim)

    def split(n):
        x = rng.normal(size=(n, dim)) / np.sqrt(dim)
        y = x @ teacher + noise * rng.normal(size=n)
        return {"x": x.astype(np.float32), "y": y.astype(np.float32)}

    return split(num_train), split(num_test)


def load_image_splits(data) -> Data:
    """The digits (``data.name = "digits"``) or a prepared tfds image dataset, as they are.

    ``data.max_examples > 0`` keeps only the first examples of each split.
    """
    limit = data.max_examples or None
    if data.name == "digits":
        splits = digits.load_digits(test_fraction=data.test_fraction, seed=data.seed)
        train, test = splits["train"], splits["test"]
        num_classes = digits.DIGITS_CLASSES
    else:
        train, test = (
            mnist_cifar.load_image_classification(
                data.name, data_dir=data.data_dir, split=split, max_examples=limit
            )
            for split in ("train", "test")
        )
        num_classes = mnist_cifar.num_classes(data.name, data_dir=data.data_dir)
    if limit:
        train = {k: v[:limit] for k, v in train.items()}
        test = {k: v[:limit] for k, v in test.items()}
    return Data(train, test, num_classes)


def load_data(config) -> Data:
    """The training and test arrays of ``config.data``, with its variants applied."""
    data = config.data
    if data.name == "linreg":
        train, test = generate_linreg(
            dim=data.dim,
            num_train=data.num_examples,
            num_test=data.num_test,
            noise=data.noise,
            seed=data.seed,
        )
        num_classes = None
    else:
        train, test, num_classes = load_image_splits(data)
    if data.imbalance != 1.0:
        train = classification.imbalance_classes(
            train, ratio=data.imbalance, num_classes=num_classes, seed=data.seed
        )
    if data.label_noise:
        train = dict(train)
        train["label"] = classification.corrupt_labels(
            train["label"], fraction=data.label_noise, num_classes=num_classes, seed=data.seed
        )
    if data.duplicates and data.duplicate_copies:
        train = classification.duplicate_examples(
            train, num_examples=data.duplicates, copies=data.duplicate_copies, seed=data.seed
        )
    return Data(train, test, num_classes)


class EpochBatches:
    """Training batch ``t``: rows of a seeded permutation of epoch ``t // steps_per_epoch``.

    A pure function of ``(seed, step)``: a resumed run needs only its step, and nothing
    else (the measurement included) can advance it. An epoch is ``N // B`` batches; the
    last ``N mod B`` rows of each epoch's permutation are left out of that epoch.
    """

    def __init__(self, size: int, batch_size: int, seed: int):
        if batch_size > size:
            raise ValueError(
                f"A batch of {batch_size} exceeds the {size} training examples (config.batch_size)."
            )
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.steps_per_epoch = size // batch_size
        self._epoch, self._order = None, None

    def indices(self, step: int) -> np.ndarray:
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        start = position * self.batch_size
        return self._order[start : start + self.batch_size]

    def local_batch(self, arrays, step: int) -> dict[str, np.ndarray]:
        """This process's share of batch ``step`` (all of it on one process)."""
        rows = self.indices(step)
        share = len(rows) // jax.process_count()
        rows = rows[jax.process_index() * share : (jax.process_index() + 1) * share]
        return {k: v[rows] for k, v in arrays.items()}


# ----------------------------------------------------------------------------------------
# Model, loss and optimizer.
# ----------------------------------------------------------------------------------------
def build_model(config, data: Data, seed: int) -> nnx.Module:
    rngs = nnx.Rngs(seed)
    m = config.model
    if m.name == "linear":
        return models.LinearRegression(data.train["x"].shape[1], rngs=rngs)
    shape = data.train["image"].shape[1:]
    if m.name == "mlp":
        return models.MLP(int(np.prod(shape)), tuple(m.hidden), data.num_classes, rngs=rngs)
    return models.CNN(shape, tuple(m.features), m.dense, data.num_classes, rngs=rngs)


@functools.cache
def _example_losses():
    """One function object per loss, so every jitted pass that takes it compiles once."""

    def squared_error(model, batch):
        return 0.5 * jnp.square(model(batch["x"]) - batch["y"])

    def cross_entropy(model, batch):
        logits = model(batch["image"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])

    return squared_error, cross_entropy


def make_example_loss(config):
    """``loss(model, batch) -> (B,)``: squared error / 2 or softmax cross-entropy."""
    squared_error, cross_entropy = _example_losses()
    return squared_error if config.data.name == "linreg" else cross_entropy


@functools.cache
def _parameters_only_loss(graphdef, example_loss):
    """The loss of :func:`make_params_loss` for a model whose only variables are its
    parameters; cached, so equal graphs and the same loss give the same object."""

    def loss(params, batch):
        return example_loss(nnx.merge(graphdef, params), batch)

    return loss


def make_params_loss(graphdef, model_state, example_loss):
    """``loss(params, batch) -> (B,)``: ``example_loss`` of the model at ``params``.

    For a model with no variables besides its parameters (every model of
    :mod:`experiments.gvar.models`) it is one function object per graph and loss, so the
    jitted passes that take it (clustering, importance scores, the exact statistics)
    compile once per process, not once per run.
    """
    if not jax.tree.leaves(model_state):
        return _parameters_only_loss(graphdef, example_loss)

    def loss(params, batch):
        return example_loss(nnx.merge(graphdef, params, model_state), batch)

    return loss


def make_eval_fn(graphdef, example_loss, classification_task: bool, chunk_size: int):
    """``evaluate(params, model_state, arrays) -> {"loss", "accuracy"?}`` over all rows."""

    @jax.jit
    def sums(params, model_state, batch):
        model = nnx.merge(graphdef, params, model_state)
        total = jnp.sum(example_loss(model, batch))
        if not classification_task:
            return total, jnp.zeros(())
        correct = jnp.sum(jnp.argmax(model(batch["image"]), -1) == batch["label"])
        return total, correct.astype(jnp.float32)

    def evaluate(params, model_state, arrays):
        size = gvar.num_examples(arrays)
        loss = correct = 0.0
        for start in range(0, size, chunk_size):
            batch = jax.tree.map(lambda x, s=start: x[s : s + chunk_size], arrays)
            total, right = jax.device_get(sums(params, model_state, batch))
            loss, correct = loss + float(total), correct + float(right)
        out = {"loss": loss / size}
        if classification_task:
            out["accuracy"] = correct / size
        return out

    return evaluate


# ----------------------------------------------------------------------------------------
# Measurement.
# ----------------------------------------------------------------------------------------
def make_estimators(config, loss_fn) -> dict[str, gvar.GradientEstimator]:
    """The estimators of ``config.gvar.estimators``; ``loss_fn(params, batch) -> (B,)`` the
    per-example loss at parameters ``params`` (GC and importance sampling also read the
    per-example statistics of its gradients)."""
    b, g = config.batch_size, config.gvar
    factories = {
        "sgd": lambda: gvar.sgd_estimator(loss_fn, batch_size=b, replace=g.replace),
        "sgd_2b": lambda: gvar.sgd_estimator(loss_fn, batch_size=2 * b, replace=g.replace),
        "svrg": lambda: gvar.svrg_estimator(
            loss_fn, batch_size=b, replace=g.replace, chunk_size=g.chunk_size
        ),
        "gc": lambda: clustering.gc_estimator(
            loss_fn,
            batch_size=b,
            num_clusters=config.gc.num_clusters,
            num_passes=config.gc.num_passes,
            min_fraction=config.gc.min_fraction,
            allocation=config.gc.allocation,
            replace=g.replace,
            chunk_size=g.chunk_size,
            seed=config.gc.seed,
        ),
        "importance": lambda: clustering.importance_estimator(
            loss_fn,
            batch_size=b,
            score=g.importance_score,
            smoothing=g.importance_smoothing,
            chunk_size=g.chunk_size,
        ),
    }
    return {name: factories[name]() for name in estimator_names(config)}


def batch_size_of(config, name: str) -> int:
    return 2 * config.batch_size if name == "sgd_2b" else config.batch_size


def check_stats(step: int, name: str, stats: gvar.VarianceStats) -> None:
    """A NaN statistic means a diverged model: stop, naming the step and the estimator."""
    values = {k: float(v) for k, v in zip(gvar.STATISTICS, jax.device_get(stats), strict=True)}
    bad = {k: v for k, v in values.items() if k != "snr" and not np.isfinite(v)}
    if bad or np.isnan(values["snr"]):
        raise FloatingPointError(f"Step {step}: estimator {name!r} measured {values}.")


# ----------------------------------------------------------------------------------------
# Train and evaluate.
# ----------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str, *, allow_config_change: bool = False):
    """Trains with plain SGD and measures the gradient estimators' variance along the way.

    What a run guarantees (as :func:`experiments.vsepp.train.train_and_evaluate`): a
    killed run resumes from its latest checkpoint to the same result (the batch order is
    a function of the step; SVRG's snapshot is saved with the state); SIGTERM saves and
    returns ``{"preempted": True, "step": N}``; a NaN loss or gradient stops the run with
    ``FloatingPointError`` before that state is measured or saved; a workdir made by a
    different config is refused unless ``allow_config_change``.

    Writes into ``workdir``: ``config.json``; ``metrics.jsonl`` and TensorBoard events
    (training loss every ``log_every`` steps; at each measurement ``gvar/<estimator>/<stat>``
    and the train/test loss and accuracy); ``gvar.jsonl`` (one record per measured step
    and estimator, :func:`jaxeff.gvar.read_records`); ``gvar.png`` (variance and
    normalised variance against the step, one line per estimator); ``results.json``.
    Process 0 alone writes them; on many processes every process returns the same results
    (see the module docstring).

    Returns:
      ``{"records": [variance records], "evaluations": [{"step", train/test metrics} at
      each measured step], "final": {train/test metrics}, "params": final parameters
      (host), "steps_per_epoch": int, "preempted": False}``, or ``{"preempted": True,
      "step": int}``.
    """
    # Config: checked, and bound to the workdir, before anything is built ----------------
    validate_config(config)
    # Process 0 alone reads and writes config.json; the others learn its verdict.
    changes = distributed.broadcast_from_process_zero(
        lambda: jt.bind_config_to_workdir(
            config, workdir, may_differ=RESUMABLE_FIELDS, allow_changes=allow_config_change
        )
    )
    if changes:
        jt.announce(f"Continuing {workdir} with changed config fields: {', '.join(changes)}.")
    names = estimator_names(config)
    measuring = config.gvar.measure_every > 0
    use_svrg = measuring and "svrg" in names

    # Data ------------------------------------------------------------------------------
    data = load_data(config)
    classification_task = data.num_classes is not None
    num_train = gvar.num_examples(data.train)
    batches = EpochBatches(num_train, config.batch_size, config.seed)
    # The measurement reads the whole training set from one device of this process.
    device = jax.local_devices()[0]
    train_on_device = jax.device_put(data.train, device)
    test_on_device = jax.device_put(data.test, device)

    # Model and optimizer ----------------------------------------------------------------
    model = build_model(config, data, config.seed)
    tx = optax.sgd(config.learning_rate)
    graphdef, state = jt.create_train_state(model, tx)
    example_loss = make_example_loss(config)

    def train_loss(model, batch, hparams):
        del hparams  # per-example losses: the step weights them by batch["weights"] or 1/B
        return example_loss(model, batch), {}

    # Sharding: parameters replicated, batch split along the data axis --------------------
    mesh = jt.make_mesh(devices=_mesh_devices(config.batch_size))
    state = jt.replicate(state, mesh)
    train_step = jt.make_train_step(
        graphdef,
        train_loss,
        tx,
        state_sharding=jt.replicated_sharding(mesh),
        batch_sharding=jt.data_sharding(mesh),
    )

    # Measurement: separate PRNG stream, a copy of the parameters on one device -----------
    model_state = _local_copy(state.model_state, device)
    params_loss = make_params_loss(graphdef, model_state, example_loss)
    estimators = make_estimators(config, params_loss)
    # SGD's states are fixed; SVRG's is a snapshot; GC and importance sampling are set up
    # at each measured point (clusters / scores at those parameters).
    stateless = {n: est.init(None, data.train) for n, est in estimators.items() if n in STATELESS}
    svrg_init = jax.jit(estimators["svrg"].init) if use_svrg else None
    measure_key = jax.random.key(config.gvar.seed)
    evaluate = make_eval_fn(graphdef, example_loss, classification_task, config.gvar.chunk_size)

    def measurement_params(state):
        return _local_copy(state.params, device)

    # Training batches: seeded epochs, or stratified over gradient clusters ---------------
    use_gc_sampler = config.sampler == "gc"
    sampler = gc_clusters = None
    if use_gc_sampler:
        sampler = clustering.StratifiedSampler(
            num_train,
            batch_size=config.batch_size,
            num_clusters=config.gc.num_clusters,
            seed=config.seed,
            allocation=config.gc.allocation,
            shard_options=grain.sharding.ShardOptions(jax.process_index(), jax.process_count()),
        )

    def recluster(state, gc_clusters):
        """Clusters the training set at ``state``'s parameters, from the previous centres."""
        return clustering.cluster_examples(
            params_loss,
            measurement_params(state),
            train_on_device,
            num_clusters=config.gc.num_clusters,
            key=jax.random.key(config.gc.seed),
            num_passes=config.gc.num_passes,
            min_fraction=config.gc.min_fraction,
            chunk_size=config.gvar.chunk_size,
            state=gc_clusters,
        )

    def local_batch(step: int) -> dict[str, np.ndarray]:
        if not use_gc_sampler:
            return batches.local_batch(data.train, step)
        sample = sampler.batch(step)
        batch = {k: v[sample.indices] for k, v in data.train.items()}
        batch["weights"] = sample.weights
        return batch

    # Checkpoint: resume from the latest (train state, SVRG snapshot, sampler, clusters) ---
    # Every process saves and restores (orbax's multi-host path). The train state is
    # replicated over the mesh; the SVRG snapshot and the clusters live on one device of
    # each process, the same on all, and are saved as host arrays, written by process 0.
    ckpt = jt.Checkpointer(os.path.join(workdir, "checkpoints"))
    svrg_state, svrg_step = None, None
    # The run's own record travels with its checkpoints (no process reads the logs back).
    records, evaluations = [], []

    def checkpoint_tree(state, svrg_state, gc_clusters):
        tree = {"train": state}
        if use_svrg:
            tree["svrg"] = jax.device_get(
                {"params": svrg_state.params, "mean_grad": svrg_state.mean_grad}
            )
        if use_gc_sampler:  # the data order depends on the clusters: save both
            tree["sampler"] = sampler.get_state()
            tree["clusters"] = jax.device_get(gc_clusters)
        return tree

    if ckpt.latest_step is not None:
        params_here = measurement_params(state)
        empty_clusters = None
        if use_gc_sampler:
            first_rows = {k: v[:1] for k, v in data.train.items()}
            shapes = clustering.cluster_leaves(params_loss, params_here, first_rows)
            empty_clusters = clustering.ClusterState(
                clustering.zero_directions(shapes, config.gc.num_clusters),
                jnp.zeros((config.gc.num_clusters,), jnp.float32),
                jnp.zeros((), jnp.int32),
            )
        target = checkpoint_tree(state, gvar.SVRGState(params_here, params_here), empty_clusters)
        restored, extra = ckpt.restore(target)
        state = restored["train"]
        records, evaluations = extra["records"], extra["evaluations"]
        if use_svrg:
            svrg_state = jax.device_put(
                gvar.SVRGState(restored["svrg"]["params"], restored["svrg"]["mean_grad"]), device
            )
            svrg_step = extra["svrg_step"]
        if use_gc_sampler:
            sampler.set_state(restored["sampler"])
            gc_clusters = jax.device_put(restored["clusters"], device)
        jt.announce(f"Resumed from step {int(state.step)} of {config.num_steps} ({workdir}).")
    start = int(state.step)
    jt.announce(
        f"{num_train} training examples, {batches.steps_per_epoch} steps per epoch, "
        f"{config.num_steps} steps, measuring {', '.join(names) or 'nothing'} every "
        f"{config.gvar.measure_every} steps."
    )

    writer = jt.MetricWriter(workdir)
    records_path = os.path.join(workdir, RECORDS)

    def measure(step: int, state) -> dict[str, float]:
        """Measures every estimator at ``state``'s parameters, adds the records and the
        evaluation of ``step`` (in place of any earlier ones); returns the eval metrics."""
        params = measurement_params(state)
        states = dict(stateless)
        active = {n: e for n, e in estimators.items() if n != "svrg"}
        for name in set(active) - set(STATELESS):  # GC, importance: set up at these params
            states[name] = estimators[name].init(params, train_on_device)
        if use_svrg and svrg_state is not None and svrg_step < step:
            active["svrg"], states["svrg"] = estimators["svrg"], svrg_state
        key = jax.random.fold_in(measure_key, step)
        stats = gvar.measure(
            active, states, params, train_on_device, key, num_draws=config.gvar.num_draws
        )
        if config.gvar.exact:
            moments = gvar.gradient_moments(
                params_loss,
                params,
                train_on_device,
                chunk_size=config.gvar.chunk_size,
            )
            stats[EXACT] = gvar.exact_variance(
                moments, batch_size=config.batch_size, replace=config.gvar.replace
            )
        new = []
        for name in [n for n in (*names, EXACT) if n in stats]:
            check_stats(step, name, stats[name])
            batch_size = config.batch_size if name == EXACT else batch_size_of(config, name)
            new.append(gvar.stats_record(step, name, stats[name], batch_size=batch_size))
        scores = {
            f"train_{k}": v for k, v in evaluate(params, model_state, train_on_device).items()
        }
        scores.update(
            {f"test_{k}": v for k, v in evaluate(params, model_state, test_on_device).items()}
        )
        gvar.append_records(records_path, new)  # process 0 only
        flat = {f"gvar/{r['estimator']}/{s}": r[s] for r in new for s in gvar.STATISTICS}
        writer.write(step, {**flat, **scores})
        records[:] = [r for r in records if r["step"] != step] + new
        evaluations[:] = [e for e in evaluations if e["step"] != step] + [{"step": step, **scores}]
        return scores

    # Loop -------------------------------------------------------------------------------
    guard = jt.FiniteGuard()  # no diverged state is ever measured or saved
    pending = []
    with (
        jt.finish_saves_on_error(ckpt, writer),
        jt.PreemptionSignal(ckpt) as preempted,
        jt.progress_bar(config.num_steps, initial=start, desc="train") as bar,
    ):
        for step in range(start, config.num_steps):
            if measuring and step % config.gvar.measure_every == 0:
                guard.check(state.params)
                measure(step, state)
            if use_svrg and step % config.gvar.svrg_snapshot_every == 0:
                svrg_state = svrg_init(measurement_params(state), train_on_device)
                svrg_step = step
            if use_gc_sampler and step % config.gc.recluster_every == 0:
                gc_clusters, assignments = recluster(state, gc_clusters)
                sampler.update(assignments)
            batch = jt.shard_batch(local_batch(step), mesh)
            state, metrics = train_step(state, batch)
            done = step + 1
            guard.update(done, metrics)
            pending.append(metrics)
            if done % config.log_every == 0 or done == config.num_steps:
                guard.check(state.params)
                summary = jt.mean_metrics(pending)
                writer.write(done, {**summary, "epoch": done / batches.steps_per_epoch})
                pending = []
                bar.set_postfix(loss=f"{summary['loss']:.4f}")
            stop = preempted(done)
            if stop or done % config.checkpoint_every == 0 or done == config.num_steps:
                guard.check(state.params)
                ckpt.save(
                    done,
                    checkpoint_tree(state, svrg_state, gc_clusters),
                    extra={"svrg_step": svrg_step, "records": records, "evaluations": evaluations},
                )
            ckpt.check_for_errors()  # a failed background save stops the run here
            bar.update(1)
            if stop:
                writer.close()
                ckpt.close()
                _plot(workdir, config, records)
                jt.announce(
                    f"Preempted at step {done}: checkpoint saved in {workdir}; run the same "
                    "command again to resume."
                )
                return {"preempted": True, "step": done}
        guard.check(state.params)
        final = (
            measure(config.num_steps, state)
            if measuring
            else _final_scores(
                evaluate, measurement_params(state), model_state, train_on_device, test_on_device
            )
        )
    ckpt.wait_until_finished()

    # Results (from memory: every process returns the same) ------------------------------
    _plot(workdir, config, records)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, RESULTS), "w") as f:
            json.dump({"final": final, "steps": config.num_steps}, f, indent=2)
    writer.close()
    ckpt.close()
    return {
        "records": records,
        "evaluations": evaluations,
        "final": final,
        "params": jax.device_get(state.params),
        "steps_per_epoch": batches.steps_per_epoch,
        "preempted": False,
    }


def _final_scores(evaluate, params, model_state, train, test) -> dict[str, float]:
    scores = {f"train_{k}": v for k, v in evaluate(params, model_state, train).items()}
    scores.update({f"test_{k}": v for k, v in evaluate(params, model_state, test).items()})
    return scores


def _local_copy(tree, device):
    """A copy of replicated arrays on one local device, safe from the train step's donation."""
    return jax.tree.map(
        lambda x: jax.device_put(x.addressable_data(0), device, may_alias=False), tree
    )


def _mesh_devices(batch_size: int):
    """All devices on several processes; on one, the most devices that divide the batch."""
    devices = jax.devices()
    if jax.process_count() > 1:
        return devices
    count = max(k for k in range(1, len(devices) + 1) if batch_size % k == 0)
    return devices[:count]


def _plot(workdir: str, config, records) -> None:
    """``gvar.png`` of the run's records so far (process 0)."""
    if jax.process_index() == 0 and records:
        gvar.plot_records(
            records,
            os.path.join(workdir, PLOT),
            title=f"{config.data.name}, {config.model.name}, batch {config.batch_size}",
        )
