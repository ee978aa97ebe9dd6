"""FLOP and parameter accounting for every SAE architecture in `train.saes`.

Conventions
-----------
* Costs are **per token** (one row of the activation batch); multiply by the batch size B.
* A multiply-add is 2 FLOPs: an [a, b] x [b, c] matmul costs 2abc.
* Only matmul-like work (mm, bmm, einsum, and the embedding bag of the sparse decoder) is counted.
  Elementwise ops, biases, ReLU, top-k selection, softmax, norms and the losses are ignored. These
  are the rules of `torch.utils.flop_counter.FlopCounterMode` (taught the embedding-bag ops by
  `counter_mapping()`), and `tests/train/test_flops.py` checks every formula against it on the real
  modules.
* Symbols: d input dims, M total latents, k active latents per token; for Switch, N experts and
  e = M / N an expert's width (`expert_width`: width // N with `model.match=width`, the configured
  `width` itself with `model.match=flops`, then M = N * e).
* `forward` is inference: `sae.decode(sae.encode(x))`. `train` is one training step, forward +
  backward of `sae(x).losses["loss"]` (what torch autograd runs on our code), optimizer excluded.
* `sparse_backward=True` (architectures with TopK-style codes, `SAE.sparse_codes`: topk, switch and
  batchtopk) counts a backward that exploits the sparse code: only the k active pre-activations get a gradient,
  so the encoder backward is two gathers of k rows (grad of the k active W_enc rows, 2kd, and grad
  of the input, 2kd) instead of two dense matmuls. It is the same 4kd for the dense TopK encoder as
  for a Switch expert (and for batchtopk, whose k is the mean over tokens). relu, gated and jumprelu have dense codes and no such backward: asking for it raises
  ValueError. `sparse_backward=False` counts the dense backward, whether plain autograd runs it or
  the grouped matmuls of train/saes/kernels.py (the same 4de per token). `dense_decoder=True`
  (architectures with experts, `SAE.has_experts`: switch) counts the decoder as narrow experts run
  it by default (train/saes/kernels.py `decode_grouped`): each token's dense codes over its
  expert's e latents times that expert's decoder, 2de forward and 4de backward instead of 2kd and
  4kd: more FLOPs, fewer seconds. `algorithmic_cost` is the minimum (sparse backward, embedding-bag
  decoder), independent of the kernels; eval reports it.
* A transcoder (`transcoder=True`; architectures with `SAE.transcodes`) adds its input centre b_in [d]
  (no FLOPs); its skip connection (`skip=True`) adds W_skip [d, d]: 2d^2 forward, 4d^2 in training
  (`transcoder_cost`).

Formulas (FLOPs per token)
--------------------------
========  =================================  ==========================  ===========================
arch      forward                            train (dense backward)      train (sparse backward)
========  =================================  ==========================  ===========================
topk      2dM + 2kd                          6dM + 6kd                   2dM + 10kd
switch    2dN + 2de + 2kd                    6dN + 6de + 6kd             6dN + 2de + 10kd
relu      4dM                                10dM                        (ValueError)
gated     4dM                                16dM                        (ValueError)
batchtopk 2dM + 2kd                          6dM + 6kd                   2dM + 10kd
jumprelu  4dM                                10dM                        (ValueError)
========  =================================  ==========================  ===========================

Parameters: topk, relu and batchtopk 2Md + M + d; switch 2Md + Nd + 2d (W_enc, W_dec [N, e, d], W_router
[N, d], b_router, b_pre); gated 2Md + 3M + d (b_gate, r_mag, b_mag); jumprelu 2Md + 2M + d (b_enc,
log_theta).

Each architecture's `cost_formula` classmethod (train/saes/<arch>.py) computes its row, next to
the derivation of every term; this module checks the arguments and dispatches to it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from train.saes.base import REGISTRY

if TYPE_CHECKING:
    from train.saes.base import SAE


@dataclass(frozen=True)
class Cost:
    """Size and compute of one SAE, per token."""

    params: int  # trainable parameter count (== sum(p.numel() for p in sae.parameters()))
    forward: float  # FLOPs per token, forward (inference) pass: decode(encode(x))
    train: float  # FLOPs per token, one training step (forward + backward), optimizer excluded


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if v < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return v


def _size(name: str, value: Any) -> int | tuple[int, ...]:
    """A size argument: a positive integer, or a non-empty list of them (e.g. nested prefix widths) as a tuple."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{name} must be a positive integer or a non-empty list of them, got {value!r}")
        return tuple(_positive(f"{name}[{i}]", v) for i, v in enumerate(value))
    return _positive(name, value)


def _choice(arch: str, name: str, value: Any, choices: tuple[str, ...]) -> str:
    """A size argument that names a form (one of `choices`), such as Switch's routing."""
    if value not in choices:
        raise ValueError(f"{arch}'s {name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _unknown(arch: Any) -> ValueError:
    return ValueError(f"unknown SAE architecture {arch!r}; choose one of {', '.join(REGISTRY)}")


def _archs_with(attribute: str) -> str:
    """The registered architectures whose class sets `attribute`, as prose: "topk and switch"."""
    names = [arch for arch, cls in REGISTRY.items() if getattr(cls, attribute)]
    return " and ".join(names) if len(names) <= 2 else ", ".join(names[:-1]) + " and " + names[-1]


def cost(arch: str, d: int, *, sparse_backward: bool = False, dense_decoder: bool = False, transcoder: bool = False,
         skip: bool = False, **sizes: int | list[int] | None) -> Cost:
    """Parameters and FLOPs per token of an `arch` SAE on d-dimensional inputs (see the module doc).

    `sizes` are the architecture's `size_args` (each a positive integer, or a list of them for an
    architecture whose size is one, such as nested prefix widths, or one of the names its
    `size_choices` lists, such as Switch's routing), all required but those in its `size_defaults`. Raises ValueError for an unknown arch, a missing, non-positive or inapplicable
    argument, k larger than the (expert) width, sparse_backward with dense codes (relu, gated), or
    dense_decoder without experts.
    """
    if arch not in REGISTRY:
        raise _unknown(arch)
    cls = REGISTRY[arch]
    given = {**cls.size_defaults, **{name: v for name, v in sizes.items() if v is not None}}
    extra = [name for name in given if name not in cls.size_args]
    if extra:
        raise ValueError(f"{arch} takes {', '.join(cls.size_args)}, not {', '.join(extra)}")
    missing = [name for name in cls.size_args if name not in given]
    if missing:
        raise ValueError(f"{arch} needs {', '.join(missing)}")
    d = _positive("d", d)
    a = {name: _choice(arch, name, given[name], cls.size_choices[name]) if name in cls.size_choices
         else 0 if cls.size_defaults.get(name) == 0 and given[name] == 0 else _size(name, given[name])
         for name in cls.size_args}
    if sparse_backward and not cls.sparse_codes:
        raise ValueError(f"sparse_backward applies to {_archs_with('sparse_codes')} only; {arch} has dense codes")
    if dense_decoder and not cls.has_experts:
        raise ValueError(f"dense_decoder applies to {_archs_with('has_experts')} only, not {arch}")
    if (transcoder or skip) and not cls.transcodes:
        raise ValueError(f"transcoders are {_archs_with('transcodes')} only, not {arch}")
    if skip and not transcoder:
        raise ValueError("skip is a transcoder's skip connection (transcoder=True)")
    c = cls.cost_formula(d, **a, sparse_backward=sparse_backward, dense_decoder=dense_decoder)
    return transcoder_cost(c, d, transcoder, skip)


def transcoder_cost(c: Cost, d: int, transcoder: bool, skip: bool) -> Cost:
    """An architecture's cost as a transcoder: b_in [d] beside b_pre (no FLOPs), and with the skip
    connection W_skip [d, d]: 2d^2 forward (x W_skip^T), and in training 2d^2 more for grad W_skip (x needs
    no gradient)."""
    extra = d * d if skip else 0
    return Cost(params=c.params + (d if transcoder else 0) + extra, forward=c.forward + 2 * extra,
                train=c.train + 4 * extra)


def sae_cost(sae: SAE, sparse_backward: bool | None = None, dense_decoder: bool | None = None) -> Cost:
    """`cost` of a built SAE, from `sae.arch` and `sae.config()`; sparse_backward=None counts the
    backward the module runs (`sae.sparse_backward`: for topk, switch and batchtopk set by `sae.kernels`, by
    default sparse for wide experts, dense grouped matmuls for narrow ones; train/saes/kernels.py),
    and likewise dense_decoder=None the decoder it runs (`sae.dense_decoder`, switch only)."""
    arch = getattr(sae, "arch", None)
    if arch not in REGISTRY:
        raise _unknown(arch)
    if sparse_backward is None:
        sparse_backward = sae.sparse_backward
    if dense_decoder is None:
        dense_decoder = sae.dense_decoder
    config = sae.config()
    return cost(arch, config["d"], **{name: config[name] for name in REGISTRY[arch].size_args},
                sparse_backward=sparse_backward, dense_decoder=dense_decoder,
                transcoder=config.get("transcoder", False), skip=config.get("skip", False))


def algorithmic_cost(sae: SAE) -> Cost:
    """The fewest FLOPs the architecture needs, whatever kernels run it: the sparse backward and the
    embedding-bag decoder for TopK-style codes (topk, switch and batchtopk: what eval reports and Figure 1
    plots), the dense count for dense codes (relu and gated)."""
    return sae_cost(sae, sparse_backward=sae.sparse_codes, dense_decoder=False)


def _bag_forward(weight, indices, *args: Any, **kwargs: Any) -> int:
    """aten._embedding_bag: every index adds one weighted row of width d."""
    return 2 * indices[0] * weight[1]


def _bag_weights_backward(grad, weight, indices, *args: Any, **kwargs: Any) -> int:
    """aten._embedding_bag_per_sample_weights_backward: one dot product of width d per index."""
    return 2 * indices[0] * weight[1]


def _bag_backward(grad, indices, *args: Any, **kwargs: Any) -> int:
    """aten._embedding_bag_backward: one weighted row of width d scattered into W per index."""
    return 2 * indices[0] * grad[1]


def _sampled_addmm(mask, a, *args: Any, **kwargs: Any) -> int:
    """aten.sparse_sampled_addmm (the sparse decoder's grad of the code values): one dot product of
    a's width per stored entry of the mask. Reads the tensors themselves (`_get_raw`): the count
    depends on nnz, not shapes."""
    return 2 * mask._nnz() * a.shape[1]


_sampled_addmm._get_raw = True  # type: ignore[attr-defined]


def _grouped_mm(a, b, *args: Any, **kwargs: Any) -> int:
    """aten._grouped_mm: [T, K] x [G, K, n] (each row by its group's matrix) -> 2Tkn; [m, T] x [T, n]
    (a weight gradient, summed within groups) -> 2mTn; [G, m, K] x [G, K, n] -> 2GmKn."""
    if len(a) == 2 and len(b) == 3:
        return 2 * a[0] * a[1] * b[2]
    if len(a) == 2 and len(b) == 2:
        return 2 * a[0] * a[1] * b[1]
    if len(a) == 3 and len(b) == 3:
        return 2 * a[0] * a[1] * a[2] * b[2]
    raise NotImplementedError(f"grouped_mm of shapes {a} x {b}")


def counter_mapping() -> dict:
    """`FlopCounterMode(custom_mapping=counter_mapping())`: teaches torch's counter the embedding-bag
    ops of our sparse decoder and encoder backward (bags of rows, and the weight gradients as bags per
    latent), the sampled dot products of the decoder's value gradient (each 2kd per token as above)
    and the grouped matmul of Switch experts (it counts them as 0 otherwise)."""
    import torch

    aten = torch.ops.aten
    return {aten._embedding_bag: _bag_forward,
            aten._embedding_bag_forward_only: _bag_forward,
            aten.sparse_sampled_addmm: _sampled_addmm,
            aten._embedding_bag_per_sample_weights_backward: _bag_weights_backward,
            aten._embedding_bag_backward: _bag_backward,
            aten._grouped_mm: _grouped_mm}
