"""Files written whole or not at all: each is written beside its final path and renamed over it, so
a reader (or a resumed job) sees the old content or the new one, never half of either.

The temporary file's name is unique per write (`<name>.<random>.partial`), so two writers never share
one, and it is removed when the write fails (a full disk included). Only a kill -9 can leave one behind;
the job that resumes there removes such litter (everything ending in PARTIAL)."""

from __future__ import annotations

import errno
import json
import os
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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Replace `path`'s content with `text` (UTF-8) atomically."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Replace `path`'s content with `obj` as JSON (non-ASCII kept as is) atomically."""
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False))


def disk_full(error: BaseException) -> bool:
    """Whether `error` says the disk (or the user's quota) is full."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def remove_litter(folder: str | Path, name: str = "") -> None:
    """Delete the temporaries that killed writes of the file `name` (default: of every file) left under `folder`."""
    for partial in Path(folder).rglob(f"{name}*{PARTIAL}"):
        partial.unlink(missing_ok=True)
