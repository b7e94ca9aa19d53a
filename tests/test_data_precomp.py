"""Tests for the VSE++ precomp tfds builder (array_record, read without TensorFlow)."""

import pickle
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from _data_files import precomp_captions, write_precomp

from jaxeff.data.pipeline import training_batches
from jaxeff.data.precomp import VsePrecomp, build_precomp, load_precomp_split
from jaxeff.data.vocab import build_vocabulary

D = 6
SIZES = {"train": 7, "dev": 3, "test": 4}


def _features(split, n):
    rng = np.random.default_rng(len(split) * 100 + n)
    return rng.normal(size=(n, D)).astype(np.float32)


@pytest.fixture(scope="module")
def f30k(tmp_path_factory):
    root = tmp_path_factory.mktemp("precomp")
    manual = root / "manual" / "f30k_precomp"
    features = {s: _features(s, n) for s, n in SIZES.items()}
    write_precomp(manual, "train", features["train"])
    write_precomp(manual, "dev", features["dev"], per_caption=True)  # one row per caption
    write_precomp(manual, "test", features["test"])
    builder = build_precomp("f30k", root / "manual", root / "tfds")  # finds f30k_precomp/
    return builder, features, root


def test_records_match_files_in_order(f30k):
    builder, features, _ = f30k
    assert {s: builder.info.splits[s].num_examples for s in SIZES} == SIZES
    assert builder.info.features["image"].shape == (D,)
    for split, n in SIZES.items():
        source = builder.as_data_source(split)
        assert len(source) == n
        captions = precomp_captions(split, n)
        for i in range(n):
            record = source[i]
            np.testing.assert_array_equal(record["image"], features[split][i])
            assert record["image"].dtype == np.float32
            assert [c.decode() for c in record["captions"]] == captions[5 * i : 5 * i + 5]
            assert record["image_id"] == i and record["group"] == i
    assert "tensorflow" not in sys.modules


def test_reopen_without_manual_dir_and_tfds_data_source(f30k):
    builder, features, root = f30k
    reopened = VsePrecomp(config="f30k", data_dir=root / "tfds")
    assert reopened.info.features["image"].shape == (D,)
    source = tfds.data_source("vse_precomp/f30k", split="test", data_dir=root / "tfds")
    np.testing.assert_array_equal(source[3]["image"], features["test"][3])
    restored = pickle.loads(pickle.dumps(builder))
    assert restored.as_data_source("dev")[2]["image_id"] == 2
    with pytest.raises(ValueError, match="feature_dim=7"):
        VsePrecomp(config="f30k", data_dir=root / "tfds", feature_dim=7)
    assert "tensorflow" not in sys.modules


def test_training_pipeline_reads_the_tfds_source(f30k):
    builder, features, _ = f30k
    source = builder.as_data_source("train")
    vocab = build_vocabulary(precomp_captions("train", SIZES["train"]), threshold=1)
    batch = next(iter(training_batches(source, vocab, batch_size=5, max_length=8, seed=0)))
    np.testing.assert_array_equal(batch["image"], features["train"][batch["image_id"]])
    for row in range(5):
        words = vocab.decode(batch["tokens"][row]).split()
        assert words[:3] == ["train", "image", str(batch["image_id"][row])]


def test_coco_testall_and_optional_splits(tmp_path):
    manual = tmp_path / "manual"
    write_precomp(manual, "train", _features("train", 2))
    write_precomp(manual, "testall", _features("testall", 3), per_caption=True)
    builder = build_precomp("coco", manual, tmp_path / "tfds")
    assert {s: v.num_examples for s, v in builder.info.splits.items()} == {"train": 2, "testall": 3}
    np.testing.assert_array_equal(
        builder.as_data_source("testall")[1]["image"], _features("testall", 3)[1]
    )


def test_per_caption_rows_take_every_fifth(tmp_path):
    rows = np.repeat(_features("dev", 3), 5, axis=0)
    rows[1::5] = -1.0  # only rows 0, 5, 10 are used
    write_precomp(tmp_path, "dev", rows[::5])
    np.save(tmp_path / "dev_ims.npy", rows)
    images, captions = load_precomp_split(tmp_path, "dev")
    np.testing.assert_array_equal(images, _features("dev", 3))
    assert captions == precomp_captions("dev", 3)


@pytest.mark.parametrize(
    "rows, caps, message",
    [
        (np.zeros((2, D), np.float32), 9, "dev_caps.txt.*multiple of 5"),
        (np.zeros((3, D), np.float32), 10, "dev_ims.npy.*3 rows.*2 images"),
        (np.zeros((2, D), np.int64), 10, "dev_ims.npy.*2-D float"),
        (np.zeros((10,), np.float32), 10, "dev_ims.npy.*2-D float"),
    ],
)
def test_malformed_split_errors_name_the_file(tmp_path, rows, caps, message):
    write_precomp(tmp_path, "dev", np.zeros((1, D)), captions=[f"c{k}" for k in range(caps)])
    np.save(tmp_path / "dev_ims.npy", rows)
    with pytest.raises(ValueError, match=message):
        load_precomp_split(tmp_path, "dev")


def test_missing_files(tmp_path):
    write_precomp(tmp_path / "no_train", "test", _features("test", 1))
    with pytest.raises(FileNotFoundError, match="train_caps.txt"):
        build_precomp("f8k", tmp_path / "no_train", tmp_path / "tfds")
    write_precomp(tmp_path / "no_ims", "train", _features("train", 1))
    (tmp_path / "no_ims" / "dev_caps.txt").write_text("a\n" * 5)
    with pytest.raises(FileNotFoundError, match="dev_ims.npy"):
        build_precomp("f8k", tmp_path / "no_ims", tmp_path / "tfds2")
    with pytest.raises(ValueError, match="name must be one of"):
        build_precomp("f31k", tmp_path / "no_ims", tmp_path / "tfds3")
    with pytest.raises(ValueError, match="feature_dim"):
        VsePrecomp(config="f8k", feature_dim=0, data_dir=tmp_path / "tfds4")


def test_plain_tfds_flow_and_feature_size_mismatch(tmp_path):
    manual = tmp_path / "manual"
    write_precomp(manual, "train", _features("train", 2))
    write_precomp(manual, "test", _features("test", 1))
    builder = VsePrecomp(config="f8k", data_dir=tmp_path / "tfds")  # D unknown here
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    np.testing.assert_array_equal(
        builder.as_data_source("test")[0]["image"], _features("test", 1)[0]
    )
    write_precomp(manual, "dev", np.zeros((1, D + 1), np.float32))
    with pytest.raises(ValueError, match=f"dev_ims.npy.*{D + 1}-d features, expected {D}"):
        build_precomp("f8k", manual, tmp_path / "tfds2")
