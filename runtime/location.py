"""Where a store lives: a folder on local disk, or a folder-like prefix at an fsspec URL.

    loc = Location.of("s3://bucket/acts/gpt2.zarr")   # or "memory://x.zarr", or a plain path
    loc.read("checksums/3.json")        -> bytes (FileNotFoundError when absent)
    loc.write("checksums/3.json", data) whole or not at all
    loc.create("lock", data)            -> False if it exists (one of two racing writers wins)
    loc.zarr_store(read_only=True)      what zarr opens the group from

Keys are '/'-separated paths inside the location. Every reader and writer of activation stores goes
through this class, so that the store format (harvest/store.py) does not care where its bytes are.

Guarantees on both kinds:
  - `write` is atomic: a reader sees the old object or the new one. Local: temporary file + rename
    (runtime/files.py). Object storage: one PUT, which S3 and its kin apply whole.
  - `create` is exclusive: local O_EXCL; object storage a conditional PUT (`If-None-Match: *`, which
    S3 has honoured since 2024, as do MinIO, R2 and moto); `replace_if` a compare-and-swap on the
    object's ETag (`If-Match`), which the lease lock of runtime/lock.py takes over a stale lock with.
  - no rename on object storage: a group appears when its root zarr.json is written, last.

Credentials are never part of a location: an URL holding them (`s3://key:secret@bucket`) is refused,
and s3fs finds them where the AWS tools do (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
~/.aws, instance roles), the endpoint of an S3-compatible server in AWS_ENDPOINT_URL. Nothing this
module prints or raises contains more than the URL.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import os
import shutil
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from runtime.errors import ToolkitError
from runtime.files import read_text_file, write_atomic

RANGE_BYTES = 4 << 20  # remote files of known size are read in ranges of this many bytes, in parallel
CONDITIONAL = frozenset({"s3", "s3a", "memory"})  # protocols whose conditional puts are implemented here


class LocationError(ToolkitError):
    """A location that cannot be used: a bad URL, an unknown protocol, missing credentials, an
    endpoint that does not answer. One line, naming the URL (never a credential)."""


def is_url(where: str | Path) -> bool:
    """Whether `where` names a location by URL (`proto://...`) rather than a local path."""
    return isinstance(where, str) and "://" in where and not where.startswith("file://")


class Location(ABC):
    """A folder (local) or a key prefix (remote) holding files addressed by '/'-separated keys."""

    url: str  # as shown to users and recorded in run folders: a path, or protocol://bucket/prefix
    remote: bool

    @staticmethod
    def of(where: str | Path | Location) -> Location:
        """The location `where` names: a Location as is, a URL, or a local path (file:// included)."""
        if isinstance(where, Location):
            return where
        if is_url(where):
            return RemoteLocation(str(where))
        text = str(where)
        return LocalLocation(Path(text[len("file://"):] if text.startswith("file://") else text))

    # ------------------------------------------------------------------ names

    @property
    def name(self) -> str:
        """The last component (`gpt2.zarr`)."""
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def sibling(self, name: str) -> Location:
        """The location `name` beside this one (`<parent>/<name>`)."""
        raise NotImplementedError

    def child(self, key: str) -> Location:
        raise NotImplementedError

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    @property
    def identity(self) -> str:
        """A canonical name: the absolute path of a local folder, the URL of a remote one."""
        return self.url

    # ------------------------------------------------------------------ the operations (per kind)

    @abstractmethod
    def exists(self, key: str = "") -> bool:
        """Whether a file or folder `key` (the location itself for "") exists."""

    @abstractmethod
    def is_file(self, key: str) -> bool: ...

    @abstractmethod
    def is_dir(self, key: str = "") -> bool:
        """A folder; on object storage, a prefix that some object starts with."""

    @abstractmethod
    def listdir(self, key: str = "") -> list[str]:
        """Names directly under `key`, sorted."""

    @abstractmethod
    def keys(self, prefix: str = "") -> list[str]:
        """Keys of every file under `prefix` (all the way down), relative to the location, sorted."""

    @abstractmethod
    def read(self, key: str) -> bytes:
        """The whole file `key`; FileNotFoundError when there is none."""

    def read_view(self, key: str, size: int | None = None) -> memoryview | bytes:
        """The whole file `key`, as fast as this kind of location allows (a local file into a reused
        buffer; a remote one of known `size` in parallel ranges)."""
        return self.read(key)

    @abstractmethod
    def read_text(self, key: str, max_bytes: int = 64 << 20) -> str:
        """A small UTF-8 file another process or person may have written (records, locks): anything
        but a regular file of at most `max_bytes` is refused with OSError instead of being read."""

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def modified(self, key: str) -> float:
        """When the file `key` was last written (seconds since the epoch)."""

    @abstractmethod
    def sizes(self, prefix: str = "") -> int:
        """Bytes of all files under `prefix`."""

    @abstractmethod
    def write(self, key: str, data: bytes) -> None:
        """Replace the file `key` with `data`, atomically (module docstring)."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Create the file `key` holding `data` unless it exists: True if this call created it."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the file `key` (nothing if there is none)."""

    @abstractmethod
    def delete_tree(self) -> None:
        """Remove the location and everything in it."""

    @abstractmethod
    def zarr_store(self, read_only: bool) -> Any:
        """What `zarr.open_group` opens this location as."""

    @abstractmethod
    def check_readable(self) -> None:
        """LocationError in one line if the location cannot be reached (before any work starts)."""

    @abstractmethod
    def check_writable(self) -> None:
        """LocationError in one line if a store cannot be written there."""


class LocalLocation(Location):
    remote = False

    def __init__(self, path: Path):
        self.path = path
        self.url = str(path)

    def file(self, key: str = "") -> Path:
        """The local path of `key` (of the folder itself for "")."""
        return self.path / key if key else self.path

    def sibling(self, name: str) -> LocalLocation:
        return LocalLocation(self.path.with_name(name))

    def child(self, key: str) -> Location:
        return LocalLocation(self.path / key)

    @property
    def identity(self) -> str:
        return str(self.path.resolve())

    def exists(self, key: str = "") -> bool:
        return self.file(key).exists()

    def is_file(self, key: str) -> bool:
        return self.file(key).is_file()

    def is_dir(self, key: str = "") -> bool:
        return self.file(key).is_dir()

    def listdir(self, key: str = "") -> list[str]:
        return sorted(p.name for p in self.file(key).iterdir())

    def keys(self, prefix: str = "") -> list[str]:
        return sorted(str(f.relative_to(self.path)) for f in self.file(prefix).rglob("*") if f.is_file())

    def read(self, key: str) -> bytes:
        return self.file(key).read_bytes()

    def read_text(self, key: str, max_bytes: int = 64 << 20) -> str:
        return read_text_file(self.file(key), max_bytes)

    def read_view(self, key: str, size: int | None = None) -> memoryview:
        """The whole file, read into this thread's reusable buffer: valid until the thread's next read
        (a fresh bytes object per chunk would cost the kernel a page fault per 4 KiB of every file)."""
        f = self.file(key)
        with open(f, "rb", buffering=0) as fh:
            size = os.fstat(fh.fileno()).st_size
            buf = getattr(_buffers, "buf", None)
            if buf is None or len(buf) < size + 1:
                buf = _buffers.buf = bytearray(size + size // 8 + 1)
            view, n = memoryview(buf), 0
            while True:  # to the end of the file, whatever its size now
                got = fh.readinto(view[n:])
                if not got:
                    return view[:n]
                n += got
                if n == len(buf):  # the file grew while it was read: never return a part of it
                    raise OSError(f"{f} changed size while it was read")

    def size(self, key: str) -> int:
        return self.file(key).stat().st_size

    def modified(self, key: str) -> float:
        return self.file(key).lstat().st_mtime

    def sizes(self, prefix: str = "") -> int:
        return sum(f.stat().st_size for f in self.file(prefix).rglob("*") if f.is_file())

    def write(self, key: str, data: bytes) -> None:
        f = self.file(key)
        f.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(f, lambda out: out.write(data))

    def create(self, key: str, data: bytes) -> bool:
        f = self.file(key)
        f.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        return True

    def delete(self, key: str) -> None:
        self.file(key).unlink(missing_ok=True)

    def delete_tree(self) -> None:
        shutil.rmtree(self.path)

    def zarr_store(self, read_only: bool) -> Any:
        return str(self.path)

    def check_readable(self) -> None:
        pass

    def check_writable(self) -> None:
        pass


_buffers = threading.local()  # each reading thread's buffer for whole local files


class RemoteLocation(Location):
    """A prefix at an fsspec URL. The filesystem is built from the URL's protocol alone: its options,
    credentials above all, come from the environment (module docstring)."""

    remote = True

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.protocol = parts.scheme
        if not self.protocol or not parts.netloc and self.protocol != "memory":
            raise LocationError(f"{_safe(url)} is not a usable URL: it names no bucket (expected "
                                f"{self.protocol or 's3'}://<bucket>/<path>)")
        if "@" in parts.netloc:
            raise LocationError(f"{self.protocol}://<hidden>@{parts.hostname}{parts.path}: credentials in a URL end up "
                                "in configs and logs; remove them and set them in the environment "
                                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE for s3://)")
        self.url = url.rstrip("/")
        self.root = (parts.netloc + parts.path).rstrip("/")  # bucket/prefix, as fsspec names it
        self.fs = _filesystem(self.protocol, self.url)

    def _k(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def sibling(self, name: str) -> Location:
        return RemoteLocation(self.url.rsplit("/", 1)[0] + "/" + name)

    def child(self, key: str) -> Location:
        return RemoteLocation(f"{self.url}/{key}")

    def _call(self, what: Callable[[], Any]) -> Any:
        """Run one filesystem call, turning the client's failures to reach the store into LocationError
        (FileNotFoundError and FileExistsError pass: the callers handle them)."""
        try:
            return what()
        except (FileNotFoundError, FileExistsError):
            raise
        except Exception as e:
            problem = _problem(e)
            if problem is None:
                raise
            raise LocationError(f"{self.url}: {problem}") from None

    def exists(self, key: str = "") -> bool:
        return self._call(lambda: self.fs.exists(self._k(key)))

    def is_file(self, key: str) -> bool:
        return self._call(lambda: self.fs.isfile(self._k(key)))

    def is_dir(self, key: str = "") -> bool:
        return self._call(lambda: self.fs.isdir(self._k(key)))

    def listdir(self, key: str = "") -> list[str]:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1]
                      for p in self._call(lambda: self.fs.ls(self._k(key), detail=False, refresh=True)))

    def keys(self, prefix: str = "") -> list[str]:
        found = self._call(lambda: self.fs.find(self._k(prefix)))
        start = len(self.root.lstrip("/")) + 1
        return sorted(f.lstrip("/")[start:] for f in found)

    def read(self, key: str) -> bytes:
        return self._call(lambda: self.fs.cat_file(self._k(key)))

    def read_view(self, key: str, size: int | None = None) -> bytes:
        """An object of known `size` over RANGE_BYTES x 2 comes in RANGE_BYTES ranges requested at once
        (one connection each): a single stream of an object store is slower than its network."""
        if size is None or size < 2 * RANGE_BYTES:
            return self.read(key)
        starts = list(range(0, size, RANGE_BYTES))
        ends = [min(s + RANGE_BYTES, size) for s in starts]
        path = self._k(key)
        try:
            parts = self._call(lambda: self.fs.cat_ranges([path] * len(starts), starts, ends, on_error="raise"))
        except FileNotFoundError:
            raise
        except OSError:  # a range past the end of a truncated object: read it whole, the caller checks its size
            return self.read(key)
        return b"".join(parts)

    def read_text(self, key: str, max_bytes: int = 64 << 20) -> str:
        size = self.size(key)
        if size > max_bytes:
            raise OSError(errno.EFBIG, f"{size} bytes, more than the {max_bytes} expected", f"{self.url}/{key}")
        try:
            return self.read(key).decode("utf-8")
        except UnicodeDecodeError:
            raise OSError(errno.EINVAL, "not UTF-8 text", f"{self.url}/{key}") from None

    def size(self, key: str) -> int:
        return self._call(lambda: self.fs.info(self._k(key))["size"])

    def sizes(self, prefix: str = "") -> int:
        found = self._call(lambda: self.fs.find(self._k(prefix), detail=True))
        return sum(info.get("size", 0) for info in found.values())

    def modified(self, key: str) -> float:
        info = self._call(lambda: self.fs.info(self._k(key)))
        when = info.get("LastModified") or info.get("created") or info.get("mtime")
        return when.timestamp() if hasattr(when, "timestamp") else float(when or 0.0)

    def etag(self, key: str) -> str:
        """The object's ETag: S3's, or where the protocol has none, the MD5 of its bytes (what S3's is
        for an object written in one PUT)."""
        info = self._call(lambda: self.fs.info(self._k(key)))
        return info.get("ETag") or f'"{hashlib.md5(self.read(key)).hexdigest()}"'


    def write(self, key: str, data: bytes) -> None:
        self._call(lambda: self.fs.pipe_file(self._k(key), data))

    def create(self, key: str, data: bytes) -> bool:
        self._need_conditional()
        try:
            with _MEMORY if self.protocol == "memory" else nullcontext():
                self._call(lambda: self.fs.pipe_file(self._k(key), data, mode="create"))
        except FileExistsError:
            return False
        return True

    def replace_if(self, key: str, data: bytes, etag: str) -> str | None:
        """Replace the object `key` with `data` only if its ETag is still `etag` (compare-and-swap): the
        new object's ETag, as the write returned it (a later read could see another writer's), or None
        if another writer changed it first. S3 (If-Match) and memory:// only."""
        self._need_conditional()
        if self.protocol == "memory":
            with _MEMORY:
                if self.etag(key) != etag:
                    return None
                self.write(key, data)
                return f'"{hashlib.md5(data).hexdigest()}"'
        bucket, _, name = self._k(key).partition("/")
        try:
            done = self._call(lambda: self.fs.call_s3("put_object", Bucket=bucket, Key=name, Body=data, IfMatch=etag))
        except (OSError, FileNotFoundError):
            return None
        return done["ETag"]

    def _need_conditional(self) -> None:
        if self.protocol not in CONDITIONAL:
            raise LocationError(f"{self.url}: writing a store needs conditional writes, which this toolkit "
                                f"implements for local disk, s3:// and memory://, not {self.protocol}://; "
                                "stores there can be read")

    def delete(self, key: str) -> None:
        try:
            self._call(lambda: self.fs.rm_file(self._k(key)))
        except FileNotFoundError:
            pass

    def delete_tree(self) -> None:
        self._call(lambda: self.fs.rm(self.root, recursive=True))

    def zarr_store(self, read_only: bool) -> Any:
        from zarr.storage import FsspecStore

        return FsspecStore(fs=_filesystem(self.protocol, self.url, for_zarr=True), path=self.root, read_only=read_only)

    def check_readable(self) -> None:
        """One request that fails the way every later one would: missing credentials, an endpoint that
        does not answer, a bucket that does not exist or is not ours."""
        if self.protocol == "memory":
            return
        bucket = self.root.split("/", 1)[0]
        try:
            self._call(lambda: self.fs.info(bucket))  # errors as they are (`exists` would hide them)
        except FileNotFoundError:
            raise LocationError(f"{self.url}: bucket {bucket!r} does not exist (or these credentials cannot see it)") \
                from None

    def check_writable(self) -> None:
        self._need_conditional()
        if self.protocol != "memory" and "/" not in self.root:
            raise LocationError(f"{self.url}: a store needs a path inside the bucket ({self.url}/<name>): its lock "
                                "and its files lie beside and under that path")
        self.check_readable()


_MEMORY = threading.Lock()  # memory:// lives in this process: its conditional writes are made atomic here


def _safe(url: str) -> str:
    """The URL with anything before an '@' in its host part hidden."""
    parts = urlsplit(url)
    return url if "@" not in parts.netloc else f"{parts.scheme}://<hidden>@{parts.netloc.rsplit('@', 1)[1]}{parts.path}"


_filesystems: dict[tuple, Any] = {}
# what a client is made from besides the protocol: one client per process and per value of these
CLIENT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION")


def _filesystem(protocol: str, url: str, for_zarr: bool = False) -> Any:
    """fsspec's filesystem for `protocol` (one per process and environment; `for_zarr`: the asynchronous
    one zarr's FsspecStore drives from its event loop), or LocationError: unknown protocol, or its
    implementation not installed."""
    key = (protocol, for_zarr, *(os.environ.get(name) for name in CLIENT_ENV))
    if key not in _filesystems:
        import fsspec
        from fsspec.registry import known_implementations, registry

        if protocol not in known_implementations and protocol not in registry:
            raise LocationError(f"{_safe(url)}: unknown protocol {protocol!r}; stores live at a local path or an "
                                "fsspec URL (s3://, gs://, memory://, ...)")
        try:
            cls = fsspec.get_filesystem_class(protocol)
        except ImportError as e:
            raise LocationError(f"{_safe(url)}: {protocol}:// needs a package that is not installed ({e})") from None
        # listings not cached: other processes write there too
        options = {"use_listings_cache": False, "skip_instance_cache": True}
        if not for_zarr:
            _filesystems[key] = cls(**options)
        elif cls.async_impl:
            _filesystems[key] = cls(asynchronous=True, **options)
        else:  # zarr drives every filesystem asynchronously
            from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

            _filesystems[key] = AsyncFileSystemWrapper(cls(**options), asynchronous=True)
    return _filesystems[key]


@atexit.register
def _close_clients() -> None:
    """Close the connections of the asynchronous S3 clients zarr drove, on zarr's event loop (which
    zarr stops at exit after this runs), so that none is reported unclosed."""
    for (_, for_zarr, *_), fs in list(_filesystems.items()):
        client = getattr(fs, "_s3", None)
        if for_zarr and client is not None:
            from zarr.core.sync import sync

            try:
                sync(client.__aexit__(None, None, None))
            except Exception:  # the loop may be gone already; the process ends either way
                pass


def _problem(error: BaseException) -> str | None:
    """What an object-store client's exception says about reaching the store, in words; None for
    anything else (left to the caller)."""
    name = type(error).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return ("no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the "
                "environment")
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionRefusedError"):
        where = os.environ.get("AWS_ENDPOINT_URL")
        return f"the endpoint does not answer{f' ({where}, from AWS_ENDPOINT_URL)' if where else ''}"
    if isinstance(error, PermissionError) or name in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return "access denied: these credentials may not use it"
    return None
