"""Synthetic tasks, class-sized: the Mamba paper's selective copying and induction heads, Zoology's multi-query
associative recall, a tiny model, a trainer, and the experiments of lessons 02 and 05.

Gu & Dao 2023, §3.1 (Figure 2), §4.1 and Appendix E.1. Both tasks need content-aware reasoning, which an LTI
model (S4: the same Δ, B, C at every step) cannot do, and a selective one (S6) can:
  - selective copying: remember a few data tokens scattered at random among noise and repeat them in order;
    where the data sit varies, so no fixed convolution kernel can pick them out.
  - induction heads: after seeing "... trigger a ...", answer a at the next trigger (associative recall).

The paper's selective copying (Table 1): L = 4096, vocabulary 16 (noise and marker included), 16 data tokens,
2 layers, d_model = 64, trained on a GPU. Answer accuracy: S4 (no gate) 18.3%, S6 (no gate) 97.0%; with the
full Mamba block, S4 56.4% and S6 99.8%.
`SelectiveCopyingConfig` shrinks it to fit a CPU: L = 48 (44 noise/data slots, then 4 answer slots), vocabulary
16 (14 data symbols, chance 1/14 = 7%), 4 data tokens, 2 layers, d_model 32, N = 16, 600 steps of batch 64 (the
README's measured section has the accuracies). The LTI model does not stay at chance here: with only 4 data tokens,
where the k-th one lies is predictable to within about one gap between tokens, and a fixed kernel can bet on that
(the spread grows with the number of data tokens, which is why S4 falls to 18% with 16 of them). The data count is
the knob that costs S6 the most steps.

Threads: at these sizes the scan is thousands of tiny ops, so a second thread adds little, and when another
process holds one of the cores every op waits for the descheduled thread. On a shared machine,
torch.set_num_threads(1).

`TaskModel` is the paper's "(no gate)" architecture: each block is only norm -> Linear -> SSM -> Linear. The
official experiments wrap the SSM in the full H3 or Mamba blocks (convolution, gate); see Table 1.

Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient
Language Models"): key-value pairs, then queries of some keys, each to be answered with its key's value. Zoology
found that this kind of recall explains most (82%) of the perplexity gap between attention and gated-convolution
models on the Pile, and that a model with a fixed-size state needs it to grow with the number of pairs.
`associative_recall_experiment` trains two JambaLMs (jamba.py) that differ only in their layout, all-Mamba against
one attention layer (lesson 05).
"""

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minijamba.checks import positive_int
from minijamba.jamba import JambaConfig, JambaLM
from minijamba.lm import CausalLMOutput
from minijamba.optim import adamw, warmup_cosine
from minijamba.s6 import SelectiveSSM, auto_dt_rank

__all__ = [
    "IGNORE_INDEX",
    "selective_copying",
    "induction_heads",
    "associative_recall",
    "TaskModel",
    "answer_accuracy",
    "train_task",
    "SelectiveCopyingConfig",
    "selective_copying_experiment",
    "LAYOUTS",
    "AssociativeRecallConfig",
    "associative_recall_experiment",
]

IGNORE_INDEX = -100  # F.cross_entropy's default: positions with this target carry no loss and no accuracy


def _generator(seed):
    """A torch.Generator from an int seed, or the generator itself (so a training loop can draw fresh batches)."""
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------
# The data
# ----------------------------------------------------------------------------------------------------------


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
    position p in the first half, followed by the answer token at p+1, and again at the last position, where the
    target is that answer. Targets are -100 everywhere else. seed: an int or a torch.Generator.
    """
    for name, value in (("batch", batch), ("seq_len", seq_len), ("vocab", vocab)):
        positive_int(name, value)
    if vocab < 2:
        raise ValueError(f"vocab must be >= 2 (a trigger and at least one other token), got {vocab}")
    if seq_len < 4:
        raise ValueError(f"seq_len must be >= 4 (trigger, answer, ..., trigger), got {seq_len}")
    g = _generator(seed)
    inputs = torch.randint(0, vocab - 1, (batch, seq_len), generator=g)  # (batch, seq_len), no trigger yet
    p = torch.randint(0, seq_len // 2 - 1, (batch, 1), generator=g)  # (batch, 1): p+1 < seq_len//2 <= L-1
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


# ----------------------------------------------------------------------------------------------------------
# The model: embedding -> (norm -> Linear -> SSM -> Linear, residual) x n_layers -> norm -> head
# ----------------------------------------------------------------------------------------------------------


class _Block(nn.Module):
    """Pre-norm residual block of the paper's "(no gate)" rows: x + out_proj(ssm(in_proj(norm(x))))."""

    def __init__(self, d_model, d_inner, d_state, selective, scan_impl):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.in_proj = nn.Linear(d_model, d_inner)
        dt_rank = auto_dt_rank(d_model)  # R as a Mamba block of this width has it
        self.ssm = SelectiveSSM(d_inner, d_state, dt_rank, selective=selective, scan_impl=scan_impl)
        self.out_proj = nn.Linear(d_inner, d_model)

    def forward(self, hidden):  # hidden: (batch, L, d_model)
        u = self.in_proj(self.norm(hidden)).transpose(1, 2)  # (batch, d_inner, L): the SSM's input
        return hidden + self.out_proj(self.ssm(u).transpose(1, 2))  # (batch, L, d_model)


class TaskModel(nn.Module):
    """A tiny token model for the synthetic tasks: (batch, L) token ids -> (batch, L, vocab) logits.

    selective=False swaps every S6 for its LTI twin (fixed Δ, B, C), the S4 rows of the paper's Table 1.
    """

    def __init__(self, vocab, d_model=32, n_layers=2, d_state=16, selective=True, expand=2, scan_impl="chunked"):
        super().__init__()
        for name, value in (("vocab", vocab), ("d_model", d_model), ("n_layers", n_layers), ("expand", expand)):
            positive_int(name, value)
        self.embedding = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(
            _Block(d_model, expand * d_model, d_state, selective, scan_impl) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens):
        """tokens (batch, L) -> CausalLMOutput, as the LMs return: logits (batch, L, vocab), no aux loss, no routers."""
        x = self.embedding(tokens)  # (batch, L, d_model)
        for block in self.blocks:
            x = block(x)  # (batch, L, d_model)
        logits = self.head(self.norm(x))  # (batch, L, vocab)
        return CausalLMOutput(logits, logits.new_zeros(()), ())


# ----------------------------------------------------------------------------------------------------------
# Training and scoring
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def answer_accuracy(model, inputs, targets):
    """The fraction of answer positions (targets != -100) where the model's argmax is the target."""
    mask = targets != IGNORE_INDEX  # (batch, L)
    predictions = model(inputs).logits.argmax(dim=-1)  # (batch, L)
    return (predictions[mask] == targets[mask]).float().mean().item()


def train_task(model, make_batch, steps, lr=3e-3, weight_decay=0.1, warmup=100, eval_every=100, eval_batches=4, seed=0):
    """Train on fresh batches, scoring a fixed held-out set; returns the history, a list of dicts.

    make_batch(generator) -> (inputs, targets): called with one torch.Generator seeded by `seed` for the
    training stream, and with generators seeded seed+1, seed+2, ... for the eval_batches of the eval set.
    AdamW (optim.adamw), linear warmup then cosine decay to 0 (optim.warmup_cosine), gradient clipping at 1. Each
    history entry (every eval_every steps and at the end): {"step", "loss" (mean training loss since the last
    entry), "accuracy" (eval answer accuracy), "seconds" (wall-clock since the start)}. model(inputs) returns a
    CausalLMOutput; the loss is the answers' cross-entropy alone (an MoE model's aux_loss is not added).
    """
    positive_int("steps", steps)
    positive_int("eval_every", eval_every)
    positive_int("eval_batches", eval_batches)
    evals = [make_batch(torch.Generator().manual_seed(seed + 1 + i)) for i in range(eval_batches)]
    eval_inputs, eval_targets = (torch.cat(t) for t in zip(*evals, strict=True))
    train_rng = torch.Generator().manual_seed(seed)
    opt = adamw(model, lr, weight_decay, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, warmup))  # s: steps so far
    history, losses, start = [], [], time.perf_counter()
    for step in range(1, steps + 1):
        model.train()
        inputs, targets = make_batch(train_rng)
        logits = model(inputs).logits  # (batch, L, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        losses.append(loss.item())
        if step % eval_every == 0 or step == steps:
            model.eval()
            accuracy = answer_accuracy(model, eval_inputs, eval_targets)
            seconds = time.perf_counter() - start
            history.append({"step": step, "loss": sum(losses) / len(losses), "accuracy": accuracy, "seconds": seconds})
            losses = []
    return history


# ----------------------------------------------------------------------------------------------------------
# The experiment of the lesson: Table 1 in a minute per model
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SelectiveCopyingConfig:
    """Selective copying sized for a 2-core CPU (the paper's values in the comments)."""

    seq_len: int = 48  # paper 4096 (here 44 noise/data slots + 4 answer slots)
    n_data: int = 4  # paper 16
    vocab: int = 16  # paper 16: noise, 14 data symbols, marker
    d_model: int = 32  # paper 64
    n_layers: int = 2  # paper 2
    d_state: int = 16  # paper 16 (Mamba's default N)
    batch: int = 64
    steps: int = 600
    lr: float = 1e-2
    warmup: int = 30
    scan_impl: str = "sequential"  # at L = 48 on a CPU, the plain loop is the fastest scan


def selective_copying_experiment(config=None, seed=0, selective=(False, True), return_models=False, **overrides):
    """Train one TaskModel per value of `selective` on selective copying; returns {selective: history}.

    config: a SelectiveCopyingConfig (default one if None); overrides replace its fields, e.g. steps=200.
    Every model sees the same batches and the same eval set; the model init is seeded by `seed` too.
    return_models: also return the trained models, {selective: TaskModel} (lesson 02 plots the S6 model's Δ).
    """
    config = config or SelectiveCopyingConfig()
    config = SelectiveCopyingConfig(**{**config.__dict__, **overrides})

    def make_batch(generator):
        return selective_copying(config.batch, config.seq_len, config.n_data, config.vocab, generator)

    histories, models = {}, {}
    for sel in selective:
        torch.manual_seed(seed)
        model = models[sel] = TaskModel(
            config.vocab, config.d_model, config.n_layers, config.d_state, sel, scan_impl=config.scan_impl
        )
        histories[sel] = train_task(model, make_batch, config.steps, lr=config.lr, warmup=config.warmup, seed=seed)
    return (histories, models) if return_models else histories


# ----------------------------------------------------------------------------------------------------------
# The experiment of lesson 05: associative recall, all-Mamba against one attention layer
# ----------------------------------------------------------------------------------------------------------

LAYOUTS = ("all-mamba", "hybrid")  # the hybrid: attention in the last layer only


@dataclass
class AssociativeRecallConfig:
    """MQAR and two same-width JambaLMs sized for a 2-core CPU (Jamba-v0.1's values in the comments)."""

    n_pairs: int = 8  # key-value pairs per sequence (then n_queries queries: L = 2 · 8 + 8 = 24)
    n_queries: int = 8
    vocab: int = 32  # keys 0..15, values 16..31: chance 1/16
    hidden_size: int = 64  # Jamba 4096
    num_hidden_layers: int = 2  # Jamba 32
    num_attention_heads: int = 4  # Jamba 32 (8 kv heads); here plain multi-head attention
    intermediate_size: int = 128  # Jamba 14336
    mamba_d_state: int = 4  # Jamba 16: shrunk, so that the Mamba state is small next to what it must hold
    rope: bool = False  # Jamba: no positional encoding
    batch: int = 64
    steps: int = 200
    lr: float = 3e-3
    warmup: int = 30
    eval_every: int = 20
    scan_impl: str = "sequential"  # at L = 24 on a CPU, the plain loop is the fastest scan

    def model_config(self, layout):
        """The JambaConfig of one layout: "all-mamba" (no attention layer) or "hybrid" (attention in the last layer).

        Everything else is shared: width, depth, heads, state size. The MLPs are plain SwiGLUs (one expert), as the
        mixture of experts (lesson 06) has nothing to do with recall.
        """
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        n = self.num_hidden_layers
        layer_types = ("mamba",) * (n - 1) + ("attention",) if layout == "hybrid" else "all-mamba"
        return JambaConfig.with_layout(
            layer_types,
            vocab_size=self.vocab,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=n,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads,
            num_experts=1,
            num_experts_per_tok=1,
            mamba_d_state=self.mamba_d_state,
            rope=self.rope,
            scan_impl=self.scan_impl,
        )


def associative_recall_experiment(config=None, seed=0, layouts=LAYOUTS, return_models=False, **overrides):
    """Train one JambaLM per layout on multi-query associative recall; returns {layout: history} (see train_task).

    config: an AssociativeRecallConfig (default one if None); overrides replace its fields, e.g. steps=50.
    Both models see the same batches and eval set, and their init is seeded by `seed`; they differ only in the
    layout: "all-mamba" has Mamba layers only, "hybrid" makes the last layer attention ([mamba, attention] for 2).
    return_models: also return the trained models, {layout: JambaLM}. The hybrid has the fewer parameters: an
    attention layer is smaller than a Mamba layer. The README's measured section has the accuracies, over seeds.
    """
    config = config or AssociativeRecallConfig()
    config = AssociativeRecallConfig(**{**config.__dict__, **overrides})

    def make_batch(generator):
        return associative_recall(config.batch, config.n_pairs, config.n_queries, config.vocab, generator)

    histories, models = {}, {}
    for layout in layouts:
        model_config = config.model_config(layout)
        torch.manual_seed(seed)
        model = models[layout] = JambaLM(model_config)
        histories[layout] = train_task(
            model, make_batch, config.steps, lr=config.lr, warmup=config.warmup, eval_every=config.eval_every, seed=seed
        )
    return (histories, models) if return_models else histories
