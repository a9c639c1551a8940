"""Training runs that lose nothing (issue 15): a run folder is never clobbered, only finite checkpoints are written,
SIGINT / SIGTERM save and say how to resume, one writer per folder, log rows agree with checkpoints, --resume says
what it uses (and refuses what cannot change), and damaged files or bad flags are one-line errors."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minijamba import train as train_module
from minijamba.sample import load_run
from minijamba.train import TrainingDiverged, main, read_log, train
from minijamba.train_config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--threads", "1", "--n_samples", "1"]


def tiny(out_dir, **overrides):
    settings = {"threads": 1, "n_samples": 1, "max_steps": 4, "eval_every": 2, **overrides}
    return TrainConfig.from_preset("jamba", "tiny", out_dir=str(out_dir), **settings)


def one_line_error(capsys, argv, *needles):
    """main(argv) fails with one `error: ...` line holding every needle; returns that line."""
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny run of 4 steps (checkpoints at 2 and 4), finished: its folder, to copy and damage."""
    out_dir = tmp_path_factory.mktemp("finished") / "run"
    train(tiny(out_dir))
    return out_dir


def copy_of(run, tmp_path):
    return Path(shutil.copytree(run, tmp_path / "run"))


def no_data_reading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("data was read before the checks")

    monkeypatch.setattr(train_module.data, "read_text", refuse)


# --- 1. a run folder is never clobbered -------------------------------------------------------------------------


def test_a_new_run_into_a_run_folder_refuses_and_overwrite_keeps_the_users_folders(finished_run, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path)
    before = {p.name: p.read_bytes() for p in (run / "log.jsonl", run / "run.json", run / "latest")}
    argv = [*TINY, "--max_steps", "2", "--eval_every", "2", "--out_dir", str(run)]
    one_line_error(capsys, argv, "holds a run already", "--resume", "--overwrite")  # what `make train` twice does
    assert {p.name: p.read_bytes() for p in (run / "log.jsonl", run / "run.json", run / "latest")} == before
    mine = run / "ckpt-notes"  # a folder of the user's that happens to match ckpt-*
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main([*argv, "--overwrite"]) == 0
    assert (mine / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in run.glob("ckpt-*")) == ["ckpt-0000002", "ckpt-notes"]
    assert [r["step"] for r in read_log(run) if "val_loss" in r] == [2]  # the old run's rows are gone
    assert not (run / ".lock").exists()


def test_out_dir_is_never_the_current_directory_a_file_or_unwritable(tmp_path, monkeypatch):
    no_data_reading(monkeypatch)
    monkeypatch.chdir(tmp_path)
    for out_dir in ("", ".", str(tmp_path)):
        with pytest.raises(ValueError, match="is the current directory"):
            train(tiny(out_dir))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="file is a file, not a folder"):
        train(tiny(tmp_path / "file"))
    with pytest.raises(ValueError, match="cannot write there"):
        train(tiny(tmp_path / "file" / "run"))
    assert os.listdir(tmp_path) == ["file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_dir_is_refused_before_the_data_loads(tmp_path, monkeypatch):
    no_data_reading(monkeypatch)
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="cannot write there"):
            train(tiny(tmp_path / "run"))
    finally:
        tmp_path.chmod(0o700)


def test_an_out_dir_that_cannot_be_made_is_refused_before_the_data_loads(tmp_path, monkeypatch):
    """The same refusal where permissions do not bind (root, as CI runs): the folder's creation fails."""
    no_data_reading(monkeypatch)
    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self.name == "run":
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(ValueError, match="cannot write there"):
        train(tiny(tmp_path / "run"))


def test_cleanup_deletes_only_the_checkpoints_this_run_wrote(tmp_path):
    (tmp_path / "ckpt-0000001").mkdir()  # not a run's file: the folder is no run yet, but the folder is not ours
    with pytest.raises(ValueError, match="holds a run already"):
        train(tiny(tmp_path))
    train(tiny(tmp_path, overwrite=True))  # it holds no train_state.pt: kept
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-0000001", "ckpt-0000004"]


# --- 2. only finite checkpoints -----------------------------------------------------------------------------------


def test_a_run_whose_parameters_go_non_finite_keeps_the_last_finite_checkpoint(tmp_path, monkeypatch):
    """The step before an evaluation turns a weight NaN while its loss was finite: no checkpoint of it is written."""
    real = train_module.train_step

    def poison_step_6(run, progress):
        out = real(run, progress)
        if progress.step == 5:  # step 6: train_step runs before progress.step counts it
            with torch.no_grad():
                next(run.model.parameters()).fill_(float("nan"))
        return out

    monkeypatch.setattr(train_module, "train_step", poison_step_6)
    with pytest.raises(TrainingDiverged, match=r"not finite at step 6.*ckpt-0000003, is kept"):
        train(tiny(tmp_path, max_steps=9, eval_every=3))
    assert (tmp_path / "latest").read_text().strip() == "ckpt-0000003"
    model, _, _ = load_run(tmp_path)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [r["step"] for r in read_log(tmp_path) if "val_loss" in r] == [3]
    assert not (tmp_path / ".lock").exists()


def test_a_non_finite_validation_loss_writes_no_checkpoint(tmp_path, monkeypatch):
    real = train_module.evaluate

    def nan_at_the_second(*args):
        metrics = real(*args)
        return {**metrics, "val_loss": float("nan")} if (tmp_path / "latest").exists() else metrics

    monkeypatch.setattr(train_module, "evaluate", nan_at_the_second)
    with pytest.raises(TrainingDiverged, match=r"validation loss is not finite at step 4.*ckpt-0000002, is kept"):
        train(tiny(tmp_path))
    assert (tmp_path / "latest").read_text().strip() == "ckpt-0000002"


# --- 3. SIGINT / SIGTERM ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_step_saves_and_says_how_to_resume(tmp_path, signum):
    out_dir = tmp_path / "run"
    command = [sys.executable, "-m", "minijamba.train", *TINY, "--max_steps", "100000", "--eval_every", "100000",
               "--log_every", "1", "--out_dir", str(out_dir)]  # fmt: skip
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out_dir / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and signal.Signals(signum).name in last, err[-2000:]
    assert f"continue with: python -m minijamba.train --out_dir {out_dir} --resume" in last
    rows = read_log(out_dir)
    step = rows[-1]["step"]
    assert step >= 3 and "val_loss" in rows[-1]  # the interrupted step, evaluated: no step of work is lost
    assert (out_dir / "latest").read_text().strip() == f"ckpt-{step:07d}"
    assert torch.load(out_dir / f"ckpt-{step:07d}" / "train_state.pt", weights_only=True)["step"] == step
    assert not (out_dir / ".lock").exists()


# --- 4. one writer per run folder ---------------------------------------------------------------------------------


def test_a_second_writer_is_refused_and_a_stale_lock_replaced(tmp_path, monkeypatch, capsys):
    lock = tmp_path / ".lock"
    host = socket.gethostname()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        lock.write_text(json.dumps({"pid": other.pid, "host": host}))
        with pytest.raises(ValueError, match=f"in use by another training run \\(pid {other.pid} on {host}"):
            train(tiny(tmp_path))
        other.kill()
    assert json.loads(lock.read_text())["pid"] == other.pid  # the other run's lock is not ours to remove

    real = train_module.train_step

    def check_the_lock(run, progress):
        assert json.loads(lock.read_text()) == {"pid": os.getpid(), "host": host}
        return real(run, progress)

    monkeypatch.setattr(train_module, "train_step", check_the_lock)
    train(tiny(tmp_path, max_steps=2))  # the other process is dead now: its lock is stale
    assert f"replaced a stale lock of pid {other.pid}" in capsys.readouterr().out
    assert not lock.exists()


# --- 5. log rows and checkpoints agree ----------------------------------------------------------------------------


def test_the_validation_row_is_written_before_its_checkpoint(tmp_path, monkeypatch):
    real = train_module.save_run
    calls = {"n": 0}

    def killed_after_the_row(out_dir, *args, **kwargs):
        step = args[5]
        assert any(r["step"] == step and "val_loss" in r for r in read_log(out_dir)), step
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # a kill between the row and its checkpoint
        return real(out_dir, *args, **kwargs)

    monkeypatch.setattr(train_module, "save_run", killed_after_the_row)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path))
    monkeypatch.setattr(train_module, "save_run", real)
    train(tiny(tmp_path, resume=True))
    rows = read_log(tmp_path)
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]  # each evaluation once, none lost
    assert [r["step"] for r in rows if "final_val_loss" in r] == [4]


def test_resuming_a_finished_run_does_nothing_but_say_so(finished_run, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path)
    log = (run / "log.jsonl").read_bytes()
    assert main([*TINY, "--out_dir", str(run), "--resume"]) == 0
    assert "finished already at step 4" in capsys.readouterr().out
    assert (run / "log.jsonl").read_bytes() == log and (run / "latest").read_text().strip() == "ckpt-0000004"


# --- 6 and 9. --resume says what it uses --------------------------------------------------------------------------


def test_resume_refuses_what_cannot_change_and_states_a_new_schedule(finished_run, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path)
    for flag, value in [("--batch_size", "4"), ("--context", "16"), ("--seed", "1"), ("--model", "mamba"),
                        ("--vocab_size", "400"), ("--max_stories", "100")]:  # fmt: skip
        one_line_error(capsys, ["--out_dir", str(run), "--resume", flag, value], f"{flag} ", "cannot change")
    assert main(["--out_dir", str(run), "--resume", "--max_steps", "8", "--lr", "0.001", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "resume: lr 0.003 -> 0.001" in out and "resume: max_steps 4 -> 8" in out
    assert "schedule is now warmup 2 steps, then a cosine from lr 0.001 to 0.0001 over 8 steps" in out
    assert "(was warmup 2 steps, then a cosine from lr 0.003 to 0.0003 over 4 steps)" in out
    _, _, cfg = load_run(run)
    assert (cfg.lr, cfg.max_steps, cfg.batch_size, cfg.preset) == (0.001, 8, 8, "tiny")  # unflagged: the run's
    assert [r["step"] for r in read_log(run) if "final_val_loss" in r] == [4, 8]


# --- 7. one-line errors -------------------------------------------------------------------------------------------


def test_damaged_run_files_are_one_line_errors(finished_run, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path)
    resume = ["--out_dir", str(run), "--resume", "--max_steps", "6"]
    state = run / "ckpt-0000004" / "train_state.pt"
    good = state.read_bytes()
    state.write_bytes(good[: len(good) // 2])
    one_line_error(capsys, resume, str(state), "not a readable training state")
    state.write_bytes(good)
    config = run / "ckpt-0000004" / "train_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "learning_rate": 1}))
    one_line_error(capsys, resume, str(config), "learning_rate")
    shutil.copy(finished_run / "ckpt-0000004" / "train_config.json", config)
    log = run / "log.jsonl"
    log.write_text(log.read_text() + "{garbage\n")
    one_line_error(capsys, resume, str(log), "line")
    assert not (run / ".lock").exists()


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real = torch.save
    calls = {"n": 0}

    def full_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4160 vs 4048")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ValueError, match=f"could not write a checkpoint into {tmp_path} .*unexpected pos") as e:
        train(tiny(tmp_path))
    assert "\n" not in str(e.value) and "ckpt-0000002, is kept" in str(e.value)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-0000002"]  # no half-written ckpt-0000004
    assert (tmp_path / "latest").read_text().strip() == "ckpt-0000002"


def test_bad_devices_are_refused_at_the_start(tmp_path, monkeypatch, capsys):
    no_data_reading(monkeypatch)
    one_line_error(capsys, [*TINY, "--out_dir", str(tmp_path), "--device", "banana"], "--device", "banana")
    if not torch.cuda.is_available():
        one_line_error(capsys, [*TINY, "--out_dir", str(tmp_path), "--device", "cuda"], "--device cuda", "no CUDA GPU")
    assert os.listdir(tmp_path) == []
