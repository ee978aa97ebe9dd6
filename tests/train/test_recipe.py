"""train.recipe: geometric median, decoder normalisation and gradient projection, lr schedule."""

import pytest
import torch

from train.recipe import default_lr, geometric_median, lr_factor, normalize_rows_, project_out_parallel_grad_


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
    assert [lr_factor(s, 100) for s in (0, 79, 80, 90, 99, 100)] == [1.0, 1.0, 1.0, 0.5, pytest.approx(0.05), 0.0]
