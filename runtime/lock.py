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
from runtime.files import read_text_file


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


def _parse(text: str) -> dict[str, Any] | None:
    """A lock file's content as {host, pid, started, time, command}, or None if it is not one (empty,
    half-written, or anything else someone put there)."""
    try:
        info = json.loads(text)
    except ValueError:
        return None
    if not isinstance(info, dict):
        return None
    ok = (isinstance(info.get("host"), str) and type(info.get("pid")) is int
          and isinstance(info.get("started"), (str, type(None))) and type(info.get("time", 0.0)) in (int, float)
          and isinstance(info.get("command", ""), str))
    return info if ok else None


def holder(path: str | Path) -> dict[str, Any] | None:
    """The live holder of the lock file `path` ({host, pid, started, command}); None if free or stale.

    A lock from another host counts as live (it cannot be checked from here). A file that is not a
    lock of ours (empty, half-written, other JSON, not a regular file) is live for 10 s after it was
    last changed (a launch may be writing it this instant), stale after."""
    try:
        info = _parse(read_text_file(path, max_bytes=1 << 16))
    except FileNotFoundError:
        return None
    except OSError:
        info = None
    if info is None:
        try:
            young = time.time() - Path(path).lstat().st_mtime < 10
        except FileNotFoundError:
            return None
        return {"host": "?", "pid": "?", "command": "lock file being written"} if young else None
    if info["host"] != socket.gethostname():
        return info
    return info if _alive(info["pid"], info.get("started")) else None


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
                try:
                    self.path.unlink(missing_ok=True)
                except OSError as e:  # a folder, or no permission: nothing we may remove
                    raise self.error(f"{self.what}: {self.path} is in the way of its lock file and cannot be "
                                     f"removed ({e.strerror}); remove it and relaunch") from None
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
