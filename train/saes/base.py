"""The one interface every SAE architecture implements, and the registry that picks one by name.

Shapes: B tokens, d input dims, M total latents, k active latents per token (TopK-style).
Decoder directions are stored as ROWS ([M, d]), so decoding k latents is a gather of k rows.

An architecture is one module (its `SAE` subclass, `@register`ed) and one YAML
(conf/train/model/<arch>.yaml). The class carries everything the other stages need to know about it
(the contract, checked for every registered architecture by tests/test_contract.py):

  naming        arch, display_name
  config        model_rules, check_model, constructor_kwargs (the YAML's keys -> constructor arguments),
                width_match, expert_parallel_problem
  cost          size_args, size_defaults, size_choices, cost_formula (parameters and FLOPs per token)
  transcoder    transcodes (may read one site and reconstruct another: `transcoder=True`, model key skip;
                split, centred, skipped, reconstruct read a row the way every stage must)
  shape         layout(): d, M, k, N experts and which expert owns a latent; decoder_directions(),
                encoder_directions() [M, d] (what metrics, geometry and dashboards read)
  SAELens       saelens_architecture (None: no counterpart, saelens_refusal says why), to_saelens(),
                saelens_imports, check_saelens_config(), from_saelens() (the exact weight maps)

Stages read an architecture only through these; none branches on an architecture's name.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from runtime.config import CONF, Rule, check_values, integer

if TYPE_CHECKING:
    from train.saes.flops import Cost


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

    def nonzero(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row [F], latent [F], value [F]) of every non-zero code, F of them, ordered by row: row
        indexes the batch (0..B-1), latent is in 0..M-1."""
        if self.dense is not None:
            row, latent = (self.dense > 0).nonzero(as_tuple=True)
            return row, latent, self.dense[row, latent]
        row, slot = (self.vals > 0).nonzero(as_tuple=True)
        return row, self.idx[row, slot], self.vals[row, slot]

    def fired(self, n_latents: int, n_rows: int | None = None) -> torch.Tensor:
        """[M] bool, M = n_latents: which latents are non-zero in at least one of the batch's first
        `n_rows` tokens (None: every token). No host synchronisation."""
        active = self.active()[:n_rows]
        if self.dense is not None:
            return active.any(dim=0)
        hits = torch.zeros(n_latents, dtype=torch.int32, device=active.device)  # non-zero codes per latent
        return hits.index_add_(0, self.idx[:n_rows].flatten(), active.flatten().int()) > 0


@dataclass(frozen=True)
class Layout:
    """How an SAE's latents are laid out: what metrics, geometry and dashboards read instead of an
    architecture's size attributes.

    d             input width
    n_latents     M, every latent
    k             active latents per token the architecture is built for (None: set by a penalty, as in
                  ReLU; BatchTopK: the batch mean)
    n_experts     N routed experts; 0 for an SAE without a router
    expert_width  e: expert i owns latents i e .. (i+1) e - 1; latents from N e on (a shared expert) are
                  in no expert
    """

    d: int
    n_latents: int
    k: int | None = None
    n_experts: int = 0
    expert_width: int = 0

    @property
    def routed(self) -> int:
        """N e, the latents that belong to an expert (0 without a router)."""
        return self.n_experts * self.expert_width

    def expert_of(self, latent: int) -> int | None:
        """The expert that owns `latent` (0..M-1), None when it is in no expert."""
        return latent // self.expert_width if latent < self.routed else None


@dataclass
class SAELensForm:
    """An SAE in SAELens's terms: the SAELens architecture, its config fields besides d_in, d_sae, dtype
    and metadata (apply_b_dec_to_input, k, ...), the weights under SAELens's names, and whether stock
    SAELens loads it (needs_plugin: only with interop/saelens_switch.py imported)."""

    architecture: str
    fields: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    needs_plugin: bool = False


@dataclass
class FromSAELens:
    """A SAELens SAE in our terms: its size keys (conf/train/model/<arch>.yaml keys) and the entries of
    our state dict it sets (the others keep their constructed values)."""

    sizes: dict[str, Any]
    state: dict[str, torch.Tensor] = field(default_factory=dict)


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
    forward(x) -> Output and config(), and describe the architecture with the class attributes and
    classmethods below (the config schema, the cost formulas)."""

    arch: ClassVar[str]  # the registry key: `model=<arch>` in the train config, "arch" in sae.json
    display_name: ClassVar[str]  # the name in plots and reports, e.g. "TopK"
    # the constructor arguments that set the size: what `flops.cost(arch, d, ...)` takes besides d
    size_args: ClassVar[tuple[str, ...]]
    # size_args that may be left out, with their value then (one that defaults to 0 may be 0: an absent part)
    size_defaults: ClassVar[dict[str, int | str]] = {}
    # size_args that are a choice between named forms rather than a number (e.g. Switch's routing), with the choices
    size_choices: ClassVar[dict[str, tuple[str, ...]]] = {}
    # TopK-style codes (idx, vals [B, k]): training can run the sparse backward (`sparse_backward`)
    sparse_codes: ClassVar[bool] = False
    # a router sends every token to one of `n_experts` experts: the only kind of SAE expert parallel
    # shards, whose decoder may run as grouped matmuls (`dense_decoder`) and whose runs report N
    has_experts: ClassVar[bool] = False
    # TopK-style SAEs: which kernels run the encoder's backward and the decoder, "auto" | "sparse" |
    # "dense" (train/saes/kernels.py; auto picks by expert width / k) | "reference" (plain autograd)
    kernels: str = "auto"
    # the keys of conf/train/model/<arch>.yaml besides `arch` (documented there) and what each must be
    model_rules: ClassVar[dict[str, Rule]] = {}
    # AuxK (train/saes/auxk.py): the dead-latent mask [M] bool the loop sets before every training step
    # of an SAE with `aux_k` > 0 (None: not tracked)
    dead: torch.Tensor | None = None
    # the architecture can be a transcoder (`transcoder=True`, given by the trainer when data.target is set):
    # it reads one site and reconstructs another (its YAML then has the key `skip`; module docstring of
    # harvest/paired.py for the rows it reads)
    transcodes: ClassVar[bool] = False

    def __init__(self, d: int, transcoder: bool = False, skip: bool = False):
        super().__init__()
        self.d = d
        self.b_pre = nn.Parameter(torch.zeros(d))  # subtracted from the input and added to the output
        self.transcoder, self.skip = transcoder, skip
        if (transcoder or skip) and not self.transcodes:
            raise ValueError(f"{self.arch} cannot be a transcoder (those that can: {_transcoding()})")
        if skip and not transcoder:
            raise ValueError("model.skip=true is a transcoder's skip connection: it needs data.target (the site "
                             "to reconstruct)")
        if transcoder:  # the input's own centre; b_pre is then the output's
            self.b_in = nn.Parameter(torch.zeros(d))
        if skip:  # x_hat += W_skip x, from zero
            self.W_skip = nn.Parameter(torch.zeros(d, d))

    # ---- a transcoder: rows [x | y] in, y reconstructed (an autoencoder: y = x)

    @property
    def d_rows(self) -> int:
        """The width of the rows it reads: d, or 2 d for a transcoder ([x | y], harvest/paired.py)."""
        return 2 * self.d if self.transcoder else self.d

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows [B, d_rows] -> (the input x [B, d], what it reconstructs [B, d]: x itself, or a
        transcoder's target y)."""
        if self.transcoder:
            return rows[:, : self.d], rows[:, self.d :]
        return rows, rows

    def centred(self, x: torch.Tensor) -> torch.Tensor:
        """x - b_pre for an autoencoder, x - b_in for a transcoder: what every encoder reads."""
        return x - (self.b_in if self.transcoder else self.b_pre)

    def skipped(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """recon + W_skip x with the skip connection (2 d^2 FLOPs per token), else recon."""
        return recon + x @ self.W_skip.T if self.skip else recon

    def reconstruct(self, x: torch.Tensor) -> tuple[Codes, torch.Tensor]:
        """Inference without the losses: x [B, d] -> (codes, x_hat [B, d]) = (encode(x), decode(codes) and
        a transcoder's skip connection)."""
        codes = self.encode(x)
        return codes, self.skipped(x, self.decode(codes))

    def transcoder_config(self) -> dict[str, Any]:
        """The `config()` entries of the transcoder options, where the architecture has them."""
        return {"transcoder": self.transcoder, "skip": self.skip} if self.transcodes else {}

    @classmethod
    def defaults(cls, **given: Any) -> list[Any]:
        """The constructor arguments `given`, each left at None replaced by its value in
        conf/train/model/<arch>.yaml: defaults live in the YAML only, so an SAE built from Python with
        only its sizes is the one `model=<arch>` trains. `SAE.defaults(aux_k=None, aux_coeff=0.1)`
        -> [0, 0.1] for topk."""
        yaml = model_yaml(cls.arch)
        return [yaml[name] if value is None else value for name, value in given.items()]

    @classmethod
    def check_model(cls, model: Mapping[str, Any]) -> None:
        """Checks of the user-facing model keys (conf/train/model/<arch>.yaml without `arch`) that need
        no data, run as soon as the train config is read: ValueError with the message. Here: every key
        against `model_rules` (no unknown or missing key, every value of its type and range);
        subclasses add the checks across keys after it."""
        if "aux_k" in model and "aux_k" not in cls.model_rules:
            with_auxk = ", ".join(arch for arch, c in REGISTRY.items() if "aux_k" in c.model_rules)
            raise ValueError(f"model.aux_k (AuxK) needs an architecture with TopK-style dead-latent revival "
                             f"({with_auxk}), not {cls.arch}")
        rules = {f"model.{key}": rule for key, rule in cls.model_rules.items()}
        check_values({"model": dict(model)}, rules, ValueError, f"conf/train/model/{cls.arch}.yaml")

    @classmethod
    def expert_parallel_problem(cls, model: Mapping[str, Any], groups: int) -> str | None:
        """Why expert parallelism over `groups` ranks (train/expert_parallel.py) cannot run this model
        configuration, None when it can. Default: the architecture has no experts to shard."""
        sharded = " or ".join(arch for arch, c in REGISTRY.items() if c.has_experts)
        return f"expert_parallel={groups} needs model={sharded} with n_experts divisible by it (got model={cls.arch})"

    @classmethod
    def width_match(cls, model: Mapping[str, Any]) -> str | None:
        """How the model keys' width sized this SAE against a dense one of that width, "width" (the same
        latents) or "flops" (the same FLOPs per token): the report's two series. None: the width is
        the SAE's own (default)."""
        return None

    @classmethod
    def constructor_kwargs(cls, model: Mapping[str, Any], d: int) -> dict[str, Any]:
        """The config schema: the user-facing model keys (conf/train/model/<arch>.yaml without `arch`)
        for inputs of width d -> the constructor's keyword arguments; ValueError when they do not fit
        together. Default: the keys as they are, plus d."""
        cls.check_model(model)
        return {"d": d, **model}

    @classmethod
    def cost_formula(cls, d: int, *, sparse_backward: bool = False, dense_decoder: bool = False,
                     **sizes: int) -> Cost:
        """Parameters and FLOPs per token for inputs of width d and the `size_args` in `sizes` (positive
        integers, or tuples of them where a size is a list), the two flags only where the class
        attributes allow them (train.saes.flops checks all that first, and documents the conventions);
        ValueError for sizes that do not fit."""
        raise NotImplementedError

    @property
    def n_latents(self) -> int:
        """M, the total number of latents (sets the default learning rate)."""
        raise NotImplementedError

    def layout(self) -> Layout:
        """d, M, k, experts: the shape every stage reads (module docstring). Default: no k, no experts."""
        return Layout(self.d, self.n_latents)

    @classmethod
    def layout_of(cls, config: Mapping[str, Any]) -> Layout:
        """The layout of the SAE that `config()` = `config` describes (sae.json without "arch"), without
        allocating its weights (built on the meta device)."""
        with torch.device("meta"):
            return cls(**config).layout()

    def decoder_directions(self) -> torch.Tensor:
        """The decoder's feature directions, one row per latent in latent order: [M, d]."""
        return self.W_dec

    def encoder_directions(self) -> torch.Tensor:
        """The encoder-side feature directions, one row per latent in latent order: [M, d]. Default: the
        rows of W_enc."""
        return self.W_enc

    # ---- SAELens (interop/saelens_arch.py dispatches through these; stated by every architecture)
    # the SAELens architecture `to_saelens` writes; None: no counterpart (`saelens_refusal` says why)
    saelens_architecture: ClassVar[str | None]
    saelens_refusal: ClassVar[str] = ""
    # the SAELens architectures `from_saelens` may take (empty: none is imported as this one)
    saelens_imports: ClassVar[tuple[str, ...]] = ()

    def to_saelens(self) -> SAELensForm:
        """This SAE (eval mode) in SAELens's terms, exactly: same codes and reconstructions."""
        raise NotImplementedError(f"{self.arch} declares no SAELens export")

    @classmethod
    def check_saelens_config(cls, cfg: Mapping[str, Any]) -> None:
        """ValueError when a SAELens config (cfg.json, normalised) of one of `saelens_imports` lacks what
        `from_saelens` needs; run before any weight is read. Default: nothing to check."""

    @classmethod
    def from_saelens(cls, cfg: Mapping[str, Any], tensors: dict[str, torch.Tensor],
                     ours: Mapping[str, Any]) -> FromSAELens | None:
        """A SAELens SAE (config, float32 weights under SAELens's names, and what we recorded in its
        metadata when we exported it, else {}) as this architecture; None when the folder is not one
        this architecture takes (another with the same SAELens name may); ValueError when it cannot be
        reproduced exactly."""
        return None

    def config(self) -> dict[str, Any]:
        """Constructor arguments: `build(arch, **config())` rebuilds the same architecture."""
        raise NotImplementedError

    @property
    def sparse_backward(self) -> bool:
        """True when training runs the sparse encoder backward (what train.saes.flops counts)."""
        return False

    @property
    def uses_dead_latents(self) -> bool:
        """True when the forward needs the dead-latent mask `dead` (AuxK on)."""
        return bool(getattr(self, "aux_k", 0))

    def dead_rows(self) -> torch.Tensor | None:
        """Indices [D] of the dead latents when AuxK applies to this forward (training, some dead), else None."""
        if not (self.training and self.uses_dead_latents and self.dead is not None):
            return None
        rows = self.dead.nonzero().squeeze(1)
        return rows if len(rows) else None

    @property
    def dense_decoder(self) -> bool:
        """True when a TopK-style decoder runs as dense grouped matmuls (Switch, narrow experts)."""
        return False

    def schedule(self, done: float, total: float) -> None:
        """Called before every training step with how much of the run's budget is spent, `done` of
        `total` (steps, or seconds for a seconds budget): architectures with a warmed-up penalty
        update it here."""

    def unit_norm_decoders(self) -> list[nn.Parameter]:
        """Parameters [..., n, d] whose rows are decoder directions held at unit norm."""
        return []

    @torch.no_grad()
    def init_from_batch(self, rows: torch.Tensor) -> None:
        """Data-dependent initialisation from a batch of rows [B, d_rows]: b_pre <- the geometric median of
        what is reconstructed, and a transcoder's b_in <- that of its inputs."""
        from train.recipe import geometric_median

        x, target = self.split(rows)
        self.b_pre.copy_(geometric_median(target))
        if self.transcoder:
            self.b_in.copy_(geometric_median(x))

    def encode(self, x: torch.Tensor) -> Codes:
        raise NotImplementedError

    def decode(self, codes: Codes) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> Output:
        """x [B, d] -> Output: the reconstruction of x with the loss terms; a transcoder (`transcodes`)
        reconstructs `target` [B, d] instead, and only such an architecture takes one."""
        raise NotImplementedError


def _transcoding() -> str:
    return ", ".join(arch for arch, cls in REGISTRY.items() if cls.transcodes)


def saelens_weights(cfg: Mapping[str, Any], tensors: dict[str, torch.Tensor], names: set[str],
                    shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """ValueError unless `tensors` are exactly `names`, each of its shape: W_enc [d_in, d_sae], W_dec
    [d_sae, d_in], b_dec [d_in], the rest [d_sae] unless `shapes` says otherwise."""
    d, m = cfg["d_in"], cfg["d_sae"]
    if set(tensors) != names:
        raise ValueError(f"the weights are {', '.join(sorted(tensors))} but a SAELens {cfg['architecture']} SAE has "
                         f"{', '.join(sorted(names))}")
    want = {"W_enc": (d, m), "W_dec": (m, d), "b_dec": (d,), **(shapes or {})}
    for name, t in tensors.items():
        shape = want.get(name, (m,))
        if tuple(t.shape) != shape:
            raise ValueError(f"weight {name} has shape {list(t.shape)} where d_in={d}, d_sae={m} give {list(shape)}")


def saelens_ints(cfg: Mapping[str, Any], *keys: str) -> None:
    """ValueError unless every one of `keys` is an integer in the SAELens config."""
    missing = [key for key in keys if not integer(1).ok(cfg.get(key))]
    if missing:
        raise ValueError(f"its cfg.json lacks integer {', '.join(missing)}")


def input_shift(w_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """W_enc [d, M], b_dec [d] -> b_dec W_enc [M]: what subtracting b_dec before the encoder subtracts
    (folded into the encoder bias where SAELens's apply_b_dec_to_input and ours differ:
    W_enc (x - b_dec) + b_enc = W_enc x + (b_enc - W_enc b_dec))."""
    return (b_dec.double() @ w_enc.double()).float()


def sq_error(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """The paper's MSE: squared error summed over d, mean over tokens; x, recon [B, d] -> scalar.
    One fused kernel forward and backward (no [B, d] difference and square kept for autograd)."""
    return torch.nn.functional.mse_loss(recon, x, reduction="sum") / len(x)


REGISTRY: dict[str, type[SAE]] = {}
# the two files of a saved SAE (`save`, `load`): its architecture and constructor arguments, its weights
CONFIG_FILE, WEIGHTS_FILE = "sae.json", "sae.safetensors"


@functools.cache
def model_yaml(arch: str) -> dict[str, Any]:
    """conf/train/model/<arch>.yaml as a dict: the architecture's documented keys and their defaults."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(CONF / "train" / "model" / f"{arch}.yaml"))


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
    save_file({k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}, folder / WEIGHTS_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps({"arch": sae.arch, **sae.config()}, indent=2))


def nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """Which floating-point tensors hold NaN or infinite values, as `W_dec (768 values), b_pre (1 value)`;
    None if every value is finite. A tensor named log_* (the log of a quantity >= 0, such as JumpReLU's
    log_theta) may hold -inf: the log of 0."""
    bad = []
    for name, t in tensors.items():
        if not t.is_floating_point():
            continue
        wrong = ~torch.isfinite(t)
        if name.split(".")[-1].startswith("log_"):
            wrong &= t != float("-inf")
        n = int(wrong.sum())
        if n:
            bad.append(f"{name} ({n} value{'s' * (n > 1)})")
    return ", ".join(bad) or None


def load(folder: str | Path, device: str | torch.device = "cpu") -> SAE:
    """The SAE that `save` wrote, in one call, in eval mode (architectures whose inference rule differs
    from their training rule, such as BatchTopK's threshold, encode with the inference rule)."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    sae = build(config.pop("arch"), **config)
    sae.load_state_dict(load_file(folder / WEIGHTS_FILE))
    return sae.to(device).eval()
