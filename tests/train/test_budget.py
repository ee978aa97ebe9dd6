"""Compute budgets and validation during training: each budget kind stops where it should and decays
the lr over its last 20%, resumes exactly, validation reads only held-out rows, and bad input is
refused before anything is written."""

import json

import numpy as np
import pytest
import torch

import train.loop as loop
from harvest.store import ActivationStore
from tests.train.test_loop import assert_same_weights, make_cfg, synthetic_store, train_killed_at
from train.budget import Budget, BudgetError, Length
from train.config import TrainError
from train.loop import train
from train.run_dir import RunDir
from train.saes import build
from train.saes.flops import algorithmic_cost
from harvest.held_out import HeldOut

TOPK = ["model=topk", "model.width=64", "model.k=4", "lr=0.01", "log_every=1", "eval_every=0"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("budget") / "store", n_chunks=20)


def test_parse_every_kind_and_refuse_the_rest():
    assert Budget.parse("steps:2_000") == Budget("steps", 2000)
    assert Budget.parse("flops:1.5e13") == Budget("flops", 1.5e13) and str(Budget.parse("flops:1.5e13")) == "flops:1.5e+13"
    assert Budget.parse("seconds:90").timed and not Budget.parse("tokens:5e6").timed
    for bad, message in [("steps:0", "must be positive"), ("flops:-1", "must be positive"), ("2000", "kind:amount"),
                         ("steps:10 flops:5", "kind:amount"), ("hours:2", "unknown"), ("steps:1.5", "whole number"),
                         ("tokens:lots", "not a number"), (12, "kind:amount")]:
        with pytest.raises(BudgetError, match=message):
            Budget.parse(bad)


def test_deterministic_budgets_become_step_counts_that_never_overshoot():
    assert Budget("tokens", 1000).steps(batch_size=128, flops_per_token=1.0) == 7  # 7 x 128 = 896 <= 1000
    assert Budget("flops", 3 * 128 * 10.0).steps(batch_size=128, flops_per_token=10.0) == 3
    assert Budget("seconds", 5).steps(128, 1.0) is None
    assert Length.of(Budget("seconds", 5), 128, 1.0) == Length(timed=True, total=5.0)
    with pytest.raises(BudgetError, match="less than one step"):
        Budget("tokens", 100).steps(batch_size=128, flops_per_token=1.0)


def lr_and_steps(run_dir):
    lines = RunDir(run_dir).read_metrics()
    return [line["step"] for line in lines], [line["lr"] for line in lines]


@pytest.mark.parametrize("budget, steps", [("steps:10", 10), ("tokens:1300", 10), ("flops:FLOPS", 10)])
def test_each_deterministic_kind_stops_where_it_should_and_decays_over_its_last_fifth(store, tmp_path, budget, steps):
    per_token = algorithmic_cost(build("topk", d=32, width=64, k=4)).train
    budget = budget.replace("FLOPS", repr(10.5 * 128 * per_token))  # 10.5 steps' worth: 10 whole steps
    train(make_cfg(store, *TOPK, f"budget={budget}"), tmp_path / "run")
    logged, lrs = lr_and_steps(tmp_path / "run")
    assert logged == list(range(1, steps + 1)) and RunDir(tmp_path / "run").done()["step"] == steps
    # the lr logged after step s is the next step's: constant through step 8, then 0.5 and 0 (decay over 2 steps)
    assert lrs[:8] == [0.01] * 8 and lrs[8] == pytest.approx(0.005) and lrs[9] == 0.0


class FakeClock:
    """A clock that advances half a second per reading."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 0.5
        return self.now


def test_a_seconds_budget_stops_on_time_decays_by_time_and_counts_time_spent_before_a_kill(store, tmp_path,
                                                                                            monkeypatch):
    monkeypatch.setattr(loop, "clock", FakeClock())  # two readings a step: t0 and after it -> 0.5 s a step
    cfg = make_cfg(store, *TOPK, "budget=seconds:5", "checkpoint_every=4")
    train(cfg, tmp_path / "straight")
    logged, lrs = lr_and_steps(tmp_path / "straight")
    assert logged == list(range(1, 11))  # 10 steps x 0.5 s (log lines read the clock outside the steps)
    assert lrs[7] == 0.01 and lrs[8] == pytest.approx(0.005) and lrs[9] == 0.0  # the last 1 s of 5: steps 9-10

    train_killed_at(cfg, tmp_path / "killed", 6, monkeypatch)
    state = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert (state["step"], state["seconds"]) == (4, 2.0)
    train(cfg, tmp_path / "killed")  # resumes at step 4 with 2 s spent: 3 s (6 steps) left
    assert lr_and_steps(tmp_path / "killed")[0] == list(range(1, 11))
    assert RunDir(tmp_path / "killed").done()["step"] == 10


def test_a_flop_budget_resumed_after_a_kill_equals_an_uninterrupted_run(store, tmp_path, monkeypatch):
    per_token = algorithmic_cost(build("switch", d=32, n_experts=4, expert_width=16, k=4, alpha=3.0)).train
    cfg = make_cfg(store, "model=switch", "model.width=64", "model.n_experts=4", "model.k=4", "checkpoint_every=7",
                   f"budget=flops:{30 * 128 * per_token!r}", "eval_every=5")
    train(cfg, tmp_path / "straight")
    train_killed_at(cfg, tmp_path / "killed", 25, monkeypatch)
    train(cfg, tmp_path / "killed")
    assert_same_weights(tmp_path / "straight" / "sae", tmp_path / "killed" / "sae")
    straight, killed = RunDir(tmp_path / "straight").read_validation(), RunDir(tmp_path / "killed").read_validation()
    assert [v["step"] for v in killed] == [0, 5, 10, 15, 20, 25, 30]  # redone validations not logged twice
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in killed] == \
           [{k: v for k, v in r.items() if k not in drop} for r in straight]


def test_validation_reads_the_same_held_out_rows_for_every_run(store, tmp_path):
    s = ActivationStore(store)
    held = HeldOut.of(s, 0.1, None)
    rows = held.sample(100)
    assert rows.shape == (100, 32) and np.array_equal(rows, HeldOut.of(s, 0.1, None).sample(100))
    stored = {c: s.read_chunk(c) for c in range(s.n_chunks)}
    where = [{c for c, x in stored.items() if (x == r).all(axis=1).any()} for r in rows]
    assert all(w and w <= set(held.chunks) for w in where)  # every row is a held-out row, none a training row
    for name, model in [("topk", TOPK[:3]), ("switch", ["model=switch", "model.width=64", "model.n_experts=4", "model.k=4"])]:
        train(make_cfg(store, *model, "budget=steps:20", "eval_every=10", "eval_tokens=100"), tmp_path / name)
    topk, switch = RunDir(tmp_path / "topk").read_validation(), RunDir(tmp_path / "switch").read_validation()
    assert [v["step"] for v in topk] == [v["step"] for v in switch] == [0, 10, 20]
    assert {v["eval_tokens"] for v in topk + switch} == {100}
    per_token = algorithmic_cost(RunDir(tmp_path / "topk").load_sae()).train
    assert [v["train_flops"] for v in topk] == [0.0, 10 * 128 * per_token, 20 * 128 * per_token]
    assert topk[-1]["mse"] < topk[0]["mse"] and switch[-1]["mse"] < switch[0]["mse"]
    assert switch[0]["expert_load"] is not None and topk[0]["expert_load"] is None
    assert all(b["seconds"] >= a["seconds"] for a, b in zip(topk, topk[1:]))
    eval_json = json.loads(json.dumps(topk[-1]))
    assert 0 <= eval_json["dead_frac"] <= 1 and 0 < eval_json["l0"] <= 4


@pytest.mark.parametrize("overrides, message", [
    (["budget=steps:0"], "must be positive"),
    (["budget='steps:10,flops:5'"], "kind:amount"),
    (["budget=tokens:100"], "less than one step"),
    (["budget=steps:10", "eval_every=11"], r"eval_every=11 is longer than the run \(10 steps"),
    (["data.eval_frac=0", "eval_every=auto"], "validation needs held-out chunks"),
    (["data.eval_frac=0.01"], "too few to hold one out"),
])
def test_bad_budgets_and_validation_settings_are_refused_before_anything_is_written(store, tmp_path, overrides,
                                                                                      message):
    with pytest.raises(TrainError, match=message):
        train(make_cfg(store, *TOPK[:3], *overrides), tmp_path / "run")
    run = tmp_path / "run"
    assert not run.exists() or not any(run.iterdir())  # refused by the config, or by train() before writing


def test_a_store_without_held_out_chunks_trains_only_when_asked_to(store, tmp_path):
    train(make_cfg(store, *TOPK[:3], "budget=steps:3", "data.eval_frac=0", "eval_every=0"), tmp_path / "run")
    assert RunDir(tmp_path / "run").finished and not RunDir(tmp_path / "run").read_validation()
