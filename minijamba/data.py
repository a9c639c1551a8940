"""TinyStories for training: the text, a byte-level BPE tokenizer, token streams, random-window batches, bits/byte.

TinyStories (Eldan & Li 2023, "TinyStories: How Small Can Language Models Be and Still Speak Coherent English?";
license CDLA-Sharing-1.0) is short stories in simple English written by GPT-3.5/4. Two sources:
    "bundled"  a cut shipped in this package (data/tinystories/*.txt.xz, 2.6 MB; see its README for provenance):
               10,345 training stories (8.7 MB of text) and the first 5,200 stories of the official V2 validation
               split (4.2 MB). Works offline; what `make train` uses.
    "full"     the official TinyStoriesV2-GPT4 files (about 2 GB of training text), downloaded on request into a
               folder of yours by `download.py` (`make data-full`, `python -m minijamba.train --data full`).
Both are plain text with every story ending in a line `<|endoftext|>`.

The pipeline, each step a function here:
    stories       the text split at the separator, each story stripped
    Tokenizer     a byte-level BPE (HF `tokenizers`) trained on the training stories: any byte sequence encodes, every
                  id decodes back to exact bytes; the separator is one special token, EOT
    token stream  every story's ids followed by EOT, concatenated: one 1-D NumPy array per split (memory-mapped
                  from a cache file for the full dataset)
    get_batch     `batch` windows of context+1 tokens at random offsets (a torch.Generator makes it deterministic);
                  inputs are the first `context` tokens, targets the same shifted by one
    bytes/token   how much text a tokenizer packs into one id, counted exactly (token_bytes, bytes_per_token)
    bits/byte     total nats / ln 2 / bytes of text predicted: comparable across tokenizers, unlike nats/token

Bytes of text: a byte-level BPE token stands for a fixed byte string (its vocabulary entry is one printable
character per byte, GPT-2's bytes-to-unicode map), so `token_bytes` gives every id's length in bytes and a
window's text is sum(token_bytes[targets]) bytes exactly. EOT counts as 1 byte: the story boundary, as a
newline would be in a file without separators (one token in ~225; counting it as 0 bytes would move bits/byte by 0.1%).

Glossary: context — T, the window length;  batch — B windows per step;  EOT — `<|endoftext|>`.
"""

import hashlib
import lzma
import math
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .checkpoint import atomic_write

__all__ = [
    "EOT",
    "BUNDLED_DIR",
    "SPLITS",
    "read_text",
    "split_stories",
    "train_tokenizer",
    "save_tokenizer",
    "load_tokenizer",
    "token_bytes",
    "encode_stories",
    "bytes_per_token",
    "encode_file",
    "get_batch",
    "eval_windows",
    "bits_per_byte",
]

EOT = "<|endoftext|>"
BUNDLED_DIR = Path(__file__).parent / "data" / "tinystories"
SPLITS = ("train", "valid")
TOKENIZER_FILE = "tokenizer.json"


def read_text(split, data_dir=None):
    """The text of `split` ("train" or "valid"): the bundled .txt.xz, or <data_dir>/<split>.txt when given."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if data_dir is None:
        with lzma.open(BUNDLED_DIR / f"{split}.txt.xz", "rt", encoding="utf-8") as f:
            return f.read()
    path = Path(data_dir) / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(
            f"data_dir {str(data_dir)!r} has no {split}.txt (run `make data-full` to download the full dataset there)"
        )
    return path.read_text(encoding="utf-8")


def split_stories(text):
    """Text with `<|endoftext|>` separators -> the list of stories, each stripped, empty pieces dropped."""
    return [s.strip() for s in text.split(EOT) if s.strip()]


def train_tokenizer(stories, vocab_size):
    """A byte-level BPE with `vocab_size` ids (256 byte symbols + EOT + merges), trained on a list of stories."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 258:
        raise ValueError(f"vocab_size must be an integer >= 258 (256 bytes + EOT + 1 merge), got {vocab_size!r}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split, every byte kept
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even those the text lacks
        show_progress=False,
    )
    tokenizer.train_from_iterator(stories, trainer)
    return tokenizer


def save_tokenizer(tokenizer, directory):
    """Write tokenizer.json into `directory` (atomic_write: a temp file, then a rename)."""
    path = Path(directory) / TOKENIZER_FILE
    atomic_write(path, lambda tmp: tokenizer.save(str(tmp)))
    return path


def load_tokenizer(directory):
    """The tokenizer saved in `directory` (a checkpoint folder)."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {TOKENIZER_FILE} in {str(directory)!r}: is it a checkpoint folder of train.py?")
    return Tokenizer.from_file(str(path))


def token_bytes(tokenizer):
    """(vocab,) int64: how many bytes of text each id stands for (EOT and other special tokens: 1)."""
    lengths = torch.ones(tokenizer.get_vocab_size(), dtype=torch.int64)
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    for token, i in tokenizer.get_vocab().items():
        if token not in special:
            lengths[i] = len(token)  # one bytes-to-unicode character per byte
    return lengths


def encode_stories(tokenizer, stories):
    """Stories -> one token stream, a NumPy int32 array (n_tokens,): each story's ids, then EOT."""
    eot = tokenizer.token_to_id(EOT)
    ids = []
    for encoding in tokenizer.encode_batch(stories):
        ids.extend(encoding.ids)
        ids.append(eot)
    return np.array(ids, dtype=np.int32)


def bytes_per_token(tokenizer, stories):
    """Bytes of text per token in the stories' stream (each story's ids, then EOT as 1 byte): how much it packs."""
    stream = torch.from_numpy(encode_stories(tokenizer, stories)).long()  # (n_tokens,)
    return int(token_bytes(tokenizer)[stream].sum()) / len(stream)


def encode_file(tokenizer, path, block_chars=1 << 26):
    """A large text file -> its token stream, memory-mapped from a uint16 cache file beside it (written once).

    The text is read in blocks of block_chars characters and split at EOT, so memory stays at one block whatever
    the file's size (the full training text is about 2 GB). The cache is named after the tokenizer's hash, so another
    tokenizer gets its own; it is written by atomic_write, so an interrupted encoding is never reused.
    """
    if tokenizer.get_vocab_size() > 1 << 16:
        raise ValueError(f"encode_file stores uint16 ids: vocab_size {tokenizer.get_vocab_size()} > 65536")
    path = Path(path)
    digest = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:12]
    cache = path.with_name(f"{path.stem}.{digest}.bin")

    def write(tmp):
        with open(path, encoding="utf-8") as f, open(tmp, "wb") as out:
            rest = ""
            while block := f.read(block_chars):
                *stories, rest = (rest + block).split(EOT)  # the last piece may be an unfinished story
                encode_stories(tokenizer, [s.strip() for s in stories if s.strip()]).astype(np.uint16).tofile(out)
            if rest.strip():
                encode_stories(tokenizer, [rest.strip()]).astype(np.uint16).tofile(out)

    if not cache.exists():
        atomic_write(cache, write)
    return np.memmap(cache, dtype=np.uint16, mode="r")


def get_batch(stream, batch, context, generator):
    """`batch` random windows of `stream`: (inputs, targets), each (batch, context) int64, targets shifted by one.

    Offsets are drawn with `generator`, so the same seed gives the same batches on every run and every process.
    """
    if len(stream) < context + 1:
        raise ValueError(f"the token stream ({len(stream)} tokens) is shorter than context + 1 = {context + 1}")
    starts = torch.randint(len(stream) - context, (batch,), generator=generator)  # (batch,)
    windows = np.stack([stream[s : s + context + 1] for s in starts.tolist()])  # (batch, context + 1)
    windows = torch.from_numpy(windows.astype(np.int64))
    return windows[:, :-1], windows[:, 1:]


def eval_windows(stream, n_windows, context):
    """The first n_windows non-overlapping windows of `stream`: a fixed evaluation set, (inputs, targets)."""
    n_windows = min(n_windows, (len(stream) - 1) // context)
    if n_windows < 1:
        raise ValueError(f"the validation stream ({len(stream)} tokens) is shorter than context + 1 = {context + 1}")
    n = n_windows * context
    inputs = torch.from_numpy(stream[:n].astype(np.int64)).view(n_windows, context)  # (n_windows, context)
    targets = torch.from_numpy(stream[1 : n + 1].astype(np.int64)).view(n_windows, context)
    return inputs, targets


def bits_per_byte(total_nats, total_bytes):
    """Cross-entropy summed over tokens (nats) -> bits per byte of the text those tokens encode."""
    if total_bytes <= 0:
        raise ValueError(f"total_bytes must be positive, got {total_bytes!r}")
    return total_nats / math.log(2) / total_bytes
