"""CE loss recovered: splice an SAE's reconstruction into the LM at the harvested site.

For held-out sequences (token ids [S, ctx], the store's own contexts) the LM runs clean, with the
site's activation zero-ablated, and once per SAE with the activation replaced by its reconstruction
(several SAEs on the same store share the clean and zero passes).

    ce_*            mean next-token cross-entropy (nats) over the scored positions
    loss_recovered  (ce_zero - ce_sae) / (ce_zero - ce_clean)   (None if ce_zero == ce_clean)
    delta_ce        ce_sae - ce_clean
    kl              mean KL(clean || patched) of the next-token distributions

Positions are handled like the harvest: positions before the store's `first_pos` (position 0 when
the harvest dropped it) are neither patched nor scored; the predictions made at positions >= first_pos
are scored. Rows above the norm cut (massive activations, left out of training) keep their clean value
in the SAE and in the zero-ablated passes alike, so both replace exactly the same rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from harvest.lm import site_module
from runtime.device import autocast
from train.saes import SAE


CLEAN, ZERO = None, object()  # the two passes without an SAE (never equal to an SAE's name)


class SitePatch:
    """A forward hook on the site's module; `mode` is CLEAN (output unchanged), ZERO, or the name of one
    of `saes` (output replaced by its reconstruction)."""

    def __init__(self, model: nn.Module, layer: int, site: str, saes: dict[str, SAE], first_pos: int,
                 cut: float | None):
        self.module = site_module(model, layer, site)
        self.saes, self.first_pos, self.cut = saes, first_pos, cut
        self.mode: object = CLEAN
        self.replaced = self.kept = 0  # rows of the last patched pass

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple | None:
        if self.mode is CLEAN:
            return None
        h = output[0] if isinstance(output, tuple) else output  # [b, s, d]
        rows = h[:, self.first_pos :].reshape(-1, h.shape[-1]).float()  # [b * (s - first_pos), d]
        keep = (rows.norm(dim=-1) <= self.cut) if self.cut is not None else torch.ones_like(rows[:, 0], dtype=torch.bool)
        new = rows.clone()
        new[keep] = 0.0 if self.mode is ZERO else self.saes[self.mode](rows[keep]).recon.float()
        self.replaced, self.kept = int(keep.sum()), int((~keep).sum())
        patched = h.clone()
        patched[:, self.first_pos :] = new.view(h.shape[0], -1, h.shape[-1]).to(h.dtype)
        return (patched, *output[1:]) if isinstance(output, tuple) else patched


@torch.inference_mode()
def ce_metrics(model: nn.Module, layer: int, site: str, saes: dict[str, SAE], contexts: torch.Tensor,
               first_pos: int, cut: float | None = None, batch_size: int = 8, dtype: torch.dtype = torch.float32,
               progress: bool = False) -> dict[str, dict[str, Any]]:
    """contexts [S, ctx] int token ids -> {name: metrics of the module docstring} for every SAE in `saes`."""
    device = next(model.parameters()).device
    patch = SitePatch(model, layer, site, saes, first_pos, cut)
    handle = patch.module.register_forward_hook(patch)
    modes = [CLEAN, ZERO, *saes]
    ce_sum = dict.fromkeys(modes, 0.0)
    kl_sum = dict.fromkeys(saes, 0.0)
    n = kept = 0
    try:
        for ids in tqdm(contexts.split(batch_size), desc=f"CE loss ({len(modes)} passes)", disable=not progress):
            ids = ids.to(device).long()
            targets = ids[:, first_pos + 1 :, None]  # [b, t, 1], t = ctx - first_pos - 1
            clean = None
            for mode in modes:
                patch.mode = mode
                with autocast(device, dtype):
                    logits = model(input_ids=ids, use_cache=False).logits
                logp = torch.log_softmax(logits[:, first_pos:-1].float(), dim=-1)  # [b, t, V]
                ce_sum[mode] -= logp.gather(-1, targets).sum().item()
                if mode is CLEAN:
                    clean = logp
                elif mode is not ZERO:
                    kl_sum[mode] += (clean.exp() * (clean - logp)).sum().item()
            n += targets.numel()
            kept += patch.kept
    finally:
        handle.remove()
    if n == 0:
        raise ValueError("no positions to score: the contexts are too short")
    ce = {m: s / n for m, s in ce_sum.items()}
    return {name: {"ce_clean": ce[CLEAN], "ce_zero": ce[ZERO], "ce_sae": ce[name],
                   "loss_recovered": (ce[ZERO] - ce[name]) / (ce[ZERO] - ce[CLEAN]) if ce[ZERO] != ce[CLEAN] else None,
                   "delta_ce": ce[name] - ce[CLEAN], "kl": kl_sum[name] / n,
                   "ce_tokens": n, "ce_rows_kept_clean": kept}
            for name in saes}
