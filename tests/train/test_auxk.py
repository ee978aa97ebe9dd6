"""AuxK (train/saes/auxk.py) on TopK and Switch: the loss against a per-token re-derivation; only the
dead latents get its gradient; off outside training; refused where it does not apply."""

from __future__ import annotations

import pytest
import torch

from tests.train.test_loop import make_cfg, synthetic_store
from train.config import TrainError
from train.saes import build


def _x(b=64, d=8, seed=0):
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed)) * 3 + 1


def _dead(m: int, rows: list[int]) -> torch.Tensor:
    mask = torch.zeros(m, dtype=torch.bool)
    mask[rows] = True
    return mask


def test_topk_auxk_equals_a_per_token_derivation():
    torch.manual_seed(0)
    sae = build("topk", d=8, width=32, k=4, aux_k=2, aux_coeff=0.5)
    with torch.no_grad():
        sae.b_enc.normal_()
    sae.dead = _dead(32, [1, 5, 9, 30])
    x = _x()
    out = sae(x)
    dead = torch.tensor([1, 5, 9, 30])
    num = torch.zeros(())
    for b in range(len(x)):
        pre = sae.W_enc[dead] @ (x[b] - sae.b_pre) + sae.b_enc[dead]
        top = pre.topk(2).indices
        z = torch.zeros(4)
        z[top] = pre[top].relu()
        num = num + ((x[b] - out.recon[b]) - sae.W_dec[dead].T @ z).pow(2).sum()
    expected = num / len(x)
    torch.testing.assert_close(out.losses["auxk"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.losses["loss"], out.losses["mse"] + 0.5 * expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["topk", "switch", "batchtopk"])
def test_only_dead_latents_get_the_auxk_gradient(arch):
    torch.manual_seed(0)
    kw = {"topk": dict(width=32, k=4), "switch": dict(n_experts=2, expert_width=16, k=4, alpha=3.0),
          "batchtopk": dict(width=32, k=4, theta_decay=0.99)}[arch]
    sae = build(arch, d=8, aux_k=4, aux_coeff=1.0, **kw)
    x = _x()
    with torch.no_grad():  # the dead latents fire on these inputs, so the ReLU passes their gradient
        sae.W_enc.view(-1, 8)[[3, 20]] = (x - sae.b_pre).mean(0)
    sae.dead = _dead(32, [3, 20])
    sae(x).losses["auxk"].backward()
    grad = sae.W_enc.grad.view(32, -1).abs().sum(1)
    assert (grad[[3, 20]] > 0).any(), "a dead latent gets gradient from the auxiliary loss"
    live = torch.ones(32, dtype=torch.bool)
    live[[3, 20]] = False
    assert (grad[live] == 0).all(), "no live latent does"
    assert (sae.W_dec.grad.view(32, -1)[live] == 0).all()


@pytest.mark.parametrize("arch", ["topk", "switch"])
def test_auxk_kernels_agree(arch):
    """The sparse path (embedding bag of the chosen dead rows), the dense one (grouped matmul of the
    codes) and plain autograd give the same AuxK loss and the same gradients."""
    kw = {"topk": dict(width=64, k=4), "switch": dict(n_experts=4, expert_width=16, k=4, alpha=3.0)}[arch]
    x = _x(b=96)
    dead = _dead(64, [1, 2, 5, 17, 18, 19, 30, 33, 40, 41, 42, 60, 63])
    results = {}
    for kernels in ("reference", "sparse", "dense"):
        torch.manual_seed(0)
        sae = build(arch, d=8, aux_k=3, aux_coeff=1.0, **kw)
        sae.kernels, sae.dead = kernels, dead
        out = sae(x)
        out.losses["auxk"].backward()
        results[kernels] = (out.losses["auxk"].detach(), sae.W_enc.grad.clone(), sae.W_dec.grad.clone())
    assert results["reference"][0] > 0
    for kernels in ("sparse", "dense"):
        for got, want in zip(results[kernels], results["reference"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_auxk_is_zero_without_dead_latents_and_outside_training():
    sae = build("topk", d=8, width=32, k=4, aux_k=4, aux_coeff=1.0)
    x = _x()
    assert sae(x).losses["auxk"] == 0  # no mask yet
    sae.dead = _dead(32, [])
    assert sae(x).losses["auxk"] == 0
    sae.dead = _dead(32, [0, 1, 2])
    assert sae(x).losses["auxk"] > 0
    assert sae.eval()(x).losses["auxk"] == 0


def test_switch_auxk_reads_each_tokens_own_expert():
    """Dead latents of expert 1 reconstruct only the residuals of tokens routed to expert 1."""
    torch.manual_seed(0)
    sae = build("switch", d=8, n_experts=2, expert_width=16, k=2, alpha=3.0, aux_k=16, aux_coeff=1.0)
    x = _x()
    sae.dead = _dead(32, list(range(16, 32)))  # all of expert 1
    out = sae(x)
    to_one = out.codes.expert == 1
    assert 0 < to_one.sum() < len(x)
    xc, resid = x - sae.b_pre, (x - out.recon).detach()
    pre = (xc[to_one] @ sae.W_enc[1].T).relu()  # every latent of expert 1, k_aux = 16 = its width
    num = (resid[to_one] - pre @ sae.W_dec[1]).pow(2).sum()
    torch.testing.assert_close(out.losses["auxk"], num / len(x), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("auxk") / "s", n_chunks=10)


def test_auxk_on_an_architecture_without_it_fails_in_one_line(store):
    with pytest.raises(TrainError, match=r"model.aux_k \(AuxK\) needs an architecture with TopK-style dead-latent "
                                         r"revival \(topk, switch, batchtopk, matryoshka, matryoshka_switch\), not relu") as e:
        make_cfg(store, "model=relu", "+model.aux_k=4")
    assert "\n" not in str(e.value)
    with pytest.raises(TrainError, match="expert_parallel runs the paper's Switch only, not model.aux_k=4"):
        make_cfg(store, "model=switch", "model.width=64", "model.n_experts=4", "model.k=4", "model.aux_k=4",
                 "expert_parallel=2")


def test_a_resumed_auxk_run_ends_with_the_same_weights(store, tmp_path, monkeypatch):
    """The dead-latent mask AuxK reads comes from the checkpointed tracker: resuming changes nothing."""
    from tests.train.test_loop import assert_same_weights, train_killed_at
    from train.loop import train

    cfg = make_cfg(store, "model=topk", "model.width=256", "model.k=4", "model.aux_k=8", "dead_window=640",
                   "budget=steps:60", "checkpoint_every=20", "eval_every=0")
    train(cfg, tmp_path / "straight")
    train_killed_at(cfg, tmp_path / "killed", 50, monkeypatch)
    train(cfg, tmp_path / "killed")
    assert_same_weights(tmp_path / "straight" / "sae", tmp_path / "killed" / "sae")
    import json
    logged = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert any(line["auxk"] > 0 for line in logged)  # latents died and AuxK worked on them
