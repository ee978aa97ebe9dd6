"""The training configuration: typed view of `conf/train/train.yaml` + `conf/train/model/*.yaml`, checked early.

Defaults live in the YAML only. `TrainConfig.sae_kwargs()` turns the user-facing model keys
(`width`, `match`, ...) into the constructor arguments of the registered architecture;
`TrainConfig.tracking` is the `logger` group (conf/train/logger/*.yaml) as runtime.tracking reads it.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harvest.config import HarvestConfig
from runtime.cli import compose_checked
from runtime.config import (DEVICE, FLAG, NULL, Rule, as_whole, check_values, instantiate, integer, list_of, number,
                            one_of, require, text)
from runtime.errors import ToolkitError, reraise_as
from runtime.tracking import TrackerSettings, require_package
from train.budget import Budget, BudgetError
from train.saes import REGISTRY
from train.saes.flops import cost


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
    source: str  # "store" | "stream"
    store: str
    target: str | None  # a transcoder's target site (a store of the same harvest as `store`); None: an autoencoder
    eval_frac: float
    window_chunks: int
    threads: int | str  # "auto": every core
    read_ahead: int
    allow_incomplete: bool
    outlier_factor: float | None
    cache_dir: str | None  # local copies of a remote store's chunk files (harvest/cache.py)
    cache_gb: float
    stream: str  # source=stream: harvest overrides of the LM, site and text (harvest/stream.py), space-separated
    shuffle_tokens: int
    held_out_tokens: int

    @property
    def streamed(self) -> bool:
        return self.source == "stream"

    def stream_config(self) -> HarvestConfig:
        """The harvest config that data.stream names (checked: TrainError in one line)."""
        with reraise_as(TrainError):
            return HarvestConfig.from_omegaconf(compose_checked("harvest", shlex.split(self.stream)))


@dataclass(frozen=True)
class TrainConfig:
    model: dict[str, Any]
    logger: dict[str, Any]
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
        """The typed config of a composed conf/train/train.yaml: every value checked (RULES, the logger's
        runtime.tracking.RULES, then the architecture's `model_rules`), then the checks across keys and
        the tracker's package (`validate`); TrainError in one line."""
        raw = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(raw, dict)
        as_whole(raw, *WHOLE_KEYS)
        model = raw.pop("model", None)
        if not isinstance(model, dict):
            raise TrainError(f"model must be one of {', '.join(REGISTRY)} (model=<name>), got {model!r}")
        logger = raw.pop("logger", None)
        TrackerSettings.from_config(logger, TrainError)
        check_values(raw, RULES, TrainError, DOCS)
        data = instantiate(DataConfig, raw.pop("data"), TrainError, "train")
        out = instantiate(cls, {**raw, "model": model, "logger": logger, "data": data,
                                "adam_betas": tuple(raw["adam_betas"])}, TrainError, "train")
        out.validate()
        return out

    @property
    def tracking(self) -> TrackerSettings:
        """The experiment tracker's settings (the `logger` group, checked when the config is read)."""
        return TrackerSettings.from_config(self.logger, TrainError)

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
        """Constructor arguments of the architecture for inputs of width d (its `constructor_kwargs`, and
        transcoder=True with data.target)."""
        try:
            kwargs = REGISTRY[self.model["arch"]].constructor_kwargs(self._model_keys(), d)
        except ValueError as e:
            raise TrainError(str(e)) from None
        return {**kwargs, "transcoder": True} if self.data.target is not None else kwargs

    def flops_per_token(self, d: int) -> float:
        """Training FLOPs per token of this SAE on inputs of width d, as the loop counts them for a
        flops budget (train.saes.flops.algorithmic_cost), without building the SAE."""
        sae = REGISTRY[self.model["arch"]]
        kwargs = self.sae_kwargs(d)
        sizes = {name: kwargs[name] for name in sae.size_args}
        return cost(sae.arch, d, sparse_backward=sae.sparse_codes, transcoder=kwargs.get("transcoder", False),
                    skip=kwargs.get("skip", False), **sizes).train

    def validate(self) -> None:
        """The model's keys (its architecture's `check_model`), the checks across keys, and that the
        tracker's package imports (before any work: `logger=wandb` without wandb is refused here);
        every other value has passed its rule."""
        arch = self.model.get("arch")
        if not isinstance(arch, str) or arch not in REGISTRY:
            raise TrainError(f"unknown model {arch!r}; choose one of {', '.join(sorted(REGISTRY))}")
        sae = REGISTRY[arch]
        try:
            sae.check_model(self._model_keys())
        except ValueError as e:
            raise TrainError(str(e)) from None
        ep = self.expert_parallel
        if ep != 1:
            problem = sae.expert_parallel_problem(self._model_keys(), ep)
            if problem:
                raise TrainError(problem)
            if self.compile:
                raise TrainError("compile=true is not supported with expert_parallel > 1")
        try:
            Budget.parse(self.budget)
        except BudgetError as e:
            raise TrainError(str(e)) from None
        require([(self.eval_every == 0 or self.data.eval_frac > 0,
                  "validation needs held-out chunks: data.eval_frac=0 holds none out; set eval_every=0 or "
                  "data.eval_frac > 0"),
                 (not self.data.streamed or self.data.eval_frac > 0,
                  "data.source=stream holds out documents for validation and eval: data.eval_frac must be > 0")],
                TrainError)
        if self.data.target is not None:
            transcoding = ", ".join(name for name, c in REGISTRY.items() if c.transcodes)
            require([(sae.transcodes, f"data.target makes a transcoder, which model={arch} cannot be (those that "
                                      f"can: {transcoding})"),
                     (not self.data.streamed, "data.target reads a store: a transcoder trains with data.source=store"),
                     (ep == 1, "expert_parallel trains autoencoders only; a transcoder (data.target) trains with "
                               "expert_parallel=1")], TrainError)
        elif self.model.get("skip"):
            raise TrainError("model.skip=true is a transcoder's skip connection: it needs data.target (the site to "
                             "reconstruct)")
        if self.data.streamed:
            self.data.stream_config()
        with reraise_as(TrainError):
            require_package(self.tracking.kind)


DOCS = "conf/train/train.yaml"
WHOLE_KEYS = ("dead_window", "eval_tokens", "data.shuffle_tokens", "data.held_out_tokens")  # token counts that may be written like 1e7 on the command line
# every key of conf/train/train.yaml but `model` and `logger` (documented there; the model's keys are its
# architecture's `model_rules`, the logger's runtime.tracking.RULES) and what its value must be
RULES: dict[str, Rule] = {
    "data.source": one_of("store", "stream"),
    "data.store": text("a path or an URL"),
    "data.target": text("a path or an URL") | NULL,
    # held out: every round(1/eval_frac)-th chunk, at least every 2nd (harvest.held_out.held_out_period)
    "data.eval_frac": number(0, 0.5).saying("a number in [0, 0.5] (every round(1/eval_frac)-th chunk is held "
                                            "out, at most every 2nd)"),
    "data.window_chunks": integer(1),
    "data.threads": one_of("auto") | integer(1),
    "data.read_ahead": integer(0),
    "data.allow_incomplete": FLAG,
    "data.outlier_factor": number(1, lo_open=True) | NULL,
    "data.cache_dir": text("a folder") | NULL,
    "data.cache_gb": number(0, lo_open=True),
    "data.stream": text("harvest overrides, e.g. 'preset=demo device=cuda:1'"),
    "data.shuffle_tokens": integer(1),
    "data.held_out_tokens": integer(1),
    "budget": text("kind:amount, e.g. steps:100_000 or flops:1e13"),  # read by train.budget.Budget.parse
    "batch_size": integer(1),
    "lr": number(0, lo_open=True) | NULL,
    "lr_decay_frac": number(0, 1),
    "adam_betas": list_of(number(0, 1, hi_open=True), "a pair [beta1, beta2] of numbers in [0, 1)", length=2),
    "grad_clip": number(0, lo_open=True),
    "seed": integer(0),
    "dead_window": integer(1),
    "log_every": integer(1),
    "eval_every": one_of("auto") | integer(0),
    "eval_tokens": integer(1),
    "checkpoint_every": integer(1),
    "resume": FLAG,
    "device": DEVICE,
    "dtype": one_of("float32", "bfloat16"),
    "compile": FLAG,
    "progress": FLAG,
    "expert_parallel": integer(1),
}
