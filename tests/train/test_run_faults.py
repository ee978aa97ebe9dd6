"""Fault injection on training: one launch per run folder, a full disk at a checkpoint, a damaged store."""

from __future__ import annotations

import errno
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import runtime.files

from harvest.store import DamagedStore, verify
from runtime.files import PARTIAL
from tests.conftest import ROOT
from tests.train.test_loop import assert_same_weights, make_cfg, synthetic_store
from train.config import TrainError
from train.loop import train
from train.run_dir import RunDir

MODEL = ("model=topk", "model.width=64", "model.k=4")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("faults") / "s", n_chunks=20)


def _hold(lock) -> subprocess.Popen:
    """Another live process holding the lock file `lock` until killed."""
    code = ("import sys, time; from runtime.lock import WriterLock; "
            "WriterLock(sys.argv[1], 'run').acquire(); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_launch_is_refused_and_a_dead_launchs_lock_is_taken_over(store, tmp_path, capsys):
    cfg = make_cfg(store, *MODEL, "budget=steps:20", "eval_every=0")
    run = tmp_path / "run"
    run.mkdir()
    holder = _hold(run / RunDir.LOCK)
    try:
        with pytest.raises(TrainError) as e:
            train(cfg, run)
        assert str(e.value).startswith(f"run {run} is being written by another process: pid {holder.pid} on ")
        assert sorted(p.name for p in run.iterdir()) == [RunDir.LOCK]  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    train(cfg, run)  # the holder died: its lock is stale
    assert "taking over a stale lock" in capsys.readouterr().err
    assert RunDir(run).finished and not (run / RunDir.LOCK).exists()


def test_a_real_launch_holds_its_run_folder(store, tmp_path):
    """`python -m train` running: the same run launched again is refused naming it, and the first run
    ends with one log line per logged step."""
    run = tmp_path / "run"
    keys = [*MODEL, "budget=steps:600", "eval_every=0", "checkpoint_every=1000"]
    first = subprocess.Popen([sys.executable, "-m", "train", f"data.store={store}", "batch_size=128", "lr=0.01",
                              "log_every=50", "progress=false", "device=cpu", "data.window_chunks=4",
                              "data.eval_frac=0.1", *keys, f"hydra.run.dir={run}"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / RunDir.CONFIG).exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert first.poll() is None, "the first launch ended before the second could start"
    with pytest.raises(TrainError, match=f"is being written by another process: pid {first.pid} on "):
        train(make_cfg(store, *keys), run)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    steps = [json.loads(line)["step"] for line in (run / RunDir.METRICS).read_text().splitlines()]
    assert steps == list(range(50, 601, 50))


def _disk_full_at_checkpoint(n: int, room: int = 4096):
    """runtime.files' `open`, with the disk full `room` bytes into the n-th checkpoint it writes. The
    checkpoint is written by the real torch.save, which reports the failed write its own way (a
    RuntimeError "unexpected pos ..." with the OSError as its context)."""
    calls = [0]

    class Filling(io.FileIO):
        def write(self, b) -> int:
            if self.tell() + len(memoryview(b).cast("B")) > room:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(b)

    def fake_open(path, mode="r", *args, **kwargs):
        if Path(path).name.startswith(RunDir.CHECKPOINT) and "w" in mode:
            calls[0] += 1
            if calls[0] == n:
                return Filling(path, "w")
        return open(path, mode, *args, **kwargs)

    return fake_open


def test_a_full_disk_stops_in_one_line_and_the_same_command_resumes_exactly(store, tmp_path, monkeypatch):
    cfg = make_cfg(store, *MODEL, "budget=steps:60", "checkpoint_every=20", "eval_every=0")
    train(cfg, tmp_path / "straight")
    monkeypatch.setattr(runtime.files, "open", _disk_full_at_checkpoint(2), raising=False)  # the checkpoint of step 40
    with pytest.raises(TrainError) as e:
        train(cfg, tmp_path / "full")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"disk full writing {tmp_path / 'full' / RunDir.CHECKPOINT}: ")
    assert message.endswith("keeps its last complete checkpoint (temporaries removed); free space and relaunch the "
                            "same command to resume")
    assert not list((tmp_path / "full").rglob("*" + PARTIAL))
    assert not (tmp_path / "full" / RunDir.LOCK).exists()
    monkeypatch.undo()
    assert torch.load(tmp_path / "full" / RunDir.CHECKPOINT, weights_only=True)["step"] == 20
    train(cfg, tmp_path / "full")
    assert_same_weights(tmp_path / "straight" / RunDir.SAE, tmp_path / "full" / RunDir.SAE)


def test_a_damaged_training_chunk_stops_the_run_naming_it(store, tmp_path):
    damaged = tmp_path / "s"
    shutil.copytree(store, damaged)
    (damaged / "acts" / "c" / "5" / "0").unlink()
    assert sorted(verify(damaged, progress=False).bad) == [5]
    with pytest.raises(DamagedStore, match=rf"^store {damaged} is damaged: acts chunk 5 \(acts/c/5/0\) is missing"):
        train(make_cfg(damaged, *MODEL, "budget=steps:200", "eval_every=0"), tmp_path / "run")


def test_a_chunk_equal_to_the_fill_value_still_has_its_file(store):
    """The synthetic store's token ids are all 0, zarr's fill value: written anyway, so that a missing
    file always means damage."""
    assert verify(store, progress=False).ok
