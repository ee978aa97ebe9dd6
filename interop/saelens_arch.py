"""Our architectures <-> SAELens architectures, both ways, through each architecture's own declaration
(`SAE.saelens_architecture`, `to_saelens`, `saelens_imports`, `check_saelens_config`, `from_saelens`,
in train/saes/<arch>.py, which hold the exact weight maps). The maps, in short:

Our SAEs store W_enc and W_dec as rows, [M, d]; SAELens stores W_enc [d, M] and W_dec [M, d], so only
the encoder is transposed. Our b_pre is SAELens's b_dec. Where SAELens subtracts b_dec before the
encoder is `apply_b_dec_to_input`; ours do so or not per architecture, and a mismatch is folded into
the encoder bias, exactly (an affine identity, up to float rounding):

    W_enc (x - b_dec) + b_enc  =  W_enc x + (b_enc - W_enc b_dec)

ours       encoder (ours; x~ = x - b_pre)                            SAELens architecture
topk       ReLU(TopK_k(W_enc x~ + b_enc))                            topk, apply_b_dec_to_input
relu       ReLU(W_enc x + b_enc)                                     standard, no b_dec on the input
gated      1[W_gate x~ + b_gate > 0] ReLU(e^r_mag W_gate x~ + b_mag) gated, apply_b_dec_to_input
jumprelu   pre 1[pre > theta], pre = W_enc x + b_enc                 jumprelu, no b_dec on the input
batchtopk  (eval mode) pre 1[pre > max(theta, 0)],                   jumprelu, apply_b_dec_to_input,
           pre = W_enc x~ + b_enc                                    every threshold max(theta, 0)
switch     interop/saelens_switch.py's docstring                     switch (the plugin)

A SAELens folder whose architecture several of ours take (jumprelu: our jumprelu, or our batchtopk for a
folder we exported from one) goes to the one our metadata names first, if it takes the folder.

SAELens's JumpReLU is ReLU(pre) 1[pre > threshold]: equal to ours for thresholds >= 0 (ours are
exp(log_theta) > 0; BatchTopK's threshold is clamped at 0 as its eval rule does). A SAELens threshold
below 0 acts as 0 (the ReLU), so import clamps it to 0 (log_theta = -inf, theta = 0 exactly).
JumpReLU's `scale` buffer (train/saes/jumprelu.py) sets only the units of its training
hyper-parameters; its encoder does not rescale inputs, so nothing of it is exported.
SAELens TopK's `rescale_acts_by_decoder_norm` (rank and code by pre * ||W_dec,i||, decode by code /
||W_dec,i||) is folded on import: W_enc,i and b_enc,i times ||W_dec,i||, W_dec,i over it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from interop.saelens_format import METADATA_KEY
from runtime.errors import ToolkitError
from train.saes import REGISTRY, SAE
from train.saes.base import SAELensForm


class ArchError(ToolkitError):
    """An architecture with no counterpart on the other side, or weights that do not fit their config."""


@dataclass
class Imported:
    """A SAELens SAE in our terms: our architecture, its size keys (conf/train/model/<arch>.yaml keys) and
    the entries of our state dict it sets (the others keep their constructed values)."""

    arch: str
    sizes: dict[str, Any]
    state: dict[str, torch.Tensor] = field(default_factory=dict)


def exportable() -> list[str]:
    """Our architectures that have a SAELens counterpart."""
    return [arch for arch, cls in REGISTRY.items() if cls.saelens_architecture is not None]


@torch.no_grad()
def to_saelens(sae: SAE) -> SAELensForm:
    """Our SAE (eval mode) -> SAELens's architecture, config fields and weights (float32 copies)."""
    if type(sae).saelens_architecture is None:
        raise ArchError(f"architecture {sae.arch!r} has no SAELens counterpart: {type(sae).saelens_refusal} "
                        f"(exportable: {', '.join(exportable())})")
    if sae.transcoder:
        raise ArchError(f"this {sae.arch} SAE is a transcoder, which has no SAELens counterpart here: SAELens's "
                        "transcoders (transcoder, skip_transcoder) encode with a plain ReLU, ours with "
                        f"{sae.display_name}'s rule")
    out = sae.to_saelens()
    out.tensors = {name: t.detach().float().contiguous().clone() for name, t in out.tensors.items()}
    return out


def importable() -> dict[str, list[type[SAE]]]:
    """SAELens architecture -> our architectures that take it, in registry order."""
    takers: dict[str, list[type[SAE]]] = {}
    for cls in REGISTRY.values():
        for name in cls.saelens_imports:
            takers.setdefault(name, []).append(cls)
    return takers


def check_config(cfg: dict[str, Any]) -> None:
    """ArchError unless one of our architectures takes cfg's SAELens architecture and finds in cfg what it
    needs (before any weight is read)."""
    arch = cfg.get("architecture")
    takers = importable()
    if arch not in takers:
        raise ArchError(f"is a SAELens {arch!r} SAE, which has no counterpart here (importable: {', '.join(takers)})")
    for cls in takers[arch]:
        try:
            cls.check_saelens_config(cfg)
        except ValueError as e:
            raise ArchError(f"is a SAELens {arch} SAE: {e}") from None


@torch.no_grad()
def from_saelens(cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Imported:
    """A SAELens config (normalised, saelens_format.read_config; `check_config` passed) and its float32
    weights -> our architecture, sizes and state entries; ArchError when the weights do not fit."""
    ours = (cfg.get("metadata") or {}).get(METADATA_KEY) or {}
    takers = sorted(importable()[cfg["architecture"]], key=lambda cls: cls.arch != ours.get("arch"))
    for cls in takers:
        try:
            got = cls.from_saelens(cfg, tensors, ours)
        except ValueError as e:
            raise ArchError(str(e)) from None
        if got is not None:
            return Imported(cls.arch, got.sizes, got.state)
    raise ArchError(f"no architecture here takes this SAELens {cfg['architecture']} SAE "
                    f"(tried {', '.join(cls.arch for cls in takers)})")
