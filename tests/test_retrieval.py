"""Retrieval metrics against a per-query numpy implementation of the VSE++ protocol."""

import inspect
import math

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jaxeff import retrieval


def numpy_reference(images, captions, *, measure="cosine", folds=1):
    """Per-query loops as in the VSE++ evaluation code (argsort each query's scores)."""

    def sim(u, V):
        if measure == "cosine":
            return V @ u
        return -np.sqrt(np.sum(np.maximum(0.0, V - u) ** 2, axis=1))

    def metrics(ranks):
        return [100.0 * np.mean(ranks < k) for k in (1, 5, 10)] + [
            np.floor(np.median(ranks)) + 1,
            ranks.mean() + 1,
        ]

    n = len(images) // folds
    results = []
    for f in range(folds):
        ims, caps = images[f * n : (f + 1) * n], captions[f * 5 * n : (f + 1) * 5 * n]
        i2t = np.zeros(n)
        for i in range(n):
            order = np.argsort(sim(ims[i], caps))[::-1]
            i2t[i] = min(np.where(order == c)[0][0] for c in range(5 * i, 5 * i + 5))
        t2i = np.zeros(5 * n)
        for c in range(5 * n):
            order = np.argsort(
                -np.array([sim(ims[j], caps[c : c + 1])[0] for j in range(n)]), kind="stable"
            )
            t2i[c] = np.where(order == c // 5)[0][0]
        results.append(metrics(i2t) + metrics(t2i))
    mean = np.mean(results, axis=0)
    return mean, mean[[0, 1, 2, 5, 6, 7]].sum()


def pessimistic_ranks(images, captions, *, measure="cosine", per_image=5):
    """Per-query float64 loops: a query's rank counts every other item scoring >= its match.

    Each score is the exactly rounded value of the float32 inputs (``math.fsum`` of exact
    float64 products), so exact duplicates tie exactly here.
    """
    images, captions = np.asarray(images, np.float64), np.asarray(captions, np.float64)

    def score(u, v):
        if measure == "cosine":
            return math.fsum(u * v)
        return -math.sqrt(math.fsum(np.maximum(0.0, v - u) ** 2))

    i2t = []
    for i, u in enumerate(images):
        scores = np.array([score(u, v) for v in captions])
        own = np.arange(per_image * i, per_image * (i + 1))
        i2t.append(np.sum(np.delete(scores, own) >= scores[own].max()))
    t2i = []
    for m, v in enumerate(captions):
        scores = np.array([score(u, v) for u in images])
        own = m // per_image
        t2i.append(np.sum(np.delete(scores, own) >= scores[own]))
    return np.array(i2t), np.array(t2i)


def random_unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("measure", ["cosine", "order"])
@pytest.mark.parametrize("folds", [1, 3])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_matches_per_query_reference(measure, folds, chunk_size):
    rng = np.random.default_rng(0)
    n, d = 30, 8
    images = random_unit(rng, n, d)
    # Captions near their image, so ranks spread over the whole range.
    captions = np.repeat(images, 5, axis=0) + 0.9 * rng.normal(size=(5 * n, d))
    captions /= np.linalg.norm(captions, axis=1, keepdims=True)
    if measure == "order":
        images, captions = np.abs(images), np.abs(captions)
    got = retrieval.evaluate(
        images.astype(np.float32),
        captions.astype(np.float32),
        folds=folds,
        measure=measure,
        chunk_size=chunk_size,
    )
    want, want_rsum = numpy_reference(
        images.astype(np.float32).astype(np.float64),
        captions.astype(np.float32).astype(np.float64),
        measure=measure,
        folds=folds,
    )
    np.testing.assert_allclose(list(got.i2t) + list(got.t2i), want, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got.rsum, want_rsum)
    assert 0 < got.i2t.r1 < 100 and 0 < got.t2i.r1 < 100  # a non-trivial test case


def test_perfect_and_collapsed_embeddings():
    rng = np.random.default_rng(1)
    images = random_unit(rng, 20, 16).astype(np.float32)
    perfect = retrieval.evaluate(images, np.repeat(images, 5, axis=0))
    assert perfect.i2t == (100.0, 100.0, 100.0, 1.0, 1.0)
    assert perfect.t2i == (100.0, 100.0, 100.0, 1.0, 1.0)
    assert perfect.rsum == 600.0
    same = np.ones((20, 4), np.float32) / 2
    collapsed = retrieval.evaluate(same, np.repeat(same, 5, axis=0))
    assert collapsed.i2t.r1 == 0.0 and collapsed.t2i.r1 == 0.0  # ties count against the model


def test_ranks_are_exact():
    images = np.eye(3, dtype=np.float32)
    captions = np.repeat(images, 5, axis=0)
    captions[0] = [0.0, 1.0, 0.0]  # caption 0 of image 0 looks like image 1
    i2t, t2i = retrieval.retrieval_ranks(images, captions)
    np.testing.assert_array_equal(i2t, [0, 1, 0])  # caption 0 ties with image 1's captions
    assert t2i[0] == 2  # image 1 scores higher than image 0, image 2 ties with it
    np.testing.assert_array_equal(t2i[1:], 0)


def embeddings_with_duplicates(measure, per_image=5):
    """13 images, three of them exact copies of others, and exactly duplicated captions."""
    rng = np.random.default_rng(5)
    n, d = 13, 6
    images = random_unit(rng, n, d)
    images[7], images[12], images[6] = images[2], images[0], images[5]
    captions = np.repeat(images, per_image, axis=0) + 0.9 * rng.normal(size=(per_image * n, d))
    captions /= np.linalg.norm(captions, axis=1, keepdims=True)
    # Image 4's best caption (equal to the image) is repeated as a caption of image 9, and
    # a caption of image 1 repeats one of image 11.
    captions[per_image * 4] = captions[per_image * 9 + 1] = images[4]
    captions[per_image * 1 + 1] = captions[per_image * 11]
    if measure == "order":
        images, captions = np.abs(images), np.abs(captions)
    return images.astype(np.float32), captions.astype(np.float32)


@pytest.mark.parametrize("measure", ["cosine", "order"])
@pytest.mark.parametrize("chunk_size", [1, 2, 4, 5, None])
def test_exact_duplicates_count_against_the_model(measure, chunk_size):
    images, captions = embeddings_with_duplicates(measure)
    i2t, t2i = retrieval.retrieval_ranks(images, captions, measure=measure, chunk_size=chunk_size)
    want_i2t, want_t2i = pessimistic_ranks(images, captions, measure=measure)
    np.testing.assert_array_equal(i2t, want_i2t)
    np.testing.assert_array_equal(t2i, want_t2i)
    # Every caption of a duplicated image ties with the duplicate: its rank is at least 1.
    duplicated = np.concatenate([np.arange(5 * i, 5 * i + 5) for i in (0, 2, 5, 6, 7, 12)])
    assert np.all(t2i[duplicated] >= 1)
    assert i2t[4] >= 1  # image 4's best caption ties with a caption of image 9


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_embeddings_sharded_over_a_mesh(axis_type):
    # jax.make_mesh's default axes are explicit: a sharding is part of the array's type.
    types = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}
    mesh = jax.make_mesh((8,), ("data",), axis_types=(types[axis_type],))
    images, captions = embeddings_with_duplicates("cosine")
    rows = NamedSharding(mesh, PartitionSpec("data"))
    n = 8 * (len(images) // 8)
    sharded = retrieval.retrieval_ranks(
        jax.device_put(images[:n], rows), jax.device_put(captions[: 5 * n], rows)
    )
    for got, want in zip(sharded, pessimistic_ranks(images[:n], captions[: 5 * n]), strict=True):
        np.testing.assert_array_equal(got, want)


def test_exact_duplicates_with_other_captions_per_image():
    images, captions = embeddings_with_duplicates("cosine", per_image=2)
    got = retrieval.retrieval_ranks(images, captions, captions_per_image=2, chunk_size=3)
    want = pessimistic_ranks(images, captions, per_image=2)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39])  # 1e39 overflows float32
@pytest.mark.parametrize("name, row", [("image_emb", 5), ("caption_emb", 27)])
def test_non_finite_embeddings_are_refused(bad, name, row):
    images = random_unit(np.random.default_rng(4), 8, 4)
    emb = {"image_emb": images, "caption_emb": np.repeat(images, 5, axis=0)}
    emb[name][row, 1] = bad
    emb[name][row + 2] = np.nan  # a later bad row: the first one is named
    # Row indices count from the start of the whole set, not of the fold (rows 5 and 27 are
    # in the second of two folds).
    with pytest.raises(ValueError, match=rf"`{name}` must be finite, but row {row} "):
        retrieval.evaluate(**emb, folds=2)
    with pytest.raises(ValueError, match=rf"`{name}` must be finite, but row {row} "):
        retrieval.retrieval_ranks(**emb)


def test_all_nan_embeddings_are_not_a_perfect_model():
    with pytest.raises(ValueError, match="`image_emb` must be finite, but row 0 "):
        retrieval.evaluate(np.full((4, 3), np.nan, np.float32), np.ones((20, 3), np.float32))
    with pytest.raises(ValueError, match="`caption_emb` must be finite, but row 0 "):
        retrieval.evaluate(np.ones((4, 3), np.float32), np.full((20, 3), np.nan, np.float32))


@pytest.mark.parametrize("num_captions, folds", [(23, 1), (40, 2), (40, 1), (19, 1), (10, 2)])
def test_caption_count_must_be_exactly_five_per_image(num_captions, folds):
    images, captions = np.ones((4, 3), np.float32), np.ones((num_captions, 3), np.float32)
    message = (
        rf"`caption_emb` must have exactly 5 rows per image \(5 x 4 = 20\), got {num_captions}\."
    )
    with pytest.raises(ValueError, match=message):
        retrieval.evaluate(images, captions, folds=folds)
    with pytest.raises(ValueError, match=message):
        retrieval.retrieval_ranks(images, captions)


def test_captions_per_image_is_one_constant():
    assert retrieval.CAPTIONS_PER_IMAGE == 5 and "CAPTIONS_PER_IMAGE" in retrieval.__all__
    for fn in (retrieval.evaluate, retrieval.retrieval_ranks):
        default = inspect.signature(fn).parameters["captions_per_image"].default
        assert default == retrieval.CAPTIONS_PER_IMAGE
    assert set(retrieval.__all__) <= set(dir(retrieval))


def test_as_dict_and_table():
    rng = np.random.default_rng(2)
    images = random_unit(rng, 10, 4).astype(np.float32)
    result = retrieval.evaluate(images, np.repeat(images, 5, axis=0))
    d = result.as_dict(prefix="dev_")
    assert d["dev_rsum"] == 600.0 and d["dev_t2i_medr"] == 1.0 and len(d) == 11
    again = retrieval.RetrievalResult.from_dict(d | {"step": 3}, prefix="dev_")
    assert again == result
    table = retrieval.format_table({"VSE++": result})
    assert "VSE++" in table and "600.0" in table


def test_bad_input():
    images = np.ones((4, 3), np.float32)
    captions = np.ones((20, 3), np.float32)
    with pytest.raises(ValueError, match="`folds`"):
        retrieval.evaluate(images, captions, folds=3)
    with pytest.raises(ValueError, match="`folds`"):
        retrieval.evaluate(images, captions, folds=True)
    with pytest.raises(ValueError, match="`image_emb` and `caption_emb`.*embedding size"):
        retrieval.evaluate(images, np.ones((20, 2), np.float32))
    with pytest.raises(ValueError, match="`caption_emb` must be a 2-D"):
        retrieval.evaluate(images, np.ones(20, np.float32))
    with pytest.raises(ValueError, match="`measure`"):
        retrieval.evaluate(images, captions, measure="dot")
    with pytest.raises(ValueError, match="`chunk_size`"):
        retrieval.evaluate(images, captions, chunk_size=0)
    with pytest.raises(ValueError, match="`captions_per_image`"):
        retrieval.evaluate(images, captions, captions_per_image=0)


def test_average_of_folds_and_seeds():
    rng = np.random.default_rng(3)
    images = random_unit(rng, 12, 4).astype(np.float32)
    captions = np.repeat(images, 5, axis=0) + 0.8 * rng.normal(size=(60, 4)).astype(np.float32)
    folds = [
        retrieval.evaluate(images[4 * f : 4 * f + 4], captions[20 * f : 20 * f + 20])
        for f in range(3)
    ]
    mean = retrieval.average(folds)
    assert mean == retrieval.evaluate(images, captions, folds=3)
    np.testing.assert_allclose(mean.i2t, np.mean([r.i2t for r in folds], axis=0))
    np.testing.assert_allclose(mean.rsum, np.mean([r.rsum for r in folds]))
    with pytest.raises(ValueError, match="`results`"):
        retrieval.average([])
