"""Tests for the raw-image sources: the Flickr30K builder and the coco_captions reader."""

import logging
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from _data_files import write_image, write_karpathy_json

from jaxeff.data.coco import coco_captions_source
from jaxeff.data.flickr30k import Flickr30k, build_flickr30k, load_karpathy_json
from jaxeff.data.pipeline import eval_image_batches

# (filename, Karpathy split, colour); sentence s of image k is "  Image <k> sentence <s> ".
IMAGES = [
    ("100.jpg", "train", (250, 10, 10)),
    ("101.jpg", "test", (10, 250, 10)),
    ("102.jpg", "val", (10, 10, 250)),
    ("103.jpg", "train", (200, 200, 10)),
    ("104.jpg", "restval", (10, 200, 200)),
    ("105.jpg", "test", (120, 120, 120)),
]


def _sentences(k, count=6):
    return [f"  Image {k} sentence {s} " for s in range(count)]


def _expected_captions(k):
    return [f"Image {k} sentence {s}" for s in range(5)]


def _write_flickr(manual, *, skip_image=None):
    for filename, _, colour in IMAGES:
        if filename != skip_image:
            write_image(manual / "flickr30k-images" / filename, colour)
    write_karpathy_json(
        manual / "dataset_flickr30k.json",
        [(filename, split, _sentences(k)) for k, (filename, split, _) in enumerate(IMAGES)],
    )


@pytest.fixture(scope="module")
def flickr(tmp_path_factory):
    root = tmp_path_factory.mktemp("flickr")
    _write_flickr(root / "manual")
    return build_flickr30k(root / "manual", root / "tfds"), root


def _check_split(source, image_indices):
    assert len(source) == len(image_indices)
    for i, k in enumerate(image_indices):
        record = source[i]
        assert record["image"].shape == (8, 10, 3) and record["image"].dtype == np.uint8
        # JPEG is lossy: a solid colour comes back within a few levels.
        assert np.abs(record["image"].astype(int) - IMAGES[k][2]).max() <= 4
        assert [c.decode() for c in record["captions"]] == _expected_captions(k)
        assert record["image_id"] == i and record["group"] == i
        assert record["filename"].decode() == IMAGES[k][0]


def test_karpathy_splits_in_json_order(flickr):
    builder, _ = flickr
    _check_split(builder.as_data_source("train"), [0, 3])
    _check_split(builder.as_data_source("dev"), [2])
    _check_split(builder.as_data_source("test"), [1, 5])
    assert "tensorflow" not in sys.modules


def test_restval_config_adds_restval_to_train(flickr, tmp_path):
    _, root = flickr
    builder = build_flickr30k(root / "manual", tmp_path / "tfds", restval=True)
    _check_split(builder.as_data_source("train"), [0, 3, 4])
    reopened = tfds.data_source(
        "flickr30k/karpathy_restval", split="test", data_dir=tmp_path / "tfds"
    )
    assert reopened[1]["filename"] == b"105.jpg"


def test_eval_images_decoded_to_unit_floats(flickr):
    builder, _ = flickr
    (batch,) = list(eval_image_batches(builder.as_data_source("test"), batch_size=4))
    assert batch["image"].shape == (4, 8, 10, 3) and batch["image"].dtype == np.float32
    np.testing.assert_array_equal(batch["mask"], [True, True, False, False])
    np.testing.assert_allclose(batch["image"][1], np.full((8, 10, 3), 120 / 255), atol=4 / 255)


def test_rebuilds_when_the_json_or_an_image_changes(tmp_path, monkeypatch, caplog):
    manual, data_dir = tmp_path / "manual", tmp_path / "tfds"
    _write_flickr(manual)
    calls = []
    generate = Flickr30k._generate_examples

    def counting(self, entries, paths):
        calls.append(len(entries))
        return generate(self, entries, paths)

    monkeypatch.setattr(Flickr30k, "_generate_examples", counting)
    build_flickr30k(manual, data_dir)
    assert len(calls) == 3  # train, dev, test
    with caplog.at_level(logging.WARNING):
        build_flickr30k(manual, data_dir)  # unchanged: reused
    assert len(calls) == 3 and not caplog.records

    write_image(manual / "flickr30k-images" / "105.jpg", (0, 0, 0))  # new pixels
    with caplog.at_level(logging.WARNING):
        builder = build_flickr30k(manual, data_dir)
    assert len(calls) == 6 and "flickr30k-images/105.jpg (modified)" in caplog.text
    assert "100.jpg" not in caplog.text
    assert np.abs(builder.as_data_source("test")[1]["image"].astype(int)).max() <= 4
    caplog.clear()

    entries = [(f, s, _sentences(k)) for k, (f, s, _) in enumerate(IMAGES)]
    entries[1] = ("101.jpg", "test", ["  New caption  "] * 5)
    write_karpathy_json(manual / "dataset_flickr30k.json", entries)
    with caplog.at_level(logging.WARNING):
        builder = build_flickr30k(manual, data_dir)
    assert len(calls) == 9 and "dataset_flickr30k.json (modified)" in caplog.text
    assert [c.decode() for c in builder.as_data_source("test")[0]["captions"]] == [
        "New caption"
    ] * 5


def test_missing_image_names_the_file(tmp_path):
    _write_flickr(tmp_path / "manual", skip_image="105.jpg")
    with pytest.raises(FileNotFoundError, match="105.jpg"):
        Flickr30k(manual_dir=tmp_path / "manual", data_dir=tmp_path / "tfds").download_and_prepare()
    with pytest.raises(FileNotFoundError, match="105.jpg"):
        build_flickr30k(tmp_path / "manual", tmp_path / "tfds")


def test_json_checks_name_the_file(tmp_path):
    path = tmp_path / "dataset_flickr30k.json"
    write_karpathy_json(path, [("a.jpg", "train", _sentences(0, count=4))])
    with pytest.raises(ValueError, match=r"dataset_flickr30k.json.*a\.jpg.*at least 5"):
        load_karpathy_json(path)
    path.write_text('{"images": [{"filename": "a.jpg"}]}')
    with pytest.raises(ValueError, match="dataset_flickr30k.json"):
        load_karpathy_json(path)
    path.write_text("not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_karpathy_json(path)
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        load_karpathy_json(tmp_path / "nothing.json")


# --- coco_captions (tfds's Karpathy-split COCO) ----------------------------------------


def test_coco_absent_raises_without_downloading(tmp_path):
    with pytest.raises(FileNotFoundError, match="coco_captions/2014 is not prepared"):
        coco_captions_source("test", data_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing was written or downloaded
    with pytest.raises(ValueError, match="split must be one of"):
        coco_captions_source("testall", data_dir=tmp_path)


def _fake_coco_captions(data_dir, image_path):
    """Prepares a tiny dataset with the name, version and features of coco_captions/2014."""

    with tfds.core.registered.skip_registration():

        class CocoCaptions(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.1.0")
            BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2014")]

            def _info(self):
                features = {
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "image/filename": tfds.features.Text(),
                    "image/id": np.int64,
                    "captions": tfds.features.Sequence({"text": np.str_, "id": np.int64}),
                }
                return tfds.core.DatasetInfo(
                    builder=self,
                    features=tfds.features.FeaturesDict(features),
                    disable_shuffling=True,
                )

            def _split_generators(self, dl_manager):
                return {s: self._generate_examples(s) for s in ("train", "restval", "test")}

            def _generate_examples(self, split):
                for k in range(2 if split == "restval" else 3):
                    coco_id = 1000 * len(split) + k
                    yield (
                        k,
                        {
                            "image": image_path,
                            "image/filename": f"{coco_id}.jpg",
                            "image/id": coco_id,
                            "captions": [
                                {"text": f"{split} {k} caption {c}", "id": c} for c in range(6)
                            ],
                        },
                    )

    CocoCaptions(data_dir=data_dir, file_format="array_record").download_and_prepare()


def test_coco_records_mapped_to_the_common_schema(tmp_path):
    image_path = tmp_path / "pixel.jpg"
    write_image(image_path, (30, 60, 90))
    _fake_coco_captions(tmp_path / "tfds", str(image_path))
    source = coco_captions_source("train+restval", data_dir=tmp_path / "tfds")
    expected = [("train", k, 5000 + k) for k in range(3)] + [
        ("restval", k, 7000 + k) for k in range(2)
    ]
    assert len(source) == len(expected)
    for i, (split, k, coco_id) in enumerate(expected):
        record = source[i]
        assert (record["image_id"], record["group"], record["coco_id"]) == (i, i, coco_id)
        assert record["image"].shape == (8, 10, 3)
        captions = [c.decode() if isinstance(c, bytes) else c for c in record["captions"]]
        assert captions == [f"{split} {k} caption {c}" for c in range(5)]
    assert len(coco_captions_source("test", data_dir=tmp_path / "tfds")) == 3
    assert "tensorflow" not in sys.modules
