"""VSE0 / VSE++ / Order training and evaluation: ``train_and_evaluate(config, workdir)``.

Faghri et al., "VSE++: Improving Visual-Semantic Embeddings with Hard Negatives",
BMVC 2018, https://arxiv.org/abs/1707.05612. The loop reads top to bottom: data, model
and optimizer, sharding, update step, checkpoint/resume, evaluation, loop, test.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import optax
from absl import logging

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
from jaxeff.models import vse_model

PRECOMP = ("coco", "f30k", "f8k")


# ----------------------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------------------
def load_splits(config, workdir) -> dict[str, Any]:
    """Prepares the dataset named by ``config.data`` and returns ``{split: data source}``."""
    data = config.data
    data_dir = data.data_dir or os.path.join(workdir, "tfds")
    if data.name == "shapes":
        builder = build_shapes(
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
        builder = build_precomp(data.name, data.manual_dir, data_dir)
    else:
        raise ValueError(
            f"config.data.name must be 'shapes' or one of {PRECOMP}, got {data.name!r}."
        )
    return {split: builder.as_data_source(split) for split in builder.info.splits}


def load_or_build_vocabulary(config, train_source, workdir) -> Vocabulary:
    """The vocabulary of the training captions only, saved as ``<workdir>/vocab.txt``."""
    path = os.path.join(workdir, "vocab.txt")
    if os.path.exists(path):
        return Vocabulary.load(path)
    vocab = build_vocabulary(caption_texts(train_source), threshold=config.data.vocab_threshold)
    if jax.process_index() == 0:
        vocab.save(path)
    return vocab


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

    With ``config.loss.warmup_steps > 0`` the MH weight comes in ``hparams["hard_weight"]``
    (SH before the warm-up ends, MH after) without recompiling.
    """
    cfg = config.loss

    def loss_fn(model, batch, hparams):
        images, captions = model(batch["image"], batch["tokens"], batch["lengths"])
        scores = losses.similarity_matrix(images, captions, measure=cfg.measure)
        hard = hparams["hard_weight"] if cfg.warmup_steps else bool(cfg.max_violation)
        loss = losses.hinge_loss(
            scores,
            margin=cfg.margin,
            max_violation=hard,
            top_k=cfg.top_k if hard is not False else None,
            reduction=cfg.reduction,
            positives=losses.positives_from_ids(batch["image_id"]),
        )
        return loss, {"sim_spread": losses.similarity_spread(scores)}

    return loss_fn


def hard_weight_fn(config):
    """Weight of the MH term per step: 0 for SH, 1 for MH, SH→MH with a warm-up."""
    if config.loss.warmup_steps:
        if not config.loss.max_violation:
            raise ValueError("config.loss.warmup_steps needs config.loss.max_violation=True.")
        return losses.hard_negative_schedule(config.loss.warmup_steps)
    return lambda step: np.float32(bool(config.loss.max_violation))


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
def make_embed_fn(graphdef, config):
    """Returns ``embed(state, source, vocab) -> (image_emb (N, D), caption_emb (5N, D))``."""

    @jax.jit
    def encode_images(state, images):
        return jt.merge_model(graphdef, state).encode_images(images)

    @jax.jit
    def encode_captions(state, tokens, lengths):
        return jt.merge_model(graphdef, state).encode_captions(tokens, lengths)

    def embed(state, source, vocab):
        b = config.eval_batch_size
        ims = [
            np.asarray(encode_images(state, x["image"]))[x["mask"]]
            for x in eval_image_batches(source, batch_size=b)
        ]
        caps = [
            np.asarray(encode_captions(state, x["tokens"], x["lengths"]))[x["mask"]]
            for x in eval_caption_batches(
                source, vocab, batch_size=b, max_length=config.data.max_length
            )
        ]
        return np.concatenate(ims), np.concatenate(caps)

    return embed


def evaluate_split(embed, state, source, vocab, config, *, folds: int = 1):
    image_emb, caption_emb = embed(state, source, vocab)
    return retrieval.evaluate(image_emb, caption_emb, folds=folds, measure=config.loss.measure)


# ----------------------------------------------------------------------------------------
# Train and evaluate.
# ----------------------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
    """Trains a VSE model, keeps the best-dev-rsum checkpoint, evaluates it on the test set.

    Resumes from ``<workdir>/checkpoints`` if a previous run left one (same batches,
    same result). Writes ``metrics.jsonl`` + TensorBoard events, ``config.json``,
    ``vocab.txt`` and ``results.json`` into ``workdir``.

    Returns:
      ``{"dev": best dev RetrievalResult, "test": test RetrievalResult, "best_step": int,
      "collapsed": bool, "history": [dev metrics per evaluation]}``.
    """
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        jt.config_to_json(config, os.path.join(workdir, "config.json"))

    # Data ------------------------------------------------------------------------------
    splits = load_splits(config, workdir)
    train_source, dev_source = splits["train"], splits[config.data.eval_split]
    vocab = load_or_build_vocabulary(config, train_source, workdir)
    group_size = config.data.group_size or None
    steps_per_epoch = batches_per_epoch(
        train_source, batch_size=config.batch_size, group_size=group_size
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
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    logging.info(
        "%d training pairs, %d steps per epoch, %d steps, vocabulary %d",
        5 * len(train_source),
        steps_per_epoch,
        num_steps,
        len(vocab),
    )

    # Model and optimizer ----------------------------------------------------------------
    model = build_model(config, len(vocab), config.seed)
    tx, lr_schedule = make_optimizer(config, num_steps, steps_per_epoch)
    graphdef, state = jt.create_train_state(model, tx)
    hard_weight = hard_weight_fn(config)

    # Sharding: parameters replicated, batch split along the data axis --------------------
    mesh = jt.make_mesh()
    state = jt.replicate(state, mesh)
    train_step = jt.make_train_step(
        graphdef,
        make_loss_fn(config),
        tx,
        state_sharding=jt.replicated_sharding(mesh),
        batch_sharding=jt.data_sharding(mesh),
    )
    embed = make_embed_fn(graphdef, config)

    # Checkpoint: resume from the latest, keep the best by dev rsum ------------------------
    ckpt = jt.Checkpointer(os.path.join(workdir, "checkpoints"), best_metric="dev_rsum")
    data_iter = iter(train_data)
    if ckpt.latest_step is not None:
        state, extra = ckpt.restore(state)
        data_iter.set_state(extra["data"])
        logging.info("Resumed from step %d.", int(state.step))
    start = int(state.step)

    # Loop -------------------------------------------------------------------------------
    writer = jt.MetricWriter(workdir)
    collapsed = False
    pending = []
    with jt.progress_bar(num_steps, initial=start, desc="train") as bar:
        for step in range(start, num_steps):
            batch = jt.shard_batch({k: v for k, v in next(data_iter).items() if k != "group"}, mesh)
            state, metrics = train_step(state, batch, {"hard_weight": hard_weight(step)})
            done = step + 1
            pending.append((done, metrics))
            if done % config.log_every == 0 or done == num_steps:
                for logged_step, m in pending:  # the first non-finite step, if any
                    jt.check_finite(m, logged_step)
                summary = _mean_metrics([m for _, m in pending])
                pending = []
                summary.update(
                    learning_rate=float(lr_schedule(step)), hard_weight=float(hard_weight(step))
                )
                writer.write(done, summary)
                bar.set_postfix(loss=f"{summary['loss']:.3f}")
                spread = summary["sim_spread"]
                if not collapsed and summary["hard_weight"] > 0 and spread < losses.COLLAPSE_SPREAD:
                    collapsed = True
                    logging.warning(
                        "Step %d: embeddings collapsed: similarity spread %.2g, loss %.3f "
                        "(MH gives 2·B·margin when all similarities are equal). Warm up with "
                        "SH first (config.loss.warmup_steps).",
                        done,
                        spread,
                        summary["loss"],
                    )
            if done % eval_every == 0 or done == num_steps:
                dev_metrics = evaluate_split(embed, state, dev_source, vocab, config).as_dict(
                    "dev_"
                )
                writer.write(done, dev_metrics)
                ckpt.save(done, state, extra={"data": data_iter.get_state()}, metrics=dev_metrics)
            elif done % config.checkpoint_every == 0 or ckpt.reached_preemption(done):
                ckpt.save(done, state, extra={"data": data_iter.get_state()})
            if ckpt.reached_preemption(done):
                ckpt.wait_until_finished()
                logging.warning("Preempted at step %d; the checkpoint is saved.", done)
                return {}
            bar.update(1)
    ckpt.wait_until_finished()

    # Test the best-dev checkpoint --------------------------------------------------------
    best, _ = ckpt.restore(state, which="best")
    history = [r for r in jt.read_metrics(workdir) if "dev_rsum" in r]
    # The best step's dev numbers were logged when it was saved (the last line wins after a
    # resume repeated some steps).
    dev = retrieval.RetrievalResult.from_dict(
        [r for r in history if r["step"] == ckpt.best_step][-1], prefix="dev_"
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


def _mean_metrics(metrics: list[dict]) -> dict[str, float]:
    """Averages a list of per-step metric dicts."""
    stacked = jax.device_get(metrics)
    return {k: float(np.mean([np.asarray(m[k], np.float64) for m in stacked])) for k in stacked[0]}
