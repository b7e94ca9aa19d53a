"""Tests for the grain training and evaluation pipelines."""

import collections
import io
import json

import numpy as np
import pytest
from PIL import Image

from jaxeff.data.pipeline import (
    batches_per_epoch,
    caption_texts,
    eval_caption_batches,
    eval_image_batches,
    to_float_image,
    training_batches,
)
from jaxeff.data.vocab import END_ID, PAD_ID, START_ID, build_vocabulary


def _source(n, *, group_of=None):
    """``n`` records: image ``i`` has features ``[i, 10 i, -i]``, captions "image i caption j"."""
    group_of = group_of if group_of is not None else list(range(n))
    return [
        {
            "image": np.array([i, 10 * i, -i], np.float32),
            "captions": [f"image {i} caption {j}".encode() for j in range(5)],
            "image_id": i,
            "group": group_of[i],
        }
        for i in range(n)
    ]


def _vocab(source):
    return build_vocabulary(caption_texts(source), threshold=1)


def _pairs_of(batch, vocab):
    """(image id, caption j) of each row, read back from the tokens."""
    pairs = []
    for row in range(len(batch["tokens"])):
        words = vocab.decode(batch["tokens"][row]).split()
        assert words[:2] == ["image", str(batch["image_id"][row])]  # the image's own caption
        pairs.append((int(batch["image_id"][row]), int(words[3])))
    return pairs


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_to_float_image():
    pixels = np.array([[[0, 51, 255]]], np.uint8)
    np.testing.assert_allclose(to_float_image(pixels), [[[0.0, 0.2, 1.0]]], rtol=1e-6)
    buffer = io.BytesIO()
    Image.fromarray(np.tile(pixels, (2, 3, 1))).save(buffer, format="PNG")
    decoded = to_float_image(buffer.getvalue())
    assert decoded.shape == (2, 3, 3) and decoded.dtype == np.float32
    np.testing.assert_allclose(decoded[1, 2], [0.0, 0.2, 1.0], rtol=1e-6)
    features = np.array([1.5, -2.0], np.float64)
    assert to_float_image(features).dtype == np.float32
    with pytest.raises(ValueError, match="dtype int16"):
        to_float_image(np.zeros(3, np.int16))


def test_training_epochs_cover_every_pair_once_with_fixed_shapes():
    source = _source(12)
    vocab = _vocab(source)
    assert batches_per_epoch(source, batch_size=6) == 10
    batches = list(
        training_batches(source, vocab, batch_size=6, max_length=8, seed=1, num_epochs=2)
    )
    assert len(batches) == 20
    for batch in batches:
        assert batch.keys() == {"image", "tokens", "lengths", "image_id"}  # what a step reads
        assert batch["image"].shape == (6, 3) and batch["image"].dtype == np.float32
        assert batch["tokens"].shape == (6, 8) and batch["tokens"].dtype == np.int32
        assert batch["lengths"].dtype == np.int32 and batch["image_id"].dtype == np.int32
        np.testing.assert_array_equal(batch["lengths"], 6)  # <start> image i caption j <end>
        np.testing.assert_array_equal(batch["image"][:, 0], batch["image_id"])
    epochs = [sum((_pairs_of(b, vocab) for b in batches[e * 10 : e * 10 + 10]), []) for e in (0, 1)]
    all_pairs = sorted((i, j) for i in range(12) for j in range(5))
    assert sorted(epochs[0]) == all_pairs and sorted(epochs[1]) == all_pairs
    assert epochs[0] != epochs[1]  # reshuffled each epoch


def test_training_is_a_function_of_the_seed():
    source = _source(10, group_of=[i // 2 for i in range(10)])
    vocab = _vocab(source)

    def first(seed, **kwargs):
        ds = training_batches(source, vocab, batch_size=4, max_length=6, seed=seed, **kwargs)
        return _take(iter(ds), 15)

    _assert_same_batches(first(5), first(5))
    _assert_same_batches(first(5, group_size=2), first(5, group_size=2))
    assert not np.array_equal(first(5)[0]["image_id"], first(6)[0]["image_id"])


@pytest.mark.parametrize("group_size", [None, 2])
def test_resume_from_state_gives_the_same_batches(group_size):
    source = _source(12, group_of=[i // 3 for i in range(12)])
    vocab = _vocab(source)

    def dataset():
        return training_batches(
            source, vocab, batch_size=4, max_length=6, seed=7, group_size=group_size
        )

    # 15 pairs-batches or 2 group-batches per epoch: 13 batches cross an epoch boundary.
    iterator = iter(dataset())
    _take(iterator, 13)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = _take(iterator, 8)
    resumed = iter(dataset())
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 8), expected)


def test_group_batches_hold_whole_groups():
    rng = np.random.default_rng(0)
    group_of = rng.permutation(np.arange(24) // 4)  # 6 groups of 4, scattered
    source = _source(24, group_of=group_of)
    vocab = _vocab(source)
    assert batches_per_epoch(source, batch_size=8, group_size=4) == 3
    batches = list(
        training_batches(
            source, vocab, batch_size=8, max_length=6, seed=3, group_size=4, num_epochs=2
        )
    )
    assert len(batches) == 6
    for epoch in (batches[:3], batches[3:]):
        seen = []
        for batch in epoch:
            assert "group" not in batch  # used to form the batch, not passed on
            counts = collections.Counter(group_of[batch["image_id"]].tolist())
            assert len(counts) == 2 and set(counts.values()) == {4}
            _pairs_of(batch, vocab)  # each caption belongs to its image
            seen += batch["image_id"].tolist()
        assert sorted(seen) == list(range(24))  # groups of exactly 4: every image once


def test_groups_argument_and_larger_groups_are_subsampled():
    source = _source(16)  # the records' own groups are all distinct
    vocab = _vocab(source)
    groups = np.arange(16) // 8  # two groups of 8
    ds = training_batches(
        source, vocab, batch_size=8, max_length=6, seed=0, group_size=4, groups=groups
    )
    for batch in _take(iter(ds), 6):
        ids = batch["image_id"]
        assert len(set(ids.tolist())) == 8
        np.testing.assert_array_equal(np.sort(groups[ids]), [0, 0, 0, 0, 1, 1, 1, 1])


def test_long_captions_are_truncated_keeping_end():
    source = _source(4)
    vocab = _vocab(source)
    batch = next(iter(training_batches(source, vocab, batch_size=4, max_length=4, seed=0)))
    np.testing.assert_array_equal(batch["lengths"], 4)
    np.testing.assert_array_equal(batch["tokens"][:, 0], START_ID)
    np.testing.assert_array_equal(batch["tokens"][:, -1], END_ID)


def test_shards_split_the_global_batch():
    source = _source(8, group_of=[i // 2 for i in range(8)])
    vocab = _vocab(source)
    kwargs = dict(batch_size=8, max_length=6, seed=2, group_size=2)
    full = _take(iter(training_batches(source, vocab, **kwargs)), 3)
    shards = [
        _take(iter(training_batches(source, vocab, shard_index=s, shard_count=2, **kwargs)), 3)
        for s in (0, 1)
    ]
    for step in range(3):
        for key in full[step]:
            joined = np.concatenate([shards[0][step][key], shards[1][step][key]])
            np.testing.assert_array_equal(joined, full[step][key])


def test_eval_images_in_order_with_padding_mask():
    source = _source(7)
    batches = list(eval_image_batches(source, batch_size=3))
    assert len(batches) == 3
    for batch in batches:
        assert batch["image"].shape == (3, 3) and batch["mask"].shape == (3,)
    np.testing.assert_array_equal(batches[-1]["mask"], [True, False, False])
    np.testing.assert_array_equal(batches[-1]["image"], np.tile([6, 60, -6], (3, 1)))
    images = np.concatenate([b["image"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(images, np.stack([r["image"] for r in source]))
    ids = np.concatenate([b["image_id"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(ids, np.arange(7))


def test_eval_captions_in_order_with_padding_mask():
    source = _source(7)
    vocab = _vocab(source)
    batches = list(eval_caption_batches(source, vocab, batch_size=8, max_length=7))
    assert [int(b["mask"].sum()) for b in batches] == [8, 8, 8, 8, 3]
    tokens = np.concatenate([b["tokens"][b["mask"]] for b in batches])
    assert [vocab.decode(t) for t in tokens] == [c.decode() for c in caption_texts_bytes(source)]
    np.testing.assert_array_equal(tokens[:, 6], PAD_ID)
    lengths = np.concatenate([b["lengths"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(lengths, 6)
    ids = np.concatenate([b["image_id"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(ids, np.arange(35) // 5)
    np.testing.assert_array_equal(batches[-1]["tokens"][3:], np.tile(tokens[32], (5, 1)))


def caption_texts_bytes(source):
    return [c for r in source for c in r["captions"]]


def test_bad_arguments():
    source = _source(6)
    vocab = _vocab(source)
    kwargs = dict(max_length=6, seed=0)
    with pytest.raises(ValueError, match="group_size"):
        training_batches(source, vocab, batch_size=6, group_size=4, **kwargs)
    with pytest.raises(ValueError, match="group_size=2 but 6 groups"):
        training_batches(source, vocab, batch_size=4, group_size=2, **kwargs)
    with pytest.raises(ValueError, match="groups must be 6 integers"):
        training_batches(source, vocab, batch_size=4, group_size=2, groups=[0, 0, 1], **kwargs)
    with pytest.raises(ValueError, match="shard_count"):
        training_batches(source, vocab, batch_size=6, shard_count=4, **kwargs)
    with pytest.raises(ValueError, match="shard_index"):
        training_batches(source, vocab, batch_size=6, shard_index=2, shard_count=2, **kwargs)
    with pytest.raises(ValueError, match="no full batch"):
        training_batches(source, vocab, batch_size=64, **kwargs)
    with pytest.raises(ValueError, match="max_length"):
        training_batches(source, vocab, batch_size=4, max_length=1, seed=0)
    with pytest.raises(ValueError, match="vocab"):
        training_batches(source, {"a": 1}, batch_size=4, **kwargs)
    with pytest.raises(ValueError, match="source is empty"):
        eval_image_batches([], batch_size=4)
    with pytest.raises(ValueError, match="captions"):
        eval_caption_batches(
            [{"captions": ["a"], "image_id": 0}], vocab, batch_size=2, max_length=4
        )
