"""Issue 15's one-line errors on the config, sampling and generation side: each bad flag, damaged file or foreign
tokenizer is a ValueError (or FileNotFoundError) naming it, and the CLIs print one `error:` line and exit 1.

The checkpoints here are written by hand (save_pretrained, save_tokenizer, train_config.json) from an untrained
tiny model: sampling needs no trained weights, and the tests need no training run.
"""

import json
import math
import os
import shutil
from dataclasses import asdict

import pytest
import torch

from minijamba import data, sample, train
from minijamba.generation import MAX_NEW_TOKENS, sample_next
from minijamba.models import build_model
from minijamba.train_config import MAX_LR, TrainConfig, model_config, resolve_device

STORIES = ["Once upon a time there was a little cat. It liked the sun.", "Tom had a red ball. He gave it to Sue."]


def write_checkpoint(ckpt, cfg, tokenizer, seed=0):
    torch.manual_seed(seed)
    build_model(model_config(cfg)).save_pretrained(ckpt)
    data.save_tokenizer(tokenizer, ckpt)
    (ckpt / "train_config.json").write_text(json.dumps(asdict(cfg)))
    return ckpt


@pytest.fixture(scope="module")
def tokenizer():
    return data.train_tokenizer(STORIES * 10, 300)


@pytest.fixture
def run_dir(tmp_path, tokenizer):
    """A run folder as train.py leaves it: ckpt-0000001 and `latest` naming it."""
    cfg = TrainConfig.from_preset("jamba", "tiny", out_dir=str(tmp_path))
    write_checkpoint(tmp_path / "ckpt-0000001", cfg, tokenizer)
    (tmp_path / "latest").write_text("ckpt-0000001\n")
    return tmp_path


def one_error_line(capsys, code, *needles):
    """The CLI returned 1 with exactly one stderr line, `error: ...`, holding every needle."""
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def sample_main(run_dir, *flags):
    return sample.main(["--ckpt", str(run_dir), "--n", "1", "--max-new-tokens", "3", *flags])


# --- TrainConfig ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [("lr", 3e38), ("lr", math.inf), ("lr", math.nan), ("lr", 0.0), ("lr", MAX_LR * 2), ("grad_clip", math.inf),
     ("beta1", 1.0), ("beta2", -0.1), ("weight_decay", math.nan), ("weight_decay", math.inf)],
)  # fmt: skip
def test_train_config_refuses_non_finite_or_absurd_floats(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        TrainConfig(**{field: value})


def test_lr_3e38_is_one_line_not_an_overflow_inside_adamw(tmp_path, capsys):
    """--lr 3e38 is finite, but AdamW's step size lr / (1 - beta1) overflows float32: refused at the flag; an lr up
    to MAX_LR (a divergence provoked on purpose, `--lr 20`) is accepted."""
    code = train.main(["--preset", "tiny", "--lr", "3e38", "--out_dir", str(tmp_path / "run")])
    one_error_line(capsys, code, "lr must be in (0, 100]")
    assert not (tmp_path / "run").exists()
    assert TrainConfig(lr=20).lr == 20 and TrainConfig(lr=MAX_LR).lr == MAX_LR


def test_train_config_checks_types_with_a_value_error():
    """A wrong type (from a hand-edited train_config.json) is a ValueError naming the field, not a TypeError."""
    for field, value, needle in [
        ("lr", "3e-3", "lr must be a number"),
        ("max_stories", 2.5, "max_stories must be an integer or None"),
        ("compile", 1, "compile must be true or false"),
        ("seed", True, "seed must be an integer"),
    ]:
        with pytest.raises(ValueError, match=needle):
            TrainConfig(**{field: value})


@pytest.mark.parametrize("seed", [2**70, 2**64, -1])
def test_seed_must_be_what_torch_manual_seed_takes(seed, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        TrainConfig(seed=seed)
    code = train.main(["--preset", "tiny", "--seed", str(seed), "--out_dir", str(tmp_path / "run")])
    one_error_line(capsys, code, "seed must be an integer")
    assert TrainConfig(seed=2**64 - 1).seed == 2**64 - 1
    torch.Generator().manual_seed(2**64 - 1)  # the bound is torch's


@pytest.mark.parametrize("device", ["banana", "", "cuda:-1", "CUDA", "meta"])
def test_device_must_parse(device, tmp_path, capsys):
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda"):
        TrainConfig(device=device)
    code = train.main(["--preset", "tiny", "--device", device, "--out_dir", str(tmp_path / "run")])
    one_error_line(capsys, code, "device must be auto, cpu, cuda")


def test_resolve_device_names_a_missing_gpu(monkeypatch):
    """A config saved with device cuda still loads without a GPU; using it there is the error."""
    assert TrainConfig(device="cuda:1").device == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="--device cuda: torch sees no CUDA GPU"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(ValueError, match=r"--device cuda:1: torch sees 1 GPU\(s\) here, cuda:0 to cuda:0"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no MPS device"):
        resolve_device("mps")


def test_from_json_round_trips_and_names_the_file(tmp_path):
    path = tmp_path / "train_config.json"
    cfg = TrainConfig.from_preset("mamba", "tiny", seed=3)
    path.write_text(json.dumps(asdict(cfg)))
    assert TrainConfig.from_json(path) == cfg
    old = asdict(cfg)
    del old["overwrite"]  # a file written before a field existed: the field takes its default
    path.write_text(json.dumps(old))
    assert TrainConfig.from_json(path) == cfg
    for text, needle in [
        (json.dumps({**asdict(cfg), "learning_rate": 1}), "unknown setting(s) learning_rate"),
        ('{"lr": 0.1,', "is not readable JSON"),
        ("[1, 2]", "must hold a JSON object"),
        (json.dumps({"lr": "fast"}), "lr must be a number"),
        (json.dumps({"lr": float("nan")}), "lr must be in"),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError) as e:
            TrainConfig.from_json(path)
        assert str(path) in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match="is not readable JSON"):
        TrainConfig.from_json(path)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="no train_config.json in"):
        TrainConfig.from_json(path)
    os.mkfifo(path)  # would block read_text forever
    with pytest.raises(ValueError, match="is not a regular file"):
        TrainConfig.from_json(path)


# --- sample.py -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, needle",
    [(["--prompt", ""], "--prompt"), (["--temperature", "nan"], "--temperature must be a finite number"),
     (["--temperature", "-1"], "--temperature"), (["--top-k", "0"], "--top-k must be a positive integer"),
     (["--seed", str(2**70)], "--seed must be an integer in [0, 2**64)"), (["--n", "0"], "--n must be"),
     (["--max-new-tokens", str(MAX_NEW_TOKENS + 1)], "--max-new-tokens must be an integer in [0, 1_000_000]"),
     (["--device", "banana"], "--device must be auto, cpu, cuda")],
)  # fmt: skip
def test_sample_bad_flags_are_one_line(run_dir, capsys, flags, needle):
    err = one_error_line(capsys, sample_main(run_dir, *flags), needle)
    assert "input_ids" not in err


def test_train_and_sample_without_a_gpu_say_so(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    one_error_line(capsys, sample_main(run_dir, "--device", "cuda"), "--device cuda: torch sees no CUDA GPU")
    code = train.main(["--preset", "tiny", "--device", "cuda", "--out_dir", str(tmp_path / "run")])
    one_error_line(capsys, code, "--device cuda: torch sees no CUDA GPU")


def test_sample_works_on_the_hand_made_run(run_dir, capsys):
    assert sample_main(run_dir, "--seed", str(2**64 - 1)) == 0
    assert "--- story 1 ---" in capsys.readouterr().out


def test_a_tokenizer_from_another_run_is_one_line(run_dir, capsys):
    """A larger vocabulary's ids run past the model's embedding: an IndexError (a device assert on CUDA)."""
    bigger = data.train_tokenizer(data.split_stories(data.read_text("train", max_chars=200_000)), 400)
    assert bigger.get_vocab_size() == 400
    data.save_tokenizer(bigger, run_dir / "ckpt-0000001")
    one_error_line(capsys, sample_main(run_dir), "has 400 tokens, the model", "from another run")


@pytest.mark.parametrize(
    "damage, needle",
    [(lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:1000]), "safetensors"),
     (lambda c: (c / "config.json").write_text("{garbage"), "config.json"),
     (lambda c: (c / "tokenizer.json").write_text("{garbage"), "tokenizer.json"),
     (lambda c: (c / "train_config.json").write_text('{"lr": 0.1, "colour": "red"}'), "unknown setting(s) colour"),
     (lambda c: (c / "train_config.json").unlink(), "no train_config.json")],
)  # fmt: skip
def test_a_damaged_checkpoint_is_one_line(run_dir, capsys, damage, needle):
    damage(run_dir / "ckpt-0000001")
    one_error_line(capsys, sample_main(run_dir), needle)


def test_a_diverged_checkpoint_is_one_line_not_a_multinomial_crash(tmp_path, tokenizer, capsys):
    cfg = TrainConfig.from_preset("jamba", "tiny")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    model = build_model(model_config(cfg))
    with torch.no_grad():
        model.lm_head.weight.fill_(math.nan)
    model.save_pretrained(ckpt)
    data.save_tokenizer(tokenizer, ckpt)
    (ckpt / "train_config.json").write_text(json.dumps(asdict(cfg)))
    one_error_line(capsys, sample_main(ckpt), "hold NaN or inf", "sample an earlier checkpoint")


def test_control_characters_are_printed_escaped(run_dir, capsys, monkeypatch):
    story = "Once\x1b]0;pwned\x07 upon\r a \x9b31m time\x7f\nline two\tend \u00e9"
    assert sample.printable(story) == "Once\\x1b]0;pwned\\x07 upon\\r a \\x9b31m time\\x7f\nline two\tend \u00e9"
    monkeypatch.setattr(sample, "sample_stories", lambda *args: [story])
    assert sample_main(run_dir) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\r\x9b\x7f") and "\\x1b]0;pwned" in out and "line two\tend" in out


def test_latest_is_read_again_when_its_checkpoint_moves_away(run_dir, monkeypatch):
    """The trainer saves ckpt-0000002, points `latest` at it and deletes ckpt-0000001 while sample reads it."""
    real = sample.load_pretrained
    calls = []

    def trainer_saves_meanwhile(ckpt, **kwargs):
        calls.append(ckpt.name)
        if len(calls) == 1:
            shutil.copytree(run_dir / "ckpt-0000001", run_dir / "ckpt-0000002")
            (run_dir / "latest.tmp").write_text("ckpt-0000002\n")
            os.replace(run_dir / "latest.tmp", run_dir / "latest")
            shutil.rmtree(run_dir / "ckpt-0000001")
        return real(ckpt, **kwargs)

    monkeypatch.setattr(sample, "load_pretrained", trainer_saves_meanwhile)
    model, tokenizer, cfg = sample.load_run(run_dir)
    assert calls == ["ckpt-0000001", "ckpt-0000002"] and cfg.preset == "tiny"


def test_a_checkpoint_that_stays_bad_is_not_retried(run_dir, capsys):
    (run_dir / "ckpt-0000001" / "model.safetensors").write_bytes(b"not safetensors")
    one_error_line(capsys, sample_main(run_dir), "model.safetensors")


@pytest.mark.parametrize("latest", ["", "../elsewhere", "/etc", "ckpt-0000009"])
def test_a_bad_latest_file_is_one_line(run_dir, capsys, latest):
    (run_dir / "latest").write_text(latest)
    one_error_line(capsys, sample_main(run_dir), str(run_dir / "latest"))


# --- generation.py -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, needle",
    [(dict(temperature=math.nan), "temperature must be a finite number"), (dict(temperature=math.inf), "temperature"),
     (dict(temperature=True), "temperature"), (dict(top_k=2.5), "top_k must be a positive integer"),
     (dict(top_k=True), "top_k"), (dict(top_k=0), "top_k"), (dict(max_new_tokens=10**12), "max_new_tokens must be"),
     (dict(max_new_tokens=2.0), "max_new_tokens"), (dict(max_new_tokens=True), "max_new_tokens"),
     (dict(max_new_tokens=-1), "max_new_tokens"), (dict(seed=2**70), "seed must be an integer in")],
)  # fmt: skip
def test_generate_refuses_bad_arguments_before_any_work(kwargs, needle):
    """Each would otherwise crash in torch (nan: multinomial, 2.5: topk) or, 10**12, never return."""
    cfg = TrainConfig.from_preset("mamba", "tiny")
    model = build_model(model_config(cfg))
    ids = torch.zeros(1, 3, dtype=torch.long)
    assert model.generate(ids, 2, temperature=0.5, top_k=5, seed=2**64 - 1).shape == (1, 5)
    model.prefill = lambda *args: pytest.fail("generate ran the prompt before checking its arguments")
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        model.generate(ids, **{"max_new_tokens": 2, "temperature": 1.0, "top_k": 5, **kwargs})


def test_sample_next_refuses_bad_arguments():
    logits = torch.zeros(2, 5)
    for kwargs, needle in [(dict(temperature=math.nan), "temperature"), (dict(top_k=2.5), "top_k")]:
        with pytest.raises(ValueError, match=needle):
            sample_next(logits, **kwargs)
