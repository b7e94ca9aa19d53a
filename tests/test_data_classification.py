"""Classification data: digits, tfds MNIST/CIFAR-10 read without TensorFlow, and variants.

The tfds tests write tiny datasets in the real on-disk format: builders that subclass
the registered ``mnist``/``cifar10`` builders, keep their name, version and features, and
generate a few PNG-encoded images (encoded with PIL, so no TensorFlow) into array_record
files; the loader then opens them with the stock ``tfds.builder(name, data_dir=...)``.
"""

import io
import json
import os

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import cifar, mnist

from jaxeff.data import classification, digits, mnist_cifar

_BUILDERS = {"mnist": (mnist.MNIST, (28, 28, 1)), "cifar10": (cifar.Cifar10, (32, 32, 3))}


def tiny_images(name, num, seed):
    """``num`` images whose first pixel is the row number, and labels ``row % 10``."""
    shape = _BUILDERS[name][1]
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num, *shape), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(num)
    return images, (np.arange(num) % 10).astype(np.int64)


def write_tiny_image_dataset(name, data_dir, sizes=None):
    """Prepares ``name`` under ``data_dir`` with ``sizes = {split: count}`` examples.

    Returns ``{split: (images, labels)}`` as generated (tfds stores them shuffled).
    """
    sizes = sizes or {"train": 24, "test": 10}
    base, _ = _BUILDERS[name]
    arrays = {split: tiny_images(name, n, seed) for seed, (split, n) in enumerate(sizes.items())}

    def png(image):
        out = io.BytesIO()
        PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(out, "PNG")
        return out.getvalue()

    class Tiny(base, skip_registration=True):
        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: self._generate(split) for split in arrays}

        def _generate(self, split):
            images, labels = arrays[split]
            for i, (image, label) in enumerate(zip(images, labels, strict=True)):
                example = {"image": png(image), "label": int(label)}
                if name == "cifar10":
                    example["id"] = f"{split}_{i:05d}"
                yield i, example

    Tiny.name = name
    builder = Tiny(data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return arrays


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    written = {name: write_tiny_image_dataset(name, root) for name in _BUILDERS}
    return root, written


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_reads_prepared_tfds_images_without_tensorflow(tfds_dir, name):
    root, written = tfds_dir
    for split, (images, labels) in written[name].items():
        got = mnist_cifar.load_image_classification(name, data_dir=root, split=split)
        assert got["image"].dtype == np.uint8 and got["image"].shape == images.shape
        assert got["label"].dtype == np.int32
        order = np.argsort(got["image"][:, 0, 0, 0])  # the first pixel is the row number
        np.testing.assert_array_equal(got["image"][order], images)
        np.testing.assert_array_equal(got["label"][order], labels)
    first = mnist_cifar.load_image_classification(name, data_dir=root, max_examples=5)
    assert len(first["label"]) == 5
    assert mnist_cifar.num_classes(name, data_dir=root) == 10


def test_tfds_errors_say_how_to_prepare(tfds_dir, tmp_path):
    root, _ = tfds_dir
    with pytest.raises(FileNotFoundError, match="tfds build cifar100"):
        mnist_cifar.load_image_classification("cifar100", data_dir=tmp_path)
    with pytest.raises(ValueError, match="no split 'validation'"):
        mnist_cifar.load_image_classification("mnist", data_dir=root, split="validation")
    with pytest.raises(ValueError, match="data_dir"):
        mnist_cifar.load_image_classification("mnist", data_dir="")
    # A copy stored as TFRecord cannot be read without TensorFlow: say how to convert it.
    copy = tmp_path / "tfrecord"
    write_tiny_image_dataset("mnist", copy, {"train": 3})
    (info_path,) = list(copy.glob("mnist/*/dataset_info.json"))
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match="stored as 'tfrecord'"):
        mnist_cifar.load_image_classification("mnist", data_dir=copy)


def test_digits_split_is_seeded_and_disjoint():
    a = digits.load_digits(test_fraction=0.2, seed=0)
    b = digits.load_digits(test_fraction=0.2, seed=0)
    c = digits.load_digits(test_fraction=0.2, seed=1)
    train, test = a["train"], a["test"]
    assert train["image"].shape == (1438, 8, 8, 1) and test["image"].shape == (359, 8, 8, 1)
    assert train["image"].dtype == np.float32 and train["label"].dtype == np.int32
    assert 0.0 <= train["image"].min() and train["image"].max() == 1.0
    assert set(np.unique(train["label"])) == set(range(10))
    np.testing.assert_array_equal(train["image"], b["train"]["image"])
    assert not np.array_equal(train["label"], c["train"]["label"])
    rows = {x.tobytes() for x in train["image"]}
    assert sum(x.tobytes() in rows for x in test["image"]) < 5  # a few digits repeat
    with pytest.raises(ValueError, match="test_fraction"):
        digits.load_digits(test_fraction=1.0)


def small_data(n=40, classes=4):
    return {
        "image": np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32),
        "label": (np.arange(n) % classes).astype(np.int32),
    }


def test_duplicate_examples_appends_copies():
    data = small_data()
    out = classification.duplicate_examples(data, num_examples=3, copies=5, seed=1)
    assert len(out["label"]) == 40 + 15
    np.testing.assert_array_equal(out["image"][:40], data["image"])
    extra = out["image"][40:, 0].reshape(3, 5)
    assert (extra == extra[:, :1]).all() and len(set(extra[:, 0])) == 3
    np.testing.assert_array_equal(out["label"][40:], out["image"][40:, 0].astype(int) % 4)
    again = classification.duplicate_examples(data, num_examples=3, copies=5, seed=1)
    np.testing.assert_array_equal(again["image"], out["image"])
    with pytest.raises(ValueError, match="exceeds"):
        classification.duplicate_examples(data, num_examples=41, copies=1)


def test_corrupt_labels_redraws_a_fraction():
    labels = np.zeros(1000, np.int32)
    noisy = classification.corrupt_labels(labels, fraction=0.3, num_classes=10, seed=0)
    changed = np.mean(noisy != labels)
    assert 0.3 * 0.9 - 0.05 < changed < 0.3 * 0.9 + 0.05  # 1/10 of redraws keep label 0
    assert noisy.dtype == labels.dtype and noisy.max() < 10
    np.testing.assert_array_equal(labels, 0)  # input untouched
    same = classification.corrupt_labels(labels, fraction=0.3, num_classes=10, seed=0)
    np.testing.assert_array_equal(noisy, same)
    assert (classification.corrupt_labels(labels, fraction=0.0, num_classes=10) == 0).all()
    with pytest.raises(ValueError, match="fraction"):
        classification.corrupt_labels(labels, fraction=1.5, num_classes=10)


def test_imbalance_follows_a_long_tailed_profile():
    data = small_data(n=400, classes=4)  # 100 per class
    out = classification.imbalance_classes(data, ratio=0.1, num_classes=4, seed=0)
    counts = np.bincount(out["label"], minlength=4)
    np.testing.assert_array_equal(counts, [100, 46, 21, 10])  # 100 · 0.1^(k/3)
    assert np.all(np.diff(out["image"][:, 0]) > 0)  # original order kept
    same = classification.imbalance_classes(data, ratio=1.0, num_classes=4)
    np.testing.assert_array_equal(same["image"], data["image"])
    with pytest.raises(ValueError, match="ratio"):
        classification.imbalance_classes(data, ratio=0.0, num_classes=4)
    with pytest.raises(KeyError, match="label"):
        classification.imbalance_classes({"x": data["image"]}, ratio=0.5, num_classes=4)
