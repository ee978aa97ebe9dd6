"""train.loop + `python -m train`: learning a known dictionary, exact resume, bad input, sweeps."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from harvest.held_out import HeldOut
from harvest.store import ActivationStore, Layout, StoreWriter
from tests.conftest import CONF, ROOT
from train.config import TrainConfig, TrainError
from train.loop import train
from train.saes import load


def synthetic_store(path, n_chunks=40, d=32, atoms=64, clusters=4, active=3, seed=0, scale=10.0, complete=True):
    """A known sparse dictionary: each row picks one of `clusters` groups of atoms, then sums `active`
    random unit atoms of that group with weights in [0.5, 2] (features that co-occur in clusters,
    the structure a Switch SAE's router can exploit). `scale` sets the MSE's size against the Switch's
    load-balancing term alpha * d * L_aux (~ alpha * d), as real activations' norms do."""
    rng = np.random.default_rng(seed)
    dictionary = rng.normal(size=(atoms, d))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    layout = Layout(d_model=d, context_size=17, first_pos=1, chunk_seqs=8, n_chunks=n_chunks, acts_dtype="float16")
    writer = StoreWriter.create(path, layout, [], {"model": "synthetic", "layer": 0, "site": "none", "config": {}})
    for i in range(n_chunks if complete else n_chunks // 2):
        rows = np.zeros((layout.chunk_rows, d))
        for r in range(layout.chunk_rows):
            group = rng.integers(clusters) * (atoms // clusters)
            chosen = group + rng.choice(atoms // clusters, active, replace=False)
            rows[r] = rng.uniform(0.5, 2.0, active) @ dictionary[chosen]
        writer.write_chunk(i, (rows * scale).astype(np.float16), np.zeros((8, 17), dtype=np.int64), {})
    return path


def make_cfg(store, *overrides) -> TrainConfig:
    base = [f"data.store={store}", "budget=steps:500", "batch_size=128", "lr=0.01", "log_every=50",
            "checkpoint_every=100", "progress=false", "device=cpu", "data.window_chunks=4", "data.eval_frac=0.1"]
    with initialize_config_dir(config_dir=str(CONF / "train"), version_base="1.3"):
        return TrainConfig.from_omegaconf(compose("train", overrides=[*base, *overrides]))


def fve(store_path, sae_dir) -> float:
    store, sae = ActivationStore(store_path), load(sae_dir)
    x = torch.cat(list(HeldOut.of(store, 0.1, None).rows()))
    with torch.no_grad():
        resid = x - sae(x).recon
    return 1 - (resid.var(0).sum() / x.var(0).sum()).item()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("syn") / "s")


@pytest.mark.parametrize("model", [["model=topk", "model.width=64", "model.k=4"],
                                   ["model=switch", "model.width=64", "model.n_experts=4", "model.k=4"]])
def test_topk_and_switch_learn_a_known_sparse_dictionary(store, tmp_path, model):
    sae_dir = train(make_cfg(store, *model, "budget=steps:800"), tmp_path / "run")
    assert fve(store, sae_dir) > 0.9
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(50, 801, 50))
    assert lines[-1]["l0"] <= 4 and lines[-1]["lr"] == 0.0 and 0 <= lines[-1]["dead_frac"] <= 1
    if "model=switch" in model:
        assert len(lines[-1]["expert_load"]) == 4 and abs(sum(lines[-1]["expert_load"]) - 1) < 1e-6


@pytest.mark.parametrize("model", [["model=topk", "model.width=64", "model.k=4"],
                                   ["model=switch", "model.width=64", "model.n_experts=4", "model.k=4"],
                                   ["model=relu", "model.width=64"], ["model=gated", "model.width=64"]])
def test_resumed_run_ends_with_the_same_weights(store, tmp_path, monkeypatch, model):
    """Bit-identical on one thread; with more, MKL may change the last float32 bit on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _resume_equals_straight(store, tmp_path, monkeypatch, model)
    finally:
        torch.set_num_threads(threads)


def assert_same_weights(a_dir, b_dir) -> None:
    """The two saved SAEs are bit for bit the same."""
    a, b = load(a_dir), load(b_dir)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def train_killed_at(cfg: TrainConfig, run_dir, step: int, monkeypatch) -> None:
    """train() killed during its `step`-th step (after the forward and backward, before the step counts)."""
    import train.loop as loop

    real_update = loop.DeadLatents.update

    def crash(self, out, batch):
        real_update(self, out, batch)
        if self.tokens == step * batch:
            raise RuntimeError("simulated kill")

    monkeypatch.setattr(loop.DeadLatents, "update", crash)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(cfg, run_dir)
    monkeypatch.setattr(loop.DeadLatents, "update", real_update)


def _resume_equals_straight(store, tmp_path, monkeypatch, model):
    cfg = make_cfg(store, *model, "budget=steps:60", "checkpoint_every=20")
    train(cfg, tmp_path / "straight")

    train_killed_at(cfg, tmp_path / "killed", 50, monkeypatch)  # between checkpoints (the last one: step 40)
    train(cfg, tmp_path / "killed")
    assert_same_weights(tmp_path / "straight" / "sae", tmp_path / "killed" / "sae")
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # the redone steps were not logged twice


@pytest.mark.parametrize(("overrides", "message"), [
    (["model=switch", "model.width=64", "model.n_experts=4", "model.k=20"], "k=20 is larger than an expert's width 16"),
    (["model=switch", "model.width=64", "model.n_experts=5"], "model.width=64 is not divisible by model.n_experts=5"),
    (["model=topk", "model.width=64", "model.k=65"], "model.k=65 is larger than model.width=64"),
    (["model.arch=moe"], "unknown model 'moe'"),
    (["data.store=/nonexistent/store"], "is not an activation store"),
])
def test_bad_input_is_refused(store, tmp_path, overrides, message):
    with pytest.raises(TrainError, match=message):
        train(make_cfg(store, *overrides), tmp_path / "run")


def test_a_half_written_checkpoint_is_ignored_on_resume(store, tmp_path):
    """A kill while saving leaves only checkpoint.pt.tmp; checkpoint.pt is the last complete one."""
    cfg = make_cfg(store, "model.width=64", "model.k=4", "budget=steps:20", "checkpoint_every=10")
    train(cfg, tmp_path / "run")
    (tmp_path / "run" / "done.json").unlink()
    (tmp_path / "run" / "checkpoint.pt.tmp").write_bytes(b"\x80\x02 truncated")
    train(cfg, tmp_path / "run")  # resumes at step 20 from checkpoint.pt and finishes at once
    assert json.loads((tmp_path / "run" / "done.json").read_text())["step"] == 20


def test_resuming_on_a_store_with_another_d_is_refused(tmp_path):
    path = synthetic_store(tmp_path / "s", n_chunks=10)
    train(make_cfg(path, "model.width=64", "model.k=4", "budget=steps:10", "checkpoint_every=5"), tmp_path / "run")
    (tmp_path / "run" / "done.json").unlink()  # pretend it was interrupted, and the store replaced
    shutil.rmtree(path)
    synthetic_store(path, d=16, n_chunks=10)
    with pytest.raises(TrainError, match="d=32 activations, but the store .* has d=16"):
        train(make_cfg(path, "model.width=64", "model.k=4", "budget=steps:10", "checkpoint_every=5"), tmp_path / "run")


def test_relaunching_a_run_folder_with_other_settings_is_refused(store, tmp_path):
    train(make_cfg(store, "model.width=64", "model.k=4", "budget=steps:10"), tmp_path / "run")
    with pytest.raises(TrainError, match=r"other settings \(budget: 'steps:10' -> 'steps:20', model.k: 4 -> 8\)"):
        train(make_cfg(store, "model.width=64", "model.k=8", "budget=steps:20"), tmp_path / "run")
    # runtime keys may change: this relaunch just finds the finished run
    train(make_cfg(store, "model.width=64", "model.k=4", "budget=steps:10", "log_every=3", "progress=true"), tmp_path / "run")
    # a run trained before a key existed (its config.yaml lacks it) ran with what is now the key's default
    import yaml

    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    del config["model"]["skip"], config["data"]["target"]
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(config))
    train(make_cfg(store, "model.width=64", "model.k=4", "budget=steps:10"), tmp_path / "run")
    with pytest.raises(TrainError, match=r"other settings \(data.target: None -> .*, model.skip: None -> True\)"):
        train(make_cfg(store, f"data.target={store}", "model.width=64", "model.k=4", "model.skip=true",
                       "budget=steps:10"), tmp_path / "run")


def test_incomplete_store_and_infinite_loss(tmp_path):
    half = synthetic_store(tmp_path / "half", complete=False)
    with pytest.raises(TrainError, match="incomplete.*allow_incomplete=true"):
        train(make_cfg(half, "model.width=64", "model.k=4"), tmp_path / "a")
    huge = synthetic_store(tmp_path / "huge", scale=3000.0)  # float16-legal, but the loss overflows bfloat16 math
    with pytest.raises(TrainError, match=r"loss became (inf|nan) at step \d+; stopped.*step \d+"):
        train(make_cfg(huge, "model.width=64", "model.k=4", "dtype=bfloat16", "lr=1e9"), tmp_path / "b")


def test_a_two_run_sweep_completes_and_a_relaunch_skips_it(store, tmp_path):
    cmd = [sys.executable, "-m", "train", "-m", "model=topk,switch", "model.width=64", "model.k=4",
           f"data.store={store}", "budget=steps:20", "batch_size=64", "progress=false", "device=cpu",
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    runs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if (p / "done.json").exists())
    assert len(runs) == 2 and "model=switch" in runs[0] and "model=topk" in runs[1] and "/" not in runs[0]
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("has finished; skipping") == 2


def test_unknown_model_group_on_the_command_line_is_one_line():
    out = subprocess.run([sys.executable, "-m", "train", "model=topk,moe", "budget=steps:1"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    models = ", ".join(sorted(p.stem for p in (CONF / "train" / "model").glob("*.yaml")))
    assert out.returncode == 2 and out.stderr == f"train: error: unknown model 'moe'; choose one of {models}\n"


def test_compiled_training_matches_eager(store, tmp_path):
    """compile=true runs the same steps through torch.compile (relu: the quickest to compile)."""
    runs = {}
    for compiled in (False, True):
        cfg = make_cfg(store, "model=relu", "model.width=64", "budget=steps:4", f"compile={str(compiled).lower()}")
        runs[compiled] = load(train(cfg, tmp_path / str(compiled)))
    for (name, p), q in zip(runs[False].named_parameters(), runs[True].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
