"""Tests for the caption tokenizer and vocabulary."""

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


def test_save_load_roundtrip_one_token_per_line(tmp_path):
    vocab = build_vocabulary(TRAIN, threshold=2)
    path = tmp_path / "vocab.txt"
    vocab.save(path)
    assert path.read_text(encoding="utf-8") == "<pad>\n<start>\n<end>\n<unk>\na\ndog\nball\n"
    loaded = Vocabulary.load(path)
    assert loaded == vocab and loaded.token_id("ball") == 6


@pytest.mark.parametrize(
    "content, message",
    [
        ("<pad>\n<start>\n<unk>\n<end>\na\n", "must start with"),
        ("<pad>\n<start>\n<end>\n<unk>\na\nb\na\n", "repeats"),
        ("<pad>\n<start>\n<end>\n<unk>\na\n\nb\n", "non-empty"),
        ("<pad>\n<start>\n<end>\n<unk>\ntwo words\n", "non-empty"),
    ],
)
def test_load_rejects_malformed_file_naming_it(tmp_path, content, message):
    path = tmp_path / "bad_vocab.txt"
    path.write_text(content, encoding="utf-8")
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
