"""CE loss recovered: splice an SAE's reconstruction into the LM at the harvested site.

For held-out sequences (token ids [S, ctx], the store's own contexts) the LM runs clean, with the
site's activation zero-ablated, and once per SAE with the activation replaced by its reconstruction
(several SAEs on the same store share the clean and zero passes). A transcoder's site is its target
(mlp_out), replaced by its output for its source's activation (mlp_in) in the same pass; zero-ablating
the target is its baseline.

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

from harvest.lm import reads_input, site_module
from runtime.device import autocast
from train.saes import SAE


CLEAN, ZERO = None, object()  # the two passes without an SAE (never equal to an SAE's name)


class SitePatch:
    """Hooks on the site's module; `mode` is CLEAN (activation unchanged), ZERO, or the name of one of
    `saes` (activation replaced by its reconstruction). A site that is its module's input (mlp_in) is
    replaced before the module runs (a pre-hook), any other after (a forward hook).

    With `source` (a transcoder's input site, of the same block) the replacement is the SAE's output for
    the source's activation of the same tokens, captured by a hook on the source's module as the pass goes
    by (a transcoder on mlp_in -> mlp_out replaces the MLP's output by its output for the MLP's input).
    Rows kept clean: those whose norm (with a source, of the source's and the site's rows side by side,
    as the paired store cuts them) is above the cut."""

    def __init__(self, model: nn.Module, layer: int, site: str, saes: dict[str, SAE], first_pos: int,
                 cut: float | None, source: str | None = None):
        self.module, self.pre = site_module(model, layer, site), reads_input(site)
        self.saes, self.first_pos, self.cut = saes, first_pos, cut
        self.source = None if source is None else (site_module(model, layer, source), reads_input(source))
        self.captured: torch.Tensor | None = None  # the source's activation of the current pass
        self.mode: object = CLEAN
        self.replaced = self.kept = 0  # rows of the last patched pass

    def register(self) -> list[torch.utils.hooks.RemovableHandle]:
        """The hooks, the source's capture first (it runs before the patch when both sit on one module)."""
        handles = []
        if self.source is not None:
            module, pre = self.source
            handles.append(module.register_forward_pre_hook(self._capture_input) if pre else
                           module.register_forward_hook(self._capture_output))
        handles.append(self.module.register_forward_pre_hook(self._patch_input) if self.pre else
                       self.module.register_forward_hook(self._patch_output))
        return handles

    def _capture_input(self, module: nn.Module, args: tuple) -> None:
        self.captured = args[0]

    def _capture_output(self, module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
        self.captured = output[0] if isinstance(output, tuple) else output

    def _patch_input(self, module: nn.Module, args: tuple) -> tuple | None:
        if self.mode is CLEAN:
            return None
        return (self.patched(args[0]), *args[1:])

    def _patch_output(self, module: nn.Module, args: tuple, output: torch.Tensor | tuple
                      ) -> torch.Tensor | tuple | None:
        if self.mode is CLEAN:
            return None
        h = self.patched(output[0] if isinstance(output, tuple) else output)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    def patched(self, h: torch.Tensor) -> torch.Tensor:
        """The site's activation h [b, s, d] with rows from first_pos on replaced (zeros or the SAE's)."""
        d = h.shape[-1]
        rows = h[:, self.first_pos :].reshape(-1, d).float()  # [b * (s - first_pos), d]
        inputs = rows if self.source is None else \
            self.captured[:, self.first_pos :].reshape(-1, self.captured.shape[-1]).float()
        paired = rows if self.source is None else torch.cat([inputs, rows], dim=1)
        keep = (paired.norm(dim=-1) <= self.cut) if self.cut is not None else \
            torch.ones_like(rows[:, 0], dtype=torch.bool)
        new = rows.clone()
        new[keep] = 0.0 if self.mode is ZERO else self.saes[self.mode].reconstruct(inputs[keep])[1].float()
        self.replaced, self.kept = int(keep.sum()), int((~keep).sum())
        patched = h.clone()
        patched[:, self.first_pos :] = new.view(h.shape[0], -1, d).to(h.dtype)
        return patched


@torch.inference_mode()
def ce_metrics(model: nn.Module, layer: int, site: str, saes: dict[str, SAE], contexts: torch.Tensor,
               first_pos: int, cut: float | None = None, batch_size: int = 8, dtype: torch.dtype = torch.float32,
               progress: bool = False, source: str | None = None) -> dict[str, dict[str, Any]]:
    """contexts [S, ctx] int token ids -> {name: metrics of the module docstring} for every SAE in `saes`
    (transcoders from `source` to `site` when source is given; SitePatch)."""
    device = next(model.parameters()).device
    patch = SitePatch(model, layer, site, saes, first_pos, cut, source)
    handles = patch.register()
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
        for handle in handles:
            handle.remove()
    if n == 0:
        raise ValueError("no positions to score: the contexts are too short")
    ce = {m: s / n for m, s in ce_sum.items()}
    return {name: {"ce_clean": ce[CLEAN], "ce_zero": ce[ZERO], "ce_sae": ce[name],
                   "loss_recovered": (ce[ZERO] - ce[name]) / (ce[ZERO] - ce[CLEAN]) if ce[ZERO] != ce[CLEAN] else None,
                   "delta_ce": ce[name] - ce[CLEAN], "kl": kl_sum[name] / n,
                   "ce_tokens": n, "ce_rows_kept_clean": kept}
            for name in saes}
