"""Typed app configs: composing an app's Hydra config without running it (for the pipeline, benchmarks
and tests), and the two steps every typed config takes (`instantiate`, then `require` its checks)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from runtime.errors import ToolkitError

T = TypeVar("T")

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_app(app: str, overrides: list[str], name: str | None = None) -> DictConfig:
    """The config of `python -m <app> <overrides>`: conf/<app>/<name>.yaml, by default <app>.yaml."""
    with initialize_config_dir(config_dir=str(CONF / app), version_base="1.3"):
        return compose(name or app, overrides=list(overrides))


def instantiate(cls: type[T], raw: dict[str, Any], error: type[ToolkitError], app: str) -> T:
    """cls(**raw) for a typed config dataclass; an unknown or missing key is `error` in one line."""
    try:
        return cls(**raw)
    except TypeError as e:
        raise error(f"bad {app} config: {e}") from None


def require(checks: Iterable[tuple[bool, str]], error: type[ToolkitError]) -> None:
    """Raise `error(message)` for the first (ok, message) whose ok is false."""
    for ok, message in checks:
        if not ok:
            raise error(message)


def require_given(cfg: DictConfig, key: str, error: type[ToolkitError], message: str) -> None:
    """`error(message)` unless `cfg.<key>` is set: not missing (???), null, empty or an empty list."""
    if OmegaConf.is_missing(cfg, key) or cfg.get(key) in (None, "", []):
        raise error(message)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config containers as dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
