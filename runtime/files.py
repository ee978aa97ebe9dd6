"""Files written whole or not at all: each is written beside its final path and renamed over it, so
a reader (or a resumed job) sees the old content or the new one, never half of either.

The temporary file's name is unique per write (`<name>.<random>.partial`), so two writers never share
one, and it is removed when the write fails (a full disk included). Only a kill -9 can leave one behind;
the job that resumes there removes such litter (everything ending in PARTIAL)."""

from __future__ import annotations

import errno
import json
import os
import stat
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

PARTIAL = ".partial"  # suffix of every temporary file; litter of a killed write ends with it


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], Any], durable: bool = False) -> None:
    """write(f) into a temporary `<path>.<random>.partial`, then rename it over `path`. durable=True also
    flushes the file to disk before the rename (for files a job resumes from, such as checkpoints)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}{PARTIAL}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        full = disk_full_behind(e)
        if full is not None and full is not e:  # a library's own error around it (torch.save raises RuntimeError)
            raise OSError(full.errno, full.strerror, str(path)) from None
        raise


def write_text(path: str | Path, text: str) -> None:
    """Replace `path`'s content with `text` (UTF-8) atomically."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Replace `path`'s content with `obj` as JSON (non-ASCII kept as is) atomically."""
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False))


def disk_full(error: BaseException) -> bool:
    """Whether `error` says the disk (or the user's quota) is full, itself or behind the error a library
    raised instead (`disk_full_behind`)."""
    return disk_full_behind(error) is not None


def disk_full_behind(error: BaseException) -> OSError | None:
    """The full-disk OSError (ENOSPC, EDQUOT) that `error` is or was raised while handling: libraries
    report a failed write their own way (torch's writer raises RuntimeError("... unexpected pos ..."),
    with the OSError as its context). None if there is none."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def read_text_file(path: str | Path, max_bytes: int = 64 << 20) -> str:
    """The UTF-8 text of the regular file `path`, for files another process or person may have
    written (configs, locks, records). Anything else at that path is refused with OSError instead of
    being read: a FIFO or a device would block or never end (opened without blocking to find out), a
    folder is not a file, and a file over `max_bytes` is not one of ours."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if info.st_size > max_bytes:
            raise OSError(errno.EFBIG, f"{info.st_size} bytes, more than the {max_bytes} expected", str(path))
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    finally:
        os.close(fd)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise OSError(errno.EINVAL, "not UTF-8 text", str(path)) from None


def remove_litter(folder: str | Path, name: str = "") -> None:
    """Delete the temporaries that killed writes of the file `name` (default: of every file) left under `folder`."""
    for partial in Path(folder).rglob(f"{name}*{PARTIAL}"):
        partial.unlink(missing_ok=True)


def uncreatable(folder: str | Path) -> str | None:
    """Why the folder `folder` cannot be used or created by this user, or None: checked before a job
    writes anything, so that it is refused in one line instead of failing half-way."""
    folder = Path(folder).absolute()
    for parent in (folder, *folder.parents):
        if parent.is_dir():
            if parent != folder and not os.access(parent, os.W_OK | os.X_OK):
                return f"no permission to create folders in {parent}"
            return None
        if parent.exists() or parent.is_symlink():
            return f"{parent} is not a folder"
    return None
