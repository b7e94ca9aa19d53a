"""Gradient clustering: distances, assignment, centre updates, passes, online mode, optax.

References are explicit per-example gradients (``vmap(grad)``) compared with explicit
centre matrices, and loop-based numpy versions of the update formulas.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
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


def mlp_data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 6)).astype(np.float32), "y": rng.integers(0, 3, n)}


def conv_data(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 4, 4, 2)).astype(np.float32), "y": rng.integers(0, 3, n)}


def explicit_grads(model, batch):
    """``{layer name: (kernel grads (B, d_in, d_out), bias grads (B, d_out) or None)}``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def one(params, example):
        m = nnx.merge(graphdef, params, rest)
        return xent(m, jax.tree.map(lambda x: x[None], example))[0]

    grads = pergrad.per_example_grads(one, params, batch)
    out = {}
    for name, (d_in, d_out) in clustering.cluster_layers(model).items():
        node = grads
        for part in name.split("/"):
            node = node[part]
        kernel = np.asarray(node["kernel"][...]).reshape(-1, d_in, d_out)
        bias = np.asarray(node["bias"][...]) if "bias" in node else None
        out[name] = (kernel, bias)
    return out


def explicit_distances(grads, state):
    """Loop reference: ``Σ_L ||g_{i,L} − C_{k,L}||²`` with the centre matrices formed."""
    some = next(iter(grads.values()))[0]
    n, k = some.shape[0], state.sizes.shape[0]
    d = np.zeros((n, k))
    for name, (kernel, bias) in grads.items():
        v, u = (np.asarray(x, np.float64) for x in state.centres[name])
        for i in range(n):
            for c in range(k):
                d[i, c] += np.sum((kernel[i] - np.outer(v[c], u[c])) ** 2)
                if bias is not None:
                    d[i, c] += np.sum((bias[i] - u[c]) ** 2)
    return d


def stats_for(model, batch, state):
    return pergrad.per_example_stats(model, xent, batch, directions=state.centres)


def random_state(model, k, seed=0, sizes=None):
    rng = np.random.default_rng(seed)
    centres = {
        name: (
            jnp.asarray(rng.normal(size=(k, d_in)), jnp.float32),
            jnp.asarray(rng.normal(size=(k, d_out)) * 0.3, jnp.float32),
        )
        for name, (d_in, d_out) in clustering.cluster_layers(model).items()
    }
    sizes = rng.integers(1, 20, k) if sizes is None else sizes
    return clustering.ClusterState(
        centres, jnp.asarray(sizes, jnp.float32), jnp.zeros((), jnp.int32)
    )


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_distances_match_explicit_gradients_and_centre_matrices(kind):
    model = MLP(nnx.Rngs(0)) if kind == "mlp" else ConvNet(nnx.Rngs(0))
    batch = mlp_data() if kind == "mlp" else conv_data()
    state = random_state(model, 4)
    got = np.asarray(clustering.distances(state, stats_for(model, batch, state)))
    want = explicit_distances(explicit_grads(model, batch), state)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_factors_are_mean_input_and_summed_signal(kind):
    """``s_i`` is the bias gradient; for Dense ``ā_i s_iᵀ`` is the kernel gradient, for Conv
    ``ā_i`` is the mean over positions of the unfolded input patches."""
    model = MLP(nnx.Rngs(1)) if kind == "mlp" else ConvNet(nnx.Rngs(1))
    batch = mlp_data() if kind == "mlp" else conv_data()
    shapes = clustering.cluster_layers(model)
    stats = pergrad.per_example_stats(
        model, xent, batch, directions=clustering.zero_directions(shapes, 1)
    )
    grads = explicit_grads(model, batch)
    factors = {clustering.layer_name(p): f for p, f in stats.factors.items()}
    assert set(factors) == set(shapes)
    for name, (kernel, bias) in grads.items():
        a, s = (np.asarray(x) for x in factors[name])
        if bias is not None:
            np.testing.assert_allclose(s, bias, rtol=1e-5, atol=1e-6)
        if kind == "mlp":
            np.testing.assert_allclose(np.einsum("bi,bo->bio", a, s), kernel, atol=1e-5)
    if kind == "conv":  # loop reference: mean over the 4x4 positions of each 3x3 patch
        padded = np.pad(batch["x"], [(0, 0), (1, 1), (1, 1), (0, 0)])
        want = np.zeros((12, 18))
        for dy in range(3):
            for dx in range(3):
                for c in range(2):
                    want[:, (dy * 3 + dx) * 2 + c] = padded[:, dy : dy + 4, dx : dx + 4, c].mean(
                        (1, 2)
                    )
        np.testing.assert_allclose(factors["conv"][0], want, atol=1e-6)


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
    model = MLP(nnx.Rngs(0))
    batch = mlp_data(40)
    state = random_state(model, 5, sizes=[1.0, 30.0, 2.0, 8.0, 0.0])
    got, dist = clustering.assign(state, stats_for(model, batch, state))
    dist = np.asarray(dist, np.float64)
    np.testing.assert_array_equal(got, sequential_reference(dist, np.asarray(state.sizes)))
    plain, _ = clustering.assign(state, stats_for(model, batch, state), size_weighted=False)
    np.testing.assert_array_equal(plain, dist.argmin(1))
    assert not np.array_equal(plain, got)  # the weighting changes the assignment here


def numpy_sums(factors, assignments, dist, k, mask):
    counts = np.zeros(k)
    sums = {
        name: (np.zeros((k, a.shape[1])), np.zeros((k, s.shape[1])))
        for name, (a, s) in factors.items()
    }
    far = np.full(k, -np.inf)
    far_rows = {}
    distortion = np.zeros(k)
    for i, c in enumerate(assignments):
        if not mask[i]:
            continue
        counts[c] += 1
        distortion[c] += dist[i, c]
        for name, (a, s) in factors.items():
            sums[name][0][c] += a[i]
            sums[name][1][c] += s[i]
        if dist[i, c] > far[c]:
            far[c], far_rows[c] = dist[i, c], i
    return counts, sums, distortion, far, far_rows


def test_cluster_sums_and_batch_update_match_loop_reference():
    model = MLP(nnx.Rngs(0))
    batch = mlp_data(30)
    state = random_state(model, 4, sizes=[5.0, 5.0, 5.0, 5.0])
    stats = stats_for(model, batch, state)
    assignments, dist = clustering.assign(state, stats)
    mask = np.ones(30, bool)
    mask[-3:] = False
    sums = clustering.cluster_sums(state, stats, assignments, dist, mask=mask)
    factors = {
        clustering.layer_name(p): tuple(np.asarray(x) for x in f) for p, f in stats.factors.items()
    }
    counts, ref, distortion, far, far_rows = numpy_sums(
        factors, np.asarray(assignments), np.asarray(dist), 4, mask
    )
    np.testing.assert_allclose(sums.counts, counts)
    np.testing.assert_allclose(sums.distortion, distortion, rtol=1e-5)
    np.testing.assert_allclose(sums.far_distance, far, rtol=1e-6)
    new = clustering.batch_update(state, sums, min_fraction=0.0)
    for name, (a_sum, s_sum) in ref.items():
        np.testing.assert_allclose(sums.input_sums[name], a_sum, rtol=1e-5, atol=1e-6)
        for c in range(4):
            if counts[c]:
                np.testing.assert_allclose(
                    new.centres[name][0][c], a_sum[c] / counts[c], rtol=1e-5, atol=1e-6
                )
                np.testing.assert_allclose(
                    new.centres[name][1][c], s_sum[c] / counts[c], rtol=1e-5, atol=1e-6
                )
                np.testing.assert_allclose(
                    sums.far_inputs[name][c], factors[name][0][far_rows[c]], atol=1e-6
                )
    np.testing.assert_allclose(new.sizes, counts)
    assert int(new.count) == 1


def test_sums_over_batches_add_up_to_one_batch():
    model = MLP(nnx.Rngs(0))
    data = mlp_data(36)
    state = random_state(model, 3)
    whole, _ = clustering.clustering_pass(model, xent, [data], state)
    parts = [jax.tree.map(lambda x, s=s: x[s : s + 12], data) for s in (0, 12, 24)]
    split, assignments = clustering.clustering_pass(model, xent, parts, state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), whole, split)
    assert assignments.shape == (36,)
    # A padded last batch with its mask gives the same pass.
    padded = {k: np.concatenate([v[24:], v[:4]]) for k, v in data.items()}
    padded["mask"] = np.arange(16) < 12
    masked, masked_assignments = clustering.clustering_pass(
        model, xent, [parts[0], parts[1], padded], state
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), whole, masked)
    np.testing.assert_array_equal(masked_assignments, assignments)


def test_small_cluster_is_reseeded_at_farthest_member_of_highest_distortion_cluster():
    model = MLP(nnx.Rngs(0))
    data = mlp_data(40)
    state = random_state(model, 4, seed=1, sizes=[10.0, 10.0, 10.0, 10.0])
    stats = stats_for(model, data, state)
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
        for name in state.centres:
            np.testing.assert_allclose(new.centres[name][0][k], sums.far_inputs[name][j])
        assert float(new.sizes[k]) == pytest.approx(counts[j] / 2)
        assert float(new.sizes[j]) == pytest.approx(counts[j] / 2)


def test_online_update_matches_moving_average_formula():
    model = MLP(nnx.Rngs(0))
    data = mlp_data(32)
    state = random_state(model, 3, sizes=[4.0, 0.0, 9.0])
    stats = stats_for(model, data, state)
    new, assignments = clustering.online_update(state, stats, decay=0.75)
    sums = clustering.cluster_sums(state, stats, *clustering.assign(state, stats))
    sizes, counts = np.asarray(state.sizes), np.asarray(sums.counts)
    np.testing.assert_allclose(new.sizes, 0.75 * sizes + 0.25 * counts, rtol=1e-6)
    for name, (v, _) in state.centres.items():
        for c in range(3):
            total = 0.75 * sizes[c] + 0.25 * counts[c]
            if total == 0:
                np.testing.assert_allclose(new.centres[name][0][c], v[c])
                continue
            want = (
                0.75 * sizes[c] * np.asarray(v[c]) + 0.25 * np.asarray(sums.input_sums[name][c])
            ) / total
            np.testing.assert_allclose(new.centres[name][0][c], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(assignments, clustering.assign(state, stats)[0])


def duplicated_data(groups=6, copies=8, seed=0):
    base = mlp_data(groups, seed)
    return {k: np.repeat(v, copies, axis=0) for k, v in base.items()}, groups


def test_batch_mode_separates_exact_duplicates():
    """On groups of identical examples the clusters end up pure and the distortion 0."""
    model = MLP(nnx.Rngs(0))
    data, groups = duplicated_data()
    state = clustering.init_clusters(model, xent, data, num_clusters=groups, key=jax.random.key(3))
    for _ in range(6):
        state, assignments = clustering.clustering_pass(
            model, xent, [data], state, min_fraction=0.5 / groups
        )
    _, assignments = clustering.clustering_pass(model, xent, [data], state)
    per_group = assignments.reshape(groups, -1)
    assert all(len(set(row)) == 1 for row in per_group)
    assert len(set(per_group[:, 0])) == groups
    stats = stats_for(model, data, state)
    dist = clustering.distances(state, stats)
    own = np.asarray(dist)[np.arange(len(assignments)), assignments]
    assert own.max() < 1e-6 * float(jnp.mean(stats.total_sq_norms))


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_pass_on_sharded_batch_equals_unsharded(axis_type):
    model = MLP(nnx.Rngs(0))
    data = mlp_data(32)
    state = random_state(model, 4)
    want, want_assign = clustering.clustering_pass(model, xent, [data], state)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    sharded = jax.device_put(data, NamedSharding(mesh, PartitionSpec("data")))
    with jax.set_mesh(mesh):
        got, got_assign = clustering.clustering_pass(model, xent, [sharded], state)
        online, _ = jax.jit(clustering.online_update)(state, stats_for(model, sharded, state))
    np.testing.assert_array_equal(got_assign, want_assign)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
    ref, _ = clustering.online_update(state, stats_for(model, data, state))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), online, ref)


def test_state_checkpoints_and_restores_bit_exactly(tmp_path):
    model = MLP(nnx.Rngs(0))
    state = clustering.init_clusters(
        model, xent, mlp_data(16), num_clusters=4, key=jax.random.key(0)
    )
    state, _ = clustering.clustering_pass(model, xent, [mlp_data(16)], state)
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


def test_init_seeds_distinct_examples_deterministically():
    model = MLP(nnx.Rngs(0))
    data = mlp_data(20)
    a = clustering.init_clusters(model, xent, data, num_clusters=5, key=jax.random.key(1))
    b = clustering.init_clusters(model, xent, data, num_clusters=5, key=jax.random.key(1))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    grads = explicit_grads(model, data)
    bias = grads["fc2"][1]
    u = np.asarray(a.centres["fc2"][1])
    rows = [int(np.argmin(np.abs(bias - row).sum(1))) for row in u]
    assert len(set(rows)) == 5
    np.testing.assert_allclose(u, bias[rows], atol=1e-6)


def test_optax_transform_seeds_then_updates_online_and_passes_updates_through():
    model = MLP(nnx.Rngs(0))
    data = mlp_data(16)
    gc = clustering.gradient_clustering(model, num_clusters=4, batch_size=16, decay=0.5)
    tx = optax.chain(gc, optax.sgd(0.1))
    params = nnx.state(model, nnx.Param)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        m = nnx.merge(nnx.graphdef(model), params)
        loss, grads, stats = pergrad.value_grad_and_stats(
            m, xent, batch, directions=opt_state[0].clusters.centres
        )
        updates, opt_state = tx.update(grads, opt_state, params, per_example_stats=stats)
        return grads, updates, opt_state, stats

    grads, updates, opt_state, _ = step(params, opt_state, data)
    jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -0.1 * g, rtol=1e-6), updates, grads)
    first = opt_state[0]
    assert int(first.clusters.count) == 1
    np.testing.assert_array_equal(first.assignments, -np.ones(16))
    _, _, opt_state, stats = step(params, opt_state, data)
    want, want_assign = clustering.online_update(first.clusters, stats, decay=0.5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), opt_state[0].clusters, want
    )
    np.testing.assert_array_equal(opt_state[0].assignments, want_assign)
    assert step._cache_size() == 1


def test_bad_input_names_the_argument():
    model = MLP(nnx.Rngs(0))
    data = mlp_data(8)
    with pytest.raises(ValueError, match="num_clusters"):
        clustering.init_clusters(model, xent, data, num_clusters=0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="at least `num_clusters`"):
        clustering.init_clusters(model, xent, data, num_clusters=9, key=jax.random.key(0))
    with pytest.raises(ValueError, match="`layers` names 'nope'"):
        clustering.cluster_layers(model, ["nope"])
    state = random_state(model, 2)
    stats = pergrad.per_example_stats(model, xent, data)
    with pytest.raises(ValueError, match="directions=state.centres"):
        clustering.assign(state, stats)
    with pytest.raises(ValueError, match="`decay`"):
        clustering.online_update(state, stats_for(model, data, state), decay=1.0)
    with pytest.raises(ValueError, match="`min_fraction`"):
        clustering.clustering_pass(model, xent, [data], state, min_fraction=-0.1)
    with pytest.raises(ValueError, match="`batches` is empty"):
        clustering.clustering_pass(model, xent, [], state)
    with pytest.raises(ValueError, match="`batch_size`"):
        clustering.gradient_clustering(model, num_clusters=4, batch_size=2)
    gc = clustering.gradient_clustering(model, num_clusters=2, batch_size=8)
    with pytest.raises(ValueError, match="per_example_stats"):
        gc.update({}, gc.init(None))


def test_add_sums_of_parts_equals_sums_of_whole_batch():
    model = MLP(nnx.Rngs(0))
    data = mlp_data(30)
    state = random_state(model, 3)

    def sums_of(batch):
        stats = stats_for(model, batch, state)
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
    data = mlp_data(16)
    tx = optax.chain(
        clustering.gradient_clustering(model, num_clusters=4, batch_size=16), optax.sgd(0.1)
    )
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
