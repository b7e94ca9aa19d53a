"""MNIST and CIFAR-10 (and other tfds image-classification sets) read without TensorFlow.

Reads the standard tensorflow-datasets builders (``tfds.builder("mnist",
data_dir=...)``) from files prepared beforehand in the array_record format, through
``builder.as_data_source(split)``: random access, PNG decoding by PIL, no TensorFlow at
run time. Nothing is downloaded here. Prepare a dataset once, on a machine with
TensorFlow installed::

  tfds build mnist --data_dir=/data/tfds --file_format=array_record
  tfds build cifar10 --data_dir=/data/tfds --file_format=array_record

(a copy prepared as TFRecord converts with ``tfds convert_format --root_data_dir=...
--out_file_format=array_record``).

Example::

  train = load_image_classification("mnist", data_dir="/data/tfds", split="train")
  train["image"].shape, train["image"].dtype    # (60000, 28, 28, 1) uint8
  train["label"].shape                          # (60000,) int32
"""

from __future__ import annotations

import os

import numpy as np

from jaxeff._extras import require

tfds = require("tensorflow_datasets", extra="data", feature="jaxeff.data")

__all__ = ["IMAGE_DATASETS", "load_image_classification", "num_classes"]

#: Datasets known to have ``image`` (uint8 HxWxC) and ``label`` (ClassLabel) features.
IMAGE_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")

_READ_BLOCK = 4096


def _builder(name: str, data_dir):
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a tfds dataset name, got {name!r}.")
    if not data_dir:
        raise ValueError(
            f"`data_dir` must name the tfds data directory holding a prepared {name!r}."
        )
    builder = tfds.builder(name, data_dir=os.fspath(data_dir))
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"tfds dataset {name!r} (version {builder.version}) is not prepared under "
            f"{os.fspath(data_dir)!r}. Prepare it once with TensorFlow installed: "
            f"`tfds build {name} --data_dir={os.fspath(data_dir)} --file_format=array_record`."
        )
    file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
    if file_format != "array_record":
        raise ValueError(
            f"tfds dataset {name!r} under {os.fspath(data_dir)!r} is stored as {file_format!r}; "
            "reading without TensorFlow needs array_record. Convert it with `tfds "
            "convert_format --root_data_dir=... --out_file_format=array_record` or rebuild it "
            "with --file_format=array_record."
        )
    features = builder.info.features
    if not {"image", "label"} <= set(features.keys()):
        raise ValueError(
            f"tfds dataset {name!r} must have 'image' and 'label' features, got "
            f"{sorted(features.keys())}."
        )
    return builder


def num_classes(name: str, *, data_dir: str | os.PathLike) -> int:
    """The number of classes of the prepared dataset ``name`` (its ``label`` feature)."""
    return int(_builder(name, data_dir).info.features["label"].num_classes)


def load_image_classification(
    name: str,
    *,
    data_dir: str | os.PathLike,
    split: str = "train",
    max_examples: int | None = None,
) -> dict[str, np.ndarray]:
    """All images and labels of one split of a prepared tfds image-classification dataset.

    Args:
      name: the tfds name, e.g. ``"mnist"`` or ``"cifar10"`` (see :data:`IMAGE_DATASETS`;
        any dataset with ``image`` and ``label`` features works).
      data_dir: the tfds data directory where it was prepared (array_record files).
      split: the split to read (``"train"``, ``"test"``, or a tfds slice like
        ``"train[:10%]"``).
      max_examples: read only the first examples of the split (in stored order).

    Returns:
      ``{"image": (N, H, W, C) uint8, "label": (N,) int32}`` in stored order.

    Raises:
      FileNotFoundError: the dataset is not prepared under ``data_dir``.
      ValueError: it is not stored as array_record, lacks the features, or the split is
        unknown.
    """
    builder = _builder(name, data_dir)
    if max_examples is not None and (
        isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1
    ):
        raise ValueError(
            f"`max_examples` must be a positive integer or None, got {max_examples!r}."
        )
    try:
        source = builder.as_data_source(split)
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"tfds dataset {name!r} has no split {split!r} (splits: "
            f"{sorted(builder.info.splits.keys())}): {e}"
        ) from None
    size = len(source) if max_examples is None else min(max_examples, len(source))
    if size == 0:
        raise ValueError(f"Split {split!r} of tfds dataset {name!r} is empty.")
    images: list[np.ndarray] = []
    labels: list[int] = []
    for start in range(0, size, _READ_BLOCK):
        records = source.__getitems__(list(range(start, min(start + _READ_BLOCK, size))))
        images.extend(np.asarray(r["image"], np.uint8) for r in records)
        labels.extend(int(r["label"]) for r in records)
    return {"image": np.stack(images), "label": np.asarray(labels, np.int32)}
