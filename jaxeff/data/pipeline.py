"""grain input pipelines for image-caption retrieval (VSE++).

Faghri et al., "VSE++: Improving Visual-Semantic Embeddings with Hard Negatives",
BMVC 2018, https://arxiv.org/abs/1707.05612.

Every function here takes a *source*: any random-access sequence (``len`` and
``source[i]``) of image-level records ``{"image", "captions" (5), "image_id", "group"}``,
such as ``builder.as_data_source(split)`` of :mod:`jaxeff.data.precomp` or
:mod:`jaxeff.data.flickr30k`, :func:`jaxeff.data.coco.coco_captions_source`, or a list.
Like the reference loader, training walks over the ``5 N`` image-caption pairs
(pair ``i`` = image ``i // 5`` with caption ``i % 5``).

Batches are dicts of numpy arrays with fixed shapes, so a jitted step never recompiles:

* ``image``: float32 ``(B, ...)``; ``tokens``: int32 ``(B, max_length)``;
  ``lengths``: int32 ``(B,)`` (real tokens, ``<start>`` and ``<end>`` included);
  ``image_id``: int32 ``(B,)``; training batches hold exactly these four, what a train
  step reads (a record's ``group`` only decides which images share a batch);
* evaluation batches also carry ``mask``: bool ``(B,)``, false on the rows that pad the
  last batch (copies of its first row, so they are finite).
"""

from __future__ import annotations

import dataclasses
import io
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxeff._extras import require
from jaxeff.data.vocab import Vocabulary
from jaxeff.retrieval import CAPTIONS_PER_IMAGE

if TYPE_CHECKING:
    import grain
else:
    grain = require("grain", extra="data", feature="jaxeff.data")
Image = require("PIL.Image", extra="data", feature="jaxeff.data")

__all__ = [
    "batches_per_epoch",
    "caption_texts",
    "eval_caption_batches",
    "eval_image_batches",
    "group_ids",
    "to_float_image",
    "training_batches",
]

_DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)

ImageFn = Callable[[Any], np.ndarray]


def _text(caption: str | bytes) -> str:
    return caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)


def _check_source(source) -> int:
    if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
        raise ValueError(
            f"source must be a random-access sequence of records (len and []), got "
            f"{type(source).__name__}."
        )
    if len(source) == 0:
        raise ValueError("source is empty.")
    return len(source)


def _read(source, indices: Iterable[int]) -> list[dict]:
    """Records ``source[i]`` for ``indices``, batched when the source supports it."""
    indices = [int(i) for i in indices]
    getitems = getattr(source, "__getitems__", None)
    records = getitems(indices) if getitems is not None else [source[i] for i in indices]
    for i, record in zip(indices, records, strict=True):
        if len(record["captions"]) != CAPTIONS_PER_IMAGE:
            raise ValueError(
                f"source[{i}] has {len(record['captions'])} captions, expected "
                f"{CAPTIONS_PER_IMAGE}."
            )
    return records


def _iter_records(source, chunk: int = 256):
    """Yields every record of ``source`` in order, reading ``chunk`` at a time."""
    n = len(source)
    for start in range(0, n, chunk):
        yield from _read(source, range(start, min(n, start + chunk)))


def to_float_image(image: bytes | np.ndarray) -> np.ndarray:
    """Default image preprocessing: raw images to float32 in [0, 1], features unchanged.

    Args:
      image: encoded image bytes (JPEG, PNG, ...), a uint8 ``(H, W, C)`` array, or a float
        array (e.g. precomputed CNN features).

    Returns:
      float32 array: uint8 pixels divided by 255 (decoded bytes are RGB), floats cast.
    """
    if isinstance(image, bytes):
        with Image.open(io.BytesIO(image)) as decoded:
            image = np.asarray(decoded.convert("RGB"))
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255)
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float32, copy=False)
    raise ValueError(f"image must be bytes, uint8 or float, got dtype {image.dtype}.")


def caption_texts(source: grain.sources.RandomAccessDataSource) -> list[str]:
    """All captions of ``source`` in pair order (caption ``5 * image + j``), as str.

    Reads every record once; use it for :func:`jaxeff.data.build_vocabulary` on the
    training split.
    """
    _check_source(source)
    return [_text(c) for record in _iter_records(source) for c in record["captions"]]


@dataclasses.dataclass(frozen=True)
class _PairBatch:
    """Pair indices ``(B,)`` -> a training batch dict."""

    source: Any
    vocab: Vocabulary
    max_length: int
    image_fn: ImageFn

    def __call__(self, pairs: np.ndarray) -> dict[str, np.ndarray]:
        images, captions = np.divmod(np.asarray(pairs).reshape(-1), CAPTIONS_PER_IMAGE)
        unique = np.unique(images)
        by_index = dict(zip(unique.tolist(), _read(self.source, unique), strict=True))
        records = [by_index[i] for i in images.tolist()]
        tokens, lengths = self.vocab.encode_batch(
            [r["captions"][c] for r, c in zip(records, captions.tolist(), strict=True)],
            max_length=self.max_length,
        )
        return {
            "image": np.stack([self.image_fn(r["image"]) for r in records]),
            "tokens": tokens,
            "lengths": lengths,
            "image_id": np.array([r["image_id"] for r in records], dtype=np.int32),
        }


@dataclasses.dataclass(frozen=True)
class _PickFromGroup:
    """Group members -> ``group_size`` random distinct members, one random caption each."""

    group_size: int

    def __call__(self, members: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        chosen = rng.choice(members, size=self.group_size, replace=False)
        return CAPTIONS_PER_IMAGE * chosen + rng.integers(0, CAPTIONS_PER_IMAGE, self.group_size)


def group_ids(source: grain.sources.RandomAccessDataSource) -> np.ndarray:
    """The ``group`` of every record of ``source``, ``(N,)`` int64, in order.

    Reads every record once (decoding its image); pass the result as ``groups`` to
    :func:`training_batches` and :func:`batches_per_epoch` so that they do not read the
    whole split again (in a multi-process run, one process can read it and send it to
    the others).
    """
    _check_source(source)
    return np.array([int(r["group"]) for r in _iter_records(source)], dtype=np.int64)


def _group_members(source, groups, group_size: int) -> list[np.ndarray]:
    n = len(source)
    if groups is None:
        groups = group_ids(source)
    groups = np.asarray(groups)
    if groups.shape != (n,) or not np.issubdtype(groups.dtype, np.integer):
        raise ValueError(
            f"groups must be {n} integers (one per image), got shape {groups.shape} and dtype "
            f"{groups.dtype}."
        )
    values, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    if counts.min() < group_size:
        small = values[counts < group_size]
        raise ValueError(
            f"group_size={group_size} but {len(small)} groups have fewer images, e.g. group "
            f"{small[0]} has {counts[counts < group_size][0]}."
        )
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.cumsum(counts)[:-1])


def _check_batching(batch_size: int, group_size: int | None, shard_count: int, shard_index: int):
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if group_size is not None and (group_size < 1 or batch_size % group_size):
        raise ValueError(
            f"group_size must be a positive divisor of batch_size={batch_size}, got {group_size}."
        )
    if shard_count < 1 or batch_size % shard_count:
        raise ValueError(
            f"shard_count must be a positive divisor of batch_size={batch_size}, got {shard_count}."
        )
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}.")


def _epoch_plan(source, *, batch_size, seed, group_size, groups) -> grain.MapDataset:
    """One epoch of global batches of pair indices, ``(batch_size,)`` int arrays."""
    n = _check_source(source)
    _check_batching(batch_size, group_size, 1, 0)
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}.")
    if group_size is None:
        plan = grain.MapDataset.range(CAPTIONS_PER_IMAGE * n).seed(seed).shuffle()
        plan = plan.batch(batch_size, drop_remainder=True)
    else:
        members = _group_members(source, groups, group_size)
        plan = grain.MapDataset.source(members).seed(seed).shuffle()
        plan = plan.random_map(_PickFromGroup(group_size))
        plan = plan.batch(batch_size // group_size, drop_remainder=True, batch_fn=np.concatenate)
    if len(plan) == 0:
        raise ValueError(
            f"batch_size={batch_size} leaves no full batch in an epoch of {n} images "
            f"({'pairs' if group_size is None else 'groups of ' + str(group_size)})."
        )
    return plan


def batches_per_epoch(
    source: grain.sources.RandomAccessDataSource,
    *,
    batch_size: int,
    group_size: int | None = None,
    groups: Sequence[int] | np.ndarray | None = None,
) -> int:
    """Number of training batches per epoch of :func:`training_batches` (same arguments)."""
    return len(
        _epoch_plan(source, batch_size=batch_size, seed=0, group_size=group_size, groups=groups)
    )


def training_batches(
    source: grain.sources.RandomAccessDataSource,
    vocab: Vocabulary,
    *,
    batch_size: int,
    max_length: int,
    seed: int,
    group_size: int | None = None,
    groups: Sequence[int] | np.ndarray | None = None,
    num_epochs: int | None = None,
    image_fn: ImageFn = to_float_image,
    shard_index: int = 0,
    shard_count: int = 1,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """Shuffled, fixed-shape training batches of image-caption pairs.

    Without ``group_size``, each epoch is a fresh permutation (from ``seed`` and the epoch)
    of the ``5 N`` pairs cut into ``5 N // batch_size`` batches, as in the VSE++ reference.
    With ``group_size``, each epoch shuffles the groups (records with equal ``group``) and
    each batch takes ``batch_size // group_size`` distinct groups and ``group_size`` distinct
    random images of each, every image with one random caption; so near-duplicates meet as
    each other's hard negatives. Groups larger than ``group_size`` show a new random subset
    every epoch.

    The order is a pure function of ``seed``: iterating ``iter(ds)`` and restoring its
    ``get_state()`` (a small JSON-serialisable dict) with ``set_state`` in a fresh iterator
    continues with the same batches.

    Args:
      source: random-access image-level records (see the module docstring).
      vocab: tokenizes the captions.
      batch_size: global batch size ``B``.
      max_length: token columns; longer captions are cut, keeping ``<end>``.
      seed: shuffling seed.
      group_size: optional number of images per group in a batch (divides ``B``).
      groups: optional ``(N,)`` group of each image, instead of reading every record's
        ``group`` (which decodes raw images).
      num_epochs: epochs to produce, ``None`` for endless.
      image_fn: record ``image`` -> float32 array of one fixed shape; default
        :func:`to_float_image` (raw images of different sizes need a resizing function).
      shard_index: this process's slice of each global batch ...
      shard_count: ... out of this many equal slices (e.g. ``jax.process_index()`` and
        ``jax.process_count()``); every process must use the same ``seed``.
      read_options: grain thread prefetching; default 4 threads, 8 batches ahead.

    Returns:
      A ``grain.IterDataset`` of dicts ``image``, ``tokens``, ``lengths``, ``image_id``
      (nothing else), each with ``B // shard_count`` rows.
    """
    if not isinstance(vocab, Vocabulary):
        raise ValueError(f"vocab must be a Vocabulary, got {type(vocab).__name__}.")
    _check_batching(batch_size, group_size, shard_count, shard_index)
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (<start> and <end>), got {max_length}.")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be positive or None, got {num_epochs}.")
    plan = _epoch_plan(
        source, batch_size=batch_size, seed=seed, group_size=group_size, groups=groups
    ).repeat(num_epochs)
    if shard_count > 1:
        size = batch_size // shard_count
        plan = plan.map(operator.itemgetter(slice(shard_index * size, (shard_index + 1) * size)))
    batches = plan.map(_PairBatch(source, vocab, max_length, image_fn))
    return batches.to_iter_dataset(read_options or _DEFAULT_READ_OPTIONS)


def _pad_rows(num_rows: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row selection padding ``num_rows`` rows to ``batch_size`` with row 0, and the mask."""
    mask = np.arange(batch_size) < num_rows
    return np.where(mask, np.arange(batch_size), 0), mask


def _eval_slices(num_rows: int, batch_size: int, shard_index: int, shard_count: int):
    """This shard's rows of each of the ``ceil(num_rows / batch_size)`` global batches.

    Global batch ``t`` holds rows ``[t·B, (t+1)·B)``; shard ``i`` of ``P`` takes its
    ``i``-th contiguous ``B / P`` of them (fewer, or none, at the end of the data).
    """
    _check_batching(batch_size, None, shard_count, shard_index)
    size = batch_size // shard_count
    starts = np.arange(0, num_rows, batch_size) + shard_index * size
    return [np.arange(min(s, num_rows), min(s + size, num_rows)) for s in starts.tolist()]


@dataclasses.dataclass(frozen=True)
class _ImageBatch:
    source: Any
    batch_size: int
    image_fn: ImageFn

    def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices).reshape(-1)
        real = len(indices)
        # A slice past the end of the data is all padding: copies of image 0.
        records = _read(self.source, indices if real else [0])
        take, _ = _pad_rows(len(records), self.batch_size)
        images = np.stack([self.image_fn(r["image"]) for r in records])
        ids = np.array([r["image_id"] for r in records], dtype=np.int32)
        mask = np.arange(self.batch_size) < real
        return {"image": images[take], "image_id": ids[take], "mask": mask}


def eval_image_batches(
    source: grain.sources.RandomAccessDataSource,
    *,
    batch_size: int,
    image_fn: ImageFn = to_float_image,
    shard_index: int = 0,
    shard_count: int = 1,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """All images of ``source`` in order, in ``ceil(N / batch_size)`` fixed-size batches.

    With ``shard_count = P > 1`` (an evaluation split over processes), each global batch
    of ``batch_size`` images is cut into ``P`` contiguous slices and this shard reads and
    yields only slice ``shard_index`` of every batch: ``batch_size / P`` rows, padded
    (``mask`` false) where the data ends. Every shard yields the same number of batches;
    its slices of all of them, concatenated over the shards batch by batch, are the
    unsharded batches (see :func:`jaxeff.train.distributed.gather_rows`).

    Args:
      source: random-access image-level records.
      batch_size: rows per (global) batch; the last batch is padded and flagged by
        ``mask``. Divisible by ``shard_count``.
      image_fn: record ``image`` -> float32 array of one fixed shape; default
        :func:`to_float_image`.
      shard_index: this process's slice of each batch ...
      shard_count: ... out of this many (e.g. ``jax.process_index()`` and
        ``jax.process_count()``).
      read_options: grain thread prefetching; default 4 threads, 8 batches ahead.

    Returns:
      A ``grain.IterDataset`` (iterate it once per evaluation) of dicts ``image``,
      ``image_id``, ``mask`` with ``batch_size / shard_count`` rows. Concatenating the
      ``image`` rows where ``mask`` holds gives the ``N`` images in source order (without
      sharding), or this shard's share of them.
    """
    n = _check_source(source)
    slices = _eval_slices(n, batch_size, shard_index, shard_count)
    size = batch_size // shard_count
    batches = grain.MapDataset.source(slices).map(_ImageBatch(source, size, image_fn))
    return batches.to_iter_dataset(read_options or _DEFAULT_READ_OPTIONS)


@dataclasses.dataclass(frozen=True)
class _CaptionBatch:
    tokens: np.ndarray
    lengths: np.ndarray
    image_ids: np.ndarray
    batch_size: int

    def __call__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        rows = np.asarray(rows).reshape(-1)
        real = len(rows)
        if not real:  # a slice past the end of the data is all padding: copies of row 0
            rows = np.zeros((1,), np.int64)
        take, _ = _pad_rows(len(rows), self.batch_size)
        rows = rows[take]
        return {
            "tokens": self.tokens[rows],
            "lengths": self.lengths[rows],
            "image_id": self.image_ids[rows],
            "mask": np.arange(self.batch_size) < real,
        }


def eval_caption_batches(
    source: grain.sources.RandomAccessDataSource,
    vocab: Vocabulary,
    *,
    batch_size: int,
    max_length: int,
    shard_index: int = 0,
    shard_count: int = 1,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """All ``5 N`` captions of ``source`` in order (caption ``5 * image + j``), batched.

    The captions this shard needs are read and tokenized once, when this is called; the
    batches are then slices of the resulting arrays. Sharding works as in
    :func:`eval_image_batches`: with ``shard_count = P``, this shard yields slice
    ``shard_index`` (``batch_size / P`` rows) of each global batch and reads only the
    records of the images those captions describe.

    Args:
      source: random-access image-level records.
      vocab: tokenizes the captions.
      batch_size: rows per (global) batch; the last batch is padded and flagged by
        ``mask``. Divisible by ``shard_count``.
      max_length: token columns; longer captions are cut, keeping ``<end>``.
      shard_index: this process's slice of each batch ...
      shard_count: ... out of this many.
      read_options: grain thread prefetching; default 4 threads, 8 batches ahead.

    Returns:
      A ``grain.IterDataset`` of dicts ``tokens``, ``lengths``, ``image_id``, ``mask``, in
      ``ceil(5 N / batch_size)`` batches of ``batch_size / shard_count`` rows.
    """
    if not isinstance(vocab, Vocabulary):
        raise ValueError(f"vocab must be a Vocabulary, got {type(vocab).__name__}.")
    n = _check_source(source)
    slices = _eval_slices(CAPTIONS_PER_IMAGE * n, batch_size, shard_index, shard_count)
    wanted = np.concatenate(slices)
    # The images whose captions this shard embeds (image 0 alone if none: it pads).
    images = np.unique(wanted // CAPTIONS_PER_IMAGE) if wanted.size else np.zeros(1, np.int64)
    captions, image_ids = [], np.empty((len(images),), np.int32)
    chunk = 256
    for start in range(0, len(images), chunk):
        for i, record in enumerate(_read(source, images[start : start + chunk]), start):
            captions.extend(record["captions"])
            image_ids[i] = record["image_id"]
    tokens, lengths = vocab.encode_batch(captions, max_length=max_length)
    image_ids = np.repeat(image_ids, CAPTIONS_PER_IMAGE)
    # Global caption row -> row of the arrays above.
    local = lambda rows: (
        CAPTIONS_PER_IMAGE * np.searchsorted(images, rows // CAPTIONS_PER_IMAGE)
        + rows % CAPTIONS_PER_IMAGE
    )
    size = batch_size // shard_count
    batch = _CaptionBatch(tokens, lengths, image_ids, size)
    batches = grain.MapDataset.source([local(rows) for rows in slices]).map(batch)
    return batches.to_iter_dataset(read_options or _DEFAULT_READ_OPTIONS)
