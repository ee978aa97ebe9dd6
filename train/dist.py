"""Training across processes on torch.distributed: one process per device (`torchrun`), every rank
reading its own share of the store's chunks.

    torchrun --standalone --nproc_per_node=R -m train ...                        data parallel
    torchrun --standalone --nproc_per_node=R -m train model=switch expert_parallel=G ...
                                       Switch experts split over G ranks, R / G replicas (expert_parallel.py)

`init()` joins the process group when torchrun started several processes (runtime/ranks.py) and
returns a `Dist`, whose collectives do nothing with one process, so the loop reads the same either way.

How the SAE lies over the ranks is a layout, with the same methods for the loop whatever it is:

    sae = layout.prepare(sae)        after initialisation: rank 0's weights everywhere (and shards)
    layout.sync_grads()              after backward: every rank holds the global batch's gradients
    layout.grad_norm(grads)          the global gradient norm, for clipping
    layout.full_state(sae, opt)      the whole SAE's and optimizer's state, for checkpoints
    layout.load_opt(opt, state)      a whole optimizer state, as this rank's optimizer needs it
    layout.full_sae(sae)             the whole SAE, to save at the end

`DataParallel` (here) replicates the SAE: with losses that are means over equal-sized local batches,
averaging the gradients gives the one-process update on the union of the ranks' batches, and the
weights stay identical on every rank (all-reduce results are bitwise the same everywhere; the
optimizer step is then the same computation). Checkpoints hold the whole state, so a run resumes
on any number of ranks and any layout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as td
from torch import nn

from runtime.ranks import Ranks, join


class _MeanAcrossRanks(torch.autograd.Function):
    """y = mean over ranks of x (the same on every rank); backward: the mean over ranks of y's gradient.

    That backward is what makes averaging parameter gradients afterwards exact: with J = mean_r L_r(y),
    rank r's share of dJ/dtheta flows through its own x_r, and W * dJ/dx_r = mean_r' dL_r'/dy. (When
    dL_r/dy is the same on every rank, as in Switch's aux loss, that mean changes nothing; it is one
    small collective, kept so the function is right for any loss.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.detach().clone(memory_format=torch.contiguous_format)
        td.all_reduce(y)
        return y.div_(td.get_world_size())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        g = grad.clone(memory_format=torch.contiguous_format)
        td.all_reduce(g)
        return g.div_(td.get_world_size())


# _MeanAcrossRanks.apply as a graph break under torch.compile; set by init() with several ranks
# (torch.compiler.disable imports dynamo, which takes seconds, so not at import time).
_mean_across_ranks: Callable[[torch.Tensor], torch.Tensor] = _MeanAcrossRanks.apply


@dataclass(frozen=True)
class Dist(Ranks):
    """Ranks (rank, world, local_rank, device) plus the collectives the loop uses; with world == 1
    each of them returns at once."""

    def all_reduce_mean_(self, tensors: Sequence[torch.Tensor], group: td.ProcessGroup | None = None,
                         divisor: int | None = None) -> None:
        """Sum tensors (gradients) over the ranks of `group` (default: all) and divide by `divisor`
        (default: the group's size), in place: one flattened all-reduce per dtype. Every rank of the
        group must pass tensors of the same shapes and dtypes in the same order."""
        size = self.world if group is None else td.get_world_size(group)
        divisor = size if divisor is None else divisor
        if size == 1:
            if divisor != 1:
                torch._foreach_div_(list(tensors), divisor)
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for same in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in same])  # [sum of numels]
            td.all_reduce(flat, group=group)
            flat.div_(divisor)
            torch._foreach_copy_(same, [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in same]), same)])

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable mean over ranks of a per-rank statistic x [...] (e.g. a batch mean, which
        becomes the mean over every rank's tokens when local batches are equal-sized)."""
        return x if self.world == 1 else _mean_across_ranks(x)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of t [...] (no gradient), as a new tensor; t itself when world == 1."""
        if self.world == 1:
            return t
        out = t.detach().clone()
        td.all_reduce(out)
        return out

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise max over ranks of t [...], as a new tensor; t itself when world == 1."""
        if self.world == 1:
            return t
        out = t.detach().clone()
        td.all_reduce(out, op=td.ReduceOp.MAX)
        return out

    def broadcast_(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers copied into every rank's module, in place."""
        if self.world == 1:
            return
        for t in [*module.parameters(), *module.buffers()]:
            td.broadcast(t.detach(), src=0)

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world > 1:
            td.barrier()


def init(device: torch.device) -> Dist:
    """The Dist of this process (runtime.ranks.join: CUDA ranks get cuda:LOCAL_RANK and NCCL, others gloo)."""
    ranks = join(device)
    if ranks.world > 1:
        global _mean_across_ranks
        _mean_across_ranks = torch.compiler.disable(_MeanAcrossRanks.apply)
    return Dist(ranks.rank, ranks.world, ranks.local_rank, ranks.device)


class DataParallel:
    """Every rank holds the whole SAE (module docstring); with one process every method is trivial."""

    def __init__(self, dist: Dist):
        self.dist = dist
        self.sae: nn.Module | None = None

    def prepare(self, sae: nn.Module) -> nn.Module:
        """Rank 0's weights on every rank; batch statistics inside the loss (Switch's f_i and P_i)
        become statistics of all ranks' tokens."""
        self.dist.broadcast_(sae)
        if self.dist.world > 1 and hasattr(sae, "global_mean"):
            sae.global_mean = self.dist.mean
        self.sae = sae
        return sae

    def sync_grads(self) -> None:
        self.dist.all_reduce_mean_([p.grad for p in self.sae.parameters() if p.grad is not None])

    def grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        return torch.nn.utils.get_total_norm(grads)

    def full_state(self, sae: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
        return sae.state_dict(), opt.state_dict()

    def load_opt(self, opt: torch.optim.Optimizer, state: dict) -> None:
        opt.load_state_dict(state)

    def full_sae(self, sae: nn.Module) -> nn.Module:
        return sae
