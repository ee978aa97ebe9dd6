"""Checkpoints and SAE files are read without running anything in them: checkpoint.pt goes through
torch.load(weights_only=True) and sae.safetensors through safetensors, so a planted pickle is
refused with one line that names the file, and its payload never runs."""

import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from tests.train.test_loop import make_cfg, synthetic_store
from train.config import TrainError
from train.loop import train
from train.run_dir import RunDir, RunError

SHORT = ["budget=steps:6", "checkpoint_every=3"]
TINY = ["model=topk", "model.width=64", "model.k=4", *SHORT]


class Payload:
    """Unpickling it calls `fn(*args)`: what a planted checkpoint would run with weights_only=False."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def touch_command(marker) -> Payload:
    return Payload(os.system, f"touch {marker}")


def open_for_writing(marker) -> Payload:
    return Payload(open, str(marker), "w")


def plant(path, payload: Payload, fmt: str) -> bytes:
    """Write a checkpoint-looking file whose unpickling runs `payload`; returns its bytes."""
    state = {"sae": {"b_pre": torch.zeros(32)}, "step": 3, "hook": payload}
    if fmt == "torch.save":  # the zip format torch.save writes
        torch.save(state, path)
    else:  # a bare pickle, as torch.save wrote before the zip format
        path.write_bytes(pickle.dumps(state, protocol=2))
    return path.read_bytes()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("syn") / "s", n_chunks=10)


def test_the_payloads_are_live(tmp_path):
    """The control: the planted files do run their payload when unpickled the unsafe way, so the
    missing marker files below mean something."""
    for make, fmt in ((touch_command, "torch.save"), (open_for_writing, "pickle")):
        marker = tmp_path / f"{fmt}.ran"
        data = plant(tmp_path / f"{fmt}.pt", make(marker), fmt)
        if fmt == "torch.save":
            torch.load(tmp_path / f"{fmt}.pt", weights_only=False)
        else:
            pickle.loads(data)
        assert marker.exists()


@pytest.mark.parametrize("fmt", ["torch.save", "pickle"])
@pytest.mark.parametrize("make", [touch_command, open_for_writing])
def test_relaunching_into_a_folder_with_a_planted_checkpoint_is_refused(store, tmp_path, make, fmt):
    run_dir = tmp_path / "received"
    run_dir.mkdir()
    marker = tmp_path / "payload-ran"
    planted = run_dir / RunDir.CHECKPOINT
    before = plant(planted, make(marker), fmt)
    with pytest.raises(TrainError) as refused:
        train(make_cfg(store, *TINY), run_dir)
    message = str(refused.value)
    assert "\n" not in message and str(planted) in message
    assert "is not loaded: it holds objects other than tensors" in message
    assert not marker.exists()
    assert planted.read_bytes() == before  # left as it was, for whoever investigates
    assert not (run_dir / RunDir.DONE).exists() and not (run_dir / RunDir.SAE).exists()


def test_a_planted_checkpoint_in_a_trained_run_is_refused_by_the_cli(store, tmp_path):
    """The folder of a real, unfinished run whose checkpoint was swapped: `python -m train` prints one
    line and exits 2."""
    run_dir = tmp_path / "run"
    cfg = make_cfg(store, *TINY)
    train(cfg, run_dir)
    (run_dir / RunDir.DONE).unlink()
    marker = tmp_path / "payload-ran"
    planted = run_dir / RunDir.CHECKPOINT
    before = plant(planted, touch_command(marker), "torch.save")
    out = subprocess.run([sys.executable, "-m", "train", *TINY, f"data.store={store}", "batch_size=128", "lr=0.01",
                          "progress=false", "device=cpu", "data.window_chunks=4", "data.eval_frac=0.1", "log_every=50",
                          f"hydra.run.dir={run_dir}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"train: error: {planted} is not loaded: it holds objects other than tensors")
    assert out.stderr.count("\n") == 1 and "posix.system" in out.stderr
    assert not marker.exists() and planted.read_bytes() == before


@pytest.mark.parametrize(("content", "message"), [
    (b"", "is not a readable checkpoint"),
    (b"\x80\x02 truncated", "is not loaded: it holds objects other than tensors and plain values (or it is damaged)"),
    (bytes(range(256)) * 4, "is not loaded"),
])
def test_a_damaged_checkpoint_is_one_line(store, tmp_path, content, message):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / RunDir.CHECKPOINT).write_bytes(content)
    with pytest.raises(TrainError, match=r"^" + str(run_dir / RunDir.CHECKPOINT) + ".*") as refused:
        train(make_cfg(store, *TINY), run_dir)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_plain_data_that_is_no_checkpoint_is_refused(store, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"step": 3, "weights": [torch.zeros(2)]}, run_dir / RunDir.CHECKPOINT)
    with pytest.raises(TrainError, match=r"checkpoint.pt is not a checkpoint of this toolkit \(it lacks dead_last, "
                                         r"dead_tokens, opt, rng, sae\)"):
        train(make_cfg(store, *TINY), run_dir)


def leaves(value, where="state"):
    """(path, value) of every non-container inside `value`."""
    if isinstance(value, dict):
        return [x for k, v in value.items() for x in leaves(v, f"{where}.{k}")]
    if isinstance(value, (list, tuple)):
        return [x for i, v in enumerate(value) for x in leaves(v, f"{where}[{i}]")]
    return [(where, value)]


@pytest.mark.parametrize("model", [["model=switch", "model.width=64", "model.n_experts=4", "model.k=4"],
                                   ["model=gated", "model.width=64"]])
def test_a_checkpoint_is_tensors_and_plain_values(store, tmp_path, model):
    run_dir = tmp_path / "run"
    train(make_cfg(store, *model, *SHORT), run_dir)
    state = torch.load(run_dir / RunDir.CHECKPOINT, weights_only=True)
    assert set(state) == {"sae", "opt", "step", "seconds", "dead_tokens", "dead_last", "rng", "world_size",
                          "expert_parallel"}
    assert state["step"] == 6 and isinstance(state["seconds"], float) and state["dead_tokens"] == 6 * 128
    assert state["rng"].dtype == torch.uint8 and state["dead_last"].dtype == torch.long
    assert state["world_size"] == 1 and state["expert_parallel"] == 1
    assert all(isinstance(v, torch.Tensor) for v in state["sae"].values())
    assert all(type(v) in (torch.Tensor, str, int, float, bool, type(None)) for _, v in leaves(state)), \
        [(k, type(v)) for k, v in leaves(state)]
    # and it is what resume uses: a relaunch of the unfinished run picks it up at step 6 and stops
    (run_dir / RunDir.DONE).unlink()
    train(make_cfg(store, *model, *SHORT), run_dir)
    assert json.loads((run_dir / RunDir.DONE).read_text())["step"] == 6


def test_saving_a_checkpoint_refuses_what_weights_only_could_not_read(tmp_path):
    import numpy as np

    run = RunDir(tmp_path / "r")
    run.create()
    for bad, where in (({"rng": np.random.default_rng(0).bit_generator.state, "x": np.zeros(2)}, "state['x']"),
                       ({"opt": {"groups": [{"betas": (0.9, np.float64(0.99))}]}}, "state['opt']['groups'][0]"),
                       ({"budget": RunDir("x")}, "state['budget']")):
        with pytest.raises(TypeError, match=r"checkpoint entry " + re.escape(where)):
            run.save_checkpoint(bad)
    assert not run.has_checkpoint
    opt = {"betas": (0.9, 0.99), "fused": True, "foreach": None, "params": [0, 1]}
    run.save_checkpoint({"step": 1, "opt": opt, "w": torch.ones(2)})
    back = run.load_checkpoint(torch.device("cpu"))
    assert back["opt"] == opt and torch.equal(back["w"], torch.ones(2))


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train(make_cfg(store, *TINY), run_dir)
    return run_dir


@pytest.mark.parametrize("fmt", ["torch.save", "pickle"])
def test_a_planted_sae_file_is_refused_by_eval_not_run(trained, tmp_path, fmt):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    marker = tmp_path / "payload-ran"
    weights = run_dir / RunDir.SAE / "sae.safetensors"
    before = plant(weights, touch_command(marker), fmt)
    run = RunDir(run_dir)
    for load in (run.load_sae, lambda: run.open(torch.device("cpu"))):
        with pytest.raises(RunError) as refused:
            load()
        message = str(refused.value)
        assert "\n" not in message and message.startswith(f"{weights} is not loaded: it holds something other than "
                                                          "tensors")
    assert not marker.exists() and weights.read_bytes() == before


def test_a_bad_sae_json_is_one_line(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    config = run_dir / RunDir.SAE / "sae.json"
    for text, message in (('{"arch": "moe", "d": 32}', "unknown SAE architecture 'moe'"),
                          ('{"arch": "topk", "d": 32, "width": 64, "k": 4, "evil": 1}', "unexpected keyword"),
                          ("not json", "JSONDecodeError")):
        config.write_text(text)
        with pytest.raises(RunError, match=f"^{config} does not describe an SAE .*{message}"):
            RunDir(run_dir).load_sae()
    config.write_text('{"arch": "topk", "d": 32, "width": 32, "k": 4}')  # other shapes than the weights
    with pytest.raises(RunError, match="does not hold the weights of the SAE its sae.json describes"):
        RunDir(run_dir).load_sae()
