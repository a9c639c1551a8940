"""train.py and sample.py on tiny models: the loss falls, the first step is the documented one, resume is
bit-identical, divergence stops cleanly, bad configs fail before any work, sampling is reproducible under --seed;
the committed logs of the README's runs are whole; the training presets name the model shapes of models.PRESETS;
sample.py reads a run without the training loop."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minijamba import data, jamba, models, sample
from minijamba import train as train_module
from minijamba.models import build_model
from minijamba.optim import param_groups
from minijamba.sample import load_run
from minijamba.train import LOGS_DIR, TrainingDiverged, read_log, train
from minijamba.train_config import MODELS, PRESETS, TrainConfig, model_config


def tiny(tmp_path, model="jamba", **overrides):
    return TrainConfig.from_preset(model, "tiny", out_dir=str(tmp_path), threads=1, n_samples=2, **overrides)


def log_rows(out_dir, key="loss"):
    rows = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny Jamba trained for 20 steps: its folder and train()'s result."""
    out_dir = tmp_path_factory.mktemp("tiny_jamba")
    return out_dir, train(tiny(out_dir, log_every=1))


def test_training_lowers_the_loss_and_writes_a_checkpoint(tiny_run):
    out_dir, result = tiny_run
    losses = [loss for _, loss in log_rows(out_dir)]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses  # from ln(300) = 5.7 nats down
    assert (out_dir / "latest").read_text().strip() == "ckpt-0000020"
    ckpt = out_dir / "ckpt-0000020"
    assert {p.name for p in ckpt.iterdir()} == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "train_config.json",
        "train_state.pt",
    }
    assert not list(out_dir.glob("ckpt-0000010"))  # older checkpoints are removed once the new one is in place
    val = log_rows(out_dir, "val_bpb")
    assert [s for s, _ in val] == [10, 20] and val[-1][1] == pytest.approx(result["val_bpb"])
    final = log_rows(out_dir, "final_val_bpb")  # the reported number: twice the windows, once at the end
    assert final == [(20, pytest.approx(result["final_val_bpb"]))] and result["final_eval_tokens"] == 16 * 32
    assert len(result["stories"]) == 2 and all(s.startswith("Once upon a time") for s in result["stories"])


def test_read_log_gives_the_rows_in_order(tiny_run):
    out_dir, result = tiny_run
    rows = read_log(out_dir)
    assert rows == read_log(out_dir / "log.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 21))
    final = ("final_val_loss", "final_val_bpb", "final_eval_tokens")
    assert rows[-1] == {"step": 20, **{key: result[key] for key in final}}


def test_the_committed_logs_are_whole_runs():
    """lessons/logs: the README's five cpu20 runs, each evaluated every 100 steps and ending in its final row."""
    names = sorted(p.name for p in LOGS_DIR.glob("08_*.jsonl"))
    runs = ["jamba", "mamba", "pair_jamba", "pair_transformer", "transformer"]
    assert names == [f"08_{run}.jsonl" for run in runs]
    cpu20 = TrainConfig.from_preset("jamba", "cpu20")
    for name in names:
        rows = read_log(LOGS_DIR / name)
        assert "final_val_bpb" in rows[-1] and rows[-1]["final_eval_tokens"] == 512 * cpu20.context
        evals = [r for r in rows if "val_bpb" in r]
        assert all(r["tokens"] == r["step"] * cpu20.batch_size * cpu20.context for r in evals)
        assert evals[-1]["elapsed_s"] >= 60 * cpu20.max_minutes  # each ran its whole budget by the clock


def test_the_first_step_is_the_documented_one(tmp_path):
    """train()'s step 1 = seed, build_model, get_batch, compute_loss, backward, clip, AdamW(param_groups) at lr_at."""
    cfg = tiny(tmp_path, max_steps=1, log_every=1)
    train(cfg)
    trained, tokenizer, _ = load_run(tmp_path)
    torch.manual_seed(cfg.seed)
    config = model_config(cfg)
    model = build_model(config)
    stream = data.encode_stories(tokenizer, data.split_stories(data.read_text("train"))[: cfg.max_stories])
    inputs, targets = data.get_batch(stream, cfg.batch_size, cfg.context, torch.Generator().manual_seed(cfg.seed))
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2))  # fmt: skip
    for group in optimizer.param_groups:
        group["lr"] = train_module.lr_at(cfg, 0, 0.0)  # max_minutes is None: the schedule reads the step alone
    loss, ce = train_module.compute_loss(model, inputs, targets, config.router_aux_loss_coef)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    assert read_log(tmp_path)[0]["loss"] == ce.item()  # the logged loss is this step's cross-entropy, to the bit
    for (name, p), q in zip(model.named_parameters(), trained.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("model", ["mamba", "transformer"])
def test_the_baselines_train(tmp_path, model):
    result = train(tiny(tmp_path, model, max_steps=4, eval_every=4))
    assert math.isfinite(result["val_loss"]) and result["step"] == 4
    loaded, _, cfg = load_run(tmp_path)
    assert cfg.model == model and type(loaded).__name__ == ("MambaLM" if model == "mamba" else "JambaLM")


def test_no_weight_decay_on_ssm_parameters_norms_and_biases():
    model = build_model(model_config(TrainConfig.from_preset("jamba", "tiny")))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)].split(".")[-1] for p in no_decay["params"]}
    assert {"A_log", "D", "weight", "bias"} <= undecayed  # norms' weights, conv/dt biases
    assert all(p.ndim >= 2 and not names[id(p)].endswith("A_log") for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_resume_is_bit_identical(tmp_path, monkeypatch):
    """A run that crashes after its step-3 checkpoint, resumed, logs exactly the losses of an uninterrupted run."""
    settings = dict(max_steps=6, eval_every=3, log_every=1)
    train(tiny(tmp_path / "straight", **settings))

    calls = {"n": 0}
    real = train_module.compute_loss

    def crash_at_step_5(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # a kill between checkpoints: step 4's work is lost, step 3's checkpoint is not
        return real(*args)

    monkeypatch.setattr(train_module, "compute_loss", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path / "resumed", **settings))
    monkeypatch.setattr(train_module, "compute_loss", real)
    assert (tmp_path / "resumed" / "latest").read_text().strip() == "ckpt-0000003"
    train(tiny(tmp_path / "resumed", resume=True, **settings))

    straight, resumed = log_rows(tmp_path / "straight"), log_rows(tmp_path / "resumed")
    assert [s for s, _ in resumed] == [1, 2, 3, 4, 5, 6]
    assert resumed == straight  # floats compared exactly: bit-identical
    assert log_rows(tmp_path / "resumed", "val_loss") == log_rows(tmp_path / "straight", "val_loss")


def test_a_non_finite_loss_stops_cleanly_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real = train_module.compute_loss
    calls = {"n": 0}

    def nan_at_step_5(*args):
        calls["n"] += 1
        loss, ce = real(*args)
        return (loss * math.nan, ce * math.nan) if calls["n"] == 5 else (loss, ce)

    monkeypatch.setattr(train_module, "compute_loss", nan_at_step_5)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 5.*ckpt-0000003, is kept"):
        train(tiny(tmp_path, max_steps=10, eval_every=3))
    model, _, _ = load_run(tmp_path)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert json.loads((tmp_path / "ckpt-0000003" / "train_config.json").read_text())["max_steps"] == 10


def test_bad_configs_fail_before_any_work(tmp_path, monkeypatch, capsys):
    def no_reading(*args, **kwargs):
        raise AssertionError("data was read before the config was checked")

    monkeypatch.setattr(train_module.data, "read_text", no_reading)
    with pytest.raises(ValueError, match="preset must be one of"):
        TrainConfig.from_preset("jamba", "huge")
    with pytest.raises(ValueError, match="model must be one of"):
        TrainConfig.from_preset("rwkv", "tiny")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        tiny(tmp_path, batch_size=0)
    monkeypatch.setitem(jamba.PRESETS, "tiny", {**jamba.PRESETS["tiny"], "hidden_size": 30})  # the shape, by name
    with pytest.raises(ValueError, match="hidden_size 30 must be divisible by num_attention_heads 4"):
        train(tiny(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder"):
        train(tiny(tmp_path / "empty", resume=True))
    assert train_module.main(["--preset", "huge"]) == 1
    assert "preset must be one of" in capsys.readouterr().err


def test_missing_full_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="make data-full"):
        train(tiny(tmp_path / "run", data="full", data_dir=str(tmp_path / "nothing")))


def test_sample_cli_writes_stories_and_respects_the_seed(tiny_run, capsys):
    out_dir, _ = tiny_run

    def run(*extra):
        assert sample.main(["--ckpt", str(out_dir), "--n", "2", "--max-new-tokens", "20", *extra]) == 0
        return capsys.readouterr().out

    first, again, other = run("--seed", "1"), run("--seed", "1"), run("--seed", "2")
    assert first == again and first != other.replace("seed 2", "seed 1")
    assert first.count("--- story") == 2 and "Once upon a time" in first
    assert sample.main(["--ckpt", str(out_dir / "nowhere")]) == 1


def test_the_training_presets_name_the_model_shapes():
    """Every shape is written once, in models.PRESETS: a training preset names one, and model_config builds it."""
    for preset, models_of in PRESETS.items():
        for model, family in MODELS.items():
            cfg = TrainConfig.from_preset(model, preset)
            shape = PRESETS[preset][model]["shape"]
            assert isinstance(shape, str) and shape in models.PRESETS[family]
            expected = models.preset(family, shape, vocab_size=cfg.vocab_size, scan_impl=cfg.scan_impl)
            assert model_config(cfg) == expected and models_of[model]["lr"] == cfg.lr
            assert type(build_model(expected, device="meta")) is models.MODEL_CLASSES[family]
    assert PRESETS["cpu20"]["jamba"]["shape"] == "small-cpu" and PRESETS["tiny"]["jamba"]["shape"] == "tiny"
    transformer = model_config(TrainConfig.from_preset("transformer", "cpu20"))
    assert set(transformer.layer_types) == {"attention"}  # the "all-attention" layout
    with pytest.raises(ValueError, match="unknown mamba preset 'huge'"):
        models.preset("mamba", "huge")
    with pytest.raises(ValueError, match="family must be one of"):
        models.preset("rwkv", "tiny")


def test_sample_reads_a_run_without_importing_the_training_loop():
    code = "import sys, minijamba.sample; print('minijamba.train' in sys.modules, 'minijamba.tasks' in sys.modules)"
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False"]


def test_progress_line_of_a_budgeted_run_tells_time_and_expected_steps():
    """A 17-minute run at 4 steps/s shows minutes used and left and the steps it will reach, not max_steps."""
    cfg = train_module.TrainConfig.from_preset("jamba", "cpu20")  # max_steps 4000, max_minutes 17
    done, text = train_module.progress_line(cfg, step=1000, elapsed=5 * 60, steps_per_s=1.0)
    assert text == "5.0 min, 12.0 left, step 1000 of ~1720"
    assert done == pytest.approx(5 / 17)  # the clock leads: 1000 / 4000 is less
    done, text = train_module.progress_line(cfg, step=3900, elapsed=5 * 60, steps_per_s=100.0)
    assert text == "5.0 min, 0.0 left, step 3900 of ~4000" and done == pytest.approx(3900 / 4000)
    steps_only = train_module.TrainConfig.from_preset("jamba", "tiny")
    assert train_module.progress_line(steps_only, 5, 1.0, 2.0) == (5 / 20, "step 5/20")
