"""One writer per store and per run folder: an advisory lock file naming its holder.

    with WriterLock(path, "store data/activations/x", LockedError):
        ...   # the only process writing there

The lock is a small JSON file {host, pid, started, command} created with O_EXCL, so of two launches
exactly one creates it; the other is refused in one line naming the holder. The file is removed when
the body ends, however it ends. A lock left by a process that died (kill -9, power loss) is stale: on
the same host, its pid is gone or belongs to a process started at another time, and the next launch
takes it over (saying so). A lock held from another host cannot be checked from here: the refusal
names the host and the file to delete once that job is known to be dead.

Readers never take the lock: training on a store that is still being harvested, or evaluating a run
that is still training, keeps working.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from runtime.errors import ToolkitError


class LockedError(ToolkitError):
    """Another live process writes there."""


def _start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot, /proc/<pid>/stat field 22); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, started: str | None) -> bool:
    """Whether the process `pid` that recorded start time `started` still runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _start_time(pid)
    return started is None or now is None or now == started  # a reused pid has another start time


def holder(path: str | Path) -> dict[str, Any] | None:
    """The live holder of the lock file `path` ({host, pid, started, command}); None if free or stale.

    A lock from another host counts as live (it cannot be checked from here)."""
    try:
        info = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # being written this instant, or left empty by a kill right after creation
        try:
            young = time.time() - Path(path).stat().st_mtime < 10
        except FileNotFoundError:
            return None
        return {"host": "?", "pid": "?", "command": "lock file being written"} if young else None
    if info.get("host") != socket.gethostname():
        return info
    return info if _alive(int(info.get("pid", -1)), info.get("started")) else None


def describe(info: dict[str, Any]) -> str:
    """`pid 1234 on host-a since 08:41:07 (python -m train ...)`."""
    since = time.strftime("%H:%M:%S", time.localtime(info["time"])) if "time" in info else "?"
    return f"pid {info.get('pid')} on {info.get('host')} since {since} ({info.get('command', '?')})"


class WriterLock:
    """Hold the lock file `path` for the body of a `with`; `what` names the thing it guards in messages."""

    def __init__(self, path: str | Path, what: str, error: type[ToolkitError] = LockedError):
        self.path = Path(path)
        self.what = what
        self.error = error
        self.held = False

    def check(self) -> None:
        """Refuse (one line) if a live process holds the lock; takes nothing (for processes that only
        follow the one that takes it, such as the other ranks of a torchrun launch)."""
        info = holder(self.path)
        if info is not None:
            raise self.error(self._refusal(info))

    def _refusal(self, info: dict[str, Any]) -> str:
        hint = "" if info.get("host") == socket.gethostname() else \
            f"; if that job is dead, delete {self.path} and relaunch"
        return f"{self.what} is being written by another process: {describe(info)}{hint}"

    def acquire(self) -> None:
        pid = os.getpid()
        me = {"host": socket.gethostname(), "pid": pid, "started": _start_time(pid), "time": time.time(),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                info = holder(self.path)
                if info is not None:
                    raise self.error(self._refusal(info)) from None
                print(f"{self.what}: taking over a stale lock ({self.path})", file=sys.stderr)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise self.error(f"{self.what}: could not take the lock {self.path}; another launch took it first")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
