"""Gradient clustering: distances, assignment, centre updates, passes, online mode, optax.

References are brute-force per-example gradients (one ``jax.grad`` per example) compared
with the centres formed densely (the outer product of each leaf's factors), and
loop-based numpy versions of the update formulas.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _engine_models import brute_force, equinox_mlp, linen_mlp
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jaxeff import clustering, pergrad
from jaxeff.train import Checkpointer


class MLP(nnx.Module):
    def __init__(self, rngs, d_in=6, hidden=5, out=3):
        self.fc1 = nnx.Linear(d_in, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, out, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jnp.tanh(self.fc1(x)))


class ConvNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 3, kernel_size=(3, 3), padding="SAME", rngs=rngs)
        self.head = nnx.Linear(4 * 4 * 3, 3, use_bias=False, rngs=rngs)

    def __call__(self, x):
        y = jnp.tanh(self.conv(x))
        return self.head(y.reshape(x.shape[0], -1))


def xent(model, batch):
    logits = model(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def as_params_loss(model):
    """``(loss_fn(params, batch), params)``: ``xent`` as a function of the model's
    ``nnx.Param`` state."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, batch):
        return xent(nnx.merge(graphdef, params, rest), batch)

    return loss_fn, params


def mlp_setup(seed=0):
    """``(loss_fn, params)`` of the MLP."""
    return as_params_loss(MLP(nnx.Rngs(seed)))


def mlp_data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 6)).astype(np.float32), "y": rng.integers(0, 3, n)}


def conv_data(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 4, 4, 2)).astype(np.float32), "y": rng.integers(0, 3, n)}


def setup(kind, seed=0):
    """``(loss_fn, params, batch)`` of the MLP or the ConvNet."""
    if kind == "mlp":
        return (*mlp_setup(seed), mlp_data())
    return (*as_params_loss(ConvNet(nnx.Rngs(seed))), conv_data())


def explicit_grads(loss_fn, params, batch):
    """``{path: (B, *leaf shape)}`` float64 per-example gradients, one ``jax.grad`` each."""
    grads = brute_force(loss_fn, params, batch)
    leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
    return dict(zip(pergrad.param_paths(params), leaves, strict=True))


def dense_centres(centres, grads):
    """``{path: (K, *leaf shape)}``: each centre formed, the outer product of its factors."""
    out = {}
    for path, parts in centres.items():
        dense = np.asarray(parts[0], np.float64).reshape(len(parts[0]), -1)
        for f in parts[1:]:
            f = np.asarray(f, np.float64).reshape(len(f), -1)
            dense = np.einsum("ka,kb->kab", dense, f).reshape(len(f), -1)
        out[path] = dense.reshape(-1, *grads[path].shape[1:])
    return out


def explicit_distances(grads, centres):
    """Loop reference: ``d_ik = Σ_p ||g_{i,p} − C_{k,p}||²`` with the centres formed."""
    dense = dense_centres(centres, grads)
    n = next(iter(grads.values())).shape[0]
    k = len(next(iter(dense.values())))
    d = np.zeros((n, k))
    for path, centre in dense.items():
        for i in range(n):
            for c in range(k):
                d[i, c] += np.sum((grads[path][i] - centre[c]) ** 2)
    return d


def stats_for(loss_fn, params, batch, state):
    return pergrad.per_example_stats(loss_fn, params, batch, directions=state.centres)


def random_state(shapes, k, seed=0, sizes=None):
    """Random centres for the leaves ``shapes`` (:func:`clustering.cluster_leaves`): the
    first factor of a matrix leaf ``N(0, 1)``, every other factor ``N(0, 0.3²)``."""
    rng = np.random.default_rng(seed)

    def factors(split):
        last = len(split) - 1
        return tuple(
            jnp.asarray(rng.normal(size=(k, *shape)) * (0.3 if j == last else 1.0), jnp.float32)
            for j, shape in enumerate(split)
        )

    centres = {path: factors(split) for path, split in shapes.items()}
    sizes = rng.integers(1, 20, k) if sizes is None else sizes
    return clustering.ClusterState(
        centres, jnp.asarray(sizes, jnp.float32), jnp.zeros((), jnp.int32)
    )


def mlp_state(loss_fn, params, k, seed=0, sizes=None):
    """:func:`random_state` for every leaf of the MLP."""
    shapes = clustering.cluster_leaves(loss_fn, params, mlp_data(2))
    return random_state(shapes, k, seed=seed, sizes=sizes)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_distances_match_explicit_gradients_and_centre_matrices(kind):
    loss_fn, params, batch = setup(kind)
    state = random_state(clustering.cluster_leaves(loss_fn, params, batch), 4)
    got = np.asarray(clustering.distances(state, stats_for(loss_fn, params, batch, state)))
    want = explicit_distances(explicit_grads(loss_fn, params, batch), state.centres)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_factors_are_mean_input_and_summed_signal(kind):
    """``s_i`` is the layer's bias gradient; for Dense ``ā_i s_iᵀ`` is the kernel gradient,
    for Conv ``ā_i`` is the mean over positions of the unfolded input patches; a bias's one
    factor is its gradient."""
    loss_fn, params, batch = setup(kind, seed=1)
    shapes = clustering.cluster_leaves(loss_fn, params, batch)
    stats = pergrad.per_example_stats(
        loss_fn, params, batch, directions=clustering.zero_directions(shapes, 1)
    )
    grads = explicit_grads(loss_fn, params, batch)
    factors = {p: tuple(np.asarray(x) for x in f) for p, f in stats.factors.items()}
    assert set(factors) == set(shapes) == set(grads)
    for path, parts in factors.items():
        if len(parts) == 1:  # a bias
            np.testing.assert_allclose(parts[0], grads[path], rtol=1e-5, atol=1e-6)
            continue
        a, s = parts
        bias = path.replace("kernel", "bias")
        if bias in grads:
            np.testing.assert_allclose(s, grads[bias], rtol=1e-5, atol=1e-6)
        if kind == "mlp":
            np.testing.assert_allclose(np.einsum("bi,bo->bio", a, s), grads[path], atol=1e-5)
    if kind == "conv":  # loop reference: mean over the 4x4 positions of each 3x3 patch
        padded = np.pad(batch["x"], [(0, 0), (1, 1), (1, 1), (0, 0)])
        want = np.zeros((12, 18))
        for dy in range(3):
            for dx in range(3):
                for c in range(2):
                    want[:, (dy * 3 + dx) * 2 + c] = padded[:, dy : dy + 4, dx : dx + 4, c].mean(
                        (1, 2)
                    )
        np.testing.assert_allclose(factors["conv/kernel"][0].reshape(12, -1), want, atol=1e-6)


def sequential_reference(dist, sizes, counts=None, seen=0.0):
    """Loop: example i joins argmin_k (c_k + N_k max(0, 1 - seen/ΣN) + 1) d_ik."""
    counts = np.zeros(len(sizes)) if counts is None else counts
    out = []
    for row in dist:
        estimate = counts + sizes * max(0.0, 1.0 - seen / max(sizes.sum(), 1.0))
        k = int(np.argmin((estimate + 1.0) * row))
        counts[k] += 1
        seen += 1
        out.append(k)
    return out


def test_assignment_is_size_weighted_argmin():
    loss_fn, params = mlp_setup()
    batch = mlp_data(40)
    state = mlp_state(loss_fn, params, 5, sizes=[1.0, 30.0, 2.0, 8.0, 0.0])
    stats = stats_for(loss_fn, params, batch, state)
    got, dist = clustering.assign(state, stats)
    dist = np.asarray(dist, np.float64)
    np.testing.assert_array_equal(got, sequential_reference(dist, np.asarray(state.sizes)))
    plain, _ = clustering.assign(state, stats, size_weighted=False)
    np.testing.assert_array_equal(plain, dist.argmin(1))
    assert not np.array_equal(plain, got)  # the weighting changes the assignment here


def numpy_sums(factors, assignments, dist, k, mask):
    """Loop reference of :func:`clustering.cluster_sums` over ``{path: factors}``."""
    counts = np.zeros(k)
    sums = {path: tuple(np.zeros((k, *f.shape[1:])) for f in fs) for path, fs in factors.items()}
    far = np.full(k, -np.inf)
    far_rows = {}
    distortion = np.zeros(k)
    for i, c in enumerate(assignments):
        if not mask[i]:
            continue
        counts[c] += 1
        distortion[c] += dist[i, c]
        for path, fs in factors.items():
            for total, f in zip(sums[path], fs, strict=True):
                total[c] += f[i]
        if dist[i, c] > far[c]:
            far[c], far_rows[c] = dist[i, c], i
    return counts, sums, distortion, far, far_rows


def test_cluster_sums_and_batch_update_match_loop_reference():
    loss_fn, params = mlp_setup()
    batch = mlp_data(30)
    state = mlp_state(loss_fn, params, 4, sizes=[5.0, 5.0, 5.0, 5.0])
    stats = stats_for(loss_fn, params, batch, state)
    assignments, dist = clustering.assign(state, stats)
    mask = np.ones(30, bool)
    mask[-3:] = False
    sums = clustering.cluster_sums(state, stats, assignments, dist, mask=mask)
    factors = {p: tuple(np.asarray(x) for x in f) for p, f in stats.factors.items()}
    counts, ref, distortion, far, far_rows = numpy_sums(
        factors, np.asarray(assignments), np.asarray(dist), 4, mask
    )
    np.testing.assert_allclose(sums.counts, counts)
    np.testing.assert_allclose(sums.distortion, distortion, rtol=1e-5)
    np.testing.assert_allclose(sums.far_distance, far, rtol=1e-6)
    new = clustering.batch_update(state, sums, min_fraction=0.0)
    assert set(ref) == set(state.centres)
    for path, totals in ref.items():
        for j, total in enumerate(totals):
            np.testing.assert_allclose(sums.factor_sums[path][j], total, rtol=1e-5, atol=1e-6)
            for c in range(4):
                if counts[c]:
                    np.testing.assert_allclose(
                        new.centres[path][j][c], total[c] / counts[c], rtol=1e-5, atol=1e-6
                    )
                    np.testing.assert_allclose(
                        sums.far_factors[path][j][c], factors[path][j][far_rows[c]], atol=1e-6
                    )
    np.testing.assert_allclose(new.sizes, counts)
    assert int(new.count) == 1


def test_sums_over_batches_add_up_to_one_batch():
    loss_fn, params = mlp_setup()
    data = mlp_data(36)
    state = mlp_state(loss_fn, params, 3)
    whole, _ = clustering.clustering_pass(loss_fn, params, [data], state)
    parts = [jax.tree.map(lambda x, s=s: x[s : s + 12], data) for s in (0, 12, 24)]
    split, assignments = clustering.clustering_pass(loss_fn, params, parts, state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), whole, split)
    assert assignments.shape == (36,)
    # A padded last batch with its mask gives the same pass.
    padded = {k: np.concatenate([v[24:], v[:4]]) for k, v in data.items()}
    padded["mask"] = np.arange(16) < 12
    masked, masked_assignments = clustering.clustering_pass(
        loss_fn, params, [parts[0], parts[1], padded], state
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), whole, masked)
    np.testing.assert_array_equal(masked_assignments, assignments)


def test_small_cluster_is_reseeded_at_farthest_member_of_highest_distortion_cluster():
    loss_fn, params = mlp_setup()
    data = mlp_data(40)
    state = mlp_state(loss_fn, params, 4, seed=1, sizes=[10.0, 10.0, 10.0, 10.0])
    stats = stats_for(loss_fn, params, data, state)
    assignments, dist = clustering.assign(state, stats)
    sums = clustering.cluster_sums(state, stats, assignments, dist)
    counts = np.asarray(sums.counts)
    ordered = np.sort(counts)
    assert ordered[2] > ordered[1] and ordered[2] >= 2  # two small clusters, two to split
    threshold = (ordered[1] + ordered[2]) / 2 / counts.sum()
    new = clustering.batch_update(state, sums, min_fraction=threshold)
    small = np.flatnonzero(counts < threshold * counts.sum())
    assert small.size == 2
    order = [j for j in np.argsort(-np.asarray(sums.distortion)) if j not in small]
    for k, j in zip(small, order, strict=False):
        for path, parts in new.centres.items():
            for f, far in zip(parts, sums.far_factors[path], strict=True):
                np.testing.assert_allclose(f[k], far[j])
        assert float(new.sizes[k]) == pytest.approx(counts[j] / 2)
        assert float(new.sizes[j]) == pytest.approx(counts[j] / 2)


@pytest.mark.parametrize("size_weighted", [True, False])
def test_online_update_with_masked_rows_is_the_update_without_them(size_weighted):
    loss_fn, params = mlp_setup()
    data = mlp_data(32)
    state = mlp_state(loss_fn, params, 3, sizes=[4.0, 1.0, 9.0])
    mask = np.ones(32, bool)
    mask[[3, 10, 11, 30]] = False  # padding rows anywhere in the batch
    options = dict(decay=0.5, size_weighted=size_weighted)
    stats = stats_for(loss_fn, params, data, state)
    got, assignments = clustering.online_update(state, stats, mask=mask, **options)
    kept = jax.tree.map(lambda x: x[mask], data)
    want, want_assignments = clustering.online_update(
        state, stats_for(loss_fn, params, kept, state), **options
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
    np.testing.assert_array_equal(np.asarray(assignments)[mask], want_assignments)


def test_online_update_matches_moving_average_formula():
    loss_fn, params = mlp_setup()
    data = mlp_data(32)
    state = mlp_state(loss_fn, params, 3, sizes=[4.0, 0.0, 9.0])
    stats = stats_for(loss_fn, params, data, state)
    new, assignments = clustering.online_update(state, stats, decay=0.75)
    sums = clustering.cluster_sums(state, stats, *clustering.assign(state, stats))
    sizes, counts = np.asarray(state.sizes), np.asarray(sums.counts)
    np.testing.assert_allclose(new.sizes, 0.75 * sizes + 0.25 * counts, rtol=1e-6)
    for path, parts in state.centres.items():
        for j, old in enumerate(parts):
            old = np.asarray(old)
            for c in range(3):
                total = 0.75 * sizes[c] + 0.25 * counts[c]
                got = new.centres[path][j][c]
                if total == 0:
                    np.testing.assert_allclose(got, old[c])
                    continue
                batch_sum = np.asarray(sums.factor_sums[path][j][c])
                want = (0.75 * sizes[c] * old[c] + 0.25 * batch_sum) / total
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(assignments, clustering.assign(state, stats)[0])


def duplicated_data(groups=6, copies=8, seed=0):
    base = mlp_data(groups, seed)
    return {k: np.repeat(v, copies, axis=0) for k, v in base.items()}, groups


def test_batch_mode_separates_exact_duplicates():
    """On groups of identical examples the clusters end up pure and the distortion 0."""
    loss_fn, params = mlp_setup()
    data, groups = duplicated_data()
    state = clustering.init_clusters(
        loss_fn, params, data, num_clusters=groups, key=jax.random.key(3)
    )
    for _ in range(6):
        state, assignments = clustering.clustering_pass(
            loss_fn, params, [data], state, min_fraction=0.5 / groups
        )
    _, assignments = clustering.clustering_pass(loss_fn, params, [data], state)
    per_group = assignments.reshape(groups, -1)
    assert all(len(set(row)) == 1 for row in per_group)
    assert len(set(per_group[:, 0])) == groups
    stats = stats_for(loss_fn, params, data, state)
    dist = clustering.distances(state, stats)
    own = np.asarray(dist)[np.arange(len(assignments)), assignments]
    assert own.max() < 1e-6 * float(jnp.mean(stats.total_sq_norms))


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_pass_on_sharded_batch_equals_unsharded(axis_type):
    loss_fn, params = mlp_setup()
    data = mlp_data(32)
    state = mlp_state(loss_fn, params, 4)
    want, want_assign = clustering.clustering_pass(loss_fn, params, [data], state)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    sharded = jax.device_put(data, NamedSharding(mesh, PartitionSpec("data")))
    with jax.set_mesh(mesh):
        got, got_assign = clustering.clustering_pass(loss_fn, params, [sharded], state)
        online, _ = jax.jit(clustering.online_update)(
            state, stats_for(loss_fn, params, sharded, state)
        )
    np.testing.assert_array_equal(got_assign, want_assign)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
    ref, _ = clustering.online_update(state, stats_for(loss_fn, params, data, state))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), online, ref)


def test_state_checkpoints_and_restores_bit_exactly(tmp_path):
    loss_fn, params = mlp_setup()
    state = clustering.init_clusters(
        loss_fn, params, mlp_data(16), num_clusters=4, key=jax.random.key(0)
    )
    state, _ = clustering.clustering_pass(loss_fn, params, [mlp_data(16)], state)
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(1, {"clusters": state})
    ckpt.wait_until_finished()
    target = {"clusters": jax.tree.map(jnp.zeros_like, state)}
    restored, _ = ckpt.restore(target)
    ckpt.close()
    assert isinstance(restored["clusters"], clustering.ClusterState)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        restored["clusters"],
        state,
    )


def test_batch_mode_on_a_conv_model_averages_its_members():
    """A pass over a ConvNet: every centre factor (the conv kernel's ``(kh, kw, c_in)``
    input factor included) becomes its members' mean, and a bias centre is the members'
    mean bias gradient (brute force)."""
    loss_fn, params, batch = setup("conv", seed=2)
    state = clustering.init_clusters(loss_fn, params, batch, num_clusters=3, key=jax.random.key(0))
    assert state.centres["conv/kernel"][0].shape == (3, 3, 3, 2)
    new, assignments = clustering.clustering_pass(loss_fn, params, [batch], state)
    grads = explicit_grads(loss_fn, params, batch)
    stats = stats_for(loss_fn, params, batch, state)
    for k in range(3):
        members = assignments == k
        if not members.any():
            continue
        np.testing.assert_allclose(
            new.centres["conv/bias"][0][k], grads["conv/bias"][members].mean(0), atol=1e-6
        )
        for got, f in zip(new.centres["conv/kernel"], stats.factors["conv/kernel"], strict=True):
            np.testing.assert_allclose(got[k], np.asarray(f)[members].mean(0), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(new.sizes), np.bincount(assignments, minlength=3))


def test_init_seeds_distinct_examples_deterministically():
    """Every leaf's centre ``k`` is the gradient of one example (the same for all leaves;
    for a Dense kernel ``ā ⊗ s`` is that gradient), ``K`` distinct examples."""
    loss_fn, params = mlp_setup()
    data = mlp_data(20)
    a = clustering.init_clusters(loss_fn, params, data, num_clusters=5, key=jax.random.key(1))
    b = clustering.init_clusters(loss_fn, params, data, num_clusters=5, key=jax.random.key(1))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    grads = explicit_grads(loss_fn, params, data)
    bias = grads["fc2/bias"]
    u = np.asarray(a.centres["fc2/bias"][0])
    rows = [int(np.argmin(np.abs(bias - row).sum(1))) for row in u]
    assert len(set(rows)) == 5
    assert set(a.centres) == set(grads)
    for path, centre in dense_centres(a.centres, grads).items():
        np.testing.assert_allclose(centre, grads[path][rows], rtol=1e-5, atol=1e-6)


def test_optax_transform_seeds_then_updates_online_and_passes_updates_through():
    loss_fn, params = mlp_setup()
    data = mlp_data(16)
    gc = clustering.gradient_clustering(loss_fn, data, num_clusters=4, decay=0.5)
    tx = optax.chain(gc, optax.sgd(0.1))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads, stats = pergrad.value_grad_and_stats(
            loss_fn, params, batch, directions=opt_state[0].clusters.centres
        )
        updates, opt_state = tx.update(grads, opt_state, params, per_example_stats=stats)
        return grads, updates, opt_state, stats

    grads, updates, opt_state, stats = step(params, opt_state, data)
    jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -0.1 * g, rtol=1e-6), updates, grads)
    first = opt_state[0]
    assert int(first.clusters.count) == 1
    np.testing.assert_array_equal(first.assignments, -np.ones(16))
    # The first update puts the centres exactly where init_from_stats seeds them.
    seed_key = jax.random.split(jax.random.key(0))[0]
    seeded = clustering.init_from_stats(
        stats, num_clusters=4, key=seed_key, leaves=list(first.clusters.centres)
    )
    jax.tree.map(np.testing.assert_array_equal, first.clusters.centres, seeded.centres)
    np.testing.assert_array_equal(first.clusters.sizes, seeded.sizes)
    _, _, opt_state, stats = step(params, opt_state, data)
    want, want_assign = clustering.online_update(first.clusters, stats, decay=0.5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), opt_state[0].clusters, want
    )
    np.testing.assert_array_equal(opt_state[0].assignments, want_assign)
    assert step._cache_size() == 1


def test_bad_input_names_the_argument():
    loss_fn, params = mlp_setup()
    data = mlp_data(8)
    with pytest.raises(ValueError, match="num_clusters"):
        clustering.init_clusters(loss_fn, params, data, num_clusters=0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="at least `num_clusters`"):
        clustering.init_clusters(loss_fn, params, data, num_clusters=9, key=jax.random.key(0))
    with pytest.raises(ValueError, match="`leaves` names 'nope'"):
        clustering.cluster_leaves(loss_fn, params, data, ["nope"])
    state = mlp_state(loss_fn, params, 2)
    stats = pergrad.per_example_stats(loss_fn, params, data)
    with pytest.raises(ValueError, match="directions=state.centres"):
        clustering.assign(state, stats)
    with pytest.raises(ValueError, match="`decay`"):
        clustering.online_update(state, stats_for(loss_fn, params, data, state), decay=1.0)
    with pytest.raises(ValueError, match="`min_fraction`"):
        clustering.clustering_pass(loss_fn, params, [data], state, min_fraction=-0.1)
    with pytest.raises(ValueError, match="`batches` is empty"):
        clustering.clustering_pass(loss_fn, params, [], state)
    with pytest.raises(ValueError, match="`batch` must hold at least `num_clusters`"):
        clustering.gradient_clustering(loss_fn, mlp_data(2), num_clusters=4)
    gc = clustering.gradient_clustering(loss_fn, data, num_clusters=2)
    with pytest.raises(ValueError, match="per_example_stats"):
        gc.update({}, gc.init(params))


def test_add_sums_of_parts_equals_sums_of_whole_batch():
    loss_fn, params = mlp_setup()
    data = mlp_data(30)
    state = mlp_state(loss_fn, params, 3)

    def sums_of(batch):
        stats = stats_for(loss_fn, params, batch, state)
        assignments, dist = clustering.assign(state, stats, size_weighted=False)
        return clustering.cluster_sums(state, stats, assignments, dist)

    whole = sums_of(data)
    total = clustering.empty_sums(state)
    for start in (0, 10, 20):
        total = clustering.add_sums(
            total, sums_of(jax.tree.map(lambda x, s=start: x[s : s + 10], data))
        )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), total, whole)


def test_sequential_assignment_balances_where_all_at_once_would_not():
    """Every example nearest to cluster 0: all at once they would all join it; one after
    another cluster 0 stops attracting once it fills, and a pass in two batches carries
    the counts over (the same assignments as one batch)."""
    rng = np.random.default_rng(0)
    dist = 1.0 + 0.1 * rng.random((60, 3))
    dist[:, 0] = 0.5
    sizes = np.array([20.0, 20.0, 20.0])
    got, so_far = clustering.size_weighted_argmin(jnp.asarray(dist), jnp.asarray(sizes))
    want = sequential_reference(dist, sizes)
    np.testing.assert_array_equal(got, want)
    counts = np.bincount(want, minlength=3)
    assert counts.max() < 40 and counts[0] > counts[1:].max()
    np.testing.assert_array_equal(so_far.counts, counts)
    first, carried = clustering.size_weighted_argmin(jnp.asarray(dist[:25]), jnp.asarray(sizes))
    second, _ = clustering.size_weighted_argmin(
        jnp.asarray(dist[25:]), jnp.asarray(sizes), so_far=carried
    )
    np.testing.assert_array_equal(np.concatenate([first, second]), want)


def test_transform_rides_along_the_library_train_step():
    """make_train_step(per_example_stats=True) hands the step's statistics, computed with
    the clusters' centres, to the transform: the same state as the transform called by hand."""
    from jaxeff import train as jt

    model = MLP(nnx.Rngs(0))
    loss_fn, _ = as_params_loss(model)
    data = mlp_data(16)
    tx = optax.chain(clustering.gradient_clustering(loss_fn, data, num_clusters=4), optax.sgd(0.1))
    graphdef, state = jt.create_train_state(model, tx)
    step = jt.make_train_step(
        graphdef,
        lambda m, b, hparams: (xent(m, b), {}),
        tx,
        per_example_stats=True,
        directions_fn=lambda s: s.opt_state[0].clusters.centres,
        donate=False,
    )
    seeded, _, _ = step(state, data)
    after, _, stats = step(seeded, data)
    want, assignments = clustering.online_update(seeded.opt_state[0].clusters, stats, decay=0.9)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        after.opt_state[0].clusters,
        want,
    )
    np.testing.assert_array_equal(after.opt_state[0].assignments, assignments)


def dense_layers(framework, params):
    """``[(kernel path, bias path, kernel as (d_in, d_out), bias)]`` of an MLP's layers."""
    flat = dict(zip(pergrad.param_paths(params), jax.tree.leaves(params), strict=True))
    if framework == "linen":
        names = [(f"Dense_{i}/kernel", f"Dense_{i}/bias", False) for i in range(2)]
    else:  # equinox Linear: weight (d_out, d_in)
        names = [(f"layers/{i}/weight", f"layers/{i}/bias", True) for i in range(3)]
    out = []
    for kernel, bias, transposed in names:
        w = np.asarray(flat[kernel], np.float64)
        out.append((kernel, bias, w.T if transposed else w, np.asarray(flat[bias], np.float64)))
    return out


def numpy_factors(framework, params, batch, grads):
    """``{path: per-example factors}`` from a numpy forward pass and the brute-force
    gradients: a kernel's layer input and its bias gradient (in the kernel's axis order),
    a bias's gradient."""
    h = np.asarray(batch["x"], np.float64)
    layers = dense_layers(framework, params)
    out = {}
    for n, (kernel, bias, w, b) in enumerate(layers):
        parts = (h, grads[bias]) if framework == "linen" else (grads[bias], h)
        np.testing.assert_allclose(  # the kernel gradient is their outer product
            np.einsum("bi,bo->bio", *parts), grads[kernel], rtol=1e-4, atol=1e-6
        )
        out[kernel], out[bias] = parts, (grads[bias],)
        h = h @ w + b
        if n < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return out


def numpy_online_update(centres, sizes, factors, assignments, decay):
    """Loop reference of the online blend ``(β N_k f_k + (1−β) F_k) / (β N_k + (1−β) n_k)``."""
    k = len(sizes)
    counts = np.bincount(assignments, minlength=k).astype(np.float64)
    new_sizes = decay * sizes + (1 - decay) * counts
    new = {}
    for path, parts in centres.items():
        new[path] = []
        for j, old in enumerate(parts):
            old = np.asarray(old, np.float64)
            blended = old.copy()
            for c in range(k):
                total = sum(factors[path][j][i] for i in np.flatnonzero(assignments == c))
                if new_sizes[c] > 0:
                    blended[c] = (decay * sizes[c] * old[c] + (1 - decay) * total) / new_sizes[c]
            new[path].append(blended)
    return new, new_sizes


@pytest.mark.parametrize("framework", ["linen", "equinox"])
def test_gradient_clustering_of_linen_and_equinox_mlps_matches_brute_force(framework):
    """The transform on a flax linen and an equinox MLP: seeds at examples of one batch,
    then the distances of the next (every kernel and every bias) and its online update
    match brute-force per-example gradients with the centres formed densely."""
    loss_fn, params, make_batch = {"linen": linen_mlp, "equinox": equinox_mlp}[framework]()
    first, second = make_batch(20, seed=0), make_batch(20, seed=1)
    tx = clustering.gradient_clustering(loss_fn, first, num_clusters=4, decay=0.6)

    @jax.jit
    def step(opt_state, batch):
        _, grads, stats = pergrad.value_grad_and_stats(
            loss_fn, params, batch, directions=opt_state.clusters.centres
        )
        return tx.update(grads, opt_state, params, per_example_stats=stats)[1]

    seeded = step(tx.init(params), first)
    state = seeded.clusters
    grads = explicit_grads(loss_fn, params, first)
    assert set(state.centres) == set(grads)  # every kernel and bias is clustered
    dense = dense_centres(state.centres, grads)
    bias = next(p for p in grads if p.endswith("bias"))
    rows = [int(np.argmin(np.abs(grads[bias] - c).sum(1))) for c in dense[bias]]
    assert len(set(rows)) == 4
    for path, centre in dense.items():  # the seeds are the examples' gradients
        np.testing.assert_allclose(centre, grads[path][rows], rtol=1e-4, atol=1e-6)

    grads = explicit_grads(loss_fn, params, second)
    stats = pergrad.per_example_stats(loss_fn, params, second, directions=state.centres)
    want = explicit_distances(grads, state.centres)
    np.testing.assert_allclose(clustering.distances(state, stats), want, rtol=2e-4, atol=1e-5)

    sizes = np.asarray(state.sizes, np.float64)
    assignments = np.asarray(sequential_reference(want, sizes))
    centres, new_sizes = numpy_online_update(
        state.centres, sizes, numpy_factors(framework, params, second, grads), assignments, 0.6
    )
    moved = step(seeded, second)
    online, online_assignments = clustering.online_update(state, stats, decay=0.6)
    for got, got_assignments in [(moved.clusters, moved.assignments), (online, online_assignments)]:
        np.testing.assert_array_equal(got_assignments, assignments)
        np.testing.assert_allclose(got.sizes, new_sizes, rtol=1e-6)
        for path, parts in centres.items():
            for j, f in enumerate(parts):
                np.testing.assert_allclose(got.centres[path][j], f, rtol=1e-4, atol=1e-6)
