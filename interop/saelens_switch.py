"""A SAELens plugin for Switch SAEs (Mudide et al. 2025): `import saelens_switch` and SAELens loads them.

    import saelens_switch                      # (in this toolkit: import interop.saelens_switch)
    from sae_lens import SAE
    sae = SAE.load_from_disk("runs/switch/default/saelens")
    codes = sae.encode(x)                      # [..., d_sae] dense, k non-zero per token
    x_hat = sae.decode(codes)

Importing this module registers the architecture "switch" with SAELens (`sae_lens.register_sae_class`),
so `SAE.load_from_disk` and `SAE.from_dict` build a `SwitchSAE` from a folder whose cfg.json says
`"architecture": "switch"` (as `python -m interop.export` writes for a Switch run). The module needs only
torch and sae_lens: copy this one file next to your code to use our Switch SAEs without the toolkit.

Shapes: T tokens (any leading dims are flattened), d = d_in, N experts of e latents each, an optional
shared expert of s latents, M = d_sae = N e + s latents (the shared expert's numbered last), m routed
experts per token, k active latents per token, k_r = (k - shared_k) / m per routed expert. Weights in
SAELens orientation:

    W_enc     [d, M]   encoder columns, expert i's are columns i e .. (i + 1) e - 1 (no encoder bias)
    W_dec     [M, d]   decoder rows
    b_dec     [d]      subtracted before the experts' encoders, added after decoding (our b_pre)
    W_router  [d, N]   router
    b_router  [d]      subtracted before the router
    router_bias [N]    (only with router_bias = true) added to the probabilities to choose experts

The forward (eq. 3-4 of the paper, with the toolkit's variants):

    p        = softmax((x - b_router) W_router)                              [T, N]
    chosen   = the m experts with the largest p + router_bias (argmax for m = 1)   [T, m]
    pre      = (x - b_dec) W_enc                                             [T, M]
    for each chosen expert i:  f[i's latents] = p_i * ReLU(TopK_{k_r}(pre[i's latents]))
      (routing = "global": instead the k - shared_k largest of p_i ReLU(pre) over all chosen experts' latents)
    shared expert (s > 0):     f[shared]      = ReLU(TopK_{shared_k}(pre[shared]))   (no gate)
    x_hat    = f W_dec + b_dec

Codes are returned dense (SAELens's convention): every expert's pre-activations are computed, T x M
(the toolkit's own trainer computes only the chosen experts'). The gate p_i is inside the codes, so
decoding is the plain linear decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sae_lens import SAE, SAEConfig
from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
from torch import nn

ARCHITECTURE = "switch"


@dataclass
class SwitchSAEConfig(SAEConfig):
    """SAELens config of a Switch SAE: d_sae = n_experts * expert_width + shared_width.

    n_experts       N routed experts
    k               active latents per token, all experts together
    active_experts  m experts each token is routed to (its top-m); each gets (k - shared_k) / m latents
    routing         "split" (as above) or "global": the k - shared_k largest gated codes over the m experts
    shared_width    s latents of an always-active, ungated expert (0: none)
    shared_k        active latents of the shared expert, out of k
    router_bias     experts are chosen by p + router_bias (a weight `router_bias` [N]), still gated by p
    """

    n_experts: int = 1
    k: int = 1
    active_experts: int = 1
    routing: str = "split"
    shared_width: int = 0
    shared_k: int = 0
    router_bias: bool = False

    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    def __post_init__(self) -> None:
        super().__post_init__()
        routed = self.d_sae - self.shared_width
        if self.n_experts < 1 or routed < self.n_experts or routed % self.n_experts:
            raise ValueError(f"d_sae - shared_width = {routed} latents do not split into n_experts={self.n_experts} "
                             "equal experts")
        if not 1 <= self.active_experts <= self.n_experts:
            raise ValueError(f"active_experts={self.active_experts} must be in 1..n_experts={self.n_experts}")
        if bool(self.shared_width) != bool(self.shared_k) or self.shared_k > self.shared_width:
            raise ValueError(f"shared_k={self.shared_k} must be in 1..shared_width={self.shared_width} "
                             "(both 0: no shared expert)")
        if self.routing not in ("split", "global"):
            raise ValueError(f"routing={self.routing!r} must be split or global")
        if self.routing == "global":
            if not 0 < self.k - self.shared_k <= self.active_experts * self.expert_width:
                raise ValueError(f"k - shared_k = {self.k - self.shared_k} active latents do not fit in "
                                 f"{self.active_experts} experts of {self.expert_width} latents")
            return
        k_routed, rest = divmod(self.k - self.shared_k, self.active_experts)
        if k_routed < 1 or rest or k_routed > self.expert_width:
            raise ValueError(f"k - shared_k = {self.k - self.shared_k} active latents do not split evenly over "
                             f"{self.active_experts} experts of {self.expert_width} latents")

    @property
    def expert_width(self) -> int:
        """e: latents per routed expert."""
        return (self.d_sae - self.shared_width) // self.n_experts

    @property
    def k_routed(self) -> int:
        """k_r: active latents in each chosen expert."""
        return (self.k - self.shared_k) // self.active_experts


class SwitchSAE(SAE[SwitchSAEConfig]):
    """Inference-only Switch SAE for SAELens (module docstring: the math and the weights)."""

    W_router: nn.Parameter
    b_router: nn.Parameter

    def initialize_weights(self) -> None:
        """b_dec, W_dec [M, d], W_enc [d, M] (SAELens's), then the router: W_router [d, N], b_router [d]
        and, with router_bias, router_bias [N]."""
        super().initialize_weights()
        cfg, like = self.cfg, dict(dtype=self.dtype, device=self.device)
        self.W_router = nn.Parameter(torch.zeros(cfg.d_in, cfg.n_experts, **like))
        self.b_router = nn.Parameter(torch.zeros(cfg.d_in, **like))
        if cfg.router_bias:
            self.router_bias = nn.Parameter(torch.zeros(cfg.n_experts, **like))

    # --------------------------------------------------------------------------------- the forward

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] -> [T, d]: SAELens's input processing (dtype, hook_sae_input, the configured
        activation normalisation) without the b_dec subtraction, which the router does not take."""
        x = self.reshape_fn_in(x.to(self.dtype))
        x = self.run_time_activation_norm_fn_in(self.hook_sae_input(x))
        return x.reshape(-1, self.cfg.d_in)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, d] (processed input) -> (router probabilities p [T, N], chosen experts [T, m], best first)."""
        p = torch.softmax((x - self.b_router) @ self.W_router, dim=-1)
        score = p + self.router_bias if self.cfg.router_bias else p
        if self.cfg.active_experts == 1:
            return p, score.argmax(dim=-1, keepdim=True)
        return p, score.topk(self.cfg.active_experts, dim=-1).indices

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] -> dense codes f [..., M] (module docstring), with p_i inside the routed codes."""
        cfg = self.cfg
        lead = x.shape[:-1]
        x = self._input(x)
        probs, chosen = self.route(x)  # [T, N], [T, m]
        pre = self.hook_sae_acts_pre((x - self.b_dec * cfg.apply_b_dec_to_input) @ self.W_enc)  # [T, M]
        n_routed = cfg.n_experts * cfg.expert_width
        codes = torch.zeros_like(pre)
        # routed experts: each chosen expert's own latents, its top k_r, scaled by its gate p_i
        per_expert = pre[:, :n_routed].view(len(x), cfg.n_experts, cfg.expert_width)  # [T, N, e]
        picked = per_expert.gather(1, chosen[..., None].expand(-1, -1, cfg.expert_width))  # [T, m, e]
        if cfg.routing == "global":  # one top-k over the m experts' gated codes
            gated = picked.relu() * probs.gather(1, chosen)[..., None]  # [T, m, e]
            vals, flat = gated.flatten(1).topk(cfg.k - cfg.shared_k, dim=-1)  # [T, k_r]
            latents = chosen.gather(1, flat // cfg.expert_width) * cfg.expert_width + flat % cfg.expert_width
        else:  # each chosen expert's own top k_r
            vals, idx = picked.topk(cfg.k_routed, dim=-1)  # [T, m, k_r]
            vals = vals.relu() * probs.gather(1, chosen)[..., None]
            latents = chosen[..., None] * cfg.expert_width + idx  # [T, m, k_r] in 0..N e - 1
        codes.scatter_(1, latents.flatten(1), vals.flatten(1))
        if cfg.shared_width:  # the shared expert: every token, no gate
            s_vals, s_idx = pre[:, n_routed:].topk(cfg.shared_k, dim=-1)  # [T, shared_k]
            codes.scatter_(1, n_routed + s_idx, s_vals.relu())
        return self.hook_sae_acts_post(codes.view(*lead, cfg.d_sae))

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """f [..., M] -> x_hat = f W_dec + b_dec [..., d] (then SAELens's output hooks and normalisation)."""
        x_hat = self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)
        return self.reshape_fn_out(self.run_time_activation_norm_fn_out(x_hat), self.d_head)

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Refused: scaling W_enc's columns would change which latents each expert's TopK keeps."""
        raise NotImplementedError("folding decoder norms into a Switch SAE's encoder would change its TopK "
                                  "selection; its decoder rows are unit norm already")


if ARCHITECTURE not in SAE_CLASS_REGISTRY:  # importing the module twice (another name) registers once
    register_sae_class(ARCHITECTURE, SwitchSAE, SwitchSAEConfig)
