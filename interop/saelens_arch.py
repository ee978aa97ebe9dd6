"""Our architectures <-> SAELens architectures: the exact weight maps, both ways.

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

SAELens's JumpReLU is ReLU(pre) 1[pre > threshold]: equal to ours for thresholds >= 0 (ours are
exp(log_theta) > 0; BatchTopK's threshold is clamped at 0 as its eval rule does). A SAELens threshold
below 0 acts as 0 (the ReLU), so import clamps it to 0 (log_theta = -inf, theta = 0 exactly).
JumpReLU's `scale` buffer (train/saes/jumprelu.py) sets only the units of its training
hyper-parameters; its encoder does not rescale inputs, so nothing of it is exported.
SAELens TopK's `rescale_acts_by_decoder_norm` (rank and code by pre * ||W_dec,i||, decode by code /
||W_dec,i||) is folded on import: W_enc,i and b_enc,i times ||W_dec,i||, W_dec,i over it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from interop.saelens_format import METADATA_KEY
from runtime.errors import ToolkitError
from train.saes import SAE


class ArchError(ToolkitError):
    """An architecture with no counterpart on the other side, or weights that do not fit their config."""


@dataclass
class Exported:
    """One of our SAEs in SAELens's terms: the architecture, its config fields besides d_in, d_sae, dtype
    and metadata (apply_b_dec_to_input, k, ...) and the weights under SAELens's names."""

    architecture: str
    fields: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    needs_plugin: bool = False


@dataclass
class Imported:
    """A SAELens SAE in our terms: the architecture, its size keys (conf/train/model/<arch>.yaml keys)
    and the entries of our state dict it sets (the others keep their constructed values)."""

    arch: str
    sizes: dict[str, Any]
    state: dict[str, torch.Tensor] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ export

def _topk(sae: SAE) -> Exported:
    return Exported("topk", {"apply_b_dec_to_input": True, "k": sae.k, "rescale_acts_by_decoder_norm": False},
                    {"W_enc": sae.W_enc.T, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_pre})


def _relu(sae: SAE) -> Exported:
    return Exported("standard", {"apply_b_dec_to_input": False},
                    {"W_enc": sae.W_enc.T, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_pre})


def _gated(sae: SAE) -> Exported:
    return Exported("gated", {"apply_b_dec_to_input": True},
                    {"W_enc": sae.W_gate.T, "b_gate": sae.b_gate, "r_mag": sae.r_mag, "b_mag": sae.b_mag,
                     "W_dec": sae.W_dec, "b_dec": sae.b_pre})


def _jumprelu(sae: SAE) -> Exported:
    return Exported("jumprelu", {"apply_b_dec_to_input": False},
                    {"W_enc": sae.W_enc.T, "b_enc": sae.b_enc, "threshold": sae.theta, "W_dec": sae.W_dec,
                     "b_dec": sae.b_pre})


def _batchtopk(sae: SAE) -> Exported:
    threshold = sae.theta.clamp_min(0).expand(sae.width)  # one shared threshold, as its eval rule uses it
    return Exported("jumprelu", {"apply_b_dec_to_input": True},
                    {"W_enc": sae.W_enc.T, "b_enc": sae.b_enc, "threshold": threshold, "W_dec": sae.W_dec,
                     "b_dec": sae.b_pre})


def _switch(sae: SAE) -> Exported:
    """Experts' W_enc, W_dec [N, e, d] -> [N e, d] rows (expert i's latents i e .. (i+1) e - 1, ours too),
    the shared expert's [s, d] after them."""
    enc, dec = sae.W_enc.reshape(-1, sae.d), sae.W_dec.reshape(-1, sae.d)
    if sae.shared_width:
        enc, dec = torch.cat([enc, sae.W_enc_shared]), torch.cat([dec, sae.W_dec_shared])
    tensors = {"W_enc": enc.T, "W_dec": dec, "b_dec": sae.b_pre, "W_router": sae.W_router.T,
               "b_router": sae.b_router}
    biased = sae.balance_by == "bias"
    if biased:
        tensors["router_bias"] = sae.router_bias
    fields = {"apply_b_dec_to_input": True, "n_experts": sae.n_experts, "k": sae.k,
              "active_experts": sae.active_experts, "shared_width": sae.shared_width, "shared_k": sae.shared_k,
              "router_bias": biased}
    return Exported("switch", fields, tensors, needs_plugin=True)


EXPORTS: dict[str, Callable[[SAE], Exported]] = {"topk": _topk, "relu": _relu, "gated": _gated,
                                                 "jumprelu": _jumprelu, "batchtopk": _batchtopk, "switch": _switch}


@torch.no_grad()
def to_saelens(sae: SAE) -> Exported:
    """Our SAE (eval mode) -> SAELens's architecture, config fields and weights (float32 copies)."""
    if sae.arch not in EXPORTS:
        raise ArchError(f"architecture {sae.arch!r} has no SAELens counterpart (exportable: {', '.join(EXPORTS)})")
    out = EXPORTS[sae.arch](sae)
    out.tensors = {name: t.detach().float().contiguous().clone() for name, t in out.tensors.items()}
    return out


# ------------------------------------------------------------------------------------------ import

# SAELens architecture -> the weights its folder must hold
WEIGHT_NAMES = {
    "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "standard": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "gated": ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"),
    "jumprelu": ("W_enc", "b_enc", "threshold", "W_dec", "b_dec"),
    "switch": ("W_enc", "W_dec", "b_dec", "W_router", "b_router"),
}
OUR_ARCH = {"topk": "topk", "standard": "relu", "gated": "gated", "jumprelu": "jumprelu", "switch": "switch"}


def check_weights(cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """ArchError unless the weights are exactly those of cfg's architecture, in the shapes d_in and d_sae
    (and the Switch fields) give."""
    arch, d, m = cfg["architecture"], cfg["d_in"], cfg["d_sae"]
    names = set(WEIGHT_NAMES[arch]) | ({"router_bias"} if arch == "switch" and cfg.get("router_bias") else set())
    if set(tensors) != names:
        raise ArchError(f"the weights are {', '.join(sorted(tensors))} but a SAELens {arch} SAE has "
                        f"{', '.join(sorted(names))}")
    shapes = {"W_enc": (d, m), "W_dec": (m, d), "b_dec": (d,), "W_router": (d, cfg.get("n_experts")),
              "b_router": (d,), "router_bias": (cfg.get("n_experts"),)}
    for name, t in tensors.items():
        want = shapes.get(name, (m,))
        if tuple(t.shape) != want:
            raise ArchError(f"weight {name} has shape {list(t.shape)} where d_in={d}, d_sae={m} give {list(want)}")


def _input_shift(w_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """W_enc [d, M], b_dec [d] -> b_dec W_enc [M]: what subtracting b_dec before the encoder subtracts."""
    return (b_dec.double() @ w_enc.double()).float()


def _from_topk(cfg: dict[str, Any], t: dict[str, torch.Tensor]) -> Imported:
    w_enc, b_enc, w_dec = t["W_enc"], t["b_enc"], t["W_dec"]
    if cfg.get("rescale_acts_by_decoder_norm"):
        norm = w_dec.norm(dim=-1)  # [M]
        w_enc, b_enc, w_dec = w_enc * norm, b_enc * norm, w_dec / norm[:, None]
    if not cfg["apply_b_dec_to_input"]:  # ours subtracts b_pre: add back what that takes away
        b_enc = b_enc + _input_shift(w_enc, t["b_dec"])
    return Imported("topk", {"width": cfg["d_sae"], "k": cfg["k"]},
                    {"W_enc": w_enc.T, "b_enc": b_enc, "W_dec": w_dec, "b_pre": t["b_dec"]})


def _from_standard(cfg: dict[str, Any], t: dict[str, torch.Tensor]) -> Imported:
    b_enc = t["b_enc"]
    if cfg["apply_b_dec_to_input"]:  # ours encodes x itself
        b_enc = b_enc - _input_shift(t["W_enc"], t["b_dec"])
    return Imported("relu", {"width": cfg["d_sae"]},
                    {"W_enc": t["W_enc"].T, "b_enc": b_enc, "W_dec": t["W_dec"], "b_pre": t["b_dec"]})


def _from_gated(cfg: dict[str, Any], t: dict[str, torch.Tensor]) -> Imported:
    b_gate, b_mag = t["b_gate"], t["b_mag"]
    if not cfg["apply_b_dec_to_input"]:  # ours gates x - b_pre; the magnitude path scales by e^r_mag
        shift = _input_shift(t["W_enc"], t["b_dec"])
        b_gate, b_mag = b_gate + shift, b_mag + shift * t["r_mag"].exp()
    return Imported("gated", {"width": cfg["d_sae"]},
                    {"W_gate": t["W_enc"].T, "b_gate": b_gate, "r_mag": t["r_mag"], "b_mag": b_mag,
                     "W_dec": t["W_dec"], "b_pre": t["b_dec"]})


def _from_jumprelu(cfg: dict[str, Any], t: dict[str, torch.Tensor], ours: dict[str, Any]) -> Imported:
    """Our jumprelu; our batchtopk when the folder is one we exported from a BatchTopK run (metadata says
    so, b_dec is subtracted and every threshold is the same)."""
    threshold = t["threshold"].clamp_min(0)
    if (ours.get("arch") == "batchtopk" and cfg["apply_b_dec_to_input"]
            and bool((threshold == threshold[0]).all())):
        return Imported("batchtopk", {"width": cfg["d_sae"]},  # k (a training mean) comes from the metadata
                        {"W_enc": t["W_enc"].T, "b_enc": t["b_enc"], "W_dec": t["W_dec"], "b_pre": t["b_dec"],
                         "theta": threshold[0].clone()})
    b_enc = t["b_enc"]
    if cfg["apply_b_dec_to_input"]:  # ours encodes x itself
        b_enc = b_enc - _input_shift(t["W_enc"], t["b_dec"])
    return Imported("jumprelu", {"width": cfg["d_sae"]},
                    {"W_enc": t["W_enc"].T, "b_enc": b_enc, "log_theta": threshold.log(), "W_dec": t["W_dec"],
                     "b_pre": t["b_dec"]})


def _from_switch(cfg: dict[str, Any], t: dict[str, torch.Tensor]) -> Imported:
    if not cfg["apply_b_dec_to_input"]:
        raise ArchError("a switch SAE without apply_b_dec_to_input has no counterpart here: our experts have no "
                        "encoder bias to fold b_dec into")
    n, s, d = cfg["n_experts"], cfg.get("shared_width", 0), cfg["d_in"]
    e = (cfg["d_sae"] - s) // n
    enc, dec = t["W_enc"].T, t["W_dec"]  # [M, d] rows
    state = {"W_enc": enc[: n * e].reshape(n, e, d), "W_dec": dec[: n * e].reshape(n, e, d), "b_pre": t["b_dec"],
             "W_router": t["W_router"].T, "b_router": t["b_router"]}
    if s:
        state.update(W_enc_shared=enc[n * e:], W_dec_shared=dec[n * e:])
    if cfg.get("router_bias"):
        state["router_bias"] = t["router_bias"]
    sizes = {"n_experts": n, "match": "width", "width": n * e, "k": cfg["k"],
             "active_experts": cfg.get("active_experts", 1), "shared_width": s, "shared_k": cfg.get("shared_k", 0),
             "balance": "bias" if cfg.get("router_bias") else "aux_loss"}
    return Imported("switch", sizes, state)


@torch.no_grad()
def from_saelens(cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Imported:
    """A SAELens config (normalised, saelens_format.read_config) and its float32 weights -> our
    architecture, sizes and state entries. The architecture must be one of OUR_ARCH (checked before)."""
    check_weights(cfg, tensors)
    arch = cfg["architecture"]
    ours = (cfg.get("metadata") or {}).get(METADATA_KEY) or {}
    if arch == "jumprelu":
        return _from_jumprelu(cfg, tensors, ours)
    return {"topk": _from_topk, "standard": _from_standard, "gated": _from_gated,
            "switch": _from_switch}[arch](cfg, tensors)
