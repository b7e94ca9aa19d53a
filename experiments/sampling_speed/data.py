"""The training and test sets of one data regime, from the library's loaders and variants.

The digits or a prepared tfds image set, loaded as the gradient-variance experiment loads
them (:func:`experiments.gvar.train.load_image_splits`), then the regime's variants in the
order of :mod:`jaxeff.data.classification`: class imbalance (:func:`majority_class`),
label noise (:func:`jaxeff.data.corrupt_labels`), duplicates
(:func:`jaxeff.data.duplicate_examples`). The test split is never modified.
"""

from __future__ import annotations

import numpy as np

from experiments.gvar.train import Data, load_image_splits
from jaxeff.data import classification

__all__ = ["Data", "load_regime", "majority_class"]


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
    train, test, num_classes = load_image_splits(data)
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
