"""Hinge losses against a loop-based numpy reference of the VSE++ formulas."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jaxeff import losses


def reference_loss(im, s, *, margin, measure, max_violation, top_k=1, positives=None):
    """Per-query Python loops over the VSE++ cost definitions (sum reduction)."""
    b = im.shape[0]
    S = np.zeros((b, b))
    for k in range(b):
        for j in range(b):
            if measure == "cosine":
                S[k, j] = float(np.dot(im[k], s[j]))
            else:
                S[k, j] = -float(np.sqrt(np.sum(np.maximum(0.0, s[j] - im[k]) ** 2)))
    pos = np.eye(b, dtype=bool) if positives is None else (positives | np.eye(b, dtype=bool))
    total = 0.0
    for k in range(b):
        caption_costs = [max(0.0, margin + S[k, j] - S[k, k]) for j in range(b) if not pos[k, j]]
        image_costs = [max(0.0, margin + S[j, k] - S[k, k]) for j in range(b) if not pos[j, k]]
        for costs in (caption_costs, image_costs):
            if not costs:
                continue
            if max_violation:
                total += sum(sorted(costs, reverse=True)[:top_k])
            else:
                total += sum(costs)
    return total


def unit(key, shape):
    x = jax.random.normal(key, shape)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("measure", ["cosine", "order"])
@pytest.mark.parametrize("max_violation", [False, True])
@pytest.mark.parametrize("b", [1, 2, 7])
def test_matches_loop_reference(measure, max_violation, b):
    k1, k2 = jax.random.split(jax.random.key(b))
    im, s = unit(k1, (b, 5)), unit(k2, (b, 5))
    if measure == "order":
        im, s = jnp.abs(im), jnp.abs(s)
    margin = 0.2 if measure == "cosine" else 0.05
    got = losses.vse_hinge_loss(im, s, margin=margin, measure=measure, max_violation=max_violation)
    want = reference_loss(
        np.asarray(im, np.float64),
        np.asarray(s, np.float64),
        margin=margin,
        measure=measure,
        max_violation=max_violation,
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if b == 1:
        assert float(got) == 0.0


@pytest.mark.parametrize("top_k", [1, 2, 3, 10])
def test_top_k_matches_reference(top_k):
    im, s = unit(jax.random.key(1), (6, 4)), unit(jax.random.key(2), (6, 4))
    got = losses.vse_hinge_loss(im, s, margin=0.5, max_violation=True, top_k=top_k)
    want = reference_loss(
        np.asarray(im), np.asarray(s), margin=0.5, measure="cosine", max_violation=True, top_k=top_k
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("max_violation", [False, True])
def test_positives_mask_matches_reference(max_violation):
    ids = jnp.array([0, 1, 0, 2, 1, 3])
    im, s = unit(jax.random.key(3), (6, 4)), unit(jax.random.key(4), (6, 4))
    # Pairs sharing an image share its embedding and have near-identical captions, so the
    # other caption of the same image would be the hardest "negative" without the mask.
    s = s.at[2].set(s[0] + 0.01).at[4].set(s[1] - 0.01)
    im = s[jnp.array([0, 1, 0, 3, 1, 5])]
    pos = losses.positives_from_ids(ids)
    got = losses.vse_hinge_loss(im, s, margin=0.2, max_violation=max_violation, positives=pos)
    want = reference_loss(
        np.asarray(im),
        np.asarray(s),
        margin=0.2,
        measure="cosine",
        max_violation=max_violation,
        positives=np.asarray(pos),
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)
    unmasked = losses.vse_hinge_loss(im, s, margin=0.2, max_violation=max_violation)
    assert float(unmasked) > float(got)


def test_directions_are_not_swapped():
    # Image 0 has a hard negative caption (caption 1 very close to image 0); caption 0 has
    # no hard negative image. Only the caption-retrieval cost of query 0 is non-zero.
    scores = jnp.array([[0.5, 0.6], [0.0, 0.9]])
    cost_s, cost_im = losses.hinge_costs(scores, margin=0.2)
    np.testing.assert_allclose(cost_s, [[0.0, 0.3], [0.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(cost_im, [[0.0, 0.0], [0.0, 0.0]], atol=1e-6)
    scores = jnp.array([[0.5, 0.0], [0.6, 0.9]])  # image 1 is a hard negative of caption 0
    cost_s, cost_im = losses.hinge_costs(scores, margin=0.2)
    np.testing.assert_allclose(cost_s, 0.0, atol=1e-6)
    np.testing.assert_allclose(cost_im, [[0.0, 0.3], [0.0, 0.0]], atol=1e-6)


def test_mean_reduction_and_mixing_weight():
    im, s = unit(jax.random.key(5), (8, 4)), unit(jax.random.key(6), (8, 4))
    sh = losses.vse_hinge_loss(im, s)
    mh = losses.vse_hinge_loss(im, s, max_violation=True)
    np.testing.assert_allclose(losses.vse_hinge_loss(im, s, reduction="mean"), sh / 8, rtol=1e-6)
    np.testing.assert_allclose(losses.vse_hinge_loss(im, s, max_violation=0.0), sh, rtol=1e-6)
    np.testing.assert_allclose(losses.vse_hinge_loss(im, s, max_violation=1.0), mh, rtol=1e-6)
    mixed = losses.vse_hinge_loss(im, s, max_violation=jnp.float32(0.25))
    np.testing.assert_allclose(mixed, 0.75 * sh + 0.25 * mh, rtol=1e-6)


def test_schedule_moves_from_sh_to_mh():
    hard = losses.hard_negative_schedule(10)
    assert [float(hard(t)) for t in (0, 9, 10, 500)] == [0.0, 0.0, 1.0, 1.0]
    ramp = losses.hard_negative_schedule(10, transition_steps=3)
    np.testing.assert_allclose([ramp(t) for t in (9, 10, 11, 12, 13)], [0, 0.25, 0.5, 0.75, 1.0])


def test_jit_grad_vmap_and_no_retrace():
    traces = []

    @jax.jit
    def loss_fn(im, s, w):
        traces.append(1)
        return losses.vse_hinge_loss(im, s, max_violation=w)

    im, s = unit(jax.random.key(7), (5, 3)), unit(jax.random.key(8), (5, 3))
    loss_fn(im, s, 0.0)
    loss_fn(im * 0.9, s, 1.0)
    assert len(traces) == 1
    g = jax.grad(lambda x: losses.vse_hinge_loss(x, s, max_violation=True))(im)
    eps = 1e-3
    e = jnp.zeros_like(im).at[2, 1].set(eps)
    fd = (
        losses.vse_hinge_loss(im + e, s, max_violation=True)
        - losses.vse_hinge_loss(im - e, s, max_violation=True)
    ) / (2 * eps)
    np.testing.assert_allclose(g[2, 1], fd, rtol=1e-2, atol=1e-3)
    batched = jax.vmap(lambda a, b: losses.vse_hinge_loss(a, b))(
        jnp.stack([im, s]), jnp.stack([s, im])
    )
    np.testing.assert_allclose(batched[0], losses.vse_hinge_loss(im, s), rtol=1e-6)


def test_order_gradient_finite_at_zero_violation():
    im = jnp.ones((3, 4))
    s = jnp.full((3, 4), 0.5)  # captions below every image: zero violation everywhere
    g = jax.grad(lambda x: losses.vse_hinge_loss(x, s, measure="order"))(im)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_collapse_indicator():
    same = jnp.ones((4, 3)) / jnp.sqrt(3.0)
    scores = losses.similarity_matrix(same, same)
    assert bool(losses.is_collapsed(scores))
    # Collapsed MH loss is exactly 2 * B * margin.
    np.testing.assert_allclose(
        losses.vse_hinge_loss(same, same, max_violation=True), 2 * 4 * 0.2, rtol=1e-6
    )
    im = unit(jax.random.key(9), (4, 3))
    assert not bool(losses.is_collapsed(losses.similarity_matrix(im, im)))


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_global_batch_negatives_when_sharded(axis_type):
    # 16 pairs over 8 devices, 2 per shard. Caption 9 (device 4) equals image 0 (device 0):
    # it is the hardest negative of image query 0, and image 0 that of caption query 9, but
    # neither is on the query's own shard, so per-device negatives would miss them. Meshes
    # of both axis types: jax.make_mesh's default (explicit) makes shardings part of types.
    types = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
    mesh = jax.make_mesh((8,), ("data",), axis_types=(types[axis_type],))
    im, s = unit(jax.random.key(10), (16, 8)), unit(jax.random.key(11), (16, 8))
    s = s.at[9].set(im[0])
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    im_sharded, s_sharded = jax.device_put(im, sharding), jax.device_put(s, sharding)
    device_of_row = {
        row: shard.device
        for shard in s_sharded.addressable_shards
        for row in range(16)[shard.index[0]]
    }
    assert len(set(device_of_row.values())) == 8 and device_of_row[0] != device_of_row[9]

    loss = lambda a, b: losses.vse_hinge_loss(a, b, max_violation=True)
    sharded = jax.jit(loss)(im_sharded, s_sharded)
    per_device = jax.shard_map(
        lambda a, b: loss(a, b)[None],
        mesh=mesh,
        in_specs=(PartitionSpec("data"), PartitionSpec("data")),
        out_specs=PartitionSpec("data"),
    )(im_sharded, s_sharded)
    want = reference_loss(
        np.asarray(im), np.asarray(s), margin=0.2, measure="cosine", max_violation=True
    )
    np.testing.assert_allclose(sharded, want, rtol=1e-5)
    for measure in ("cosine", "order"):  # loss and gradient under jit, equal to one device
        f = lambda a, b, m=measure: losses.vse_hinge_loss(jnp.abs(a), jnp.abs(b), measure=m)
        np.testing.assert_allclose(jax.jit(f)(im_sharded, s_sharded), f(im, s), rtol=1e-5)
        grads = jax.jit(jax.grad(f, argnums=(0, 1)))(im_sharded, s_sharded)
        for got, want_grad in zip(grads, jax.grad(f, argnums=(0, 1))(im, s), strict=True):
            np.testing.assert_allclose(got, want_grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        jnp.sum(per_device), sum(loss(im[i : i + 2], s[i : i + 2]) for i in range(0, 16, 2))
    )
    # Per-device negatives miss the planted pair (each costs about 1.2 - S[k, k] globally)
    # and most other queries' hardest negatives: here 25.8 globally against 8.0.
    assert float(sharded) - float(jnp.sum(per_device)) > 10.0


@pytest.mark.parametrize("max_violation", [False, True])
def test_asymmetric_positives_mask_matches_reference(max_violation):
    # positives[k, j]: image k and caption j match. Caption 3 is a copy of image 0 and
    # caption 1 of image 4, and only those pairs are marked, so the mask is not symmetric:
    # a transposed mask would unmask them and mask the unrelated pairs (3, 0) and (1, 4).
    im, s = unit(jax.random.key(14), (6, 4)), unit(jax.random.key(15), (6, 4))
    s = s.at[3].set(im[0]).at[1].set(im[4])
    pos = jnp.zeros((6, 6), bool).at[0, 3].set(True).at[4, 1].set(True)
    assert not bool(jnp.all(pos == pos.T))
    got = losses.vse_hinge_loss(im, s, max_violation=max_violation, positives=pos)
    reference = lambda mask: reference_loss(
        np.asarray(im),
        np.asarray(s),
        margin=0.2,
        measure="cosine",
        max_violation=max_violation,
        positives=np.asarray(mask),
    )
    np.testing.assert_allclose(got, reference(pos), rtol=1e-5)
    # The data tells the two orientations apart: the transposed mask's loss is far off.
    assert abs(reference(pos) - reference(pos.T)) > 0.5


def test_bfloat16_inputs():
    im, s = unit(jax.random.key(12), (4, 8)), unit(jax.random.key(13), (4, 8))
    out = losses.vse_hinge_loss(im.astype(jnp.bfloat16), s.astype(jnp.bfloat16))
    chex.assert_shape(out, ())
    np.testing.assert_allclose(float(out), float(losses.vse_hinge_loss(im, s)), rtol=5e-2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(images=jnp.ones((4, 3)), captions=jnp.ones((5, 3))), "same number"),
        (dict(images=jnp.ones((4, 3)), captions=jnp.ones((4, 2))), "embedding size"),
        (dict(images=jnp.ones((4,)), captions=jnp.ones((4, 3))), "`images`"),
        (dict(images=jnp.ones((4, 3), int), captions=jnp.ones((4, 3))), "floating"),
        (dict(measure="l2"), "`measure`"),
        (dict(reduction="max"), "`reduction`"),
        (dict(margin=-1.0), "`margin`"),
        (dict(margin=np.float32(-0.1)), "`margin`"),
        (dict(margin=jnp.array(-0.1)), "`margin`"),
        (dict(margin=np.nan), "`margin`"),
        (dict(margin=np.inf), "`margin`"),
        (dict(margin=np.array([0.2])), "`margin` must be a scalar"),
        (dict(margin="0.2"), "`margin`"),
        (dict(top_k=2), "`top_k`"),
        (dict(max_violation=True, top_k=0), "`top_k`"),
        (dict(max_violation=True, top_k=True), "`top_k`"),
        (dict(max_violation=True, top_k=2.0), "`top_k`"),
        (dict(max_violation=0, top_k=2), "`top_k`"),
        (dict(max_violation=0.0, top_k=2), "`top_k`"),
        (dict(max_violation=np.float32(0), top_k=2), "`top_k`"),
        (dict(max_violation=jnp.array(0.0), top_k=2), "`top_k`"),
        (dict(max_violation=1.5), "`max_violation`"),
        (dict(max_violation=np.float32(5.0)), "`max_violation`"),
        (dict(max_violation=np.float64(-0.5)), "`max_violation`"),
        (dict(max_violation=jnp.float32(1.5)), "`max_violation`"),
        (dict(max_violation=jnp.array(-1.0)), "`max_violation`"),
        (dict(max_violation=np.nan), "`max_violation`"),
        (dict(max_violation=jnp.array([0.5, 0.5])), "`max_violation` must be a scalar"),
        (dict(max_violation="yes"), "`max_violation`"),
        (dict(positives=jnp.ones((3, 3), bool)), "`positives`"),
        (dict(positives=jnp.ones((4, 4))), "boolean"),
    ],
)
def test_bad_input_is_named(kwargs, match):
    args = dict(images=jnp.ones((4, 3)), captions=jnp.ones((4, 3)))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        losses.vse_hinge_loss(**args)


def test_weight_and_margin_as_numpy_and_jax_scalars():
    im, s = unit(jax.random.key(16), (5, 4)), unit(jax.random.key(17), (5, 4))
    want = losses.vse_hinge_loss(im, s, margin=0.1, max_violation=0.25)
    for cast in (np.float32, np.float64, jnp.float32, jnp.asarray):
        got = losses.vse_hinge_loss(im, s, margin=cast(0.1), max_violation=cast(0.25))
        np.testing.assert_allclose(got, want, rtol=1e-6)
    mh = losses.vse_hinge_loss(im, s, max_violation=True, top_k=2)
    for one in (1, np.float32(1), jnp.array(1.0)):
        np.testing.assert_allclose(
            losses.vse_hinge_loss(im, s, max_violation=one, top_k=np.int64(2)), mh, rtol=1e-6
        )


def test_traced_weight_and_margin_are_not_checked():
    # Inside jit the values are unknown: they cannot be refused, the caller keeps them in
    # range (as documented). A non-scalar is still refused: its shape is known.
    im, s = unit(jax.random.key(18), (5, 4)), unit(jax.random.key(19), (5, 4))
    loss = jax.jit(lambda w, m: losses.vse_hinge_loss(im, s, margin=m, max_violation=w))
    sh, mh = losses.vse_hinge_loss(im, s), losses.vse_hinge_loss(im, s, max_violation=True)
    np.testing.assert_allclose(loss(2.0, 0.2), 2 * mh - sh, rtol=1e-5)
    with pytest.raises(ValueError, match="`max_violation` must be a scalar"):
        loss(jnp.array([0.5, 0.5]), 0.2)
    with pytest.raises(ValueError, match="`margin` must be a scalar"):
        loss(0.5, jnp.array([0.2, 0.2]))


def planted_batch(n=32, dim=8):
    """``n`` pairs where caption 9 copies image 0 and image 21 copies caption 2, and a mask
    of the extra matching pairs of images 4/5 and 12/30 (same image id)."""
    im, s = unit(jax.random.key(20), (n, dim)), unit(jax.random.key(21), (n, dim))
    s = s.at[9].set(im[0])
    im = im.at[21].set(s[2])
    ids = jnp.arange(n).at[5].set(4).at[30].set(12)
    return im, s, losses.positives_from_ids(ids)


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
@pytest.mark.parametrize("max_violation, top_k", [(False, None), (True, None), (True, 2)])
def test_local_negatives_sum_per_device_losses(axis_type, max_violation, top_k):
    # 32 pairs over 8 devices, 4 per device. The planted hard negatives (caption 9 for
    # image 0, image 21 for caption 2) sit on other devices than their queries: global
    # negatives see them, per-device negatives do not.
    types = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
    mesh = jax.make_mesh((8,), ("data",), axis_types=(types[axis_type],))
    im, s, pos = planted_batch()
    rows = NamedSharding(mesh, PartitionSpec("data"))
    args = [jax.device_put(x, rows) for x in (im, s, pos)]
    kw = dict(max_violation=max_violation, top_k=top_k)

    def loss(negatives, reduction="sum"):
        return jax.jit(
            lambda a, b, p: losses.vse_hinge_loss(
                a, b, positives=p, negatives=negatives, mesh=mesh, reduction=reduction, **kw
            )
        )(*args)

    ref = lambda a, b, p: reference_loss(
        np.asarray(a),
        np.asarray(b),
        margin=0.2,
        measure="cosine",
        positives=np.asarray(p),
        max_violation=max_violation,
        top_k=top_k or 1,
    )
    want_global = ref(im, s, pos)
    want_local = sum(
        ref(im[i : i + 4], s[i : i + 4], pos[i : i + 4, i : i + 4]) for i in range(0, 32, 4)
    )
    np.testing.assert_allclose(loss("global"), want_global, rtol=1e-5)
    np.testing.assert_allclose(loss("local"), want_local, rtol=1e-5)
    np.testing.assert_allclose(loss("local", "mean"), want_local / 32, rtol=1e-5)
    assert want_global - want_local > 5.0  # the two definitions differ on this batch
    # From a row-sharded similarity matrix: its diagonal blocks.
    scores = losses.similarity_matrix(args[0], args[1])
    from_scores = jax.jit(
        lambda x, p: losses.hinge_loss(x, positives=p, negatives="local", mesh=mesh, **kw)
    )(scores, args[2])
    np.testing.assert_allclose(from_scores, want_local, rtol=1e-5)


def test_local_negatives_gradient_traced_weight_and_context_mesh():
    # Auto axes: the inputs' types do not name the mesh, jax.set_mesh does.
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    im, s, pos = planted_batch()
    rows = NamedSharding(mesh, PartitionSpec("data"))
    a, b = jax.device_put(im, rows), jax.device_put(s, rows)

    def local(a, b, w):
        return losses.vse_hinge_loss(a, b, max_violation=w, negatives="local")

    def per_shard(a, b, w):
        return sum(
            losses.vse_hinge_loss(a[i : i + 4], b[i : i + 4], max_violation=w)
            for i in range(0, 32, 4)
        )

    with jax.set_mesh(mesh):  # the mesh comes from the context
        got = jax.jit(jax.value_and_grad(local, argnums=(0, 1)))(a, b, 0.5)
    want = jax.value_and_grad(per_shard, argnums=(0, 1))(im, s, 0.5)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, w in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_local_negatives_on_one_device_equal_global_and_bad_input_is_named():
    im, s, pos = planted_batch()
    one = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    np.testing.assert_allclose(
        losses.vse_hinge_loss(im, s, max_violation=True, negatives="local", mesh=one),
        losses.vse_hinge_loss(im, s, max_violation=True),
        rtol=1e-6,
    )
    mesh = jax.make_mesh((8,), ("data",))
    with pytest.raises(ValueError, match="`negatives`"):
        losses.vse_hinge_loss(im, s, negatives="device")
    with pytest.raises(ValueError, match="`negatives`"):
        losses.hinge_loss(losses.similarity_matrix(im, s), negatives="device")
    with pytest.raises(ValueError, match="needs the mesh"):
        losses.vse_hinge_loss(np.asarray(im), np.asarray(s), negatives="local")
    with pytest.raises(ValueError, match="not divisible by 8"):
        losses.vse_hinge_loss(im[:12], s[:12], negatives="local", mesh=mesh)
    with pytest.raises(ValueError, match="`axis_name`"):
        losses.vse_hinge_loss(im, s, negatives="local", mesh=mesh, axis_name="model")
    with pytest.raises(ValueError, match="`positives`"):
        losses.vse_hinge_loss(im, s, negatives="local", mesh=mesh, positives=pos[:4, :4])
