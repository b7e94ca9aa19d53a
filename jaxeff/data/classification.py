"""Variants of an in-memory classification dataset: duplicates, label noise, class imbalance.

A dataset here is a dict of numpy arrays sharing the leading example axis, e.g.
``{"image": (N, H, W, C), "label": (N,) int}`` (:mod:`jaxeff.data.digits`,
:mod:`jaxeff.data.mnist_cifar`). Each function returns a new dict and is deterministic
given its seed. They follow the variants of Faghri et al., "A Study of Gradient Variance
in Deep Learning" (https://arxiv.org/abs/2007.04532), whose code appended ``copies``
copies of ``num_examples`` random training examples and replaced a fraction of the labels
by uniformly random ones (which may equal the true label).

Apply them in the order :func:`imbalance_classes`, :func:`corrupt_labels`,
:func:`duplicate_examples` (copies then carry the noisy labels, as in that code).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["corrupt_labels", "duplicate_examples", "imbalance_classes", "num_rows"]


def num_rows(data: Mapping[str, np.ndarray]) -> int:
    """The common leading-axis size of the arrays of ``data``."""
    if not isinstance(data, Mapping) or not data:
        raise ValueError(f"`data` must be a non-empty dict of arrays, got {type(data).__name__}.")
    shapes = {k: np.shape(v) for k, v in data.items()}
    sizes = {shape[0] for shape in shapes.values() if shape}
    if len(sizes) != 1 or not all(shapes.values()):
        raise ValueError(f"`data` arrays must share a leading example axis, got {shapes}.")
    return sizes.pop()


def _take(data, rows):
    return {k: np.asarray(v)[rows] for k, v in data.items()}


def duplicate_examples(
    data: Mapping[str, np.ndarray], *, num_examples: int, copies: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Appends ``copies`` extra copies of each of ``num_examples`` randomly chosen examples.

    The result has ``N + num_examples · copies`` rows: the original rows first, then the
    copies grouped by example. With many copies the duplicated examples dominate the
    data; their gradients are identical, the structure gradient clustering exploits.

    Args:
      data: dict of arrays with ``N`` rows.
      num_examples: how many distinct examples to duplicate (``<= N``).
      copies: extra copies of each.
      seed: chooses the examples.
    """
    size = num_rows(data)
    for name, value in (("num_examples", num_examples), ("copies", copies)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
    if num_examples > size:
        raise ValueError(f"`num_examples` ({num_examples}) exceeds the {size} examples of `data`.")
    chosen = np.random.default_rng(seed).permutation(size)[:num_examples]
    rows = np.concatenate([np.arange(size), np.repeat(chosen, copies)])
    return _take(data, rows)


def corrupt_labels(
    labels: np.ndarray, *, fraction: float, num_classes: int, seed: int = 0
) -> np.ndarray:
    """Replaces the labels of a random ``fraction`` of the examples by uniform random classes.

    A replaced label equals the true one with probability ``1/num_classes``, as in the
    study's code, so ``fraction=1`` gives labels independent of the inputs.

    Args:
      labels: ``(N,)`` integer labels.
      fraction: in ``[0, 1]``; ``round(fraction · N)`` labels are redrawn.
      num_classes: labels are drawn from ``range(num_classes)``.
      seed: chooses the examples and their new labels.

    Returns:
      A new ``(N,)`` array of the dtype of ``labels``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(
            f"`labels` must be a 1-D integer array, got {labels.dtype} {labels.shape}."
        )
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"`fraction` must lie in [0, 1], got {fraction!r}.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"`num_classes` must be a positive integer, got {num_classes!r}.")
    rng = np.random.default_rng(seed)
    count = int(round(fraction * len(labels)))
    rows = rng.permutation(len(labels))[:count]
    out = labels.copy()
    out[rows] = rng.integers(0, num_classes, count)
    return out


def imbalance_classes(
    data: Mapping[str, np.ndarray],
    *,
    ratio: float,
    num_classes: int,
    seed: int = 0,
    label_key: str = "label",
) -> dict[str, np.ndarray]:
    r"""Subsamples class ``k`` to ``n_k · ratio^{k/(K-1)}`` examples (a long-tailed profile).

    Class 0 keeps all its examples and class ``K - 1`` a fraction ``ratio`` of them (at
    least one), the classes between them an exponentially decreasing fraction. Kept rows
    stay in their original order.

    Args:
      data: dict of arrays with a ``label_key`` array of integer labels.
      ratio: in ``(0, 1]``; 1 leaves the data unchanged.
      num_classes: ``K``.
      seed: chooses the kept examples.
      label_key: the name of the labels in ``data``.
    """
    num_rows(data)
    if label_key not in data:
        raise KeyError(f"`data` has no {label_key!r} array; keys: {sorted(data)}.")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"`ratio` must lie in (0, 1], got {ratio!r}.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}.")
    labels = np.asarray(data[label_key])
    rng = np.random.default_rng(seed)
    keep = []
    for k in range(num_classes):
        rows = np.flatnonzero(labels == k)
        target = max(1, int(np.floor(len(rows) * ratio ** (k / (num_classes - 1)))))
        keep.append(rng.permutation(rows)[: min(target, len(rows))])
    return _take(data, np.sort(np.concatenate(keep)))
