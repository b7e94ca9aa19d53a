"""Image-text retrieval evaluation: R@K, median and mean rank, rsum.

The protocol of VSE++ (Faghri et al., BMVC 2018, https://arxiv.org/abs/1707.05612),
following Karpathy & Fei-Fei's splits: ``N`` images, ``5N`` captions, caption ``m``
describes image ``m // 5``.

* image→text (caption retrieval): the rank of image ``i`` is the best rank among its 5
  captions, i.e. the number of *other images'* captions scoring at least as high as its
  best caption.
* text→image (image retrieval): the rank of caption ``m`` is the number of other images
  scoring at least as high as image ``m // 5``.

Ranks start at 0. ``R@K = 100 · mean(rank < K)`` for K = 1, 5, 10, ``medr = ⌊median⌋ + 1``,
``meanr = mean + 1``, and ``rsum`` is the sum of the six recalls. Ties count against the
model (a collapsed embedding where every score is equal gets R@K ≈ 0, not 100); without
ties this equals ranking by ``argsort``. COCO 1K is the mean over 5 consecutive folds of
1000 images (``folds=5`` on the 5K test set), COCO 5K and Flickr30K 1K use ``folds=1``.

The score matrix is never materialised: images are processed in chunks inside one
compiled scan, so 5K images × 25K captions runs in bounded memory.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.losses.similarity import MEASURES, check_embedding_pair, order_similarity

_PAIR_FN = {
    "cosine": lambda u, v: jnp.sum(u * v, axis=-1),
    "order": lambda u, v: -jnp.linalg.norm(jnp.maximum(0.0, v - u), axis=-1),
}


class RankMetrics(NamedTuple):
    """Recall at 1/5/10 (percent), median rank and mean rank (1-based) of one direction."""

    r1: float
    r5: float
    r10: float
    medr: float
    meanr: float


class RetrievalResult(NamedTuple):
    """Both retrieval directions and ``rsum = Σ recalls`` (six numbers)."""

    i2t: RankMetrics
    t2i: RankMetrics
    rsum: float

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat ``{"i2t_r1": ..., "t2i_medr": ..., "rsum": ...}`` for metric logging."""
        out = {
            f"{prefix}{d}_{k}": float(v)
            for d in ("i2t", "t2i")
            for k, v in getattr(self, d)._asdict().items()
        }
        out[f"{prefix}rsum"] = float(self.rsum)
        return out

    @classmethod
    def from_dict(cls, metrics: dict, prefix: str = "") -> RetrievalResult:
        """Inverse of :meth:`as_dict` (extra keys, e.g. ``step``, are ignored)."""
        return cls(
            *(
                RankMetrics(*(float(metrics[f"{prefix}{d}_{k}"]) for k in RankMetrics._fields))
                for d in ("i2t", "t2i")
            ),
            float(metrics[f"{prefix}rsum"]),
        )


def rank_metrics(ranks) -> RankMetrics:
    """R@1/5/10, ``medr`` and ``meanr`` of 0-based ranks."""
    ranks = np.asarray(ranks)
    recall = lambda k: 100.0 * float(np.mean(ranks < k))
    return RankMetrics(
        recall(1),
        recall(5),
        recall(10),
        float(np.floor(np.median(ranks)) + 1),
        float(ranks.mean() + 1),
    )


def _similarity(u, v, measure):
    if measure == "cosine":
        return jnp.matmul(u, v.T, precision=jax.lax.Precision.HIGHEST)
    return order_similarity(u, v)


@functools.partial(jax.jit, static_argnames=("measure", "per_image", "chunk"))
def _ranks(images, captions, *, measure, per_image, chunk):
    n, m = images.shape[0], captions.shape[0]
    n_chunks = -(-n // chunk)
    # Pad with rows that score NaN (cosine) or -inf (order) against everything: they never
    # compare >= a real score, so padded images and captions never count and the hot loop
    # needs no masks.
    pad_image, pad_caption = (jnp.nan, jnp.nan) if measure == "cosine" else (-jnp.inf, jnp.inf)
    images = jnp.pad(images, ((0, n_chunks * chunk - n), (0, 0)), constant_values=pad_image)
    captions = jnp.pad(
        captions, ((0, (n_chunks * chunk - n) * per_image), (0, 0)), constant_values=pad_caption
    )
    # Score of each caption with its own image (the threshold of its text→image query).
    gt = _PAIR_FN[measure](jnp.repeat(images, per_image, axis=0), captions)
    diag = jnp.arange(chunk)

    def body(t2i_counts, c):
        u = jax.lax.dynamic_slice_in_dim(images, c * chunk, chunk)
        s = _similarity(u, captions, measure)  # (chunk, captions)
        block = jax.lax.dynamic_slice_in_dim(s, c * chunk * per_image, chunk * per_image, 1)
        own = block.reshape(chunk, chunk, per_image)[diag, diag]  # (chunk, per_image)
        best = jnp.max(own, axis=1, keepdims=True)
        # image→text: captions scoring >= the best own caption, minus the own ones among them.
        i2t = jnp.sum(s >= best, axis=1) - jnp.sum(own >= best, axis=1)
        # text→image: images scoring >= the caption's own image, minus that image itself.
        own_gt = jax.lax.dynamic_slice_in_dim(gt, c * chunk * per_image, chunk * per_image)
        t2i_counts += jnp.sum(s >= gt[None, :], axis=0)
        self_count = (own >= own_gt.reshape(chunk, per_image)).reshape(-1).astype(jnp.int32)
        t2i_counts = jax.lax.dynamic_update_slice_in_dim(
            t2i_counts,
            jax.lax.dynamic_slice_in_dim(t2i_counts, c * chunk * per_image, chunk * per_image)
            - self_count,
            c * chunk * per_image,
            0,
        )
        return t2i_counts, i2t

    t2i, i2t = jax.lax.scan(body, jnp.zeros(captions.shape[0], jnp.int32), jnp.arange(n_chunks))
    return i2t.reshape(-1)[:n], t2i[:m]


def retrieval_ranks(
    image_emb,
    caption_emb,
    *,
    measure: str = "cosine",
    captions_per_image: int = 5,
    chunk_size: int | None = None,
):
    """0-based ranks of every image query (image→text) and every caption query (text→image).

    Args:
      image_emb: ``(N, D)`` image embeddings, one row per image.
      caption_emb: ``(captions_per_image · N, D)`` caption embeddings; caption ``m``
        belongs to image ``m // captions_per_image``.
      measure: ``"cosine"`` (inner product) or ``"order"`` similarity.
      captions_per_image: captions per image (5 for COCO and Flickr).
      chunk_size: images scored at once; by default sized to keep each chunk's score
        block near 64 MB.

    Returns:
      ``(i2t_ranks (N,), t2i_ranks (5N,))`` as numpy int arrays.
    """
    check_embedding_pair(image_emb, caption_emb, allow_different_lengths=True)
    if measure not in MEASURES:
        raise ValueError(f"`measure` must be one of {MEASURES}, got {measure!r}.")
    n, m = image_emb.shape[0], caption_emb.shape[0]
    if n == 0 or m != captions_per_image * n:
        raise ValueError(
            f"`caption_emb` must have {captions_per_image} rows per image "
            f"({captions_per_image} x {n} = {captions_per_image * n}), got {m}. Pass one row "
            "per image in `image_emb` and the captions grouped by image."
        )
    if chunk_size is None:
        per_row = m * (image_emb.shape[1] if measure == "order" else 1)
        chunk_size = int(np.clip((1 << 24) // per_row, 1, n))
        chunk_size = -(-n // -(-n // chunk_size))  # same number of chunks, least padding
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be positive, got {chunk_size}.")
    i2t, t2i = _ranks(
        jnp.asarray(image_emb, jnp.float32),
        jnp.asarray(caption_emb, jnp.float32),
        measure=measure,
        per_image=captions_per_image,
        chunk=min(chunk_size, n),
    )
    return np.asarray(i2t), np.asarray(t2i)


def evaluate(
    image_emb,
    caption_emb,
    *,
    folds: int = 1,
    measure: str = "cosine",
    captions_per_image: int = 5,
    chunk_size: int | None = None,
) -> RetrievalResult:
    """Retrieval metrics of a test set, optionally averaged over consecutive folds.

    ``folds=5`` on the COCO 5K test set gives the COCO 1K protocol (each fold: 1000 images
    and their 5000 captions; metrics averaged over folds, rsum from the averaged recalls).

    Args:
      image_emb: ``(N, D)`` image embeddings, one row per image.
      caption_emb: ``(5N, D)`` caption embeddings grouped by image.
      folds: number of consecutive equal folds; must divide ``N``.
      measure: ``"cosine"`` or ``"order"``.
      captions_per_image: captions per image.
      chunk_size: see :func:`retrieval_ranks`.

    Returns:
      :class:`RetrievalResult` ``(i2t=(r1, r5, r10, medr, meanr), t2i=(...), rsum)``.
    """
    n = np.shape(image_emb)[0]
    if not isinstance(folds, int) or folds < 1 or n % folds:
        raise ValueError(
            f"`folds` must be a positive integer dividing the {n} images, got {folds!r}."
        )
    size = n // folds
    per_fold = []
    for f in range(folds):
        i2t, t2i = retrieval_ranks(
            image_emb[f * size : (f + 1) * size],
            caption_emb[f * size * captions_per_image : (f + 1) * size * captions_per_image],
            measure=measure,
            captions_per_image=captions_per_image,
            chunk_size=chunk_size,
        )
        per_fold.append(_result(rank_metrics(i2t), rank_metrics(t2i)))
    return average(per_fold)


def _result(i2t: RankMetrics, t2i: RankMetrics) -> RetrievalResult:
    i2t, t2i = RankMetrics(*map(float, i2t)), RankMetrics(*map(float, t2i))
    return RetrievalResult(i2t, t2i, i2t.r1 + i2t.r5 + i2t.r10 + t2i.r1 + t2i.r5 + t2i.r10)


def average(results) -> RetrievalResult:
    """Mean of several results (folds, seeds), with ``rsum`` from the averaged recalls."""
    results = list(results)
    if not results:
        raise ValueError("`results` must hold at least one RetrievalResult.")
    mean = np.mean([[*r.i2t, *r.t2i] for r in results], axis=0)
    return _result(RankMetrics(*mean[:5]), RankMetrics(*mean[5:]))


def format_table(results: dict[str, RetrievalResult]) -> str:
    """A plain-text table with one row per named result (image→text, text→image, rsum)."""
    header = (
        f"{'model':<16} | {'i2t R@1':>7} {'R@5':>6} {'R@10':>6} {'medr':>5} {'meanr':>6} | "
        f"{'t2i R@1':>7} {'R@5':>6} {'R@10':>6} {'medr':>5} {'meanr':>6} | {'rsum':>6}"
    )
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        cells = []
        for d in (r.i2t, r.t2i):
            cells.append(f"{d.r1:7.1f} {d.r5:6.1f} {d.r10:6.1f} {d.medr:5.0f} {d.meanr:6.1f}")
        lines.append(f"{name:<16} | {cells[0]} | {cells[1]} | {r.rsum:6.1f}")
    return "\n".join(lines)
