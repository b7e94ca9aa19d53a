"""Similarity measures between image and caption embeddings.

Both return the in-batch similarity matrix ``S[k, j] = s(u_k, v_j)`` between image
``k`` and caption ``j``, the input of the hinge losses in :mod:`jaxeff.losses.hinge`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxeff._sharding import gather_explicit

MEASURES = ("cosine", "order")


def check_embedding_pair(
    images,
    captions,
    *,
    allow_different_lengths: bool = False,
    names: tuple[str, str] = ("images", "captions"),
):
    """Validates a pair of embedding matrices at a public boundary.

    Args:
        images: the image embeddings to check.
        captions: the caption embeddings to check.
        allow_different_lengths: accept a different number of rows in each.
        names: the caller's names of the two arguments, used in the error messages.

    Raises:
        ValueError: naming the argument when either is not a 2-D floating array, when
            their embedding sizes differ, or (unless allowed) their lengths.
    """
    for name, x in zip(names, (images, captions), strict=True):
        if jnp.ndim(x) != 2:
            raise ValueError(
                f"`{name}` must be a 2-D (batch, dim) array, got shape {jnp.shape(x)}."
            )
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise ValueError(f"`{name}` must be a floating array, got dtype {jnp.result_type(x)}.")
    first, second = names
    if images.shape[1] != captions.shape[1]:
        raise ValueError(
            f"`{first}` and `{second}` must have the same embedding size, got "
            f"{images.shape[1]} and {captions.shape[1]}."
        )
    if not allow_different_lengths and images.shape[0] != captions.shape[0]:
        raise ValueError(
            f"`{first}` and `{second}` must hold the same number of matched pairs, got "
            f"{images.shape[0]} and {captions.shape[0]} rows."
        )


def cosine_similarity(images: jax.Array, captions: jax.Array) -> jax.Array:
    """Inner-product similarity ``S[k, j] = u_k · v_j``.

    This is the cosine similarity when the embeddings are L2-normalised, which the VSE
    models do (the VSE0 baseline keeps unnormalised image embeddings and so uses the plain
    inner product, exactly as the reference code).

    Args:
        images: ``(N, D)`` image embeddings ``u``.
        captions: ``(M, D)`` caption embeddings ``v``.

    Returns:
        ``(N, M)`` similarity matrix.
    """
    check_embedding_pair(images, captions, allow_different_lengths=True)
    return images @ captions.T


def _safe_norm(x, axis):
    """L2 norm whose gradient is 0 (not NaN) at the origin."""
    sq = jnp.sum(jnp.square(x), axis=axis)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def order_similarity(images: jax.Array, captions: jax.Array) -> jax.Array:
    """Order-embedding similarity ``S[k, j] = -|| max(0, v_j - u_k) ||_2``.

    From Vendrov et al., "Order-Embeddings of Images and Language" (ICLR 2016), as used by
    the Order0/Order++ rows of VSE++ (Faghri et al. 2018, arXiv 1707.05612). A caption is
    more similar to an image the less it exceeds the image coordinate-wise (the
    embeddings are non-negative, the model applies ``abs``). The gradient is defined
    (zero) where the violation is exactly zero.

    Args:
        images: ``(N, D)`` image embeddings ``u``.
        captions: ``(M, D)`` caption embeddings ``v``.

    Returns:
        ``(N, M)`` similarity matrix (non-positive).
    """
    check_embedding_pair(images, captions, allow_different_lengths=True)
    violation = jnp.maximum(0.0, captions[None, :, :] - images[:, None, :])
    return -_safe_norm(violation, axis=-1)


def similarity_matrix(
    images: jax.Array, captions: jax.Array, *, measure: str = "cosine"
) -> jax.Array:
    """Similarity matrix ``S[k, j]`` between image ``k`` and caption ``j``.

    Args:
        images: ``(N, D)`` image embeddings.
        captions: ``(M, D)`` caption embeddings.
        measure: ``"cosine"`` (inner product of normalised embeddings) or ``"order"``.

    Returns:
        ``(N, M)`` similarity matrix. With inputs sharded over an explicit mesh axis (the
        default of ``jax.make_mesh``), the captions are gathered and the rows keep the
        images' sharding.
    """
    captions = gather_explicit(captions)
    if measure == "cosine":
        return cosine_similarity(images, captions)
    if measure == "order":
        return order_similarity(images, captions)
    raise ValueError(f"`measure` must be one of {MEASURES}, got {measure!r}.")
