"""tensorflow-datasets builder for the generated shapes data (``jaxeff.data.shapes``).

One example per image, in generation order (shuffling disabled: families are
consecutive and ``image_id`` is the row index of the split), stored as array_record so
that ``builder.as_data_source(split)`` gives random access without TensorFlow:

  image     (H, W, 3) uint8, stored as raw bytes
  captions  5 strings
  image_id  int64, row index in the split
  group     int64, family id (near-twins share it)
  scene     int64, canonical scene id (equal ids = same meaning; see ``scene_ids``)

The train, dev and test splits are drawn from disjoint seed streams of one seed
(``split_seed``), so split ``s`` equals ``generate_shapes(n, seed=split_seed(seed, s))``.

Example (prepares the files once, then reads them back)::

  builder = build_shapes("/tmp/tfds", train_families=16, dev_families=4, test_families=4)
  source = builder.as_data_source("dev")  # 32 examples; captions come back as bytes
  example = source[0]  # {"image": (32, 32, 3) uint8, "captions": 5 bytes, ...}
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxeff._extras import require
from jaxeff.data import shapes as shapes_lib
from jaxeff.retrieval import CAPTIONS_PER_IMAGE

if TYPE_CHECKING:
    import tensorflow_datasets as tfds
else:
    tfds = require("tensorflow_datasets", extra="data", feature="jaxeff.data")

SPLITS = ("train", "dev", "test")


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """Sizes and generation parameters of the shapes splits."""

    train_families: int = 1024
    dev_families: int = 125
    test_families: int = 125
    family_size: int = 8
    image_size: int = 32
    seed: int = 0

    def num_families(self, split: str) -> int:
        return getattr(self, f"{split}_families")


def _config_name(train_families, dev_families, test_families, family_size, image_size, seed) -> str:
    return (
        f"size{image_size}_family{family_size}_train{train_families}_dev{dev_families}"
        f"_test{test_families}_seed{seed}"
    )


def shapes_config(
    *,
    train_families: int = 1024,
    dev_families: int = 125,
    test_families: int = 125,
    family_size: int = 8,
    image_size: int = 32,
    seed: int = 0,
) -> ShapesConfig:
    """The builder config for these sizes; its name encodes every parameter."""
    params = dict(
        train_families=train_families,
        dev_families=dev_families,
        test_families=test_families,
        family_size=family_size,
        image_size=image_size,
        seed=seed,
    )
    name = _config_name(**params)
    for config in JaxeffShapes.BUILDER_CONFIGS:
        if config.name == name:  # tfds wants the registered object itself
            return config
    return ShapesConfig(name=name, description="Generated near-twin shape scenes.", **params)


class JaxeffShapes(tfds.core.GeneratorBasedBuilder):
    """Families of near-twin two-shape images with five template captions each."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    # Nothing is downloaded, so there are no checksums to look up next to this module.
    url_infos = None
    BUILDER_CONFIGS = [
        ShapesConfig(
            name=_config_name(1024, 125, 125, 8, 32, 0),
            description="Default: 8192 train, 1000 dev, 1000 test images of 32x32.",
        )
    ]

    def __init__(self, *, file_format: str | None = "array_record", **kwargs: Any):
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=shapes_lib.__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=(size, size, 3), dtype=np.uint8, encoding="bytes"
                    ),
                    "captions": tfds.features.Sequence(
                        tfds.features.Text(), length=CAPTIONS_PER_IMAGE
                    ),
                    "image_id": tfds.features.Scalar(dtype=np.int64),
                    "group": tfds.features.Scalar(dtype=np.int64),
                    "scene": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            disable_shuffling=True,
            citation=(
                "@inproceedings{faghri2018vse,\n"
                "  title={VSE++: Improving Visual-Semantic Embeddings with Hard Negatives},\n"
                "  author={Faghri, Fartash and Fleet, David J and Kiros, Jamie Ryan and "
                "Fidler, Sanja},\n"
                "  booktitle={BMVC},\n  year={2018}\n}"
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split):
        config = self.builder_config
        data = shapes_lib.generate_shapes(
            config.num_families(split),
            family_size=config.family_size,
            image_size=config.image_size,
            seed=shapes_lib.split_seed(config.seed, split),
        )
        for i in range(len(data.images)):
            yield (
                i,
                {
                    "image": data.images[i],
                    "captions": data.captions[i],
                    "image_id": i,
                    "group": int(data.family[i]),
                    "scene": int(data.scene[i]),
                },
            )


def build_shapes(
    data_dir: str | os.PathLike,
    *,
    train_families: int = 1024,
    dev_families: int = 125,
    test_families: int = 125,
    family_size: int = 8,
    image_size: int = 32,
    seed: int = 0,
) -> JaxeffShapes:
    """Prepares the shapes dataset under ``data_dir`` (once) and returns its builder.

    Calling it again with the same arguments reuses the prepared files. Read a split
    with ``builder.as_data_source("train")`` (no TensorFlow needed).
    """
    config = shapes_config(
        train_families=train_families,
        dev_families=dev_families,
        test_families=test_families,
        family_size=family_size,
        image_size=image_size,
        seed=seed,
    )
    builder = JaxeffShapes(data_dir=os.fspath(data_dir), config=config)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return builder
