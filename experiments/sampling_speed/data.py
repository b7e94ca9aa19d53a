"""The training and test sets of one data regime, from the library's loaders and variants.

The digits (:func:`jaxeff.data.load_digits`) or a prepared tfds image set
(:func:`jaxeff.data.load_image_classification`), then the regime's variants in the order
of :mod:`jaxeff.data.classification`: class imbalance (:func:`majority_class`), label
noise (:func:`jaxeff.data.corrupt_labels`), duplicates
(:func:`jaxeff.data.duplicate_examples`). The test split is never modified.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxeff.data import classification, digits, mnist_cifar

__all__ = ["Data", "load_regime", "majority_class"]


class Data(NamedTuple):
    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    num_classes: int


def majority_class(
    data: dict[str, np.ndarray], *, factor: int, num_classes: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Keeps every example of class 0 and ``1/factor`` of each other class (at least one).

    Class 0 ends ``factor`` times as frequent as each of the others: the step profile of
    imbalance, where :func:`jaxeff.data.imbalance_classes` gives the long-tailed one. Kept
    rows stay in their original order.
    """
    labels = np.asarray(data["label"])
    rng = np.random.default_rng(seed)
    keep = [np.flatnonzero(labels == 0)]
    for k in range(1, num_classes):
        rows = np.flatnonzero(labels == k)
        keep.append(rng.permutation(rows)[: max(1, round(len(rows) / factor))])
    rows = np.sort(np.concatenate(keep))
    return {name: np.asarray(values)[rows] for name, values in data.items()}


def load_regime(config, regime) -> Data:
    """``config.data``'s splits with ``regime``'s variants applied to the training split."""
    data = config.data
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
    if regime.majority_factor > 1:
        train = majority_class(
            train, factor=regime.majority_factor, num_classes=num_classes, seed=data.seed
        )
    if regime.label_noise:
        train = dict(train)
        train["label"] = classification.corrupt_labels(
            train["label"], fraction=regime.label_noise, num_classes=num_classes, seed=data.seed
        )
    if regime.duplicates and regime.duplicate_copies:
        train = classification.duplicate_examples(
            train,
            num_examples=regime.duplicates,
            copies=regime.duplicate_copies,
            seed=data.seed,
        )
    return Data(train, test, num_classes)
