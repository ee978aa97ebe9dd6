"""The one interface every SAE architecture implements, and the registry that picks one by name.

Shapes: B tokens, d input dims, M total latents, k active latents per token (TopK-style).
Decoder directions are stored as ROWS ([M, d]), so decoding k latents is a gather of k rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass
class Codes:
    """What `encode` returns and `decode` takes: the sparse code of a batch.

    idx    [B, k]  int64 indices of the active latents in 0..M-1 (TopK-style SAEs), or None
    vals   [B, k]  their values (for Switch already multiplied by the router gate p_i*), or None
    dense  [B, M]  dense codes (ReLU, Gated), or None
    expert [B]     chosen expert per token (Switch), or None
    probs  [B, N]  router probabilities (Switch), or None
    """

    idx: torch.Tensor | None = None
    vals: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    expert: torch.Tensor | None = None
    probs: torch.Tensor | None = None

    def active(self) -> torch.Tensor:
        """[B, k] or [B, M] bool: which of the returned codes are non-zero."""
        return self.vals > 0 if self.vals is not None else self.dense > 0


@dataclass
class Output:
    """What every SAE's forward returns: recon [B, d], the codes, scalar loss terms ("loss" is the
    total that is optimised, "mse" is always present) and per-batch statistics (e.g. expert load)."""

    recon: torch.Tensor
    codes: Codes
    losses: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class SAE(nn.Module):
    """Base class: subclasses define __init__(d, ...), encode(x) -> Codes, decode(Codes) -> [B, d],
    forward(x) -> Output and config()."""

    arch: ClassVar[str]
    # topk and switch: the encoder's backward, "auto" | "sparse" | "dense" (the fast kernels of
    # train/saes/kernels.py; auto picks by expert width / k) | "reference" (plain autograd)
    backward: str = "auto"

    def __init__(self, d: int):
        super().__init__()
        self.d = d
        self.b_pre = nn.Parameter(torch.zeros(d))

    @property
    def n_latents(self) -> int:
        """M, the total number of latents (sets the default learning rate)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Constructor arguments: `build(arch, **config())` rebuilds the same architecture."""
        raise NotImplementedError

    @property
    def sparse_backward(self) -> bool:
        """True when training runs the sparse encoder backward (what eval.flops counts)."""
        return False

    @property
    def dense_decoder(self) -> bool:
        """True when a TopK-style decoder runs as dense grouped matmuls (Switch, narrow experts)."""
        return False

    def schedule(self, step: int, steps: int) -> None:
        """Called before every training step: architectures with a warmed-up penalty update it here."""

    def unit_norm_decoders(self) -> list[nn.Parameter]:
        """Parameters [..., n, d] whose rows are decoder directions held at unit norm."""
        return []

    @torch.no_grad()
    def init_from_batch(self, x: torch.Tensor) -> None:
        """Data-dependent initialisation from a batch x [B, d] (b_pre <- geometric median)."""
        from train.recipe import geometric_median

        self.b_pre.copy_(geometric_median(x))

    def encode(self, x: torch.Tensor) -> Codes:
        raise NotImplementedError

    def decode(self, codes: Codes) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> Output:
        raise NotImplementedError


def sq_error(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """The paper's MSE: squared error summed over d, mean over tokens; x, recon [B, d] -> scalar.
    One fused kernel forward and backward (no [B, d] difference and square kept for autograd)."""
    return torch.nn.functional.mse_loss(recon, x, reduction="sum") / len(x)


REGISTRY: dict[str, type[SAE]] = {}


def register(cls: type[SAE]) -> type[SAE]:
    REGISTRY[cls.arch] = cls
    return cls


def build(arch: str, **kwargs: Any) -> SAE:
    if arch not in REGISTRY:
        raise ValueError(f"unknown SAE architecture {arch!r}; choose one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[arch](**kwargs)


def save(sae: SAE, folder: str | Path) -> None:
    """`sae.safetensors` (weights) + `sae.json` (architecture and constructor arguments)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}, folder / "sae.safetensors")
    (folder / "sae.json").write_text(json.dumps({"arch": sae.arch, **sae.config()}, indent=2))


def load(folder: str | Path, device: str | torch.device = "cpu") -> SAE:
    """The SAE that `save` wrote, in one call."""
    folder = Path(folder)
    config = json.loads((folder / "sae.json").read_text())
    sae = build(config.pop("arch"), **config)
    sae.load_state_dict(load_file(folder / "sae.safetensors"))
    return sae.to(device)
