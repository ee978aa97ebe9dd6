"""Training on 2 CPU processes over gloo, data parallel (train/dist.py) and expert parallel
(train/expert_parallel.py): the same weights and logged metrics as one process fed the union of the
ranks' batches (Switch's load balancing on global statistics), the run directory written once,
resume on another number of ranks or layout, one-line refusals.

All 2-rank runs happen in one `runtime.ranks.spawn_local` (the `dp` fixture); the tests then
compare them with one-process runs made here."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import train.loop as loop
from runtime.ranks import spawn_local
from tests.conftest import ROOT
from tests.train.test_loop import make_cfg, synthetic_store
from train.config import TrainError
from train.dist import DataParallel, init
from train.expert_parallel import EXPERT_KEYS, ExpertParallel
from train.loader import Batches
from train.saes import REGISTRY, load

WORLD = 2
MODELS = {"topk": ["model=topk", "model.width=64", "model.k=4"],
          "switch": ["model=switch", "model.width=64", "model.n_experts=4", "model.k=4"],
          "relu": ["model=relu", "model.width=64"]}
MODELS["switch_ep"] = [*MODELS["switch"], "expert_parallel=2"]  # experts 0-1 on rank 0, 2-3 on rank 1
# dead_window=64: a latent is dead if it fired in neither rank's half of the last step
SHORT = ["budget=steps:6", "batch_size=64", "log_every=1", "checkpoint_every=3", "lr=1e-3", "dead_window=64"]


def cfg_for(store, arch, *overrides):
    return make_cfg(store, *MODELS[arch], *SHORT, *overrides)


class Killed(Exception):
    pass


def train_killed_at(cfg, run_dir, step):
    """train() that dies after `step` steps (between checkpoints), as a killed job would."""
    real = loop.DeadLatents.update

    def update(self, out, batch):
        real(self, out, batch)
        if self.tokens == step * batch:
            raise Killed

    loop.DeadLatents.update = update
    try:
        loop.train(cfg, run_dir)
    except Killed:
        pass
    finally:
        loop.DeadLatents.update = real


def train_job(cfg, run_dir, kill_at=0):
    """A 2-rank train(); a TrainError (raised on every rank alike) is kept in error<rank>.txt."""
    if kill_at:
        return train_killed_at(cfg, run_dir, kill_at)
    try:
        loop.train(cfg, run_dir)
    except TrainError as e:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / f"error{os.environ['RANK']}.txt").write_text(str(e))


def sae_and_batch(arch):
    """The same SAE (initialised from the batch) and batch x [64, 32] in every process. For
    "switch_ep_one_expert" the router is zero: every token goes to expert 0 (argmax of a tie), so
    rank 1's experts receive nothing."""
    torch.manual_seed(0)
    one_expert = arch.endswith("_one_expert")
    arch = arch.removesuffix("_one_expert")
    kwargs = {"topk": {"width": 64, "k": 4}, "switch": {"n_experts": 4, "expert_width": 16, "k": 4, "alpha": 3.0},
              "relu": {"width": 64, "l1_coeff": 5.0, "warmup_frac": 0.05}}[arch.removesuffix("_ep")]
    sae = REGISTRY[arch.removesuffix("_ep")](d=32, **kwargs)
    x = 10 * torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    sae.init_from_batch(x)
    if one_expert:
        torch.nn.init.zeros_(sae.W_router)
    return sae, x


def gradients_job(arch, path):
    """Each rank: its half of the batch, backward, gradients synchronised as the loop does; rank 0 saves
    them (whole, the expert shards gathered) with the losses and the global gradient norm."""
    dist = init(torch.device("cpu"))
    full, x = sae_and_batch(arch)
    ep = "_ep" in arch
    layout = ExpertParallel(dist, WORLD) if ep else DataParallel(dist)
    sae = layout.prepare(full)
    out = sae(x.chunk(WORLD)[dist.rank])
    out.losses["loss"].backward()
    layout.sync_grads()
    grads = {n: layout.groups.gather(p.grad) if ep and n in EXPERT_KEYS else p.grad for n, p in sae.named_parameters()}
    norm = layout.grad_norm([p.grad for p in sae.parameters()])
    if dist.is_main:
        torch.save({"grads": grads, "norm": norm, "losses": {k: v.detach() for k, v in out.losses.items()},
                    "held": sae.W_enc.shape[0], "sent": layout.groups.sent if ep else None}, path)


def run_jobs(jobs: list) -> None:
    """One rank of a `spawn_local` job: the jobs in order (the same on every rank)."""
    for job, *args in jobs:
        job(*args)


@pytest.fixture(scope="module")
def dp(tmp_path_factory):
    """Every 2-rank job, run once: {name: (config, run folder)}, and the gradients under "tmp"."""
    tmp = tmp_path_factory.mktemp("dp")
    store = synthetic_store(tmp / "store", n_chunks=12)
    runs = {arch: (cfg_for(store, arch), tmp / arch) for arch in MODELS}
    runs["dp_killed"] = (cfg_for(store, "topk", "seed=1"), tmp / "dp_killed", 4)  # checkpoint at 3, dies at 4
    runs["ep_killed"] = (cfg_for(store, "switch_ep", "seed=3"), tmp / "ep_killed", 4)
    runs["one_then_two"] = (cfg_for(store, "switch", "seed=2"), tmp / "one_then_two")
    runs["one_then_ep"] = (cfg_for(store, "switch_ep", "seed=4"), tmp / "one_then_ep")
    runs["odd_batch"] = (cfg_for(store, "topk", "batch_size=63"), tmp / "odd_batch")
    train_killed_at(*runs["one_then_two"], 4)  # one process; the two ranks finish it
    train_killed_at(dataclasses.replace(runs["one_then_ep"][0], expert_parallel=1), runs["one_then_ep"][1], 4)
    shutil.copytree(tmp / "one_then_ep", tmp / "one_then_ep.at3")  # the reference continues this copy
    jobs = [(train_job, *args) for args in runs.values()]
    jobs += [(gradients_job, arch, tmp / f"{arch}.grads.pt") for arch in [*MODELS, "switch_ep_one_expert"]]
    spawn_local(run_jobs, WORLD, jobs)
    return {"tmp": tmp, **{name: args[:2] for name, args in runs.items()}}


@pytest.fixture(scope="module")
def four_ranks(dp):
    """Switch on 4 ranks: 2 replicas (data parallel) x 2 expert shards."""
    cfg, run_dir = cfg_for(dp["switch"][0].data.store, "switch_ep", "seed=5"), dp["tmp"] / "four_ranks"
    spawn_local(run_jobs, 4, [(train_job, cfg, run_dir)])
    return cfg, run_dir


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def numbers(record: dict, keys: list[str]) -> torch.Tensor:
    """The record's values at `keys` as one flat tensor (lists such as expert_load spread out)."""
    return torch.tensor([v for k in keys for v in (record[k] if isinstance(record[k], list) else [record[k]])])


def one_process_on_the_union(cfg, run_dir, monkeypatch, world=WORLD, kill_at=0):
    """train() in this process, step s fed the concatenation of the `world` ranks' batches s and
    initialised from rank 0's first batch: what data and expert parallelism should compute."""

    class Union:
        def __init__(self, store, chunk_ids, batch_size, seed, *rest, **options):
            self.parts = [Batches(store, *loop.data_shard(chunk_ids, batch_size, seed, r, world), *rest, **options)
                          for r in range(world)]

        def __iter__(self):
            return (torch.cat(xs) for xs in zip(*self.parts))

    cls = REGISTRY[cfg.model["arch"]]
    real_init = cls.init_from_batch
    monkeypatch.setattr(loop, "Batches", Union)
    monkeypatch.setattr(cls, "init_from_batch", lambda self, x: real_init(self, x[: len(x) // world]))
    cfg = dataclasses.replace(cfg, expert_parallel=1)
    if kill_at:
        return train_killed_at(cfg, run_dir, kill_at)
    return load(loop.train(cfg, run_dir))


def assert_same_weights(got: dict, want: dict) -> None:
    for (name, p), q in zip(want.items(), got.values(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", list(MODELS))
def test_two_ranks_equal_one_process_on_the_union_batch(dp, tmp_path, monkeypatch, arch):
    cfg, run_dir = dp[arch]
    ref = one_process_on_the_union(cfg, tmp_path / "ref", monkeypatch)
    assert_same_weights(load(run_dir / "sae").state_dict(), ref.state_dict())
    got, want = metrics(run_dir), metrics(tmp_path / "ref")
    assert [r["step"] for r in got] == list(range(1, 7)) and {r["world_size"] for r in got} == {WORLD}
    assert arch == "relu" or max(r["dead_frac"] for r in got) > 0  # latents that fired on neither rank
    for g, w in zip(got, want, strict=True):  # the ranks log the global batch's values
        assert g["tokens"] == w["tokens"] and g["dead_frac"] == w["dead_frac"] and g["lr"] == w["lr"]
        keys = [k for k in w if k not in ("step", "tokens", "dead_frac", "lr", "tokens_per_s", "world_size")]
        assert "l0" in keys and "mse" in keys and ("aux" in keys and "expert_load" in keys) == arch.startswith("switch")
        torch.testing.assert_close(numbers(g, keys), numbers(w, keys), rtol=1e-4, atol=1e-5, msg=f"step {g['step']}")


@pytest.mark.parametrize("arch", list(MODELS))
def test_two_ranks_average_the_gradient_of_the_union_batch(dp, arch):
    """One step, before Adam (whose per-element normalisation would hide a wrongly scaled term):
    the averaged gradients are those of one process on both halves. For Switch this needs f_i and P_i
    of the whole batch in the aux loss and a correctly scaled gradient through their mean."""
    ranks = torch.load(dp["tmp"] / f"{arch}.grads.pt")
    sae, x = sae_and_batch(arch)
    out = sae(x)
    out.losses["loss"].backward()
    torch.testing.assert_close(ranks["norm"], torch.nn.utils.get_total_norm([p.grad for p in sae.parameters()]))
    for name, p in sae.named_parameters():
        # float32 sums over 64 tokens in another order: errors relative to the gradient's scale
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(ranks["grads"][name], p.grad, rtol=1e-5, atol=1e-6 * scale, msg=name)
    if arch == "switch_ep":  # each rank held half the experts, and tokens travelled both ways
        assert ranks["held"] == 2 and ranks["sent"]["forward"] > 0 and ranks["sent"]["backward"] > 0
    if arch.startswith("switch"):  # rank 0's aux is the whole batch's; the mean of each half's own would not be
        torch.testing.assert_close(ranks["losses"]["aux"], out.losses["aux"])
        with torch.no_grad():
            local = torch.stack([sae(half).losses["aux"] for half in x.chunk(WORLD)]).mean()
        assert (local - out.losses["aux"]).abs() > 1e-3


def test_two_ranks_write_the_run_once_and_one_process_resumes_it(dp, capsys):
    cfg, run_dir = dp["topk"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "config.yaml", "done.json", "metrics.jsonl",
                                                          "sae", "store.json", "validation.jsonl"]
    assert json.loads((run_dir / "done.json").read_text()) == {"step": 6, "tokens": 6 * 64, "world_size": WORLD}

    cfg, run_dir = dp["dp_killed"]
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert (state["step"], state["dead_tokens"], state["world_size"]) == (3, 3 * 64, WORLD)
    assert not (run_dir / "done.json").exists()
    loop.train(cfg, run_dir)  # one process
    assert "resuming" in capsys.readouterr().out
    assert json.loads((run_dir / "done.json").read_text()) == {"step": 6, "tokens": 6 * 64, "world_size": 1}
    assert [(r["step"], r["world_size"]) for r in metrics(run_dir)] == [(1, 2), (2, 2), (3, 2), (4, 1), (5, 1), (6, 1)]


def test_a_one_process_checkpoint_is_finished_by_two_ranks(dp):
    cfg, run_dir = dp["one_then_two"]
    assert json.loads((run_dir / "done.json").read_text()) == {"step": 6, "tokens": 6 * 64, "world_size": WORLD}
    assert [(r["step"], r["world_size"]) for r in metrics(run_dir)] == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)]
    assert load(run_dir / "sae").global_mean is None  # nothing of the process group is saved


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(dp):
    _, run_dir = dp["odd_batch"]
    for rank in range(WORLD):
        assert (run_dir / f"error{rank}.txt").read_text() == "batch_size 63 is not divisible by the number of ranks 2"


def test_make_train_nproc_launches_torchrun(dp, tmp_path):
    """`make train model=switch N=4 nproc=2 ep=2`, end to end through torchrun and Hydra: both ranks
    find the same run folder and split the experts."""
    store = dp["topk"][0].data.store
    args = (f"data.store={store} model.width=64 model.k=4 budget=steps:4 batch_size=64 log_every=1 progress=false device=cpu "
            f"data.window_chunks=4 data.eval_frac=0.1 hydra.run.dir={tmp_path / 'run'}")
    cmd = ["make", "--no-print-directory", "train", "model=switch", "N=4", f"nproc={WORLD}", "ep=2", f"ARGS={args}",
           f"PY={sys.executable}", "-o", ".venv/.installed"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "torch.distributed.run --standalone --nproc_per_node=2 -m train" in out.stdout
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2, 3, 4]
    done = json.loads((tmp_path / "run" / "done.json").read_text())
    assert done["world_size"] == WORLD
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["expert_parallel"] == 2


def test_expert_parallel_with_an_empty_shard(dp):
    """Every token routed to expert 0 (zero router): rank 1's experts get no tokens, and the gradients
    are still those of one process."""
    ranks = torch.load(dp["tmp"] / "switch_ep_one_expert.grads.pt")
    sae, x = sae_and_batch("switch_ep_one_expert")
    sae(x).losses["loss"].backward()
    # rank 0 keeps its own 32 tokens and sends rank 1's 32 outputs back (float32, d 32), after its
    # token counts for rank 1's 2 experts (int64)
    assert ranks["sent"] == {"forward": 32 * 32 * 4 + 2 * 8, "backward": 32 * 32 * 4}
    for name, p in sae.named_parameters():
        torch.testing.assert_close(ranks["grads"][name], p.grad, rtol=1e-5, atol=1e-6 * p.grad.abs().max().item())


def test_expert_parallel_checkpoints_hold_the_whole_state(dp, tmp_path, monkeypatch):
    """A 2-rank expert-parallel checkpoint (step 3 of 6) holds the whole SAE and Adam moments: those of
    one process on the union batches; one process then finishes the run from it."""
    cfg, run_dir = dp["ep_killed"]
    got = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    one_process_on_the_union(cfg, tmp_path / "ref", monkeypatch, kill_at=4)
    want = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)
    assert (got["step"], got["world_size"], got["expert_parallel"]) == (3, WORLD, WORLD)
    assert_same_weights(got["sae"], want["sae"])
    assert got["sae"]["W_enc"].shape == (4, 16, 32)
    for i, moments in want["opt"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got["opt"]["state"][i][key], moments[key], rtol=1e-4, atol=1e-7)
    monkeypatch.undo()
    loop.train(dataclasses.replace(cfg, expert_parallel=1), run_dir)
    assert [(r["step"], r["world_size"]) for r in metrics(run_dir)] == [(1, 2), (2, 2), (3, 2), (4, 1), (5, 1), (6, 1)]


def test_expert_parallel_resumes_a_one_process_checkpoint(dp, monkeypatch):
    """Steps 1-3 in one process, 4-6 on 2 ranks with the experts split: the same weights as one process
    that continues the same checkpoint on the union batches (the moments were sliced correctly)."""
    cfg, run_dir = dp["one_then_ep"]
    ref = one_process_on_the_union(cfg, run_dir.with_name("one_then_ep.at3"), monkeypatch)
    assert_same_weights(load(run_dir / "sae").state_dict(), ref.state_dict())
    assert [(r["step"], r["world_size"]) for r in metrics(run_dir)] == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)]


def test_expert_parallel_combines_with_data_parallel(four_ranks, tmp_path, monkeypatch):
    """4 ranks = 2 replicas x 2 expert shards: the weights of one process on the union of 4 batches."""
    cfg, run_dir = four_ranks
    ref = one_process_on_the_union(cfg, tmp_path / "ref", monkeypatch, world=4)
    assert_same_weights(load(run_dir / "sae").state_dict(), ref.state_dict())
    assert {r["world_size"] for r in metrics(run_dir)} == {4}


def test_expert_parallel_refusals(dp):
    """Bad layouts fail in one line, at config load or before any step."""
    store = dp["switch"][0].data.store
    for arch, extra, message in [("topk", [], "expert_parallel=2 needs model=switch"),
                                 ("switch", ["model.n_experts=3", "model.width=63"], "n_experts divisible by it"),
                                 ("switch", ["compile=true"], "compile=true is not supported")]:
        with pytest.raises(TrainError, match=message):
            make_cfg(store, *MODELS[arch], *SHORT, "expert_parallel=2", *extra)
    with pytest.raises(TrainError, match="expert_parallel=2 does not divide the number of ranks 1"):
        loop.train(cfg_for(store, "switch_ep"), dp["tmp"] / "ep_one_process")
