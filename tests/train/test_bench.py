"""train.bench: the reference algorithm it times computes exactly what our Switch SAE computes."""

import torch

from train.bench import SwitchReference, bound
from train.saes.switch import SwitchSAE


def test_reference_full_width_switch_equals_ours():
    torch.manual_seed(0)
    ours = SwitchSAE(d=16, n_experts=4, expert_width=8, k=3)
    ref = SwitchReference(d=16, n_experts=4, expert_width=8, k=3)
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
    sae = SwitchSAE(d=16, n_experts=4, expert_width=8, k=3)
    params = sum(p.numel() for p in sae.parameters())
    low, high = bound(sae, 1e3, 512, peak=100.0, bw=10.0), bound(sae, 1e9, 512, peak=100.0, bw=10.0)
    assert high > low >= (32 * params + 16 * 512) / 10e9
