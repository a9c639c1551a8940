"""Table 2 of the Mamba paper: induction heads trained at L 256, tested at lengths up to 2^16.

Table 2 (Gu & Dao 2023, §4.1.2; Appendix E.1.2): vocabulary 16, 2 layers, d_model 64, trained at L 256; Mamba
(74K parameters) answers 100% at every test length up to 2^20 = 1M tokens, 4000× its training length, while
multi-head attention with any positional scheme (absolute, RoPE, xPos) falls apart beyond about 2× (RoPE: 83.6%
already at 512); the attention rows stop where their memory ran out.

The models here, all 2 layers of width 64 with the same vocabulary (chance 1/15: the trigger is never an answer):
  mamba           MambaLM: two Mamba blocks (mamba.py), no MLP, as the paper's
  attention-rope  JambaLM with two attention layers (4 heads, rotary positions), each with a SwiGLU MLP
  attention-nope  the same without positions: a causal mask is all the order it sees
  hybrid          JambaLM [Mamba, attention] without positions, each with the SwiGLU MLP (Jamba's layers)
The attention MLPs (intermediate 128) bring those models to about the Mamba model's size; the table prints each
model's parameter count.

Where this deviates from the paper, and why: a length curriculum. Every model trains 300 steps at L 16, 300 at
L 64, then the rest at seq_len (256): "trained at L 256" means here the longest length it saw, and the only one
of its eval set. From scratch at L 256 (one answer per 256 tokens) no model left chance within the budget: the
Mamba model's loss stayed at ln 15 for 800 steps at lr 3e-3 and at 1e-2, attention with RoPE for 700 steps; at
L 64 the Mamba model and the hybrid reached 100% by step 400, and attention with RoPE learned at L 16 within 200
steps but not at L 64 within 400. The paper trains far longer on a GPU (Appendix E.1).

Long test lengths run the Mamba layers through the fused CPU scan (lesson 07), seconds at 2^16; attention is
quadratic in L, so its models are tested up to max_attention_length only (2^14 by default), as the paper's
attention rows stop where they ran out of memory.
"""

import math
import time
import warnings
from dataclasses import dataclass, field
from functools import partial

import torch

from minijamba.checks import positive_int
from minijamba.jamba import JambaConfig, JambaLM
from minijamba.mamba import MambaConfig, MambaLM
from minijamba.models import count_parameters
from minijamba.tasks.data import induction_heads
from minijamba.tasks.runs import format_table, map_jobs, open_run
from minijamba.tasks.training import answer_accuracy, train_task

TEST_SEED = 2_000_000  # the test sets' generators: far from every training and eval seed
MODELS = {
    "mamba": "Mamba",
    "attention-rope": "attention + RoPE",
    "attention-nope": "attention, no positions",
    "hybrid": "hybrid: Mamba, attention",
}
PAPER = {  # Table 2's accuracy (%) at the lengths it reports for the rows that match ours (None: not reported)
    "mamba": {2**k: 100.0 for k in range(6, 21)},
    "attention-rope": {2**6: 100.0, 2**7: 100.0, 2**8: 100.0, 2**9: 83.6},
}


@dataclass
class InductionConfig:
    """Induction heads on a 2-core CPU (the paper's values in the comments)."""

    seq_len: int = 256  # paper 256
    vocab: int = 16  # paper 16
    d_model: int = 64  # paper 64
    n_layers: int = 2  # paper 2
    num_heads: int = 4  # the attention layers' heads (head_dim 16)
    intermediate_size: int = 128  # the SwiGLU MLP after each layer of the JambaLMs
    batch: int = 32
    steps: int = 1200
    # (length, steps) stages before seq_len: 300 steps at L 16, 300 at L 64, the remaining 600 at seq_len
    curriculum: tuple = ((16, 300), (64, 300))
    lr: float = 3e-3
    warmup: int = 100
    eval_every: int = 100
    test_lengths: tuple = field(default_factory=lambda: tuple(2**k for k in range(6, 17)))  # 64 .. 65,536
    test_tokens: int = 2**18  # tokens per test length: 2^18 / L sequences (4096 at L 64), at least min_test_sequences
    min_test_sequences: int = 16
    max_attention_length: int = 2**14  # models with attention are not tested beyond (quadratic cost)
    scan_impl: str = "auto"  # the fused CPU kernel for the Mamba layers

    def __post_init__(self):
        for name in ("seq_len", "vocab", "d_model", "n_layers", "num_heads", "intermediate_size", "batch", "steps"):
            positive_int(name, getattr(self, name))
        for name in ("eval_every", "test_tokens", "min_test_sequences", "max_attention_length"):
            positive_int(name, getattr(self, name))
        self.test_lengths = tuple(positive_int("test_lengths", n) for n in self.test_lengths)
        stages = tuple(
            (positive_int("curriculum length", n), positive_int("curriculum steps", k)) for n, k in self.curriculum
        )
        self.curriculum = stages
        if sum(k for _, k in stages) >= self.steps:
            raise ValueError(f"the curriculum's steps must leave some of steps={self.steps} at seq_len: {stages}")

    def make_batch(self, generator):
        return induction_heads(self.batch, self.seq_len, self.vocab, generator)

    def train_length(self, step):
        """The training length at a step (1-based): the curriculum's stages in turn, then seq_len."""
        for length, stage_steps in self.curriculum:
            if step <= stage_steps:
                return length
            step -= stage_steps
        return self.seq_len

    def train_batch(self, generator, step):
        return induction_heads(self.batch, self.train_length(step), self.vocab, generator)

    def model_config(self, name):
        """The MambaConfig or JambaConfig of one of MODELS."""
        if name == "mamba":
            return MambaConfig(self.d_model, self.n_layers, self.vocab, scan_impl=self.scan_impl)
        if name not in MODELS:
            raise ValueError(f"model must be one of {list(MODELS)}, got {name!r}")
        layout = ("mamba",) + ("attention",) * (self.n_layers - 1) if name == "hybrid" else "all-attention"
        return JambaConfig.with_layout(
            layout,
            vocab_size=self.vocab,
            hidden_size=self.d_model,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            num_experts=1,
            num_experts_per_tok=1,
            rope=name == "attention-rope",
            scan_impl=self.scan_impl,
        )

    def build(self, name):
        config = self.model_config(name)
        return (MambaLM if name == "mamba" else JambaLM)(config)


def n_test_sequences(config, length):
    """How many test sequences at one length: test_tokens / length, at least min_test_sequences."""
    return max(config.min_test_sequences, config.test_tokens // length)


@torch.no_grad()
def accuracy_at_lengths(model, lengths, vocab, n_sequences, max_tokens=2**17):
    """{length: answer accuracy} of a trained model on induction heads at each test length.

    n_sequences(length) -> how many sequences; they come from generators seeded TEST_SEED + length, the same for
    every model. Run in batches of at most max_tokens tokens, so memory stays flat as the length grows.
    """
    model.eval()
    results = {}
    for length in lengths:
        inputs, targets = induction_heads(n_sequences(length), length, vocab, TEST_SEED + length)
        per_batch = max(1, max_tokens // length)
        hits = 0.0
        for i in range(0, len(inputs), per_batch):
            chunk = slice(i, i + per_batch)
            hits += answer_accuracy(model, inputs[chunk], targets[chunk]) * len(inputs[chunk])
        results[length] = hits / len(inputs)
    return results


@torch.no_grad()
def state_retention(model, tokens, spans, ignore_token=None):
    """How much of a Mamba layer's state can survive `span` tokens: {span: [best retention per Mamba layer]}.

    Each mode (channel d, state n) of an S6 state shrinks by exp(Δ_t · A[d, n]) per token (lesson 02). Over the
    tokens of `tokens` (batch, L), except those equal to ignore_token (the trigger), this averages each channel's
    Δ, and reports the best mode's exp(-mean Δ · |A| · span): an upper bound on the fraction of an answer written
    into the state that is still there `span` distractor tokens later.
    """
    inputs = {}
    hooks = [
        layer.mixer.ssm.register_forward_hook(lambda module, args, out, i=i: inputs.__setitem__(i, args[0]))
        for i, layer in enumerate(model.layers)
        if layer.kind == "mamba"
    ]
    try:
        model.eval()
        model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    keep = tokens != ignore_token  # (batch, L)
    rates = []
    for i in sorted(inputs):
        ssm = model.layers[i].mixer.ssm
        delta = ssm.ssm_parameters(inputs[i])[0]  # (batch, d_inner, L)
        mean_delta = delta.transpose(1, 2)[keep].mean(0)  # (d_inner,)
        rates.append((mean_delta[:, None] * torch.exp(ssm.A_log)).min().item())  # the slowest mode's decay per token
    return {span: [math.exp(-rate * span) for rate in rates] for span in spans}


def tested_lengths(config, name):
    """The test lengths of one model: all of them for Mamba, up to max_attention_length for models with attention."""
    return [n for n in config.test_lengths if name == "mamba" or n <= config.max_attention_length]


def train_model(config, name, seed=0, save_dir=None, report=None):
    """Train one of MODELS at seq_len and test it at its test lengths: (history, {length: (accuracy, seconds)}).

    save_dir: the trained model is saved to save_dir/<model> (save_pretrained; models.load_pretrained reads it), or
    None. report: called with a line of text after each eval and each test length, or None.
    """
    torch.manual_seed(seed)
    model = config.build(name)

    def on_eval(entry):
        if report is not None:
            report(
                f"{name}: step {entry['step']:5d}  loss {entry['loss']:.3f}  accuracy {entry['accuracy']:.3f}  "
                f"{entry['seconds']:.0f} s"
            )

    history = train_task(
        model,
        config.make_batch,
        config.steps,
        lr=config.lr,
        warmup=config.warmup,
        eval_every=config.eval_every,
        seed=seed,
        on_eval=on_eval,
        train_batch=config.train_batch,
    )
    if save_dir is not None:
        with (
            warnings.catch_warnings()
        ):  # "rope has no HF counterpart": these checkpoints are for models.load_pretrained
            warnings.simplefilter("ignore", UserWarning)
            model.save_pretrained(f"{save_dir}/{name}")
    tests = {}
    for length in tested_lengths(config, name):
        start = time.perf_counter()
        accuracy = accuracy_at_lengths(model, [length], config.vocab, lambda n: n_test_sequences(config, n))[length]
        tests[length] = accuracy, time.perf_counter() - start
        if report is not None:
            report(f"{name}: length {length:6d}  accuracy {accuracy:.3f}  ({tests[length][1]:.1f} s)")
    return history, tests


def induction_experiment(
    config=None, models=tuple(MODELS), seed=0, log_path=None, save_dir=None, report=None, workers=1
):
    """Train each model at seq_len, test it at every test length; returns {model: {length: accuracy}}.

    log_path: a JSONL log (runs.py), or None; a model's rows are written when it is done. save_dir, report: as in
    train_model. workers: models trained side by side (runs.map_jobs), each on one thread.
    """
    config = config or InductionConfig()
    log = open_run(log_path, "induction-heads", config, models, MODELS, "models", workers)
    run = partial(train_model, config, seed=seed, save_dir=save_dir, report=report)
    results = {}
    for name, (history, tests) in zip(models, map_jobs(run, [(m,) for m in models], workers), strict=True):
        parameters = count_parameters(config.model_config(name)).total
        for entry in history:
            log.write(kind="train", model=name, seed=seed, parameters=parameters, **entry)
        for length, (accuracy, seconds) in tests.items():
            log.write(kind="test", model=name, seed=seed, length=length, accuracy=accuracy, seconds=seconds)
        results[name] = {length: accuracy for length, (accuracy, _) in tests.items()}
    return results


def results_from_log(rows):
    """{model: {length: accuracy}} from a log's rows (runs.read_log), as induction_experiment returns it."""
    results = {}
    for row in rows:
        if row.get("kind") == "test":
            results.setdefault(row["model"], {})[row["length"]] = row["accuracy"]
    return results


def table(results, train_length=256):
    """Table 2's layout: one line per model, accuracy in % at each test length (log2 in the header)."""
    lengths = sorted({n for accuracies in results.values() for n in accuracies})
    header = ("model", *(f"2^{n.bit_length() - 1}" + (" (train)" if n == train_length else "") for n in lengths))
    lines = [
        (MODELS[name], *(f"{100 * acc[n]:.1f}" if n in acc else "-" for n in lengths)) for name, acc in results.items()
    ]
    return format_table(header, lines)
