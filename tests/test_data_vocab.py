"""Tests for the caption tokenizer and vocabulary."""

import hashlib
import os
import random

import numpy as np
import pytest

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

TRAIN = [
    "A dog runs.",
    "a DOG sits",
    "A cat, a dog",
    "the dog's ball",
    "a red ball",
    "A dog jumps!",
]


def test_tokenize_lowercases_and_splits_punctuation():
    assert tokenize("A Dog's ball, RED!") == ["a", "dog", "'", "s", "ball", ",", "red", "!"]
    assert tokenize(b"two  spaces\tand\nnewline") == ["two", "spaces", "and", "newline"]
    assert tokenize("") == []


def test_build_vocabulary_counts_threshold_and_order():
    # counts: a 6, dog 5, ball 2, every other word 1.
    vocab = build_vocabulary(TRAIN, threshold=2)
    assert vocab.tokens == (*SPECIAL_TOKENS, "a", "dog", "ball")
    vocab1 = build_vocabulary(TRAIN, threshold=1)
    assert vocab1.tokens[4:7] == ("a", "dog", "ball")
    # ties (count 1) are alphabetical
    assert list(vocab1.tokens[7:]) == sorted(vocab1.tokens[7:])
    assert set(vocab1.tokens[7:]) == {"!", "'", ",", ".", "cat", "jumps", "red", "runs", "s",
                                      "sits", "the"}  # fmt: skip
    assert build_vocabulary(TRAIN).tokens == (*SPECIAL_TOKENS, "a", "dog")


def test_build_vocabulary_ignores_caption_order():
    shuffled = TRAIN * 3
    random.Random(0).shuffle(shuffled)
    assert build_vocabulary(shuffled, threshold=3) == build_vocabulary(TRAIN * 3, threshold=3)


def test_encode_decode_and_unknown_words():
    vocab = build_vocabulary(TRAIN, threshold=2)  # a=4, dog=5, ball=6
    assert vocab.encode("A dog chases a ball") == [START_ID, 4, 5, UNK_ID, 4, 6, END_ID]
    assert vocab.encode(b"") == [START_ID, END_ID]
    assert vocab.decode([START_ID, 4, 5, UNK_ID, END_ID, PAD_ID, 6]) == "a dog <unk>"
    assert vocab.decode([START_ID, 4, END_ID], skip_special=False) == "<start> a <end>"
    with pytest.raises(ValueError, match="ids"):
        vocab.decode([len(vocab)])


def test_only_training_words_are_known():
    vocab = build_vocabulary(["a zebra"] * 4)
    assert "zebra" in vocab and "giraffe" not in vocab
    assert vocab.encode("a giraffe") == [START_ID, vocab.token_id("a"), UNK_ID, END_ID]


def test_encode_batch_pads_and_truncates_keeping_end():
    vocab = build_vocabulary(TRAIN, threshold=2)
    tokens, lengths = vocab.encode_batch(["a dog", "a dog a dog a dog", "ball"], max_length=5)
    np.testing.assert_array_equal(
        tokens,
        [
            [START_ID, 4, 5, END_ID, PAD_ID],
            [START_ID, 4, 5, 4, END_ID],
            [START_ID, 6, END_ID, PAD_ID, PAD_ID],
        ],
    )
    np.testing.assert_array_equal(lengths, [4, 5, 3])
    assert tokens.dtype == np.int32 and lengths.dtype == np.int32
    with pytest.raises(ValueError, match="max_length"):
        vocab.encode_batch(["a"], max_length=1)


def _with_checksum(lines):
    """The text Vocabulary.save writes for ``lines`` (which need not be a valid vocabulary)."""
    body = "".join(line + "\n" for line in lines)
    digest = hashlib.sha256(body.encode("utf-8")).hexdigest()
    return f"{body}# {len(lines)} tokens, sha256 {digest}\n"


def test_save_load_roundtrip_one_token_per_line(tmp_path):
    vocab = build_vocabulary(TRAIN, threshold=2)
    path = tmp_path / "vocab.txt"
    vocab.save(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[:-1] == ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "ball"]  # id = line
    assert lines[-1].startswith("# 7 tokens, sha256 ")
    loaded = Vocabulary.load(path)
    assert loaded == vocab and loaded.token_id("ball") == 6


def test_load_of_save_is_exact(tmp_path):
    captions = ["Un café à Zürich #1 — 東京 🐕!", "a # b ; c", "naïve café"] * 2
    vocab = build_vocabulary(captions, threshold=1)
    path = tmp_path / "vocab.txt"
    vocab.save(path)
    assert Vocabulary.load(path).tokens == vocab.tokens
    vocab.save(path)  # overwrites in place
    assert Vocabulary.load(path).tokens == vocab.tokens
    assert sorted(os.listdir(tmp_path)) == ["vocab.txt"]  # no temporary file left


@pytest.mark.parametrize(
    "cut",
    [
        lambda data: 0,  # empty
        lambda data: data.index(b"dog") + 1,  # inside a token
        lambda data: data.index(b"#"),  # every token line, no checksum line
        lambda data: len(data) - 10,  # inside the checksum line
        lambda data: len(data) - 1,  # only the final newline lost
    ],
)
def test_load_detects_a_truncated_file(tmp_path, cut):
    path = tmp_path / "vocab.txt"
    build_vocabulary(TRAIN, threshold=1).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: cut(data)])
    with pytest.raises(ValueError, match="vocab.txt.*truncated"):
        Vocabulary.load(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda text: text.replace("\ndog\n", "\ndig\n"), "sha256"),
        (
            lambda text: text.replace("\ndog\n", "\n"),
            "holds 17 tokens but its checksum line says 18",
        ),
        (lambda text: text.encode("utf-8").replace(b"dog", b"d\xffg"), "UTF-8"),
    ],
)
def test_load_detects_a_corrupted_file(tmp_path, edit, message):
    path = tmp_path / "vocab.txt"
    build_vocabulary(TRAIN, threshold=1).save(path)
    corrupted = edit(path.read_text(encoding="utf-8"))
    if isinstance(corrupted, bytes):
        path.write_bytes(corrupted)
    else:
        path.write_text(corrupted, encoding="utf-8")
    with pytest.raises(ValueError, match=f"vocab.txt.*{message}"):
        Vocabulary.load(path)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "vocab.txt"
    old = build_vocabulary(TRAIN, threshold=2)
    old.save(path)

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)  # fails after writing, before the rename
    with pytest.raises(OSError, match="disk full"):
        build_vocabulary(TRAIN, threshold=1).save(path)
    monkeypatch.undo()
    assert Vocabulary.load(path) == old  # the previous file is untouched
    assert sorted(os.listdir(tmp_path)) == ["vocab.txt"]


@pytest.mark.parametrize(
    "lines, message",
    [
        (["<pad>", "<start>", "<unk>", "<end>", "a"], "must start with"),
        (["<pad>", "<start>", "<end>", "<unk>", "a", "b", "a"], "repeats"),
        (["<pad>", "<start>", "<end>", "<unk>", "a", "", "b"], "non-empty"),
        (["<pad>", "<start>", "<end>", "<unk>", "two words"], "non-empty"),
    ],
)
def test_load_rejects_malformed_file_naming_it(tmp_path, lines, message):
    path = tmp_path / "bad_vocab.txt"
    path.write_text(_with_checksum(lines), encoding="utf-8")
    with pytest.raises(ValueError, match=f"bad_vocab.txt.*{message}"):
        Vocabulary.load(path)


def test_bad_arguments():
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        Vocabulary.load("/nonexistent/missing.txt")
    with pytest.raises(ValueError, match="threshold"):
        build_vocabulary(TRAIN, threshold=0)
    with pytest.raises(ValueError, match="captions"):
        build_vocabulary("a single caption")
    with pytest.raises(ValueError, match="captions"):
        build_vocabulary([1, 2])
