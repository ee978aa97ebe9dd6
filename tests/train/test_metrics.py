"""train.metrics: the reconstruction metrics on a hand-computed example and on exact SAEs."""

import math

import pytest
import torch

from train.metrics import ReconMetrics, reconstruction_metrics
from train.saes import Codes, build


def test_hand_computed_example():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    recon = torch.tensor([[1.0, 1.0], [1.0, 2.0]])  # errors [[0, -1], [2, 0]]
    dense = torch.tensor([[0.5, 0.0, 0.0, 0.0], [0.2, 0.0, 0.3, 0.0]])  # latents 1 and 3 never fire
    acc = ReconMetrics(d=2, n_latents=4, n_experts=3, dead_window=None)
    acc.update(x, recon, Codes(dense=dense, expert=torch.tensor([0, 0])))
    m = acc.result()
    assert m["mse"] == pytest.approx((1 + 4) / 2)
    # sum_j n*Var(x_j) = 2 + 2; sum_j n*Var(err_j) = 2 + 0.5; sum_t ||x_t - mean||^2 = 4
    assert m["fve"] == pytest.approx(1 - 2.5 / 4)
    assert m["nmse"] == pytest.approx(5 / 4)
    assert m["l0"] == pytest.approx(1.5)
    assert m["dead_frac"] == pytest.approx(0.5)
    assert m["expert_load"] == [1.0, 0.0, 0.0] and m["expert_entropy"] == 0.0


def test_dead_window_counts_only_its_first_tokens():
    acc = ReconMetrics(d=1, n_latents=3, n_experts=None, dead_window=2)
    x = torch.arange(3.0)[:, None]
    idx = torch.tensor([[0], [0], [2]])  # latent 2 fires only at token 3, outside the window
    acc.update(x, x, Codes(idx=idx, vals=torch.ones(3, 1)))
    assert acc.result()["dead_frac"] == pytest.approx(2 / 3)
    assert acc.result()["dead_window_tokens"] == 2


def test_constant_inputs_have_no_fve():
    acc = ReconMetrics(d=2, n_latents=1, n_experts=None, dead_window=None)
    acc.update(torch.ones(4, 2), torch.zeros(4, 2), Codes(dense=torch.ones(4, 1)))
    assert acc.result()["fve"] is None and acc.result()["mse"] == 2.0


def identity_topk(d: int):
    """A real TopK SAE that reconstructs exactly: latents +e_j and -e_j, all of them kept."""
    sae = build("topk", d=d, width=2 * d, k=2 * d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_pre.zero_()
    return sae


def test_identity_sae_is_perfect():
    torch.manual_seed(0)
    x = torch.randn(500, 8) * 3 + 1
    m = reconstruction_metrics(identity_topk(8), [x[:200], x[200:]], batch_size=64, dead_window=None,
                               dtype=torch.float32)
    assert m["mse"] == 0.0 and m["fve"] == 1.0 and m["nmse"] == 0.0
    assert m["eval_tokens"] == 500 and m["dead_frac"] == 0.0


def test_switch_expert_load_and_entropy():
    torch.manual_seed(0)
    sae = build("switch", d=8, n_experts=4, expert_width=8, k=2, alpha=3.0)
    x = torch.randn(4000, 8)
    m = reconstruction_metrics(sae, [x], batch_size=8192, dead_window=None, dtype=torch.float32)
    _, expert = sae.route(x)
    want = torch.bincount(expert, minlength=4).double() / len(x)
    assert m["expert_load"] == pytest.approx(want.tolist())
    assert m["expert_entropy"] == pytest.approx(-sum(p * math.log(p) for p in want.tolist() if p > 0))
    assert m["l0"] <= 2
