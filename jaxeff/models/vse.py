"""The VSE++ visual-semantic embedding model and a factory from config values.

Faghri et al., "VSE++: Improving Visual-Semantic Embeddings with Hard Negatives",
BMVC 2018, https://arxiv.org/abs/1707.05612.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from jaxeff.models.image_encoders import CNNImageEncoder, PrecompImageEncoder, SmallCNN
from jaxeff.models.text_encoder import GRUTextEncoder

IMAGE_ENCODERS = ("precomp", "cnn")


class VSEModel(nnx.Module):
    """Pairs an image encoder and a caption encoder that map into one joint space.

    Matched pairs should land close: the similarity matrix of ``__call__``'s outputs is
    the input of :func:`jaxeff.losses.vse_hinge_loss`.

    Args:
        image_encoder: module mapping images (or image features) to ``(B, D)``.
        text_encoder: module mapping ``(tokens, lengths)`` to ``(B, D)``.
    """

    def __init__(self, image_encoder: nnx.Module, text_encoder: nnx.Module):
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder

    def encode_images(self, images: jax.Array) -> jax.Array:
        """``(B, D)`` image embeddings."""
        return self.image_encoder(images)

    def encode_captions(self, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
        """``(B, D)`` caption embeddings of ``(B, L)`` padded tokens with ``(B,)`` lengths."""
        return self.text_encoder(tokens, lengths)

    def __call__(
        self, images: jax.Array, tokens: jax.Array, lengths: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Embeds a batch of matched pairs; returns ``(image_emb, caption_emb)``."""
        return self.encode_images(images), self.encode_captions(tokens, lengths)


def vse_model(
    *,
    image_encoder: str = "precomp",
    img_dim: int | None = None,
    image_size: int | Sequence[int] | None = None,
    in_channels: int = 3,
    vocab_size: int,
    word_dim: int = 300,
    embed_size: int = 1024,
    num_layers: int = 1,
    no_imgnorm: bool = False,
    use_abs: bool = False,
    cnn_features: Sequence[int] = (32, 64, 128),
    gru_unroll: int | bool | None = None,
    rngs: nnx.Rngs | int,
) -> VSEModel:
    """Builds a :class:`VSEModel` from config values (names follow the reference flags).

    Args:
        image_encoder: ``"precomp"`` (precomputed features, :class:`PrecompImageEncoder`)
            or ``"cnn"`` (raw images through a :class:`SmallCNN`, :class:`CNNImageEncoder`).
        img_dim: feature size of precomputed image features; required for ``"precomp"``.
        image_size: height and width (an int, or ``(H, W)``) of raw images; required for
            ``"cnn"``.
        in_channels: channels of raw images (``"cnn"`` only).
        vocab_size: number of token ids.
        word_dim: size of the word embeddings.
        embed_size: size of the joint embedding (and of the GRU state).
        num_layers: number of stacked GRU layers.
        no_imgnorm: skip the final L2 norm of image embeddings (the VSE0 baseline).
        use_abs: take ``abs`` of both embeddings (order embeddings).
        cnn_features: channels of the :class:`SmallCNN` blocks (``"cnn"`` only).
        gru_unroll: GRU time steps per loop iteration (``True``: the whole caption;
            ``None``: all on GPU and TPU, one on CPU); unrolling trades compile time for a
            faster step.
        rngs: ``nnx.Rngs`` or an int seed.

    Returns:
        The model.

    Example:
        >>> model = vse_model(img_dim=16, vocab_size=20, word_dim=8, embed_size=4, rngs=0)
        >>> type(model.image_encoder).__name__
        'PrecompImageEncoder'
    """
    if isinstance(rngs, int):
        rngs = nnx.Rngs(rngs)
    images: nnx.Module
    if image_encoder == "precomp":
        if img_dim is None:
            raise ValueError('`img_dim` is required when `image_encoder="precomp"`.')
        images = PrecompImageEncoder(
            img_dim, embed_size, no_imgnorm=no_imgnorm, use_abs=use_abs, rngs=rngs
        )
    elif image_encoder == "cnn":
        if image_size is None:
            raise ValueError('`image_size` is required when `image_encoder="cnn"`.')
        backbone = SmallCNN(in_channels, features=cnn_features, rngs=rngs)
        images = CNNImageEncoder(
            backbone,
            backbone.output_features(image_size),
            embed_size,
            no_imgnorm=no_imgnorm,
            use_abs=use_abs,
            rngs=rngs,
        )
    else:
        raise ValueError(f"`image_encoder` must be one of {IMAGE_ENCODERS}, got {image_encoder!r}.")
    text = GRUTextEncoder(
        vocab_size,
        word_dim,
        embed_size,
        num_layers=num_layers,
        use_abs=use_abs,
        unroll=gru_unroll,
        rngs=rngs,
    )
    return VSEModel(images, text)
