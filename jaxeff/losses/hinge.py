"""Hinge-based triplet losses over the in-batch similarity matrix (VSE0 and VSE++).

Faghri, Fleet, Kiros, Fidler, "VSE++: Improving Visual-Semantic Embeddings with Hard
Negatives", BMVC 2018, https://arxiv.org/abs/1707.05612.

For a batch of ``B`` matched pairs with similarity matrix ``S`` (image ``k`` vs caption
``j``, matching pairs on the diagonal) and margin ``α``:

* caption retrieval (image ``k`` is the query, captions ``j ≠ k`` are negatives):
  ``c_s[k, j] = max(0, α + S[k, j] - S[k, k])``
* image retrieval (caption ``k`` is the query, images ``j ≠ k`` are negatives):
  ``c_im[k, j] = max(0, α + S[j, k] - S[k, k])``

The sum of hinges (SH, VSE0) adds every cost; the max of hinges (MH, VSE++) keeps, for
each query, only its hardest negative. Both directions are added.

Negatives are taken over the whole (global) batch, also when it is sharded over devices;
``negatives="local"`` takes them among the examples on the query's own device only, so
no device ever holds the ``B × B`` similarity matrix (see :func:`hinge_loss`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from jaxeff._sharding import gather_explicit
from jaxeff.losses.similarity import check_embedding_pair, similarity_matrix

REDUCTIONS = ("sum", "mean")
NEGATIVES = ("global", "local")
# Similarity spread below which a batch counts as collapsed. Healthy VSE models sit at
# 0.1-0.4 (cosine); MH trained from scratch on the generated data fell to 1e-3 within 650
# steps and kept falling, its loss pinned at 2·B·α.
COLLAPSE_SPREAD = 1e-3


def positives_from_ids(image_ids: jax.Array) -> jax.Array:
    """Positive-pair mask from the image id of each pair in a batch.

    Two captions of the same image in one batch are not each other's negatives:
    ``positives[k, j] = image_ids[k] == image_ids[j]``.

    Args:
      image_ids: ``(B,)`` integer ids of the image each pair comes from.

    Returns:
      ``(B, B)`` boolean mask, true on the diagonal and for every other matching pair.
    """
    if jnp.ndim(image_ids) != 1:
        raise ValueError(f"`image_ids` must be 1-D, got shape {jnp.shape(image_ids)}.")
    # Rows keep the ids' sharding; every column needs all ids (explicit mesh axes).
    return image_ids[:, None] == gather_explicit(image_ids)[None, :]


def _check_scores(scores, positives):
    if jnp.ndim(scores) != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"`scores` must be a square (B, B) matrix, got shape {jnp.shape(scores)}.")
    _check_positives(positives, scores.shape[0])


def _check_positives(positives, batch: int):
    if positives is not None:
        if jnp.shape(positives) != (batch, batch):
            raise ValueError(
                f"`positives` must have shape {(batch, batch)} (one entry per image-caption "
                f"pair in the batch), got {jnp.shape(positives)}."
            )
        if jnp.result_type(positives) != jnp.bool_:
            raise ValueError(
                f"`positives` must be boolean, got dtype {jnp.result_type(positives)}."
            )


def _concrete_scalar(x, name):
    """``x`` as a Python float when its value is known, ``None`` when it is traced.

    Python and numpy numbers and concrete (non-traced) JAX arrays have a value that can be
    checked; a tracer (inside ``jit``, ``grad`` or ``vmap``) does not. Either way it must be
    a scalar: its shape is known even when traced.
    """
    if np.ndim(x) != 0:
        raise ValueError(f"`{name}` must be a scalar, got shape {np.shape(x)}.")
    if isinstance(x, jax.core.Tracer):
        return None
    if np.asarray(x).dtype.kind not in "biuf":
        raise ValueError(f"`{name}` must be a real number, got {x!r}.")
    return float(x)


def _check_margin(margin):
    value = _concrete_scalar(margin, "margin")
    if value is not None and not 0 <= value < math.inf:
        raise ValueError(f"`margin` must be finite and non-negative, got {value}.")


def _hard_negative_weight(max_violation, top_k):
    """The weight ``w`` of the MH term: a Python float when known, else the traced value."""
    if top_k is not None and (not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool)):
        raise ValueError(f"`top_k` must be a positive integer, got {top_k!r}.")
    w = _concrete_scalar(max_violation, "max_violation")
    if w is not None and not 0 <= w <= 1:
        raise ValueError(
            f"`max_violation` must be a bool or a weight in [0, 1], got {max_violation!r}."
        )
    if top_k is not None and w == 0:
        raise ValueError(
            "`top_k` selects hard negatives; it needs a non-zero `max_violation`, got "
            f"{max_violation!r}."
        )
    return max_violation if w is None else w


def hinge_costs(
    scores: jax.Array, *, margin: float = 0.2, positives: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Hinge costs of every negative, both retrieval directions, query-major.

    Args:
      scores: ``(B, B)`` similarity matrix, ``scores[k, j] = s(image_k, caption_j)``.
      margin: the margin ``α >= 0``, a scalar (checked unless traced).
      positives: optional ``(B, B)`` boolean mask of extra matching pairs to exclude
        (see :func:`positives_from_ids`); the diagonal is always excluded.

    Returns:
      ``(cost_s, cost_im)``, each ``(B, B)``: ``cost_s[k, j]`` is the cost of caption ``j``
      for image query ``k``; ``cost_im[k, j]`` the cost of image ``j`` for caption query
      ``k``. Excluded entries are zero.
    """
    _check_scores(scores, positives)
    _check_margin(margin)
    # Every query needs every negative: the whole (B, B) matrix on each device.
    scores = gather_explicit(scores)
    diagonal = jnp.diagonal(scores)
    cost_s = jax.nn.relu(margin + scores - diagonal[:, None])
    cost_im = jax.nn.relu(margin + scores.T - diagonal[:, None])
    excluded = jnp.eye(scores.shape[0], dtype=bool)
    if positives is not None:
        excluded = excluded | gather_explicit(positives)
    return jnp.where(excluded, 0.0, cost_s), jnp.where(excluded.T, 0.0, cost_im)


def sum_of_hinges(costs: jax.Array) -> jax.Array:
    """SH: each query's total cost over all its negatives, ``Σ_j c[k, j]`` → ``(B,)``."""
    return jnp.sum(costs, axis=1)


def max_of_hinges(costs: jax.Array, *, top_k: int = 1) -> jax.Array:
    """MH: each query's cost on its ``top_k`` hardest negatives → ``(B,)``.

    ``top_k = 1`` is VSE++ (``max_j c[k, j]``); larger ``k`` sums the ``k`` largest costs.
    ``k`` is clipped to the ``B - 1`` negatives a query has; with ``B = 1`` the cost is 0.
    """
    if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"`top_k` must be a positive integer, got {top_k!r}.")
    k = min(int(top_k), costs.shape[1] - 1)
    if k == 0:
        return jnp.zeros(costs.shape[:1], costs.dtype)
    if k == 1:
        return jnp.max(costs, axis=1)
    return jnp.sum(jax.lax.top_k(costs, k)[0], axis=1)


def hinge_loss(
    scores: jax.Array,
    *,
    margin: float = 0.2,
    max_violation: bool | float | jax.Array = False,
    top_k: int | None = None,
    reduction: str = "sum",
    positives: jax.Array | None = None,
    negatives: str = "global",
    mesh: Mesh | AbstractMesh | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    """Contrastive hinge loss (SH or MH) from an in-batch similarity matrix.

    .. math::

      L = \\sum_k \\big[(1-w)\\,\\mathrm{SH}_k + w\\,\\mathrm{MH}_k\\big],\\quad
      \\mathrm{SH}_k = \\sum_{j \\ne k} c_s[k, j] + c_{im}[k, j],\\quad
      \\mathrm{MH}_k = \\max_{j \\ne k} c_s[k, j] + \\max_{j \\ne k} c_{im}[k, j]

    with ``w = max_violation`` (``False``/``True`` or a weight in ``[0, 1]``, e.g. from
    :func:`jaxeff.losses.hard_negative_schedule`, for a warm-up from SH to MH).

    Args:
      scores: ``(B, B)`` similarity matrix with matching pairs on the diagonal.
      margin: the margin ``α >= 0`` (0.2 in VSE++; order embeddings used 0.05), a scalar.
      max_violation: ``False`` for SH (VSE0), ``True`` for MH (VSE++), or a scalar weight
        ``w`` in ``[0, 1]`` (may be a traced array, so a schedule never recompiles). A
        known weight of exactly 0 or 1 computes only SH or only MH.
      top_k: with the MH term, sum the ``top_k`` hardest negatives per query instead of
        the single hardest (default 1). A positive integer, only valid when
        ``max_violation`` is not ``False`` (nor a known weight of 0).
      reduction: ``"sum"`` over the batch (the reference's choice; scale grows with B) or
        ``"mean"`` over the ``B`` queries (the sum divided by ``B``).
      positives: optional ``(B, B)`` boolean mask of extra matching pairs that are not
        negatives of each other (e.g. two captions of one image).
      negatives: ``"global"``: each query's negatives are all other examples of the batch,
        wherever they are sharded (the definition above). ``"local"``: with the batch
        sharded over ``D`` devices along ``axis_name`` of ``mesh`` (``b = B / D`` rows
        each), only the examples on the query's own device: the loss is the sum over
        devices of the global-negative loss of each device's ``b × b`` diagonal block of
        ``scores`` (mean: divided by ``B``). Each device then touches ``b × b`` costs
        only, for batches whose ``B × B`` costs do not fit; the hardest negatives are
        those of a ``b``-example batch. Equal to ``"global"`` on one device.
      mesh: with ``negatives="local"``, the mesh the batch is sharded over; default the
        mesh set by ``jax.set_mesh``, else that of an input sharded over explicit axes.
      axis_name: with ``negatives="local"``, the mesh axis of the batch; default the
        mesh's first axis.

    Returns:
      Scalar loss.

    Raises:
      ValueError: naming the argument when ``margin`` or ``max_violation`` is not a
        scalar, or when a known value is out of range: Python and numpy numbers and
        concrete JAX arrays are checked. A *traced* value (an argument of a jitted,
        differentiated or vmapped function, e.g. the schedule's weight inside the train
        step) has no value to check: the caller is responsible for keeping it in range,
        and a weight outside ``[0, 1]`` or a negative margin gives a meaningless loss
        (it can be negative). Likewise ``top_k`` with a traced weight of 0 is ignored.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxeff.losses import hinge_loss
      >>> scores = jnp.array([[0.9, 0.5], [0.8, 0.6]])
      >>> print(f"{float(hinge_loss(scores, margin=0.2, max_violation=True)):.2f}")
      0.60
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}.")
    if negatives not in NEGATIVES:
        raise ValueError(f"`negatives` must be one of {NEGATIVES}, got {negatives!r}.")
    if negatives == "local":
        _check_scores(scores, positives)
        kwargs: dict[str, Any] = dict(margin=margin, max_violation=max_violation, top_k=top_k)

        def block_loss(rows, positive_rows, block):
            """Sum-reduced loss of this device's diagonal block of ``scores``."""
            take = lambda x: jax.lax.dynamic_slice_in_dim(x, block * x.shape[0], x.shape[0], 1)
            mask = None if positive_rows is None else take(positive_rows)
            return hinge_loss(take(rows), positives=mask, **kwargs)

        total = _sum_over_devices(block_loss, (scores, positives), mesh, axis_name)
        return total if reduction == "sum" else total / scores.shape[0]
    w = _hard_negative_weight(max_violation, top_k)
    cost_s, cost_im = hinge_costs(scores, margin=margin, positives=positives)

    def per_query(reduce):
        return reduce(cost_s) + reduce(cost_im)

    hard = lambda c: max_of_hinges(c, top_k=1 if top_k is None else top_k)
    if isinstance(w, float) and w in (0.0, 1.0):
        losses = per_query(hard if w else sum_of_hinges)
    else:
        w = jnp.asarray(w, scores.dtype)
        losses = (1 - w) * per_query(sum_of_hinges) + w * per_query(hard)
    total = jnp.sum(losses)
    return total if reduction == "sum" else total / scores.shape[0]


def vse_hinge_loss(
    images: jax.Array,
    captions: jax.Array,
    *,
    margin: float = 0.2,
    measure: str = "cosine",
    max_violation: bool | float | jax.Array = False,
    top_k: int | None = None,
    reduction: str = "sum",
    positives: jax.Array | None = None,
    negatives: str = "global",
    mesh: Mesh | AbstractMesh | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    """VSE0 / VSE++ contrastive loss of a batch of matched image-caption embeddings.

    Computes ``S = similarity_matrix(images, captions, measure=measure)`` and returns
    :func:`hinge_loss` of it: the sum of hinges (``max_violation=False``, VSE0) or the max
    of hinges, i.e. the hardest negative per query in both retrieval directions
    (``max_violation=True``, VSE++, Faghri et al. 2018, arXiv 1707.05612, Eq. 5).

    Pure and shape-static: it jits, differentiates and vmaps. Inside a jit over a batch
    sharded across devices the negatives are taken over the global batch; with
    ``negatives="local"`` over each device's own examples, computed per device
    (``jax.shard_map``) so that no device forms the ``B × B`` similarity matrix.

    Args:
      images: ``(B, D)`` image embeddings ``u_k`` (row ``k`` matches caption ``k``).
      captions: ``(B, D)`` caption embeddings ``v_k``.
      margin: hinge margin ``α >= 0``.
      measure: ``"cosine"`` or ``"order"`` similarity.
      max_violation: ``False`` (SH), ``True`` (MH) or a weight in ``[0, 1]`` mixing them.
      top_k: number of hardest negatives per query for the MH term (default 1).
      reduction: ``"sum"`` (reference) or ``"mean"`` over queries.
      positives: optional ``(B, B)`` boolean mask of extra matching pairs.
      negatives: ``"global"`` (every other example of the batch) or ``"local"`` (the
        examples on the query's device: the sum over devices of each shard's loss), as in
        :func:`hinge_loss`.
      mesh: with ``negatives="local"``, the mesh the batch is sharded over (default: the
        ``jax.set_mesh`` mesh, else the inputs' explicit mesh).
      axis_name: with ``negatives="local"``, the batch's mesh axis (default: the first).

    Returns:
      Scalar loss. ``B = 1`` has no negatives and gives 0.

    Raises:
      ValueError: naming the argument for bad embeddings or options, as
        :func:`hinge_loss`. Traced ``margin`` and ``max_violation`` values cannot be
        checked; keeping them in range is the caller's responsibility.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxeff.losses import vse_hinge_loss
      >>> u = jax.random.normal(jax.random.key(0), (8, 16))
      >>> u = u / jnp.linalg.norm(u, axis=1, keepdims=True)
      >>> loss = vse_hinge_loss(u, u[::-1], max_violation=True)
    """
    check_embedding_pair(images, captions)
    kwargs: dict[str, Any] = dict(margin=margin, max_violation=max_violation, top_k=top_k)
    if negatives not in NEGATIVES:
        raise ValueError(f"`negatives` must be one of {NEGATIVES}, got {negatives!r}.")
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}.")
    if negatives == "local":
        b = images.shape[0]
        _check_positives(positives, b)

        def shard_loss(u, v, positive_rows, block):
            """Sum-reduced loss of this device's pairs, negatives among them only."""
            mask = None
            if positive_rows is not None:
                mask = jax.lax.dynamic_slice_in_dim(
                    positive_rows, block * u.shape[0], u.shape[0], 1
                )
            scores = similarity_matrix(u, v, measure=measure)
            return hinge_loss(scores, positives=mask, **kwargs)

        total = _sum_over_devices(shard_loss, (images, captions, positives), mesh, axis_name)
        return total if reduction == "sum" else total / b
    scores = similarity_matrix(images, captions, measure=measure)
    return hinge_loss(scores, reduction=reduction, positives=positives, **kwargs)


def _local_mesh(mesh, axis_name, arrays):
    """The mesh and axis a batch is sharded over, for ``negatives="local"``."""
    if mesh is None:
        context = jax.sharding.get_abstract_mesh()
        mesh = None if context.empty else context
    if mesh is None:
        for x in arrays:
            spec = jax.typeof(x).sharding.spec if x is not None else ()
            if spec and spec[0] is not None:
                mesh = jax.typeof(x).sharding.mesh
                break
    if mesh is None:
        raise ValueError(
            "`negatives='local'` needs the mesh the batch is sharded over: pass `mesh`, or "
            "call it under `jax.set_mesh(mesh)`."
        )
    axis_name = mesh.axis_names[0] if axis_name is None else axis_name
    if axis_name not in mesh.axis_names:
        raise ValueError(f"`axis_name` {axis_name!r} is not an axis of the mesh {mesh.axis_names}.")
    return mesh, axis_name


def _split_rows(x, mesh, axis_name):
    """``x`` with its rows split over ``axis_name``, as ``shard_map`` expects on explicit axes
    (on auto axes ``shard_map`` moves the data itself)."""
    if jax.typeof(x).sharding.spec[:1] == (axis_name,) or all(
        t != AxisType.Explicit for t in mesh.axis_types
    ):
        return x
    if isinstance(mesh, Mesh):
        return jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec(axis_name)))
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.sharding.reshard(x, PartitionSpec(axis_name))


def _sum_over_devices(per_device_loss, arrays, mesh, axis_name):
    """``Σ_devices per_device_loss(*local rows, device index)`` with ``jax.shard_map``.

    Every array of ``arrays`` (``None`` allowed) is split along its leading (batch) axis
    over ``axis_name``; the result is a replicated scalar.
    """
    mesh, axis_name = _local_mesh(mesh, axis_name, arrays)
    devices = mesh.shape[axis_name]
    batch = arrays[0].shape[0]
    if batch % devices:
        raise ValueError(
            f"`negatives='local'` splits the batch of {batch} over the {devices} devices of "
            f"mesh axis {axis_name!r}; {batch} is not divisible by {devices}."
        )
    present = [_split_rows(x, mesh, axis_name) for x in arrays if x is not None]

    def body(*local):
        it = iter(local)
        rows = [None if x is None else next(it) for x in arrays]
        loss = per_device_loss(*rows, jax.lax.axis_index(axis_name))
        return jax.lax.psum(loss, axis_name)

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=tuple(PartitionSpec(axis_name) for _ in present),
        out_specs=PartitionSpec(),
    )(*present)


def similarity_spread(scores: jax.Array) -> jax.Array:
    """Standard deviation of the similarity matrix, a collapse indicator.

    VSE++'s known failure mode (small batches, MH from scratch): all embeddings collapse
    to one point, every similarity is equal, and the MH loss sits at exactly ``2·B·α``
    (sum reduction). A spread near 0 detects it; see :func:`is_collapsed`.
    """
    return jnp.std(scores)


def is_collapsed(scores: jax.Array, *, tol: float = COLLAPSE_SPREAD) -> jax.Array:
    """Whether the embeddings have collapsed: all similarities equal within ``tol``."""
    return similarity_spread(scores) < tol
