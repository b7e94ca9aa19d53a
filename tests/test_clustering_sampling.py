"""jaxeff.clustering sampling: stratified and importance samplers, JAX and host-side.

Unbiasedness and variance are checked by Monte Carlo against the exact formulas, with
tolerances of a few standard errors (computed from the exact or measured variance) and
fixed seeds; weights and allocations against loops in numpy.
"""

import functools

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxeff import gvar
from jaxeff import train as jt
from jaxeff.clustering.samplers import ImportanceSampler, StratifiedSampler, weighted_batches
from jaxeff.clustering.sampling import (
    importance_probabilities,
    importance_sample,
    importance_variance,
    slots_per_cluster,
    stratified_sample,
    stratified_variance,
    stratified_weights,
)

# Clusters of sizes 15, 10, 8, 4, 2, 1 and an empty one (K = 7, K' = 6), shuffled.
SIZES = (15, 10, 8, 4, 2, 1, 0)
K = len(SIZES)
N = sum(SIZES)


def cluster_ids(seed=0):
    ids = np.repeat(np.arange(K), SIZES).astype(np.int32)
    return np.random.default_rng(seed).permutation(ids)


def vectors(seed=1, d=3):
    """Per-example vectors with cluster-dependent means, so clusters matter."""
    rng = np.random.default_rng(seed)
    ids = cluster_ids()
    return (rng.normal(size=(K, d))[ids] * 2 + rng.normal(size=(N, d))).astype(np.float32)


def reference_weights(assignments, indices):
    """Loop: w_j = N_k / (N n_k), n_k the number of slots of cluster k in the sample."""
    assignments, indices = np.asarray(assignments), np.asarray(indices)
    size = len(assignments)
    weights = []
    for i in indices:
        k = assignments[i]
        cluster_size = sum(1 for a in assignments if a == k)
        draws = sum(1 for j in indices if assignments[j] == k)
        weights.append(cluster_size / (size * draws))
    return np.array(weights)


def estimates(samples, x):
    """Σ_j w_j x_{i_j} for each draw (rows of ``samples``), in float64."""
    indices, weights = np.asarray(samples.indices), np.asarray(samples.weights, np.float64)
    return np.einsum("mb,mbd->md", weights, np.asarray(x, np.float64)[indices])


def assert_unbiased_with_variance(est, x, per_coordinate_variance, variance, z=5.0):
    """Mean within ``z`` standard errors per coordinate; E||est - μ||² = V likewise."""
    mean = np.asarray(x, np.float64).mean(axis=0)
    draws = len(est)
    errors = (est.mean(axis=0) - mean) / np.sqrt(np.asarray(per_coordinate_variance) / draws)
    assert np.max(np.abs(errors)) < z, errors
    squared = np.sum((est - mean) ** 2, axis=1)
    stderr = squared.std() / np.sqrt(draws)
    assert abs(squared.mean() - variance) < z * stderr, (squared.mean(), variance, stderr)


# ============================================================ stratified (JAX)
@pytest.mark.parametrize(
    ("allocation", "replace", "batch_size"),
    [
        ("equal", True, 24),  # n_k = 4: more than the clusters of 2 and 1 hold
        ("equal", False, 24),
        ("proportional", True, 24),
        ("proportional", False, 24),
        ("proportional", False, 3),  # 3 < K' = 6: three clusters drawn at random
    ],
)
def test_stratified_unbiased_and_exact_variance(allocation, replace, batch_size):
    assignments, x = cluster_ids(), vectors()
    options = dict(num_clusters=K, batch_size=batch_size, allocation=allocation, replace=replace)
    draw = jax.jit(jax.vmap(lambda key, a: stratified_sample(key, a, **options), (0, None)))
    samples = draw(jax.random.split(jax.random.key(0), 20_000), assignments)
    variance = float(stratified_variance(x, assignments, **options))
    per_coordinate = [
        float(stratified_variance(x[:, c : c + 1], assignments, **options)) for c in range(3)
    ]
    assert np.isclose(sum(per_coordinate), variance, rtol=1e-5)
    assert_unbiased_with_variance(estimates(samples, x), x, per_coordinate, variance)
    if batch_size >= K - 1:  # every non-empty cluster in every draw, n_k per allocation
        options.pop("replace")
        slots = np.asarray(slots_per_cluster(assignments, **options)[assignments])
        for indices, weights in zip(samples.indices[:50], samples.weights[:50], strict=True):
            np.testing.assert_allclose(weights, reference_weights(assignments, indices), rtol=1e-6)
            counts = np.bincount(assignments[np.asarray(indices)], minlength=K)
            np.testing.assert_array_equal(counts[assignments], slots)


def test_stratified_variance_is_sgd_for_one_cluster_and_below_it_with_clusters():
    x = vectors()
    sgd = np.sum(np.var(np.asarray(x, np.float64), axis=0)) / 6
    one = stratified_variance(x, np.zeros(N, np.int32), num_clusters=1, batch_size=6)
    np.testing.assert_allclose(float(one), sgd, rtol=1e-5)
    clustered = stratified_variance(x, cluster_ids(), num_clusters=K, batch_size=6)
    assert float(clustered) < 0.75 * sgd


def test_stratified_variance_without_replacement_matches_hand_formula():
    # cluster sizes 3 and 5, 4 slots each: n_0 = 4 > N_0 = 3 (one cycle + 1), n_1 = 4 < 5
    a = np.array([0, 1, 0, 1, 1, 0, 1, 1], np.int32)
    x = np.arange(8.0)[:, None] ** 2
    var = lambda v: np.var(v)  # σ_k², mean squared deviation
    v0, v1 = var(x[a == 0, 0]), var(x[a == 1, 0])
    expected = (3 / (8 * 4)) ** 2 * 1 * (3 - 1) / (3 - 1) * v0
    expected += (5 / 8) ** 2 * v1 / 4 * (5 - 4) / (5 - 1)
    got = stratified_variance(x, a, num_clusters=2, batch_size=8, replace=False)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_slots_per_cluster_allocations():
    a = cluster_ids()
    equal = np.asarray(slots_per_cluster(a, num_clusters=K, batch_size=20))
    np.testing.assert_array_equal(equal, [4, 4, 3, 3, 3, 3, 0])  # 20 = 6·3 + 2
    prop = np.asarray(
        slots_per_cluster(a, num_clusters=K, batch_size=20, allocation="proportional")
    )
    assert prop.sum() == 20 and np.all(prop[:6] >= 1) and prop[6] == 0
    # b = 80: every b N_k / N >= 1, so n_k is b N_k / N up to rounding
    prop = np.asarray(
        slots_per_cluster(a, num_clusters=K, batch_size=80, allocation="proportional")
    )
    target = 80 * np.array(SIZES) / N
    assert prop.sum() == 80 and np.max(np.abs(prop - target)) < 1
    assert not np.any(slots_per_cluster(a, num_clusters=K, batch_size=5))  # 5 < K'


def test_duplicate_clusters_give_zero_variance_and_sgd_does_not():
    rng = np.random.default_rng(3)
    a = cluster_ids()
    x = rng.normal(size=(K, 4)).astype(np.float32)[a]  # every cluster: identical rows
    keys = jax.random.split(jax.random.key(1), 500)
    strat = jax.jit(jax.vmap(lambda k: stratified_sample(k, a, num_clusters=K, batch_size=12)))(
        keys
    )
    est = estimates(strat, x)
    np.testing.assert_allclose(
        est, np.broadcast_to(x.astype(np.float64).mean(0), est.shape), atol=1e-5
    )
    assert float(stratified_variance(x, a, num_clusters=K, batch_size=12)) < 1e-10
    sgd = jax.jit(jax.vmap(lambda k: gvar.uniform_sample(k, N, 12)))(keys)
    assert np.sum(np.var(estimates(sgd, x), axis=0)) > 0.1


def test_stratified_weights_against_loop():
    a = cluster_ids()
    indices = np.random.default_rng(0).integers(0, N, 17)
    np.testing.assert_allclose(
        stratified_weights(a, indices, num_clusters=K),
        reference_weights(a, indices),
        rtol=1e-6,
    )


def test_stratified_sample_deterministic_and_compiled_once():
    traces = []

    @functools.partial(jax.jit, static_argnames=("replace",))
    def draw(key, a, replace):
        traces.append(1)
        return stratified_sample(key, a, num_clusters=K, batch_size=9, replace=replace)

    a = cluster_ids()
    first = draw(jax.random.key(5), a, True)
    again = draw(jax.random.key(5), a, True)
    np.testing.assert_array_equal(first.indices, again.indices)
    np.testing.assert_array_equal(first.weights, again.weights)
    other = draw(jax.random.key(6), cluster_ids(seed=1), True)
    assert not np.array_equal(first.indices, other.indices)
    assert len(traces) == 1
    eager = stratified_sample(jax.random.key(5), a, num_clusters=K, batch_size=9)
    np.testing.assert_array_equal(eager.indices, first.indices)


def test_traced_invalid_inputs_give_nan_weights():
    bad = cluster_ids().copy()
    bad[3] = K
    sample = jax.jit(
        lambda a: stratified_sample(jax.random.key(0), a, num_clusters=K, batch_size=8)
    )(bad)
    assert np.all(np.isnan(sample.weights))
    scores = np.ones(N, np.float32)
    scores[2] = -1.0
    sample = jax.jit(lambda s: importance_sample(jax.random.key(0), s, batch_size=4))(scores)
    assert np.all(np.isnan(sample.weights))


def test_sampling_estimator_with_stratified_sample():
    """The gvar suite's estimator: E[ĝ] is the full gradient (here linear: exact mean)."""
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(N, 3)).astype(np.float32)}
    loss_fn = lambda w, batch: batch["x"] @ w  # gradient of example i: x_i
    est = gvar.sampling_estimator(
        loss_fn,
        lambda a, key, size: stratified_sample(key, a, num_clusters=K, batch_size=12),
        init_fn=lambda params, data: jnp.asarray(cluster_ids()),
    )
    state = est.init(jnp.zeros(3), data)
    keys = jax.random.split(jax.random.key(0), 4000)
    grads = jax.jit(jax.vmap(lambda k: est.estimate(state, jnp.zeros(3), data, k)[0]))(keys)
    per_coordinate = [
        float(
            stratified_variance(
                data["x"][:, c : c + 1], cluster_ids(), num_clusters=K, batch_size=12
            )
        )
        for c in range(3)
    ]
    errors = (np.mean(grads, 0) - data["x"].mean(0)) / np.sqrt(np.array(per_coordinate) / 4000)
    assert np.max(np.abs(errors)) < 5


# ============================================================ importance (JAX)
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_importance_unbiased_and_exact_variance(smoothing):
    rng = np.random.default_rng(2)
    x = vectors()
    scores = rng.uniform(0.1, 2.0, size=N).astype(np.float32)
    if smoothing:
        scores[:5] = 0.0  # never drawn by scores alone; λ keeps them
    draw = jax.jit(
        jax.vmap(lambda k, s: importance_sample(k, s, batch_size=5, smoothing=smoothing), (0, None))
    )
    samples = draw(jax.random.split(jax.random.key(0), 20_000), scores)
    options = dict(batch_size=5, smoothing=smoothing)
    variance = float(importance_variance(x, scores, **options))
    per_coordinate = [
        float(importance_variance(x[:, c : c + 1], scores, **options)) for c in range(3)
    ]
    assert_unbiased_with_variance(estimates(samples, x), x, per_coordinate, variance)
    # weights: loop reference 1 / (N b p_i), p_i = (1-λ) s_i / Σ s + λ / N
    total = float(np.sum(scores, dtype=np.float64))
    for i, w in zip(samples.indices[0], samples.weights[0], strict=True):
        p = (1 - smoothing) * scores[i] / total + smoothing / N
        np.testing.assert_allclose(w, 1 / (N * 5 * p), rtol=1e-5)


def test_importance_norm_proportional_is_exact_for_aligned_vectors():
    rng = np.random.default_rng(0)
    lengths = rng.uniform(0.5, 3.0, size=N).astype(np.float32)
    x = lengths[:, None] * np.array([[0.6, -0.8]], np.float32)
    samples = jax.jit(jax.vmap(lambda k: importance_sample(k, lengths, batch_size=3)))(
        jax.random.split(jax.random.key(0), 200)
    )
    est = estimates(samples, x)
    np.testing.assert_allclose(est, np.broadcast_to(x.mean(0), est.shape), rtol=1e-5)
    assert abs(float(importance_variance(x, lengths, batch_size=3))) < 1e-5


def test_importance_zero_scores_are_uniform():
    probs = importance_probabilities(np.zeros(N, np.float32))
    np.testing.assert_allclose(probs, np.full(N, 1 / N), rtol=1e-6)
    sample = importance_sample(jax.random.key(0), np.zeros(N, np.float32), batch_size=4)
    np.testing.assert_allclose(sample.weights, 0.25, rtol=1e-6)


# ============================================================ bad input (JAX)
@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: stratified_sample(
                jax.random.key(0), np.array([0, 7]), num_clusters=K, batch_size=2
            ),
            "assignments",
        ),
        (
            lambda: stratified_sample(
                jax.random.key(0), np.array([-1, 0]), num_clusters=K, batch_size=2
            ),
            "assignments",
        ),
        (
            lambda: stratified_sample(
                jax.random.key(0), np.array([0.0, 1.0]), num_clusters=K, batch_size=2
            ),
            "assignments",
        ),
        (
            lambda: stratified_sample(
                jax.random.key(0), np.zeros((2, 2), int), num_clusters=K, batch_size=2
            ),
            "assignments",
        ),
        (
            lambda: stratified_sample(
                jax.random.key(0), np.zeros(4, int), num_clusters=K, batch_size=0
            ),
            "batch_size",
        ),
        (
            lambda: stratified_sample(
                jax.random.key(0), np.zeros(4, int), num_clusters=0, batch_size=2
            ),
            "num_clusters",
        ),
        (
            lambda: stratified_sample(
                jax.random.key(0), np.zeros(4, int), num_clusters=2, batch_size=2, allocation="size"
            ),
            "allocation",
        ),
        (
            lambda: stratified_variance(
                np.zeros((3, 2)), np.zeros(4, int), num_clusters=2, batch_size=2
            ),
            "x",
        ),
        (lambda: stratified_weights(np.zeros(4, int), np.array([4]), num_clusters=2), "indices"),
        (
            lambda: importance_sample(jax.random.key(0), np.array([1.0, -0.5]), batch_size=2),
            "scores",
        ),
        (
            lambda: importance_sample(jax.random.key(0), np.array([1.0, np.nan]), batch_size=2),
            "scores",
        ),
        (lambda: importance_sample(jax.random.key(0), np.ones(3), batch_size=0), "batch_size"),
        (
            lambda: importance_sample(jax.random.key(0), np.ones(3), batch_size=2, smoothing=1.5),
            "smoothing",
        ),
    ],
)
def test_bad_input_raises_naming_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# ============================================================ host samplers
def stratified(**kwargs):
    options = dict(batch_size=8, num_clusters=K, seed=7)
    sampler = StratifiedSampler(N, **{**options, **kwargs})
    sampler.update(cluster_ids())
    return sampler


@pytest.mark.parametrize(
    ("allocation", "replace", "batch_size"),
    [("equal", False, 24), ("proportional", True, 24), ("equal", True, 3)],
)
def test_host_stratified_unbiased_and_exact_variance(allocation, replace, batch_size):
    x = vectors()
    sampler = stratified(allocation=allocation, replace=replace, batch_size=batch_size)
    batches = [sampler.batch(t) for t in range(4000)]
    samples = gvar.Sample(*map(np.stack, zip(*batches, strict=True)))
    options = dict(num_clusters=K, batch_size=batch_size, allocation=allocation, replace=replace)
    variance = float(stratified_variance(x, cluster_ids(), **options))
    per_coordinate = [
        float(stratified_variance(x[:, c : c + 1], cluster_ids(), **options)) for c in range(3)
    ]
    assert_unbiased_with_variance(estimates(samples, x), x, per_coordinate, variance)
    if batch_size >= K - 1:
        for indices, weights in batches[:20]:
            np.testing.assert_allclose(
                weights, reference_weights(cluster_ids(), indices), rtol=1e-6
            )


def test_host_importance_unbiased_with_partly_scored_examples():
    rng = np.random.default_rng(4)
    x = vectors()
    sampler = ImportanceSampler(N, batch_size=6, seed=3, smoothing=0.2)
    seen = np.arange(0, N, 3)
    sampler.update(rng.uniform(0.2, 3.0, size=len(seen)), seen)
    scores = sampler.scores  # unscored examples stand at the mean known score
    known = scores[seen].astype(np.float64).mean()
    np.testing.assert_allclose(np.delete(scores, seen), known, rtol=1e-6)
    batches = [sampler.batch(t) for t in range(4000)]
    samples = gvar.Sample(*map(np.stack, zip(*batches, strict=True)))
    options = dict(batch_size=6, smoothing=0.2)
    variance = float(importance_variance(x, scores, **options))
    per_coordinate = [
        float(importance_variance(x[:, c : c + 1], scores, **options)) for c in range(3)
    ]
    assert_unbiased_with_variance(estimates(samples, x), x, per_coordinate, variance)
    probs = np.asarray(importance_probabilities(scores, smoothing=0.2), np.float64)
    for indices, weights in batches[:20]:
        np.testing.assert_allclose(weights, 1 / (N * 6 * probs[indices]), rtol=1e-5)


def test_host_importance_starts_uniform_and_all_zero_is_uniform():
    sampler = ImportanceSampler(N, batch_size=4, seed=0)
    np.testing.assert_allclose(sampler.batch(0).weights, 0.25)
    sampler.update(np.zeros(N))
    np.testing.assert_allclose(sampler.batch(1).weights, 0.25)
    sampler.update([5.0], [11])  # one positive score, no smoothing: only example 11
    np.testing.assert_array_equal(sampler.batch(2).indices, [11] * 4)
    np.testing.assert_allclose(sampler.batch(2).weights, 1 / (4 * N))


def test_record_stream_and_grain_dataloader_read_the_batches():
    source = [{"x": np.float32([i, -i]), "id": np.int32(i)} for i in range(N)]
    for shards in (1, 2):
        for index in range(shards):
            shard = grain.sharding.ShardOptions(index, shards)
            sampler = stratified(shard_options=shard)
            local = 8 // shards
            for record in (0, 5, 17, 42):
                global_record = record * shards + index
                meta = sampler[global_record]
                step, slot = divmod(record, local)
                assert meta.index == global_record
                assert meta.record_key == sampler.batch(step).indices[slot]
            loader = grain.DataLoader(
                data_source=source,
                sampler=sampler,
                operations=[grain.transforms.Batch(local)],
                worker_count=0,
            )
            for step, batch in zip(range(3), loader, strict=False):
                np.testing.assert_array_equal(batch["id"], sampler.batch(step).indices)
    with pytest.raises(IndexError, match="shard"):
        stratified(shard_options=grain.sharding.ShardOptions(1, 2))[0]


def test_update_takes_effect_from_the_next_batch():
    sampler = stratified()
    first = sampler.batch(0)
    sampler.update(np.full(N, 2, np.int32))  # one cluster: uniform weights 1/b
    np.testing.assert_array_equal(sampler.batch(0).indices, first.indices)  # already drawn
    np.testing.assert_allclose(sampler.batch(1).weights, 1 / 8)
    # partial updates: only the given examples move; repeated index: the last wins
    sampler.update([0, 5, 1], [3, 4, 3])
    expected = np.full(N, 2)
    expected[3], expected[4] = 1, 5
    np.testing.assert_array_equal(sampler.assignments, expected)
    np.testing.assert_array_equal(sampler.cluster_sizes, np.bincount(expected, minlength=K))
    weights = sampler.batch(2).weights
    np.testing.assert_allclose(
        weights, reference_weights(expected, sampler.batch(2).indices), rtol=1e-6
    )
    assert sampler.next_step == 3


def random_updates(sampler, step, rng):
    indices = rng.integers(0, N, 6)
    if isinstance(sampler, StratifiedSampler):
        sampler.update(rng.integers(0, K, 6), indices)
    else:
        sampler.update(rng.uniform(0, 2, 6), indices)


@pytest.mark.parametrize("kind", ["stratified", "importance"])
def test_state_round_trips_through_orbax_and_resumes_exactly(kind, tmp_path):
    make = {
        "stratified": lambda: StratifiedSampler(
            N, batch_size=8, num_clusters=K, seed=9, replace=False
        ),
        "importance": lambda: ImportanceSampler(N, batch_size=8, seed=9, smoothing=0.1),
    }[kind]
    run = make()
    batches, saved = [], None
    for step in range(10):
        batches.append(run.batch(step))
        random_updates(run, step, np.random.default_rng(step))
        if step == 4:
            saved = run.get_state()
            with jt.Checkpointer(tmp_path, async_save=False) as ckpt:
                ckpt.save(step, {"sampler": saved})
    with jt.Checkpointer(tmp_path, async_save=False) as ckpt:
        restored, _ = ckpt.restore({"sampler": make().get_state()})
    for name, value in saved.items():
        got = np.asarray(restored["sampler"][name])
        assert got.dtype == value.dtype and np.array_equal(got, value), name
    resumed = make()
    resumed.set_state(restored["sampler"])
    assert resumed.next_step == 5
    for step in range(5, 10):
        again = resumed.batch(step)
        np.testing.assert_array_equal(again.indices, batches[step].indices)
        np.testing.assert_array_equal(again.weights, batches[step].weights)
        random_updates(resumed, step, np.random.default_rng(step))


def test_set_state_refuses_other_seed_and_broken_positions():
    state = stratified().get_state()
    with pytest.raises(ValueError, match="seed"):
        stratified(seed=8).set_state(state)
    state["positions"] = np.zeros(N, np.int32)
    with pytest.raises(ValueError, match="positions"):
        stratified().set_state(state)
    with pytest.raises(ValueError, match="state"):
        stratified().set_state({"seed": np.uint32(7)})


@pytest.mark.parametrize("kind", ["stratified", "importance"])
def test_process_shares_make_up_the_global_batch(kind):
    def make(shard):
        if kind == "stratified":
            return stratified(batch_size=12, shard_options=shard)
        sampler = ImportanceSampler(N, batch_size=12, seed=7, shard_options=shard)
        sampler.update(np.arange(N, dtype=np.float32))
        return sampler

    whole = make(grain.sharding.NoSharding())
    shares = [make(grain.sharding.ShardOptions(p, 4)) for p in range(4)]
    for step in range(3):
        parts = [s.batch(step) for s in shares]
        assert all(len(p.indices) == 3 for p in parts)
        np.testing.assert_array_equal(
            np.concatenate([p.indices for p in parts]), whole.batch(step).indices
        )
        np.testing.assert_array_equal(
            np.concatenate([p.weights for p in parts]), whole.batch(step).weights
        )
        np.testing.assert_array_equal(
            shares[1].global_batch(step).indices, whole.batch(step).indices
        )


def test_weighted_batches_read_records_and_resume_at_the_saved_step():
    source = [{"x": np.float32([i, 2 * i]), "label": np.int32(i % 3)} for i in range(N)]
    sampler = stratified()
    stream = weighted_batches(source, sampler)
    for step in range(3):
        batch = next(stream)
        sample = sampler.batch(step)
        np.testing.assert_array_equal(batch["indices"], sample.indices)
        np.testing.assert_array_equal(batch["weights"], sample.weights)
        assert batch["weights"].dtype == np.float32
        np.testing.assert_array_equal(batch["x"][:, 0], sample.indices)
        np.testing.assert_array_equal(batch["label"], sample.indices % 3)
        sampler.update(np.arange(8) % 2, sample.indices)
    resumed = stratified()
    resumed.set_state(sampler.get_state())
    np.testing.assert_array_equal(
        next(weighted_batches(source, resumed))["indices"], next(stream)["indices"]
    )
    with pytest.raises(ValueError, match="source"):
        weighted_batches(source[:-1], sampler)
    with pytest.raises(ValueError, match="reserved"):
        next(weighted_batches([{"weights": np.float32(1)}] * N, sampler))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: stratified().update(np.full(N, K)), "assignments"),
        (lambda: stratified().update(np.zeros(N, np.float32)), "assignments"),
        (lambda: stratified().update(np.zeros(N - 1, np.int32)), "assignments"),
        (lambda: stratified().update([1, 2], [0]), "assignments"),
        (lambda: stratified().update([1], [N]), "indices"),
        (lambda: stratified(batch_size=0), "batch_size"),
        (
            lambda: stratified(batch_size=6, shard_options=grain.sharding.ShardOptions(0, 4)),
            "batch_size",
        ),
        (lambda: stratified(seed=-1), "seed"),
        (lambda: stratified(allocation="size"), "allocation"),
        (lambda: ImportanceSampler(N, batch_size=2, seed=0).update(-np.ones(N)), "scores"),
        (lambda: ImportanceSampler(N, batch_size=2, seed=0).update([np.nan], [0]), "scores"),
        (lambda: ImportanceSampler(N, batch_size=2, seed=0, smoothing=-0.1), "smoothing"),
        (lambda: ImportanceSampler(0, batch_size=2, seed=0), "num_examples"),
    ],
)
def test_host_bad_input_raises_naming_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
