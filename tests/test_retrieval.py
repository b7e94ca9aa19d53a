"""Retrieval metrics against a per-query numpy implementation of the VSE++ protocol."""

import numpy as np
import pytest

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
    with pytest.raises(ValueError, match="5 rows per image"):
        retrieval.evaluate(images, np.ones((19, 3), np.float32))
    with pytest.raises(ValueError, match="`folds`"):
        retrieval.evaluate(images, np.ones((20, 3), np.float32), folds=3)
    with pytest.raises(ValueError, match="embedding size"):
        retrieval.evaluate(images, np.ones((20, 2), np.float32))
    with pytest.raises(ValueError, match="`measure`"):
        retrieval.evaluate(images, np.ones((20, 3), np.float32), measure="dot")


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
