"""Raw-image MS-COCO records from tfds ``coco_captions`` (Karpathy splits).

Faghri et al., "VSE++: Improving Visual-Semantic Embeddings with Hard Negatives",
BMVC 2018, https://arxiv.org/abs/1707.05612 uses the Karpathy splits of COCO 2014:
113,287 train (82,783 train + 30,504 restval), 5,000 val and 5,000 test images.
tfds ships them as ``coco_captions/2014`` (splits train, val, test, restval).

Building ``coco_captions`` downloads about 19 GB and needs TensorFlow (its builder code
imports it); reading does not. Build it once where both are available::

  tfds build coco_captions/2014 --file_format=array_record --data_dir=DATA_DIR

then :func:`coco_captions_source` opens the prepared files from ``DATA_DIR`` with
``tfds.builder_from_directory`` (no TensorFlow, no download) and maps each record to
the schema of the other builders: ``image`` (uint8 ``(H, W, 3)``), ``captions`` (the
first 5), ``image_id`` (position in the split) and ``group`` (= ``image_id``), plus
``coco_id`` (the COCO image id).

The record order is the one tfds wrote (``coco_captions`` shuffles by key), not the order
of the Karpathy JSON; retrieval only needs images and captions to come from the same
records, which :mod:`jaxeff.data.pipeline` guarantees.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from etils import epath

from jaxeff._extras import require
from jaxeff.retrieval import CAPTIONS_PER_IMAGE

if TYPE_CHECKING:
    import grain
else:
    grain = require("grain", extra="data", feature="jaxeff.data")
tfds = require("tensorflow_datasets", extra="data", feature="jaxeff.data")

__all__ = ["COCO_SPLITS", "coco_captions_source"]

DATASET_CONFIG = "coco_captions/2014"

#: Our split names -> the ``coco_captions`` splits they concatenate.
COCO_SPLITS = {
    "train": ("train",),
    "restval": ("restval",),
    "train+restval": ("train", "restval"),
    "dev": ("val",),
    "val": ("val",),
    "test": ("test",),
}


def _prepared_dir(data_dir: epath.PathLike) -> epath.Path:
    config_dir = epath.Path(data_dir) / DATASET_CONFIG
    versions = []
    if config_dir.is_dir():
        for child in config_dir.iterdir():
            if (child / "dataset_info.json").exists():
                try:
                    versions.append((tfds.core.Version(child.name), child))
                except ValueError:
                    continue
    if not versions:
        raise FileNotFoundError(
            f"{DATASET_CONFIG} is not prepared under data_dir {os.fspath(data_dir)!r} (no "
            f"{os.fspath(config_dir)}/<version>/dataset_info.json). Build it where TensorFlow "
            f"and the network are available: `tfds build {DATASET_CONFIG} "
            f"--file_format=array_record --data_dir=...`."
        )
    return max(versions, key=lambda v: v[0])[1]


def _to_record(index: int, record: dict) -> dict:
    texts = list(record["captions"]["text"])
    if len(texts) < CAPTIONS_PER_IMAGE:
        raise ValueError(
            f"COCO image {record['image/id']} has {len(texts)} captions, expected at least "
            f"{CAPTIONS_PER_IMAGE}."
        )
    return {
        "image": record["image"],
        "captions": texts[:CAPTIONS_PER_IMAGE],
        "image_id": index,
        "group": index,
        "coco_id": int(record["image/id"]),
    }


def coco_captions_source(split: str, *, data_dir: epath.PathLike) -> grain.MapDataset:
    """Random-access image-level COCO records of one Karpathy split.

    Args:
      split: one of :data:`COCO_SPLITS` (``"dev"`` is Karpathy val; ``"train+restval"``
        is the 113K training set of VSE++).
      data_dir: the tfds data dir where ``coco_captions/2014`` was prepared in the
        array_record format.

    Returns:
      A ``grain.MapDataset`` of ``{"image", "captions", "image_id", "group", "coco_id"}``
      in file order.

    Raises:
      ValueError: unknown ``split``.
      FileNotFoundError: the dataset is not prepared in ``data_dir``; nothing is downloaded.
      NotImplementedError: (from tfds) the prepared files are not array_record; convert
        them with ``tfds convert_format``.
    """
    if split not in COCO_SPLITS:
        raise ValueError(f"split must be one of {sorted(COCO_SPLITS)}, got {split!r}.")
    builder = tfds.builder_from_directory(_prepared_dir(data_dir))
    sources = [grain.MapDataset.source(builder.as_data_source(s)) for s in COCO_SPLITS[split]]
    records = sources[0] if len(sources) == 1 else grain.MapDataset.concatenate(sources)
    return records.map_with_index(_to_record)
