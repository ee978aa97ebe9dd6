"""Config keys several eval apps share (eval, dashboard, autointerp), checked in one place.

Imports nothing heavy (no torch): an app can check its config before torch loads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from omegaconf import DictConfig

from runtime.config import DEVICE, FLAG, NULL, Rule, integer, number, one_of, text, typed_config
from runtime.errors import ToolkitError

T = TypeVar("T", bound="HeldOutOptions")

# run: the run's own data.outlier_factor; null: keep every row; a number > 1: rows with a norm above
# it x the median row norm are left out
OUTLIER_FACTOR = (one_of("run") | NULL | number(1, lo_open=True)).saying("run, null or a number > 1")
PATH = text("a path")
# the keys HeldOutOptions holds, in every app's YAML (documented there), and what each must be
HELD_OUT_RULES: dict[str, Rule] = {
    "run": PATH,
    "store": PATH | NULL,
    "max_tokens": integer(1),
    "batch_size": integer(1),
    "outlier_factor": OUTLIER_FACTOR,
    "device": DEVICE,
    "progress": FLAG,
}
WHOLE_KEYS = ("max_tokens",)  # a count of rows that may be written like 1e6 on the command line


@dataclass(frozen=True)
class HeldOutOptions:
    """The keys of every eval app that reads a trained run's held-out rows (each app's YAML documents
    them): the run, the store to read instead of the run's own (null: its own), how many rows and in
    what batches, the outlier cut, the device and the progress bar."""

    run: str
    store: str | None
    max_tokens: int
    batch_size: int
    outlier_factor: float | str | None
    device: str
    progress: bool

    @classmethod
    def compose(cls: type[T], cfg: DictConfig, error: type[ToolkitError], app: str, run_message: str,
                rules: Mapping[str, Rule], whole: tuple[str, ...] = ()) -> T:
        """The typed config of an app from its composed Hydra config (conf/eval/<app>.yaml): `run_message`
        if run= is not given, else every value checked against HELD_OUT_RULES and the app's own
        `rules`; the keys in `whole` (and max_tokens) may be whole floats like 1e6."""
        return typed_config(cls, cfg, error, app, f"conf/eval/{app}.yaml", {**HELD_OUT_RULES, **rules},
                            required={"run": run_message}, whole=(*WHOLE_KEYS, *whole))
