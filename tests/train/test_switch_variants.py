"""The Switch variants the paper leaves as future work (train/saes/switch.py): several active experts,
a shared expert, auxiliary-loss-free balancing. Math against per-token re-derivations, the no-[B, M]
property, balancing, save/load, training, resume, downstream tools and bad input."""

from __future__ import annotations

import pytest
import torch

from tests.train.test_kernels import LargestTensor
from tests.train.test_loop import assert_same_weights, fve, make_cfg, synthetic_store, train_killed_at
from train.config import TrainError
from train.loop import train
from train.saes import build, load, save
from train.saes.flops import cost, sae_cost

BASE = dict(d=8, n_experts=4, expert_width=16, alpha=3.0)


def _x(b=64, d=8, seed=0):
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed)) * 3 + 1


def _randomise(sae):
    with torch.no_grad():
        sae.b_pre.normal_()
        sae.b_router.normal_()
        sae.W_router.normal_()


def _topk_code(pre: torch.Tensor, k: int) -> torch.Tensor:
    """ReLU(TopK_k(pre)) as a dense vector."""
    z = torch.zeros_like(pre)
    top = pre.topk(k).indices
    z[top] = pre[top].relu()
    return z


@pytest.mark.parametrize("kernels", ["reference", "auto", "sparse", "dense"])
def test_several_active_experts_equal_a_per_token_derivation(kernels):
    torch.manual_seed(0)
    sae = build("switch", **BASE, k=4, active_experts=2)
    sae.kernels = kernels
    _randomise(sae)
    x = _x()
    out = sae(x)
    for b in range(len(x)):
        p = torch.softmax(sae.W_router @ (x[b] - sae.b_router), dim=0)
        expected = sae.b_pre.clone()
        for i in p.topk(2).indices.tolist():  # k / m = 2 latents in each of the 2 chosen experts
            expected += p[i] * (sae.W_dec[i].T @ _topk_code(sae.W_enc[i] @ (x[b] - sae.b_pre), 2))
        torch.testing.assert_close(out.recon[b], expected, rtol=1e-4, atol=1e-4)
    assert out.codes.idx.shape == (len(x), 4) and (out.codes.active().sum(1) <= 4).all()
    torch.testing.assert_close(sae.decode(sae.encode(x)), out.recon)
    slots = torch.softmax((x - sae.b_router) @ sae.W_router.T, -1).topk(2, dim=-1).indices
    torch.testing.assert_close(out.stats["expert_load"], torch.bincount(slots.reshape(-1), minlength=4) / slots.numel())


def global_topk_reference(sae, x: torch.Tensor) -> torch.Tensor:
    """routing=global by plain autograd over the dense [B, N, e] pre-activations: every expert's codes
    ReLU(W_enc,i (x - b_pre)) gated by p_i, zero outside the token's top-m experts, then one TopK_k over
    all N e of them, decoded through W_dec."""
    p = torch.softmax((x - sae.b_router) @ sae.W_router.T, dim=-1)  # [B, N]
    chosen = torch.zeros_like(p, dtype=torch.bool).scatter_(1, p.topk(sae.active_experts, dim=-1).indices, True)
    pre = torch.einsum("bd,ned->bne", x - sae.b_pre, sae.W_enc).relu()  # [B, N, e]
    gated = (pre * (p * chosen)[..., None]).flatten(1)  # [B, N e]
    vals, idx = gated.topk(sae.k, dim=-1)
    z = torch.zeros_like(gated).scatter(1, idx, vals)
    return z @ sae.W_dec.reshape(-1, sae.d) + sae.b_pre


@pytest.mark.parametrize("kernels", ["reference", "sparse", "dense"])
def test_global_topk_routing_equals_a_dense_reference_loss_and_gradients(kernels):
    torch.manual_seed(0)
    sae = build("switch", **BASE, k=6, active_experts=2, routing="global")
    sae.kernels = kernels
    _randomise(sae)
    x = _x()
    out = sae(x)
    ref = global_topk_reference(sae, x)
    torch.testing.assert_close(out.recon, ref, rtol=1e-4, atol=1e-4)
    mse_ref = ((x - ref) ** 2).sum(-1).mean()
    fast = torch.autograd.grad(out.losses["mse"], list(sae.parameters()))
    slow = torch.autograd.grad(mse_ref, list(sae.parameters()))
    for (name, _), a, b in zip(sae.named_parameters(), fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)
    torch.testing.assert_close(sae.decode(sae.encode(x)), out.recon)
    # tokens do take unequal shares from their two experts (the split routing would give 3 and 3)
    owner = out.codes.idx // 16
    first = (owner == out.codes.expert[:, None]).sum(1)
    assert len(first.unique()) > 1 and out.codes.idx.shape == (len(x), 6)


def test_global_routing_with_one_expert_is_the_paper_switch():
    torch.manual_seed(0)
    plain = build("switch", **BASE, k=4)
    glob = build("switch", **BASE, k=4, routing="global")
    glob.load_state_dict(plain.state_dict())
    x = _x()
    torch.testing.assert_close(glob(x).recon, plain(x).recon)


def test_a_shared_expert_equals_a_per_token_derivation():
    torch.manual_seed(0)
    sae = build("switch", **BASE, k=5, shared_width=8, shared_k=2)
    _randomise(sae)
    x = _x()
    out = sae(x)
    for b in range(len(x)):
        p = torch.softmax(sae.W_router @ (x[b] - sae.b_router), dim=0)
        i = int(p.argmax())
        xc = x[b] - sae.b_pre
        routed = p[i] * (sae.W_dec[i].T @ _topk_code(sae.W_enc[i] @ xc, 3))  # k - shared_k = 3
        shared = sae.W_dec_shared.T @ _topk_code(sae.W_enc_shared @ xc, 2)  # not gated
        torch.testing.assert_close(out.recon[b], routed + shared + sae.b_pre, rtol=1e-4, atol=1e-4)
        assert (out.codes.idx[b, 3:] >= 4 * 16).all()  # the shared latents come after the routed ones
    assert sae.n_latents == 4 * 16 + 8 and out.codes.fired(sae.n_latents)[64:].any()
    torch.testing.assert_close(sae.decode(sae.encode(x)), out.recon)


def test_aux_free_balancing_moves_a_collapsed_router_towards_uniform_load():
    n, d = 4, 4
    sae = build("switch", d=d, n_experts=n, expert_width=8, k=2, alpha=3.0, balance="bias", bias_rate=0.01)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.ones(256, 1), torch.randn(256, d - 1, generator=g)], dim=1)  # a constant first input
    with torch.no_grad():
        sae.b_router.zero_()
        sae.W_router.copy_(0.3 * torch.randn(n, d, generator=g))
        sae.W_router[:, 0] = torch.tensor([4.0, 0.0, 0.0, 0.0])  # every token prefers expert 0
    first = sae(x)
    assert first.stats["expert_load"][0] == 1.0
    assert first.losses["loss"] == first.losses["mse"]  # no alpha term with balance=bias
    loads = [first.stats["expert_load"].max().item()]
    for _ in range(200):
        loads.append(sae(x).stats["expert_load"].max().item())
    assert max(loads[-50:]) < 0.45  # from 1.0 to 0.39 here (1/N = 0.25), and it stays there
    assert sae.router_bias[0] < 0 < sae.router_bias[1:].max()
    sae.eval()  # inference never moves the bias
    before = sae.router_bias.clone()
    sae(x)
    assert torch.equal(before, sae.router_bias)
    # the bias picks the experts, the gate stays the router probability
    codes = sae.encode(x)
    p = torch.softmax((x - sae.b_router) @ sae.W_router.T, -1)
    assert (codes.probs == p).all()


@pytest.mark.parametrize("variant", [dict(active_experts=2), dict(shared_width=16, shared_k=2),
                                     dict(balance="bias", bias_rate=0.001), dict(active_experts=2, routing="global")])
def test_routed_variants_never_make_a_tensor_as_large_as_b_by_m(variant):
    B, d, n, e = 512, 8, 16, 16  # B x M = 131072
    sae = build("switch", d=d, n_experts=n, expert_width=e, k=4, alpha=3.0, **variant)
    with LargestTensor() as seen:
        sae(torch.randn(B, d)).losses["loss"].backward()
    assert seen.largest < B * n * e // 4


@pytest.mark.parametrize("variant", [dict(active_experts=2, k=4), dict(shared_width=8, shared_k=1, k=3),
                                     dict(balance="bias", bias_rate=0.01, k=2)])
def test_variants_save_and_load_and_count_their_parameters(tmp_path, variant):
    sae = build("switch", **BASE, **variant)
    _randomise(sae)
    x = _x()
    sae.train()
    sae(x)  # moves a bias
    save(sae, tmp_path / "s")
    again = load(tmp_path / "s").eval()
    sae.eval()
    torch.testing.assert_close(again(x).recon, sae(x).recon)
    assert sae_cost(sae).params == sum(p.numel() for p in sae.parameters())


def test_cost_of_the_variants():
    d, n, e = 768, 8, 3072
    plain = cost("switch", d, n_experts=n, expert_width=e, k=32, sparse_backward=True)
    two = cost("switch", d, n_experts=n, expert_width=e, k=32, active_experts=2, sparse_backward=True)
    shared = cost("switch", d, n_experts=n, expert_width=e, k=32, shared_width=1024, shared_k=8, sparse_backward=True)
    assert two.forward - plain.forward == 2 * d * e  # one more expert's encoder; the same k decoded
    assert shared.forward - plain.forward == 2 * d * 1024
    assert shared.params - plain.params == 2 * 1024 * d
    assert two.params == plain.params
    # one TopK over the union: each of the 2 experts returns min(k, e) = 32 candidates, all in the sparse backward
    union = cost("switch", d, n_experts=n, expert_width=e, k=32, active_experts=2, routing="global",
                 sparse_backward=True)
    assert union.forward == two.forward and union.train - two.train == 4 * (2 * 32 - 32) * d
    with pytest.raises(ValueError, match="routing must be one of split, global, got 'both'"):
        cost("switch", d, n_experts=n, expert_width=e, k=32, routing="both")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("variants") / "s")


# Measured here at 800 steps: two experts at width 64 (2 latents in each of 2 experts of 16) reach an
# FVE of 0.85 only, at width 128 0.94; the bias at rate 0.01 0.90, at 0.0001 0.94 (plain Switch 0.95).
VARIANTS = {"two_experts": ["model.active_experts=2", "model.width=128"],
            "two_experts_global": ["model.active_experts=2", "model.routing=global", "model.width=128"],
            "shared": ["model.width=64", "model.shared_width=16", "model.shared_k=1"],
            "bias": ["model.width=64", "model.balance=bias", "model.bias_rate=0.0001"]}


@pytest.mark.parametrize("name", VARIANTS)
def test_each_variant_learns_the_known_sparse_dictionary(store, tmp_path, name):
    cfg = make_cfg(store, "model=switch", "model.n_experts=4", "model.k=4", *VARIANTS[name], "budget=steps:800")
    assert fve(store, train(cfg, tmp_path / "run")) > 0.9


def test_a_resumed_variant_run_ends_with_the_same_weights(store, tmp_path, monkeypatch):
    cfg = make_cfg(store, "model=switch", "model.width=64", "model.n_experts=4", "model.k=4",
                   "model.active_experts=2", "model.shared_width=16", "model.shared_k=2", "model.balance=bias",
                   "model.bias_rate=0.001", "budget=steps:60", "checkpoint_every=20")
    train(cfg, tmp_path / "straight")
    train_killed_at(cfg, tmp_path / "killed", 50, monkeypatch)
    train(cfg, tmp_path / "killed")
    assert_same_weights(tmp_path / "straight" / "sae", tmp_path / "killed" / "sae")  # the bias buffer included


@pytest.mark.parametrize(("extra", "message"), [
    (["model.active_experts=5"], "model.active_experts=5 is more than model.n_experts=4"),
    (["model.active_experts=3"], "cannot be split evenly over model.active_experts=3"),
    (["model.active_experts=5", "model.routing=global"], "model.active_experts=5 is more than model.n_experts=4"),
    (["model.active_experts=2", "model.routing=global", "model.k=40"],
     "model.k - model.shared_k = 40 routed active latents must be in 1..32"),
    (["model.routing=union"], "model.routing must be one of split, global"),
    (["model.shared_width=8"], "a shared expert needs both > 0"),
    (["model.shared_width=8", "model.shared_k=9"], "model.shared_k=9 is larger than model.shared_width=8"),
    (["model.balance=bias", "model.bias_rate=0"], "model.balance=bias needs model.bias_rate > 0"),
    (["model.balance=none"], "model.balance must be one of aux_loss, bias"),
    (["model.active_experts=2", "expert_parallel=2"], "expert_parallel runs the paper's Switch only, not "
                                                      "model.active_experts=2"),
    (["model.active_experts=2", "model.routing=global", "expert_parallel=2"], "model.routing=global"),
])
def test_bad_variant_settings_fail_in_one_line(store, extra, message):
    with pytest.raises(TrainError, match=message) as e:
        make_cfg(store, "model=switch", "model.width=64", "model.n_experts=4", "model.k=4", *extra)
    assert "\n" not in str(e.value)


def test_eval_geometry_and_the_report_run_on_a_variant(store, tmp_path):
    """A Switch with two active experts, a shared expert and the router bias through eval, the
    dashboards' encoding pass, geometry (routed experts) and the report."""
    from hydra import compose, initialize_config_dir

    from eval.firings import scan
    from eval.geometry import GeometryConfig, geometry
    from eval.report import build_report
    from eval.run import evaluate
    from tests.conftest import CONF
    from tests.eval.test_run import config
    from train.run_dir import RunDir

    run = tmp_path / "runs" / "variant"
    train(make_cfg(store, "model=switch", "model.width=64", "model.n_experts=4", "model.k=4", "model.active_experts=2",
                   "model.shared_width=16", "model.shared_k=2", "model.balance=bias", "budget=steps:20"), run)
    result, = evaluate(config(run, ce=False, batch_size=32))
    assert result["arch"] == "switch" and result["n_latents"] == 80 and 0 < result["l0"] <= 4
    opened = RunDir(run).open(torch.device("cpu"))
    firings = scan(opened, torch.device("cpu"), max_tokens=10_000, batch_size=32, whole_chunks=False)
    assert len(firings.counts) == 80 and firings.counts[64:].sum() > 0  # the shared expert fires
    with initialize_config_dir(config_dir=str(CONF / "eval"), version_base="1.3"):
        cfg = GeometryConfig.from_omegaconf(compose("geometry", overrides=[f"run={run}", "tsne=false", "device=cpu"]))
    (geo,), _ = geometry(cfg)
    assert geo["n_latents"] == 64 and 0 <= geo["cross_expert_dup_frac"] <= 1  # the routed experts
    assert build_report(tmp_path / "runs", tmp_path / "report").exists()
