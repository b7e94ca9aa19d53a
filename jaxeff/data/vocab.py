"""Caption vocabulary and a deterministic, network-free tokenizer.

The VSE++ reference (Faghri et al. 2018, arXiv 1707.05612) tokenised captions with
NLTK and kept the words seen at least 4 times. Here the tokenizer is a lowercase
regular-expression split into words and single punctuation marks, and the counts come
from the *training* captions only (the reference vocabulary also counted test captions).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import re
import secrets
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "END_ID",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "START_ID",
    "UNK_ID",
    "Vocabulary",
    "build_vocabulary",
    "tokenize",
]

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
# Last line of a saved vocabulary. It holds spaces, so it cannot be a token.
_CHECKSUM_LINE = "# {count} tokens, sha256 {digest}"
_CHECKSUM_RE = re.compile(r"# (\d+) tokens, sha256 ([0-9a-f]{64})")


def _as_text(caption: str | bytes, name: str = "caption") -> str:
    if isinstance(caption, bytes):
        return caption.decode("utf-8")
    if isinstance(caption, str):
        return caption
    raise ValueError(f"{name} must be str or bytes, got {type(caption).__name__}.")


def tokenize(caption: str | bytes) -> list[str]:
    """Splits a caption into lowercase words and single punctuation marks.

    Args:
      caption: text (``bytes`` are decoded as UTF-8).

    Returns:
      The tokens, e.g. ``tokenize("A dog's ball.") == ["a", "dog", "'", "s", "ball", "."]``.
    """
    return _TOKEN_RE.findall(_as_text(caption).lower())


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """An immutable token list; a token's id is its position.

    Ids 0-3 are always ``<pad>``, ``<start>``, ``<end>``, ``<unk>``.

    Attributes:
      tokens: all tokens, specials first.
    """

    tokens: tuple[str, ...]
    _ids: dict[str, int] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        tokens = tuple(self.tokens)
        if tokens[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
            raise ValueError(
                f"tokens must start with {SPECIAL_TOKENS}, got {tokens[: len(SPECIAL_TOKENS)]}."
            )
        ids: dict[str, int] = {}
        for i, token in enumerate(tokens):
            if not isinstance(token, str) or not token or token.split() != [token]:
                raise ValueError(f"tokens[{i}] = {token!r} is not a non-empty word without spaces.")
            if token in ids:
                raise ValueError(f"tokens[{i}] = {token!r} repeats tokens[{ids[token]}].")
            ids[token] = i
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "_ids", ids)

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._ids

    def token_id(self, token: str) -> int:
        """Returns the id of ``token``, or the id of ``<unk>`` when it is unknown."""
        return self._ids.get(token, UNK_ID)

    def encode(self, caption: str | bytes) -> list[int]:
        """Tokenizes a caption into ``[<start>, words..., <end>]`` ids (unknown -> ``<unk>``)."""
        return [START_ID, *(self.token_id(t) for t in tokenize(caption)), END_ID]

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Joins the tokens of ``ids`` with spaces, dropping pad/start/end by default.

        Decoding stops at the first ``<end>`` when ``skip_special`` is true.
        """
        words = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.tokens):
                raise ValueError(
                    f"ids contains {i}, outside the vocabulary [0, {len(self.tokens)})."
                )
            if skip_special and i == END_ID:
                break
            if skip_special and i in (PAD_ID, START_ID):
                continue
            words.append(self.tokens[i])
        return " ".join(words)

    def encode_batch(
        self, captions: Sequence[str | bytes], *, max_length: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encodes captions into a fixed-shape padded id matrix.

        A caption longer than ``max_length`` ids is cut and its last id replaced by
        ``<end>``, so every row ends with ``<end>`` whatever its length.

        Args:
          captions: B captions.
          max_length: number of columns (at least 2, room for ``<start>`` and ``<end>``).

        Returns:
          ``(tokens, lengths)``: int32 ``(B, max_length)`` ids padded with ``<pad>`` and int32
          ``(B,)`` counts of real ids, ``<start>`` and ``<end>`` included.
        """
        if max_length < 2:
            raise ValueError(
                f"max_length must be at least 2 (<start> and <end>), got {max_length}."
            )
        tokens = np.full((len(captions), max_length), PAD_ID, dtype=np.int32)
        lengths = np.empty((len(captions),), dtype=np.int32)
        for row, caption in enumerate(captions):
            ids = self.encode(caption)
            if len(ids) > max_length:
                ids = ids[: max_length - 1] + [END_ID]
            tokens[row, : len(ids)] = ids
            lengths[row] = len(ids)
        return tokens, lengths

    def save(self, path: str | os.PathLike) -> None:
        """Writes the tokens to ``path`` atomically, one per line, and a checksum line.

        Line ``i`` (counting from 0) holds the token of id ``i``; the last line,
        ``# <count> tokens, sha256 <hex>``, lets :meth:`load` detect a truncated or
        corrupted file. The file is written to a temporary file in the same folder and
        then renamed over ``path``, so ``path`` holds either its old content or the
        whole new vocabulary, never a part.

        Args:
          path: the file to write (its folder must exist).
        """
        body = "".join(token + "\n" for token in self.tokens)
        digest = hashlib.sha256(body.encode("utf-8")).hexdigest()
        text = body + _CHECKSUM_LINE.format(count=len(self.tokens), digest=digest) + "\n"
        folder, name = os.path.split(os.path.abspath(path))
        # A fresh name opened with "x" (not mkstemp) gets the usual umask permissions.
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(8)}.tmp")
        try:
            with open(tmp, "x", encoding="utf-8", newline="\n") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        """Reads a vocabulary written by :meth:`save`, checking that it is complete.

        Args:
          path: the vocabulary file.

        Returns:
          The :class:`Vocabulary`.

        Raises:
          FileNotFoundError: ``path`` does not exist.
          ValueError: naming the file, when it is not UTF-8, lacks its final checksum line
            (truncated), its tokens do not match the checksum line (corrupted), or it is
            not one token per line starting with the specials.
        """
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Vocabulary file {os.fspath(path)!r} does not exist.")
        with open(path, "rb") as f:
            data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"Vocabulary file {os.fspath(path)!r} is not valid UTF-8 at byte {e.start}: "
                f"the file is corrupted."
            ) from None
        body, _, last = text.rstrip("\n").rpartition("\n")
        match = _CHECKSUM_RE.fullmatch(last)
        if not text.endswith("\n") or match is None:
            raise ValueError(
                f"Vocabulary file {os.fspath(path)!r} does not end with its checksum line "
                f"'# <count> tokens, sha256 <hex>': the file is truncated (or was not written "
                f"by Vocabulary.save)."
            )
        lines = body.split("\n") if body else []
        payload = "".join(line + "\n" for line in lines)  # what save hashed
        count, digest = int(match.group(1)), match.group(2)
        if len(lines) != count:
            raise ValueError(
                f"Vocabulary file {os.fspath(path)!r} holds {len(lines)} tokens but its "
                f"checksum line says {count}: the file is corrupted."
            )
        if hashlib.sha256(payload.encode("utf-8")).hexdigest() != digest:
            raise ValueError(
                f"Vocabulary file {os.fspath(path)!r} does not match the sha256 of its checksum "
                f"line: the file is corrupted."
            )
        try:
            return cls(tuple(lines))
        except ValueError as e:
            raise ValueError(f"Malformed vocabulary file {os.fspath(path)!r}: {e}") from None


def build_vocabulary(captions: Iterable[str | bytes], *, threshold: int = 4) -> Vocabulary:
    """Builds the vocabulary of words seen at least ``threshold`` times.

    Pass the *training* captions only. Words are ordered by decreasing count, ties
    alphabetically, after the four special tokens, so the result does not depend on the
    order of ``captions``.

    Args:
      captions: caption strings (or UTF-8 bytes).
      threshold: minimum count of a kept word (VSE++ used 4).

    Returns:
      The :class:`Vocabulary`.
    """
    if isinstance(captions, str | bytes):
        raise ValueError("captions must be an iterable of captions, not a single string.")
    if threshold < 1:
        raise ValueError(f"threshold must be at least 1, got {threshold}.")
    counts: collections.Counter[str] = collections.Counter()
    for caption in captions:
        counts.update(tokenize(_as_text(caption, "each element of captions")))
    words = sorted(
        (w for w, c in counts.items() if c >= threshold and w not in SPECIAL_TOKENS),
        key=lambda w: (-counts[w], w),
    )
    return Vocabulary((*SPECIAL_TOKENS, *words))
