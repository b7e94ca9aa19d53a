"""Image-text retrieval evaluation: R@K, median and mean rank, rsum.

The protocol of VSE++ (Faghri et al., BMVC 2018, https://arxiv.org/abs/1707.05612),
following Karpathy & Fei-Fei's splits: ``N`` images, ``5N`` captions
(:data:`CAPTIONS_PER_IMAGE`), caption ``m`` describes image ``m // 5``.

* image→text (caption retrieval): the rank of image ``i`` is the best rank among its 5
  captions, i.e. the number of *other images'* captions scoring at least as high as its
  best caption.
* text→image (image retrieval): the rank of caption ``m`` is the number of other images
  scoring at least as high as image ``m // 5``.

Ranks start at 0. ``R@K = 100 · mean(rank < K)`` for K = 1, 5, 10, ``medr = ⌊median⌋ + 1``,
``meanr = mean + 1``, and ``rsum`` is the sum of the six recalls. Ties count against the
model (a collapsed embedding where every score is equal gets R@K ≈ 0, not 100; an exact
duplicate of an image outranks it); without ties this equals ranking by ``argsort``.
COCO 1K is the mean over 5 consecutive folds of 1000 images (``folds=5`` on the 5K test
set), COCO 5K and Flickr30K 1K use ``folds=1``.

The score matrix is never materialised: images and their captions are processed in
chunks inside one compiled function, so 5K images × 25K captions runs in bounded memory.
Each query's rank is counted in the very row of scores that holds its own match (an
image's row against all captions, a caption's row against all images), so the threshold
and the scores compared with it come from one computation and exact ties stay exact.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt

from jaxeff._sharding import gather_explicit
from jaxeff.losses.similarity import MEASURES, check_embedding_pair, order_similarity

__all__ = [
    "CAPTIONS_PER_IMAGE",
    "RankMetrics",
    "RetrievalResult",
    "average",
    "evaluate",
    "format_table",
    "rank_metrics",
    "retrieval_ranks",
]

# Captions per image in the COCO and Flickr30K protocols: caption ``m`` describes image
# ``m // CAPTIONS_PER_IMAGE``. The one definition the data pipelines import.
CAPTIONS_PER_IMAGE = 5
# Default score block size (elements; 64 MB of float32) that sets the chunk size.
_BLOCK_ELEMENTS = 1 << 24


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
    def from_dict(cls, metrics: Mapping[str, float], prefix: str = "") -> RetrievalResult:
        """Inverse of :meth:`as_dict` (extra keys, e.g. ``step``, are ignored)."""
        i2t, t2i = (
            RankMetrics(*(float(metrics[f"{prefix}{d}_{k}"]) for k in RankMetrics._fields))
            for d in ("i2t", "t2i")
        )
        return cls(i2t, t2i, float(metrics[f"{prefix}rsum"]))


def rank_metrics(ranks: npt.ArrayLike) -> RankMetrics:
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


def _pad(images, captions, *, measure, per_image, chunk):
    """Pads to whole chunks with rows that never score ``>=`` a real score.

    Padding scores NaN (cosine) or -inf (order) against everything, so padded images and
    captions never count in a rank and the loop needs no masks.
    """
    extra = -images.shape[0] % chunk
    pad_image, pad_caption = (jnp.nan, jnp.nan) if measure == "cosine" else (-jnp.inf, jnp.inf)
    images = jnp.pad(images, ((0, extra), (0, 0)), constant_values=pad_image)
    captions = jnp.pad(captions, ((0, extra * per_image), (0, 0)), constant_values=pad_caption)
    return images, captions


def _own_scores(block, *, per_image, chunk):
    """``(chunk, per_image)`` scores of a chunk's images with their own captions.

    ``block`` is the ``(chunk, chunk · per_image)`` part of a score array that pairs the
    chunk's images with the chunk's captions; the result is read out of it, not recomputed.
    """
    diag = jnp.arange(chunk)
    return block.reshape(chunk, chunk, per_image)[diag, diag]


def _image_query_ranks(images, captions, c, *, measure, per_image, chunk):
    """image→text ranks of chunk ``c``'s images: other captions scoring >= the best own one."""
    u = jax.lax.dynamic_slice_in_dim(images, c * chunk, chunk)
    s = _similarity(u, captions, measure)  # row k: image k against every caption
    block = jax.lax.dynamic_slice_in_dim(s, c * chunk * per_image, chunk * per_image, 1)
    own = _own_scores(block, per_image=per_image, chunk=chunk)
    best = jnp.max(own, axis=1, keepdims=True)
    return jnp.sum(s >= best, axis=1) - jnp.sum(own >= best, axis=1)


def _caption_query_ranks(images, captions, c, *, measure, per_image, chunk):
    """text→image ranks of chunk ``c``'s captions: other images scoring >= the own one."""
    v = jax.lax.dynamic_slice_in_dim(captions, c * chunk * per_image, chunk * per_image)
    s = _similarity(images, v, measure).T  # row r: caption r against every image
    block = jax.lax.dynamic_slice_in_dim(s, c * chunk, chunk, 1).T
    own = _own_scores(block, per_image=per_image, chunk=chunk).reshape(-1, 1)
    return jnp.sum(s >= own, axis=1) - 1  # the own image ties with itself


@functools.partial(jax.jit, static_argnames=("measure", "per_image", "chunk"))
def _rank_loop(images, captions, *, measure, per_image, chunk):
    n, m = images.shape[0], captions.shape[0]
    kwargs = dict(measure=measure, per_image=per_image, chunk=chunk)
    images, captions = _pad(images, captions, **kwargs)

    chunks = jnp.arange(images.shape[0] // chunk)
    i2t = jax.lax.map(functools.partial(_image_query_ranks, images, captions, **kwargs), chunks)
    t2i = jax.lax.map(functools.partial(_caption_query_ranks, images, captions, **kwargs), chunks)
    return i2t.reshape(-1)[:n], t2i.reshape(-1)[:m]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _checked_embeddings(image_emb, caption_emb, captions_per_image):
    """The embeddings as float32 arrays, after the checks that make a rank meaningful."""
    check_embedding_pair(
        image_emb, caption_emb, allow_different_lengths=True, names=("image_emb", "caption_emb")
    )
    if not _is_int(captions_per_image) or captions_per_image < 1:
        raise ValueError(
            f"`captions_per_image` must be a positive integer, got {captions_per_image!r}."
        )
    n, m = image_emb.shape[0], caption_emb.shape[0]
    if n == 0:
        raise ValueError("`image_emb` must hold at least one image, got 0 rows.")
    if m != captions_per_image * n:
        raise ValueError(
            f"`caption_emb` must have exactly {captions_per_image} rows per image "
            f"({captions_per_image} x {n} = {captions_per_image * n}), got {m}. Pass one row "
            "per image in `image_emb` and the captions grouped by image."
        )
    with np.errstate(over="ignore"):  # values beyond float32 become inf, refused below
        images = gather_explicit(jnp.asarray(image_emb, jnp.float32))
        captions = gather_explicit(jnp.asarray(caption_emb, jnp.float32))
    for name, x in (("image_emb", images), ("caption_emb", captions)):
        bad = np.flatnonzero(~np.asarray(jnp.all(jnp.isfinite(x), axis=1)))
        if bad.size:
            raise ValueError(
                f"`{name}` must be finite, but row {bad[0]} holds NaN or inf in float32 "
                f"({bad.size} of {x.shape[0]} rows do); NaN scores would rank as a perfect "
                "model."
            )
    return images, captions


def _ranks(images, captions, *, measure, captions_per_image, chunk_size):
    """:func:`retrieval_ranks` of embeddings that passed :func:`_checked_embeddings`."""
    if measure not in MEASURES:
        raise ValueError(f"`measure` must be one of {MEASURES}, got {measure!r}.")
    n, m = images.shape[0], captions.shape[0]
    if chunk_size is None:
        per_row = m * (images.shape[1] if measure == "order" else 1)
        chunk_size = int(np.clip(_BLOCK_ELEMENTS // per_row, 1, n))
        chunk_size = -(-n // -(-n // chunk_size))  # same number of chunks, least padding
    if not _is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size!r}.")
    i2t, t2i = _rank_loop(
        images,
        captions,
        measure=measure,
        per_image=captions_per_image,
        chunk=min(chunk_size, n),
    )
    return np.asarray(i2t), np.asarray(t2i)


def retrieval_ranks(
    image_emb: jax.Array | np.ndarray,
    caption_emb: jax.Array | np.ndarray,
    *,
    measure: str = "cosine",
    captions_per_image: int = CAPTIONS_PER_IMAGE,
    chunk_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks of every image query (image→text) and every caption query (text→image).

    Each query is scored against every item in chunks; its rank is the number of other
    items scoring at least as high as its own match, read out of the same scores:

    .. math::

      r^{i2t}_i = \\#\\{m \\notin C_i : S_{im} \\ge \\max_{m' \\in C_i} S_{im'}\\},\\quad
      r^{t2i}_m = \\#\\{j \\ne i(m) : S_{jm} \\ge S_{i(m)\\,m}\\}

    with ``C_i`` the captions of image ``i`` and ``i(m) = m // captions_per_image``.

    Args:
      image_emb: ``(N, D)`` image embeddings, one row per image. Must be finite.
      caption_emb: ``(captions_per_image · N, D)`` caption embeddings, exactly
        ``captions_per_image`` rows per image; caption ``m`` belongs to image
        ``m // captions_per_image``. Must be finite.
      measure: ``"cosine"`` (inner product) or ``"order"`` similarity.
      captions_per_image: captions per image (:data:`CAPTIONS_PER_IMAGE` for COCO and
        Flickr).
      chunk_size: images (with their captions) scored at once; by default sized to keep
        each chunk's score block near 64 MB.

    Returns:
      ``(i2t_ranks (N,), t2i_ranks (captions_per_image · N,))`` as numpy int arrays.

    Raises:
      ValueError: naming ``image_emb`` or ``caption_emb`` (and the first bad row) when an
        embedding holds NaN or inf, or when the caption count is not exactly
        ``captions_per_image`` times the image count.

    Example:
      >>> import numpy as np
      >>> from jaxeff import retrieval
      >>> images = np.eye(3, dtype=np.float32)
      >>> i2t, t2i = retrieval.retrieval_ranks(images, np.repeat(images, 5, axis=0))
      >>> i2t.tolist()
      [0, 0, 0]
    """
    images, captions = _checked_embeddings(image_emb, caption_emb, captions_per_image)
    return _ranks(
        images,
        captions,
        measure=measure,
        captions_per_image=captions_per_image,
        chunk_size=chunk_size,
    )


def evaluate(
    image_emb: jax.Array | np.ndarray,
    caption_emb: jax.Array | np.ndarray,
    *,
    folds: int = 1,
    measure: str = "cosine",
    captions_per_image: int = CAPTIONS_PER_IMAGE,
    chunk_size: int | None = None,
) -> RetrievalResult:
    """Retrieval metrics of a test set, optionally averaged over consecutive folds.

    ``folds=5`` on the COCO 5K test set gives the COCO 1K protocol (each fold: 1000 images
    and their 5000 captions; metrics averaged over folds, rsum from the averaged recalls).

    Args:
      image_emb: ``(N, D)`` image embeddings, one row per image. Must be finite.
      caption_emb: ``(captions_per_image · N, D)`` caption embeddings grouped by image,
        exactly ``captions_per_image`` rows per image (checked on the whole set, before
        the folds are split). Must be finite.
      folds: number of consecutive equal folds; must divide ``N``.
      measure: ``"cosine"`` or ``"order"``.
      captions_per_image: captions per image (:data:`CAPTIONS_PER_IMAGE`).
      chunk_size: see :func:`retrieval_ranks`.

    Returns:
      :class:`RetrievalResult` ``(i2t=(r1, r5, r10, medr, meanr), t2i=(...), rsum)``.

    Raises:
      ValueError: as :func:`retrieval_ranks` (row indices count from the start of the
        whole set), or when ``folds`` does not divide ``N``.

    Example:
      >>> import numpy as np
      >>> from jaxeff import retrieval
      >>> images = np.eye(4, dtype=np.float32)
      >>> retrieval.evaluate(images, np.repeat(images, 5, axis=0), folds=2).rsum
      600.0
    """
    images, captions = _checked_embeddings(image_emb, caption_emb, captions_per_image)
    n = images.shape[0]
    if not _is_int(folds) or folds < 1 or n % folds:
        raise ValueError(
            f"`folds` must be a positive integer dividing the {n} images, got {folds!r}."
        )
    size, per_fold = n // folds, []
    for f in range(folds):
        i2t, t2i = _ranks(
            images[f * size : (f + 1) * size],
            captions[f * size * captions_per_image : (f + 1) * size * captions_per_image],
            measure=measure,
            captions_per_image=captions_per_image,
            chunk_size=chunk_size,
        )
        per_fold.append(_result(rank_metrics(i2t), rank_metrics(t2i)))
    return average(per_fold)


def _result(i2t: RankMetrics, t2i: RankMetrics) -> RetrievalResult:
    i2t, t2i = RankMetrics(*map(float, i2t)), RankMetrics(*map(float, t2i))
    return RetrievalResult(i2t, t2i, i2t.r1 + i2t.r5 + i2t.r10 + t2i.r1 + t2i.r5 + t2i.r10)


def average(results: Iterable[RetrievalResult]) -> RetrievalResult:
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
