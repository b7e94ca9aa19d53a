"""VSE0 / VSE++ / Order training and evaluation: ``train_and_evaluate(config, workdir)``.

Faghri et al., "VSE++: Improving Visual-Semantic Embeddings with Hard Negatives",
BMVC 2018, https://arxiv.org/abs/1707.05612. The loop reads top to bottom: data, model
and optimizer, sharding, update step, checkpoint/resume, evaluation, loop, test.

The same code runs on one device, on several, and on many processes (one per host, after
``jaxeff.train.distributed.initialize_distributed``):

* each process loads only its slice of every training batch, and embeds only its slice
  of every evaluation batch; the embeddings are then gathered on every process, so each
  computes the same retrieval numbers (equal to a single-process evaluation);
* only process 0 writes files (``config.json``, ``vocab.txt``, metrics, ``results.json``)
  and only process 0 reads them back: it checks the workdir's config and builds or loads
  the vocabulary (and the training images' groups), then sends them to the others;
  the dev history travels inside the checkpoints;
* checkpoints are written and restored by every process together (orbax), so the
  workdir must be a directory all processes see (NFS or a single machine);
* a dataset is prepared by process 0 first, then opened (or, on a machine with its own
  disk, prepared) by the others, so a shared ``data_dir`` is never written twice at once.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from jaxeff import losses, retrieval
from jaxeff import train as jt
from jaxeff.data import (
    Vocabulary,
    batches_per_epoch,
    build_precomp,
    build_shapes,
    build_vocabulary,
    caption_texts,
    eval_caption_batches,
    eval_image_batches,
    training_batches,
)
from jaxeff.data.pipeline import group_ids
from jaxeff.losses.hinge import REDUCTIONS
from jaxeff.losses.similarity import MEASURES
from jaxeff.models import vse_model
from jaxeff.train import distributed
from jaxeff.train.sharding import local_rows, with_auto_axes

PRECOMP = ("coco", "f30k", "f8k")
# Fields a run may change when it continues in the same workdir: none of them changes
# what a training step computes.
RESUMABLE_FIELDS = ("log_every", "checkpoint_every", "eval_batch_size", "data.data_dir")


# ----------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------
def validate_config(config) -> None:
    """Checks every field at start-up, before any data is built or anything compiled."""
    jt.check_numbers(
        config,
        positive=[
            "batch_size",
            "learning_rate",
            "grad_clip",
            "log_every",
            "checkpoint_every",
            "eval_batch_size",
            "data.max_length",
            "data.test_folds",
            "model.word_dim",
            "model.embed_size",
            "model.num_layers",
            "loss.top_k",
        ],
        non_negative=[
            "seed",
            "num_steps",
            "num_epochs",
            "eval_every",
            "lr_decay_epochs",
            "data.vocab_threshold",
            "data.group_size",
            "loss.margin",
            "loss.warmup_steps",
        ],
        fraction=["lr_decay_fraction"],
    )
    if not (config.num_steps or config.num_epochs):
        raise ValueError("config.num_steps or config.num_epochs must be positive.")
    if config.data.name not in ("shapes", *PRECOMP):
        raise ValueError(
            f"config.data.name must be 'shapes' or one of {PRECOMP}, got {config.data.name!r}."
        )
    if config.data.name == "shapes":
        jt.check_numbers(
            config,
            positive=["data.train_families", "data.dev_families", "data.test_families"],
        )
    encoders = {"precomp": "model.img_dim", "cnn": "model.image_size"}
    if config.model.image_encoder not in encoders:
        raise ValueError(
            f"config.model.image_encoder must be one of {sorted(encoders)}, got "
            f"{config.model.image_encoder!r}."
        )
    jt.check_numbers(config, positive=[encoders[config.model.image_encoder]])
    if config.loss.measure not in MEASURES:
        raise ValueError(
            f"config.loss.measure must be one of {MEASURES}, got {config.loss.measure!r}."
        )
    if config.loss.reduction not in REDUCTIONS:
        raise ValueError(
            f"config.loss.reduction must be one of {REDUCTIONS}, got {config.loss.reduction!r}."
        )
    if not config.loss.max_violation and (config.loss.warmup_steps or config.loss.top_k > 1):
        raise ValueError(
            "config.loss.warmup_steps and config.loss.top_k > 1 select hard negatives; they "
            "need config.loss.max_violation=True."
        )
    group = config.data.group_size
    if config.batch_size % jax.device_count() or (group and config.batch_size % group):
        raise ValueError(
            f"config.batch_size ({config.batch_size}) must be divisible by the "
            f"{jax.device_count()} devices and by config.data.group_size ({group})."
        )


def resumable_fields(config) -> tuple[str, ...]:
    """:data:`RESUMABLE_FIELDS`, plus the run length when the schedule does not use it."""
    if config.lr_decay_fraction:
        return RESUMABLE_FIELDS
    return (*RESUMABLE_FIELDS, "num_steps", "num_epochs")


# ----------------------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------------------
def load_splits(config, workdir) -> dict[str, Any]:
    """Prepares the dataset named by ``config.data`` and returns ``{split: data source}``.

    On several processes, process 0 prepares it first and the others then open it (a
    shared ``data_dir``) or prepare their own copy (a machine with its own disk), see
    :func:`jaxeff.train.distributed.run_in_turn`.
    """
    data = config.data
    data_dir = data.data_dir or os.path.join(workdir, "tfds")
    if data.name == "shapes":
        prepare = lambda: build_shapes(
            data_dir,
            train_families=data.train_families,
            dev_families=data.dev_families,
            test_families=data.test_families,
            family_size=data.family_size,
            image_size=config.model.image_size,
            seed=data.seed,
        )
    elif data.name in PRECOMP:
        if not data.manual_dir:
            raise ValueError(
                f"config.data.manual_dir must name the folder with the {data.name} precomp "
                "files (train_ims.npy, train_caps.txt, dev_*, test_*)."
            )
        prepare = lambda: build_precomp(data.name, data.manual_dir, data_dir)
    else:
        raise ValueError(
            f"config.data.name must be 'shapes' or one of {PRECOMP}, got {data.name!r}."
        )
    builder = distributed.run_in_turn(prepare, what=f"Preparing the {data.name} dataset")
    return {split: builder.as_data_source(split) for split in builder.info.splits}


def load_training_index(config, train_source, workdir) -> tuple[Vocabulary, np.ndarray | None]:
    """The vocabulary of the training captions and the group of each training image.

    Process 0 alone reads the whole training split (its captions, its group ids) and
    ``<workdir>/vocab.txt``, and sends the result to the other processes, which thus read
    nothing but their own batches and never a file process 0 wrote. A saved vocabulary
    is reused (the workdir's config fixed its threshold); a truncated file is an error,
    never a silently smaller vocabulary. A new one is saved as ``vocab.txt``.

    Returns:
      ``(vocab, groups)``: ``groups`` is ``None`` unless batches are built from groups
      (``config.data.group_size``).
    """

    def read():
        path = os.path.join(workdir, "vocab.txt")
        if os.path.exists(path):
            vocab = Vocabulary.load(path)
        else:
            texts = caption_texts(train_source)
            vocab = build_vocabulary(texts, threshold=config.data.vocab_threshold)
            vocab.save(path)
        groups = group_ids(train_source).tolist() if config.data.group_size else None
        return {"tokens": list(vocab.tokens), "groups": groups}

    index = distributed.broadcast_from_process_zero(read)
    groups = index["groups"]
    return Vocabulary(tuple(index["tokens"])), None if groups is None else np.asarray(groups)


# ----------------------------------------------------------------------------------------
# Model, loss and optimizer.
# ----------------------------------------------------------------------------------------
def build_model(config, vocab_size: int, seed: int):
    m = config.model
    return vse_model(
        image_encoder=m.image_encoder,
        img_dim=m.img_dim if m.image_encoder == "precomp" else None,
        image_size=m.image_size if m.image_encoder == "cnn" else None,
        vocab_size=vocab_size,
        word_dim=m.word_dim,
        embed_size=m.embed_size,
        num_layers=m.num_layers,
        no_imgnorm=m.no_imgnorm,
        use_abs=m.use_abs,
        cnn_features=tuple(m.cnn_features),
        rngs=seed,
    )


def make_loss_fn(config):
    """``loss_fn(model, batch, hparams)`` with the hinge loss of ``config.loss``.

    The weight of the MH term is ``hparams["hard_weight"]`` (see :func:`hard_weight_fn`),
    a traced value, so the SH→MH switch never recompiles.
    """
    cfg = config.loss

    def loss_fn(model, batch, hparams):
        images, captions = encode_pairs(model, batch)
        scores = losses.similarity_matrix(images, captions, measure=cfg.measure)
        loss = losses.hinge_loss(
            scores,
            margin=cfg.margin,
            max_violation=hparams["hard_weight"],
            top_k=cfg.top_k,
            reduction=cfg.reduction,
            positives=losses.positives_from_ids(batch["image_id"]),
        )
        return loss, {"sim_spread": losses.similarity_spread(scores)}

    return loss_fn


def encode_pairs(model, batch):
    """``(image_emb, caption_emb)`` of a batch, on a mesh of either axis type.

    With the batch sharded over explicit mesh axes the encoders run with those axes as
    auto axes (:func:`jaxeff.train.sharding.with_auto_axes`; ``nnx.Embed`` has no rule for
    batch-sharded ids); the embeddings come back sharded along the batch.
    """
    graphdef, state = nnx.split(model)
    forward = lambda state, *inputs: nnx.merge(graphdef, state)(*inputs)
    return with_auto_axes(forward)(state, batch["image"], batch["tokens"], batch["lengths"])


def make_step(graphdef, config, tx, mesh):
    """The jitted update step: state replicated on ``mesh``, batch split along its axis.

    ``mesh`` may have auto or explicit axes (:func:`jaxeff.train.make_mesh`); both give
    the same step.
    """
    return jt.make_train_step(
        graphdef,
        make_loss_fn(config),
        tx,
        state_sharding=jt.replicated_sharding(mesh),
        batch_sharding=jt.data_sharding(mesh),
    )


def hard_weight_fn(config):
    """Weight of the MH term per step, the one reading of ``max_violation``/``warmup_steps``.

    0 for SH (VSE0); for MH (VSE++) 0 during the SH warm-up of ``warmup_steps`` steps and 1
    after (1 from the start without a warm-up).
    """
    if not config.loss.max_violation:
        return lambda step: np.float32(0.0)
    return losses.hard_negative_schedule(config.loss.warmup_steps)


def make_optimizer(config, num_steps: int, steps_per_epoch: int):
    """Adam with gradient-norm clipping and one ×0.1 learning-rate drop (the reference)."""
    if config.lr_decay_fraction:
        decay_step = int(config.lr_decay_fraction * num_steps)
    else:
        decay_step = config.lr_decay_epochs * steps_per_epoch
    schedule = optax.piecewise_constant_schedule(config.learning_rate, {decay_step: 0.1})
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), optax.adam(schedule))
    return tx, schedule


# ----------------------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------------------
def eval_batch_rows(config, mesh) -> int:
    """Rows of a global evaluation batch: ``eval_batch_size`` rounded up to whole devices."""
    return -(-config.eval_batch_size // mesh.size) * mesh.size


def make_embed_fn(graphdef, config, mesh=None):
    """Returns ``embed(state, source, vocab) -> (image_emb (N, D), caption_emb (5N, D))``.

    Data parallel over ``mesh`` (default :func:`jaxeff.train.make_mesh`): each global
    batch of :func:`eval_batch_rows` rows is split over the devices, each process reading
    and embedding only its slice; the embeddings are then gathered on every process
    (:func:`jaxeff.train.distributed.gather_rows`). On several processes, process 0 says
    how many rows each embedded. The result does not depend on how the devices are
    spread over processes.
    """
    mesh = jt.make_mesh() if mesh is None else mesh

    def encoder(method):
        def encode(state, *inputs):
            forward = lambda state, *x: getattr(jt.merge_model(graphdef, state), method)(*x)
            return with_auto_axes(forward)(state, *inputs)

        return jax.jit(encode, out_shardings=jt.data_sharding(mesh))

    encode_images, encode_captions = encoder("encode_images"), encoder("encode_captions")

    def embed_split(encode, batches, keys):
        rows, masks = [], []
        for batch in batches:
            inputs = jt.shard_batch({k: batch[k] for k in keys}, mesh)
            rows.append(local_rows(encode(*[inputs[k] for k in keys])))
            masks.append(batch["mask"])
        return distributed.gather_rows(
            np.concatenate(rows), np.concatenate(masks), num_batches=len(rows)
        )

    def embed(state, source, vocab):
        state = jt.replicate(state, mesh)
        shard = dict(
            batch_size=eval_batch_rows(config, mesh),
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
        )
        images, image_counts = embed_split(
            lambda x: encode_images(state, x), eval_image_batches(source, **shard), ["image"]
        )
        captions, caption_counts = embed_split(
            lambda tokens, lengths: encode_captions(state, tokens, lengths),
            eval_caption_batches(source, vocab, max_length=config.data.max_length, **shard),
            ["tokens", "lengths"],
        )
        if jax.process_count() > 1:
            jt.announce(
                f"Evaluation split over {jax.process_count()} processes: images embedded "
                f"per process {image_counts.tolist()}, captions {caption_counts.tolist()}."
            )
        return images, captions

    return embed


def evaluate_split(embed, state, source, vocab, config, *, folds: int = 1):
    image_emb, caption_emb = embed(state, source, vocab)
    return retrieval.evaluate(image_emb, caption_emb, folds=folds, measure=config.loss.measure)


# ----------------------------------------------------------------------------------------
# Train and evaluate.
# ----------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str, *, allow_config_change: bool = False):
    """Trains a VSE model, keeps the best-dev-rsum checkpoint, evaluates it on the test set.

    What a run guarantees:

    * a kill at any instant (SIGKILL, a crash) loses at most the steps since the last
      checkpoint, never a saved best one: rerunning the same command resumes from the
      latest checkpoint (same batches, same RNG) and ends bit-identical on CPU;
    * SIGTERM (preemption) saves a checkpoint at the current step and returns
      ``{"preempted": True, "step": N}``;
    * a NaN/inf loss or gradient stops the run with ``FloatingPointError`` naming the step,
      before that state can be evaluated or saved;
    * a failed checkpoint write (disk full) stops the run with ``CheckpointWriteError``
      naming the path, keeping the checkpoints committed before it;
    * a workdir made by a different config is refused, listing the differing fields,
      unless ``allow_config_change``.

    Writes ``metrics.jsonl`` + TensorBoard events, ``config.json``, ``vocab.txt`` and
    ``results.json`` into ``workdir`` (process 0 only; see the module docstring for runs on
    several processes).

    Returns:
      ``{"dev": best dev RetrievalResult, "test": test RetrievalResult, "best_step": int,
      "collapsed": bool, "history": [dev metrics per evaluation], "preempted": False}``,
      or ``{"preempted": True, "step": int}`` when stopped by SIGTERM.
    """
    # Config: checked, and bound to the workdir, before anything is built ----------------
    validate_config(config)
    # Process 0 alone reads and writes config.json; the others learn its verdict.
    changes = distributed.broadcast_from_process_zero(
        lambda: jt.bind_config_to_workdir(
            config,
            workdir,
            may_differ=resumable_fields(config),
            allow_changes=allow_config_change,
        )
    )
    if changes:
        jt.announce(f"Continuing {workdir} with changed config fields: {', '.join(changes)}.")

    # Data: each process loads only its slice of every global batch ----------------------
    splits = load_splits(config, workdir)
    train_source, dev_source = splits["train"], splits[config.data.eval_split]
    vocab, groups = load_training_index(config, train_source, workdir)
    group_size = config.data.group_size or None
    steps_per_epoch = batches_per_epoch(
        train_source, batch_size=config.batch_size, group_size=group_size, groups=groups
    )
    num_steps = config.num_steps or config.num_epochs * steps_per_epoch
    eval_every = config.eval_every or steps_per_epoch
    train_data = training_batches(
        train_source,
        vocab,
        batch_size=config.batch_size,
        max_length=config.data.max_length,
        seed=config.seed,
        group_size=group_size,
        groups=groups,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )

    # Model and optimizer ----------------------------------------------------------------
    model = build_model(config, len(vocab), config.seed)
    tx, lr_schedule = make_optimizer(config, num_steps, steps_per_epoch)
    graphdef, state = jt.create_train_state(model, tx)
    hard_weight = hard_weight_fn(config)

    # Sharding: parameters replicated, batch split along the data axis --------------------
    mesh = jt.make_mesh()  # every device of every process
    state = jt.replicate(state, mesh)
    train_step = make_step(graphdef, config, tx, mesh)
    embed = make_embed_fn(graphdef, config, mesh)

    # Checkpoint: resume from the latest, keep the best by dev rsum ------------------------
    # Every process saves and restores (orbax's multi-host path); the extra is process 0's.
    ckpt = jt.Checkpointer(os.path.join(workdir, "checkpoints"), best_metric="dev_rsum")
    data_iter = iter(train_data)
    # The run's own record travels with its checkpoints (no process reads the log back).
    history, collapsed = [], False  # dev metrics of each evaluation; whether MH collapsed
    if ckpt.latest_step is not None:
        state, extra = ckpt.restore(state)
        # Every process walks the same global plan in step, so process 0's position (the
        # one saved) is every process's.
        data_iter.set_state(extra["data"])
        history, collapsed = extra["dev_history"], extra["collapsed"]
        jt.announce(f"Resumed from step {int(state.step)} of {num_steps} ({workdir}).")
    start = int(state.step)
    pairs = retrieval.CAPTIONS_PER_IMAGE * len(train_source)
    jt.announce(
        f"{pairs} training pairs, {steps_per_epoch} steps per epoch, {num_steps} steps, "
        f"vocabulary {len(vocab)}."
    )

    # Loop -------------------------------------------------------------------------------
    writer = jt.MetricWriter(workdir)
    guard = jt.FiniteGuard()  # no diverged state is ever evaluated or saved
    pending, digest = [], 0
    with (
        jt.finish_saves_on_error(ckpt, writer),
        jt.PreemptionSignal(ckpt) as preempted,
        jt.progress_bar(num_steps, initial=start, desc="train") as bar,
    ):
        for step in range(start, num_steps):
            host_batch = next(data_iter)  # this process's slice of the global batch
            # Order-sensitive digest of the examples (process 0's) since the last log line.
            digest = zlib.crc32(np.ascontiguousarray(host_batch["image_id"]).tobytes(), digest)
            batch = jt.shard_batch(host_batch, mesh)
            state, metrics = train_step(state, batch, {"hard_weight": hard_weight(step)})
            done = step + 1
            guard.update(done, metrics)
            pending.append(metrics)
            if done % config.log_every == 0 or done == num_steps:
                guard.check(state.params)
                summary = jt.mean_metrics(pending)
                summary.update(
                    learning_rate=float(lr_schedule(step)), hard_weight=float(hard_weight(step))
                )
                writer.write(done, {**summary, "data_digest": f"{digest:08x}"})
                pending, digest = [], 0
                bar.set_postfix(loss=f"{summary['loss']:.3f}")
                collapsed = collapsed or _report_collapse(done, summary)
            stop = preempted(done)
            evaluate_now = done % eval_every == 0 or done == num_steps
            if evaluate_now or stop or done % config.checkpoint_every == 0:
                guard.check(state.params)
                dev_metrics = None
                if evaluate_now:
                    dev = evaluate_split(embed, state, dev_source, vocab, config)
                    dev_metrics = dev.as_dict("dev_")
                    writer.write(done, dev_metrics)
                    history.append({"step": done, **dev_metrics})
                extra = {
                    "data": data_iter.get_state(),
                    "dev_history": history,
                    "collapsed": collapsed,
                }
                ckpt.save(done, state, extra=extra, metrics=dev_metrics)
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
    ckpt.wait_until_finished()

    # Test the best-dev checkpoint --------------------------------------------------------
    best, _ = ckpt.restore(state, which="best")
    dev = retrieval.RetrievalResult.from_dict(
        next(r for r in history if r["step"] == ckpt.best_step), prefix="dev_"
    )
    test_split = config.data.test_split
    test = (
        evaluate_split(embed, best, splits[test_split], vocab, config, folds=config.data.test_folds)
        if test_split in splits
        else None
    )
    results = {
        "dev": dev,
        "test": test,
        "best_step": ckpt.best_step,
        "collapsed": collapsed,
        "history": history,
        "preempted": False,
    }
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(
                {
                    "dev": dev.as_dict(),
                    "test": test.as_dict() if test else None,
                    "best_step": ckpt.best_step,
                    "collapsed": collapsed,
                },
                f,
                indent=2,
            )
    writer.close()
    ckpt.close()
    return results


def _report_collapse(step: int, summary: dict) -> bool:
    """Warns, and returns True, when MH has collapsed the embeddings (all scores equal)."""
    spread = summary["sim_spread"]
    if summary["hard_weight"] == 0 or spread >= losses.COLLAPSE_SPREAD:
        return False
    jt.announce(
        f"Warning: step {step}: embeddings collapsed: similarity spread {spread:.2g}, loss "
        f"{summary['loss']:.3f} (MH gives 2·B·margin when all similarities are equal). Warm "
        "up with SH first (config.loss.warmup_steps)."
    )
    return True
