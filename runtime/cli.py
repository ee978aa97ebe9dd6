"""What every `python -m <app>` does before Hydra's own main: check the command line, in one line.

Hydra's @hydra.main composes the config itself and, for train, creates the run folder (with its
.hydra/ copy of the config) before the app's main runs; its own composition errors span several
lines. So each CLI calls `launch(app, main, check)`, which first composes the app's config from
sys.argv with Hydra's compose API (`runtime.config.compose_app`), turns a composition error into
one line (an unknown key, with the closest known one; an unknown option of a config group, with the
list of options; a value list without -m), runs `check` on the composed config (the app's typed
config, which refuses every bad value, and any check of input files that writes nothing) and only
then hands over to the Hydra main. A refusal is `<app>: error: <message>` on stderr, exit code 2,
and nothing on disk.

Hydra's flags (--help, --cfg job, -cn ...) go to Hydra unchecked, and so does a command line whose
override of Hydra's own groups (hydra/launcher=...) the compose API cannot compose. A multirun (-m)
gets only the config-group check. Every app's main still checks its own config.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from runtime.config import CONF, compose_app, flatten, unknown_key
from runtime.errors import ToolkitError, one_line_errors
from runtime.files import uncreatable

MULTIRUN = ("-m", "--multirun")


def launch(app: str, main: Callable[[], Any], check: Callable[[DictConfig], Any], conf: str | None = None,
           name: str | None = None) -> None:
    """Check `python -m <app> <sys.argv[1:]>` (`precheck`), then run the Hydra main. conf/name: the
    config's folder under conf/ and its file name without .yaml (default: both `app`)."""
    precheck(app, check, sys.argv[1:], conf, name)
    main()


def precheck(app: str, check: Callable[[DictConfig], Any], argv: list[str], conf: str | None = None,
             name: str | None = None) -> None:
    """Compose the config of conf/<conf>/<name>.yaml with the overrides in argv and `check` it; any
    refusal is one line on stderr and exit code 2 (runtime.errors.one_line_errors)."""
    conf, name = conf or app, name or app
    flags = [a for a in argv if a.startswith("-")]
    if any(f not in MULTIRUN for f in flags):
        return  # Hydra's own flags: Hydra handles them
    with one_line_errors(app):
        parsed = _parse(argv, strict=not flags)
        check_output_folders(parsed)
        check_groups(conf, parsed)
        if flags:
            return  # a multirun: each job's main checks its own config
        refuse_sweeps(conf, parsed)
        cfg = compose(conf, name, argv, parsed)
        if cfg is not None:
            check(cfg)


def compose_checked(app: str, argv: list[str]) -> DictConfig:
    """The config of `python -m <app> <argv>` (overrides only), with the checks of the command line:
    ToolkitError in one line (an unknown key with the closest known one, an unknown option of a group,
    a sweep). For an app's config named inside another's (train's data.stream: harvest overrides)."""
    parsed = _parse(argv, strict=True)
    check_groups(app, parsed)
    refuse_sweeps(app, parsed)
    cfg = compose(app, app, argv, parsed)
    if cfg is None:
        raise ToolkitError(f"{app} overrides of Hydra's own settings (hydra/...) are not taken here")
    return cfg


def _parse(argv: list[str], strict: bool) -> list[tuple[str, str, Any]]:
    """(argument, key or group, hydra Override) of every override; an unreadable one is refused in one
    line when `strict`, else left out (Hydra reports it)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    out = []
    for arg in argv:
        if arg in MULTIRUN:
            continue
        try:
            override = parser.parse_override(arg)
        except HydraException as e:
            if strict:
                raise ToolkitError(f"cannot read the override {arg!r}: {_first_line(e)}") from None
            continue
        out.append((arg, override.key_or_group, override))
    return out


OUTPUT_FOLDERS = ("hydra.run.dir", "hydra.sweep.dir")  # Hydra creates them before the app's main runs


def check_output_folders(parsed: list[tuple[str, str, Any]]) -> None:
    """Refuse (one line) a folder Hydra would create for the run and could not: Hydra creates it
    before any of our code runs, and reports its failure as a traceback."""
    for _, key, override in parsed:
        value = override.value() if key in OUTPUT_FOLDERS else None
        if isinstance(value, str):
            problem = uncreatable(Path(value))
            if problem:
                raise ToolkitError(f"{key}={value} cannot be created: {problem}")


def _choices(override: Any) -> list[str]:
    """The options an override of a config group asks for: one, or each of a sweep's a,b,c."""
    from hydra.core.override_parser.types import ChoiceSweep

    if override.is_sweep_override():
        return list(override.sweep_string_iterator()) if isinstance(override.value(), ChoiceSweep) else []
    value = override.value()
    return [value] if isinstance(value, str) else []


def check_groups(conf: str, parsed: list[tuple[str, str, Any]]) -> None:
    """`<group>=<option>` must name conf/<conf>/<group>/<option>.yaml: `model=moe` is refused with
    the list of models (Hydra's own message spans a dozen lines)."""
    for _, group, override in parsed:
        folder = CONF / conf / group
        if override.is_delete() or group.startswith("hydra") or not folder.is_dir():
            continue
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        for choice in _choices(override):
            if choice not in options:
                raise ToolkitError(f"unknown {group} {choice!r}; choose one of {', '.join(options)}")


def refuse_sweeps(conf: str, parsed: list[tuple[str, str, Any]]) -> None:
    """Without -m, `key=a,b` is no value (Hydra calls it ambiguous, in four lines): say how to sweep."""
    for arg, key, override in parsed:
        if override.is_sweep_override():
            as_list = "" if (CONF / conf / key).is_dir() else f", or write a list as {key}=[a,b]"
            raise ToolkitError(f"{arg!r} gives several values: add -m (--multirun) to run one job per value"
                               + as_list)


def compose(conf: str, name: str, argv: list[str], parsed: list[tuple[str, str, Any]]) -> DictConfig | None:
    """The composed config; a composition error becomes one line, naming an unknown key and the
    closest known one. None (left to Hydra) when it fails with an override of Hydra's own groups
    (hydra/launcher=...), whose plugins the compose API may not see."""
    from hydra.errors import HydraException

    overrides = [arg for arg in argv if arg not in MULTIRUN]
    try:
        return compose_app(conf, overrides, name)
    except HydraException as e:
        if any(key.startswith("hydra/") for _, key, _ in parsed):
            return None
        message = _first_line(e)
    docs = f"conf/{conf}/{name}.yaml"
    known = _known_keys(conf, name, parsed)
    for _, key, override in parsed:
        plain = not (override.is_add() or override.is_force_add() or override.is_delete())
        group = (CONF / conf / key).is_dir()
        if known is not None and plain and not group and not key.startswith("hydra") and key not in known:
            raise ToolkitError(unknown_key(key, sorted(known), _group_docs(conf, name, key, parsed) or docs))
    raise ToolkitError(message)


def _group_docs(conf: str, name: str, key: str, parsed: list[tuple[str, str, Any]]) -> str | None:
    """For a key inside a config group (`logger.project`), the file of the option it was looked up in
    (conf/train/logger/none.yaml: the option given on the command line, else the default), which is
    where that group's keys are documented; None for other keys."""
    group = key.split(".")[0]
    if "." not in key or not (CONF / conf / group).is_dir():
        return None
    chosen = [o.value() for _, k, o in parsed if k == group and isinstance(o.value(), str)]
    if not chosen:
        defaults = OmegaConf.to_container(OmegaConf.load(CONF / conf / f"{name}.yaml")).get("defaults", [])
        chosen = [d[group] for d in defaults if isinstance(d, dict) and isinstance(d.get(group), str)]
    return f"conf/{conf}/{group}/{chosen[0]}.yaml" if chosen else None


def _known_keys(conf: str, name: str, parsed: list[tuple[str, str, Any]]) -> set[str] | None:
    """Every dotted key (and every prefix of one) of the config as its group choices compose it; None
    if even that fails."""
    from hydra.errors import HydraException

    groups = [arg for arg, key, _ in parsed if (CONF / conf / key).is_dir()]
    try:
        cfg = compose_app(conf, groups, name)
    except HydraException:
        return None
    keys = flatten(OmegaConf.to_container(cfg, resolve=False))
    return {".".join(key.split(".")[:i]) for key in keys for i in range(1, key.count(".") + 2)}


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
