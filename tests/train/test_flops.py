"""train.saes.flops: every formula checked against torch's FlopCounterMode on the real modules.

Small CPU shapes (d=16, M=64, N=4, k=4, B=32, float32); counts are compared exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from train.saes import SAE, build
from train.saes.flops import Cost, algorithmic_cost, cost, counter_mapping, sae_cost

D, M, N, K, B = 16, 64, 4, 4, 32
E = M // N
KWARGS = {
    "topk": dict(width=M, k=K),
    "switch": dict(n_experts=N, expert_width=E, k=K),
    "relu": dict(width=M),
    "gated": dict(width=M),
    "batchtopk": dict(width=M, k=K),
    "jumprelu": dict(width=M),
    "matryoshka": dict(width=M, k=K),
    "matryoshka_switch": dict(n_experts=N, expert_width=E, k=K),
}
ARCHS = list(KWARGS)
# the constructor arguments that do not change the cost (conf/train/model/*.yaml's values)
TRAINING = {"switch": dict(alpha=3.0), "relu": dict(l1_coeff=5.0, warmup_frac=0.05), "gated": dict(l1_coeff=1.0),
            "batchtopk": dict(theta_decay=0.99), "matryoshka": dict(theta_decay=0.99, prefixes=[0.125, 0.5]),
            "matryoshka_switch": dict(alpha=3.0, prefixes=[0.25, 0.5]),
            "jumprelu": dict(l0_coeff=0.003, warmup_frac=0.05, bandwidth=0.01, threshold_init=0.03)}


def counted(fn: Callable[[], object]) -> int:
    """Total FLOPs FlopCounterMode sees while fn runs (taught the embedding-bag ops of the decoder)."""
    with FlopCounterMode(display=False, custom_mapping=counter_mapping()) as counter:
        fn()
    return counter.get_total_flops()


def make(arch: str, **override) -> tuple[SAE, torch.Tensor]:
    """The real module with every bias made non-zero (so gradients through them are exercised), and x."""
    torch.manual_seed(0)
    sae = build(arch, d=D, **{**KWARGS[arch], **TRAINING.get(arch, {}), **override})
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name.startswith("b_") or name == "r_mag":
                p.copy_(0.1 * torch.randn_like(p))
    return sae, torch.randn(B, D)


def train_step(sae: SAE, x: torch.Tensor) -> None:
    sae(x).losses["loss"].backward()


@pytest.mark.parametrize("arch", ARCHS)
def test_params_equal_module_numel(arch):
    sae, _ = make(arch)
    n = sum(p.numel() for p in sae.parameters())
    assert sae_cost(sae).params == n
    assert cost(arch, D, **KWARGS[arch]).params == n


def test_params_closed_forms():
    assert cost("topk", D, width=M, k=K).params == 2 * M * D + M + D
    assert cost("relu", D, width=M).params == 2 * M * D + M + D
    assert cost("gated", D, width=M).params == 2 * M * D + 3 * M + D
    assert cost("jumprelu", D, width=M).params == 2 * M * D + 2 * M + D
    assert cost("switch", D, n_experts=N, expert_width=E, k=K).params == 2 * M * D + N * D + 2 * D


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_matches_flop_counter(arch):
    sae, x = make(arch)
    c = sae_cost(sae)
    with torch.no_grad():
        assert counted(lambda: sae.decode(sae.encode(x))) == B * c.forward
        module_forward = counted(lambda: sae(x))
    # sae(x) also computes the losses; only gated's has a matmul: the auxiliary reconstruction
    # through the detached decoder, 2dM, which is training work, not inference
    aux = 2 * D * M if arch == "gated" else 0
    assert module_forward == B * (c.forward + aux)


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_train_matches_flop_counter(arch):
    """The plain autograd path (the reference path for topk and switch)."""
    sae, x = make(arch)
    sae.kernels = "reference"
    assert not sae.sparse_backward
    assert counted(lambda: train_step(sae, x)) == B * sae_cost(sae).train == B * sae_cost(sae, False).train
    assert all(p.grad is not None for p in sae.parameters())


@pytest.mark.parametrize("arch", ["topk", "switch", "batchtopk", "matryoshka", "matryoshka_switch"])
@pytest.mark.parametrize("backward", ["sparse", "dense"])
def test_the_fast_paths_run_their_counts(arch, backward):
    """train.saes.kernels: embedding bag + sparse matmul, or grouped matmuls (the dense count)."""
    sae, x = make(arch)
    sae.kernels = backward
    assert sae.sparse_backward == (backward == "sparse")
    assert sae.dense_decoder == (arch == "switch" and backward == "dense")
    expected = cost(arch, D, **KWARGS[arch], sparse_backward=backward == "sparse", dense_decoder=sae.dense_decoder)
    assert counted(lambda: train_step(sae, x)) == B * sae_cost(sae).train == B * expected.train
    with torch.no_grad():
        assert counted(lambda: sae.decode(sae.encode(x))) == B * expected.forward


def test_dense_decoder_and_algorithmic_counts():
    e, dense = E, cost("switch", D, **KWARGS["switch"], dense_decoder=True)
    assert dense.forward == 2 * D * N + 4 * D * e
    assert dense.train == 6 * D * N + 12 * D * e  # decoder 2de + 4de, encoder 2de + 4de
    with pytest.raises(ValueError, match="switch only"):
        cost("topk", D, width=M, k=K, dense_decoder=True)
    for arch in ARCHS:
        sae, _ = make(arch)
        sae.kernels = "dense"
        assert algorithmic_cost(sae) == cost(arch, D, **KWARGS[arch], sparse_backward=type(sae).sparse_codes)


def test_closed_forms_of_the_small_shapes():
    """The table in the module docstring, spelled out (FLOPs per token)."""
    assert cost("topk", D, width=M, k=K) == Cost(2 * M * D + M + D, 2 * D * M + 2 * K * D, 6 * D * M + 6 * K * D)
    assert cost("switch", D, **KWARGS["switch"]).forward == 2 * D * N + 2 * D * E + 2 * K * D
    assert cost("switch", D, **KWARGS["switch"]).train == 6 * D * N + 6 * D * E + 6 * K * D
    assert cost("relu", D, width=M).forward == 4 * D * M
    assert cost("relu", D, width=M).train == 10 * D * M  # no input-gradient matmul: x has no trained bias
    assert cost("gated", D, width=M).forward == 4 * D * M
    assert cost("gated", D, width=M).train == 16 * D * M
    assert cost("jumprelu", D, width=M).forward == 4 * D * M
    assert cost("jumprelu", D, width=M).train == 10 * D * M  # as relu: no input gradient, elementwise thresholds
    assert cost("topk", D, width=M, k=K, sparse_backward=True).train == 2 * D * M + 10 * K * D
    assert cost("switch", D, **KWARGS["switch"], sparse_backward=True).train == 6 * D * N + 2 * D * E + 10 * K * D


def test_switch_batch_uses_several_experts():
    """The counts above go through the per-expert loop, not a single expert."""
    sae, x = make("switch")
    with torch.no_grad():
        experts = sae(x).codes.expert
    assert len(experts.unique()) >= 2


def test_switch_count_is_independent_of_routing():
    """All tokens on one expert (a zero router ties, argmax picks expert 0): still B * 2de."""
    sae, x = make("switch")
    with torch.no_grad():
        sae.W_router.zero_()
        assert (sae(x).codes.expert == 0).all()
    c = sae_cost(sae)
    with torch.no_grad():
        assert counted(lambda: sae(x)) == B * c.forward
    assert counted(lambda: train_step(sae, x)) == B * c.train


def test_switch_flops_matched_width():
    """model.match=flops: every expert has the full width e = M (so M_total = N * M)."""
    sae, x = make("switch", expert_width=M)
    sae.kernels = "sparse"  # the embedding-bag decoder, as topk's
    c = sae_cost(sae)
    assert c.forward == cost("topk", D, width=M, k=K).forward + 2 * D * N  # + the router
    with torch.no_grad():
        assert counted(lambda: sae(x)) == B * c.forward
    assert counted(lambda: train_step(sae, x)) == B * c.train
    assert c.params == sum(p.numel() for p in sae.parameters())


def autograd_grads(sae: SAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    sae.zero_grad()
    train_step(sae, x)
    return {name: p.grad.clone() for name, p in sae.named_parameters()}


def sparse_decoder_and_encoder_backward(sae, x, out, w_enc, w_dec, gate=None):
    """Explicit sparse backward of the TopK decoder and encoder (4 bmm's of k rows per token).

    Returns (grad of vals [B, k], grads of W_enc, W_dec as [rows, d], grad of the k active
    pre-activations [B, k], grad of x - b_pre [B, d], grad of the reconstruction [B, d])."""
    idx, vals = out.codes.idx, out.codes.vals
    g = 2 * (out.recon - x) / len(x)  # d mse / d recon
    g_vals = torch.bmm(w_dec[idx], g[:, :, None]).squeeze(-1)  # [B,k,d]x[B,d,1]: 2kd
    g_dec_rows = torch.bmm(vals[:, :, None], g[:, None, :])  # [B,k,1]x[B,1,d]: 2kd
    v = vals if gate is None else vals / gate  # switch: vals carry the gate p_i*
    g_pre = (g_vals if gate is None else g_vals * gate) * (v > 0)  # ReLU of the top-k values
    g_enc_rows = torch.bmm(g_pre[:, :, None], (x - sae.b_pre)[:, None, :])  # [B,k,1]x[B,1,d]: 2kd
    g_xc = torch.bmm(g_pre[:, None, :], w_enc[idx]).squeeze(1)  # [B,1,k]x[B,k,d]: 2kd
    flat = idx.flatten()
    grad_w_enc = torch.zeros_like(w_enc).index_add_(0, flat, g_enc_rows.reshape(-1, sae.d))
    grad_w_dec = torch.zeros_like(w_dec).index_add_(0, flat, g_dec_rows.reshape(-1, sae.d))
    return g_vals, grad_w_enc, grad_w_dec, g_pre, g_xc, g


def test_topk_sparse_backward_matches_flop_counter_and_autograd():
    sae, x = make("topk")
    c = cost("topk", D, width=M, k=K, sparse_backward=True)
    assert c.forward == sae_cost(sae).forward  # the forward is the same dense encoder
    result = {}

    def step():
        with torch.no_grad():
            out = sae(x)
            _, gw_enc, gw_dec, g_pre, g_xc, g = sparse_decoder_and_encoder_backward(sae, x, out, sae.W_enc, sae.W_dec)
            result.update(W_enc=gw_enc, W_dec=gw_dec, b_pre=g.sum(0) - g_xc.sum(0),
                          b_enc=torch.zeros(M).index_add_(0, out.codes.idx.flatten(), g_pre.flatten()))

    check_sparse_step(step, result, sae, x, c)


def check_sparse_step(step: Callable[[], None], result: dict, sae: SAE, x: torch.Tensor, c: Cost) -> None:
    """The explicit sparse step costs exactly the formula (less than the dense backward) and its
    gradients, written into `result` by step(), are autograd's."""
    assert counted(step) == B * c.train
    assert counted(step) < B * sae_cost(sae, sparse_backward=False).train
    ref = autograd_grads(sae, x)
    assert set(result) == set(ref)
    for name, grad in result.items():
        torch.testing.assert_close(grad, ref[name], msg=name)


def test_switch_sparse_backward_matches_flop_counter_and_autograd():
    sae, x = make("switch")
    sae.kernels = "sparse"
    c = cost("switch", D, **KWARGS["switch"], sparse_backward=True)
    assert c.forward == sae_cost(sae).forward
    result = {}

    def step():
        with torch.no_grad():
            out = sae(x)
            codes = out.codes
            w_enc, w_dec = sae.W_enc.view(-1, D), sae.W_dec.view(-1, D)
            gate = codes.probs.gather(1, codes.expert[:, None])  # [B, 1]
            g_vals, gw_enc, gw_dec, _, g_xc, g = sparse_decoder_and_encoder_backward(sae, x, out, w_enc, w_dec, gate)
            # router: the gate p_i* (through the values) and the load-balancing loss
            g_probs = torch.zeros(B, N).scatter_(1, codes.expert[:, None], (g_vals * codes.vals / gate).sum(-1, True))
            g_probs += sae.alpha * D * N * out.stats["expert_load"] / B
            g_logits = codes.probs * (g_probs - (g_probs * codes.probs).sum(-1, keepdim=True))  # softmax backward
            g_w_router = g_logits.T @ (x - sae.b_router)  # [N,B]x[B,d]: 2dN
            g_xr = g_logits @ sae.W_router  # [B,N]x[N,d]: 2dN
            result.update(W_enc=gw_enc.view_as(sae.W_enc), W_dec=gw_dec.view_as(sae.W_dec), W_router=g_w_router,
                          b_router=-g_xr.sum(0), b_pre=g.sum(0) - g_xc.sum(0))

    check_sparse_step(step, result, sae, x, c)


def test_paper_scale_switch_vs_topk():
    """GPT-2 small scale: d=768, M=24576, k=32, N=16, width-matched (e = M/N = 1536)."""
    d, m, k, n = 768, 24576, 32, 16
    topk = cost("topk", d, width=m, k=k)
    switch = cost("switch", d, n_experts=n, expert_width=m // n, k=k)
    assert topk == Cost(params=37_774_080, forward=37_797_888.0, train=113_393_664.0)
    assert switch == Cost(params=37_762_560, forward=2_433_024.0, train=7_299_072.0)
    # the sketch 2dM / (2dN + 2dM/N) plus the decoder 2kd both pay
    assert topk.forward / switch.forward == (2 * d * m + 2 * k * d) / (2 * d * n + 2 * d * m // n + 2 * k * d)
    assert round(topk.forward / switch.forward, 3) == 15.535
    assert cost("topk", d, width=m, k=k, sparse_backward=True).train == 37_994_496.0
    assert cost("switch", d, n_experts=n, expert_width=m // n, k=k, sparse_backward=True).train == 2_678_784.0


@pytest.mark.parametrize("arch, kwargs, match", [
    ("mlp", dict(width=M), "unknown SAE architecture"),
    ("topk", dict(width=M), "needs k"),
    ("topk", dict(k=K), "needs width"),
    ("switch", dict(n_experts=N, k=K), "needs expert_width"),
    ("switch", dict(width=M, n_experts=N, expert_width=E, k=K), "not width"),
    ("relu", dict(width=M, k=K), "not k"),
    ("gated", dict(), "needs width"),
    ("topk", dict(width=M, k=M + 1), "at most"),
    ("switch", dict(n_experts=N, expert_width=E, k=E + 1), "larger than an expert.s width"),
    ("topk", dict(width=M, k=0), "positive integer"),
    ("relu", dict(width=-1), "positive integer"),
    ("relu", dict(width=64.0), "positive integer"),
    ("relu", dict(width=True), "positive integer"),
    ("batchtopk", dict(width=M, k=M + 1), "at most"),
    ("batchtopk", dict(width=M, k=0), "positive integer"),
    ("relu", dict(width=M, sparse_backward=True), "applies to topk, switch, batchtopk, matryoshka and matryoshka_switch only; relu has dense codes"),
    ("gated", dict(width=M, sparse_backward=True), "matryoshka_switch only; gated has dense"),
    ("jumprelu", dict(width=M, sparse_backward=True), "and matryoshka_switch only; jumprelu has dense codes"),
    ("jumprelu", dict(width=M, dense_decoder=True), "switch only, not jumprelu"),
])
def test_bad_arguments(arch, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cost(arch, D, **kwargs)


def test_bad_d_and_bad_sae():
    with pytest.raises(ValueError, match="d must be"):
        cost("relu", 0, width=M)
    sae, _ = make("relu")
    with pytest.raises(ValueError, match="topk, switch, batchtopk, matryoshka and matryoshka_switch only"):
        sae_cost(sae, sparse_backward=True)

    class Other(torch.nn.Module):
        arch = "mlp"

    with pytest.raises(ValueError, match="unknown SAE architecture"):
        sae_cost(Other())


def test_a_size_may_be_a_list(monkeypatch):
    """An architecture whose size is a list (nested prefix widths, say) is counted: each entry checked as
    a positive integer, the list handed to its formula as a tuple."""
    from train.saes import REGISTRY
    from train.saes.base import SAE

    class Nested(SAE):
        arch, display_name, size_args = "nested", "Nested", ("widths",)

        @classmethod
        def cost_formula(cls, d, *, widths, sparse_backward=False, dense_decoder=False):
            assert isinstance(widths, tuple)
            return Cost(params=2 * widths[-1] * d, forward=float(sum(2 * d * w for w in widths)), train=0.0)

    monkeypatch.setitem(REGISTRY, "nested", Nested)
    assert cost("nested", 16, widths=[8, 32]).forward == 2 * 16 * 40
    for bad, where in (([], "widths must be a positive integer or a non-empty list"), ([8, 0], "widths\\[1\\]"),
                       ([8, 2.5], "widths\\[1\\]")):
        with pytest.raises(ValueError, match=where):
            cost("nested", 16, widths=bad)
