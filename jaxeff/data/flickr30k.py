"""tfds builder for raw Flickr30K images with the Karpathy splits used by VSE++.

Faghri et al., "VSE++: Improving Visual-Semantic Embeddings with Hard Negatives",
BMVC 2018, https://arxiv.org/abs/1707.05612 trains and evaluates on the splits of
Karpathy and Fei-Fei (2015): 29,000 train, 1,014 val and 1,000 test images, 5 captions
each. tfds has no Flickr30K builder; this one reads, from the manual dir,

* ``dataset_flickr30k.json``: ``{"images": [{"filename", "split", "sentences":
  [{"raw": ...}, ...], ...}, ...]}`` with ``split`` in train / val / test (/ restval);
* the JPEG files, in ``flickr30k-images/`` or directly in the manual dir.

Each record is one image: ``image`` (encoded JPEG, decoded to uint8 ``(H, W, 3)`` on
read), ``captions`` (its first 5 sentences), ``image_id`` (its position in the split, in
JSON order), ``group`` (equal to ``image_id``) and ``filename``. Splits are ``train``,
``dev`` (Karpathy val) and ``test``; config ``karpathy_restval`` adds the ``restval``
images to train.

The prepared dataset stores a fingerprint of the JSON and of the images it was built
from; :func:`build_flickr30k` builds it again when they change (see ``_fingerprint``).
"""

from __future__ import annotations

import dataclasses
import json
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

__all__ = ["Flickr30k", "Flickr30kConfig", "build_flickr30k", "load_karpathy_json"]

ANNOTATIONS_FILE = "dataset_flickr30k.json"
IMAGES_FOLDER = "flickr30k-images"
# Bytes hashed per image for the source fingerprint; the JPEG header is in the first few.
_IMAGE_HEAD_BYTES = 1 << 12

_CITATION = """\
@article{young2014image,
  title={From image descriptions to visual denotations},
  author={Young, Peter and Lai, Alice and Hodosh, Micah and Hockenmaier, Julia},
  journal={Transactions of the Association for Computational Linguistics},
  volume={2}, pages={67--78}, year={2014}
}
@inproceedings{karpathy2015deep,
  title={Deep visual-semantic alignments for generating image descriptions},
  author={Karpathy, Andrej and Fei-Fei, Li},
  booktitle={CVPR}, year={2015}
}
"""


def load_karpathy_json(path: epath.PathLike) -> list[dict]:
    """Reads and checks a Karpathy split file (``dataset_<name>.json``).

    Args:
      path: the JSON file.

    Returns:
      The ``images`` entries in file order, each with at least ``filename`` (str),
      ``split`` (str) and ``captions`` (the first 5 ``sentences[k]["raw"]``, stripped).

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: naming the file and entry, when the JSON does not have that layout or an
        image has fewer than 5 sentences.
    """
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Karpathy split file {os.fspath(path)!r} does not exist.")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{os.fspath(path)!r} is not valid JSON: {e}") from None
    if not isinstance(content, dict) or not isinstance(content.get("images"), list):
        raise ValueError(f'{os.fspath(path)!r} must be a JSON object with an "images" list.')
    entries = []
    for k, image in enumerate(content["images"]):
        where = f'{os.fspath(path)!r}, "images"[{k}]'
        if not (
            isinstance(image, dict)
            and isinstance(image.get("filename"), str)
            and isinstance(image.get("split"), str)
            and isinstance(image.get("sentences"), list)
        ):
            raise ValueError(f'{where} needs a str "filename", a str "split", a "sentences" list.')
        raws = [s.get("raw") if isinstance(s, dict) else None for s in image["sentences"]]
        captions = [r.strip() for r in raws[:CAPTIONS_PER_IMAGE] if isinstance(r, str)]
        if len(captions) < CAPTIONS_PER_IMAGE:
            raise ValueError(
                f"{where} ({image['filename']}) needs at least {CAPTIONS_PER_IMAGE} sentences "
                f'with a str "raw", got {len(raws)} sentences.'
            )
        entries.append({**image, "captions": captions})
    return entries


def _karpathy_splits(
    root: epath.Path, train_splits: tuple[str, ...]
) -> tuple[dict[str, list[dict]], epath.Path]:
    """The JSON entries of each of our splits (non-empty ones) and the images folder.

    Raises:
      ValueError: ``train`` has no image, or the JSON is malformed.
      FileNotFoundError: the JSON or an image file of a selected entry is missing.
    """
    entries = load_karpathy_json(root / ANNOTATIONS_FILE)
    images_dir = root / IMAGES_FOLDER if (root / IMAGES_FOLDER).is_dir() else root
    karpathy = {"train": train_splits, "dev": ("val",), "test": ("test",)}
    selected = {}
    for split, sources in karpathy.items():
        chosen = [e for e in entries if e["split"] in sources]
        if not chosen:
            if split == "train":
                raise ValueError(
                    f"{os.fspath(root / ANNOTATIONS_FILE)!r} has no image with split in {sources}."
                )
            continue
        missing = [e["filename"] for e in chosen if not (images_dir / e["filename"]).exists()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image files of split {split!r} are missing, e.g. "
                f"{os.fspath(images_dir / missing[0])!r}."
            )
        selected[split] = chosen
    return selected, images_dir


def _source_fingerprint(
    root: epath.Path, images_dir: epath.Path, selected: dict[str, list[dict]]
) -> dict:
    """Fingerprint of the JSON and of every image of ``selected``, names relative to ``root``."""
    prefix = "" if images_dir == root else f"{IMAGES_FOLDER}/"
    images = [prefix + e["filename"] for entries in selected.values() for e in entries]
    return {
        **_fingerprint.source_fingerprint(root, [ANNOTATIONS_FILE]),
        **_fingerprint.source_fingerprint(root, images, head_bytes=_IMAGE_HEAD_BYTES),
    }


@dataclasses.dataclass(eq=False)
class Flickr30kConfig(tfds.core.BuilderConfig):
    """Config of the Flickr30K builder.

    Attributes:
      train_splits: the Karpathy splits that form ``train``.
    """

    train_splits: tuple[str, ...] = ("train",)


class Flickr30k(tfds.core.GeneratorBasedBuilder):
    """Flickr30K JPEG images and captions, one record per image, Karpathy splits.

    Like any tfds builder, ``download_and_prepare`` reuses a prepared dataset as it is;
    :func:`build_flickr30k` also rebuilds it when the source files have changed.

    Usage::

      builder = Flickr30k(manual_dir="/data/flickr30k", data_dir=tmp)
      builder.download_and_prepare()
      test = builder.as_data_source("test")  # test[i]["image"]: uint8 (H, W, 3)
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # tfds derives this path through `importlib_resources`, which it does not install.
    code_path = epath.Path(__file__)
    BUILDER_CONFIGS = [
        Flickr30kConfig(name="karpathy", description="train = Karpathy train."),
        Flickr30kConfig(
            name="karpathy_restval",
            train_splits=("train", "restval"),
            description="train = Karpathy train + restval.",
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
    Put {ANNOTATIONS_FILE} (from Karpathy's caption_datasets.zip) in the manual dir, and
    the Flickr30K JPEG files in its {IMAGES_FOLDER}/ subfolder (or next to the JSON).
    """

    def __init__(
        self,
        *,
        manual_dir: epath.PathLike | None = None,
        file_format: str = "array_record",
        **kwargs: Any,
    ):
        """Creates the builder.

        Args:
          manual_dir: folder with the JSON and images; overrides the download config's
            ``manual_dir`` when given.
          file_format: record format; ``"array_record"`` allows random access.
          **kwargs: ``config``, ``data_dir``, ``version`` as in ``tfds.core.DatasetBuilder``.
        """
        self._manual_root = None if manual_dir is None else epath.Path(manual_dir)
        super().__init__(file_format=file_format, **kwargs)
        self._original_state.update(manual_dir=manual_dir, file_format=file_format)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Flickr30K images with 5 captions each, Karpathy splits.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "captions": tfds.features.Sequence(
                        tfds.features.Text(), length=CAPTIONS_PER_IMAGE
                    ),
                    "image_id": np.int64,
                    "group": np.int64,
                    "filename": tfds.features.Text(),
                }
            ),
            homepage="https://shannon.cs.illinois.edu/DenotationGraph/",
            citation=_CITATION,
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        root = self._manual_root if self._manual_root is not None else dl_manager.manual_dir
        root = epath.Path(root)
        selected, images_dir = _karpathy_splits(root, self.builder_config.train_splits)
        # Taken before reading: a file changed meanwhile makes the next build rebuild.
        self.info.metadata[_fingerprint.FINGERPRINT_KEY] = _source_fingerprint(
            root, images_dir, selected
        )
        return {
            split: self._generate_examples(entries, [images_dir / e["filename"] for e in entries])
            for split, entries in selected.items()
        }

    def _generate_examples(self, entries: list[dict], paths: list[epath.Path]):
        for i, (entry, path) in enumerate(zip(entries, paths, strict=True)):
            yield (
                i,
                {
                    "image": os.fspath(path),
                    "captions": entry["captions"],
                    "image_id": i,
                    "group": i,
                    "filename": entry["filename"],
                },
            )


def build_flickr30k(
    manual_dir: epath.PathLike, data_dir: epath.PathLike, *, restval: bool = False
) -> Flickr30k:
    """Prepares (once) and returns the raw-image Flickr30K builder.

    The prepared dataset in ``data_dir`` is reused while the JSON and the images it was
    built from are unchanged (same names, sizes, modification times and leading bytes,
    stored with it). When they differ, or it was prepared without that fingerprint, it
    is deleted and built again, with a warning naming the changed files; so do not call
    this while another process reads the same dataset.

    Args:
      manual_dir: folder with ``dataset_flickr30k.json`` and the images.
      data_dir: where tfds writes the prepared dataset.
      restval: add the Karpathy ``restval`` images to ``train``.

    Returns:
      The prepared :class:`Flickr30k`; ``builder.as_data_source(split)`` gives the records.

    Raises:
      FileNotFoundError: ``manual_dir``, the JSON or an image of a split is missing.
      ValueError: the JSON is malformed or has no training image.
    """
    root = epath.Path(manual_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"manual_dir {os.fspath(manual_dir)!r} is not a directory.")
    config = "karpathy_restval" if restval else "karpathy"
    prepared = Flickr30k(config=config, data_dir=data_dir)
    selected, images_dir = _karpathy_splits(root, prepared.builder_config.train_splits)
    current = _source_fingerprint(root, images_dir, selected)
    _fingerprint.clear_if_stale(prepared, current, source=root)
    builder = Flickr30k(config=config, data_dir=data_dir, manual_dir=manual_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    )
    return builder
