"""Expert parallelism for the Switch SAE: the N experts split over G ranks; tokens travel to them.

The world's ranks form world / G replicas of G ranks (rank = replica * G + j). Rank j of a replica
holds experts [j N/G, (j+1) N/G) (their encoder and decoder rows and Adam moments); the router,
b_pre and b_router are replicated on every rank. One step on a rank with its local batch x [B, d]:

    p, i* = route(x)                                          [B, N], [B]   (no traffic)
    sort the tokens by i*, hence by the rank that owns i*
    all-to-all of the per-expert token counts                 [N] ints: who receives how many of which
    all-to-all (uneven splits) of x - b_pre to the owners     -> [n_in, d] on each owner
    owners: each expert's TopK encoder and decoder on its own tokens (the kernels one process uses)
    all-to-all back: y [B, d], E_i*(x - b_pre) in the original order
    x_hat = p_i* y + b_pre;  loss = MSE + alpha d L_aux, with f_i and P_i over every rank's tokens

Autograd retraces both exchanges backwards. Tokens whose expert is local never leave their rank,
so each exchange moves (B - local tokens) x d elements per rank: 2 B d elements a step forward (and
as many backward) less the local ones, the least a design that moves activations, not weights, can do.

Gradients: the replicated parameters are averaged over all ranks. An expert's gradient reaches its
owner already summed over the G ranks of the replica (through the exchange's backward); it is summed
over the world / G ranks that hold the same experts and divided by the world size, which is the
gradient of the mean of every rank's loss: the one-process gradient on the union of the batches.
Clipping uses the global norm (the replicated part, plus the expert parts summed over a replica).
Checkpoints hold the whole SAE and optimizer state (gathered from the G shards), so a run resumes
on any number of ranks and any G that divides N.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as td
from torch import nn

from train.config import TrainError
from train.dist import DataParallel, Dist
from train.saes.base import Codes, Output
from train.saes.switch import SwitchSAE

EXPERT_KEYS = ("W_enc", "W_dec")  # the parameters (and Adam moments) split over a replica's ranks


@dataclass
class ExpertGroups:
    """This rank's place among the expert shards: index j in 0..size-1 of its replica, the process
    group of the replica's `size` ranks (`experts`) and that of the ranks holding the same experts as
    this one in the other replicas (`replicas`). `sent` counts the bytes this rank's exchanges sent
    to other ranks, forward and backward."""

    size: int
    index: int
    experts: td.ProcessGroup
    replicas: td.ProcessGroup
    sent: dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})

    @classmethod
    def build(cls, dist: Dist, size: int) -> ExpertGroups:
        if dist.world % size:
            raise TrainError(f"expert_parallel={size} does not divide the number of ranks {dist.world}")
        mine = {}
        # every rank creates every group, in the same order (torch.distributed.new_group's rule)
        for name, members in [*[("experts", range(r * size, (r + 1) * size)) for r in range(dist.world // size)],
                              *[("replicas", range(j, dist.world, size)) for j in range(size)]]:
            group = td.new_group(list(members))
            if dist.rank in members:
                mine[name] = group
        return cls(size, dist.rank % size, mine["experts"], mine["replicas"])

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Shards t [N/G, ...] of the replica's ranks -> the whole tensor [N, ...], on every rank."""
        parts = [torch.empty_like(t) for _ in range(self.size)]
        td.all_gather(parts, t.contiguous(), group=self.experts)
        return torch.cat(parts)

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """The whole tensor t [N, ...] -> this rank's shard [N/G, ...] (a copy)."""
        return t.chunk(self.size)[self.index].clone()

    def all_to_all(self, x: torch.Tensor, send: list[int], recv: list[int], direction: str) -> torch.Tensor:
        """Rows of x [sum(send), ...]: send[j] of them, in order, to rank j of the replica -> the
        rows received [sum(recv), ...], grouped by sender."""
        out = x.new_empty((sum(recv), *x.shape[1:]))
        td.all_to_all_single(out, x.contiguous(), recv, send, group=self.experts)
        self.sent[direction] += (sum(send) - send[self.index]) * math.prod(x.shape[1:]) * x.element_size()
        return out


class _Exchange(torch.autograd.Function):
    """y = all_to_all(x) (ExpertGroups.all_to_all); backward: the gradients travel the other way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], groups: ExpertGroups) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.groups = send, recv, groups
        return groups.all_to_all(x, send, recv, "forward")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.groups.all_to_all(grad, ctx.recv, ctx.send, "backward"), None, None, None


class ExpertParallelSwitch(SwitchSAE):
    """A Switch SAE of N experts that holds experts [first, first + N/G) only (W_enc, W_dec
    [N/G, e, d]) and the whole router; its forward runs every token's expert on the rank holding it.

    Its Output's codes are those of the tokens this rank's experts encoded (global latent indices,
    values without the gate): enough for L0 and dead latents, which the loop sums over ranks."""

    def __init__(self, full: SwitchSAE, groups: ExpertGroups):
        held = full.n_experts // groups.size
        super().__init__(full.d, held, full.expert_width, full.k, full.alpha)
        self.n_experts, self.first, self.groups = full.n_experts, groups.index * held, groups
        self.W_router = nn.Parameter(torch.empty_like(full.W_router))
        self.kernels, self.global_mean = full.kernels, full.global_mean
        self.to(full.b_pre.device)
        self.load_state_dict({k: groups.shard(v) if k in EXPERT_KEYS else v for k, v in full.state_dict().items()})

    def encode(self, x: torch.Tensor) -> Codes:
        raise NotImplementedError("a shard of the experts cannot encode alone: use ExpertParallel.full_sae(sae)")

    decode = encode

    def forward(self, x: torch.Tensor) -> Output:
        probs, expert = self.route(x)  # [B, N], [B]
        y, codes = self.run_experts(x - self.b_pre, expert)
        recon = probs.gather(1, expert[:, None]) * y + self.b_pre
        return self.output(x, recon, codes, expert, probs)

    def run_experts(self, xc: torch.Tensor, expert: torch.Tensor) -> tuple[torch.Tensor, Codes]:
        """xc [B, d] (x - b_pre), expert [B] in 0..N-1 -> (y [B, d], each token's expert output
        computed on the rank that holds the expert; Codes of the tokens this rank's experts encoded)."""
        g, held = self.groups, self.W_enc.shape[0]
        order = expert.argsort(stable=True)  # grouped by expert, so by owning rank
        counts = torch.bincount(expert, minlength=self.n_experts)  # [N]
        got = g.all_to_all(counts, [held] * g.size, [held] * g.size, "forward")  # [G * held]: per sender, per my expert
        send, recv = counts.view(g.size, held).sum(1).tolist(), got.view(g.size, held).sum(1).tolist()
        x_in = _Exchange.apply(xc[order], send, recv, g)  # [n_in, d], by sender, then by expert
        e_in = torch.arange(held, device=xc.device).repeat(g.size).repeat_interleave(got)  # [n_in] local expert
        vals, idx = self.encode_experts(x_in, e_in)
        y_sorted = _Exchange.apply(self.decode_experts(idx, vals, e_in), recv, send, g)  # [B, d] in `order`
        y = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)
        offset = self.first * self.expert_width
        return y, Codes(idx=idx + offset, vals=vals, expert=e_in + self.first)


class ExpertParallel(DataParallel):
    """The layout (train/dist.py) of a Switch SAE whose experts are split over `size` ranks."""

    def __init__(self, dist: Dist, size: int):
        super().__init__(dist)
        self.groups = ExpertGroups.build(dist, size)

    def prepare(self, sae: nn.Module) -> nn.Module:
        if not isinstance(sae, SwitchSAE) or sae.n_experts % self.groups.size:
            raise TrainError(f"expert_parallel={self.groups.size} needs a switch model whose n_experts it divides")
        super().prepare(sae)  # rank 0's weights, global f_i and P_i
        self.sae = ExpertParallelSwitch(sae, self.groups)
        return self.sae

    def _is_expert(self) -> list[bool]:
        return [name in EXPERT_KEYS for name, _ in self.sae.named_parameters()]

    def sync_grads(self) -> None:
        grads = list(zip([p.grad for p in self.sae.parameters()], self._is_expert()))
        self.dist.all_reduce_mean_([g for g, expert in grads if not expert])
        self.dist.all_reduce_mean_([g for g, expert in grads if expert], group=self.groups.replicas,
                                   divisor=self.dist.world)

    def grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        shards = {id(self.sae.W_enc.grad), id(self.sae.W_dec.grad)}
        own = torch.nn.utils.get_total_norm([g for g in grads if id(g) in shards]) ** 2
        td.all_reduce(own, group=self.groups.experts)
        return (torch.nn.utils.get_total_norm([g for g in grads if id(g) not in shards]) ** 2 + own).sqrt()

    def _map_opt(self, state: dict, fn: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """An Adam state_dict with fn applied to the moments of the expert parameters."""
        experts = {i for i, e in enumerate(self._is_expert()) if e}
        return {**state, "state": {i: {k: fn(v) if i in experts and k != "step" else v for k, v in s.items()}
                                   for i, s in state["state"].items()}}

    def _full_weights(self, sae: nn.Module) -> dict[str, torch.Tensor]:
        return {k: self.groups.gather(v) if k in EXPERT_KEYS else v for k, v in sae.state_dict().items()}

    def full_state(self, sae: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
        return self._full_weights(sae), self._map_opt(opt.state_dict(), self.groups.gather)

    def load_opt(self, opt: torch.optim.Optimizer, state: dict) -> None:
        opt.load_state_dict(self._map_opt(state, self.groups.shard))

    def full_sae(self, sae: nn.Module) -> SwitchSAE:
        full = SwitchSAE(**sae.config()).to(sae.b_pre.device)
        full.load_state_dict(self._full_weights(sae))
        full.kernels = sae.kernels
        return full
