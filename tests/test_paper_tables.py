"""Tests of the Mamba paper's synthetic experiments (minijamba/tasks: copying.py for Table 1, induction.py for
Table 2): the Mamba block with an LTI SSM inside, TaskModel checkpoints, the experiments' logs, saved models and
tables on tiny configs, the parallel runner, the position-bet bound against the generator, the command line, and
the committed full runs (their logs complete, their models reproducing the logged scores)."""

import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_close

from minijamba import models
from minijamba.checkpoint import CheckpointError
from minijamba.mamba import MambaBlock, MambaConfig
from minijamba.tasks import TaskModel, copying, induction, induction_heads, selective_copying
from minijamba.tasks.runs import LOGS, MODELS, read_log

TINY_COPYING = copying.CopyingConfig(
    seq_len=12, n_data=2, vocab=6, d_model=8, d_state=4, batch=4, steps=3, eval_every=2, test_batches=2,
    scan_impl="chunked",
)  # fmt: skip
TINY_INDUCTION = induction.InductionConfig(
    seq_len=16, vocab=6, d_model=16, num_heads=2, intermediate_size=16, batch=4, steps=3, eval_every=2,
    curriculum=((8, 1),),
    test_lengths=(8, 16, 32), test_tokens=64, min_test_sequences=2, max_attention_length=16, scan_impl="chunked",
)  # fmt: skip


@settings(max_examples=10, deadline=None)
@given(L=st.integers(1, 12), split=st.integers(0, 12), seed=st.integers(0, 2**31 - 1))
def test_lti_mamba_block_steps_equal_its_forward(L, split, seed):
    """Table 1's "Mamba + S4" block: its Δ, B, C ignore the input, and its cache gives the forward's outputs."""
    torch.manual_seed(seed)
    block = MambaBlock(MambaConfig(d_model=8, d_state=4), selective=False).double()
    ssm = block.mixer.ssm
    assert not ssm.selective and not hasattr(ssm, "x_proj")
    hidden = torch.randn(2, L, 8, dtype=torch.float64)
    full, state, _ = block(hidden)
    split = min(split, L)
    out, cache = [], block.mixer.empty_state(2)
    if split:
        first, cache, _ = block(hidden[:, :split], cache)
        out.append(first)
    for t in range(split, L):
        h_t, cache = block.step(hidden[:, t], cache)
        out.append(h_t[:, None])
    assert_close(torch.cat(out, dim=1), full, "scan_float64")
    for a, b in zip(cache, state, strict=True):
        assert_close(a, b, "scan_float64")


@pytest.mark.parametrize("block", ["plain", "mamba"])
@pytest.mark.parametrize("selective", [True, False])
def test_task_model_round_trip(tmp_path, block, selective):
    torch.manual_seed(0)
    model = TaskModel(vocab=6, d_model=8, n_layers=2, d_state=4, selective=selective, block=block).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = TaskModel.from_pretrained(tmp_path / "m")
    tokens, _ = selective_copying(2, 12, 2, 6)
    assert torch.equal(model(tokens).logits, loaded(tokens).logits)
    assert (loaded.config["block"], loaded.config["selective"]) == (block, selective)


def test_task_model_refuses_a_foreign_checkpoint(tmp_path):
    TaskModel(vocab=6, d_model=8).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"vocab": 6, "d_model": 8}')
    with pytest.raises(CheckpointError, match="TaskModel's keys"):
        TaskModel.from_pretrained(tmp_path / "m")
    TaskModel(vocab=6, d_model=16).save_pretrained(tmp_path / "wide")
    (tmp_path / "wide" / "model.safetensors").replace(tmp_path / "other.safetensors")
    TaskModel(vocab=6, d_model=8).save_pretrained(tmp_path / "wide2")
    (tmp_path / "other.safetensors").replace(tmp_path / "wide2" / "model.safetensors")
    with pytest.raises(CheckpointError, match="wrong shapes"):
        TaskModel.from_pretrained(tmp_path / "wide2")
    with pytest.raises(ValueError, match="block must be one of"):
        TaskModel(vocab=6, block="h3")


def test_copying_experiment_logs_saves_and_tables(tmp_path):
    results = copying.copying_experiment(
        TINY_COPYING, ("s4-plain", "s6-mamba"), (0, 1), tmp_path / "log.jsonl", tmp_path / "models"
    )
    assert list(results) == ["s4-plain", "s6-mamba"] and all(len(v) == 2 for v in results.values())
    rows = read_log(tmp_path / "log.jsonl")
    assert rows[0]["kind"] == "config" and rows[0]["n_data"] == 2
    assert copying.results_from_log(rows) == results
    train = [r for r in rows if r["kind"] == "train" and r["model"] == "s6-mamba" and r["seed"] == 1]
    assert [r["step"] for r in train] == [2, 3]
    for key, accuracies in results.items():
        for seed, accuracy in enumerate(accuracies):
            saved = TaskModel.from_pretrained(tmp_path / "models" / f"{key}-seed{seed}")
            assert saved.config["block"] == copying.ROWS[key].block
            assert copying.held_out_accuracy(saved, TINY_COPYING) == accuracy  # the same model, the same test set
    text = copying.table(results)
    assert "| S4 (no gate) | 18.3 |" in text and "| Mamba block + S6 | 99.8 |" in text


def test_parallel_runs_equal_sequential_runs():
    """map_jobs with 2 worker processes gives the results of the runs one after another, in the jobs' order."""
    kwargs = dict(config=TINY_COPYING, rows=("s6-plain",), seeds=(0, 1))
    assert copying.copying_experiment(**kwargs, workers=2) == copying.copying_experiment(**kwargs, workers=1)


def test_experiments_refuse_unknown_rows_and_models():
    with pytest.raises(ValueError, match="rows must be"):
        copying.copying_experiment(TINY_COPYING, ("s5-plain",))
    with pytest.raises(ValueError, match="models must be"):
        induction.induction_experiment(TINY_INDUCTION, ("rwkv",))
    with pytest.raises(ValueError, match="workers"):
        copying.copying_experiment(TINY_COPYING, ("s4-plain",), workers=0)
    with pytest.raises(ValueError, match="test_lengths"):
        replace(TINY_INDUCTION, test_lengths=(8, 0))


def test_induction_experiment_logs_saves_and_tables(tmp_path):
    results = induction.induction_experiment(TINY_INDUCTION, log_path=tmp_path / "log.jsonl", save_dir=tmp_path)
    assert list(results) == list(induction.MODELS)
    assert list(results["mamba"]) == [8, 16, 32]  # Mamba at every length, attention up to max_attention_length
    assert all(list(results[m]) == [8, 16] for m in ("attention-rope", "attention-nope", "hybrid"))
    rows = read_log(tmp_path / "log.jsonl")
    assert induction.results_from_log(rows) == results
    sizes = {r["model"]: r["parameters"] for r in rows if r["kind"] == "train"}
    for name, accuracies in results.items():
        saved = models.load_pretrained(tmp_path / name)
        assert sum(p.numel() for p in saved.parameters()) == sizes[name]
        kinds = [layer.kind for layer in saved.layers]
        assert kinds == {"mamba": ["mamba"] * 2, "hybrid": ["mamba", "attention"]}.get(name, ["attention"] * 2)
        n = lambda length: induction.n_test_sequences(TINY_INDUCTION, length)  # noqa: E731
        again = induction.accuracy_at_lengths(saved, list(accuracies), TINY_INDUCTION.vocab, n)
        assert again == accuracies
    assert models.load_pretrained(tmp_path / "attention-rope").config.rope
    header = induction.table(results, train_length=16).splitlines()[0]
    assert "2^4 (train)" in header and "2^5" in header


def test_accuracy_at_lengths_does_not_depend_on_the_batching():
    torch.manual_seed(0)
    model = TINY_INDUCTION.build("mamba")
    n = lambda length: 12  # noqa: E731
    one_batch = induction.accuracy_at_lengths(model, [16, 24], 6, n, max_tokens=10**6)
    many = induction.accuracy_at_lengths(model, [16, 24], 6, n, max_tokens=40)  # batches of 2 and 1 sequences
    assert one_batch == many


def test_curriculum_then_the_training_length():
    """The curriculum's training batches are short, the rest (and the eval set) at seq_len."""
    g = torch.Generator().manual_seed(0)
    shapes = [TINY_INDUCTION.train_batch(g, step)[0].shape for step in (1, 2, 3)]
    assert shapes == [(4, 8), (4, 16), (4, 16)]
    assert TINY_INDUCTION.make_batch(g)[0].shape == (4, 16)
    with pytest.raises(ValueError, match="curriculum's steps"):
        replace(TINY_INDUCTION, curriculum=((8, 3),))
    staged = replace(TINY_INDUCTION, steps=10, curriculum=((4, 2), (8, 3)))
    assert [staged.train_length(step) for step in range(1, 8)] == [4, 4, 8, 8, 8, 16, 16]


def test_state_retention_of_a_known_delta():
    """With x_proj's Δ rows zero and dt bias b, Δ = softplus(b) on every token: retention is exp(-Δ·min|A|·span)."""
    torch.manual_seed(0)
    model = TINY_INDUCTION.build("hybrid")
    ssm = model.layers[0].mixer.ssm
    with torch.no_grad():
        ssm.dt_proj.weight.zero_()
        ssm.dt_proj.bias.fill_(-7.0)
    tokens, _ = induction_heads(3, 20, 6, seed=1)
    retention = induction.state_retention(model, tokens, [10, 1000], ignore_token=5)
    delta = torch.nn.functional.softplus(torch.tensor(-7.0, dtype=torch.float64)).item()
    rate = delta * torch.exp(ssm.A_log).min().item()
    assert list(retention) == [10, 1000] and all(len(v) == 1 for v in retention.values())  # one Mamba layer
    assert retention[1000][0] == pytest.approx(math.exp(-rate * 1000), rel=1e-5)  # float32 Δ: 1e-5 of its value
    assert not model.layers[0].mixer.ssm._forward_hooks  # the hooks are removed


def test_test_sequences_per_length():
    config = induction.InductionConfig()
    assert induction.n_test_sequences(config, 64) == 2**18 // 64
    assert induction.n_test_sequences(config, 2**16) == config.min_test_sequences
    assert induction.tested_lengths(config, "mamba")[-1] == 2**16
    assert induction.tested_lengths(config, "hybrid")[-1] == config.max_attention_length


@pytest.mark.parametrize("seq_len, n_data", [(24, 4), (40, 16), (30, 1)])
def test_position_bet_matches_the_generator(seq_len, n_data):
    """The k-th data token's position law (an order statistic) against 20,000 generated sequences.

    Each frequency is a mean of 20,000 Bernoulli draws: 5 standard errors, sqrt(p(1-p)/20000) <= 0.0035, bound
    the difference; the bet's accuracy is the mean over k of the modal probability (+ chance on a miss).
    """
    inputs, _ = selective_copying(20_000, seq_len, n_data, 16, seed=0)
    slots = seq_len - n_data
    is_data = (inputs[:, :slots] > 0).float()  # (batch, slots)
    rank = is_data.cumsum(1) * is_data  # the k of each data token, 0 on noise
    bet = copying.position_law(seq_len, n_data)  # (n_data, slots)
    assert bet.shape == (n_data, slots) and torch.allclose(bet.sum(1), torch.ones(n_data, dtype=torch.float64))
    for k in range(1, n_data + 1):
        frequency = (rank == k).double().mean(0)  # (slots,)
        assert (frequency - bet[k - 1]).abs().max() < 5 * math.sqrt(0.25 / 20_000)
    chance = 1 / 14
    expected = (bet.max(1).values * (1 - chance) + chance).mean().item()
    assert copying.position_bet_accuracy(seq_len, n_data, 16) == pytest.approx(expected, rel=1e-12)


def test_position_vote():
    """One data token: the vote picks the only data symbol, always right. More tokens: between the bet and 1."""
    assert copying.position_vote_accuracy(20, 1, 8, n_sequences=200) == 1.0
    vote = copying.position_vote_accuracy(48, 4, 16, n_sequences=2000)
    assert copying.position_bet_accuracy(48, 4, 16) < vote < 1.0


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "minijamba.tasks", *args], capture_output=True, text=True)


def test_cli_runs_saves_and_evaluates(tmp_path):
    done = _cli("selective-copying", "--steps", "2", "--seeds", "0", "--rows", "s4-plain", "--seq-len", "40",
                "--out", str(tmp_path), "--workers", "1", "--quiet")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "| S4 (no gate) | 18.3 |" in done.stdout
    saved = tmp_path / "models" / "09_selective_copying" / "s4-plain-seed0"
    assert (saved / "model.safetensors").is_file() and (tmp_path / "09_selective_copying.jsonl").is_file()
    evaluated = _cli("evaluate", str(saved))
    assert evaluated.returncode == 0 and "answer accuracy" in evaluated.stdout, evaluated.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (("selective-copying", "--steps", "0"), "expected a positive integer"),
        (("induction-heads", "--models", "rwkv"), "invalid choice"),
        (("evaluate", "/nonexistent/model"), "MODEL_DIR must be a saved model's folder"),
    ],
)
def test_cli_errors_are_one_line(args, message):
    done = _cli(*args)
    assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr


# ------------------------------------------------------------------------------------------------------------------
# The committed full runs (lessons/logs, lessons/models): complete, and their models reproduce their logged scores
# ------------------------------------------------------------------------------------------------------------------


def test_committed_selective_copying_run():
    rows = read_log(LOGS / "09_selective_copying.jsonl")
    config = copying.CopyingConfig(**{k: v for k, v in rows[0].items() if k not in ("experiment", "kind")})
    results = copying.results_from_log(rows)
    assert list(results) == list(copying.ROWS) and all(len(v) >= 3 for v in results.values())
    saved = TaskModel.from_pretrained(MODELS / "09_selective_copying" / "s6-mamba-seed0", scan_impl="auto")
    accuracy = copying.held_out_accuracy(saved, config)
    # Another CPU's roundings may flip an argmax that sits on a tie: allow 2 of the test set's answers.
    assert abs(accuracy - results["s6-mamba"][0]) <= 2 / (config.test_batches * config.batch * config.n_data)


def test_committed_induction_heads_run():
    rows = read_log(LOGS / "09_induction_heads.jsonl")
    config_row = {k: v for k, v in rows[0].items() if k not in ("experiment", "kind")}
    config = induction.InductionConfig(**{**config_row, "test_lengths": tuple(config_row["test_lengths"])})
    results = induction.results_from_log(rows)
    assert list(results) == list(induction.MODELS)
    assert list(results["mamba"]) == list(config.test_lengths)
    saved = models.load_pretrained(MODELS / "09_induction_heads" / "mamba", scan_impl="auto")
    length = 2**10
    n = induction.n_test_sequences(config, length)
    accuracy = induction.accuracy_at_lengths(saved, [length], config.vocab, lambda _: n)[length]
    assert abs(accuracy - results["mamba"][length]) <= 2 / n  # as above: 2 answers of the n
