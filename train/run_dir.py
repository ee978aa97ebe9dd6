"""THE run folder format: the only module that knows the file names of a training run's folder.

    config.yaml       the resolved training config (written at every launch)
    store.json        which activations the run trains on (`ActivationStore.identity()`)
    metrics.jsonl     one JSON line per logged step (the training batch's loss terms, L0, ...)
    validation.jsonl  one JSON line per validation on held-out rows (train/validation.py)
    checkpoint.pt     SAE, optimizer, schedule, data position and RNG (replaced atomically): tensors and
                      plain values only, read back with torch.load(weights_only=True)
    sae/              the trained SAE: sae.safetensors + sae.json (`train.saes.save` / `load`)
    held_out/         a streaming run's (data.source=stream) store of held-out text: what validation and
                      eval read (harvest/stream.py); `RunConfig.store` names it
    done.json         written last: {step, tokens, world_size}; a finished run has it
    train.lock        present while a launch writes the run (train, or import_saelens): {host, pid, started,
                      command} (runtime/lock.py, `RunDir.writer_lock`); results are refused meanwhile
    tracker.json      the experiment tracker's run (logger=wandb|tensorboard; runtime/tracking.py): what a
                      resumed launch and eval need to continue it (W&B run id, project, ...; TensorBoard
                      log folder); absent if the run was never tracked
    wandb/, tensorboard/   the trackers' local files (W&B's offline or cached run; default event folder)
    eval.json, geometry.json, autointerp.json, ...     results of later stages (`write_result`)

Training writes through `RunDir`; eval, geometry, dashboard, autointerp and report read through it.
`RunDir.open` loads a finished run with its store and checks that they belong together.
"""

from __future__ import annotations

import json
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError

from harvest.held_out import HeldOut
from harvest.paired import PairedStore
from harvest.store import ActivationStore
from runtime.errors import ToolkitError, reraise_as
from runtime.files import read_text_file, write_atomic, write_json, write_text
from runtime.lock import WriterLock
from train.config import RULES
from train.saes import SAE, load, nonfinite, save
from train.saes.base import CONFIG_FILE, WEIGHTS_FILE


class RunError(ToolkitError):
    """A folder that is not the run it should be, or a run that does not fit its store."""


class RunDir:
    """The folder of one training run."""

    CONFIG = "config.yaml"
    STORE = "store.json"
    HELD_OUT = "held_out"  # a streaming run's store of held-out text
    METRICS = "metrics.jsonl"
    VALIDATION = "validation.jsonl"
    CHECKPOINT = "checkpoint.pt"
    SAE = "sae"
    DONE = "done.json"
    LOCK = "train.lock"  # held by the launch that writes the run (`writer_lock`)
    TRACKER = "tracker.json"  # runtime.tracking.Tracker.state() of the run's tracked run
    # results of later stages
    EVAL = "eval.json"
    GEOMETRY = "geometry.json"
    AUTOINTERP = "autointerp.json"
    DASHBOARD = "dashboard"  # a folder of HTML pages

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    def file(self, name: str) -> Path:
        """Path of a file in the run folder (results and plots of later stages)."""
        return self.path / name

    # ------------------------------------------------------------------ what is there

    @property
    def has_config(self) -> bool:
        return (self.path / self.CONFIG).exists()

    @property
    def has_sae(self) -> bool:
        return (self.path / self.SAE / CONFIG_FILE).exists()

    @property
    def finished(self) -> bool:
        return (self.path / self.DONE).exists()

    @property
    def has_checkpoint(self) -> bool:
        return (self.path / self.CHECKPOINT).exists()

    @staticmethod
    def find(path: str | Path) -> list[RunDir]:
        """`path` itself if it holds a trained SAE, else every run below it that does (sorted)."""
        path = Path(path)
        if RunDir(path).has_sae:
            return [RunDir(path)]
        return [RunDir(p.parent.parent) for p in sorted(path.rglob(f"{RunDir.SAE}/{CONFIG_FILE}"))]

    # ------------------------------------------------------------------ written by training

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def read_config(self) -> dict[str, Any]:
        """The saved training (or import) config as plain containers: a mapping whose `model` names its
        arch and whose `data` names its store; RunError naming the file otherwise."""
        f = self.path / self.CONFIG
        try:
            config = json.loads(json.dumps(OmegaConf.to_container(OmegaConf.create(read_text_file(f)))))
        except FileNotFoundError:
            raise RunError(f"{self} has no {self.CONFIG}: not a run folder") from None
        except Exception as e:  # unreadable, not YAML, or YAML that is not a mapping
            raise RunError(f"{f} is not a run config ({type(e).__name__}: {_first_line(e)})") from None
        model, data = (config.get(key) if isinstance(config, dict) else None for key in ("model", "data"))
        if not (isinstance(model, dict) and isinstance(model.get("arch"), str) and isinstance(data, dict)
                and isinstance(data.get("store"), str)):
            raise RunError(f"{f} is not a run config: it needs model.arch and data.store")
        return config

    def write_config(self, config: dict[str, Any]) -> None:
        """config.yaml: the resolved training config, as `python -m train` composed it."""
        write_text(self.path / self.CONFIG, OmegaConf.to_yaml(config))

    def run_config(self) -> RunConfig:
        """config.yaml as the later stages read it (RunConfig), every value they use checked; RunError
        naming the file otherwise."""
        config = self.read_config()
        data = config["data"]
        for key in ("eval_frac", "outlier_factor"):
            rule = RULES[f"data.{key}"]
            if not rule.ok(data.get(key)):
                raise RunError(f"{self.path / self.CONFIG}: data.{key} must be {rule.allowed}, got {data.get(key)!r}")
        store = str(self.path / self.HELD_OUT) if data.get("source") == "stream" else data["store"]
        return RunConfig(dict(config["model"]), store, float(data["eval_frac"]), data.get("outlier_factor"),
                         data.get("target"))

    def write_import_config(self, store: str, eval_frac: float, outlier_factor: float | None,
                            model: dict[str, Any], imported: dict[str, Any]) -> None:
        """config.yaml of a run that was not trained here (interop/import_saelens.py): what eval reads
        (data.store, eval_frac, outlier_factor; model with its arch) and where the SAE came from."""
        self.write_config({"data": {"store": store, "eval_frac": eval_frac, "outlier_factor": outlier_factor},
                           "model": model, "imported": imported})

    def read_store(self) -> dict[str, Any] | None:
        """The identity of the store the run trained on, or None if not recorded."""
        f = self.path / self.STORE
        return self._read_object(self.STORE, "a store identity") if f.exists() else None

    def write_store(self, store: ActivationStore) -> None:
        write_json(self.path / self.STORE, store.identity())

    def load_checkpoint(self, device: torch.device) -> dict[str, Any]:
        """The training state `save_checkpoint` wrote, its tensors on `device`.

        Read with weights_only=True: only tensors and plain values are rebuilt, so a file that asks
        the unpickler for anything else (a planted pickle, a checkpoint of an older format) is refused
        with RunError, and nothing in it runs. A damaged file is refused the same way."""
        f = self.path / self.CHECKPOINT
        try:
            return torch.load(f, map_location=device, weights_only=True)
        except pickle.UnpicklingError as e:
            raise RunError(f"{f} is not loaded: it holds objects other than tensors and plain values "
                           f"({_refused_global(str(e))}), and such a file is never unpickled: delete it to train this "
                           "run from scratch, or use another run directory") from None
        except (EOFError, RuntimeError, ValueError, OSError) as e:
            raise RunError(f"{f} is not a readable checkpoint ({_first_line(e)}); delete it to train this run from "
                           "scratch, or use another run directory") from None

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Flushed to disk before it replaces the previous checkpoint: never half-written. `state` may
        hold only what `load_checkpoint` reads back (tensors, dicts, lists, tuples, str, int, float,
        bool, None): anything else is a TypeError here, not a checkpoint that cannot be resumed."""
        _check_plain(state, "state")
        write_atomic(self.path / self.CHECKPOINT, lambda f: torch.save(state, f), durable=True)

    def open_log(self, name: str) -> IO[str]:
        """A JSON-lines log (METRICS or VALIDATION) for appending one line per record."""
        return open(self.path / name, "a")

    def read_log(self, name: str) -> list[dict[str, Any]]:
        """The records of a JSON-lines log ([] if there is none), each a JSON object with an integer
        "step". A last line cut short (no newline after it: a kill or a full disk during an append) is
        left out, and the next launch's `drop_logs_after` removes it from the file; any other line that
        is not a record is a RunError naming the file and the line."""
        f = self.path / name
        if not f.exists():
            return []
        lines = f.read_bytes().split(b"\n")
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
                if not isinstance(record, dict) or type(record.get("step")) is not int:
                    raise ValueError('not a JSON object with an integer "step"')
            except ValueError as e:  # bad JSON and bad UTF-8 both
                if number == len(lines):  # the unfinished last line
                    break
                raise RunError(f"{f} line {number} is not a log record ({_first_line(e)}); delete that line "
                               "(or the log) to go on") from None
            records.append(record)
        return records

    def read_metrics(self) -> list[dict[str, Any]]:
        return self.read_log(self.METRICS)

    def read_validation(self) -> list[dict[str, Any]]:
        return self.read_log(self.VALIDATION)

    def last_logged_step(self) -> int | None:
        """The largest step in either log (None: nothing logged)."""
        steps = [r["step"] for name in (self.METRICS, self.VALIDATION) for r in self.read_log(name)]
        return max(steps, default=None)

    def read_tracker(self) -> dict[str, Any] | None:
        """The tracked run recorded by the last tracked launch (TRACKER), or None."""
        f = self.path / self.TRACKER
        return self._read_object(self.TRACKER, "a tracker record") if f.exists() else None

    def write_tracker(self, state: dict[str, Any] | None) -> None:
        """Record the launch's tracked run (nothing for None: logger=none keeps an earlier record)."""
        if state is not None:
            write_json(self.path / self.TRACKER, state)

    def drop_logs_after(self, step: int) -> None:
        """Forget logged steps after `step` in both logs (a resumed run redoes them)."""
        for name in (self.METRICS, self.VALIDATION):
            f = self.path / name
            if f.exists():
                write_text(f, "".join(json.dumps(r) + "\n" for r in self.read_log(name) if r["step"] <= step))

    def save_sae(self, sae: SAE) -> Path:
        save(sae, self.path / self.SAE)
        return self.path / self.SAE

    def load_sae(self, device: str | torch.device = "cpu") -> SAE:
        """The trained SAE. Its weights are read by safetensors (a JSON header and raw tensor bytes;
        nothing in the file is executed), its architecture from sae.json; a file that is not what
        `save_sae` writes is refused with RunError naming it."""
        folder = self.path / self.SAE
        try:
            sae = load(folder, device)
        except SafetensorError as e:
            raise RunError(f"{folder / WEIGHTS_FILE} is not loaded: it holds something other than tensors in "
                           f"safetensors format ({_first_line(e)})") from None
        except (ValueError, KeyError, TypeError) as e:  # a JSON syntax error is a ValueError
            raise RunError(f"{folder / CONFIG_FILE} does not describe an SAE ({type(e).__name__}: "
                           f"{_first_line(e)})") from None
        except RuntimeError as e:  # load_state_dict: other names or shapes
            raise RunError(f"{folder / WEIGHTS_FILE} does not hold the weights of the SAE its sae.json "
                           f"describes ({_first_line(e)})") from None
        bad = nonfinite(sae.state_dict())
        if bad:
            raise RunError(f"{folder / WEIGHTS_FILE} holds non-finite weights: {bad}; nothing computed from "
                           "them would mean anything")
        return sae

    def sae_config(self) -> dict[str, Any]:
        """sae.json: the architecture and its constructor arguments, without loading weights."""
        return self._read_object(f"{self.SAE}/{CONFIG_FILE}", "an SAE description")

    def sae_mtime(self) -> float:
        """When the SAE's weights were written (results older than that are stale)."""
        return (self.path / self.SAE / WEIGHTS_FILE).stat().st_mtime

    def mark_done(self, info: dict[str, Any]) -> None:
        write_json(self.path / self.DONE, info, indent=None)

    def done(self) -> dict[str, Any]:
        """done.json ({step, tokens, world_size}), or {} while unfinished."""
        return self._read_object(self.DONE, "a record of a finished run") if self.finished else {}

    # ------------------------------------------------------------------ results of later stages

    def write_result(self, name: str, result: dict[str, Any], indent: int = 2) -> Path:
        """A stage's JSON result (eval.json, geometry.json, ...), written atomically; refused (RunError)
        while a launch trains or imports into the run (its results would describe weights being replaced)."""
        self.writer_lock(f"run {self}", RunError).check()
        write_json(self.path / name, result, indent=indent)
        return self.path / name

    def writer_lock(self, what: str, error: type[ToolkitError]) -> WriterLock:
        """The lock every launch that writes the run itself (train, import_saelens) holds while it does:
        `with run.writer_lock(...)` takes it, `.check()` only refuses while someone else holds it."""
        return WriterLock(self.path / self.LOCK, what, error)

    def read_result(self, name: str) -> dict[str, Any]:
        return self._read_object(name, "a result")

    def _read_object(self, name: str, what: str) -> dict[str, Any]:
        """The JSON object in the run's file `name`; RunError naming the file when it is anything else."""
        f = self.path / name
        try:
            value = json.loads(read_text_file(f))
        except OSError as e:
            raise RunError(f"{f} cannot be read ({e.strerror})") from None
        except ValueError as e:
            raise RunError(f"{f} is not {what}: not JSON ({_first_line(e)})") from None
        if not isinstance(value, dict):
            raise RunError(f"{f} is not {what}: a JSON object was expected")
        return value

    def result_is_fresh(self, name: str) -> bool:
        """The result exists and is newer than the SAE."""
        f = self.path / name
        return f.exists() and f.stat().st_mtime >= self.sae_mtime()

    # ------------------------------------------------------------------ reading a finished run

    def _store(self, path: str) -> ActivationStore:
        try:
            return ActivationStore(path)
        except FileNotFoundError:
            raise RunError(f"store {path} of run {self.path} is not an activation store") from None

    def check_trained(self, what: str = "run") -> None:
        """RunError unless the folder exists and holds a trained SAE."""
        if not self.path.exists():
            raise RunError(f"{what} {self.path} does not exist")
        if not self.has_sae:
            raise RunError(f"{what} {self.path} has no trained SAE: expected {self.path / self.SAE / CONFIG_FILE}")

    def open(self, device: torch.device, store: str | None = None,
             outlier_factor: float | str | None = "run") -> TrainedRun:
        """Load the SAE and its store (the recorded one, or `store`) and check that they belong together.

        outlier_factor: "run" (the run's own data.outlier_factor), None (keep every row) or a number."""
        self.check_trained()
        if not self.has_config:
            raise RunError(f"{self.path} has no {self.CONFIG}: not a training run directory")
        config = self.run_config()
        store_path = store or config.store
        acts = self._store(store_path)
        if config.target is not None:  # a transcoder reads its input and target side by side
            with reraise_as(RunError):
                acts = PairedStore(acts, self._store(config.target))
        sae = self.load_sae(device).eval()
        if sae.d != acts.d_in:
            raise RunError(f"run {self.path} is an SAE on d={sae.d} activations but store {store_path} has "
                           f"d={acts.d_in}")
        trained_on = self.read_store()
        if trained_on is not None:
            now = acts.identity()
            differ = [k for k in ("model", "layer", "site") if trained_on.get(k) != now[k]]
            if differ:
                what = ", ".join(f"{k} {trained_on.get(k)!r} vs {now[k]!r}" for k in differ)
                raise RunError(f"run {self.path} was trained on other activations than store {store_path} ({what})")
        factor = config.outlier_factor if outlier_factor == "run" else outlier_factor
        held = HeldOut.of(acts, config.eval_frac, factor)
        if not held.chunks:
            raise RunError(f"store {store_path} has no held-out chunks for run {self.path} (eval_frac="
                           f"{config.eval_frac}, {acts.n_chunks} chunks)")
        return TrainedRun(self, config, sae, acts, held)


PLAIN = (str, int, float, bool, type(None))  # what weights_only=True rebuilds, with tensors and the containers
CONTAINERS = (dict, OrderedDict, list, tuple)  # (exact types: an np.float64 is a float, a NamedTuple a tuple,
                                               # yet weights_only refuses both)


def _check_plain(value: Any, where: str) -> None:
    """TypeError unless `value` is built of tensors, plain values, dicts, lists and tuples only."""
    if isinstance(value, torch.Tensor) or type(value) in PLAIN:
        return
    if type(value) not in CONTAINERS:
        raise TypeError(f"checkpoint entry {where} is a {type(value).__module__}.{type(value).__qualname__}: "
                        "store it as tensors or plain values, which torch.load(weights_only=True) reads back")
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for k, v in items:
        if type(k) not in (str, int):
            raise TypeError(f"checkpoint key {k!r} in {where} is a {type(k).__name__}, not a str or int")
        _check_plain(v, f"{where}[{k!r}]")


def _refused_global(message: str) -> str:
    """What torch's weights-only unpickler refused, in a few words, from its long message."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    return f"it names {found.group(1)}" if found else "or it is damaged"


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


@dataclass(frozen=True)
class RunConfig:
    """What later stages read of a run's config.yaml (`RunDir.run_config`)."""

    model: dict[str, Any]  # the model block: arch and the keys of conf/train/model/<arch>.yaml
    store: str  # the activation store it trained on (data.store), or a streaming run's held-out store
    eval_frac: float  # data.eval_frac: the held-out split it trained without
    outlier_factor: float | None  # data.outlier_factor: the norm cut's factor (None: every row kept)
    target: str | None = None  # data.target: a transcoder's target store (None: an autoencoder)

    @property
    def arch(self) -> str:
        return self.model["arch"]


@dataclass
class TrainedRun:
    """A finished run opened for analysis: its SAE (eval mode), its store, and the store's held-out view
    (the chunks the run never trained on, the norm cut for outlier rows; harvest/held_out.py)."""

    dir: RunDir
    config: RunConfig
    sae: SAE
    store: ActivationStore
    held: HeldOut
