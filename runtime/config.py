"""Typed app configs: composing an app's Hydra config without running it (for the pipeline, benchmarks
and tests), the steps every typed config takes (`check_values` against its rules, `instantiate`, then
`require` its checks across keys), and the rules themselves.

A `Rule` says what one key's value must be, in words for the error message: every app keeps a
{dotted key: Rule} table next to its typed config, and `check_values` holds a composed config against
it, refusing an unknown key (with the closest known one), a missing key or a bad value in one line:
`model.n_experts must be an integer >= 1, got 0`.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from runtime.errors import ToolkitError

T = TypeVar("T")

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_app(app: str, overrides: list[str], name: str | None = None) -> DictConfig:
    """The config of `python -m <app> <overrides>`: conf/<app>/<name>.yaml, by default <app>.yaml. Also
    from inside another app's Hydra run (train composes the harvest config of its data.stream): that
    app's Hydra state is set aside meanwhile and restored after."""
    outer = GlobalHydra.instance()
    saved = outer.hydra if outer.is_initialized() else None
    outer.clear()
    try:
        with initialize_config_dir(config_dir=str(CONF / app), version_base="1.3"):
            return compose(name or app, overrides=list(overrides))
    finally:
        if saved is not None:
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(saved)


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


# ------------------------------------------------------------------------------------------ rules

@dataclass(frozen=True)
class Rule:
    """What a config value must be: `ok(value)`, and `allowed`, the words for it that follow
    "<key> must be" in an error message ("an integer >= 1")."""

    ok: Callable[[Any], bool]
    allowed: str
    secret: bool = False  # a refused value is not repeated in the message (it may be a pasted credential)

    def __or__(self, other: Rule) -> Rule:
        """Either rule: `integer(1) | NULL` is "an integer >= 1 or null"."""
        return Rule(lambda v: self.ok(v) or other.ok(v), f"{self.allowed} or {other.allowed}",
                    self.secret or other.secret)

    def saying(self, allowed: str) -> Rule:
        """The same test, described in other words."""
        return Rule(self.ok, allowed, self.secret)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bounds(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> tuple[Callable[[Any], bool], str]:
    """(test of v against the bounds, the bounds in words: ">= 1", "in [0, 1)", "" for none)."""
    def within(v: Any) -> bool:
        above = lo is None or (v > lo if lo_open else v >= lo)
        below = hi is None or (v < hi if hi_open else v <= hi)
        return above and below

    if lo is not None and hi is not None:
        words = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        words = f"{'>' if lo_open else '>='} {lo:g}"
    elif hi is not None:
        words = f"{'<' if hi_open else '<='} {hi:g}"
    else:
        words = ""
    return within, words


def integer(lo: int | None = None, hi: int | None = None) -> Rule:
    """An int (not a bool, not a float) within [lo, hi]: "an integer >= 1", "an integer in 0..9"."""
    within, words = _bounds(lo, hi, False, False)
    if lo is not None and hi is not None:
        words = f"in {lo}..{hi}"
    return Rule(lambda v: _is_int(v) and within(v), " ".join(filter(None, ["an integer", words])))


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False) -> Rule:
    """A finite int or float (not a bool) within the bounds: "a number > 0", "a number in [0, 1)"."""
    within, words = _bounds(lo, hi, lo_open, hi_open)
    return Rule(lambda v: _is_number(v) and within(v), " ".join(filter(None, ["a number", words])))


def one_of(*choices: str) -> Rule:
    """One of the given strings: "one of float32, bfloat16" (a single choice is just its name)."""
    words = choices[0] if len(choices) == 1 else "one of " + ", ".join(choices)
    return Rule(lambda v: isinstance(v, str) and v in choices, words)


def text(allowed: str = "a non-empty string") -> Rule:
    """A non-blank string (a path, a name)."""
    return Rule(lambda v: isinstance(v, str) and v.strip() != "", allowed)


def list_of(item: Rule, allowed: str, length: int | None = None) -> Rule:
    """A non-empty list whose items all pass `item` (of exactly `length` items when given)."""
    def ok(v: Any) -> bool:
        if not isinstance(v, list):
            return False
        sized = len(v) == length if length is not None else len(v) >= 1
        return sized and all(item.ok(x) for x in v)

    return Rule(ok, allowed)


NULL = Rule(lambda v: v is None, "null")


def _env_name(value: Any) -> bool:
    """The NAME of an environment variable, never its value (a pasted API key would end up in saved
    configs): an UPPER_CASE name, set or not, or a name of any case that is set in this environment.
    A pasted key has lower-case letters, dashes or other signs, and is not set as a variable's name."""
    if not isinstance(value, str):
        return False
    if re.fullmatch(r"[A-Z_][A-Z0-9_]{0,127}", value):
        return True
    return re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", value) is not None and value in os.environ


ENV_NAME = Rule(_env_name, "the name of an environment variable (UPPER_CASE letters, digits and _, or a name "
                           "set in the environment), not the key itself", secret=True)
FLAG = Rule(lambda v: isinstance(v, bool), "true or false")
# runtime.device.pick_device: auto = cuda, then mps, then cpu; cuda:N is the N-th CUDA device
DEVICE = Rule(lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None,
              "auto, cpu, cuda, cuda:N or mps")


def show(value: Any) -> str:
    """A value as the user would write it in YAML: true, null, 'text', [1, 2]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return repr(value)


def unknown_key(key: str, known: Iterable[str], docs: str | None = None) -> str:
    """The message for a key the config does not have, naming the closest known key if one is close."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.7)
    if close:
        return f"unknown key {key!r}; did you mean {close[0]!r}?"
    return f"unknown key {key!r}" + (f" (every key is documented in {docs})" if docs else "")


def check_values(raw: Mapping[str, Any], rules: Mapping[str, Rule], error: type[Exception],
                 docs: str | None = None) -> None:
    """Hold a config (nested dicts, as OmegaConf.to_container gives) against {dotted key: Rule}:
    `error` in one line for the first key without a rule (unknown), the first rule without a key
    (missing) or the first value its rule refuses, in the config's order."""
    flat = flatten(dict(raw))
    for key, value in flat.items():
        if key not in rules:
            raise error(unknown_key(key, rules, docs))
        if not rules[key].ok(value):
            got = "something else (not shown)" if rules[key].secret else show(value)
            raise error(f"{key} must be {rules[key].allowed}, got {got}")
    missing = [key for key in rules if key not in flat]
    if missing:
        raise error(f"missing config key(s): {', '.join(missing)}")


def as_whole(raw: dict[str, Any], *keys: str) -> None:
    """In place: whole floats at these dotted keys become ints (`tokens=5e6` on the command line is
    5000000.0 to Hydra); any other value is left for the key's rule to judge."""
    for key in keys:
        *parents, last = key.split(".")
        node: Any = raw
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(last), float) and node[last].is_integer():
            node[last] = int(node[last])


def typed_config(cls: type[T], cfg: DictConfig, error: type[ToolkitError], app: str, docs: str,
                 rules: Mapping[str, Rule], required: Mapping[str, str] | None = None, whole: Iterable[str] = ()) -> T:
    """The typed config `cls` of an app's composed Hydra config, the steps in order: every key of
    `required` given (else `error` with its message), the `whole` keys made ints where they are whole
    floats, every value checked against `rules` (`docs`: the YAML that documents them), then cls(**raw)."""
    for key, message in (required or {}).items():
        require_given(cfg, key, error, message)
    raw = OmegaConf.to_container(cfg, resolve=True)
    as_whole(raw, *whole)
    check_values(raw, rules, error, docs)
    return instantiate(cls, raw, error, app)
