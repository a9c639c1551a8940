"""The TinyStories pipeline: bundled text, tokenizer round trip, exact byte counts and bytes/token, deterministic
batches, bits/byte; the file writers (checkpoint.atomic_write) leave a whole file or none."""

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minijamba import data
from minijamba.checkpoint import atomic_write


@pytest.fixture(scope="module")
def stories():
    return data.split_stories(data.read_text("valid"))[:300]


@pytest.fixture(scope="module")
def tokenizer(stories):
    return data.train_tokenizer(stories, 512)


def test_bundled_text_is_the_documented_cut():
    train, valid = (data.split_stories(data.read_text(split)) for split in data.SPLITS)
    assert (len(train), len(valid)) == (10_345, 5_200)  # the counts the bundled README states
    assert not set(train) & set(valid)  # no training story in the validation text


def test_bad_split_and_missing_data_dir_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="split"):
        data.read_text("test")
    with pytest.raises(FileNotFoundError, match="data_dir.*train.txt"):
        data.read_text("train", data_dir=tmp_path)


def test_tokenizer_vocab_and_bad_size(tokenizer):
    assert tokenizer.get_vocab_size() == 512
    assert tokenizer.token_to_id(data.EOT) is not None
    with pytest.raises(ValueError, match="vocab_size"):
        data.train_tokenizer(["a b"], 100)


@given(text=st.text(max_size=60))
def test_tokenizer_round_trip_and_byte_counts(tokenizer, text):
    """Any text (any Unicode, whitespace kept) decodes back exactly, and token_bytes counts its UTF-8 bytes."""
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    assert int(data.token_bytes(tokenizer)[ids].sum()) == len(text.encode("utf-8"))


def test_save_and_load_tokenizer(tokenizer, stories, tmp_path):
    data.save_tokenizer(tokenizer, tmp_path)
    loaded = data.load_tokenizer(tmp_path)
    assert loaded.encode(stories[0]).ids == tokenizer.encode(stories[0]).ids
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        data.load_tokenizer(tmp_path / "nowhere")


def test_stream_is_stories_then_eot_and_bytes_add_up(tokenizer, stories):
    stream = data.encode_stories(tokenizer, stories[:20])
    eot = tokenizer.token_to_id(data.EOT)
    assert int((stream == eot).sum()) == 20 and int(stream[-1]) == eot
    text_bytes = sum(len(s.encode("utf-8")) + 1 for s in stories[:20])  # + 1: EOT counts as one byte
    assert int(data.token_bytes(tokenizer)[torch.from_numpy(stream).long()].sum()) == text_bytes
    assert data.bytes_per_token(tokenizer, stories[:20]) == text_bytes / len(stream)


def test_a_bigger_vocabulary_packs_more_bytes_per_token(tokenizer, stories):
    """Byte-level BPE: one merge gives tokens of at most 2 bytes; 512 ids pack more (the lesson's Exercise 3)."""
    one_merge = data.train_tokenizer(stories, 258)
    assert 1 < data.bytes_per_token(one_merge, stories[:20]) <= 2
    assert data.bytes_per_token(tokenizer, stories[:20]) > data.bytes_per_token(one_merge, stories[:20])


def test_batches_are_deterministic_under_a_seed(tokenizer, stories):
    stream = data.encode_stories(tokenizer, stories)
    a = data.get_batch(stream, 4, 16, torch.Generator().manual_seed(0))
    b = data.get_batch(stream, 4, 16, torch.Generator().manual_seed(0))
    c = data.get_batch(stream, 4, 16, torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    inputs, targets = a
    assert inputs.shape == targets.shape == (4, 16) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the inputs shifted by one
    with pytest.raises(ValueError, match="shorter than context"):
        data.get_batch(stream[:10], 4, 16, torch.Generator())


def test_eval_windows_tile_the_stream():
    stream = np.arange(50, dtype=np.int32)
    inputs, targets = data.eval_windows(stream, 100, 8)  # only 6 windows fit
    assert inputs.shape == (6, 8)
    assert torch.equal(inputs.flatten(), torch.arange(48)) and torch.equal(targets.flatten(), torch.arange(1, 49))


def test_bits_per_byte_hand_case():
    """Uniform guessing among 256 values of one byte each: ln 256 nats per token = exactly 8 bits per byte."""
    assert data.bits_per_byte(10 * math.log(256), 10) == pytest.approx(8.0, rel=1e-15)
    # 4 tokens of 2 bytes each at 1 nat each: 4 nats / ln 2 / 8 bytes = 0.7213... bits per byte
    assert data.bits_per_byte(4.0, 8) == pytest.approx(0.5 / math.log(2), rel=1e-15)
    with pytest.raises(ValueError, match="total_bytes"):
        data.bits_per_byte(1.0, 0)


def test_atomic_write_leaves_the_old_file_and_no_temp_file_on_failure(tmp_path):
    path = tmp_path / "state.json"
    atomic_write(path, lambda tmp: tmp.write_text("old"))

    def fail_halfway(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt  # an interrupt too: the temp file goes, the old file stays

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, fail_halfway)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]
    with pytest.raises(OSError):
        atomic_write(tmp_path / "new.json", lambda tmp: open(tmp / "not-a-folder", "w"))
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_encode_file_caches_the_stream_and_an_interrupted_encoding_leaves_nothing(tokenizer, stories, tmp_path):
    path = tmp_path / "valid.txt"
    path.write_text("".join(f"{story}\n{data.EOT}\n" for story in stories[:30]), encoding="utf-8")
    with pytest.raises(KeyboardInterrupt):
        data.encode_file(FailingTokenizer(tokenizer), path, block_chars=200)
    assert [p.name for p in tmp_path.iterdir()] == ["valid.txt"]
    stream = data.encode_file(tokenizer, path, block_chars=200)  # blocks split stories: the result must not care
    assert np.array_equal(stream, data.encode_stories(tokenizer, stories[:30]))
    assert len(list(tmp_path.glob("valid.*.bin"))) == 1 and not list(tmp_path.glob(".*"))


class FailingTokenizer:
    """The tokenizer, but its second encode_batch call raises, as a kill in the middle of an encoding would."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def encode_batch(self, stories):
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return self.tokenizer.encode_batch(stories)


def test_the_token_cache_follows_the_text_file(tokenizer, stories, tmp_path, monkeypatch):
    """The cache is keyed on the text too: a shortened file, or one rewritten with its size and mtime kept, is
    encoded again, and the caches of the old text go (those of another tokenizer for the current text stay)."""
    path = tmp_path / "valid.txt"
    monkeypatch.setattr(data, "HEAD_TAIL", 64)  # files much longer than their head and tail

    def encoded_as_written(texts, mtime_ns=None):
        path.write_text("".join(f"{s}\n{data.EOT}\n" for s in texts), encoding="utf-8")
        if mtime_ns is not None:
            os.utime(path, ns=(mtime_ns, mtime_ns))
        return np.array_equal(data.encode_file(tokenizer, path), data.encode_stories(tokenizer, texts))

    assert encoded_as_written(stories[:30])
    other = data.train_tokenizer(stories, 300)
    data.encode_file(other, path)
    (tmp_path / "valid.0123456789ab.bin").write_bytes(b"\0\0")  # the name caches had before they were keyed on text
    (tmp_path / "valid.notes.bin").write_bytes(b"mine")  # not a cache: never deleted
    assert encoded_as_written(stories[:10])
    assert (tmp_path / "valid.notes.bin").exists() and not (tmp_path / "valid.0123456789ab.bin").exists()
    assert len(list(tmp_path.glob("valid.*.*.bin"))) == 1  # the old text's caches, of both tokenizers, are gone
    head, middle, tail = ("X" + stories[0][1:], "X" + stories[4][1:], stories[9][:-1] + "X")  # each the same size
    mtime_ns = path.stat().st_mtime_ns
    assert encoded_as_written([head, *stories[1:10]], mtime_ns)  # the old mtime put back, as `cp -p` would
    assert encoded_as_written([head, *stories[1:9], tail], mtime_ns)
    assert encoded_as_written([head, *stories[1:4], middle, *stories[5:9], tail], mtime_ns + 10**9)  # a later edit
    assert len(list(tmp_path.glob("valid.*.*.bin"))) == 1


def test_a_damaged_bundled_file_says_reinstall(monkeypatch, tmp_path):
    good = (data.BUNDLED_DIR / "valid.txt.xz").read_bytes()
    monkeypatch.setattr(data, "BUNDLED_DIR", tmp_path)
    for damaged in (b"not xz at all", good[: len(good) // 2]):  # garbage, then a file cut short
        (tmp_path / "valid.txt.xz").write_bytes(damaged)
        with pytest.raises(ValueError, match=r"bundled .*valid.txt.xz is damaged .*reinstall minijamba") as info:
            data.read_text("valid")
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"Once upon a time.\n" * 50 + b"\xff\xfe bad bytes\n", r"is not UTF-8 text \(a 0xff byte\)"),
        (b"", "is empty|holds no stories"),
        (f"\n{data.EOT}\n\n{data.EOT}\n".encode(), "holds no stories"),
    ],
)
def test_a_data_file_that_is_not_utf8_or_has_no_stories_is_a_one_line_error(tokenizer, tmp_path, content, message):
    path = tmp_path / "train.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{path} ({message}); delete it and run `make data-full` again"):
        data.encode_file(tokenizer, path, block_chars=100)
    assert [p.name for p in tmp_path.iterdir()] == ["train.txt"]  # no cache left behind
    if b"\xff" in content or not content:
        with pytest.raises(ValueError, match=f"{path} ({message})"):
            data.read_text("train", tmp_path)


def test_read_text_max_chars_reads_the_head_only(tmp_path):
    (tmp_path / "train.txt").write_text("héllo world", encoding="utf-8")
    assert data.read_text("train", tmp_path, max_chars=5) == "héllo"


@pytest.mark.parametrize("content", [b"not json {", b"\xff\xfe\x00garbage", b'{"version": "1.0"}'])
def test_a_garbage_tokenizer_file_is_a_one_line_error(tmp_path, content):
    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(ValueError, match=r"tokenizer.json is not a tokenizer file \(.*\); the checkpoint") as info:
        data.load_tokenizer(tmp_path)
    assert "\n" not in str(info.value)
