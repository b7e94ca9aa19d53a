"""tfds builder for the VSE++ "precomp" image-feature files (COCO, Flickr30K, Flickr8K).

Faghri et al., "VSE++: Improving Visual-Semantic Embeddings with Hard Negatives",
BMVC 2018, https://arxiv.org/abs/1707.05612. The reference release ships, per dataset, a
folder ``<name>_precomp/`` holding for each split

* ``<split>_caps.txt``: one caption per line, 5 consecutive lines per image (the image
  of caption line ``c`` is ``c // 5``);
* ``<split>_ims.npy``: a float array of CNN features, either one row per image or one
  row per caption (5 identical rows per image).

The builder turns each split into one record per image: ``image`` (float32 ``(D,)``),
``captions`` (its 5 captions), ``image_id`` (the image's row in its split) and ``group``
(equal to ``image_id``). Records keep file order, which the evaluation relies on, and
are stored as array_record so that ``builder.as_data_source(split)`` reads them by index
without TensorFlow.

The prepared dataset stores a fingerprint of the files it was built from;
:func:`build_precomp` builds it again when they change (see ``_fingerprint``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

import numpy as np
from etils import epath

from jaxeff._extras import require
from jaxeff.data import _fingerprint
from jaxeff.retrieval import CAPTIONS_PER_IMAGE

if TYPE_CHECKING:
    import tensorflow_datasets as tfds
else:
    tfds = require("tensorflow_datasets", extra="data", feature="jaxeff.data")

__all__ = [
    "PrecompConfig",
    "VsePrecomp",
    "build_precomp",
    "load_precomp_split",
]


_CITATION = """\
@inproceedings{faghri2018vse,
  title={VSE++: Improving Visual-Semantic Embeddings with Hard Negatives},
  author={Faghri, Fartash and Fleet, David J and Kiros, Jamie Ryan and Fidler, Sanja},
  booktitle={British Machine Vision Conference (BMVC)},
  year={2018},
  url={https://arxiv.org/abs/1707.05612}
}
"""


@dataclasses.dataclass(eq=False)
class PrecompConfig(tfds.core.BuilderConfig):
    """Config of one precomp dataset.

    Attributes:
      splits: the splits to look for; ``train`` must exist, the others are built when
        their files are present.
    """

    splits: tuple[str, ...] = ("train", "dev", "test")


def _precomp_folder(manual_dir: epath.PathLike, name: str) -> epath.Path:
    """``manual_dir/<name>_precomp`` when that folder exists, else ``manual_dir``."""
    root = epath.Path(manual_dir)
    nested = root / f"{name}_precomp"
    return nested if nested.is_dir() else root


def _source_names(folder: epath.Path, splits: tuple[str, ...]) -> list[str]:
    """The names of the split files present in ``folder``: what the builder reads."""
    names = [f"{split}_{kind}" for split in splits for kind in ("caps.txt", "ims.npy")]
    return [name for name in names if (folder / name).exists()]


def _source_fingerprint(folder: epath.Path, splits: tuple[str, ...]) -> dict:
    return _fingerprint.source_fingerprint(folder, _source_names(folder, splits))


def _read_captions(path: epath.Path) -> list[str]:
    """The stripped lines of a caption file; each must be non-blank UTF-8."""
    if not path.exists():
        raise FileNotFoundError(f"Caption file {os.fspath(path)!r} does not exist.")
    captions = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            caption = line.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise ValueError(
                f"Caption file {os.fspath(path)!r}, line {number}, is not valid UTF-8 "
                f"({e.reason} at byte {e.start} of the line)."
            ) from None
        if not caption:
            raise ValueError(
                f"Caption file {os.fspath(path)!r}, line {number}, is blank; every line must "
                "hold one caption."
            )
        captions.append(caption)
    return captions


def _open_features(path: epath.Path) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"Image feature file {os.fspath(path)!r} does not exist.")
    size = os.path.getsize(os.fspath(path))
    if size == 0:
        raise ValueError(
            f"Image feature file {os.fspath(path)!r} is empty (0 bytes); expected a .npy array."
        )
    try:
        features = np.load(os.fspath(path), mmap_mode="r", allow_pickle=False)
    except (EOFError, ValueError) as e:
        raise ValueError(
            f"Image feature file {os.fspath(path)!r} ({size} bytes) is not a complete numeric "
            f".npy array (truncated, or another format): {e}"
        ) from None
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.floating):
        raise ValueError(
            f"{os.fspath(path)!r} must hold a 2-D float array (one feature row per image or "
            f"per caption), got shape {features.shape} and dtype {features.dtype}."
        )
    return features


def _feature_dim_of(path: epath.Path) -> int:
    return int(_open_features(path).shape[1])


def _check_finite(features: np.ndarray, path: epath.Path, row_step: int) -> None:
    """Raises naming the first file row of ``features`` (every ``row_step``-th) with NaN/inf."""
    row_bytes = max(1, features.shape[1] * features.itemsize * row_step)
    chunk = max(1, (64 << 20) // row_bytes)  # about 64 MiB read at a time
    for start in range(0, features.shape[0], chunk):
        finite = np.isfinite(np.asarray(features[start : start + chunk])).all(axis=1)
        if not finite.all():
            row = start + int(np.argmin(finite))
            column = int(np.argmin(np.isfinite(features[row])))
            raise ValueError(
                f"Image feature file {os.fspath(path)!r}, row {row * row_step} (counting from "
                f"0), holds {features[row, column]} at column {column}; features must be finite."
            )


def load_precomp_split(folder: epath.PathLike, split: str) -> tuple[np.ndarray, list[str]]:
    """Reads and checks one split of a precomp folder.

    Args:
      folder: the folder holding ``<split>_ims.npy`` and ``<split>_caps.txt``.
      split: split name, e.g. ``"train"``, ``"dev"``, ``"test"``, ``"testall"``.

    Returns:
      ``(images, captions)``: a memory-mapped ``(N, D)`` float array, one row per image
      (every 5th row when the file has one row per caption), and the ``5 N`` captions.

    Raises:
      FileNotFoundError: a file of the split is missing.
      ValueError: naming the file, when a caption line is blank or not UTF-8 (and the
        line, counting from 1), the caption count is not a positive multiple of 5, the
        features are not a complete 2-D float ``.npy`` array (empty or truncated file),
        their rows match neither the image nor the caption count, or a used row holds
        NaN or infinity (and the row, counting from 0).
    """
    folder = epath.Path(folder)
    caps_path = folder / f"{split}_caps.txt"
    ims_path = folder / f"{split}_ims.npy"
    captions = _read_captions(caps_path)
    if not captions or len(captions) % CAPTIONS_PER_IMAGE:
        raise ValueError(
            f"{os.fspath(caps_path)!r} must hold {CAPTIONS_PER_IMAGE} captions per image (a "
            f"positive multiple of {CAPTIONS_PER_IMAGE} lines), got {len(captions)} lines."
        )
    features = _open_features(ims_path)
    num_images = len(captions) // CAPTIONS_PER_IMAGE
    row_step = 1
    if features.shape[0] == len(captions) and num_images != len(captions):
        features, row_step = features[::CAPTIONS_PER_IMAGE], CAPTIONS_PER_IMAGE
    elif features.shape[0] != num_images:
        raise ValueError(
            f"{os.fspath(ims_path)!r} has {features.shape[0]} rows but {os.fspath(caps_path)!r} "
            f"describes {num_images} images: expected {num_images} rows (one per image) or "
            f"{len(captions)} (one per caption)."
        )
    _check_finite(features, ims_path, row_step)
    return features, captions


class VsePrecomp(tfds.core.GeneratorBasedBuilder):
    """Precomputed image features and captions of the VSE++ release, one record per image.

    The feature size ``D`` is part of the features spec. It is taken, in order, from the
    already prepared dataset in ``data_dir``, from ``feature_dim``, or from the header of
    the manual dir's ``train_ims.npy``; when none is available the spec says ``(None,)``.

    Like any tfds builder, ``download_and_prepare`` reuses a prepared dataset as it is;
    :func:`build_precomp` also rebuilds it when the source files have changed.

    Usage::

      builder = VsePrecomp(config="f30k", manual_dir="data/f30k_precomp", data_dir=tmp)
      builder.download_and_prepare()
      test = builder.as_data_source("test")  # test[i]["image"], test[i]["captions"]
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # tfds derives this path through `importlib_resources`, which it does not install.
    code_path = epath.Path(__file__)
    BUILDER_CONFIGS = [
        PrecompConfig(name="coco", splits=("train", "dev", "test", "testall"),
                      description="MS-COCO, Karpathy splits; testall is the 5K test set."),
        PrecompConfig(name="f30k", description="Flickr30K, Karpathy splits (1K test)."),
        PrecompConfig(name="f8k", description="Flickr8K (1K test)."),
    ]  # fmt: skip
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Put the files of one reference precomp folder (``<split>_ims.npy`` and
    ``<split>_caps.txt`` for split train, dev, test and, for coco, testall) in the manual
    dir, either directly or inside a ``<config>_precomp/`` subfolder (coco_precomp,
    f30k_precomp, f8k_precomp).
    """

    def __init__(
        self,
        *,
        feature_dim: int | None = None,
        manual_dir: epath.PathLike | None = None,
        file_format: str = "array_record",
        **kwargs: Any,
    ):
        """Creates the builder.

        Args:
          feature_dim: the image feature size ``D``; optional (see the class docstring).
          manual_dir: where the precomp files are; overrides the download config's
            ``manual_dir`` when given.
          file_format: record format; ``"array_record"`` allows random access.
          **kwargs: ``config``, ``data_dir``, ``version`` as in ``tfds.core.DatasetBuilder``.
        """
        if feature_dim is not None and (
            not isinstance(feature_dim, int | np.integer) or feature_dim < 1
        ):
            raise ValueError(f"feature_dim must be a positive int or None, got {feature_dim!r}.")
        self._feature_dim = None if feature_dim is None else int(feature_dim)
        self._manual_root = None if manual_dir is None else epath.Path(manual_dir)
        super().__init__(file_format=file_format, **kwargs)
        self._original_state.update(
            feature_dim=feature_dim, manual_dir=manual_dir, file_format=file_format
        )

    def _resolve_feature_dim(self) -> int | None:
        if (self.data_path / "features.json").exists():
            stored = tfds.features.FeatureConnector.from_config(os.fspath(self.data_path))
            dim = stored["image"].shape[0]
            if self._feature_dim is not None and dim != self._feature_dim:
                raise ValueError(
                    f"feature_dim={self._feature_dim} but the dataset prepared in "
                    f"{os.fspath(self.data_path)!r} has {dim}-d image features."
                )
            return dim
        if self._feature_dim is not None:
            return self._feature_dim
        if self._manual_root is not None:
            train = _precomp_folder(self._manual_root, self.builder_config.name) / "train_ims.npy"
            if train.exists():
                return _feature_dim_of(train)
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        dim = self._resolve_feature_dim()
        return tfds.core.DatasetInfo(
            builder=self,
            description="Precomputed CNN image features and captions (VSE++ release).",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(dim,), dtype=np.float32),
                    "captions": tfds.features.Sequence(
                        tfds.features.Text(), length=CAPTIONS_PER_IMAGE
                    ),
                    "image_id": np.int64,
                    "group": np.int64,
                }
            ),
            homepage="https://github.com/fartashf/vsepp",
            citation=_CITATION,
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        root = self._manual_root if self._manual_root is not None else dl_manager.manual_dir
        folder = _precomp_folder(root, self.builder_config.name)
        # Taken before reading: a file changed meanwhile makes the next build rebuild.
        self.info.metadata[_fingerprint.FINGERPRINT_KEY] = _source_fingerprint(
            folder, self.builder_config.splits
        )
        dim = self.info.features["image"].shape[0]
        generators = {}
        for split in self.builder_config.splits:
            caps, ims = folder / f"{split}_caps.txt", folder / f"{split}_ims.npy"
            if split != "train" and not caps.exists() and not ims.exists():
                continue
            images, captions = load_precomp_split(folder, split)
            dim = images.shape[1] if dim is None else dim  # the train split comes first
            if images.shape[1] != dim:
                raise ValueError(
                    f"{os.fspath(ims)!r} has {images.shape[1]}-d features, expected {dim}."
                )
            generators[split] = self._generate_examples(images, captions)
        return generators

    def _generate_examples(self, images: np.ndarray, captions: list[str]):
        for i in range(images.shape[0]):
            yield (
                i,
                {
                    "image": np.asarray(images[i], dtype=np.float32),
                    "captions": captions[CAPTIONS_PER_IMAGE * i : CAPTIONS_PER_IMAGE * (i + 1)],
                    "image_id": i,
                    "group": i,
                },
            )


def build_precomp(
    name: str,
    manual_dir: epath.PathLike,
    data_dir: epath.PathLike,
    *,
    feature_dim: int | None = None,
) -> VsePrecomp:
    """Prepares (once) and returns the precomp builder of one dataset.

    The prepared dataset in ``data_dir`` is reused while the split files it was built
    from are unchanged (same names, sizes, modification times and leading bytes, stored
    with it). When they differ, or it was prepared without that fingerprint, it is
    deleted and built again, with a warning naming the changed files; so do not call
    this while another process reads the same dataset. Missing train files raise before
    anything is deleted.

    Args:
      name: ``"coco"``, ``"f30k"`` or ``"f8k"``.
      manual_dir: folder with the precomp files (or holding ``<name>_precomp/``).
      data_dir: where tfds writes the prepared dataset.
      feature_dim: optional feature size; read from ``train_ims.npy`` when omitted.

    Returns:
      The prepared :class:`VsePrecomp`; ``builder.as_data_source(split)`` gives the records.

    Raises:
      FileNotFoundError: ``manual_dir`` or a file of a split is missing.
      ValueError: unknown ``name``, ``feature_dim`` unlike the features, or a malformed
        split file (see :func:`load_precomp_split`).
    """
    names = [c.name for c in VsePrecomp.BUILDER_CONFIGS]
    if name not in names:
        raise ValueError(f"name must be one of {names}, got {name!r}.")
    if not epath.Path(manual_dir).is_dir():
        raise FileNotFoundError(f"manual_dir {os.fspath(manual_dir)!r} is not a directory.")
    folder = _precomp_folder(manual_dir, name)
    for required in ("train_caps.txt", "train_ims.npy"):  # before touching a prepared dataset
        if not (folder / required).exists():
            raise FileNotFoundError(
                f"{os.fspath(folder / required)!r} does not exist; every dataset needs a "
                "train split."
            )
    prepared = VsePrecomp(config=name, data_dir=data_dir)
    current = _source_fingerprint(folder, prepared.builder_config.splits)
    _fingerprint.clear_if_stale(prepared, current, source=folder)
    builder = VsePrecomp(
        config=name, data_dir=data_dir, manual_dir=manual_dir, feature_dim=feature_dim
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    )
    return builder
