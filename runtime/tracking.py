"""Experiment tracking: a run's config, metrics and results sent to Weights & Biases or TensorBoard.

Training picks a tracker with `logger=none|wandb|tensorboard` (conf/train/logger/<kind>.yaml, checked
by `TrackerSettings.from_config`); eval logs its results to the tracked run a training recorded. Both
talk to a `Tracker`:

    log(record, step, prefix)        one record's numbers at a training step ("train/loss", "val/fve")
    summarize(record, step, prefix)  final numbers: a W&B run's summary; TensorBoard scalars at `step`
    state()                          what the run folder keeps to continue the tracked run later
    finish(failed)                   flush and close (also on leaving a `with` block)

`Tracker` itself logs nothing (logger=none: its methods return at once, so training pays nothing).
`start` opens the tracker of a training launch, `reopen` the tracked run a state names (for eval).
wandb and tensorboard are imported only here, and only when asked for: neither is needed otherwise.

Records are flattened to scalars: nested dicts and lists become "prefix/key/0", ...; strings, None
and the record's own "step" are left out.

Continuing: a launch that resumes from a checkpoint (step > 0) continues the tracked run the run
folder recorded, if it is of the same kind and place (W&B project and entity; TensorBoard log
folder). W&B gets the same run id with resume="allow" and no step it already has: records up to the
last step the earlier launches logged are not sent again (W&B refuses steps that go backwards; a
resume is exact, so the values it keeps are the ones the redone steps compute, timings aside).
TensorBoard gets purge_step = step + 1: the events an earlier launch wrote after the checkpoint are
hidden and the redone steps logged anew. A launch from step 0 starts a new tracked run (TensorBoard
hides whatever the folder held).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.config import NULL, Rule, check_values, one_of, text
from runtime.errors import ToolkitError
from runtime.files import uncreatable

KINDS = ("none", "wandb", "tensorboard")
PACKAGE = {"wandb": "wandb", "tensorboard": "tensorboard"}  # the pip package each kind needs
WANDB_MODES = ("online", "offline", "disabled")
TAG_CHARS = 64  # W&B's limit on a tag's length
TENSORBOARD_DIR = "tensorboard"  # the event files' default folder: <run folder>/tensorboard/


class TrackingError(ToolkitError):
    """A tracker that cannot be configured, imported or opened; one line."""


def _relative_path(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != "" and not v.startswith("/") and ".." not in v.split("/")


TAGS = Rule(lambda v: isinstance(v, list) and all(isinstance(t, str) and 0 < len(t.strip()) <= TAG_CHARS for t in v),
            f"a list of tags (non-empty strings of at most {TAG_CHARS} characters)")
NAME = text("a non-empty name")
# every key of conf/train/logger/<kind>.yaml (documented there) and what its value must be
RULES: dict[str, dict[str, Rule]] = {
    "none": {"kind": one_of("none")},
    "wandb": {"kind": one_of("wandb"), "project": text("a W&B project name"), "entity": NAME | NULL,
              "name": NAME | NULL, "group": NAME | NULL, "tags": TAGS, "mode": one_of(*WANDB_MODES) | NULL},
    "tensorboard": {"kind": one_of("tensorboard"), "dir": text("a path") | NULL,
                    "name": Rule(_relative_path, "a relative folder name (no leading /, no ..)") | NULL},
}


@dataclass(frozen=True)
class TrackerSettings:
    """conf/train/logger/<kind>.yaml, typed. Keys another kind has are None (tags: empty)."""

    kind: str
    project: str | None = None
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: tuple[str, ...] = ()
    mode: str | None = None
    dir: str | None = None

    @classmethod
    def from_config(cls, raw: Any, error: type[ToolkitError] = TrackingError) -> TrackerSettings:
        """The settings of a composed `logger` group (a dict), every key checked against its kind's
        RULES; `error` in one line naming the key (`logger.mode must be ...`)."""
        kind = raw.get("kind") if isinstance(raw, dict) else None
        if kind not in RULES:
            raise error(f"logger.kind must be one of {', '.join(KINDS)} (logger=<kind>), got {kind!r}")
        check_values({"logger": raw}, {f"logger.{k}": rule for k, rule in RULES[kind].items()}, error,
                     f"conf/train/logger/{kind}.yaml")
        problem = uncreatable(raw["dir"]) if raw.get("dir") else None
        if problem:
            raise error(f"logger.dir={raw['dir']} cannot be created: {problem}")
        return cls(**{**raw, "tags": tuple(raw.get("tags", ()))})


def require_package(kind: str) -> None:
    """TrackingError in one line, saying how to install it, unless the package `kind` needs imports."""
    if kind not in PACKAGE:
        return
    _import(PACKAGE[kind], kind)


def _import(module: str, kind: str) -> Any:
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken install failing while it imports
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TrackingError(f"logger={kind} needs the {PACKAGE[kind]} package, which cannot be imported here "
                            f"({why}): pip install {PACKAGE[kind]}, or make setup (it installs the interop extra "
                            "of pyproject.toml)") from None


def default_name(folder: Path) -> str:
    """A run's name in its tracker: its folder and the folder above (`topk/default`,
    `2026-11-22/model=switch`), as the run folder's own name alone repeats across architectures."""
    folder = Path(folder).resolve()
    return f"{folder.parent.name}/{folder.name}"


def scalars(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a record under `prefix/`: nested dicts and lists flattened with "/", bools as
    0/1, everything else (strings, None, the record's "step") left out."""
    out: dict[str, float] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, f"{key}/{k}" if key else str(k))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{key}/{i}")
        elif isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, (int, float)):
            out[key] = value
    walk({k: v for k, v in record.items() if k != "step"}, prefix)
    return out


# ---------------------------------------------------------------------------------------- trackers

class Tracker:
    """The interface, and logger=none: every method does nothing."""

    kind = "none"

    def log(self, record: Mapping[str, Any], step: int, prefix: str = "") -> None:
        """The record's numbers (`scalars`) at training step `step`."""

    def summarize(self, record: Mapping[str, Any], step: int, prefix: str = "") -> None:
        """The record's numbers as the run's final results (eval.json), `step` being the last one trained."""

    def state(self) -> dict[str, Any] | None:
        """What `reopen` needs to continue this tracked run (JSON-able), or None."""
        return None

    def finish(self, failed: bool = False) -> None:
        """Flush and close; `failed` marks the run as crashed where the tracker knows such a thing."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        self.finish(failed=exc is not None)


class WandbTracker(Tracker):
    """A W&B run (`wandb.init`), its local files under <folder>/wandb/. Steps up to `skip_through`
    are already in the run (see the module docstring) and are not sent again."""

    kind = "wandb"

    def __init__(self, run: Any, state: dict[str, Any], skip_through: int):
        self.run, self._state, self.skip_through = run, state, skip_through

    def log(self, record: Mapping[str, Any], step: int, prefix: str = "") -> None:
        if step > self.skip_through:
            self.run.log(scalars(record, prefix), step=step)

    def summarize(self, record: Mapping[str, Any], step: int, prefix: str = "") -> None:
        self.run.summary.update(scalars(record, prefix))  # not a history row: the run's steps may be past `step`

    def state(self) -> dict[str, Any]:
        return self._state

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class TensorBoardTracker(Tracker):
    """Event files in one log folder (torch.utils.tensorboard.SummaryWriter), flushed at every record
    so that a killed run keeps what it logged."""

    kind = "tensorboard"

    def __init__(self, logdir: Path, purge_step: int | None):
        SummaryWriter = _import("torch.utils.tensorboard", "tensorboard").SummaryWriter
        self.logdir = logdir
        self.writer = SummaryWriter(str(logdir), purge_step=purge_step)

    def log(self, record: Mapping[str, Any], step: int, prefix: str = "") -> None:
        for key, value in scalars(record, prefix).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    summarize = log  # TensorBoard has no summary: the final numbers are scalars at the last step

    def text(self, tag: str, body: str, step: int) -> None:
        self.writer.add_text(tag, body, step)

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "dir": str(self.logdir)}

    def finish(self, failed: bool = False) -> None:
        self.writer.close()


# ------------------------------------------------------------------------------------------ opening

def start(settings: TrackerSettings, folder: Path, *, config: Mapping[str, Any], step: int,
          previous: Mapping[str, Any] | None, logged: int | None, group: str | None = None) -> Tracker:
    """The tracker of a training launch in run folder `folder`, its config logged.

    step: the step the launch starts from (0: from scratch, else a checkpoint's); previous: the
    `state()` the run folder kept from an earlier launch (or None); logged: the last step the
    earlier launches logged (None: none); group: the sweep folder when Hydra runs a sweep, the W&B
    group unless logger.group is set. TrackingError in one line if the tracker cannot be opened."""
    if settings.kind == "none":
        return Tracker()
    require_package(settings.kind)
    name = settings.name or default_name(folder)
    if settings.kind == "tensorboard":
        logdir = (Path(settings.dir) / name if settings.dir else Path(folder) / TENSORBOARD_DIR).resolve()
        continues = step > 0 and previous is not None and previous.get("kind") == "tensorboard" \
            and previous.get("dir") == str(logdir)
        tracker = TensorBoardTracker(logdir, purge_step=step + 1 if continues else 0)
        tracker.text("config", "```\n" + json.dumps(dict(config), indent=2, default=str) + "\n```", step)
        return tracker
    continues = step > 0 and previous is not None and previous.get("kind") == "wandb" \
        and (previous.get("project"), previous.get("entity")) == (settings.project, settings.entity)
    state = {"kind": "wandb", "id": previous["id"] if continues else None, "project": settings.project,
             "entity": settings.entity, "name": name, "group": settings.group or group,
             "tags": list(settings.tags), "mode": settings.mode}
    run = _wandb_init(state, folder)
    run.config.update(dict(config), allow_val_change=True)  # runtime keys may change between launches
    state["id"] = run.id
    seen = logged if continues and logged is not None else -1
    return WandbTracker(run, state, skip_through=max(seen, run.step - 1))  # run.step: W&B's next step


def reopen(state: Mapping[str, Any], folder: Path) -> Tracker:
    """The tracked run a training recorded (its `state()`), continued, for later stages (eval);
    TrackingError in one line if its package is missing or it cannot be opened."""
    kind = state.get("kind")
    if kind not in PACKAGE:
        raise TrackingError(f"the run folder names a tracker of unknown kind {kind!r}")
    require_package(kind)
    if kind == "tensorboard":
        return TensorBoardTracker(Path(state["dir"]), purge_step=None)
    return WandbTracker(_wandb_init(dict(state), folder), dict(state), skip_through=-1)


def _wandb_init(state: Mapping[str, Any], folder: Path) -> Any:
    """wandb.init of the run `state` describes (a new one when its id is None), files under
    <folder>/wandb/. The console is not captured (the run's own logs are its files)."""
    wandb = _import("wandb", "wandb")
    try:
        return wandb.init(id=state["id"], resume="allow" if state["id"] else None, project=state["project"],
                          entity=state["entity"], name=state["name"], group=state["group"],
                          tags=state.get("tags") or None, mode=state["mode"], dir=str(folder),
                          reinit="finish_previous", settings=wandb.Settings(console="off"))
    except Exception as e:  # wandb raises its own errors (not logged in, no network, bad entity, ...)
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TrackingError(f"wandb could not open its run ({why}); WANDB_MODE=offline logs locally "
                            "(wandb sync uploads later), logger=none turns tracking off") from None
