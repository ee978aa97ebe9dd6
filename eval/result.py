"""`<run>/eval.json`: the one owner of its schema. `python -m eval` writes it through `EvalResult`,
and the report, the variants table and every other reader read it back through `EvalResult.read`, which
checks it field by field (a malformed file is one line naming it).

Every field is documented where it is declared. Counts are per held-out token unless said otherwise;
FLOPs are those of train/saes/flops.py. Fields eval could not compute (CE with ce=false, expert
statistics of an SAE without a router, nmse and fve on constant inputs) are null.
"""

from __future__ import annotations

import functools
import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from runtime.errors import ToolkitError
from train.run_dir import RunDir
from train.saes import REGISTRY


class EvalResultError(ToolkitError):
    """An eval.json that does not follow the schema; the message names the file."""


@dataclass(frozen=True)
class EvalResult:
    # what was evaluated
    arch: str  # the architecture (a key of train.saes.REGISTRY)
    n_latents: int  # M, every latent (the SAE's layout)
    l0: float  # mean active latents per held-out token
    mse: float  # squared error summed over d, mean over held-out tokens (the paper's MSE)
    run: str | None = None  # the run directory evaluated
    store: str | None = None  # the activation store whose held-out chunks were read
    match: str | None = None  # width | flops: how a routed SAE was sized against the configured width
    d: int | None = None  # input width
    k: int | None = None  # active latents per token the architecture is built for (null: set by a penalty)
    n_experts: int | None = None  # N routed experts (null: no router)
    sae: dict[str, Any] | None = None  # the SAE's constructor arguments (sae.json without arch)
    train_steps: int | None = None  # optimizer steps the run trained (0 for an imported SAE)
    train_tokens: int | None = None  # tokens the run trained on
    # reconstruction on the held-out rows (train/metrics.py)
    nmse: float | None = None  # mse / the summed variance of x
    fve: float | None = None  # 1 - sum_j Var(x_j - x_hat_j) / sum_j Var(x_j)
    dead_frac: float | None = None  # latents that fired on none of the first dead_window_tokens tokens
    dead_window_tokens: int | None = None
    eval_tokens: int | None = None  # held-out tokens evaluated
    expert_load: list[float] | None = None  # fraction of tokens routed to each expert
    expert_entropy: float | None = None  # entropy (nats) of expert_load
    outlier_frac: float | None = None  # rows left out for a norm above the cut
    norm_cut: float | None = None  # that cut (null: no rows left out)
    # cost (train/saes/flops.py, the algorithmic count: sparse backward where codes are TopK-style)
    params: int | None = None
    flops_forward_per_token: float | None = None
    flops_train_per_token: float | None = None
    flops_train_dense_per_token: float | None = None  # with the dense encoder backward
    train_flops: float | None = None  # flops_train_per_token x train_tokens
    # CE loss recovered (eval/ce.py; null with ce=false)
    ce_clean: float | None = None  # mean next-token CE (nats) of the unmodified LM
    ce_sae: float | None = None  # with the SAE's reconstruction patched in at the site
    ce_zero: float | None = None  # with the site zero-ablated
    loss_recovered: float | None = None  # (ce_zero - ce_sae) / (ce_zero - ce_clean)
    delta_ce: float | None = None  # ce_sae - ce_clean
    kl: float | None = None  # mean KL(clean || patched) of the next-token distributions
    ce_tokens: int | None = None  # predictions scored
    ce_rows_kept_clean: int | None = None  # outlier rows left unpatched in the CE passes
    # against the ground truth of a synthetic store (eval/truth.py; null on any other store)
    truth_recovered: float | None = None  # true features whose best-matching decoder direction has cosine > 0.9
    truth_best_cos_mean: float | None = None  # mean over true features of that best cosine
    truth_duplicates: int | None = None  # latents matching (cos > 0.9) a true feature another latent matches better
    # mean over the hierarchies' parents of 1 - (their best latent's recall where a child fires too) / (its recall
    # where the parent fires alone): 0 = no absorption, 1 = a child always silences the parent's latent
    truth_absorption: float | None = None
    truth_parent_recall: float | None = None  # that latent's recall where the parent fires alone, mean over parents
    notes: list[str] = field(default_factory=list)  # what the numbers include and leave out, in words

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not _fits(value, _hints()[f.name]):
                raise ValueError(f"{f.name} must be {_describe(_hints()[f.name])}, got {value!r}")
        if self.arch not in REGISTRY:
            raise ValueError(f"arch must be one of {', '.join(REGISTRY)}, got {self.arch!r}")
        if self.match not in (None, "width", "flops"):
            raise ValueError(f"match must be width, flops or null, got {self.match!r}")
        if REGISTRY[self.arch].has_experts and self.n_experts is None:
            raise ValueError(f"a {self.arch} run needs n_experts")

    # ---- by field name, for tables whose columns are field names
    def get(self, key: str) -> Any:
        """The value of the field `key` (KeyError for a name that is no field: a typo fails, not a blank)."""
        if key not in _hints():
            raise KeyError(f"eval.json has no field {key!r}")
        return getattr(self, key)

    __getitem__ = get

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str | Path) -> EvalResult:
        """An eval.json's parsed content; EvalResultError naming `where` when it does not follow the schema.
        Keys this version does not know are ignored (a newer toolkit's file still reads)."""
        if not isinstance(data, dict):
            raise EvalResultError(f"{where}: expected a JSON object, got {type(data).__name__}")
        missing = [f.name for f in fields(cls) if f.name in REQUIRED and data.get(f.name) is None]
        if missing:
            raise EvalResultError(f"{where}: missing {', '.join(missing)}")
        try:
            return cls(**{key: value for key, value in data.items() if key in _hints()})
        except ValueError as e:
            raise EvalResultError(f"{where}: {e}") from None

    @classmethod
    def read(cls, run: RunDir) -> EvalResult | None:
        """The run's eval.json, checked; None when it has none."""
        path = run.file(RunDir.EVAL)
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise EvalResultError(f"{path}: not valid JSON ({e})") from None
        return cls.from_json(data, path)

    def write(self, run: RunDir) -> Path:
        """The run's eval.json, written whole or not at all (refused while a launch holds the run)."""
        return run.write_result(RunDir.EVAL, self.to_json())


REQUIRED = ("arch", "n_latents", "l0", "mse")


@functools.cache
def _hints() -> dict[str, Any]:
    """Field name -> its declared type."""
    return typing.get_type_hints(EvalResult)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value has the declared type (an int is a float; a bool is neither)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    if typing.get_origin(hint) is dict:
        return "an object"
    return names.get(hint, str(hint))
