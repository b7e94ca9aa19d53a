"""scikit-learn's handwritten digits (1797 8x8 images, 10 classes): no download needed.

``load_digits()`` returns ``{"train": {...}, "test": {...}}``, each ``{"image": (n, 8, 8, 1)
float32 in [0, 1], "label": (n,) int32}``, from a seeded random split. The images ship
with scikit-learn (``sklearn.datasets.load_digits``, pixel values 0..16, scaled by 1/16).

Example::

  splits = load_digits(test_fraction=0.2, seed=0)   # 1438 train, 359 test
  splits["train"]["image"].shape                    # (1438, 8, 8, 1)
"""

from __future__ import annotations

import numpy as np

from jaxeff._extras import require

__all__ = ["DIGITS_CLASSES", "DIGITS_SHAPE", "load_digits"]

#: Number of classes and image shape of the digits data.
DIGITS_CLASSES = 10
DIGITS_SHAPE = (8, 8, 1)


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """The digits data, split at random into train and test.

    Args:
      test_fraction: fraction of the 1797 images in the test split, in ``[0, 1)``
        (``round(fraction · 1797)`` images; 0 gives an empty test split).
      seed: seeds the split.

    Returns:
      ``{"train": {"image", "label"}, "test": {"image", "label"}}``.
    """
    datasets = require("sklearn.datasets", extra="experiments", feature="jaxeff.data.load_digits")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must lie in [0, 1), got {test_fraction!r}.")
    bunch = datasets.load_digits()
    images = (np.asarray(bunch.images, np.float32) / 16.0)[..., None]
    labels = np.asarray(bunch.target, np.int32)
    order = np.random.default_rng(seed).permutation(len(labels))
    num_test = int(round(test_fraction * len(labels)))
    test, train = np.sort(order[:num_test]), np.sort(order[num_test:])
    return {
        "train": {"image": images[train], "label": labels[train]},
        "test": {"image": images[test], "label": labels[test]},
    }
