"""jaxeff.privacy.sampler: Poisson sampling for DP-SGD, host-side.

The distribution is checked by Monte Carlo against independent inclusion with
probability q (per-example frequencies, the Binomial count's mean and variance, pairwise
joint frequencies), with tolerances of a few standard errors and fixed seeds; the
overflow counts against a sampler whose batch holds every draw; padded_batch_size
against exact rational tail sums and a brute-force scan of scipy's binom.sf.
"""

import math
from fractions import Fraction

import grain
import numpy as np
import pytest
from scipy import stats

from jaxeff import train as jt
from jaxeff.clustering.samplers import weighted_batches
from jaxeff.privacy.sampler import PoissonSampler, padded_batch_size


def inclusions(sampler, steps):
    """``(steps, N)`` 0/1 matrix: example i in the batch (weight 1) of step t."""
    x = np.zeros((steps, sampler.num_examples), np.int64)
    for t in range(steps):
        sample = sampler.global_batch(t)
        drawn = sample.indices[sample.weights == 1]
        assert len(np.unique(drawn)) == len(drawn)
        x[t, drawn] = 1
    return x


def assert_chi_square(counts, trials, q, num_sigma=5.0):
    """``Σ z_i²`` of independent Binomial(trials, q) counts is within a few sigma of N."""
    counts = np.asarray(counts, np.float64)
    var = trials * q * (1 - q)
    z2 = ((counts - trials * q) ** 2 / var).sum()
    excess_kurtosis = (1 - 6 * q * (1 - q)) / var
    std = math.sqrt(len(counts) * (2 + excess_kurtosis))
    assert abs(z2 - len(counts)) < num_sigma * std, (z2, len(counts), std)


# -- the distribution ------------------------------------------------------------------
def test_independent_inclusion_with_probability_q():
    size, q, steps = 40, 0.2, 10_000
    x = inclusions(PoissonSampler(size, q, size, seed=1), steps)  # b = N: no overflow
    # every example's frequency is q
    freq = x.mean(0)
    np.testing.assert_array_less(np.abs(freq - q), 4.5 * math.sqrt(q * (1 - q) / steps))
    assert_chi_square(x.sum(0), steps, q)
    # the count per step is Binomial(N, q): mean Nq, variance Nq(1 - q)
    counts = x.sum(1)
    mean, var, kurt = (float(m) for m in stats.binom.stats(size, q, moments="mvk"))
    assert abs(counts.mean() - mean) < 4 * math.sqrt(var / steps)
    fourth_moment = (kurt + 3) * var**2
    assert abs(counts.var() - var) < 4 * math.sqrt((fourth_moment - var**2) / steps)
    # pairwise joint frequencies are q²: independent, not just the right marginals
    joint = (x.T @ x) / steps
    pairs = joint[~np.eye(size, dtype=bool)]
    se = math.sqrt(q**2 * (1 - q**2) / steps)
    np.testing.assert_array_less(np.abs(pairs - q**2), 4.5 * se)
    np.testing.assert_allclose(np.diag(joint), freq)


@pytest.mark.parametrize(("q", "steps"), [(0.3, 100), (0.001, 2000)])
def test_inclusion_frequency_for_many_examples(q, steps):
    """Both of numpy's subset algorithms (tail shuffle for large counts, Floyd's for small)."""
    size = 20_000
    sampler = PoissonSampler(size, q, padded_batch_size(size, q, 1e-9), seed=2)
    counts = np.zeros(size, np.int64)
    per_step = []
    for t in range(steps):
        drawn = sampler.drawn_examples(t)
        assert len(np.unique(drawn)) == len(drawn) == sampler.num_drawn(t)
        counts[drawn] += 1
        per_step.append(len(drawn))
    assert_chi_square(counts, steps, q)
    assert abs(np.mean(per_step) - size * q) < 4 * math.sqrt(size * q * (1 - q) / steps)
    assert sampler.expected_batch_size == pytest.approx(size * q)


def test_batch_layout_drawn_slots_then_padding():
    size, q, b = 1000, 0.01, 24
    sampler = PoissonSampler(size, q, b, seed=3)
    seen_padding = False
    for t in range(50):
        sample = sampler.global_batch(t)
        assert sample.indices.shape == sample.weights.shape == (b,)
        assert sample.indices.dtype == np.int32 and sample.weights.dtype == np.float32
        drawn = sampler.drawn_examples(t)
        k = len(drawn)
        assert k == sampler.num_drawn(t) and k <= b
        np.testing.assert_array_equal(sample.weights, [1.0] * k + [0.0] * (b - k))
        np.testing.assert_array_equal(sample.indices[:k], drawn)
        np.testing.assert_array_equal(sample.indices[k:], 0)  # padding: a valid record
        assert len(np.unique(sample.indices[:k])) == k
        assert sample.indices.min() >= 0 and sample.indices.max() < size
        seen_padding |= k < b
    assert seen_padding and sampler.overflowed == 0


def test_drawn_slots_come_in_random_order():
    """Each drawn example is equally likely in every slot (not sorted by index)."""
    size, q, steps = 30, 0.5, 4000
    sampler = PoissonSampler(size, q, size, seed=4)
    first_half = np.zeros(size)  # times in the first half of the drawn slots
    expected, variance = np.zeros(size), np.zeros(size)
    for t in range(steps):
        drawn = sampler.global_batch(t).indices[: sampler.num_drawn(t)]
        k = len(drawn)
        half = k // 2
        first_half[drawn[:half]] += 1
        expected[drawn] += half / k if k else 0
        variance[drawn] += (half / k) * (1 - half / k) if k else 0
    z = (first_half - expected) / np.sqrt(variance)
    assert abs((z**2).sum() - size) < 5 * math.sqrt(2 * size)


# -- overflow --------------------------------------------------------------------------
def test_overflow_counts_the_dropped_examples_and_keeps_a_uniform_subset():
    size, q, b, steps = 200, 0.1, 16, 2000  # mean 20 > 16: most steps overflow
    small = PoissonSampler(size, q, b, seed=5)
    full = PoissonSampler(size, q, size, seed=5)  # the same draws, all kept
    total, kept_counts, expected, variance = 0, np.zeros(size), np.zeros(size), np.zeros(size)
    for t in range(steps):
        sample, whole = small.global_batch(t), full.global_batch(t)
        drawn = whole.indices[whole.weights == 1]
        kept = sample.indices[sample.weights == 1]
        dropped = max(0, len(drawn) - b)
        assert small.overflow(t) == dropped and full.overflow(t) == 0
        assert len(kept) == min(len(drawn), b)
        assert set(kept.tolist()) <= set(drawn.tolist())
        total += dropped
        assert small.overflowed == total
        keep = min(1.0, b / len(drawn)) if len(drawn) else 0.0
        kept_counts[kept] += 1
        expected[drawn] += keep
        variance[drawn] += keep * (1 - keep)
    assert total > steps  # overflow did happen, often
    assert full.overflowed == 0
    # the kept examples are a uniformly random b-subset of the drawn ones
    z2 = ((kept_counts - expected) ** 2 / variance).sum()
    assert abs(z2 - size) < 5 * math.sqrt(2 * size)


def test_overflowed_sums_every_step_before_next_step():
    sampler = PoissonSampler(100, 0.3, 24, seed=6)
    assert sampler.overflowed == 0
    sampler.global_batch(7)  # a jump: steps 0..6 count too
    expected = sum(sampler.overflow(t) for t in range(8))
    assert expected > 0 and sampler.overflowed == expected and sampler.next_step == 8
    sampler.global_batch(3)  # behind the frontier: already counted
    sampler.batch(7)
    assert sampler.overflowed == expected


# -- padded_batch_size -----------------------------------------------------------------
def exact_padded(size, q, p, multiple):
    """Smallest b with Σ_{k>b} C(N,k) q^k (1-q)^(N-k) <= p, in exact rationals."""
    q = Fraction(q)
    pmf = [math.comb(size, k) * q**k * (1 - q) ** (size - k) for k in range(size + 1)]
    for b in range(size + 1):
        if sum(pmf[b + 1 :]) <= Fraction(p):
            return max(1, -(-b // multiple)) * multiple
    raise AssertionError


@pytest.mark.parametrize("size", [1, 10, 50])
@pytest.mark.parametrize("q", [Fraction(1, 10), Fraction(1, 2), Fraction(1)])
@pytest.mark.parametrize("p", [Fraction(1, 1_000_000), Fraction(3, 100), Fraction(1, 2)])
def test_padded_batch_size_against_exact_tail_sums(size, q, p):
    for multiple in (1, 4):
        got = padded_batch_size(size, float(q), float(p), multiple=multiple)
        assert got == exact_padded(size, q, p, multiple), multiple


def test_padded_batch_size_against_a_scan_of_binom_sf_and_its_overflow_rate():
    for size, q, p in [(1_000_000, 1e-3, 1e-9), (100_000, 0.05, 1e-6), (5000, 0.01, 1e-30)]:
        tails = stats.binom.sf(np.arange(size + 1), size, q)
        brute = int(np.flatnonzero(tails <= p)[0])
        assert padded_batch_size(size, q, p) == brute
        assert padded_batch_size(size, q, p, multiple=8) == -(-brute // 8) * 8
    # the sampler overflows at about the rate asked for
    size, q, p, steps = 500, 0.05, 0.05, 3000
    b = padded_batch_size(size, q, p)
    rate = np.mean([PoissonSampler(size, q, b, seed=7).overflow(t) > 0 for t in range(steps)])
    actual = stats.binom.sf(b, size, q)
    assert actual <= p < stats.binom.sf(b - 1, size, q)
    assert abs(rate - actual) < 4 * math.sqrt(actual * (1 - actual) / steps)


# -- determinism and checkpoints -------------------------------------------------------
def test_batches_are_a_pure_function_of_seed_and_step():
    forward, backward = PoissonSampler(300, 0.1, 48, seed=8), PoissonSampler(300, 0.1, 48, seed=8)
    later = [backward.global_batch(t) for t in reversed(range(10))][::-1]
    for t in range(10):
        np.testing.assert_array_equal(forward.global_batch(t).indices, later[t].indices)
        np.testing.assert_array_equal(forward.global_batch(t).weights, later[t].weights)
    # the draw does not depend on the batch size, only the truncation does
    narrow = PoissonSampler(300, 0.1, 24, seed=8)
    for t in range(10):
        k = min(24, forward.num_drawn(t))
        np.testing.assert_array_equal(narrow.global_batch(t).indices[:k], later[t].indices[:k])
    other = PoissonSampler(300, 0.1, 48, seed=9)
    assert not np.array_equal(other.global_batch(0).indices, forward.global_batch(0).indices)


def test_state_round_trips_through_orbax_and_resumes_exactly(tmp_path):
    make = lambda: PoissonSampler(60, 0.25, 12, seed=10)  # mean 15 > 12: overflows
    run = make()
    batches = [run.global_batch(t) for t in range(5)]
    saved = run.get_state()
    with jt.Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(4, {"sampler": saved})
    batches += [run.global_batch(t) for t in range(5, 10)]
    assert run.overflowed > saved["overflowed"] > 0
    with jt.Checkpointer(tmp_path, async_save=False) as ckpt:
        restored, _ = ckpt.restore({"sampler": make().get_state()})
    for name, value in saved.items():
        got = np.asarray(restored["sampler"][name])
        assert got.dtype == value.dtype and np.array_equal(got, value), name
    resumed = make()
    resumed.set_state(restored["sampler"])
    assert resumed.next_step == 5 and resumed.overflowed == int(saved["overflowed"])
    for t in range(5, 10):
        again = resumed.global_batch(t)
        np.testing.assert_array_equal(again.indices, batches[t].indices)
        np.testing.assert_array_equal(again.weights, batches[t].weights)
    assert resumed.overflowed == run.overflowed == sum(run.overflow(t) for t in range(10))
    assert resumed.get_state().keys() == saved.keys()


def test_set_state_refuses_another_sampler():
    state = PoissonSampler(60, 0.25, 12, seed=10).get_state()
    for kwargs, match in [
        (dict(seed=11), "seed"),
        (dict(num_examples=61), "num_examples"),
        (dict(sampling_rate=0.2), "sampling_rate"),
        (dict(batch_size=16), "batch_size"),
    ]:
        options = {"num_examples": 60, "sampling_rate": 0.25, "batch_size": 12, "seed": 10}
        with pytest.raises(ValueError, match=match):
            PoissonSampler(**{**options, **kwargs}).set_state(state)
    broken = {**state, "overflowed": np.int64(-1)}
    with pytest.raises(ValueError, match="overflowed"):
        PoissonSampler(60, 0.25, 12, seed=10).set_state(broken)
    with pytest.raises(ValueError, match="state"):
        PoissonSampler(60, 0.25, 12, seed=10).set_state({"seed": np.uint32(10)})


# -- multi-host and grain --------------------------------------------------------------
def test_process_shares_make_up_the_global_batch():
    size, q, b = 100, 0.08, 12
    whole = PoissonSampler(size, q, b, seed=12)
    shares = [
        PoissonSampler(size, q, b, seed=12, shard_options=grain.sharding.ShardOptions(p, 4))
        for p in range(4)
    ]
    for t in range(20):
        parts = [s.batch(t) for s in shares]
        assert all(len(part.indices) == 3 for part in parts)
        np.testing.assert_array_equal(
            np.concatenate([part.indices for part in parts]), whole.global_batch(t).indices
        )
        np.testing.assert_array_equal(
            np.concatenate([part.weights for part in parts]), whole.global_batch(t).weights
        )
        drawn = np.concatenate([part.indices[part.weights == 1] for part in parts])
        np.testing.assert_array_equal(np.sort(drawn), np.sort(whole.drawn_examples(t)[:b]))
        np.testing.assert_array_equal(shares[2].global_batch(t).indices, whole.batch(t).indices)
    assert [s.overflowed for s in shares] == [whole.overflowed] * 4


def test_grain_dataloader_and_weighted_batches_read_the_records():
    size, q, b = 50, 0.1, 8
    source = [{"x": np.float32([i, -i]), "id": np.int32(i)} for i in range(size)]
    for shards in (1, 2):
        for index in range(shards):
            shard = grain.sharding.ShardOptions(index, shards)
            sampler = PoissonSampler(size, q, b, seed=13, shard_options=shard)
            local = b // shards
            for record in (0, 5, 17, 42):
                meta = sampler[record * shards + index]
                step, slot = divmod(record, local)
                assert meta.record_key == sampler.batch(step).indices[slot]
            loader = grain.DataLoader(
                data_source=source,
                sampler=sampler,
                operations=[grain.transforms.Batch(local)],
                worker_count=0,
            )
            for step, batch in zip(range(4), loader, strict=False):
                np.testing.assert_array_equal(batch["id"], sampler.batch(step).indices)
    sampler = PoissonSampler(size, q, b, seed=13)
    stream = weighted_batches(source, sampler)
    for step in range(5):
        batch = next(stream)
        is_padding = batch["weights"] == 0
        k = sampler.num_drawn(step)
        assert is_padding.sum() == b - min(k, b)
        np.testing.assert_array_equal(batch["id"][~is_padding], sampler.drawn_examples(step)[:b])
        np.testing.assert_array_equal(batch["id"][is_padding], 0)
        np.testing.assert_array_equal(batch["x"][:, 0], batch["indices"])


def test_repr_and_expected_batch_size():
    sampler = PoissonSampler(1000, 0.016, 32, seed=3)
    assert repr(sampler).startswith(
        "PoissonSampler(num_examples=1000, sampling_rate=0.016, batch_size=32, seed=3, "
    )
    assert sampler.expected_batch_size == pytest.approx(16.0)
    assert len(sampler) > 10**15


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: PoissonSampler(0, 0.1, 8), "num_examples"),
        (lambda: PoissonSampler(2**31, 0.1, 8), "num_examples"),
        (lambda: PoissonSampler(10, 0.0, 8), "sampling_rate"),
        (lambda: PoissonSampler(10, 1.5, 8), "sampling_rate"),
        (lambda: PoissonSampler(10, float("nan"), 8), "sampling_rate"),
        (lambda: PoissonSampler(10, "0.1", 8), "sampling_rate"),
        (lambda: PoissonSampler(10, True, 8), "sampling_rate"),
        (lambda: PoissonSampler(10, 0.1, 0), "batch_size"),
        (lambda: PoissonSampler(10, 0.1, 2.0), "batch_size"),
        (lambda: PoissonSampler(10, 0.1, 8, seed=-1), "seed"),
        (lambda: PoissonSampler(10, 0.1, 8, shard_options=3), "shard_options"),
        (
            lambda: PoissonSampler(10, 0.1, 6, shard_options=grain.sharding.ShardOptions(0, 4)),
            "batch_size",
        ),
        (lambda: PoissonSampler(10, 0.1, 8).global_batch(-1), "step"),
        (lambda: PoissonSampler(10, 0.1, 8).overflow(1.5), "step"),
        (lambda: PoissonSampler(10, 0.1, 8).drawn_examples(-2), "step"),
        (lambda: padded_batch_size(0, 0.1), "num_examples"),
        (lambda: padded_batch_size(10, 0), "sampling_rate"),
        (lambda: padded_batch_size(10, 0.1, 0.0), "overflow_probability"),
        (lambda: padded_batch_size(10, 0.1, 1.0), "overflow_probability"),
        (lambda: padded_batch_size(10, 0.1, multiple=0), "multiple"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=f"`{match}`"):
        call()
