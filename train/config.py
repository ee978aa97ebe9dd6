"""The training configuration: typed view of `conf/train/train.yaml` + `conf/train/model/*.yaml`, checked early.

Defaults live in the YAML only. `TrainConfig.sae_kwargs()` turns the user-facing model keys
(`width`, `match`, ...) into the constructor arguments of the registered architecture.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from runtime.config import instantiate, require
from runtime.errors import ToolkitError
from train.budget import Budget, BudgetError
from train.saes import REGISTRY


class TrainError(ToolkitError):
    """Bad input or a stopped run; printed as one line."""


def dirname(overrides: str) -> str:
    """A run's folder name from its overrides: one level (no '/'), `default` when there are none."""
    return overrides.replace("/", "_") or "default"


if not OmegaConf.has_resolver("dirname"):
    OmegaConf.register_new_resolver("dirname", dirname)

CONF = Path(__file__).resolve().parents[1] / "conf" / "train"
AUTO_SECONDS_EVERY = 100  # eval_every=auto with a seconds budget: validate every this many steps
# Keys that change how a run runs, not what it trains: Hydra leaves them out of run folder names
# (conf/train/train.yaml, override_dirname.exclude_keys), and a run may be relaunched with other values.
RUNTIME_KEYS = tuple(OmegaConf.load(CONF / "train.yaml").hydra.job.config.override_dirname.exclude_keys)


@dataclass(frozen=True)
class DataConfig:
    store: str
    eval_frac: float
    window_chunks: int
    allow_incomplete: bool
    outlier_factor: float | None


@dataclass(frozen=True)
class TrainConfig:
    model: dict[str, Any]
    data: DataConfig
    budget: str
    batch_size: int
    lr: float | None
    lr_decay_frac: float
    adam_betas: tuple[float, float]
    grad_clip: float
    seed: int
    dead_window: int
    log_every: int
    checkpoint_every: int
    resume: bool
    device: str
    dtype: str
    compile: bool
    progress: bool
    expert_parallel: int
    eval_every: int | str
    eval_tokens: int

    @classmethod
    def from_omegaconf(cls, cfg: DictConfig) -> TrainConfig:
        raw = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(raw, dict)
        data = instantiate(DataConfig, raw.pop("data"), TrainError, "train")
        out = instantiate(cls, {**raw, "data": data, "adam_betas": tuple(raw["adam_betas"])}, TrainError, "train")
        out.validate()
        return out

    @property
    def run_budget(self) -> Budget:
        """The parsed `budget` (checked when the config is read)."""
        return Budget.parse(self.budget)

    def validation_interval(self, total_steps: int | None) -> int:
        """Steps between validations (0: none): `eval_every`, or with auto about 20 over a run of
        total_steps steps (every AUTO_SECONDS_EVERY steps for a seconds budget)."""
        if self.eval_every != "auto":
            return int(self.eval_every)
        return max(1, total_steps // 20) if total_steps is not None else AUTO_SECONDS_EVERY

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def _model_keys(self) -> dict[str, Any]:
        """The user-facing keys of conf/train/model/<arch>.yaml, without `arch`."""
        return {key: value for key, value in self.model.items() if key != "arch"}

    def sae_kwargs(self, d: int) -> dict[str, Any]:
        """Constructor arguments of the architecture for inputs of width d (its `constructor_kwargs`)."""
        try:
            return REGISTRY[self.model["arch"]].constructor_kwargs(self._model_keys(), d)
        except ValueError as e:
            raise TrainError(str(e)) from None

    def validate(self) -> None:
        arch = self.model.get("arch")
        if arch not in REGISTRY:
            raise TrainError(f"unknown model {arch!r}; choose one of {', '.join(sorted(REGISTRY))}")
        sae = REGISTRY[arch]
        try:
            sae.check_model(self._model_keys())
        except ValueError as e:
            raise TrainError(str(e)) from None
        ep = self.expert_parallel
        if ep != 1:
            if not (isinstance(ep, int) and ep > 1):
                raise TrainError(f"expert_parallel must be an integer >= 1, got {ep!r}")
            got = f"model={arch}" + (f", n_experts={self.model['n_experts']}" if sae.has_experts else "")
            if not sae.has_experts or self.model["n_experts"] % ep:
                sharded = " or ".join(name for name, cls in REGISTRY.items() if cls.has_experts)
                raise TrainError(f"expert_parallel={ep} needs model={sharded} with n_experts divisible by it "
                                 f"(got {got})")
            if self.compile:
                raise TrainError("compile=true is not supported with expert_parallel > 1")
        try:
            Budget.parse(self.budget)
        except BudgetError as e:
            raise TrainError(str(e)) from None
        every = self.eval_every
        require([
            (every == "auto" or (isinstance(every, int) and not isinstance(every, bool) and every >= 0),
             f"eval_every must be auto, 0 (no validation) or a number of steps, got {every!r}"),
            (isinstance(self.eval_tokens, int) and self.eval_tokens >= 1, f"eval_tokens must be >= 1, got "
                                                                           f"{self.eval_tokens!r}"),
            (every == 0 or self.data.eval_frac > 0, "validation needs held-out chunks: data.eval_frac=0 holds none "
                                                    "out; set eval_every=0 or data.eval_frac > 0"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr is None or self.lr > 0, f"lr must be > 0 or null, got {self.lr}"),
            (0 <= self.lr_decay_frac <= 1, f"lr_decay_frac must be in [0, 1], got {self.lr_decay_frac}"),
            (0 <= self.data.eval_frac < 1, f"data.eval_frac must be in [0, 1), got {self.data.eval_frac}"),
            (self.data.outlier_factor is None or self.data.outlier_factor > 1,
             f"data.outlier_factor must be > 1 or null, got {self.data.outlier_factor}"),
            (self.checkpoint_every >= 1 and self.log_every >= 1, "checkpoint_every and log_every must be >= 1"),
            (self.dtype in ("float32", "bfloat16"), f"dtype must be float32 or bfloat16, got {self.dtype!r}"),
        ], TrainError)
