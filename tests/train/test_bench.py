"""bench.train_step and bench.dist: the reference algorithm it times computes exactly what our Switch SAE computes."""

import json

import torch

from bench.train_step import SwitchReference, bound
from train.saes.switch import SwitchSAE


def test_reference_full_width_switch_equals_ours():
    torch.manual_seed(0)
    ours = SwitchSAE(d=16, n_experts=4, expert_width=8, k=3, alpha=3.0)
    ref = SwitchReference(d=16, n_experts=4, expert_width=8, k=3, alpha=3.0)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(200, 16)
    a, b = ours(x), ref(x)
    torch.testing.assert_close(a.recon, b.recon)
    torch.testing.assert_close(a.losses["loss"], b.losses["loss"])
    a.losses["loss"].backward()
    b.losses["loss"].backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_bound_grows_with_flops_and_is_at_least_the_memory_bound_updates():
    sae = SwitchSAE(d=16, n_experts=4, expert_width=8, k=3, alpha=3.0)
    params = sum(p.numel() for p in sae.parameters())
    low, high = bound(sae, 1e3, 512, peak=100.0, bw=10.0), bound(sae, 1e9, 512, peak=100.0, bw=10.0)
    assert high > low >= (32 * params + 16 * 512) / 10e9


def test_bench_dist_measures_the_exchange_at_its_minimum(tmp_path):
    """make bench-dist on a tiny shape: every entry timed, and the expert-parallel exchange moves exactly
    the minimum each way (x out, E(x) back, for the tokens whose expert is on the other rank), plus
    forward the per-expert token counts (int64, the other rank's N/2 experts, from each rank)."""
    from bench.dist import main

    out = tmp_path / "dist.json"
    main(["--d", "16", "--n-experts", "4", "--expert-width", "8", "--k", "2", "--batch", "64", "--steps", "2",
          "--out", str(out)])
    result = json.loads(out.read_text())
    one, ep, dp = result["entries"]
    assert [e["entry"] for e in result["entries"]] == ["one process", "expert parallel", "data parallel"]
    assert all(e["step_s"] > 0 and e["tokens_per_s"] == 64 / e["step_s"] for e in result["entries"])
    assert 0 < ep["local_tokens"] < 64
    assert ep["min_bytes_each_way"] == 2 * (64 - ep["local_tokens"]) * 16 * 4
    assert ep["forward_bytes"] == ep["min_bytes_each_way"] + 2 * 2 * 8
    assert ep["backward_bytes"] == ep["min_bytes_each_way"]
