"""Caption encoder of VSE++: word embedding → GRU → state at the last real token.

Faghri et al., "VSE++: Improving Visual-Semantic Embeddings with Hard Negatives",
BMVC 2018, https://arxiv.org/abs/1707.05612.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.models.gru import GRU
from jaxeff.models.layers import (
    check_tokens_and_lengths,
    is_concrete,
    l2_normalize,
    symmetric_uniform,
)


class GRUTextEncoder(nnx.Module):
    r"""Embeds padded captions: word embedding → GRU → last real state → L2 norm.

    .. math::

        v = \mathrm{normalize}\big(h_{\ell}\big), \qquad
        h_t = \mathrm{GRU}(E\,w_t, h_{t-1}),\ h_0 = 0

    where ``ℓ`` is the caption's length, as the reference ``EncoderText`` (embedding
    ``U(-0.1, 0.1)``, GRU state size = ``embed_size``). Stacked layers
    (``num_layers > 1``) feed each layer's states to the next, as ``nn.GRU``.

    Tokens are ``(B, L)`` integer ids padded with anything (0 by convention) after each
    caption's ``lengths[b]`` real tokens; the result does not depend on the padding.
    Outside ``jit``, lengths outside ``[1, L]`` and ids outside the vocabulary raise a
    ``ValueError``; inside ``jit`` (values unknown) a caption with an invalid length gets a
    NaN embedding, so the error shows in the loss instead of passing silently.

    Args:
        vocab_size: number of token ids.
        word_dim: size of the word embeddings (300 in the reference).
        embed_size: size of the joint embedding and of the GRU state.
        num_layers: number of stacked GRU layers.
        use_abs: take ``abs`` of the output (order embeddings).
        unroll: GRU time steps per loop iteration; ``None`` picks by backend (:class:`GRU`).
        rngs: random streams for the initialisation.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> enc = GRUTextEncoder(10, 8, 4, rngs=nnx.Rngs(0))
        >>> enc(jnp.array([[3, 4, 0], [5, 6, 7]]), jnp.array([2, 3])).shape
        (2, 4)
    """

    def __init__(
        self,
        vocab_size: int,
        word_dim: int,
        embed_size: int,
        *,
        num_layers: int = 1,
        use_abs: bool = False,
        unroll: int | bool | None = None,
        rngs: nnx.Rngs,
    ):
        if num_layers < 1:
            raise ValueError(f"`num_layers` must be at least 1, got {num_layers}.")
        self.vocab_size = vocab_size
        self.word_dim = word_dim
        self.embed_size = embed_size
        self.num_layers = num_layers
        self.use_abs = use_abs
        self.embed = nnx.Embed(
            vocab_size, word_dim, embedding_init=symmetric_uniform(0.1), rngs=rngs
        )
        self.layers = nnx.List(
            [
                GRU(word_dim if i == 0 else embed_size, embed_size, unroll=unroll, rngs=rngs)
                for i in range(num_layers)
            ]
        )

    def __call__(self, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
        """Maps ``(B, L)`` token ids and ``(B,)`` lengths to ``(B, embed_size)`` embeddings."""
        check_tokens_and_lengths(tokens, lengths, vocab_size=self.vocab_size)
        tokens = jnp.asarray(tokens)
        lengths = jnp.asarray(lengths)
        x = self.embed(tokens.T)  # time-major: (L, B, word_dim)
        final_state = None
        for layer in self.layers:
            x, final_state = layer(x, lengths, time_major=True)
        assert final_state is not None  # there is at least one layer
        emb = l2_normalize(final_state)
        if self.use_abs:
            emb = jnp.abs(emb)
        if not is_concrete(lengths):
            valid = (lengths >= 1) & (lengths <= tokens.shape[1])
            emb = jnp.where(valid[:, None], emb, jnp.nan)
        return emb
