"""The training configuration: typed view of `conf/train/train.yaml` + `conf/train/model/*.yaml`, checked early.

Defaults live in the YAML only. `TrainConfig.sae_kwargs()` turns the user-facing model keys
(`width`, `match`, ...) into the constructor arguments of the registered architecture.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from train.saes import REGISTRY


class TrainError(Exception):
    """Bad input or a stopped run; printed as one line."""


def dirname(overrides: str) -> str:
    """A run's folder name from its overrides: one level (no '/'), `default` when there are none."""
    return overrides.replace("/", "_") or "default"


if not OmegaConf.has_resolver("dirname"):
    OmegaConf.register_new_resolver("dirname", dirname)


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
    steps: int
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

    @classmethod
    def from_omegaconf(cls, cfg: DictConfig) -> TrainConfig:
        raw = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(raw, dict)
        try:
            data = DataConfig(**raw.pop("data"))
            out = cls(data=data, **{**raw, "adam_betas": tuple(raw["adam_betas"])})
        except TypeError as e:
            raise TrainError(f"bad train config: {e}") from None
        out.validate()
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def sae_kwargs(self, d: int) -> dict[str, Any]:
        """Constructor arguments of the architecture for inputs of width d."""
        m = dict(self.model)
        arch = m.pop("arch")
        if arch == "switch":
            n, width, match = m.pop("n_experts"), m.pop("width"), m.pop("match")
            if match == "width":
                if width % n:
                    raise TrainError(f"width {width} is not divisible by n_experts {n} (model.match=width)")
                m["expert_width"] = width // n
            else:
                m["expert_width"] = width
            m["n_experts"] = n
            if m["k"] > m["expert_width"]:
                raise TrainError(f"k={m['k']} is larger than an expert's width {m['expert_width']}")
        elif "k" in m and m["k"] > m["width"]:
            raise TrainError(f"k={m['k']} is larger than the width {m['width']}")
        return {"d": d, **m}

    def validate(self) -> None:
        arch = self.model.get("arch")
        if arch not in REGISTRY:
            raise TrainError(f"unknown model {arch!r}; choose one of {', '.join(sorted(REGISTRY))}")
        if arch == "switch" and self.model.get("match") not in ("width", "flops"):
            raise TrainError(f"model.match must be width or flops, got {self.model.get('match')!r}")
        ep = self.expert_parallel
        if ep != 1:
            if not (isinstance(ep, int) and ep > 1):
                raise TrainError(f"expert_parallel must be an integer >= 1, got {ep!r}")
            got = f"model={arch}" + (f", n_experts={self.model['n_experts']}" if arch == "switch" else "")
            if arch != "switch" or self.model["n_experts"] % ep:
                raise TrainError(f"expert_parallel={ep} needs model=switch with n_experts divisible by it (got {got})")
            if self.compile:
                raise TrainError("compile=true is not supported with expert_parallel > 1")
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr is None or self.lr > 0, f"lr must be > 0 or null, got {self.lr}"),
            (0 <= self.lr_decay_frac <= 1, f"lr_decay_frac must be in [0, 1], got {self.lr_decay_frac}"),
            (0 <= self.data.eval_frac < 1, f"data.eval_frac must be in [0, 1), got {self.data.eval_frac}"),
            (self.data.outlier_factor is None or self.data.outlier_factor > 1,
             f"data.outlier_factor must be > 1 or null, got {self.data.outlier_factor}"),
            (self.checkpoint_every >= 1 and self.log_every >= 1, "checkpoint_every and log_every must be >= 1"),
            (self.dtype in ("float32", "bfloat16"), f"dtype must be float32 or bfloat16, got {self.dtype!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainError(message)
