"""FLOP and parameter accounting for every SAE architecture in `train.saes`.

Conventions
-----------
* Costs are **per token** (one row of the activation batch); multiply by the batch size B.
* A multiply-add is 2 FLOPs: an [a, b] x [b, c] matmul costs 2abc.
* Only matmul-like work (mm, bmm, einsum, and the embedding bag of the sparse decoder) is counted.
  Elementwise ops, biases, ReLU, top-k selection, softmax, norms and the losses are ignored. These
  are the rules of `torch.utils.flop_counter.FlopCounterMode` (taught the embedding-bag ops by
  `counter_mapping()`), and `tests/eval/test_flops.py` checks every formula against it on the real
  modules.
* Symbols: d input dims, M total latents, k active latents per token; for Switch, N experts and
  e = M / N an expert's width (`expert_width`: width // N with `model.match=width`, the configured
  `width` itself with `model.match=flops`, then M = N * e).
* `forward` is inference: `sae.decode(sae.encode(x))`. `train` is one training step, forward +
  backward of `sae(x).losses["loss"]` (what torch autograd runs on our code), optimizer excluded.
* `sparse_backward=True` (topk and switch only) counts a backward that exploits the sparse code:
  only the k active pre-activations get a gradient, so the encoder backward is two gathers of k
  rows (grad of the k active W_enc rows, 2kd, and grad of the input, 2kd) instead of two dense
  matmuls. It is the same 4kd for the dense TopK encoder as for a Switch expert. relu and gated have
  dense codes and no such backward: asking for it raises ValueError. `sparse_backward=False` counts
  the dense backward, whether plain autograd runs it or the grouped matmuls of train/saes/kernels.py
  (the same 4de per token). `dense_decoder=True` (switch only) counts the decoder as narrow experts
  run it by default (train/saes/kernels.py `decode_grouped`): each token's dense codes over its
  expert's e latents times that expert's decoder, 2de forward and 4de backward instead of 2kd and
  4kd: more FLOPs, fewer seconds. `algorithmic_cost` is the minimum (sparse backward, embedding-bag
  decoder), independent of the kernels; eval reports it.

Formulas (FLOPs per token)
--------------------------
========  =================================  ==========================  ===========================
arch      forward                            train (dense backward)      train (sparse backward)
========  =================================  ==========================  ===========================
topk      2dM + 2kd                          6dM + 6kd                   2dM + 10kd
switch    2dN + 2de + 2kd                    6dN + 6de + 6kd             6dN + 2de + 10kd
relu      4dM                                10dM                        (ValueError)
gated     4dM                                16dM                        (ValueError)
========  =================================  ==========================  ===========================

Parameters: topk and relu 2Md + M + d; switch 2Md + Nd + 2d (W_enc, W_dec [N, e, d], W_router
[N, d], b_router, b_pre); gated 2Md + 3M + d (b_gate, r_mag, b_mag).

Where each term comes from (read with `train/saes/*.py`):

* topk. Forward: encoder (x - b_pre) @ W_enc^T, 2dM; decoder embedding bag of the k chosen W_dec rows,
  2kd. Backward: decoder, grad of vals 2kd + grad of the k chosen W_dec rows 2kd; encoder, grad
  W_enc 2dM + grad of (x - b_pre) 2dM. The input gradient is computed because b_pre is trained
  (x itself needs none). Total 6dM + 6kd.
* switch. Router (x - b_router) @ W_router^T: 2dN forward, 4dN backward (grad W_router, and grad of
  x - b_router since b_router is trained). Each token goes through its own expert's encoder only:
  2de forward, 4de backward (grad W_enc[i], grad of x - b_pre). Decoder as topk.
* relu. Encoder x @ W_enc^T 2dM and decoder codes @ W_dec 2dM, both dense. Backward: decoder grad
  W_dec 2dM + grad codes 2dM; encoder grad W_enc 2dM only. There is no input-gradient matmul,
  because x has no trainable bias subtracted (so not 3 x forward = 12dM but 10dM).
* gated. Inference: the shared gate matmul (x - b_pre) @ W_gate^T 2dM (the magnitude path
  rescales it elementwise) + decoder 2dM. Training also runs the auxiliary reconstruction
  ReLU(pi) @ W_dec.detach(), 2dM, so the module's forward is 6dM. Backward: decoder grad W_dec 2dM
  + grad codes 2dM; auxiliary decoder grad of ReLU(pi) only, 2dM (W_dec is detached); gate matmul
  grad W_gate 2dM + grad of x - b_pre 2dM. Total 6dM + 10dM = 16dM.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from train.saes import SAE

ARCHS = ("topk", "switch", "relu", "gated")
# which keyword arguments of `cost` each architecture takes (all are required)
_ARGS: dict[str, tuple[str, ...]] = {
    "topk": ("width", "k"),
    "switch": ("n_experts", "expert_width", "k"),
    "relu": ("width",),
    "gated": ("width",),
}


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


def cost(arch: str, d: int, *, width: int | None = None, k: int | None = None, n_experts: int | None = None,
         expert_width: int | None = None, sparse_backward: bool = False, dense_decoder: bool = False) -> Cost:
    """Parameters and FLOPs per token of an `arch` SAE on d-dimensional inputs (see the module doc).

    topk: width (M), k; switch: n_experts (N), expert_width (e), k; relu, gated: width (M).
    Raises ValueError for an unknown arch, a missing, non-positive or inapplicable argument,
    k larger than the (expert) width, sparse_backward with relu/gated, or dense_decoder with
    anything but switch.
    """
    if arch not in _ARGS:
        raise ValueError(f"unknown SAE architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    given = {"width": width, "k": k, "n_experts": n_experts, "expert_width": expert_width}
    extra = [name for name, v in given.items() if v is not None and name not in _ARGS[arch]]
    if extra:
        raise ValueError(f"{arch} takes {', '.join(_ARGS[arch])}, not {', '.join(extra)}")
    missing = [name for name in _ARGS[arch] if given[name] is None]
    if missing:
        raise ValueError(f"{arch} needs {', '.join(missing)}")
    d = _positive("d", d)
    a = {name: _positive(name, given[name]) for name in _ARGS[arch]}
    if sparse_backward and arch in ("relu", "gated"):
        raise ValueError(f"sparse_backward applies to topk and switch only; {arch} has dense codes")
    if dense_decoder and arch != "switch":
        raise ValueError(f"dense_decoder applies to switch only, not {arch}")

    if arch in ("topk", "switch"):
        k = a["k"]
        e = a["expert_width"] if arch == "switch" else a["width"]
        if k > e:
            raise ValueError(f"k={k} must be at most the {'expert ' if arch == 'switch' else ''}width {e}")
        # embedding bag of the k chosen decoder rows, or the expert's dense codes times its decoder
        decoder = 2 * e * d if dense_decoder else 2 * k * d
        if arch == "topk":
            m = e
            params = 2 * m * d + m + d  # W_enc, W_dec [M, d]; b_enc [M]; b_pre [d]
            router_fwd = router_bwd = 0
        else:
            n = a["n_experts"]
            m = n * e
            params = 2 * m * d + n * d + 2 * d  # W_enc, W_dec [N, e, d]; W_router [N, d]; b_router, b_pre [d]
            router_fwd, router_bwd = 2 * d * n, 4 * d * n
        encoder = 2 * d * e  # per token: the whole encoder (topk), or the token's own expert (switch)
        forward = router_fwd + encoder + decoder
        # decoder backward: grad of vals + grad of the k chosen W_dec rows (or of the expert's W_dec)
        decoder_bwd = 2 * decoder
        # encoder backward: grad W_enc + grad of x - b_pre; dense over e (or M) latents, or only k
        encoder_bwd = 2 * (2 * k * d if sparse_backward else encoder)
        train = forward + router_bwd + decoder_bwd + encoder_bwd
    else:
        m = a["width"]
        if arch == "relu":
            params = 2 * m * d + m + d  # W_enc, W_dec [M, d]; b_enc [M]; b_pre [d]
            forward = 4 * d * m  # encoder + decoder, dense
            train = forward + 6 * d * m  # grad W_dec, grad codes, grad W_enc (no input gradient)
        else:
            params = 2 * m * d + 3 * m + d  # W_gate, W_dec [M, d]; b_gate, r_mag, b_mag [M]; b_pre [d]
            forward = 4 * d * m  # gate matmul + decoder
            # + aux reconstruction 2dM; backward: grad W_dec, grad codes, aux grad of ReLU(pi)
            # (W_dec detached: no weight gradient), grad W_gate, grad of x - b_pre
            train = forward + 2 * d * m + 10 * d * m
    return Cost(params=params, forward=float(forward), train=float(train))


def sae_cost(sae: SAE, sparse_backward: bool | None = None, dense_decoder: bool | None = None) -> Cost:
    """`cost` of a built SAE, from `sae.arch` and `sae.config()`; sparse_backward=None counts the
    backward the module runs (`sae.sparse_backward`: for topk and switch set by `sae.backward`, by
    default sparse for wide experts, dense grouped matmuls for narrow ones; train/saes/kernels.py),
    and likewise dense_decoder=None the decoder it runs (`sae.dense_decoder`, switch only)."""
    arch = getattr(sae, "arch", None)
    if arch not in _ARGS:
        raise ValueError(f"unknown SAE architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if sparse_backward is None:
        sparse_backward = sae.sparse_backward
    if dense_decoder is None:
        dense_decoder = sae.dense_decoder
    config = sae.config()
    return cost(arch, config["d"], **{name: config[name] for name in _ARGS[arch]}, sparse_backward=sparse_backward,
                dense_decoder=dense_decoder)


def algorithmic_cost(sae: SAE) -> Cost:
    """The fewest FLOPs the architecture needs, whatever kernels run it: the sparse backward and the
    embedding-bag decoder for topk and switch (what eval reports and Figure 1 plots), the dense
    count for relu and gated."""
    sparse = sae.arch in ("topk", "switch")
    return sae_cost(sae, sparse_backward=sparse, dense_decoder=False)


def _bag_forward(weight, indices, *args: Any, **kwargs: Any) -> int:
    """aten._embedding_bag: every index adds one weighted row of width d."""
    return 2 * indices[0] * weight[1]


def _bag_weights_backward(grad, weight, indices, *args: Any, **kwargs: Any) -> int:
    """aten._embedding_bag_per_sample_weights_backward: one dot product of width d per index."""
    return 2 * indices[0] * weight[1]


def _bag_backward(grad, indices, *args: Any, **kwargs: Any) -> int:
    """aten._embedding_bag_backward: one weighted row of width d scattered into W per index."""
    return 2 * indices[0] * grad[1]


def _sparse_addmm(out, sparse, dense, *args: Any, **kwargs: Any) -> int:
    """aten._sparse_addmm (the sparse encoder backward's grad W = S^T xc): one multiply-add per stored
    value and column. Reads the tensors themselves (`_get_raw`): the count depends on nnz, not shapes."""
    return 2 * sparse._nnz() * dense.shape[1]


_sparse_addmm._get_raw = True  # type: ignore[attr-defined]


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
    ops of our sparse decoder and encoder backward, the sparse matmul of the encoder's weight
    gradient (each 2kd per token as above) and the grouped matmul of Switch experts (it counts
    them as 0 otherwise)."""
    import torch

    aten = torch.ops.aten
    return {aten._embedding_bag: _bag_forward,
            aten._embedding_bag_per_sample_weights_backward: _bag_weights_backward,
            aten._embedding_bag_backward: _bag_backward,
            aten._sparse_addmm: _sparse_addmm,
            aten._grouped_mm: _grouped_mm}
