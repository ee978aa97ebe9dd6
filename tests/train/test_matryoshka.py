"""Matryoshka BatchTopK (train/saes/matryoshka.py) and Matryoshka Switch (train/saes/matryoshka_switch.py):
the prefix losses by hand, the fast paths against plain autograd (loss and gradients), no [B, M] tensor
for the routed one, training on a known dictionary, and bad values in one line."""

from __future__ import annotations

import pytest
import torch

from tests.train.test_kernels import LargestTensor
from tests.train.test_loop import fve, make_cfg, synthetic_store
from train.config import TrainError
from train.loop import train
from train.saes import build
from train.saes.matryoshka import prefix_widths


def _x(b=64, d=8, seed=0):
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed)) * 3 + 1


def test_prefix_losses_by_hand():
    """d 2, four latents e1, e2, -e1, -e2 (encoder = decoder), prefixes of 1, 2 and 4 latents, k 2 over 2 tokens.
    x_0 = (3, 1): pre (3, 1, -3, -1); x_1 = (-2, 0.5): pre (-2, 0.5, 2, -0.5). The batch's 4 largest: 3 and 1
    of token 0 (latents 0, 1), 2 and 0.5 of token 1 (latents 2, 1).
      prefix 1 (latent 0):    token 0 -> (3, 0), error 1;    token 1 -> (0, 0), error 4.25   mean 2.625
      prefix 2 (latents 0-1): token 0 -> (3, 1), error 0;    token 1 -> (0, .5), error 4     mean 2
      all 4:                  token 0 exact;                  token 1 -> (-2, .5), exact     mean 0"""
    sae = build("matryoshka", d=2, width=4, k=2, prefixes=[0.25, 0.5])
    assert sae.widths == [1, 2, 4]
    rows = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1]])
    with torch.no_grad():
        sae.W_enc.copy_(rows)
        sae.W_dec.copy_(rows)
    out = sae(torch.tensor([[3.0, 1], [-2, 0.5]]))
    torch.testing.assert_close(out.losses["loss"], torch.tensor((2.625 + 2 + 0) / 3))
    torch.testing.assert_close(out.losses["prefix_mse"], torch.tensor((2.625 + 2) / 2))
    torch.testing.assert_close(out.losses["mse"], torch.tensor(0.0))


def matryoshka_reference(sae, x: torch.Tensor) -> torch.Tensor:
    """The Matryoshka BatchTopK loss by plain autograd: dense pre-activations, the batch's B k largest kept
    (ReLU), and each prefix decoded by a dense matmul of its first m_g latents."""
    pre = (x - sae.b_pre) @ sae.W_enc.T + sae.b_enc
    vals, flat = pre.view(-1).topk(len(x) * sae.k)
    z = torch.zeros_like(pre).view(-1).scatter(0, flat, vals.relu()).view_as(pre)
    errors = [((x - (z[:, :m] @ sae.W_dec[:m] + sae.b_pre)) ** 2).sum(-1).mean() for m in sae.widths]
    return torch.stack(errors).mean()


def matryoshka_switch_reference(sae, x: torch.Tensor) -> torch.Tensor:
    """The Matryoshka Switch loss by plain autograd: the Switch's reference codes (tested against eq. 3-4)
    scattered into a dense [B, N e] code, each prefix decoded by a dense matmul of its latents, plus the
    Switch's balancing term."""
    kernels, sae.kernels = sae.kernels, "reference"
    try:
        codes = sae.encode(x)
    finally:
        sae.kernels = kernels
    z = torch.zeros(len(x), sae.n_routed).scatter(1, codes.idx, codes.vals)
    position = torch.arange(sae.n_routed) % sae.expert_width if sae.nesting == "expert" else torch.arange(sae.n_routed)
    w = sae.W_dec.reshape(-1, sae.d)
    errors = [((x - ((z * (position < m)) @ w + sae.b_pre)) ** 2).sum(-1).mean() for m in sae.widths]
    aux, _ = sae.balance(codes.expert if sae.active_experts == 1 else sae.route(x)[1], codes.probs)
    return torch.stack(errors).mean() + sae.alpha * sae.d * aux


def _same_loss_and_gradients(sae, x, reference):
    out = sae(x)
    expected = reference(sae, x)
    torch.testing.assert_close(out.losses["loss"], expected, rtol=1e-5, atol=1e-5)
    params = [p for p in sae.parameters()]
    fast = torch.autograd.grad(out.losses["loss"], params)
    slow = torch.autograd.grad(expected, params)
    for (name, _), a, b in zip(sae.named_parameters(), fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("kernels", ["reference", "sparse", "dense"])
def test_matryoshka_fast_path_equals_plain_autograd(kernels):
    torch.manual_seed(0)
    sae = build("matryoshka", d=8, width=64, k=4, prefixes=[0.0625, 0.25, 0.5])
    sae.kernels = kernels
    with torch.no_grad():
        sae.b_pre.normal_()
        sae.b_enc.normal_(0, 0.1)
    _same_loss_and_gradients(sae, _x(), matryoshka_reference)


@pytest.mark.parametrize("kernels", ["reference", "sparse", "dense"])
@pytest.mark.parametrize("variant", [dict(nesting="expert"), dict(nesting="dictionary"),
                                     dict(nesting="expert", active_experts=2, routing="global", k=6),
                                     dict(nesting="dictionary", active_experts=2)])
def test_matryoshka_switch_fast_path_equals_plain_autograd(kernels, variant):
    torch.manual_seed(0)
    sae = build("matryoshka_switch", d=8, n_experts=4, expert_width=16, alpha=1.0, prefixes=[0.25, 0.5],
                **{"k": 4, **variant})
    sae.kernels = kernels
    with torch.no_grad():
        sae.b_pre.normal_()
        sae.W_router.normal_()
    _same_loss_and_gradients(sae, _x(), matryoshka_switch_reference)


def test_the_two_nestings_group_latents_as_documented():
    expert = build("matryoshka_switch", d=4, n_experts=2, expert_width=8, k=2, prefixes=[0.25, 0.5])
    across = build("matryoshka_switch", d=4, n_experts=2, expert_width=8, k=2, prefixes=[0.25, 0.5],
                   nesting="dictionary")
    latents = torch.arange(16)
    # inside each expert: widths 2, 4, 8 of every expert
    assert expert.groups(latents).tolist() == [0, 0, 1, 1, 2, 2, 2, 2] * 2
    # across the routed dictionary: widths 4, 8, 16, so expert 1's latents are all in the last group
    assert across.groups(latents).tolist() == [0] * 4 + [1] * 4 + [2] * 8


def test_a_matryoshka_switch_never_makes_a_tensor_as_large_as_b_by_m():
    B, d, n, e = 512, 8, 16, 16
    sae = build("matryoshka_switch", d=d, n_experts=n, expert_width=e, k=4)
    with LargestTensor() as seen:
        sae(torch.randn(B, d)).losses["loss"].backward()
    assert seen.largest < B * n * e // 4


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthetic_store(tmp_path_factory.mktemp("matryoshka") / "s")


# Measured here at 800 steps (FVE on held-out rows): BatchTopK width 64 0.95, Matryoshka width 64 0.89, width
# 128 0.94; Switch N 4 width 64 0.95, Matryoshka Switch width 64 0.74, width 128 0.87 (the prefix losses
# cost reconstruction at a fixed width: every token's first latents must reconstruct on their own).
@pytest.mark.parametrize("model", [["model=matryoshka", "model.prefixes=[0.125,0.5]"],
                                   ["model=matryoshka_switch", "model.n_experts=4"]])
def test_each_learns_the_known_sparse_dictionary(store, tmp_path, model):
    cfg = make_cfg(store, *model, "model.width=128", "model.k=4", "budget=steps:800")
    assert fve(store, train(cfg, tmp_path / "run")) > 0.85


def test_prefix_widths():
    assert prefix_widths([0.03125, 0.09375, 0.21875, 0.46875], 24576) == [768, 2304, 5376, 11520, 24576]
    with pytest.raises(ValueError, match="strictly increasing"):
        prefix_widths([0.5, 0.25], 64)


@pytest.mark.parametrize(("extra", "message"), [
    (["model=matryoshka", "model.width=64", "model.prefixes=[0.5,0.25]"],
     r"model.prefixes=\[0.5, 0.25\] must be strictly increasing"),
    (["model=matryoshka", "model.width=64", "model.prefixes=[0.5,1.5]"],
     "model.prefixes must be a non-empty list of fractions in \\(0, 1\\), got \\[0.5, 1.5\\]"),
    (["model=matryoshka", "model.width=64", "model.prefixes=[0.001,0.5]"],
     r"give prefix widths \[0, 32, 64\], which must be at least 1 and strictly increasing"),
    (["model=matryoshka", "model.width=64", "model.prefixes=[]"], "model.prefixes must be a non-empty list"),
    (["model=matryoshka_switch", "model.width=64", "model.n_experts=4", "model.prefixes=[0.5,0.51]"],
     r"of an expert's width 16 give prefix widths \[8, 8, 16\]"),
    (["model=matryoshka_switch", "model.width=64", "model.n_experts=4", "model.nesting=tree"],
     "model.nesting must be one of expert, dictionary, got 'tree'"),
    (["model=matryoshka_switch", "model.width=64", "model.n_experts=4", "model.active_experts=5"],
     "model.active_experts=5 is more than model.n_experts=4"),
    (["model=matryoshka_switch", "model.width=64", "model.n_experts=4", "model.shared_width=8", "model.shared_k=1"],
     "model.shared_width must be 0 for a Matryoshka Switch"),
    (["model=matryoshka_switch", "model.width=64", "model.n_experts=4", "expert_parallel=2"],
     "expert_parallel runs the paper's Switch only, not model=matryoshka_switch"),
])
def test_bad_values_fail_in_one_line_before_any_work(store, extra, message):
    with pytest.raises(TrainError, match=message) as e:
        make_cfg(store, "model.k=4", *extra)
    assert "\n" not in str(e.value)
