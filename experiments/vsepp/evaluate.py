r"""Evaluates a trained VSE model: ``python -m experiments.vsepp.evaluate --workdir=DIR``.

Loads ``<workdir>/config.json``, ``vocab.txt`` and the best-dev checkpoint (or the latest
with ``--which=latest``) and prints the retrieval table. On COCO it reports the 1K protocol
(mean over 5 folds of the 5K test images) and the 5K test set; on Flickr30K and the
generated data, the 1K test set. ``--split``/``--folds`` pick one evaluation instead.

On several processes (a pod slice, ``python -m experiments.launch.local``), start it on
every process like training: process 0 reads ``config.json`` and ``vocab.txt`` and sends
them to the others, every process restores the checkpoint, embeds its share of the split
and receives the rest, and the table is printed by process 0.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
from absl import app, flags

from experiments.launch import cluster_flags
from experiments.vsepp import train
from jaxeff import retrieval
from jaxeff import train as jt
from jaxeff.data import Vocabulary
from jaxeff.train import distributed


def load_run(workdir: str, *, which: str = "best"):
    """Restores ``(config, vocab, splits, graphdef, state)`` of a finished or running run.

    ``state`` is replicated on :func:`jaxeff.train.make_mesh` (every device of every
    process).
    """

    def read():  # process 0 only; the others receive what it read
        path = os.path.join(workdir, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: is {workdir!r} a training workdir?")
        with open(path) as f:
            config = json.load(f)
        vocab = Vocabulary.load(os.path.join(workdir, "vocab.txt"))
        return {"config": config, "tokens": list(vocab.tokens)}

    run = distributed.broadcast_from_process_zero(read)
    config = ml_collections.ConfigDict(run["config"])
    vocab = Vocabulary(tuple(run["tokens"]))
    splits = train.load_splits(config, workdir)
    model = train.build_model(config, len(vocab), config.seed)
    # Only the structure of the optimizer state matters for restoring.
    tx, _ = train.make_optimizer(config, num_steps=1, steps_per_epoch=1)
    graphdef, state = jt.create_train_state(model, tx)
    state = jt.replicate(state, jt.make_mesh())  # restored arrays take this sharding
    ckpt = jt.Checkpointer(os.path.join(workdir, "checkpoints"), best_metric="dev_rsum")
    step = ckpt.best_step if which == "best" else ckpt.latest_step
    if step is None:
        raise FileNotFoundError(f"No {which} checkpoint in {workdir}/checkpoints.")
    state, _ = ckpt.restore(state, which=which)
    ckpt.close()
    return config, vocab, splits, graphdef, state


def evaluate_run(
    workdir: str, *, which: str = "best", split: str | None = None, folds: int | None = None
) -> dict[str, retrieval.RetrievalResult]:
    """The paper's test rows for a run: ``{row name: RetrievalResult}``."""
    config, vocab, splits, graphdef, state = load_run(workdir, which=which)
    embed = train.make_embed_fn(graphdef, config)
    if split is not None:
        if split not in splits:
            raise ValueError(f"split must be one of {sorted(splits)}, got {split!r}.")
        plan = {f"{split} ({folds or 1} fold)": (split, folds or 1)}
    elif "testall" in splits:  # COCO: the 5K test images
        plan = {"COCO 1K (5 folds)": ("testall", 5), "COCO 5K": ("testall", 1)}
    else:
        plan = {f"{config.data.name} {config.data.test_split}": (config.data.test_split, 1)}
    results, cache = {}, {}
    for name, (s, k) in plan.items():
        if s not in cache:
            cache[s] = embed(state, splits[s], vocab)
        results[name] = retrieval.evaluate(*cache[s], folds=k, measure=config.loss.measure)
    return results


_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir to evaluate.")
_WHICH = flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint to evaluate.")
_SPLIT = flags.DEFINE_string("split", None, "Evaluate this split only.")
_FOLDS = flags.DEFINE_integer("folds", None, "Folds for --split (5 on COCO testall = 1K).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cluster_flags.initialize()  # several processes: join them first
    results = evaluate_run(
        _WORKDIR.value, which=_WHICH.value, split=_SPLIT.value, folds=_FOLDS.value
    )
    if jax.process_index() == 0:
        print(retrieval.format_table(results))


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    app.run(main)
