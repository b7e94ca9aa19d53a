"""Tests for the generated shapes data and its tfds builder."""

import os
import sys

import numpy as np
import pytest

from jaxeff.data import shapes as shapes_lib
from jaxeff.data.shapes import EDITS, generate_shapes

_SIZE_WORDS = {"small": 0, "little": 0, "large": 1, "big": 1}
_COLOUR_WORDS = {c: i for i, c in enumerate(shapes_lib.COLOURS)}
_SHAPE_WORDS = {
    "circle": 0,
    "disk": 0,
    "square": 1,
    "box": 1,
    "triangle": 2,
    "cross": 3,
    "diamond": 4,
}
_DIRECTION_WORDS = {
    "left": 0,
    "right": 1,
    "above": 2,
    "over": 2,
    "top": 2,
    "below": 3,
    "under": 3,
    "beneath": 3,
    "bottom": 3,
}


def _directions(words):
    return [_DIRECTION_WORDS[w] for w in words if w in _DIRECTION_WORDS]


def _parse(caption):
    """Reads a caption back into (object a, object b, relation of a to b).

    Objects are (size, colour, shape) indices. Written from the caption grammar, not from
    the generator's code, so it checks that every caption states the whole scene.
    """
    words = caption.replace(",", " ").split()
    phrases = [
        (i, (_SIZE_WORDS[words[i]], _COLOUR_WORDS[words[i + 1]], _SHAPE_WORDS[words[i + 2]]))
        for i in range(len(words) - 2)
        if words[i] in _SIZE_WORDS
        and words[i + 1] in _COLOUR_WORDS
        and words[i + 2] in _SHAPE_WORDS
    ]
    assert len(phrases) == 2, caption
    (i, x), (j, y) = phrases
    before, between, after = words[:i], words[i + 3 : j], words[j + 3 :]
    if "it" in after or "its" in after:  # "<y> with <x> on its left"
        (direction,) = _directions(after)
        return y, x, direction
    if "the" in after:  # "<x> and <y>, the red one on top", "... with the circle on the left"
        k = after.index("the")
        ref = after[k + 1]
        (direction,) = _directions(after[k + 2 :])
        if ref in _COLOUR_WORDS:
            matches = [o for o in (x, y) if o[1] == _COLOUR_WORDS[ref]]
        else:
            matches = [o for o in (x, y) if o[2] == _SHAPE_WORDS[ref]]
        assert len(matches) == 1, caption
        other = y if matches[0] is x else x
        return matches[0], other, direction
    if _directions(before):  # "on the left <x>, on the right <y>"
        (direction,) = _directions(before)
        assert _directions(between) == [direction ^ 1], caption
        return x, y, direction
    (direction,) = _directions(between)  # "<x> to the left of <y>"
    return x, y, direction


def _caption_scene(caption):
    a, b, relation = _parse(caption)
    return int(shapes_lib.scene_ids([[a[2], b[2]]], [[a[1], b[1]]], [[a[0], b[0]]], [relation])[0])


@pytest.fixture(scope="module")
def data():
    return generate_shapes(40, seed=3)


def test_shapes_and_dtypes():
    d = generate_shapes(3, family_size=5, image_size=48, seed=1)
    assert d.images.shape == (15, 48, 48, 3) and d.images.dtype == np.uint8
    assert len(d.captions) == 15
    assert all(len(c) == 5 and all(isinstance(s, str) for s in c) for c in d.captions)
    for name in ("family", "edit", "relation", "scene"):
        assert getattr(d, name).shape == (15,) and getattr(d, name).dtype == np.int64, name
    assert d.shapes.shape == d.colours.shape == d.sizes.shape == (15, 2)
    assert d.centres.shape == (15, 2, 2) and d.radii.shape == (15, 2)
    np.testing.assert_array_equal(d.family, np.repeat(np.arange(3), 5))
    assert len(d.flat_captions()) == 75 and d.flat_captions()[5] == d.captions[1][0]
    assert generate_shapes(0).images.shape == (0, 32, 32, 3)
    with pytest.raises(ValueError, match="family_size"):
        generate_shapes(1, family_size=len(EDITS) + 1)


def test_deterministic_and_prefix_stable(data):
    again = generate_shapes(40, seed=3)
    for name, field in data._asdict().items():
        if name == "captions":
            assert field == again.captions
        else:
            np.testing.assert_array_equal(field, getattr(again, name), err_msg=name)
    prefix = generate_shapes(5, seed=3)
    np.testing.assert_array_equal(prefix.images, data.images[:40])
    assert prefix.captions == data.captions[:40]
    other = generate_shapes(5, seed=4)
    assert not np.array_equal(other.images, prefix.images)


def test_families_are_distinct_near_twins(data):
    size = 8
    assert data.edit.reshape(-1, size)[:, 0].tolist() == [0] * 40  # base first
    vocabulary = set()
    for f in range(40):
        rows = np.arange(f * size, (f + 1) * size)
        assert np.all(data.family[rows] == f)
        # Every sibling is a different edit, a different scene, with different captions.
        assert len(set(data.edit[rows])) == size
        assert len(set(data.scene[rows])) == size
        caption_sets = [frozenset(data.captions[r]) for r in rows]
        assert len(set(caption_sets)) == size
        assert all(len(c) == 5 for c in caption_sets)
        # The three swaps, which change no word, are always there.
        assert {1, 2, 3} <= set(data.edit[rows])
        base = rows[0]
        for r in rows[1:]:
            name = EDITS[data.edit[r]]
            same = [
                (data.shapes[r] == data.shapes[base]).all(),
                (data.colours[r] == data.colours[base]).all(),
                (data.sizes[r] == data.sizes[base]).all(),
                data.relation[r] == data.relation[base],
            ]
            assert sum(same) == 3, name  # exactly one attribute group edited
            if name == "swap_colours":
                np.testing.assert_array_equal(data.colours[r], data.colours[base][::-1])
            if name == "swap_positions":
                assert data.relation[r] == data.relation[base] ^ 1
        for caps in data.captions[f * size : (f + 1) * size]:
            vocabulary.update(w for c in caps for w in c.replace(",", " ").split())
    assert len(vocabulary) < 100


def test_captions_state_the_scene(data):
    for i, caps in enumerate(data.captions):
        for caption in caps:
            assert _caption_scene(caption) == data.scene[i], caption


def test_swapped_colours_swap_the_colour_words(data):
    """In a colour-swap sibling each shape word comes with the other object's colour."""
    for r in np.flatnonzero(data.edit == EDITS.index("swap_colours")):
        base = data.family[r] * 8
        assert data.edit[base] == 0
        for row, colours in ((base, data.colours[base]), (r, data.colours[base][::-1])):
            for caption in data.captions[row]:
                a, b, _ = _parse(caption)
                by_shape = {a[2]: a[1], b[2]: b[1]}
                expected = dict(zip(data.shapes[row].tolist(), colours.tolist(), strict=True))
                assert by_shape == expected, caption


def test_scene_ids_identify_meaning():
    n = len(shapes_lib.SHAPES)
    c = len(shapes_lib.COLOURS)
    rows = [
        ((s0, s1), (c0, c1), (z0, z1), rel)
        for s0 in range(n)
        for s1 in range(n)
        if s1 != s0
        for c0 in range(c)
        for c1 in range(c)
        if c1 != c0
        for z0 in range(2)
        for z1 in range(2)
        for rel in range(4)
    ]
    shapes, colours, sizes, relation = (np.array(x) for x in zip(*rows, strict=True))
    ids = shapes_lib.scene_ids(shapes, colours, sizes, relation)
    mirrored = shapes_lib.scene_ids(shapes[:, ::-1], colours[:, ::-1], sizes[:, ::-1], relation ^ 1)
    np.testing.assert_array_equal(ids, mirrored)  # "a left of b" == "b right of a"
    assert ids.min() == 0 and ids.max() == shapes_lib.NUM_SCENES - 1
    assert np.all(np.bincount(ids) == 2)  # each meaning has exactly two descriptions


def test_sibling_images_differ_only_locally(data):
    size = data.images.shape[1]
    yy, xx = np.mgrid[:size, :size] + 0.5

    def boxes(row, objects):
        mask = np.zeros((size, size), bool)
        for k in objects:
            (cx, cy), r = data.centres[row, k], data.radii[row, k]
            mask |= (np.abs(xx - cx) <= 1.1 * r + 1) & (np.abs(yy - cy) <= 1.1 * r + 1)
        return mask

    single_object = {
        "recolour_0": 0,
        "recolour_1": 1,
        "reshape_0": 0,
        "reshape_1": 1,
        "resize_0": 0,
        "resize_1": 1,
    }
    for f in range(40):
        base = f * 8
        for r in range(base + 1, base + 8):
            diff = np.abs(data.images[r].astype(int) - data.images[base].astype(int)).max(-1)
            changed = diff > 48
            assert changed.sum() >= 4, EDITS[data.edit[r]]
            k = single_object.get(EDITS[data.edit[r]])
            objects = (0, 1) if k is None else (k,)
            allowed = boxes(base, objects) | boxes(r, objects)
            assert not (changed & ~allowed).any(), EDITS[data.edit[r]]
            # Outside the objects only the pixel noise differs.
            assert diff[~(boxes(base, (0, 1)) | boxes(r, (0, 1)))].max() < 40
    # No two images are pixel-identical.
    flat = data.images.reshape(len(data.images), -1)
    assert len({row.tobytes() for row in flat}) == len(flat)


def test_split_seeds_are_distinct():
    seeds = {
        shapes_lib.split_seed(s, split) for s in range(20) for split in ("train", "dev", "test")
    }
    assert len(seeds) == 60


def test_builder_round_trip(tmp_path):
    from jaxeff.data import shapes_builder

    sizes = dict(
        train_families=3, dev_families=2, test_families=1, family_size=4, image_size=32, seed=7
    )
    builder = shapes_builder.build_shapes(tmp_path, **sizes)
    assert builder.info.disable_shuffling
    for split, families in (("train", 3), ("dev", 2), ("test", 1)):
        expected = generate_shapes(
            families, family_size=4, image_size=32, seed=shapes_lib.split_seed(7, split)
        )
        source = builder.as_data_source(split)
        assert len(source) == families * 4
        for i in range(len(source)):
            example = source[i]
            np.testing.assert_array_equal(example["image"], expected.images[i])
            assert example["image"].dtype == np.uint8
            assert [c.decode() for c in example["captions"]] == expected.captions[i]
            assert example["image_id"] == i
            assert example["group"] == expected.family[i]
            assert example["scene"] == expected.scene[i]
    # Preparing again reuses the files.
    files = sorted(p for p in tmp_path.rglob("*.array_record*"))
    stamps = [os.stat(p).st_mtime_ns for p in files]
    again = shapes_builder.build_shapes(tmp_path, **sizes)
    assert [os.stat(p).st_mtime_ns for p in files] == stamps
    assert len(again.as_data_source("dev")) == 8
    assert "tensorflow" not in sys.modules
    assert shapes_builder.shapes_config() is shapes_builder.JaxeffShapes.BUILDER_CONFIGS[0]
