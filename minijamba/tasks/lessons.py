"""The short experiments of lessons 02 and 05: selective copying with 4 data tokens (S4 against S6), and associative
recall (all-Mamba against one attention layer)."""

from dataclasses import dataclass

import torch

from minijamba.jamba import JambaConfig, JambaLM
from minijamba.tasks.data import associative_recall, selective_copying
from minijamba.tasks.model import TaskModel
from minijamba.tasks.training import train_task


@dataclass
class SelectiveCopyingConfig:
    """Lesson 02's selective copying, a minute per model on a 2-core CPU (the paper's values in the comments).

    4 data tokens, not Table 1's 16 (copying.py has that setting): L = 48 (44 noise/data slots, then 4 answer slots),
    vocabulary 16 (14 data symbols, chance 1/14 = 7%), d_model 32, 600 steps of batch 64. The LTI model does not
    stay at chance here: with only 4 data tokens, where the k-th one lies is predictable to within about one gap
    between tokens, and a fixed kernel can bet on that. The README's measured section has the accuracies.
    """

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
