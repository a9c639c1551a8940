"""The synthetic tasks' batches: selective copying and induction heads (Mamba paper §4.1), and multi-query associative
recall (Zoology). Each returns (inputs, targets), LongTensors (batch, L), targets IGNORE_INDEX except at answers."""

import torch

from minijamba.checks import positive_int

IGNORE_INDEX = -100  # F.cross_entropy's default: positions with this target carry no loss and no accuracy


def _generator(seed):
    """A torch.Generator from an int seed, or the generator itself (so a training loop can draw fresh batches)."""
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(seed)


def selective_copying(batch, seq_len, n_data, vocab, seed=0):
    """Selective copying batches: (inputs, targets), each a LongTensor (batch, seq_len).

    Layout (token ids): 0 = noise, 1..vocab-2 = data, vocab-1 = the answer marker.
        position:  0 ........................ seq_len-n_data-1 | seq_len-n_data ... seq_len-1
        inputs:    noise with n_data data tokens at random places | n_data markers
        targets:   -100 everywhere                                 | the data tokens, in order of appearance
    At each marker the model must output the next data token it saw; this is the layout of the selective copying
    generator in state-spaces/s4 (`torch_copying_data` with variable=True). seed: an int or a torch.Generator.
    """
    for name, value in (("batch", batch), ("seq_len", seq_len), ("n_data", n_data), ("vocab", vocab)):
        positive_int(name, value)
    if vocab < 3:
        raise ValueError(f"vocab must be >= 3 (noise, at least one data token, marker), got {vocab}")
    if seq_len < 2 * n_data:
        raise ValueError(f"seq_len must be >= 2 * n_data = {2 * n_data} (data, then as many answers), got {seq_len}")
    g = _generator(seed)
    n_prefix = seq_len - n_data
    data = torch.randint(1, vocab - 1, (batch, n_data), generator=g)  # (batch, n_data)
    # n_data distinct positions per row, in increasing order: the first n_data of a random permutation, sorted.
    positions = torch.rand(batch, n_prefix, generator=g).argsort(dim=-1)[:, :n_data].sort(dim=-1).values
    inputs = torch.zeros(batch, seq_len, dtype=torch.long)  # (batch, seq_len), all noise
    inputs[:, :n_prefix].scatter_(1, positions, data)
    inputs[:, n_prefix:] = vocab - 1
    targets = torch.full((batch, seq_len), IGNORE_INDEX, dtype=torch.long)  # (batch, seq_len)
    targets[:, n_prefix:] = data
    return inputs, targets


def induction_heads(batch, seq_len, vocab, seed=0):
    """Induction-head batches: (inputs, targets), each a LongTensor (batch, seq_len).

    Token vocab-1 is the trigger; the others are drawn uniformly at random. The trigger appears at a random
    position p in 0 .. seq_len-3, followed by the answer token at p+1 (never the last position), and again at the
    last position, where the target is that answer. Targets are -100 everywhere else. p is uniform over the whole
    sequence, as H3's synthetic-task generator (the safari repository) places it:
    the gap from the answer to the query runs from 1 to seq_len - 2, and the short gaps give a model trained from
    scratch its first signal. seed: an int or a torch.Generator.
    """
    for name, value in (("batch", batch), ("seq_len", seq_len), ("vocab", vocab)):
        positive_int(name, value)
    if vocab < 2:
        raise ValueError(f"vocab must be >= 2 (a trigger and at least one other token), got {vocab}")
    if seq_len < 4:
        raise ValueError(f"seq_len must be >= 4 (trigger, answer, ..., trigger), got {seq_len}")
    g = _generator(seed)
    inputs = torch.randint(0, vocab - 1, (batch, seq_len), generator=g)  # (batch, seq_len), no trigger yet
    p = torch.randint(0, seq_len - 2, (batch, 1), generator=g)  # (batch, 1): p + 1 <= seq_len - 2
    inputs.scatter_(1, p, vocab - 1)
    inputs[:, -1] = vocab - 1
    targets = torch.full((batch, seq_len), IGNORE_INDEX, dtype=torch.long)  # (batch, seq_len)
    targets[:, -1] = inputs.gather(1, p + 1)[:, 0]
    return inputs, targets


def associative_recall(batch, n_pairs, n_queries, vocab, seed=0):
    """Multi-query associative recall (MQAR): (inputs, targets), LongTensors (batch, 2·n_pairs + n_queries).

    Zoology (Arora et al. 2023): n_pairs key-value pairs, then n_queries of their keys; at each query the model
    must output the value that was paired with that key. Keys are the ids 0..vocab/2 - 1, values vocab/2..vocab - 1
    (as Zoology splits its vocabulary); the keys of one sequence are distinct, so every answer is unique, and the
    queries are distinct keys of the sequence in random order. Values are drawn with replacement.
        position:  0    1    2    3   ...  2n-2  2n-1 | 2n   ...  2n+m-1
        inputs:    k_1  v_1  k_2  v_2 ...  k_n   v_n  | k_q1 ...  k_qm
        targets:   -100 everywhere                    | v_q1 ...  v_qm
    Chance: 1 / (vocab - vocab // 2). seed: an int or a torch.Generator.
    """
    for name, value in (("batch", batch), ("n_pairs", n_pairs), ("n_queries", n_queries), ("vocab", vocab)):
        positive_int(name, value)
    n_keys = vocab // 2
    if n_pairs > n_keys:
        raise ValueError(f"vocab must be >= 2 * n_pairs = {2 * n_pairs} (distinct keys, then values), got {vocab}")
    if n_queries > n_pairs:
        raise ValueError(f"n_queries must be <= n_pairs = {n_pairs} (each query is a distinct key), got {n_queries}")
    g = _generator(seed)
    keys = torch.rand(batch, n_keys, generator=g).argsort(dim=-1)[:, :n_pairs]  # (batch, n_pairs), distinct per row
    values = torch.randint(n_keys, vocab, (batch, n_pairs), generator=g)  # (batch, n_pairs)
    asked = torch.rand(batch, n_pairs, generator=g).argsort(dim=-1)[:, :n_queries]  # (batch, n_queries): which pairs
    pairs = torch.stack([keys, values], dim=-1).flatten(1)  # (batch, 2·n_pairs): k_1 v_1 k_2 v_2 ...
    inputs = torch.cat([pairs, keys.gather(1, asked)], dim=1)  # (batch, 2·n_pairs + n_queries)
    targets = torch.full_like(inputs, IGNORE_INDEX)  # (batch, 2·n_pairs + n_queries)
    targets[:, 2 * n_pairs :] = values.gather(1, asked)
    return inputs, targets
