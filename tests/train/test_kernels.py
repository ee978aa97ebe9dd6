"""train.saes.kernels: the grouped TopK encoder, with its sparse and its dense backward, equals plain
autograd, values and gradients."""

import pytest
import torch

from train.saes import build
from train.saes.kernels import (decode_rows, grouped_mm, row_dots, runs_sparse, sum_by_latent, token_rows,
                                topk_encode, topk_encode_reference)


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize(("n_experts", "bias"), [(1, True), (1, False), (4, False), (5, True), (7, False)])
def test_fast_encoder_matches_reference(n_experts, bias, sparse):
    torch.manual_seed(0)
    B, d, e, k = 300, 24, 40, 6
    xc = torch.randn(B, d, dtype=torch.float64)
    w = torch.randn(n_experts, e, d, dtype=torch.float64)
    b = torch.randn(n_experts, e, dtype=torch.float64) if bias else None
    # 7 experts: two get no tokens at all (empty groups)
    expert = torch.randint(0, min(n_experts, 5), (B,)) if n_experts > 1 else None
    g_out = torch.randn(B, k, dtype=torch.float64)
    results = []
    for fast in (True, False):
        leaves = [t.clone().requires_grad_() for t in (xc, w) + ((b,) if bias else ())]
        args = (leaves[0], leaves[1], leaves[2] if bias else None, expert, k)
        vals, idx = topk_encode(*args, sparse) if fast else topk_encode_reference(*args)
        # compare per token as sets: sort each row's (idx, vals) by idx
        order = idx.argsort(dim=1)
        (vals * g_out).sum().backward()
        results.append((idx.gather(1, order), vals.gather(1, order), g_out, [t.grad for t in leaves], order))
    (i1, v1, _, g1, _), (i2, v2, _, g2, _) = results
    assert torch.equal(i1, i2)
    torch.testing.assert_close(v1, v2, rtol=1e-12, atol=1e-12)
    for a, c in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("arch", ["topk", "switch"])
@pytest.mark.parametrize("backward", ["sparse", "dense"])
def test_sae_fast_and_reference_paths_agree_in_float32(arch, backward):
    torch.manual_seed(0)
    kwargs = dict(width=64, k=4) if arch == "topk" else dict(n_experts=4, expert_width=16, k=4, alpha=3.0)
    fast = build(arch, d=16, **kwargs)
    fast.kernels = backward
    ref = build(arch, d=16, **kwargs)
    ref.load_state_dict(fast.state_dict())
    ref.kernels = "reference"
    x = torch.randn(256, 16) * 3
    out_f, out_r = fast(x), ref(x)
    torch.testing.assert_close(out_f.recon, out_r.recon, rtol=1e-5, atol=1e-5)
    out_f.losses["loss"].backward()
    out_r.losses["loss"].backward()
    for (name, p), q in zip(fast.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_grouped_mm_both_shapes_with_an_empty_group():
    torch.manual_seed(0)
    a, w = torch.randn(9, 5), torch.randn(3, 5, 4)
    offs = torch.tensor([4, 4, 9], dtype=torch.int32)  # groups rows 0-3, none, 4-8
    out = grouped_mm(a, w, offs)
    torch.testing.assert_close(out, torch.cat([a[:4] @ w[0], a[4:] @ w[2]]))
    g = torch.randn(9, 6)
    wg = grouped_mm(g.T, a, offs)  # per group: g_i^T a_i
    torch.testing.assert_close(wg, torch.stack([g[:4].T @ a[:4], torch.zeros(6, 5), g[4:].T @ a[4:]]))


def test_backward_choice():
    assert runs_sparse("auto", 24576, 32) and not runs_sparse("auto", 384, 32)
    assert runs_sparse("sparse", 8, 4) and not runs_sparse("dense", 24576, 32) and not runs_sparse("reference", 24576, 32)
    with pytest.raises(ValueError, match="choose one of"):
        runs_sparse("fast", 64, 4)


@pytest.mark.parametrize("arch", ["topk", "switch"])
@pytest.mark.parametrize("backward", ["sparse", "dense", "reference"])
def test_bf16_autocast_trains(arch, backward):
    torch.manual_seed(0)
    kwargs = dict(width=64, k=4) if arch == "topk" else dict(n_experts=4, expert_width=16, k=4, alpha=3.0)
    sae = build(arch, d=16, **kwargs)
    sae.kernels = backward
    x = torch.randn(256, 16) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae(x)
    out.losses["loss"].backward()
    assert torch.isfinite(out.losses["loss"]) and all(torch.isfinite(p.grad).all() for p in sae.parameters())
    assert sae.W_enc.grad.abs().sum() > 0


def test_sum_by_latent_is_the_sparse_weight_gradient_with_empty_and_repeated_latents():
    """S^T x for S holding g at (rows, latents): latents that never occur get zero rows, a latent that
    occurs twice in one row counts twice, and rows need not be sorted."""
    torch.manual_seed(0)
    x = torch.randn(7, 5, dtype=torch.float64)
    rows = torch.tensor([3, 0, 3, 6, 2, 3, 0])
    latents = torch.tensor([4, 1, 4, 0, 1, 2, 9])  # 3, 5-8 and 10 never occur; (3, 4) twice
    g = torch.randn(7, dtype=torch.float64)
    s = torch.zeros(7, 11, dtype=torch.float64).index_put_((rows, latents), g, accumulate=True)
    torch.testing.assert_close(sum_by_latent(latents, rows, g, x, 11), s.T @ x)
    none = torch.zeros(0, dtype=torch.long)  # a batch that kept nothing
    assert torch.equal(sum_by_latent(none, none, g[:0], x, 11), torch.zeros(11, 5, dtype=torch.float64))


def test_row_dots_sampled_at_each_rows_entries():
    torch.manual_seed(0)
    w, y = torch.randn(12, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    idx = torch.tensor([[3, 1, 11], [0, 0, 5], [7, 2, 9], [11, 10, 4], [6, 8, 1]])  # unsorted, one repeat
    torch.testing.assert_close(row_dots(idx, w, y), (w[idx] * y[:, None]).sum(-1))
    half = row_dots(idx, w.bfloat16(), y.bfloat16())  # computed in float32
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, (w.bfloat16().float()[idx] * y.bfloat16().float()[:, None]).sum(-1))
    assert torch.equal(token_rows(idx), torch.arange(5).repeat_interleave(3))


def test_decode_rows_gradients_equal_plain_autograd():
    torch.manual_seed(0)
    idx = torch.stack([torch.randperm(20)[:4] for _ in range(30)])  # latents 20-24 never chosen
    vals = torch.randn(30, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(25, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, w: decode_rows(idx, v, w), (vals, w))


@pytest.mark.parametrize("sparse", [True, False])
def test_bf16_kernels_stay_close_to_float32(sparse):
    """Under bf16 autocast both backwards compute in bf16 (the weights cast once in the forward): the
    gradients stay within bf16 rounding of the float32 ones (same routing, same selected latents)."""
    torch.manual_seed(0)
    B, d, n, e, k = 512, 32, 4, 64, 8
    xc, w = torch.randn(B, d), torch.randn(n, e, d) / d**0.5
    expert = torch.randint(0, n, (B,))
    g_latent = torch.randn(n * e)  # the loss's gradient by latent (slots come in no particular order)
    grads = []
    for dtype in (torch.float32, torch.bfloat16):
        leaves = [xc.clone().requires_grad_(), w.clone().requires_grad_()]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            vals, idx = topk_encode(leaves[0], leaves[1], None, expert, k, sparse)
        order = idx.argsort(dim=1)
        (vals * g_latent[idx]).sum().backward()
        grads.append((idx.gather(1, order), vals.gather(1, order) > 0, [t.grad for t in leaves]))
    (i32, on32, g32), (i16, on16, g16) = grads
    same = ((i32 == i16) & (on32 == on16)).all(dim=1)
    # bf16 pre-activations may reorder near-ties or flip a ReLU near 0: compare the tokens where neither happens
    assert same.float().mean() > 0.9
    assert g16[0].dtype == torch.float32 and g16[1].dtype == torch.float32
    torch.testing.assert_close(g16[0][same], g32[0][same], rtol=0.02, atol=0.02)
    rel = (g16[1] - g32[1]).norm() / g32[1].norm()
    assert rel < 0.1  # tokens whose selection differs move whole rows: a loose bound on the total


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the element count of the largest tensor any op produces (a sparse one: its stored values)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() if t.layout == torch.strided else t._nnz())
        return out


@pytest.mark.parametrize("backward", ["sparse", "dense"])
def test_switch_never_materialises_full_width_preactivations(backward):
    """Forward and backward of a training step: no tensor as large as [B, M]; the reference
    algorithm (full-width encoder, then mask) does make one, which shows the check can fail."""
    from bench.train_step import SwitchReference

    B, d, n, e, k = 512, 8, 16, 16, 4  # B x M = 131072; B x e = 8192; parameters N x e x d = 2048
    torch.manual_seed(0)
    x = torch.randn(B, d)
    for cls, mode in ((build, backward), (SwitchReference, "reference")):
        sizes = dict(d=d, n_experts=n, expert_width=e, k=k, alpha=3.0)
        sae = build("switch", **sizes) if cls is build else cls(**sizes)
        sae.kernels = mode
        with LargestTensor() as seen:
            sae(x).losses["loss"].backward()
        if mode == "reference":
            assert seen.largest >= B * n * e
        else:
            assert seen.largest <= B * e
