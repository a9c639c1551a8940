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
import re
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
HEAD_TAIL = 1 << 20  # bytes of a text file's head and of its tail that its cache key hashes
REDOWNLOAD = "delete it and run `make data-full` again"


def _not_utf8(path, error):
    """The one-line error for a data file that does not decode."""
    return ValueError(f"{path} is not UTF-8 text (a {error.object[error.start]:#04x} byte); {REDOWNLOAD}")


def read_text(split, data_dir=None, max_chars=None):
    """The text of `split` ("train" or "valid"): the bundled .txt.xz, or <data_dir>/<split>.txt when given.

    max_chars: read only the first max_chars characters (the full training text is about 2 GB).
    A damaged bundled file, or a data_dir file that is not UTF-8 or holds only whitespace, is a one-line ValueError.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if data_dir is None:
        path = BUNDLED_DIR / f"{split}.txt.xz"
        try:
            with lzma.open(path, "rt", encoding="utf-8") as f:
                return f.read(max_chars)
        except (lzma.LZMAError, EOFError, UnicodeDecodeError) as e:
            raise ValueError(f"the bundled {path} is damaged ({e}); reinstall minijamba to restore it") from e
    path = Path(data_dir) / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(
            f"data_dir {str(data_dir)!r} has no {split}.txt (run `make data-full` to download the full dataset there)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(max_chars)
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from e
    if not text or text.isspace():  # isspace, not strip: no copy of a 2 GB string
        raise ValueError(f"{path} is empty; {REDOWNLOAD}")
    return text


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
    """The tokenizer saved in `directory` (a checkpoint folder); a damaged file is a one-line ValueError."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {TOKENIZER_FILE} in {str(directory)!r}: is it a checkpoint folder of train.py?")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception for every parse error
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"{path} is not a tokenizer file ({reason}); the checkpoint is damaged: resume from another one"
        ) from e


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


def _text_key(path):
    """16 hex digits that change when the file does: its size, mtime_ns and a hash of its first and last HEAD_TAIL
    bytes. Not a hash of the whole file, which would read all 2 GB at every start of a run; the head and tail catch a
    rewrite that keeps size and mtime (a copy with `cp -p`), an edit in the middle that keeps both is missed."""
    stat = path.stat()
    h = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}:".encode())
    with open(path, "rb") as f:
        h.update(f.read(HEAD_TAIL))
        f.seek(max(stat.st_size - HEAD_TAIL, 0))
        h.update(f.read(HEAD_TAIL))
    return h.hexdigest()[:16]


def encode_file(tokenizer, path, block_chars=1 << 26):
    """A large text file -> its token stream, memory-mapped from a uint16 cache file beside it (written once).

    The text is read in blocks of block_chars characters and split at EOT, so memory stays at one block whatever
    the file's size (the full training text is about 2 GB). The cache, <stem>.<tokenizer hash>.<text key>.bin, is
    named after the tokenizer's hash, so another tokenizer gets its own, and after the text's _text_key, so a changed
    text file is encoded again; caches of an older version of the text (any tokenizer) are deleted then. It is
    written by atomic_write, so an interrupted encoding is never reused. A file that is not UTF-8 or holds no story
    is a one-line ValueError.
    """
    if tokenizer.get_vocab_size() > 1 << 16:
        raise ValueError(f"encode_file stores uint16 ids: vocab_size {tokenizer.get_vocab_size()} > 65536")
    path = Path(path)
    digest = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:12]
    text_key = _text_key(path)
    cache = path.with_name(f"{path.stem}.{digest}.{text_key}.bin")
    ours = re.compile(rf"{re.escape(path.stem)}\.[0-9a-f]{{12}}(\.[0-9a-f]{{16}})?\.bin")  # also the older unkeyed name
    for old in path.parent.iterdir():
        if ours.fullmatch(old.name) and not old.name.endswith(f".{text_key}.bin"):
            old.unlink(missing_ok=True)  # missing_ok: another process (a DDP rank) may have removed it first

    def write(tmp):
        with open(path, encoding="utf-8") as f, open(tmp, "wb") as out:
            rest = ""
            while block := f.read(block_chars):
                *stories, rest = (rest + block).split(EOT)  # the last piece may be an unfinished story
                encode_stories(tokenizer, [s.strip() for s in stories if s.strip()]).astype(np.uint16).tofile(out)
            if rest.strip():
                encode_stories(tokenizer, [rest.strip()]).astype(np.uint16).tofile(out)
        if tmp.stat().st_size == 0:
            raise ValueError(f"{path} holds no stories; {REDOWNLOAD}")

    if not cache.exists():
        try:
            atomic_write(cache, write)
        except UnicodeDecodeError as e:
            raise _not_utf8(path, e) from e
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
