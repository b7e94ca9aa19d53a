"""Datasets and input pipelines: tfds builders (read without TensorFlow), grain loaders.

Builders register with tensorflow-datasets on import of their module:
``vse_precomp`` (:mod:`jaxeff.data.precomp`), ``flickr30k``
(:mod:`jaxeff.data.flickr30k`) and ``jaxeff_shapes`` (:mod:`jaxeff.data.shapes_builder`).
"""

from jaxeff.data.classification import corrupt_labels, duplicate_examples, imbalance_classes
from jaxeff.data.coco import COCO_SPLITS, coco_captions_source
from jaxeff.data.digits import DIGITS_CLASSES, DIGITS_SHAPE, load_digits
from jaxeff.data.flickr30k import Flickr30k, Flickr30kConfig, build_flickr30k, load_karpathy_json
from jaxeff.data.mnist_cifar import IMAGE_DATASETS, load_image_classification, num_classes
from jaxeff.data.pipeline import (
    batches_per_epoch,
    caption_texts,
    eval_caption_batches,
    eval_image_batches,
    group_ids,
    to_float_image,
    training_batches,
)
from jaxeff.data.precomp import PrecompConfig, VsePrecomp, build_precomp, load_precomp_split
from jaxeff.data.shapes import ShapesData, generate_shapes, scene_ids, split_seed
from jaxeff.data.shapes_builder import JaxeffShapes, ShapesConfig, build_shapes, shapes_config
from jaxeff.data.vocab import (
    END_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    START_ID,
    UNK_ID,
    Vocabulary,
    build_vocabulary,
    tokenize,
)
from jaxeff.retrieval import CAPTIONS_PER_IMAGE

__all__ = [
    "group_ids",
    "num_classes",
    "load_image_classification",
    "IMAGE_DATASETS",
    "load_digits",
    "DIGITS_SHAPE",
    "DIGITS_CLASSES",
    "imbalance_classes",
    "duplicate_examples",
    "corrupt_labels",
    "CAPTIONS_PER_IMAGE",
    "COCO_SPLITS",
    "END_ID",
    "Flickr30k",
    "Flickr30kConfig",
    "JaxeffShapes",
    "PAD_ID",
    "PrecompConfig",
    "SPECIAL_TOKENS",
    "START_ID",
    "ShapesConfig",
    "ShapesData",
    "UNK_ID",
    "Vocabulary",
    "VsePrecomp",
    "batches_per_epoch",
    "build_flickr30k",
    "build_precomp",
    "build_shapes",
    "build_vocabulary",
    "caption_texts",
    "coco_captions_source",
    "eval_caption_batches",
    "eval_image_batches",
    "generate_shapes",
    "load_karpathy_json",
    "load_precomp_split",
    "scene_ids",
    "shapes_config",
    "split_seed",
    "to_float_image",
    "tokenize",
    "training_batches",
]
