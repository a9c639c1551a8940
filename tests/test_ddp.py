"""DistributedDataParallel through torchrun: 2 CPU processes (gloo, 127.0.0.1) train like 1 process on the same
global batch, each on its half of every batch, with the gradients averaged."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from tolerances import assert_close

from minijamba.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ["--preset", "tiny", "--threads", "1", "--max_steps", "6", "--eval_every", "3", "--log_every", "1"]


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rows(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def test_two_gloo_processes_match_one(tmp_path):
    assert dist.is_available() and dist.is_gloo_available()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2"]
    torchrun += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [*torchrun, "-m", "minijamba.train", *SETTINGS, "--n_samples", "1", "--out_dir", str(tmp_path / "ddp")]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout

    train(TrainConfig.from_preset("jamba", "tiny", threads=1, max_steps=6, eval_every=3, log_every=1, n_samples=1,
                                  out_dir=str(tmp_path / "one")))  # fmt: skip
    one, ddp = _rows(tmp_path / "one"), _rows(tmp_path / "ddp")
    assert [r["step"] for r in one] == [r["step"] for r in ddp]
    losses = [(r["loss"], s["loss"]) for r, s in zip(one, ddp, strict=True) if "loss" in r]
    assert_close(losses[0][1], losses[0][0], "ddp_first_loss_float32", "step 1 loss, 2 processes vs 1")
    assert_close([d for _, d in losses], [o for o, _ in losses], "ddp_losses_float32", "losses, 2 processes vs 1")
    val = [(r["val_loss"], s["val_loss"]) for r, s in zip(one, ddp, strict=True) if "val_loss" in r]
    assert_close([d for _, d in val], [o for o, _ in val], "ddp_losses_float32", "validation, 2 processes vs 1")


def test_a_batch_that_does_not_split_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # no process group needed to reach the check
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    with pytest.raises(ValueError, match="batch_size 8 must be divisible by the number of processes 3"):
        train(TrainConfig.from_preset("jamba", "tiny", out_dir=str(tmp_path)))
