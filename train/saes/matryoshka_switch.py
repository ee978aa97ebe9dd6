"""Matryoshka Switch SAE: a Switch SAE (train/saes/switch.py) trained with Matryoshka's nested prefix
losses (train/saes/matryoshka.py), which no peer library has.

    p, chosen experts, codes z         as the Switch (z_i holds the gate p_i; k active per token)
    nesting = expert (default)         prefix g of EVERY expert: its first m_g latents, m_g = round(f_g e)
    nesting = dictionary               prefix g of the routed dictionary: latents 0 .. m_g - 1 of the N e
                                       (experts 0, 1, ... in order), m_g = round(f_g N e)
    x_hat_g = sum over the token's codes z_i in prefix g of z_i W_dec,i + b_pre
    loss    = (1/G) sum_g ||x - x_hat_g||^2 + alpha d L_aux (or the router bias; as the Switch)

Why nesting inside each expert is the default: a token's codes live in its own expert(s), so with
nesting across the dictionary a token routed to expert i has no code at all in the prefixes that end
before i e; its early prefix losses are ||x - b_pre||^2, constants that train nothing, and the
hierarchy the prefixes are meant to teach exists only for the tokens of the first experts. Nested
inside each expert, every token has the same G levels in the expert it is sent to: each expert is a
Matryoshka SAE of its own cluster, its first latents the cluster's general features. `nesting` is a
key so that the two can be compared (docs/architectures/matryoshka_switch.md has the measurement).

The prefixes change the loss only: routing, encode, decode, inference, the SAELens export (the
Switch plugin) and the FLOP counts are the Switch's, with the embedding-bag decoder. The forward sorts
each token's k codes by prefix group and sums them per (token, group) in one embedding bag, 2kd per
token as the Switch's decoder, with no [B, M] tensor. A shared expert is not supported (where its
latents would sit in the nesting is a choice we have not made), nor expert parallelism.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from runtime.config import list_of, one_of
from train.saes.base import FromSAELens, Output, SAELensForm, register
from train.saes.flops import Cost
from train.saes.matryoshka import FRACTION, grouped_sums, prefix_losses, prefix_widths
from train.saes.switch import SwitchSAE

NESTINGS = ("expert", "dictionary")  # model.nesting: prefixes inside every expert, or across the routed dictionary


@register
class MatryoshkaSwitchSAE(SwitchSAE):
    arch = "matryoshka_switch"
    display_name = "Matryoshka Switch"
    model_rules = {**SwitchSAE.model_rules, "prefixes": list_of(FRACTION, "a non-empty list of fractions in (0, 1)"),
                   "nesting": one_of(*NESTINGS)}

    def __init__(self, d: int, n_experts: int, expert_width: int, k: int, prefixes: list[float] | None = None,
                 nesting: str | None = None, alpha: float | None = None, active_experts: int | None = None,
                 routing: str | None = None, shared_width: int | None = None, shared_k: int | None = None,
                 balance: str | None = None, bias_rate: float | None = None, aux_k: int | None = None,
                 aux_coeff: float | None = None, transcoder: bool = False, skip: bool | None = None):
        super().__init__(d, n_experts, expert_width, k, alpha=alpha, active_experts=active_experts, routing=routing,
                         shared_width=shared_width, shared_k=shared_k, balance=balance, bias_rate=bias_rate,
                         aux_k=aux_k, aux_coeff=aux_coeff, transcoder=transcoder, skip=skip)
        prefixes, nesting = self.defaults(prefixes=prefixes, nesting=nesting)
        if self.shared_width:
            raise ValueError(_NO_SHARED)
        if nesting not in NESTINGS:
            raise ValueError(f"model.nesting must be one of {', '.join(NESTINGS)}, got {nesting!r}")
        self.prefixes, self.nesting = [float(f) for f in prefixes], nesting
        span, what = _span(nesting, n_experts, expert_width)
        self.widths = prefix_widths(self.prefixes, span, what)
        self.register_buffer("bounds", torch.tensor(self.widths[:-1]), persistent=False)

    @classmethod
    def check_model(cls, model: Mapping[str, Any]) -> None:
        super().check_model(model)
        if model["shared_width"]:
            raise ValueError(_NO_SHARED)
        span, what = _span(model["nesting"], model["n_experts"], cls.expert_width(model))
        prefix_widths(model["prefixes"], span, what)

    @classmethod
    def expert_parallel_problem(cls, model: Mapping[str, Any], groups: int) -> str | None:
        return (f"expert_parallel runs the paper's Switch only, not model={cls.arch}; train it with "
                "expert_parallel=1 (data parallel)")

    @classmethod
    def cost_formula(cls, d: int, *, sparse_backward: bool = False, dense_decoder: bool = False, **sizes: Any) -> Cost:
        """The Switch's with the embedding-bag decoder (module docstring); the prefix sums are elementwise."""
        if dense_decoder:
            raise ValueError("a Matryoshka Switch decodes with the embedding bag only (dense_decoder=False)")
        return super().cost_formula(d, sparse_backward=sparse_backward, **sizes)

    @property
    def dense_decoder(self) -> bool:
        return False

    def config(self) -> dict[str, Any]:
        return {**super().config(), "prefixes": list(self.prefixes), "nesting": self.nesting}

    saelens_architecture = "switch"  # at inference a Switch: our plugin's architecture
    saelens_imports = ("switch",)

    def to_saelens(self) -> SAELensForm:
        """The Switch's: the prefixes shape training only."""
        return super().to_saelens()

    @classmethod
    def from_saelens(cls, cfg: Mapping[str, Any], tensors: dict[str, torch.Tensor],
                     ours: Mapping[str, Any]) -> FromSAELens | None:
        """Only a folder we exported from a Matryoshka Switch run (its prefixes and nesting come back from the
        metadata); any other switch folder is a Switch."""
        if ours.get("arch") != cls.arch:
            return None
        return super().from_saelens(cfg, tensors, ours)

    def groups(self, idx: torch.Tensor) -> torch.Tensor:
        """Latents idx [...] in 0..N e - 1 -> their prefix group g in 0..G-1 (module docstring)."""
        position = idx % self.expert_width if self.nesting == "expert" else idx
        return torch.bucketize(position, self.bounds, right=True)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> Output:
        """x [B, d] -> its reconstruction, or a transcoder's of `target` [B, d], with the losses."""
        probs, chosen = self.route(x)
        codes = self.encode_routed(x, probs, chosen)
        groups, order = self.groups(codes.idx).sort(dim=1)  # each token's codes by group
        n, k = codes.idx.shape
        rows = torch.arange(n, device=x.device).repeat_interleave(k)
        sums = grouped_sums(rows, codes.idx.gather(1, order).flatten(), codes.vals.gather(1, order).flatten(),
                            groups.flatten(), n, len(self.widths), self.W_dec.view(-1, self.d))
        errors, recon = prefix_losses(x if target is None else target, sums, self.skipped(x, self.b_pre))
        out = self.output(x, recon, codes, chosen, probs, objective=errors.mean(), target=target)
        out.losses["prefix_mse"] = errors[:-1].mean()
        return out


_NO_SHARED = "model.shared_width must be 0 for a Matryoshka Switch: it nests routed experts only"


def _span(nesting: str, n_experts: int, expert_width: int) -> tuple[int, str]:
    """The width the prefix fractions are of, and its name for messages."""
    if nesting == "expert":
        return expert_width, "an expert's width"
    return n_experts * expert_width, "the routed width"
