"""train.saes.jumprelu: the forward against a per-token derivation, the paper's straight-through
gradients by hand, save/load, learning a known sparse dictionary, exact resume and an eval smoke run."""

import json
import math

import pytest
import torch

from eval.run import evaluate
from tests.conftest import eval_config
from tests.train.test_loop import (
    _resume_equals_straight,
    fve,
    make_cfg,
    synthetic_store,
)
from train.loop import train
from train.saes import build, load, save
from train.saes.flops import cost
from train.saes.jumprelu import JumpReLU, Step

KW = {"width": 32, "l0_coeff": 0.5, "warmup_frac": 0.1, "bandwidth": 0.05, "threshold_init": 0.03}
LEARN = ["model=jumprelu", "model.width=64", "model.l0_coeff=0.01"]  # the YAML's lambda is for LM activations


def _x(b=64, d=8, seed=0, dtype=torch.float32):
    return (torch.randn(b, d, generator=torch.Generator().manual_seed(seed)) * 3 + 1).to(dtype)


def _sae(dtype=torch.float32, **kw):
    """A JumpReLU SAE whose scale s comes from a batch (s != 1) and whose biases and thresholds vary,
    so that every latent has pre-activations on both sides of its threshold."""
    torch.manual_seed(0)
    sae = build("jumprelu", d=8, **{**KW, **kw}).to(dtype)
    sae.init_from_batch(_x(dtype=dtype))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.log_theta.add_(torch.rand(sae.width, dtype=dtype) * 2)
    return sae


def test_forward_equals_a_per_token_derivation():
    sae = _sae()
    x = _x(seed=1)
    s = x.new_tensor(_x().pow(2).sum(1).mean().sqrt().item())
    torch.testing.assert_close(sae.scale, s)
    sae.schedule(5, 100)  # half-way through the 10-step warmup: lambda_t = 0.25
    out = sae(x)
    theta = sae.log_theta.exp()
    fired = 0
    for b in range(len(x)):
        pre = sae.W_enc @ x[b] + sae.b_enc  # no b_dec subtracted
        f = torch.where(pre > theta, pre, torch.zeros(()))
        torch.testing.assert_close(out.codes.dense[b], f)
        torch.testing.assert_close(out.recon[b], sae.W_dec.T @ f + sae.b_pre, rtol=1e-5, atol=1e-5)
        fired += int((pre > theta).sum())
    l0 = fired / len(x)
    assert 0 < l0 < sae.width
    assert out.losses["sparsity"].item() == pytest.approx(l0)
    assert out.codes.active().sum(1).float().mean().item() == pytest.approx(l0)
    torch.testing.assert_close(out.losses["mse"], (x - out.recon).pow(2).sum(-1).mean())
    torch.testing.assert_close(out.losses["loss"], out.losses["mse"] + 0.25 * s**2 * l0)
    sae.schedule(50, 100)
    torch.testing.assert_close(sae(x).losses["loss"], out.losses["mse"] + 0.5 * s**2 * l0)
    torch.testing.assert_close(sae.decode(sae.encode(x)), out.recon)
    assert sae.unit_norm_decoders() == [sae.W_dec]


def test_init_sets_the_scale_and_the_thresholds_in_its_units():
    torch.manual_seed(0)
    sae = build("jumprelu", d=8, **KW)
    torch.testing.assert_close(sae.log_theta.exp(), torch.full((32,), 0.03))  # s = 1 before any batch
    torch.testing.assert_close(sae.W_enc, sae.W_dec)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    x = _x()
    sae.init_from_batch(x)
    s = x.pow(2).sum(1).mean().sqrt()
    torch.testing.assert_close(sae.log_theta.exp(), torch.full((32,), 0.03) * s)
    torch.testing.assert_close(sae.eps, 0.05 * s)


# three tokens, two latents; theta = (1, 2), eps = 0.5: K((pre - theta) / eps) = 1 where |pre - theta| < 0.25
PRE = [[0.9, 2.1], [1.3, 1.0], [1.1, 2.2]]
G = [[1.0, 2.0], [3.0, 4.0], [5.0, -1.0]]


def _leaves():
    pre = torch.tensor(PRE, dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    return pre, theta, torch.tensor(G, dtype=torch.float64)


def test_jumprelu_pseudo_derivatives_by_hand():
    pre, theta, g = _leaves()
    f = JumpReLU.apply(pre, theta, 0.5)
    assert f.tolist() == [[0.0, 2.1], [1.3, 0.0], [1.1, 2.2]]
    (f * g).sum().backward()
    # K = [[1, 1], [0, 0], [1, 1]]; dtheta_i = -(theta_i / eps) sum_b g_bi K_bi
    assert theta.grad.tolist() == [-(1.0 / 0.5) * (1.0 + 5.0), -(2.0 / 0.5) * (2.0 - 1.0)]  # [-12, -4]
    assert pre.grad.tolist() == [[0.0, 2.0], [3.0, 0.0], [5.0, -1.0]]  # g * H(pre - theta)


def test_step_pseudo_derivatives_by_hand_and_no_gradient_into_pre():
    pre, theta, g = _leaves()
    h = Step.apply(pre, theta, 0.5)
    assert h.tolist() == [[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]
    (h * g).sum().backward()
    assert theta.grad.tolist() == [-(1 / 0.5) * (1.0 + 5.0), -(1 / 0.5) * (2.0 - 1.0)]  # [-12, -2]
    assert pre.grad is None


def test_module_gradients_equal_the_straight_through_formulas():
    """The whole loss, float64: d loss / d log_theta = theta * (JumpReLU's and L0's pseudo-derivatives)."""
    sae = _sae(torch.float64, bandwidth=0.5)
    sae.schedule(50, 100)
    x = _x(seed=2, dtype=torch.float64)
    sae(x).losses["loss"].backward()
    with torch.no_grad():
        b, s, theta, eps = len(x), sae.scale, sae.log_theta.exp(), 0.5 * sae.scale
        pre = x @ sae.W_enc.T + sae.b_enc
        f = pre * (pre > theta)
        g = 2 * (f @ sae.W_dec + sae.b_pre - x) @ sae.W_dec.T / b  # d mse / d f  [B, M]
        k = ((pre - theta).abs() < eps / 2).double()
        d_theta = (g * -(theta / eps) * k).sum(0) + sae.l0_coeff * s**2 / b * (-(1 / eps) * k).sum(0)
    assert 0 < k.mean() < 1
    torch.testing.assert_close(sae.log_theta.grad, theta * d_theta)
    torch.testing.assert_close(sae.b_enc.grad, (g * (pre > theta)).sum(0))
    sae.zero_grad(set_to_none=True)
    sae(x).losses["sparsity"].backward()  # the L0 term alone trains the thresholds only
    assert sae.W_enc.grad is None and sae.b_enc.grad is None and sae.W_dec.grad is None
    assert sae.log_theta.grad.abs().sum() > 0


def test_only_pre_activations_within_half_a_bandwidth_move_a_threshold():
    """Latent 0 sits just below its threshold on every token, latent 1 far below, latent 2 far above."""
    sae = build("jumprelu", d=4, width=3, l0_coeff=1.0, warmup_frac=0.0, bandwidth=0.1, threshold_init=1.0)
    x = torch.eye(4)[torch.arange(16) % 4] + 0.01 * torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.copy_(torch.tensor([1.0 - 0.02, 1.0 - 5.0, 1.0 + 5.0]))  # pre = b_enc (the rows are zero)
    out = sae(x)
    assert out.codes.active().float().mean(0).tolist() == [0.0, 0.0, 1.0]
    out.losses["loss"].backward()
    grad = sae.log_theta.grad
    assert grad[0] != 0 and grad[1] == 0 and grad[2] == 0
    sae.zero_grad(set_to_none=True)
    sae(x).losses["sparsity"].backward()
    # theta_0 * -(1 / eps) * (all 16 tokens in the band) / 16: L0 alone pushes theta_0 up
    assert sae.log_theta.grad.tolist() == pytest.approx([-1.0 / 0.1, 0.0, 0.0])


def test_save_load_keeps_thresholds_scale_and_schedule(tmp_path):
    sae = _sae()
    sae.schedule(3, 100)
    save(sae, tmp_path / "sae")
    again = load(tmp_path / "sae")
    x = _x(seed=3)
    assert type(again) is type(sae) and again.config() == sae.config()
    for name, value in sae.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name
    a, b = sae(x), again(x)
    torch.testing.assert_close(a.recon, b.recon)
    torch.testing.assert_close(a.losses["loss"], b.losses["loss"])


def test_cost_is_relus_with_one_more_vector():
    c = cost("jumprelu", 16, width=64)
    assert c.forward == 4 * 16 * 64 and c.train == 10 * 16 * 64
    assert c.params == 2 * 64 * 16 + 2 * 64 + 16 == sum(p.numel() for p in build("jumprelu", d=16, width=64, **{
        k: v for k, v in KW.items() if k != "width"}).parameters())


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("syn") / "s")


def test_jumprelu_learns_a_known_sparse_dictionary(store, tmp_path):
    sae_dir = train(make_cfg(store, *LEARN, "budget=steps:500"), tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    explained = fve(store, sae_dir)
    print(f"jumprelu on the synthetic store: fve {explained:.3f}, l0 {lines[-1]['l0']:.2f}")
    assert explained > 0.9
    assert lines[-1]["l0"] < 64 / 4 and lines[-1]["l0"] < lines[0]["l0"]
    assert lines[-1]["sparsity"] == pytest.approx(lines[-1]["l0"])
    sae = load(sae_dir)
    assert sae.scale.item() > 10  # the synthetic rows' norm (s = 1 would mean init_from_batch never ran)
    assert (sae.log_theta.exp() > 0.03 * sae.scale).float().mean() > 0.5  # most thresholds rose


def test_resumed_run_ends_with_the_same_weights(store, tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _resume_equals_straight(store, tmp_path, monkeypatch, LEARN)
    finally:
        torch.set_num_threads(threads)


def test_a_tiny_run_evaluates(store, tmp_path):
    run = tmp_path / "run"
    train(make_cfg(store, *LEARN, "budget=steps:20"), run)
    cfg = eval_config(run, max_tokens=10_000, batch_size=64, ce=False)
    [result] = evaluate(cfg)
    assert result["arch"] == "jumprelu" and result["n_latents"] == 64 and result["train_tokens"] == 20 * 128
    assert 0 < result["l0"] < 64 and math.isfinite(result["mse"]) and result["fve"] <= 1
    expected = cost("jumprelu", 32, width=64)
    assert result["params"] == expected.params and result["flops_forward_per_token"] == expected.forward
    assert result["train_flops"] == expected.train * 20 * 128
    assert json.loads((run / "eval.json").read_text())["mse"] == result["mse"]
