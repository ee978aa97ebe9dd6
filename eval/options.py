"""Config keys several eval apps share (eval, dashboard, autointerp), checked in one place.

Imports nothing heavy (no torch): an app can check its config before torch loads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from runtime.config import instantiate, require_given
from runtime.errors import ToolkitError

T = TypeVar("T", bound="HeldOutOptions")


def outlier_factor_check(value: Any) -> tuple[bool, str]:
    """(ok, message) for `outlier_factor`: run (the run's own data.outlier_factor), null (keep every
    row) or a number > 1 (rows with a norm above it x the median row norm are left out)."""
    ok = value in ("run", None) or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 1)
    return ok, f"outlier_factor must be run, null or a number > 1, got {value!r}"


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
    def compose(cls: type[T], cfg: DictConfig, error: type[ToolkitError], app: str, run_message: str) -> T:
        """The typed config of an app from its composed Hydra config; `run_message` if run= is not given."""
        require_given(cfg, "run", error, run_message)
        return instantiate(cls, OmegaConf.to_container(cfg, resolve=True), error, app)

    def held_out_checks(self) -> list[tuple[bool, str]]:
        """(ok, message) checks of these keys, for `runtime.config.require`."""
        return [(self.max_tokens >= 1 and self.batch_size >= 1, "max_tokens and batch_size must be >= 1"),
                outlier_factor_check(self.outlier_factor)]
