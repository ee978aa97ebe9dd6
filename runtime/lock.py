"""One writer per store and per run folder: an advisory lock file naming its holder.

    with WriterLock(path, "store data/activations/x", LockedError):
        ...   # the only process writing there

The lock is a small JSON file {host, pid, started, time, renewed, command} created exclusively
(`Location.create`: O_EXCL on disk, a conditional PUT `If-None-Match: *` on object storage), so of
two launches exactly one creates it; the other is refused in one line naming the holder. The file is
removed when the body ends, however it ends. A lock left by a process that died (kill -9, power
loss) is stale: on the same host, its pid is gone or belongs to a process started at another time,
and the next launch takes it over (saying so).

A lock held from another host cannot be checked from here. On disk the refusal names the host and
the file to delete once that job is known to be dead. On object storage, where the writers of one
bucket are usually on different hosts, the lock is a lease: its holder renews `renewed` every
LEASE_SECONDS / 4 with a compare-and-swap on the object's ETag (`If-Match`), and a lock not renewed
for LEASE_SECONDS is stale; it is taken over with the same compare-and-swap, so of two launches that
find it stale one wins. A holder whose renewal fails (its lease was taken over after it stalled) has
lost the lock: `ensure()` raises, and the harvest stops before its next commit. The lease assumes the
hosts' clocks agree to well within LEASE_SECONDS.

Readers never take the lock: training on a store that is still being harvested, or evaluating a run
that is still training, keeps working.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from runtime.errors import ToolkitError
from runtime.location import Location, RemoteLocation

LEASE_SECONDS = 300.0  # an object-storage lock not renewed for this long is stale (module docstring)


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
          and type(info.get("renewed", 0.0)) in (int, float) and isinstance(info.get("command", ""), str))
    return info if ok else None


def holder(path: str | Path | Location) -> dict[str, Any] | None:
    """The live holder of the lock file `path` ({host, pid, started, command}); None if free or stale.

    A lock from another host counts as live on disk (it cannot be checked from here) and, on object
    storage, until its lease runs out. A file that is not a lock of ours (empty, half-written, other
    JSON, not a regular file) is live for 10 s after it was last changed (a launch may be writing it
    this instant), stale after."""
    return _holder(Location.of(path))[0]


def _holder(loc: Location) -> tuple[dict[str, Any] | None, str | None]:
    """(the live holder or None, the ETag of the lock object as read: what a takeover swaps)."""
    try:
        etag = loc.etag("") if isinstance(loc, RemoteLocation) else None
    except FileNotFoundError:
        return None, None
    try:
        info = _parse(loc.read_text("", max_bytes=1 << 16))
    except FileNotFoundError:
        return None, None
    except OSError:
        info = None
    if info is None:
        try:
            young = time.time() - loc.modified("") < 10
        except FileNotFoundError:
            return None, None
        return ({"host": "?", "pid": "?", "command": "lock file being written"} if young else None), etag
    if info["host"] == socket.gethostname():
        return (info if _alive(info["pid"], info.get("started")) else None), etag
    if loc.remote:
        return (info if time.time() - info.get("renewed", info.get("time", 0.0)) < LEASE_SECONDS else None), etag
    return info, etag


def describe(info: dict[str, Any]) -> str:
    """`pid 1234 on host-a since 08:41:07 (python -m train ...)`."""
    since = time.strftime("%H:%M:%S", time.localtime(info["time"])) if "time" in info else "?"
    return f"pid {info.get('pid')} on {info.get('host')} since {since} ({info.get('command', '?')})"


class WriterLock:
    """Hold the lock file `path` (a local path or a location) for the body of a `with`; `what` names the
    thing it guards in messages."""

    def __init__(self, path: str | Path | Location, what: str, error: type[ToolkitError] = LockedError):
        self.location = Location.of(path)
        self.path = self.location.url
        self.what = what
        self.error = error
        self.held = False
        self._lost: str | None = None  # why the lease was lost (object storage)
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def check(self) -> None:
        """Refuse (one line) if a live process holds the lock; takes nothing (for processes that only
        follow the one that takes it, such as the other ranks of a torchrun launch)."""
        info = holder(self.location)
        if info is not None:
            raise self.error(self._refusal(info))

    def _refusal(self, info: dict[str, Any]) -> str:
        hint = ""
        if info.get("host") != socket.gethostname():
            hint = (f"; if that job is dead, its lease runs out {LEASE_SECONDS:.0f} s after its last renewal, or "
                    f"delete {self.path} and relaunch") if self.location.remote else \
                f"; if that job is dead, delete {self.path} and relaunch"
        return f"{self.what} is being written by another process: {describe(info)}{hint}"

    def _me(self) -> bytes:
        """This process's lock record, as written when taking the lock."""
        pid = os.getpid()
        now = time.time()
        self._record = {"host": socket.gethostname(), "pid": pid, "started": _start_time(pid), "time": now,
                        "renewed": now, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200]}
        return json.dumps(self._record).encode()

    def acquire(self) -> None:
        for _ in range(2):  # a second try after removing a stale lock
            if self.location.create("", self._me()):
                # nobody swaps a lock inside its lease: the ETag read now is the one just created
                self._hold(self.location.etag("") if isinstance(self.location, RemoteLocation) else None)
                return
            info, etag = _holder(self.location)
            if info is not None:
                raise self.error(self._refusal(info)) from None
            print(f"{self.what}: taking over a stale lock ({self.path})", file=sys.stderr)
            if isinstance(self.location, RemoteLocation):
                mine = self.location.replace_if("", self._me(), etag) if etag is not None else None
                if mine is not None:
                    self._hold(mine)
                    return
                break  # another launch swapped it first
            try:
                self.location.delete("")
            except OSError as e:  # a folder, or no permission: nothing we may remove
                raise self.error(f"{self.what}: {self.path} is in the way of its lock file and cannot be "
                                 f"removed ({e.strerror}); remove it and relaunch") from None
        raise self.error(f"{self.what}: could not take the lock {self.path}; another launch took it first")

    def _hold(self, etag: str | None) -> None:
        """Hold the lock, whose object (on object storage) has ETag `etag`, and renew it from now on."""
        self.held = True
        if isinstance(self.location, RemoteLocation):
            self._stop.clear()
            self._renewer = threading.Thread(target=self._renew, args=(self.location, etag), daemon=True,
                                             name="lock-lease")
            self._renewer.start()

    def _renew(self, loc: RemoteLocation, etag: str) -> None:
        """Renew the lease every LEASE_SECONDS / 4 while held, by compare-and-swap on the ETag of the
        object this process wrote last."""
        while not self._stop.wait(LEASE_SECONDS / 4):
            self._record["renewed"] = time.time()
            etag = loc.replace_if("", json.dumps(self._record).encode(), etag)
            if etag is None:
                self._lost = f"{self.what}: lost its lock {self.path} (not renewed in time, taken over by another launch)"
                return

    def ensure(self) -> None:
        """Raise if the lease on object storage was lost: the caller must stop writing."""
        if self._lost is not None:
            raise self.error(self._lost)

    def release(self) -> None:
        if self.held:
            self._stop.set()
            if self._renewer is not None:
                self._renewer.join()
            if self._lost is None:
                self.location.delete("")
            self.held = False

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
