"""A local cache of a remote store's chunk files: fetched once, checked, evicted by size.

    cache = ChunkCache("/scratch/acts-cache", max_bytes=200e9, store="s3://bucket/acts.zarr")
    ActivationStore("s3://bucket/acts.zarr", cache=cache)   # train: data.cache_dir=/scratch/acts-cache

The store reads a chunk file from the cache when the cache holds it and its bytes match the size and
CRC-32 the store recorded when the chunk was committed (harvest/store.py); otherwise from the store,
and then, once they match, writes them here. A cached copy that does not match (a disk error, a store
repaired since) is dropped and fetched again, never used. So a second epoch reads from local disk,
and what it reads is what the store committed.

Files lie at `<folder>/<store id>/<key>` (the store id is a hash of its URL, so several stores share
one folder). Eviction: when the folder's files pass `max_bytes`, the least recently used (a hit
touches its file) are removed until they take at most 90% of it. Several processes may share a
folder (the ranks of one node): each writes whole files (temporary + rename) and evicts by what it
finds on disk.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from runtime.location import LocalLocation

EVICT_TO = 0.9  # after an eviction the cache takes at most this share of max_bytes


class ChunkCache:
    def __init__(self, folder: str | Path, max_bytes: float, store: str):
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        self.files = LocalLocation(self.folder / hashlib.sha256(store.encode()).hexdigest()[:16])
        self._lock = threading.Lock()
        self._used: int | None = None  # bytes in the whole folder, counted at the first write
        self.hits = self.misses = 0

    def get(self, key: str) -> memoryview | None:
        """The cached copy of `key` (valid until this thread's next read), or None."""
        try:
            data = self.files.read_view(key)
        except FileNotFoundError:
            self.misses += 1
            return None
        os.utime(self.files.file(key))  # recently used
        self.hits += 1
        return data

    def drop(self, key: str) -> None:
        """Forget a copy that turned out not to match the store."""
        self.files.delete(key)
        self.hits -= 1
        self.misses += 1

    def put(self, key: str, data: bytes | memoryview) -> None:
        """Keep a copy of `key` (bytes checked against the store's record), evicting if the folder is full."""
        self.files.write(key, bytes(data))
        with self._lock:
            if self._used is None:
                self._used = LocalLocation(self.folder).sizes()
            else:
                self._used += len(data)
            if self._used > self.max_bytes:
                self._used = self._evict()

    def _evict(self) -> int:
        """Remove the least recently used files of the whole folder until they fit EVICT_TO x max_bytes;
        the bytes left."""
        files = []
        for f in self.folder.rglob("*"):
            try:
                info = f.stat()
            except FileNotFoundError:  # another process evicted it
                continue
            if f.is_file():
                files.append((info.st_mtime, info.st_size, f))
        used = sum(size for _, size, _ in files)
        for _, size, f in sorted(files):
            if used <= EVICT_TO * self.max_bytes:
                break
            f.unlink(missing_ok=True)
            used -= size
        return used
