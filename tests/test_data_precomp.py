"""Tests for the VSE++ precomp tfds builder (array_record, read without TensorFlow)."""

import logging
import os
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


# --- the prepared dataset follows its source files --------------------------------------


def _count_generated(monkeypatch):
    """Counts the splits VsePrecomp generates from now on."""
    calls = []
    generate = VsePrecomp._generate_examples

    def counting(self, images, captions):
        calls.append(images.shape)
        return generate(self, images, captions)

    monkeypatch.setattr(VsePrecomp, "_generate_examples", counting)
    return calls


def _mtimes(data_dir):
    return {os.fspath(p.relative_to(data_dir)): p.stat().st_mtime_ns for p in data_dir.rglob("*")}


def test_rebuilds_when_the_source_files_change(tmp_path, monkeypatch, caplog):
    manual, data_dir = tmp_path / "manual", tmp_path / "tfds"
    calls = _count_generated(monkeypatch)

    def build_and_check(features):
        builder = build_precomp("f8k", manual, data_dir)
        for split, rows in features.items():
            source = builder.as_data_source(split)
            assert len(source) == len(rows)
            for i in range(len(rows)):
                np.testing.assert_array_equal(source[i]["image"], rows[i])
        return builder

    features = {"train": _features("train", 3), "test": _features("test", 2)}
    for split, rows in features.items():
        write_precomp(manual, split, rows)
    build_and_check(features)
    assert len(calls) == 2
    prepared = _mtimes(data_dir)

    with caplog.at_level(logging.WARNING):
        build_and_check(features)  # unchanged files: the prepared dataset is reused
    assert len(calls) == 2 and not caplog.records
    assert _mtimes(data_dir) == prepared

    features["train"] = features["train"] + 1.0  # new values, same shape and file size
    write_precomp(manual, "train", features["train"])
    with caplog.at_level(logging.WARNING):
        build_and_check(features)
    assert len(calls) == 4  # both splits again
    (warning,) = [r for r in caplog.records if r.name.startswith("jaxeff.data")]
    assert warning.levelno == logging.WARNING
    assert "train_ims.npy (modified)" in warning.getMessage()
    assert "test_ims.npy" not in warning.getMessage()  # names only the changed files
    caplog.clear()

    ims = manual / "train_ims.npy"
    stat = ims.stat()
    features["train"] = features["train"] + 1.0
    np.save(ims, features["train"])
    os.utime(ims, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and time: the bytes tell
    build_and_check(features)
    assert len(calls) == 6

    features = {"train": _features("train", 4)[:, :4], "test": _features("test", 2)[:, :4]}
    for split, rows in features.items():  # another feature size and image count
        write_precomp(manual, split, rows)
    write_precomp(manual, "dev", _features("dev", 1)[:, :4])  # a new split
    features["dev"] = _features("dev", 1)[:, :4]
    with caplog.at_level(logging.WARNING):
        builder = build_and_check(features)
    assert builder.info.features["image"].shape == (4,)
    assert "dev_caps.txt (added)" in caplog.text and "train_caps.txt (modified)" in caplog.text
    reopened = VsePrecomp(config="f8k", data_dir=data_dir)  # the new dataset is the stored one
    assert reopened.info.features["image"].shape == (4,)
    assert reopened.info.splits["train"].num_examples == 4


def test_rebuilds_a_dataset_prepared_without_fingerprint(tmp_path, monkeypatch, caplog):
    manual = tmp_path / "manual"
    write_precomp(manual, "train", _features("train", 2))
    builder = build_precomp("f8k", manual, tmp_path / "tfds")
    (builder.data_path / "metadata.json").unlink()  # as written before fingerprints
    calls = _count_generated(monkeypatch)
    with caplog.at_level(logging.WARNING):
        build_precomp("f8k", manual, tmp_path / "tfds")
    assert len(calls) == 1 and "no source fingerprint" in caplog.text


def test_missing_sources_keep_the_prepared_dataset(tmp_path):
    manual = tmp_path / "manual"
    write_precomp(manual, "train", _features("train", 2))
    builder = build_precomp("f8k", manual, tmp_path / "tfds")
    (manual / "train_ims.npy").unlink()
    with pytest.raises(FileNotFoundError, match="train_ims.npy"):
        build_precomp("f8k", manual, tmp_path / "tfds")
    np.testing.assert_array_equal(  # still there, for whoever reads it
        VsePrecomp(config="f8k", data_dir=tmp_path / "tfds").as_data_source("train")[1]["image"],
        _features("train", 2)[1],
    )
    assert builder.data_path.exists()


# --- bad values in the source files -----------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("per_caption", [False, True])
def test_nonfinite_features_name_the_file_and_row(tmp_path, bad, per_caption):
    rows = _features("dev", 4)
    rows[2, 3] = bad
    rows[3, 0] = np.nan  # only the first bad row is named
    write_precomp(tmp_path, "dev", rows, per_caption=per_caption)
    row = 10 if per_caption else 2  # the row in the file
    with pytest.raises(ValueError, match=rf"dev_ims.npy'?, row {row} .*{bad}.*column 3.*finite"):
        load_precomp_split(tmp_path, "dev")
    write_precomp(tmp_path, "train", rows)
    with pytest.raises(ValueError, match=r"train_ims.npy'?, row 2 "):  # the builder refuses too
        build_precomp("f8k", tmp_path, tmp_path / "tfds")


@pytest.mark.parametrize("blank", ["", "   ", "\t \r"])
def test_blank_caption_names_the_file_and_line(tmp_path, blank):
    captions = precomp_captions("dev", 2)
    captions[6] = blank
    captions[8] = ""  # only the first blank line is named
    write_precomp(tmp_path, "dev", _features("dev", 2), captions=captions)
    with pytest.raises(ValueError, match=r"dev_caps.txt'?, line 7, is blank"):
        load_precomp_split(tmp_path, "dev")


def test_non_utf8_captions_name_the_file_and_line(tmp_path):
    write_precomp(tmp_path, "dev", _features("dev", 1))
    lines = (tmp_path / "dev_caps.txt").read_bytes().splitlines(keepends=True)
    lines[3] = "café latin-1\n".encode("latin-1")
    (tmp_path / "dev_caps.txt").write_bytes(b"".join(lines))
    with pytest.raises(ValueError, match=r"dev_caps.txt'?, line 4, is not valid UTF-8"):
        load_precomp_split(tmp_path, "dev")


@pytest.mark.parametrize(
    "keep, message",
    [(0, "is empty"), (6, "not a complete"), (100, "not a complete"), (-4, "not a complete")],
)
def test_empty_or_truncated_npy_names_the_file(tmp_path, keep, message):
    write_precomp(tmp_path, "dev", _features("dev", 2))
    path = tmp_path / "dev_ims.npy"
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(ValueError, match=f"dev_ims.npy.*{message}"):
        load_precomp_split(tmp_path, "dev")
