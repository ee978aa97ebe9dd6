"""Switch SAE (Mudide et al. 2025, eq. 3-4): a router picks one of N TopK experts per token.

    p      = softmax(W_router (x - b_router))                  [B, N]
    i*     = argmax_i p_i                                      [B]
    x_hat  = p_i* * W_dec,i*^T TopK(W_enc,i* (x - b_pre)) + b_pre   (experts have no encoder bias)
    loss   = ||x - x_hat||^2 + alpha * d * N * sum_i f_i P_i
             f_i = fraction of tokens routed to i, P_i = mean router probability of i

Each expert's encoder runs only on the tokens routed to it (train/saes/kernels.py: one sort, one
grouped matmul, a sparse or grouped backward): compute and pre-activation memory scale with B x M/N, not B x M.

Variants the paper leaves as future work (section 6), each off by default (the paper's Switch):

  active_experts = m > 1   every token goes to its top-m experts; the routed budget of k active
                           latents is split evenly, k_r / m per expert (k_r divisible by m), and each
                           expert's code is scaled by its own gate p_i (no renormalisation):
                           x_hat = sum_{i in top-m} p_i W_dec,i^T TopK_{k_r/m}(W_enc,i (x - b_pre)) + ...
                           The tokens are replicated m times into the same grouped kernels (B m rows).
  routing = global         with m > 1, one TopK over the union of the m chosen experts instead of k_r / m
                           in each (the "Beyond Redundancy" follow-up's routing, arXiv 2511.05745, as
                           we understand it without having read its equations; stated in
                           docs/architectures/switch.md): each chosen expert's latents are gated by
                           its p_i first, and the k_r largest gated values over the m e latents are kept,
                           x_hat = sum_{(i,j) in TopK_{k_r}(p_i a_ij)} p_i a_ij W_dec,ij + ...,
                           a_ij = ReLU(W_enc,ij (x - b_pre)). A token may then draw all k_r latents
                           from one expert, or spread them. Computed without a [B, M] tensor: each chosen
                           expert returns its top min(k_r, e) (no more can enter the union's top k_r), then
                           one top-k over those m min(k_r, e) candidates.
  shared_width = s > 0     one always-active TopK expert of s latents beside the routed ones, meant to
                           hold the features every expert would otherwise duplicate; it takes
                           shared_k of the k active latents (k_r = k - shared_k for the routed experts)
                           and is not gated: x_hat = routed + W_dec,s^T TopK_{shared_k}(W_enc,s (x - b_pre)).
                           Its latents are numbered after the routed ones (M = N e + s).
  balance = bias           auxiliary-loss-free balancing (as in DeepSeek-V3): the experts are chosen by
                           p_i + bias_i but gated by p_i; after every training forward bias_i moves by
                           bias_rate * sign(mean load - f_i) (no gradient, no alpha term). The bias is a
                           buffer: saved with the weights and in checkpoints.

Codes of a variant keep the [B, k] layout: the m routed groups of k_r/m slots, then shared_k shared
slots; `expert` is each token's top-1 expert.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from runtime.config import FLAG, integer, number, one_of
from train.recipe import init_tied_
from train.saes.auxk import auxk_error
from train.saes.base import (Codes, FromSAELens, Layout, Output, SAE, SAELensForm, register, saelens_ints,
                             saelens_weights, sq_error)
from train.saes.flops import Cost
from train.saes.kernels import decode_grouped, decode_rows, runs_sparse, topk_encode, topk_encode_reference

MATCHES = ("width", "flops")  # model.match: how the configured width sizes the experts
BALANCES = ("aux_loss", "bias")  # model.balance: the paper's alpha * d * L_aux, or the router-bias update
ROUTINGS = ("split", "global")  # model.routing with m > 1 experts per token: k_r / m in each, or one TopK over all


@register
class SwitchSAE(SAE):
    arch = "switch"
    display_name = "Switch"
    size_args = ("n_experts", "expert_width", "k", "active_experts", "shared_width", "shared_k", "routing")
    size_defaults = {"active_experts": 1, "shared_width": 0, "shared_k": 0, "routing": "split"}  # the paper's Switch
    size_choices = {"routing": ROUTINGS}
    sparse_codes = True
    has_experts = True
    transcodes = True
    # Data parallel (train.dist): the loop sets this to a differentiable mean over ranks, so that f_i
    # and P_i are statistics of every rank's tokens and the aux loss is the one of the global batch.
    global_mean: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __init__(self, d: int, n_experts: int, expert_width: int, k: int, alpha: float | None = None,
                 active_experts: int | None = None, shared_width: int | None = None, shared_k: int | None = None,
                 balance: str | None = None, bias_rate: float | None = None, aux_k: int | None = None,
                 aux_coeff: float | None = None, routing: str | None = None, transcoder: bool = False,
                 skip: bool | None = None):
        alpha, active_experts, shared_width, shared_k, balance, bias_rate, aux_k, aux_coeff, routing, skip = \
            self.defaults(alpha=alpha, active_experts=active_experts, shared_width=shared_width, shared_k=shared_k,
                          balance=balance, bias_rate=bias_rate, aux_k=aux_k, aux_coeff=aux_coeff, routing=routing,
                          skip=skip)
        super().__init__(d, transcoder, skip)
        problem = _split_problem(n_experts, expert_width, k, active_experts, shared_width, shared_k, routing)
        if problem:
            raise ValueError(problem)
        self.n_experts, self.expert_width, self.k, self.alpha = n_experts, expert_width, k, alpha
        self.active_experts, self.shared_width, self.shared_k = active_experts, shared_width, shared_k
        self.balance_by, self.bias_rate, self.routing = balance, bias_rate, routing
        self.aux_k, self.aux_coeff = aux_k, aux_coeff
        # what each chosen expert's TopK returns: its share k_r / m of the routed latents, or with
        # routing=global its candidates for the union's top k_r
        self.k_routed = _per_expert(expert_width, k - shared_k, active_experts, routing)
        self.W_router = nn.Parameter(torch.zeros(n_experts, d))
        self.b_router = nn.Parameter(torch.zeros(d))
        self.W_enc = nn.Parameter(torch.empty(n_experts, expert_width, d))
        self.W_dec = nn.Parameter(torch.empty(n_experts, expert_width, d))
        init_tied_(self.W_enc, self.W_dec)
        if shared_width:
            self.W_enc_shared = nn.Parameter(torch.empty(shared_width, d))
            self.W_dec_shared = nn.Parameter(torch.empty(shared_width, d))
            init_tied_(self.W_enc_shared, self.W_dec_shared)
        if balance == "bias":
            self.register_buffer("router_bias", torch.zeros(n_experts))
        with torch.no_grad():
            nn.init.normal_(self.W_router, std=d**-0.5)

    model_rules = {"n_experts": integer(1), "match": one_of(*MATCHES), "width": integer(1), "k": integer(1),
                   "alpha": number(0), "active_experts": integer(1), "shared_width": integer(0),
                   "shared_k": integer(0), "balance": one_of(*BALANCES), "bias_rate": number(0),
                   "aux_k": integer(0), "aux_coeff": number(0), "routing": one_of(*ROUTINGS), "skip": FLAG}

    @classmethod
    def check_model(cls, model: Mapping[str, Any]) -> None:
        super().check_model(model)
        n, width = model["n_experts"], model["width"]
        if model["match"] == "width" and width % n:
            raise ValueError(f"model.width={width} is not divisible by model.n_experts={n} (model.match=width "
                             "splits the width over the experts)")
        e = cls.expert_width(model)
        problem = _split_problem(n, e, model["k"], model["active_experts"], model["shared_width"], model["shared_k"],
                                 model["routing"])
        if problem:
            raise ValueError(problem)
        if model["balance"] == "bias" and model["bias_rate"] <= 0:
            raise ValueError("model.balance=bias needs model.bias_rate > 0 (how far each step moves the router bias)")

    @classmethod
    def width_match(cls, model: Mapping[str, Any]) -> str | None:
        """model.match: the experts split the width (width) or each is as wide as it (flops)."""
        return model.get("match")

    @classmethod
    def expert_parallel_problem(cls, model: Mapping[str, Any], groups: int) -> str | None:
        """Why expert parallelism over `groups` ranks (train/expert_parallel.py) cannot run this
        configuration, or None: the ranks hold n_experts / groups experts each, and it exchanges one
        expert per token and knows neither a shared expert nor a router bias."""
        if model["n_experts"] % groups:
            return (f"expert_parallel={groups} needs model={cls.arch} with n_experts divisible by it (got "
                    f"model={cls.arch}, n_experts={model['n_experts']})")
        variants = [f"model.{key}={model[key]}" for key, plain in
                    (("active_experts", 1), ("shared_width", 0), ("balance", "aux_loss"), ("aux_k", 0),
                     ("routing", "split"), ("skip", False))
                    if model[key] != plain]
        if variants:
            return (f"expert_parallel runs the paper's Switch only, not {', '.join(variants)}; train this variant "
                    "with expert_parallel=1 (data parallel)")
        return None

    @staticmethod
    def expert_width(model: Mapping[str, Any]) -> int:
        """e: the width split over the experts (match=width), or the width itself (match=flops)."""
        return model["width"] // model["n_experts"] if model["match"] == "width" else model["width"]

    @classmethod
    def constructor_kwargs(cls, model: Mapping[str, Any], d: int) -> dict[str, Any]:
        """width, n_experts (N), match, k, alpha -> d, n_experts, expert_width (e), k, alpha.
        match=width: the width is split over the experts, e = width / N (M = width, the parameters
        of a TopK SAE of that width); match=flops: every expert is `width` wide, e = width
        (M = N width, the FLOPs of that TopK SAE plus the router)."""
        cls.check_model(model)
        m = {key: value for key, value in model.items() if key not in ("width", "match")}
        return {"d": d, "expert_width": cls.expert_width(model), **m}

    @classmethod
    def cost_formula(cls, d: int, *, n_experts: int, expert_width: int, k: int, active_experts: int = 1,
                     shared_width: int = 0, shared_k: int = 0, routing: str = "split", sparse_backward: bool = False,
                     dense_decoder: bool = False) -> Cost:
        """N = n_experts, e = expert_width, m = active_experts, s = shared_width. The paper's Switch
        (m = 1, s = 0): forward 2dN + 2de + 2kd; train 6dN + 6de + 6kd (dense backward), 6dN + 2de +
        10kd (sparse); with dense_decoder (and the dense backward) forward 2dN + 4de, train 6dN + 12de.

        Router (x - b_router) @ W_router^T: 2dN forward, 4dN backward (grad W_router, and grad of
        x - b_router since b_router is trained). Each token goes through its own experts' encoders
        only: 2dem forward, 4dem backward (grad W_enc[i], grad of x - b_pre), or 4k_r d with the
        sparse backward (k_r = k - shared_k routed active latents). Decoder as topk's (embedding bag,
        2kd forward, 4kd backward), or with dense_decoder as narrow experts run it by default
        (`decode_grouped`): the dense codes over the chosen experts' e latents times their decoders,
        2dem forward, 4dem backward. A shared expert is a TopK SAE of s latents beside them: encoder
        2ds forward, 4ds backward (4 shared_k d sparse), its shared_k rows in the embedding bag.
        routing=global: the sparse backward runs over every candidate each chosen expert returned,
        m min(k_r, e) rows (the unselected ones carry a zero gradient), 4 m min(k_r, e) d instead of 4 k_r d.
        Parameters 2Md + Nd + 2d with M = N e + s."""
        n, e, m, s = n_experts, expert_width, active_experts, shared_width
        problem = _split_problem(n, e, k, m, s, shared_k, routing)
        if problem:
            raise ValueError(problem)
        params = 2 * (n * e + s) * d + n * d + 2 * d  # W_enc, W_dec [N, e, d] (+ [s, d]); W_router; biases
        router = 2 * d * n
        k_routed = k - shared_k
        encoder = 2 * d * e * m + 2 * d * s  # the token's own experts, and the shared one
        decoder = (2 * e * d * m + 2 * shared_k * d) if dense_decoder else 2 * k * d
        forward = router + encoder + decoder
        # backward: router grad W_router + grad of x - b_router; decoder grad of vals + grad of its
        # rows; encoder grad W_enc[i] + grad of x - b_pre, dense over e latents or only the k active
        candidates = m * _per_expert(e, k_routed, m, routing)  # rows the experts' TopKs return
        encoder_backward = 2 * (2 * (candidates + shared_k) * d) if sparse_backward else 2 * encoder
        train = forward + 2 * router + 2 * decoder + encoder_backward
        return Cost(params=params, forward=float(forward), train=float(train))

    @property
    def n_latents(self) -> int:
        return self.n_experts * self.expert_width + self.shared_width

    @property
    def n_routed(self) -> int:
        """N e: the routed experts' latents, numbered 0..N e - 1 (the shared expert's come after)."""
        return self.n_experts * self.expert_width

    def layout(self) -> Layout:
        return Layout(self.d, self.n_latents, self.k, self.n_experts, self.expert_width)

    def decoder_directions(self) -> torch.Tensor:
        """[M, d]: the experts' rows (expert i's latents i e .. (i+1) e - 1), then the shared expert's."""
        rows = self.W_dec.reshape(-1, self.d)
        return torch.cat([rows, self.W_dec_shared]) if self.shared_width else rows

    def encoder_directions(self) -> torch.Tensor:
        rows = self.W_enc.reshape(-1, self.d)
        return torch.cat([rows, self.W_enc_shared]) if self.shared_width else rows

    saelens_architecture = "switch"
    saelens_imports = ("switch",)

    def to_saelens(self) -> SAELensForm:
        """The architecture "switch" of our SAELens plugin (interop/saelens_switch.py, whose docstring has
        the equations): W_enc, W_dec as [M, d] rows in latent order, W_enc transposed."""
        tensors = {"W_enc": self.encoder_directions().T, "W_dec": self.decoder_directions(), "b_dec": self.b_pre,
                   "W_router": self.W_router.T, "b_router": self.b_router}
        biased = self.balance_by == "bias"
        if biased:
            tensors["router_bias"] = self.router_bias
        fields = {"apply_b_dec_to_input": True, "n_experts": self.n_experts, "k": self.k,
                  "active_experts": self.active_experts, "shared_width": self.shared_width, "shared_k": self.shared_k,
                  "router_bias": biased, "routing": self.routing}
        return SAELensForm("switch", fields, tensors, needs_plugin=True)

    @classmethod
    def check_saelens_config(cls, cfg: Mapping[str, Any]) -> None:
        saelens_ints(cfg, "n_experts", "k")
        n, s, m = cfg["n_experts"], cfg.get("shared_width", 0), cfg["d_sae"]
        if n < 1 or s >= m or (m - s) % n:
            raise ValueError(f"it has d_sae={m}, shared_width={s} and n_experts={n}: the {m - s} routed latents do "
                             f"not split into {n} experts of at least one latent each")

    @classmethod
    def from_saelens(cls, cfg: Mapping[str, Any], tensors: dict[str, torch.Tensor],
                     ours: Mapping[str, Any]) -> FromSAELens:
        n, s, d = cfg["n_experts"], cfg.get("shared_width", 0), cfg["d_in"]
        shapes = {"W_router": (d, n), "b_router": (d,), "router_bias": (n,)}
        names = {"W_enc", "W_dec", "b_dec", "W_router", "b_router"}
        if cfg.get("router_bias"):
            names.add("router_bias")
        saelens_weights(cfg, tensors, names, shapes)
        if not cfg["apply_b_dec_to_input"]:
            raise ValueError("a switch SAE without apply_b_dec_to_input has no counterpart here: our experts have no "
                             "encoder bias to fold b_dec into")
        e = (cfg["d_sae"] - s) // n
        enc, dec = tensors["W_enc"].T, tensors["W_dec"]  # [M, d] rows
        state = {"W_enc": enc[: n * e].reshape(n, e, d), "W_dec": dec[: n * e].reshape(n, e, d),
                 "b_pre": tensors["b_dec"], "W_router": tensors["W_router"].T, "b_router": tensors["b_router"]}
        if s:
            state.update(W_enc_shared=enc[n * e:], W_dec_shared=dec[n * e:])
        if cfg.get("router_bias"):
            state["router_bias"] = tensors["router_bias"]
        sizes = {"n_experts": n, "match": "width", "width": n * e, "k": cfg["k"],
                 "active_experts": cfg.get("active_experts", 1), "shared_width": s, "shared_k": cfg.get("shared_k", 0),
                 "balance": "bias" if cfg.get("router_bias") else "aux_loss", "routing": cfg.get("routing", "split")}
        return FromSAELens(sizes, state)

    def config(self) -> dict[str, Any]:
        return {"d": self.d, "n_experts": self.n_experts, "expert_width": self.expert_width,
                "k": self.k, "alpha": self.alpha, "active_experts": self.active_experts,
                "shared_width": self.shared_width, "shared_k": self.shared_k, "balance": self.balance_by,
                "bias_rate": self.bias_rate, "aux_k": self.aux_k, "aux_coeff": self.aux_coeff, "routing": self.routing,
                **self.transcoder_config()}

    def unit_norm_decoders(self) -> list[nn.Parameter]:
        return [self.W_dec, self.W_dec_shared] if self.shared_width else [self.W_dec]

    @property
    def sparse_backward(self) -> bool:
        return runs_sparse(self.kernels, self.expert_width, self.k_routed)

    @property
    def dense_decoder(self) -> bool:
        """The paper's Switch with narrow experts decodes with grouped matmuls (kernels="dense", or "auto"
        for them), otherwise an embedding bag (train/saes/kernels.py); the variants, whose tokens have
        codes in several experts, always decode with the embedding bag."""
        return self.plain and self.kernels != "reference" and not self.sparse_backward

    @property
    def plain(self) -> bool:
        """The paper's Switch: one expert per token, no shared expert."""
        return self.active_experts == 1 and not self.shared_width

    @torch.no_grad()
    def init_from_batch(self, rows: torch.Tensor) -> None:
        """b_pre and b_router both start at the batch's geometric median (not tied afterwards); a
        transcoder's b_pre at its targets', b_router and b_in at its inputs'."""
        super().init_from_batch(rows)
        self.b_router.copy_(self.b_in if self.transcoder else self.b_pre)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, d] -> (router probabilities p [B, N], chosen expert [B]); with active_experts = m > 1
        the chosen experts [B, m], best first. With balance=bias the choice is made on p + bias."""
        p = torch.softmax((x - self.b_router) @ self.W_router.T, dim=-1)
        score = p + self.router_bias if self.balance_by == "bias" else p
        if self.active_experts == 1:
            return p, score.argmax(dim=-1)
        return p, score.topk(self.active_experts, dim=-1).indices

    def encode(self, x: torch.Tensor) -> Codes:
        """x [B, d] -> expert [B] (top-1), probs [B, N], global latent idx [B, k] in 0..M-1 and vals [B, k]
        already multiplied by their expert's gate p_i (so decoding is linear and the router gets gradient)."""
        return self.encode_routed(x, *self.route(x))

    def encode_routed(self, x: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor) -> Codes:
        """`encode` once `route` has given probs [B, N] and the chosen experts [B] or [B, m]."""
        xc = self.centred(x)
        if self.active_experts == 1:
            vals, idx = self.encode_experts(xc, chosen, self.k_routed)
            vals = probs.gather(1, chosen[:, None]) * vals  # p_i*
            expert = chosen
        else:  # each token once per chosen expert: rows b m + j of the replicated batch
            m = self.active_experts
            vals, idx = self.encode_experts(xc.repeat_interleave(m, dim=0), chosen.reshape(-1), self.k_routed)
            vals = (probs.gather(1, chosen)[..., None] * vals.view(len(x), m, -1)).reshape(len(x), -1)
            idx, expert = idx.view(len(x), -1), chosen[:, 0]
            if self.routing == "global":  # the k_r largest gated values of the m k_routed candidates
                vals, pos = vals.topk(self.k - self.shared_k, dim=1)
                idx = idx.gather(1, pos)
        if self.shared_width:
            s_vals, s_idx = self.encode_shared(xc)
            vals, idx = torch.cat([vals, s_vals], dim=1), torch.cat([idx, s_idx + self.n_routed], dim=1)
        return Codes(idx=idx, vals=vals, expert=expert, probs=probs)

    def encode_shared(self, xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared expert, a TopK encoder every token goes through: xc [B, d] -> vals, idx [B, shared_k]
        in 0..s-1."""
        args = (xc, self.W_enc_shared[None], None, None, self.shared_k)
        if self.kernels == "reference":
            return topk_encode_reference(*args)
        return topk_encode(*args, runs_sparse(self.kernels, self.shared_width, self.shared_k))

    def encode_experts(self, xc: torch.Tensor, expert: torch.Tensor, k: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts this module holds (all N, or a shard of them), each on its own tokens:
        xc [B, d] (x - b_pre), expert [B] in 0..held-1 -> vals [B, k] >= 0 (no gate), idx [B, k] in
        0..held * e - 1 (k: each expert's active latents, by default k_routed)."""
        args = (xc, self.W_enc, None, expert, k or self.k_routed)
        if self.kernels == "reference":
            return topk_encode_reference(*args)
        return topk_encode(*args, self.sparse_backward)

    def decode_experts(self, idx: torch.Tensor, vals: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """sum_j vals[:, j] W_dec[idx[:, j]] over the held experts: idx, vals [B, k], expert [B] -> [B, d]."""
        if self.dense_decoder:
            return decode_grouped(idx, vals, self.W_dec, expert)
        return decode_rows(idx, vals, self.W_dec.view(-1, self.d))

    def decode(self, codes: Codes) -> torch.Tensor:
        """-> x_hat [B, d] = sum over the chosen experts of p_i E_i(x - b_pre) (+ the shared expert's
        code) + b_pre (the gates are in the values)."""
        if self.plain:
            return self.decode_experts(codes.idx, codes.vals, codes.expert) + self.b_pre
        routed = codes.idx.shape[1] - self.shared_k
        recon = decode_rows(codes.idx[:, :routed], codes.vals[:, :routed], self.W_dec.view(-1, self.d))
        if self.shared_width:
            recon = recon + decode_rows(codes.idx[:, routed:] - self.n_routed, codes.vals[:, routed:],
                                        self.W_dec_shared)
        return recon + self.b_pre

    def balance(self, expert: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The load-balancing loss L_aux = N sum_i f_i P_i and the expert load f_i [N], from the chosen
        experts [B] (or [B, m]: f_i counts routing slots) and router probabilities [B, N] (of every
        rank's tokens when `global_mean` is set)."""
        load = torch.bincount(expert.reshape(-1), minlength=self.n_experts).to(probs.dtype) / expert.numel()
        mean_probs = probs.mean(dim=0)  # P_i
        if self.global_mean is not None:  # one collective for both; f_i carries no gradient
            load, mean_probs = self.global_mean(torch.cat([load, mean_probs])).split(self.n_experts)
            load = load.detach()
        return self.n_experts * (load * mean_probs).sum(), load

    @torch.no_grad()
    def nudge_bias(self, load: torch.Tensor) -> None:
        """Auxiliary-loss-free balancing: bias_i += bias_rate * sign(1/N - f_i), after a training forward."""
        self.router_bias.add_(self.bias_rate * torch.sign(1 / self.n_experts - load.to(self.router_bias.dtype)))

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> Output:
        """x [B, d] -> its reconstruction, or a transcoder's of `target` [B, d], with the losses."""
        probs, chosen = self.route(x)
        codes = self.encode_routed(x, probs, chosen)
        recon = self.skipped(x, self.decode(codes))
        return self.output(x, recon, codes, chosen, probs, target=target)

    def output(self, x: torch.Tensor, recon: torch.Tensor, codes: Codes, expert: torch.Tensor, probs: torch.Tensor,
               objective: torch.Tensor | None = None, target: torch.Tensor | None = None) -> Output:
        """The Output of a forward pass: x, recon [B, d] (of x, or of a transcoder's `target`), the routing
        of x (chosen experts [B] or [B, m], probs [B, N]); `objective` is the reconstruction term of the
        loss (None: the MSE of recon). With balance=bias, a training forward also moves the router bias."""
        target = x if target is None else target
        mse = sq_error(target, recon)
        loss = mse if objective is None else objective
        aux, load = self.balance(expert, probs)
        if self.balance_by == "bias":
            if self.training:
                self.nudge_bias(load)
        else:
            loss = loss + self.alpha * self.d * aux
        losses = {"loss": loss, "mse": mse, "aux": aux}
        if self.aux_k:
            auxk = self.auxk(x, target - recon, codes.expert)
            losses.update(loss=loss + self.aux_coeff * auxk, auxk=auxk)
        return Output(recon=recon, codes=codes, losses=losses, stats={"expert_load": load})

    def auxk(self, x: torch.Tensor, residual: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """AuxK per expert (train/saes/auxk.py): each token's residual [B, d] (what the reconstruction
        missed) from the dead latents of its (top-1) expert, all experts in one grouped kernel (no [B, M]
        tensor); the shared expert's dead latents are left out. 0 outside training or with no dead latent."""
        dead = self.dead_rows()
        dead = None if dead is None else dead[dead < self.n_routed]
        if dead is None or not len(dead):
            return x.new_zeros(())
        return auxk_error(self.centred(x), residual, self.W_enc, None, self.W_dec, dead, expert, self.aux_k,
                          self.kernels) / len(x)


def _per_expert(e: int, routed: int, m: int, routing: str) -> int:
    """The latents each of a token's m chosen experts (width e) returns for `routed` active routed latents."""
    return min(routed, e) if routing == "global" else routed // m


def _split_problem(n: int, e: int, k: int, m: int, s: int, shared_k: int, routing: str = "split") -> str | None:
    """Why k active latents cannot be split over m of n experts of width e (evenly, or with routing=global
    one TopK over their union) and a shared expert of s latents taking shared_k of them, or None."""
    if m > n:
        return f"model.active_experts={m} is more than model.n_experts={n}"
    if bool(s) != bool(shared_k):
        return (f"model.shared_width={s} and model.shared_k={shared_k}: a shared expert needs both > 0 "
                "(or both 0 for none)")
    if shared_k > s:
        return f"model.shared_k={shared_k} is larger than model.shared_width={s}"
    routed = k - shared_k
    if routing == "global":
        if not 0 < routed <= m * e:
            return (f"model.k - model.shared_k = {routed} routed active latents must be in 1..{m * e}, the latents of "
                    f"model.active_experts={m} experts of width {e}")
        return None
    if routed < m or routed % m:
        return (f"model.k - model.shared_k = {routed} routed active latents cannot be split evenly over "
                f"model.active_experts={m} experts")
    if routed // m > e:
        if m == 1 and not s:
            return f"model.k={k} is larger than an expert's width {e}"
        return f"model.k={k} gives {routed // m} active latents per expert, more than an expert's width {e}"
    return None
