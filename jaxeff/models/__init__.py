"""Flax nnx models used by the experiments.

VSE++ (Faghri et al., BMVC 2018): image encoders (precomputed features or a CNN), a GRU
caption encoder, the joint :class:`VSEModel`, and :func:`vse_model` to build one from
config values. Robustness of linear models (Faghri et al. 2021): networks whose function
is linear, :class:`DeepLinear` and :class:`LinearConvNet` (circular convolutions), each with
``linear_classifier()`` giving the equivalent :class:`LinearClassifier` for the closed forms
of :mod:`jaxeff.robust`.
"""

from jaxeff.models.gru import GRU
from jaxeff.models.image_encoders import CNNImageEncoder, PrecompImageEncoder, SmallCNN
from jaxeff.models.layers import l2_normalize
from jaxeff.models.linear import DeepLinear, LinearClassifier, LinearConvNet
from jaxeff.models.text_encoder import GRUTextEncoder
from jaxeff.models.vse import IMAGE_ENCODERS, VSEModel, vse_model

__all__ = [
    "CNNImageEncoder",
    "DeepLinear",
    "LinearClassifier",
    "LinearConvNet",
    "GRU",
    "GRUTextEncoder",
    "IMAGE_ENCODERS",
    "PrecompImageEncoder",
    "SmallCNN",
    "VSEModel",
    "l2_normalize",
    "vse_model",
]
