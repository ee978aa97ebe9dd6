"""train.recipe: geometric median, decoder normalisation and gradient projection, lr schedule."""

import pytest
import torch

from train.recipe import (apply_update, default_lr, geometric_median, lr_factor, make_optimizer, normalize_rows_,
                          project_out_parallel_grad_)
from train.saes import build


def test_geometric_median_matches_a_brute_force_minimiser():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(30, 2, generator=g), torch.randn(5, 2, generator=g) * 10 + 20])  # outliers
    axis = torch.linspace(-3, 3, 601)
    grid = torch.cartesian_prod(axis, axis)  # [601^2, 2], spacing 0.01
    costs = torch.cdist(grid, x).sum(dim=1)
    best = grid[costs.argmin()]
    gm = geometric_median(x)
    assert torch.cdist(gm[None], x).sum() <= costs.min() + 1e-4
    assert (gm - best).norm() < 0.02
    assert (gm - x.mean(0)).norm() > 1  # far from the mean, which the outliers drag away


def test_projection_then_adam_step_then_renormalisation_keeps_unit_rows():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 16, 8))
    normalize_rows_(w.data)
    opt = torch.optim.Adam([w], lr=1e-2)
    for _ in range(5):
        (w * torch.randn_like(w)).sum().backward()
        project_out_parallel_grad_(w)
        assert (w.grad * w).sum(-1).abs().max() < 1e-6  # no component along the rows is left
        opt.step()
        opt.zero_grad()
        normalize_rows_(w.data)
        torch.testing.assert_close(w.norm(dim=-1), torch.ones(3, 16))


def test_lr_defaults_and_schedule():
    assert default_lr(24576) == pytest.approx(1.633e-4, rel=1e-3)
    assert default_lr(196608) == pytest.approx(5.77e-5, rel=1e-3)
    assert [lr_factor(s, 100, 0.2) for s in (0, 79, 80, 90, 99, 100)] == [1.0, 1.0, 1.0, 0.5, pytest.approx(0.05), 0.0]


@pytest.mark.parametrize("fused", [True, False])
def test_apply_update_equals_the_textbook_step(fused):
    """Projection, clip to the global norm, Adam, renormalisation, spelled out with torch's own
    clip_grad_norm_ and a plain Adam; the fused path folds the clip into Adam's grad_scale."""
    torch.manual_seed(0)
    ours, ref = build("topk", d=8, width=32, k=4), build("topk", d=8, width=32, k=4)
    ref.load_state_dict(ours.state_dict())
    opt = make_optimizer(list(ours.parameters()), 1e-2, (0.9, 0.999), fused=fused)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2, foreach=False)
    for step in range(4):
        x = torch.randn(64, 8) * (3 if step % 2 else 0.01)  # clipped on odd steps only
        for sae, o in ((ours, opt), (ref, opt_ref)):
            o.zero_grad()
            sae(x).losses["loss"].backward()
        apply_update(ours, opt, list(ours.parameters()), grad_clip=1.0)
        project_out_parallel_grad_(ref.W_dec)
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        assert (norm > 1.0) == bool(step % 2)
        opt_ref.step()
        normalize_rows_(ref.W_dec.data)
        for (name, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert not hasattr(opt, "grad_scale")
