"""Property-based checks of the hinge losses over random batches."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxeff import losses

batches = st.tuples(st.integers(1, 9), st.integers(1, 6), st.integers(0, 2**31 - 1))


def embeddings(b, d, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, b, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return jnp.asarray(x[0]), jnp.asarray(x[1]), rng


@settings(max_examples=40, deadline=None)
@given(batches, st.floats(0.0, 1.0))
def test_mh_between_zero_and_sh_and_top_k_all_is_sh(batch, margin):
    im, s, _ = embeddings(*batch)
    sh = float(losses.vse_hinge_loss(im, s, margin=margin))
    mh = float(losses.vse_hinge_loss(im, s, margin=margin, max_violation=True))
    assert 0.0 <= mh <= sh + 1e-5
    every = losses.vse_hinge_loss(im, s, margin=margin, max_violation=True, top_k=im.shape[0])
    np.testing.assert_allclose(every, sh, rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(batches, st.sampled_from(["cosine", "order"]), st.booleans())
def test_invariant_to_reordering_the_pairs(batch, measure, hard):
    im, s, rng = embeddings(*batch)
    perm = rng.permutation(im.shape[0])
    a = losses.vse_hinge_loss(im, s, measure=measure, max_violation=hard)
    b = losses.vse_hinge_loss(im[perm], s[perm], measure=measure, max_violation=hard)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(batches)
def test_all_pairs_positive_gives_zero(batch):
    im, s, _ = embeddings(*batch)
    everything = jnp.ones((im.shape[0], im.shape[0]), bool)
    for hard in (False, True):
        out = losses.vse_hinge_loss(im, s, max_violation=hard, positives=everything)
        assert float(out) == 0.0


scalar_types = st.sampled_from([float, np.float32, np.float64, jnp.float32, jnp.asarray])


@settings(max_examples=40, deadline=None)
@given(batches, st.floats(0.0, 1.0), scalar_types)
def test_weight_of_any_scalar_type_mixes_sh_and_mh(batch, w, cast):
    im, s, _ = embeddings(*batch)
    sh = float(losses.vse_hinge_loss(im, s))
    mh = float(losses.vse_hinge_loss(im, s, max_violation=True))
    mixed = losses.vse_hinge_loss(im, s, max_violation=cast(w))
    np.testing.assert_allclose(mixed, (1 - w) * sh + w * mh, rtol=1e-4, atol=1e-5)


out_of_range = st.one_of(
    st.floats(-1e6, -1e-3), st.floats(1.001, 1e6), st.sampled_from([np.nan, np.inf, -np.inf])
)


@settings(max_examples=40, deadline=None)
@given(out_of_range, scalar_types)
def test_weight_out_of_range_is_refused_for_any_scalar_type(w, cast):
    im, s, _ = embeddings(3, 4, 0)
    with pytest.raises(ValueError, match="`max_violation`"):
        losses.vse_hinge_loss(im, s, max_violation=cast(w))
    with pytest.raises(ValueError, match="`margin`"):
        losses.vse_hinge_loss(im, s, margin=cast(-abs(w)))
