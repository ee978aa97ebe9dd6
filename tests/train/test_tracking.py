"""Experiment tracking (runtime/tracking.py, logger=wandb|tensorboard): what training and eval log is
read back from the trackers' own files, W&B offline (its .wandb record log) and TensorBoard event
files, and compared with the run folder's metrics.jsonl, validation.jsonl and eval.json.

W&B never leaves this machine here: WANDB_MODE=offline, and its base URL points at a closed local port.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from eval.run import EvalConfig, evaluate
from runtime.tracking import RULES, Tracker, TrackerSettings, TrackingError, default_name, scalars, start
from tests.conftest import CONF, ROOT, eval_config
from tests.train.test_loop import assert_same_weights, make_cfg, synthetic_store, train_killed_at
from train.config import RUNTIME_KEYS, TrainError
from train.dist import Dist
from train.loop import open_tracker, train
from train.run_dir import RunDir

TINY = ["model.width=64", "model.k=4", "budget=steps:40", "log_every=10", "eval_every=20", "checkpoint_every=20"]


def offline_env(home: Path) -> dict[str, str]:
    """W&B offline and quiet, its config and caches under `home`, no git, code or system-stats capture."""
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true",
            "WANDB_X_DISABLE_STATS": "true", "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_CONFIG_DIR": str(home),
            "WANDB_CACHE_DIR": str(home / "cache"), "WANDB_DATA_DIR": str(home / "data")}


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path_factory, monkeypatch) -> dict[str, str]:
    env = offline_env(tmp_path_factory.mktemp("wandb-home"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("track") / "s", n_chunks=10)


def quick_eval(run: Path, **kw) -> EvalConfig:
    return eval_config(run, **{"max_tokens": 10_000, "batch_size": 64, "ce": False, "redo": True, **kw})


# ------------------------------------------------------------------------ reading W&B's offline files

def wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file: a ":W&B" header (magic 0xBEE1, version 0), then
    LevelDB-log blocks of 32 KiB holding records of a 7-byte header (crc32c, length, type: 1 full,
    2 first, 3 middle, 4 last piece) and their bytes. A file still being written gives the records
    complete so far."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block = path.read_bytes(), 32768
    if len(data) < 7:
        return []
    assert data[:7] == b":W&B\xe1\xbe\x00", data[:7]
    out, pos, pieces = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):
            break
        body, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pieces = body
        elif kind in (3, 4):
            pieces += body
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pieces)
            out.append(record)
    return out


def wandb_launches(run: Path, wait_s: float = 30.0) -> list[dict]:
    """Every W&B run file under <run>/wandb/ (one per launch), in the order they started: the run's id,
    group and name, its config, history rows {key: value} with "_step", summary updates and exit code.
    wandb-core writes a file's last records just after `finish()` returns: this waits (up to wait_s)
    until every file ends with its exit record."""
    deadline = time.monotonic() + wait_s
    while True:
        launches = [wandb_launch(f) for f in (run / "wandb").glob("offline-run-*/run-*.wandb")]
        if all("exit" in launch for launch in launches) or time.monotonic() > deadline:
            return sorted(launches, key=lambda x: x.get("start", 0.0))
        time.sleep(0.1)


def wandb_launch(f: Path) -> dict:
    """One .wandb file's run, as `wandb_launches` describes it."""
    info: dict = {"history": [], "summary": {}, "config": {}}
    for r in wandb_records(f):
        kind = r.WhichOneof("record_type")
        if kind == "exit":
            info["exit"] = r.exit.exit_code
            continue
        if kind == "run":
            info.update(id=r.run.run_id, group=r.run.run_group, name=r.run.display_name,
                        start=r.run.start_time.seconds + r.run.start_time.nanos / 1e9)
            items = r.run.config.update
        elif kind == "config":
            items = r.config.update
        elif kind == "history":
            info["history"].append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item})
            continue
        elif kind == "summary":
            info["summary"].update({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.summary.update})
            continue
        else:
            continue
        info["config"].update({i.key: json.loads(i.value_json) for i in items})
    return info


def history(launches: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` over every launch, in the order logged."""
    return [(row["_step"], row[key]) for launch in launches for row in launch["history"] if key in row]


# ----------------------------------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def wandb_run(store, tmp_path_factory):
    """A run trained with logger=wandb (offline) and then evaluated."""
    mp = pytest.MonkeyPatch()  # (set up before the autouse fixture, which is per test)
    for key, value in offline_env(tmp_path_factory.mktemp("wandb-home")).items():
        mp.setenv(key, value)
    try:
        run = tmp_path_factory.mktemp("wandb") / "run"
        train(make_cfg(store, *TINY, "logger=wandb", "logger.tags=[tiny]"), run)
        [result] = evaluate(quick_eval(run))
    finally:
        mp.undo()
    return run, result


def test_wandb_gets_the_config_every_logged_line_and_the_eval(wandb_run):
    run, result = wandb_run
    tracked = json.loads((run / RunDir.TRACKER).read_text())
    assert tracked["kind"] == "wandb" and tracked["project"] == "switch-sae" and tracked["group"] is None
    launches = wandb_launches(run)
    assert len(launches) == 2 and [launch["exit"] for launch in launches] == [0, 0]  # training, then eval
    assert {launch["id"] for launch in launches} == {tracked["id"]}
    assert launches[0]["name"] == default_name(run) == f"{run.parent.name}/run"
    config = launches[0]["config"]
    assert config["model"]["k"] == 4 and config["budget"] == "steps:40" and config["logger"]["tags"] == ["tiny"]
    assert config["run_dir"] == str(run.resolve())
    metrics, validation = RunDir(run).read_metrics(), RunDir(run).read_validation()
    assert history(launches, "train/loss") == [(r["step"], r["loss"]) for r in metrics]
    assert [s for s, _ in history(launches, "train/loss")] == [10, 20, 30, 40]
    assert history(launches, "val/fve") == [(r["step"], r["fve"]) for r in validation]
    assert [s for s, _ in history(launches, "val/fve")] == [0, 20, 40]
    assert history(launches, "train/dead_frac")[-1] == (40, metrics[-1]["dead_frac"])
    # eval.json's numbers are the summary of the same run, not history rows
    summary = launches[1]["summary"]
    assert summary["eval/mse"] == result["mse"] and summary["eval/fve"] == result["fve"]
    assert summary["eval/train_steps"] == 40 and "eval/arch" not in summary
    assert not any(k.startswith("eval/") for row in launches[1]["history"] for k in row)


def test_a_resumed_run_continues_the_same_wandb_run_without_repeating_a_step(store, tmp_path, monkeypatch):
    """Killed in step 35 (logged up to 30, checkpoint at 20); the relaunch redoes 21..40 and sends
    only what the W&B run lacks. The weights equal an untracked run's: tracking leaves resume exact."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = make_cfg(store, *TINY, "logger=wandb")
        train_killed_at(cfg, tmp_path / "run", 35, monkeypatch)
        first = json.loads((tmp_path / "run" / RunDir.TRACKER).read_text())["id"]
        train(cfg, tmp_path / "run")
        train(make_cfg(store, *TINY), tmp_path / "straight")
    finally:
        torch.set_num_threads(threads)
    assert_same_weights(tmp_path / "straight" / "sae", tmp_path / "run" / "sae")
    launches = wandb_launches(tmp_path / "run")
    assert len(launches) == 2 and {launch["id"] for launch in launches} == {first}
    assert [launch["exit"] for launch in launches] == [1, 0]  # the killed launch is marked failed
    assert json.loads((tmp_path / "run" / RunDir.TRACKER).read_text())["id"] == first
    steps = [row["_step"] for launch in launches for row in launch["history"]]
    assert steps == sorted(set(steps)) == [0, 10, 20, 30, 40]  # never twice, never backwards
    assert [s for s, _ in history(launches, "train/loss")] == [10, 20, 30, 40]
    assert [s for s, _ in history(launches, "val/mse")] == [0, 20, 40]
    # the values the W&B run kept for the redone step 30 are those the relaunch computed
    logged = dict(history(launches, "train/loss"))
    assert {r["step"]: r["loss"] for r in RunDir(tmp_path / "run").read_metrics()} == logged


def test_a_relaunch_from_step_0_is_a_new_wandb_run_and_its_logs_start_afresh(store, tmp_path, monkeypatch):
    """Killed in step 15, before the first checkpoint (20): nothing is resumed, so neither is the W&B run,
    and the killed launch's lines (validation at 0, metrics at 10) are not kept beside the new ones."""
    cfg = make_cfg(store, *TINY, "logger=wandb")
    train_killed_at(cfg, tmp_path / "run", 15, monkeypatch)
    first = json.loads((tmp_path / "run" / RunDir.TRACKER).read_text())["id"]
    train(cfg, tmp_path / "run")
    second = json.loads((tmp_path / "run" / RunDir.TRACKER).read_text())["id"]
    launches = wandb_launches(tmp_path / "run")
    assert second != first and [(launch["id"], launch["exit"]) for launch in launches] == [(first, 1), (second, 0)]
    assert [s for s, _ in history(launches[1:], "train/loss")] == [10, 20, 30, 40]
    run = RunDir(tmp_path / "run")
    assert [r["step"] for r in run.read_metrics()] == [10, 20, 30, 40]
    assert [r["step"] for r in run.read_validation()] == [0, 20, 40]


def test_tensorboard_gets_scalars_per_step_and_a_resume_replaces_the_redone_ones(store, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg(store, *TINY, "logger=tensorboard")
    train_killed_at(cfg, tmp_path / "run", 35, monkeypatch)
    train(cfg, tmp_path / "run")
    [result] = evaluate(quick_eval(tmp_path / "run"))
    logdir = tmp_path / "run" / "tensorboard"
    assert json.loads((tmp_path / "run" / RunDir.TRACKER).read_text()) == {"kind": "tensorboard",
                                                                            "dir": str(logdir.resolve())}
    events = EventAccumulator(str(logdir))
    events.Reload()
    run = RunDir(tmp_path / "run")
    for key, records in (("train/loss", run.read_metrics()), ("train/l0", run.read_metrics()),
                         ("val/fve", run.read_validation())):
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert got == [(r["step"], pytest.approx(r[key.split("/")[1]], rel=1e-6)) for r in records], key
    assert [e.step for e in events.Scalars("train/loss")] == [10, 20, 30, 40]  # step 30 once: purged, redone
    assert [(e.step, e.value) for e in events.Scalars("eval/mse")] == [(40, pytest.approx(result["mse"], rel=1e-6))]
    config = events.Tensors("config/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert '"budget": "steps:40"' in config and '"kind": "tensorboard"' in config


def test_a_shared_tensorboard_folder_holds_one_subfolder_per_run(store, tmp_path):
    for name in ("a", "b"):
        train(make_cfg(store, *TINY, "budget=steps:10", "eval_every=0", "logger=tensorboard",
                       f"logger.dir={tmp_path / 'tb'}"), tmp_path / "sweep" / name)
    assert sorted(p.name for p in (tmp_path / "tb" / "sweep").iterdir()) == ["a", "b"]
    assert not (tmp_path / "sweep" / "a" / "tensorboard").exists()


def test_a_sweep_is_one_wandb_group_and_logger_keys_stay_out_of_run_names(store, tmp_path, offline_wandb):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "train", "-m", "model=topk,relu", "model.width=64", f"data.store={store}",
           "budget=steps:10", "batch_size=64", "eval_every=0", "progress=false", "device=cpu", "data.eval_frac=0.1",
           "logger=wandb", f"hydra.sweep.dir={sweep}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, **offline_wandb})
    assert out.returncode == 0, out.stderr
    runs = sorted(p for p in sweep.iterdir() if (p / RunDir.DONE).exists())
    assert len(runs) == 2 and all("model=" in p.name and "logger" not in p.name for p in runs)
    for run in runs:
        assert json.loads((run / RunDir.TRACKER).read_text())["group"] == str(sweep)
        [launch] = wandb_launches(run)
        assert launch["group"] == str(sweep) and launch["name"] == f"sweep/{run.name}"


def test_logger_none_writes_nothing_and_only_rank_0_tracks(store, tmp_path):
    train(make_cfg(store, *TINY, "budget=steps:10", "eval_every=0"), tmp_path / "run")
    assert not any((tmp_path / "run" / name).exists() for name in (RunDir.TRACKER, "wandb", "tensorboard"))
    cfg = make_cfg(store, *TINY, "logger=tensorboard")
    other_rank = Dist(1, 2, 1, torch.device("cpu"))
    run = RunDir(tmp_path / "rank1")
    run.create()
    tracker = open_tracker(cfg, run, 0, None, None, other_rank)
    assert type(tracker) is Tracker and list(run.path.iterdir()) == []


def test_eval_warns_in_one_line_when_the_tracker_package_is_gone(wandb_run, monkeypatch, capsys):
    run, _ = wandb_run
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails
    [result] = evaluate(quick_eval(run))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"eval: warning: {run}: eval.json not logged to its wandb run")
    assert "pip install wandb" in err and json.loads((run / RunDir.EVAL).read_text())["mse"] == result["mse"]
    evaluate(quick_eval(run, track=False))
    assert capsys.readouterr().err == ""


def test_train_without_wandb_is_refused_before_hydra_writes_anything(store, tmp_path):
    """A `wandb` package that fails to import shadows the real one: the refusal is one line, exit 2,
    and the working folder (where Hydra would create runs/...) stays empty."""
    fake = tmp_path / "fake" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named wandb (test stand-in)')\n")
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'fake'}{os.pathsep}{ROOT}"}
    out = subprocess.run([sys.executable, "-m", "train", "logger=wandb", f"data.store={store}", "data.eval_frac=0.1",
                          "budget=steps:10", "device=cpu"], cwd=work, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("train: error: logger=wandb needs the wandb package")
    assert "pip install wandb, or make setup" in out.stderr
    assert list(work.iterdir()) == []


def test_settings_are_checked_and_every_logger_key_is_a_runtime_key(store):
    for kind in RULES:
        keys = set(OmegaConf.load(CONF / "train" / "logger" / f"{kind}.yaml"))
        assert keys == set(RULES[kind])  # the YAML documents exactly the keys the rules check
        assert {f"logger.{k}" for k in keys} | {"logger"} <= set(RUNTIME_KEYS)
    with pytest.raises(TrainError, match="logger.mode must be one of online, offline, disabled or null, got 'cloud'"):
        make_cfg(store, "logger=wandb", "logger.mode=cloud")
    with pytest.raises(TrackingError, match="logger.kind must be one of none, wandb, tensorboard"):
        TrackerSettings.from_config({"kind": "mlflow"})
    assert make_cfg(store, "logger=tensorboard").tracking == TrackerSettings("tensorboard")


def test_scalars_flatten_records_and_keep_numbers_only():
    record = {"step": 5, "loss": 1.5, "expert_load": [0.25, 0.75], "sae": {"k": 4, "arch": "topk"}, "match": None,
              "notes": ["text"], "complete": True}
    assert scalars(record, "eval") == {"eval/loss": 1.5, "eval/expert_load/0": 0.25, "eval/expert_load/1": 0.75,
                                       "eval/sae/k": 4, "eval/complete": 1.0}


def test_a_wandb_run_that_cannot_open_is_one_line(tmp_path, monkeypatch):
    """What wandb.init raises online without a login (simulated: nothing is contacted) becomes one line."""
    import wandb

    def refuse(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])\nmore")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.raises(TrackingError, match=r"^wandb could not open its run \(api_key not configured \(no-tty\)\. "
                                            r"call wandb.login\(key=\[your_api_key\]\)\); WANDB_MODE=offline logs"):
        start(TrackerSettings("wandb", project="p"), tmp_path, config={}, step=0, previous=None, logged=None)
