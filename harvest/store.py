"""THE activation store format: the only module that knows how activations lie on disk.

A store is a zarr v3 group (a folder, or a prefix of object storage: any location of
runtime/location.py, `s3://bucket/acts.zarr` included) holding, for R rows (tokens) of a d-wide site:

    acts      [R, d]        float16 (or bfloat16 kept as uint16 bits), chunks of C rows, compressed
                            (codec=none: uncompressed, and read memory-mapped)
    tokens    [R]           int32, the token id at each row
    contexts  [S, ctx]      int32, the full token sequence each row comes from (S = R / rows_per_seq)

Rows are stored sequence by sequence: row r is position `first_pos + r % rows_per_seq` of
sequence `r // rows_per_seq` (first_pos is 1 when position 0 is excluded). A chunk is C =
chunk_seqs * rows_per_seq rows, i.e. whole sequences, and is the unit of writing and reading.

Group attributes: model, layer, site, d_model, context_size, tokenizer, n_tokens, complete,
config (the full harvest config), mean and var (per dimension, over the rows written, computed in
float64 from the stored 16-bit values), plus layout fields and, in a single-process store, the
resume state `progress`; `held_out_only` marks a store of held-out text alone (a streaming run's,
harvest/stream.py), all of whose chunks are held out.

Integrity (format_version 2): when chunk i is committed, the size and CRC-32 of each of its three chunk
files are recorded in `checksums/<i>.json` ({array: [bytes, crc32]}), written before the commit. Every
read checks the file against its record before decoding it, so a missing, truncated or overwritten
chunk is named (DamagedStore, one line) instead of being read as zarr's fill value (zeros) or handed
to a decompressor. `verify` checks a whole store; `harvest repair=true` re-creates the bad chunks
(a chunk is a pure function of the config and its index). Version-1 stores (no records) are read with
the checks that need no record: files present, blosc headers consistent, decodable.

Crash safety: every chunk file and zarr.json is written whole or not at all (`Location.write`: a
temporary file + rename on disk, one PUT on object storage; chunk files encoded here exactly as zarr
encodes them, `encode_chunk`). A chunk's data is written first (several chunks may be written at once
by threads); then, in chunk order, the attributes, which advance `progress`, are written in one
atomic step. A kill at any moment leaves either the old or the new progress; chunks past it are simply
written again, with the same bytes. A new store appears whole: on disk it is built beside its path and
renamed into place; on object storage, which cannot rename, its root zarr.json is written last (until
then there is no store, and the leftovers of a killed creation are cleared by the next one).

Parted stores (one store written by W processes, W > 1): rank r writes the global chunks
r, r + W, r + 2W, ... (`chunk_ids`), each to its own chunk files, so the ranks never write the same
file. The arrays are created and resized once, by rank 0, before the other ranks open the store.
Each rank keeps its resume state (chunks done, pack state, running statistics) in its own file
`parts/rank-<r>.json` (temporary file + rename), never in the shared attributes, which hold
`parts: {world: W}` and say incomplete while the ranks work. When every rank has written its share,
rank 0 `finish`es: the parts' statistics merged exactly (`RunningStats.merge`, in rank order) and
the root attributes written once: n_tokens, complete, mean, var and the manifest
`parts: {world, ranks: [{rank, chunk_ids: {start, stop, step}, n_tokens, docs_consumed}]}`.
The result reads exactly like a single-process store.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import mmap
import os
import shutil
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr
import zarr.codecs
from tqdm import tqdm

from harvest.cache import ChunkCache
from runtime.cpu import cpu_cores
from runtime.errors import ToolkitError
from runtime.files import remove_litter
from runtime.location import LocalLocation, Location

FORMAT = "switch-sae/activations"
FORMAT_VERSION = 2  # 2: chunk checksums recorded; 1 (still read): none
PARTS = "parts"  # folder of a parted store's per-rank resume files
CHECKSUMS = "checksums"  # folder of per-chunk records {array: [bytes, crc32]}, one file per chunk id
ARRAYS = ("acts", "tokens", "contexts")


Where = str | Path | Location  # a store's location, or what names one


class DamagedStore(ToolkitError):
    """A store's chunk or metadata is missing or damaged: named in one line, never read as zeros.
    `what` is the damage alone (`acts chunk 3 (acts/c/3/0) is missing`), as `verify` lists it."""

    def __init__(self, message: str, what: str | None = None):
        super().__init__(message)
        self.what = what or message


def _remedy(path: Where) -> str:
    return (f"`python -m harvest.verify store={path}` lists every bad chunk; rerun the harvest command that "
            "wrote it with repair=true to re-create them")


def _chunk_coords(name: str, i: int) -> tuple[int, ...]:
    """Chunk-grid coordinates of chunk i of array `name` (tokens is 1-d, acts and contexts 2-d)."""
    return (i,) if name == "tokens" else (i, 0)


def codec(name: str, level: int) -> list:
    """zarr v3 bytes-to-bytes codecs for a codec name (docs/harvest.md: measurements behind the default).

    blosc_zstd byte-shuffles 256 KiB blocks (the high bytes of every float16, sign and exponent,
    ahead of the mantissa bytes) before zstd: 1.165x on float32-computed activations where plain
    zstd gets 1.08x, and faster. Blosc's default block size is too small for the shuffle to pay.
    """
    if name == "none":
        return []
    if name == "zstd":
        return [zarr.codecs.ZstdCodec(level=level)]
    if name == "blosc_zstd":
        return [zarr.codecs.BloscCodec(cname="zstd", clevel=level, shuffle="shuffle", typesize=2, blocksize=1 << 18)]
    raise ValueError(f"unknown codec {name!r}")


def encode_chunk(array: zarr.Array, values: np.ndarray) -> bytes:
    """The bytes zarr writes for one whole chunk of `array` holding `values` (the chunk's shape): the
    values little-endian in C order, through the array's bytes-to-bytes codecs (blosc or zstd, with
    the settings its metadata records). Encoding releases the GIL. Tested equal to zarr's own files."""
    data: Any = np.ascontiguousarray(values, dtype=np.dtype(array.dtype).newbyteorder("<")).view(np.uint8).reshape(-1)
    for compressor in array.compressors:
        if isinstance(compressor, zarr.codecs.BloscCodec):
            shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[compressor.shuffle.name]
            coder = numcodecs.Blosc(cname=compressor.cname.name, clevel=compressor.clevel, shuffle=shuffle,
                                    blocksize=compressor.blocksize, typesize=compressor.typesize)
        elif isinstance(compressor, zarr.codecs.ZstdCodec):
            coder = numcodecs.Zstd(level=compressor.level, checksum=compressor.checksum)
        else:
            raise ValueError(f"unsupported codec {type(compressor).__name__}")
        data = np.frombuffer(coder.encode(data), dtype=np.uint8)
    return data.tobytes()


class RunningStats:
    """Per-dimension count, mean and sum of squared deviations, merged block by block (Chan et al.).

    Kept in float64 and saved exactly (JSON round-trips doubles), so a resumed harvest ends with
    the same statistics as an uninterrupted one.
    """

    def __init__(self, d: int, n: int = 0, mean: list[float] | None = None, m2: list[float] | None = None):
        self.n = n
        self.mean = np.zeros(d) if mean is None else np.asarray(mean, dtype=np.float64)
        self.m2 = np.zeros(d) if m2 is None else np.asarray(m2, dtype=np.float64)

    @classmethod
    def of(cls, x: np.ndarray, acts_dtype: str | None = None, block: int = 1024) -> RunningStats:
        """The statistics of x [rows, d]: float rows, or rows as stored when `acts_dtype` names their
        format. Computed in float64 in two passes (the mean, then the squared deviations from it),
        `block` rows at a time, so the float64 copies stay in cache."""
        def wide(rows: np.ndarray) -> np.ndarray:
            return (as_float(rows, acts_dtype) if acts_dtype == "bfloat16" else rows).astype(np.float64)

        n, d = x.shape
        blocks = range(0, n, block)
        mean = sum((wide(x[s : s + block]).sum(axis=0) for s in blocks), np.zeros(d)) / max(n, 1)
        m2 = np.zeros(d)
        for s in blocks:
            dev = wide(x[s : s + block]) - mean
            m2 += np.einsum("ij,ij->j", dev, dev)
        return cls(d, n, mean, m2)

    @classmethod
    def from_json(cls, d: int, saved: dict[str, Any] | None) -> RunningStats:
        """Inverse of to_json; None (nothing saved yet) gives empty statistics."""
        return cls(d, saved["n"], saved["mean"], saved["m2"]) if saved else cls(d)

    def merge(self, other: RunningStats) -> None:
        """Become the statistics of the union of both sets of rows (exact up to float64 rounding)."""
        if other.n == 0:
            return
        n = self.n + other.n
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.n / n)
        self.m2 = self.m2 + other.m2 + delta**2 * (self.n * other.n / n)
        self.n = n

    def update(self, x: np.ndarray) -> None:
        """Add the rows x [rows, d] (any float dtype)."""
        self.merge(RunningStats.of(x))

    @property
    def var(self) -> np.ndarray:
        """Population variance per dimension."""
        return self.m2 / max(self.n, 1)

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean.tolist(), "m2": self.m2.tolist()}


@dataclass(frozen=True)
class Layout:
    """Shapes of a store, derived from the harvest config and the model."""

    d_model: int
    context_size: int
    first_pos: int
    chunk_seqs: int
    n_chunks: int
    acts_dtype: str  # "float16" | "bfloat16"

    @property
    def rows_per_seq(self) -> int:
        return self.context_size - self.first_pos

    @property
    def stored_dtype(self) -> np.dtype:
        """How the rows are kept: float16, or bfloat16 as its uint16 bits."""
        return np.dtype(np.float16 if self.acts_dtype == "float16" else np.uint16)

    @property
    def chunk_rows(self) -> int:
        return self.chunk_seqs * self.rows_per_seq

    @property
    def n_rows(self) -> int:
        return self.n_chunks * self.chunk_rows


def chunk_ids(n_chunks: int, rank: int = 0, world: int = 1) -> range:
    """Global ids of the chunks that rank `rank` of `world` writes: rank, rank + world, ... < n_chunks."""
    return range(rank, n_chunks, world)


@dataclass(frozen=True)
class Progress:
    """How far a store's harvest got: the processes that write it and the chunks each has written."""

    world: int  # 1, or W for a parted store
    done: tuple[int, ...]  # [world]: rank r has written its first done[r] chunk ids

    def shares(self, n_chunks: int) -> tuple[int, ...]:
        """[world] chunks each rank writes for a budget of n_chunks."""
        return tuple(len(chunk_ids(n_chunks, r, self.world)) for r in range(self.world))

    def fits(self, n_chunks: int) -> bool:
        """No rank has written more than its share of n_chunks."""
        return all(d <= s for d, s in zip(self.done, self.shares(n_chunks)))

    def finished(self, n_chunks: int) -> bool:
        """Every rank has written exactly its share of n_chunks."""
        return self.done == self.shares(n_chunks)

    @property
    def prefix(self) -> int:
        """Chunks 0..prefix-1 are all written: the largest budget this store's parts cover."""
        return min(d * self.world + r for r, d in enumerate(self.done))


def open_group(where: Where, mode: str = "r") -> zarr.Group:
    """The store's zarr group, opened read-only (mode "r") or for writing ("r+")."""
    return zarr.open_group(Location.of(where).zarr_store(read_only=mode == "r"), mode=mode)


def _root_attrs(where: Where) -> dict[str, Any] | None:
    """The attributes of the root zarr.json, or None if there is none readable."""
    try:
        return json.loads(Location.of(where).read("zarr.json")).get("attributes", {})
    except Exception:
        return None


def is_store(path: Where) -> bool:
    attrs = _root_attrs(path)
    return attrs is not None and attrs.get("format") == FORMAT


def looks_like_store(path: Where) -> bool:
    """A store, or the remains of one whose root zarr.json is lost (its array folders are there)."""
    loc = Location.of(path)
    return is_store(loc) or all(loc.is_dir(name) for name in ARRAYS)


def read_attrs(path: Where) -> dict[str, Any]:
    """The root attributes of the store at `path` (readable even when an array is damaged)."""
    return dict(open_group(path).attrs)


def unfinished_creation(path: Where) -> bool:
    """Whether `path` holds only what a creation killed before its last write leaves on object storage:
    array metadata, no root zarr.json and no chunk (`_put_whole`)."""
    loc = Location.of(path)
    keys = loc.keys()
    return bool(keys) and loc.remote and "zarr.json" not in keys and all(k.endswith("/zarr.json") for k in keys)


def lock_location(path: Where) -> Location:
    """The writer's lock of a store: `<store>.lock`, beside the store (which appears whole, last)."""
    loc = Location.of(path)
    return loc.sibling(loc.name + ".lock")


def remove(path: Where) -> None:
    """Delete a store (or the remains of one); refuses anything else."""
    if not looks_like_store(path):
        raise ValueError(f"{path} is not an activation store; not deleting it")
    Location.of(path).delete_tree()


def _world(attrs: dict[str, Any]) -> int:
    return attrs.get("parts", {}).get("world", 1)


def _part_key(rank: int) -> str:
    return f"{PARTS}/rank-{rank}.json"


def _state(path: Where, attrs: dict[str, Any], rank: int) -> dict[str, Any]:
    """Rank `rank`'s resume state {chunks_done, pack_state, stats}; {} before its first chunk."""
    if _world(attrs) == 1:
        return attrs.get("progress", {})
    try:
        return json.loads(Location.of(path).read(_part_key(rank)))
    except FileNotFoundError:
        return {}


def read_progress(path: Where) -> Progress:
    attrs = read_attrs(path)
    world = _world(attrs)
    return Progress(world, tuple(_state(path, attrs, r).get("chunks_done", 0) for r in range(world)))


@dataclass(frozen=True)
class WrittenChunk:
    """A chunk whose files and checksum record are written, not yet committed (`StoreWriter.write_files`)."""

    i: int  # global chunk id
    stats: RunningStats  # of its rows
    seconds: float  # spent writing it


class StoreWriter:
    """Creates a store or reopens one to resume/extend it, and commits one rank's chunks in order.

    Rank 0 (the only rank of a single-process harvest) creates or reopens the store; the other ranks
    of a parted harvest `attach` to it afterwards.
    """

    def __init__(self, location: Location, layout: Layout, rank: int = 0):
        self.location = location
        self.group = group = open_group(location, "r+")
        self.layout = layout
        self.rank = rank
        attrs = dict(group.attrs)
        self.world = _world(attrs)
        self.chunk_ids = chunk_ids(layout.n_chunks, rank, self.world)
        progress = _state(location, attrs, rank)
        self.chunks_done: int = progress.get("chunks_done", 0)  # of this rank's chunk_ids
        self.pack_state: dict[str, Any] = progress.get("pack_state", {"docs_consumed": 0, "carry": []})
        self.stats = RunningStats.from_json(layout.d_model, progress.get("stats"))
        # the arrays' metadata (chunk keys, codecs); every chunk gets its file, even one equal to the fill
        # value (zarr would skip it), so a missing file always means damage
        self._arrays = {name: group[name] for name in ARRAYS}
        self.checksums = attrs.get("format_version", 1) >= 2  # record each chunk's checksums
        self._root: dict[str, Any] | None = None  # zarr.json, read at the first commit (single-process stores)
        self.write_seconds = 0.0  # time spent writing and committing chunks (summed over threads), for benchmarks
        self.guard: Callable[[], object] = lambda: None  # called before each commit; raises to stop it

    @classmethod
    def create(cls, path: str | Path, layout: Layout, compressors: list, meta: dict[str, Any],
               world: int = 1) -> StoreWriter:
        """Build the empty store's metadata and put it in place whole (`_put_whole`).

        world > 1: a parted store, for rank 0 of `world`; the other ranks `attach` once it exists."""
        files: dict[str, Any] = {}
        group = zarr.open_group(zarr.storage.MemoryStore(store_dict=files), mode="w-")
        _create_arrays(group, layout, compressors)
        L = layout
        group.attrs.update({
            "format": FORMAT, "format_version": FORMAT_VERSION, **meta,
            "d_model": L.d_model, "context_size": L.context_size, "first_pos": L.first_pos,
            "rows_per_seq": L.rows_per_seq, "chunk_rows": L.chunk_rows, "acts_dtype": L.acts_dtype,
            "n_tokens": 0, "complete": False, "n_chunks_target": L.n_chunks,
            **({"parts": {"world": world}} if world > 1 else {}),
        })
        loc = Location.of(path)
        _put_whole(loc, {key: value.to_bytes() for key, value in files.items()})
        return cls(loc, layout)

    @classmethod
    def reopen(cls, path: Where, layout: Layout, meta: dict[str, Any]) -> StoreWriter:
        """Rank 0: resume or extend the store with the same number of processes that wrote it."""
        loc = Location.of(path)
        group = open_group(loc, "r+")
        attrs = dict(group.attrs)
        done = attrs.get("progress", {}).get("chunks_done", 0)
        if layout.n_chunks < done:
            raise ValueError(f"the store already holds {done} chunks, more than the {layout.n_chunks} asked for")
        # the budget may have grown (extend) or shrunk to what is written; config/runtime keys refresh.
        # A parted store is complete only once `finish` has merged its parts.
        group.attrs.update({**meta, "n_chunks_target": layout.n_chunks,
                            "complete": _world(attrs) == 1 and done == layout.n_chunks})
        _tidy(loc, group, layout)
        return cls(loc, layout)

    @classmethod
    def attach(cls, path: Where, layout: Layout, rank: int) -> StoreWriter:
        """Rank `rank` > 0 of a parted harvest, once rank 0 has created or reopened the store."""
        return cls(Location.of(path), layout, rank)

    def write_chunk(self, i: int, acts: np.ndarray, contexts: np.ndarray, pack_state: dict[str, Any]) -> None:
        """Write global chunk i (must be this rank's next one) and commit it.

        acts [chunk_rows, d] float16 or uint16 (bfloat16 bits); contexts [chunk_seqs, ctx] int.
        """
        self.commit(self.write_files(i, acts, contexts), pack_state)

    def write_files(self, i: int, acts: np.ndarray, contexts: np.ndarray) -> WrittenChunk:
        """Write chunk i's three files (encoded as zarr would) and its checksum record, and compute its
        statistics, without committing it: readers do not see it until `commit`. Chunks of this rank
        not yet committed may be written by several threads at once (each writes only its own files);
        a kill leaves at most files past the committed progress, which a resumed harvest writes again
        with the same bytes."""
        t0 = time.perf_counter()
        L = self.layout
        assert i in self.chunk_ids[self.chunks_done :], f"chunk {i} is not one of this rank's chunks left to write"
        assert acts.shape == (L.chunk_rows, L.d_model) and contexts.shape == (L.chunk_seqs, L.context_size)
        self._write_arrays(i, acts, contexts)
        stats = RunningStats.of(acts, L.acts_dtype)
        return WrittenChunk(i, stats, time.perf_counter() - t0)

    def commit(self, chunk: WrittenChunk, pack_state: dict[str, Any]) -> None:
        """Commit a written chunk (this rank's next one): its statistics merged, the progress advanced in
        one atomic write, with the packer's state after it."""
        expected = self.chunk_ids[self.chunks_done]
        assert chunk.i == expected, f"chunk {chunk.i} committed out of order (next is {expected})"
        self.guard()
        t0 = time.perf_counter()
        self.stats.merge(chunk.stats)
        self.chunks_done += 1
        self._commit(pack_state)
        self.write_seconds += chunk.seconds + time.perf_counter() - t0

    def _write_arrays(self, i: int, acts: np.ndarray, contexts: np.ndarray) -> None:
        """Chunk i's three files, encoded here as zarr encodes them (`encode_chunk`) and each written
        whole or not at all (`Location.write`); then their sizes and CRC-32s recorded (format version 2),
        from the bytes written. Threads may write different chunks at once: nothing here is shared."""
        L = self.layout
        values = {"acts": acts, "tokens": contexts[:, L.first_pos :].reshape(-1).astype(np.int32),
                  "contexts": contexts.astype(np.int32)}
        record = {}
        for name in ARRAYS:
            array = self._arrays[name]
            data = encode_chunk(array, values[name])
            self.location.write(f"{name}/{array.metadata.encode_chunk_key(_chunk_coords(name, i))}", data)
            record[name] = [len(data), zlib.crc32(data)]
        if self.checksums:  # a version-1 store being extended keeps its format
            self.location.write(_record_key(i), _json_bytes(record))

    def rewrite_chunk(self, i: int, acts: np.ndarray, contexts: np.ndarray) -> list[str]:
        """Write chunk i again (repair) without touching progress or statistics. Returns the arrays
        whose new files differ from the checksum record kept before (none when the harvest is
        deterministic on this device); the record is then replaced by the new files'."""
        def record() -> dict[str, Any]:
            try:
                return json.loads(self.location.read(_record_key(i)))
            except (OSError, ValueError):
                return {}

        before = record()
        self._write_arrays(i, acts, contexts)
        after = record()
        return [n for n in ARRAYS if before.get(n) is not None and before.get(n) != after.get(n)]

    def _commit(self, pack_state: dict[str, Any]) -> None:
        L = self.layout
        self.pack_state = pack_state
        progress = {"chunks_done": self.chunks_done, "pack_state": pack_state, "stats": self.stats.to_json()}
        if self.world > 1:
            self.location.write(_part_key(self.rank), _json_bytes(progress))
            return
        if self._root is None:  # the root metadata as this writer found it; only it changes them from now on
            self._root = json.loads(self.location.read("zarr.json"))
        self._root["attributes"] |= {
            "n_tokens": self.chunks_done * L.chunk_rows,
            "complete": self.chunks_done == L.n_chunks,
            "mean": self.stats.mean.tolist(),
            "var": self.stats.var.tolist(),
            "progress": progress,
        }
        # One atomic write of zarr.json (zarr v3 group metadata): zarr's own attribute update costs
        # about 15 ms a call on disk (a round trip through its event loop), this about 1 ms, and the
        # commit is the one step of the harvest writer that cannot run in parallel.
        self.location.write("zarr.json", _json_bytes(self._root))


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def _record_key(i: int) -> str:
    """Where chunk i's checksum record lies in the store."""
    return f"{CHECKSUMS}/{i}.json"


def _put_whole(loc: Location, files: dict[str, bytes]) -> None:
    """Put a new store's files {key: bytes} at `loc` so that it appears whole or not at all: on disk
    built in a folder beside it and renamed into place (which replaces only an empty folder); on
    object storage, which cannot rename, the root zarr.json written last, after the leftovers of a
    killed creation are cleared (there is no store there until that last write)."""
    root = files.pop("zarr.json")
    if loc.remote:
        if loc.exists():
            loc.delete_tree()
        for key, data in files.items():
            loc.write(key, data)
        loc.write("zarr.json", root)
        return
    assert isinstance(loc, LocalLocation)
    staging = loc.sibling(loc.name + ".creating")
    shutil.rmtree(staging.file(), ignore_errors=True)
    for key, data in {**files, "zarr.json": root}.items():
        staging.write(key, data)
    staging.file().rename(loc.file())


WRITE_AHEAD = 2  # chunks handed to the writer threads per thread: none waits while the oldest is committed


def write_chunks(chunks: Iterable[tuple[StoreWriter, int, np.ndarray, np.ndarray, dict[str, Any]]],
                 threads: int = 1) -> None:
    """Write and commit (writer, global chunk id, acts, contexts, pack state after it), each writer's
    chunks in its order: up to `threads` chunks are encoded and written at once (`write_files`,
    overlapping whatever produces the next ones; WRITE_AHEAD x threads handed over, so that a thread
    starts the next chunk while the oldest is committed), and each is committed once it and every
    chunk before it are written. Several stores may be written side by side (one writer each)."""
    with ThreadPoolExecutor(threads, thread_name_prefix="store-writer") as pool:
        writing: deque[tuple[StoreWriter, Future, dict[str, Any]]] = deque()
        try:
            for writer, i, acts, contexts, pack_state in chunks:
                if len(writing) == WRITE_AHEAD * threads:
                    _commit_oldest(writing)
                writing.append((writer, pool.submit(writer.write_files, i, acts, contexts), pack_state))
            while writing:
                _commit_oldest(writing)
        finally:
            for _, written, _ in writing:  # a failure: what is still being written is never committed
                written.cancel()


def _commit_oldest(writing: deque[tuple[StoreWriter, Future, dict[str, Any]]]) -> None:
    writer, written, pack_state = writing.popleft()
    writer.commit(written.result(), pack_state)


def _create_arrays(group: zarr.Group, layout: Layout, compressors: list) -> None:
    """The three empty arrays of a store with this layout (acts compressed with `compressors`)."""
    L = layout
    group.create_array("acts", shape=(L.n_rows, L.d_model), chunks=(L.chunk_rows, L.d_model),
                       dtype=L.stored_dtype,
                       compressors=compressors, fill_value=0)
    group.create_array("tokens", shape=(L.n_rows,), chunks=(L.chunk_rows,), dtype="int32",
                       compressors=[zarr.codecs.ZstdCodec(level=3)], fill_value=0)
    group.create_array("contexts", shape=(L.n_chunks * L.chunk_seqs, L.context_size),
                       chunks=(L.chunk_seqs, L.context_size), dtype="int32",
                       compressors=[zarr.codecs.ZstdCodec(level=3)], fill_value=0)


def restore_metadata(path: Where, layout: Layout, compressors: list) -> list[str]:
    """Rewrite the metadata (<array>/zarr.json) of the arrays whose metadata is missing or unreadable,
    as `create` made it for this layout (sized to the store's target), leaving their chunks alone.
    Returns the arrays restored."""
    loc = Location.of(path)
    group = open_group(loc)
    broken = []
    for name in ARRAYS:
        try:
            assert isinstance(group[name], zarr.Array)
        except Exception:
            broken.append(name)
    if not broken:
        return []
    target = dataclasses.replace(layout, n_chunks=dict(group.attrs).get("n_chunks_target", layout.n_chunks))
    files: dict[str, Any] = {}
    _create_arrays(zarr.open_group(zarr.storage.MemoryStore(store_dict=files), mode="w-"), target, compressors)
    for name in broken:
        loc.write(f"{name}/zarr.json", files[f"{name}/zarr.json"].to_bytes())
    return broken


@dataclass
class Verdict:
    """What `verify` found: the chunks it checked and, per bad chunk id, what is wrong with it."""

    path: str  # the store's location
    checked: int  # chunk ids checked (each in all three arrays)
    bad: dict[int, list[str]]  # chunk id -> one message per damaged array file
    problems: list[str]  # damage found before any chunk could be checked (metadata)

    @property
    def ok(self) -> bool:
        return not self.bad and not self.problems


def committed_chunks(path: Where) -> list[int]:
    """Ids of the chunks a store has committed (a parted store's ranks may be at different places)."""
    attrs = read_attrs(path)
    rows = attrs["chunk_rows"]
    if attrs.get("complete") or _world(attrs) == 1:
        return list(range(attrs["n_tokens"] // rows))
    progress = read_progress(path)
    target = attrs["n_chunks_target"]
    return sorted(i for r, d in enumerate(progress.done) for i in chunk_ids(target, r, progress.world)[:d])


def verify(path: Where, progress: bool = True) -> Verdict:
    """Read every committed chunk of every array of the store at `path`, checking each file against its
    checksum record (version 2) and decoding it. Never raises for damage: the Verdict lists it."""
    loc = Location.of(path)
    try:
        store = ActivationStore(loc)
    except DamagedStore as e:
        return Verdict(loc.url, 0, {}, [str(e)])
    ids = committed_chunks(loc)
    bad: dict[int, list[str]] = {}
    for i in tqdm(ids, desc=f"verify {loc.name}", unit="chunk", disable=not progress):
        for name in ARRAYS:
            try:
                store._read(name, i)
            except DamagedStore as e:
                bad.setdefault(i, []).append(e.what)
    return Verdict(loc.url, len(ids), bad, [])


def finish(path: Where, layout: Layout, meta: dict[str, Any]) -> None:
    """Rank 0, once every rank has written its share of layout.n_chunks: mark the store complete,
    in one write of the root attributes. A parted store's statistics are merged from its parts (in
    rank order) and its manifest written; a single-process store's are already in place."""
    loc = Location.of(path)
    group = open_group(loc, "r+")
    attrs = dict(group.attrs)
    world = _world(attrs)
    update: dict[str, Any] = {**meta, "n_chunks_target": layout.n_chunks, "complete": True}
    if world > 1:
        states = [_state(loc, attrs, r) for r in range(world)]
        stats = RunningStats(layout.d_model)
        for state in states:
            stats.merge(RunningStats.from_json(layout.d_model, state.get("stats")))
        ranks = [{"rank": r, "chunk_ids": {"start": r, "stop": layout.n_chunks, "step": world},
                  "n_tokens": state.get("chunks_done", 0) * layout.chunk_rows,
                  "docs_consumed": state.get("pack_state", {}).get("docs_consumed", 0)}
                 for r, state in enumerate(states)]
        update |= {"n_tokens": layout.n_rows, "mean": stats.mean.tolist(), "var": stats.var.tolist(),
                   "parts": {"world": world, "ranks": ranks}}
    group.attrs.update(update)
    _tidy(loc, group, layout)


def _tidy(loc: Location, group: zarr.Group, layout: Layout) -> None:
    """Rank 0, while no other rank writes: clear litter of a killed write (temporary files, on disk
    only), size the arrays to the budget."""
    if isinstance(loc, LocalLocation):
        remove_litter(loc.file())
    L = layout
    acts = group["acts"]
    if acts.shape[0] != L.n_rows:
        acts.resize((L.n_rows, L.d_model))
        group["tokens"].resize((L.n_rows,))
        group["contexts"].resize((L.n_chunks * L.chunk_seqs, L.context_size))


def as_float(acts: np.ndarray, acts_dtype: str) -> np.ndarray:
    """Stored rows -> float32 [rows, d]."""
    if acts_dtype == "bfloat16":
        return (acts.astype(np.uint32) << 16).view(np.float32)
    return acts.astype(np.float32)


def _decode(compressor: Any, data: Any, out: np.ndarray | None = None) -> Any:
    """Undo one of the bytes-to-bytes codecs that `codec` makes (blosc or zstd) on a chunk's bytes;
    blosc decodes into `out` when given (a contiguous array of exactly the size its header states).
    Releases the GIL."""
    if isinstance(compressor, zarr.codecs.BloscCodec):
        # blosc trusts the sizes in its header: check them against the bytes there are first
        if len(data) < 16 or struct.unpack_from("<I", data, 12)[0] != len(data):  # header bytes 12..15: cbytes
            raise ValueError("the blosc header does not match the file's size")
        if out is not None and struct.unpack_from("<I", data, 4)[0] != out.nbytes:  # bytes 4..7: nbytes
            raise ValueError(f"the blosc header announces {struct.unpack_from('<I', data, 4)[0]:,} bytes, "
                             f"not {out.nbytes:,}")
        return numcodecs.Blosc().decode(data, out)
    if isinstance(compressor, zarr.codecs.ZstdCodec):
        return numcodecs.Zstd().decode(data)
    raise ValueError(f"unsupported codec {type(compressor).__name__}")



_REQUIRED = object()


def _attr(key: str, doc: str, default: Any = _REQUIRED) -> Any:
    """A read-only property returning the group attribute `key` (or `default` when it is absent)."""
    if default is _REQUIRED:
        return property(lambda self: self.attrs[key], doc=doc)
    return property(lambda self: self.attrs.get(key, default), doc=doc)


class ActivationStore:
    """Read-only view of a store: what it holds (model, site, layout), chunks as float32, and the
    sequence and position behind any row. Every other module reads a store through this class (the
    held-out rows through harvest/held_out.py's view of it)."""

    def __init__(self, path: Where, cache: ChunkCache | None = None):
        self.location = Location.of(path)
        self.path = self.location.url  # how messages and run folders name it
        self.cache = cache if self.location.remote else None  # local stores are read in place
        if self.location.remote:
            self.location.check_readable()  # credentials and endpoint, in one line before anything else
        if not is_store(self.location):
            if self.location.is_dir("acts"):
                raise DamagedStore(f"store {path} is damaged: its zarr.json (the store's attributes) is missing or "
                                   "unreadable; harvest it again with overwrite=true")
            raise FileNotFoundError(f"{path} is not an activation store (run `make harvest` first)")
        self.group = open_group(self.location)
        self.attrs: dict[str, Any] = dict(self.group.attrs)
        arrays = {name: self._open_array(name) for name in ARRAYS}
        self.acts, self.tokens, self.contexts = arrays["acts"], arrays["tokens"], arrays["contexts"]
        self.checked = self.attrs.get("format_version", 1) >= 2  # chunk checksums are recorded
        self._sequences = lru_cache(maxsize=64)(self._chunk_sequences)
        self._records = lru_cache(maxsize=4096)(self._record)

    def _open_array(self, name: str) -> zarr.Array:
        try:
            array = self.group[name]
        except Exception:  # KeyError when zarr.json is gone, JSON or metadata errors when it is damaged
            raise DamagedStore(f"store {self.path} is damaged: array {name!r} has no readable metadata "
                               f"({name}/zarr.json); {_remedy(self.path)}") from None
        if not isinstance(array, zarr.Array):
            raise DamagedStore(f"store {self.path} is damaged: {name!r} is not an array")
        return array

    # ------------------------------------------------------------------ what the store holds

    model: str = _attr("model", "The LM the activations come from (hub id or local folder).")
    layer: int = _attr("layer", "The block whose site was read.")
    site: str = _attr("site", "resid_post | attn_out | mlp_in | mlp_out.")
    n_layers: int | None = _attr("n_layers", "Blocks of the LM (None if the store does not record it).", None)
    harvest_config: dict[str, Any] = _attr("config", "The full harvest config that wrote the store.")
    held_out_only: bool = _attr("held_out_only", "Every row comes from held-out text (a streaming run's held-out "
                                "store, harvest/stream.py): every chunk is held out, none is for training.", False)

    @property
    def tokenizer_name(self) -> str:
        """Where the tokenizer of the stored token ids loads from."""
        return self.attrs.get("tokenizer") or self.model

    def identity(self) -> dict[str, Any]:
        """What a training run records about its store, so that eval can refuse a different one."""
        return {"path": str(self.path), "model": self.model, "layer": self.layer, "site": self.site,
                "d_model": self.d_model, "context_size": self.context_size, "first_pos": self.first_pos}

    # ------------------------------------------------------------------ layout

    d_model: int = _attr("d_model", "Width d of a row.")

    @property
    def d_in(self) -> int:
        """The width of what an SAE reads of a row: d_model (harvest/paired.py's pair reads its source's)."""
        return self.d_model
    acts_dtype: str = _attr("acts_dtype", "float16 | bfloat16 (kept as uint16 bits).")
    context_size: int = _attr("context_size", "Tokens per sequence.")
    first_pos: int = _attr("first_pos", "Position of a sequence's first stored row: 1 when position 0 was left out.")
    rows_per_seq: int = _attr("rows_per_seq", "Stored rows per sequence: context_size - first_pos.")
    chunk_rows: int = _attr("chunk_rows", "Rows per chunk, the unit of writing and reading.")
    n_rows: int = _attr("n_tokens", "Rows written and committed (fewer than the arrays' length while incomplete).")

    @property
    def chunk_seqs(self) -> int:
        return self.chunk_rows // self.rows_per_seq

    @property
    def layout(self) -> Layout:
        """The shapes of the committed chunks, as the writer takes them."""
        return Layout(d_model=self.d_model, context_size=self.context_size, first_pos=self.first_pos,
                      chunk_seqs=self.chunk_seqs, n_chunks=self.n_chunks, acts_dtype=self.acts_dtype)

    @property
    def n_chunks(self) -> int:
        return self.n_rows // self.chunk_rows

    @property
    def complete(self) -> bool:
        return bool(self.attrs["complete"])

    @property
    def mean(self) -> np.ndarray:
        """Per-dimension mean [d] of the stored rows (float64)."""
        return np.asarray(self.attrs["mean"])

    @property
    def var(self) -> np.ndarray:
        """Per-dimension population variance [d] of the stored rows (float64)."""
        return np.asarray(self.attrs["var"])

    def stored_bytes(self, name: str = "acts") -> int:
        """Bytes the array takes in storage (compressed chunk files)."""
        return self.location.sizes(name) - self.location.size(f"{name}/zarr.json")

    # ------------------------------------------------------------------ reading rows

    def read_chunk_raw(self, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """Chunk i as stored, [chunk_rows, d] float16 or uint16 (bfloat16 bits).

        A compressed chunk file is read whole, checked against its checksum record and decoded (into
        `out`, a C-contiguous [chunk_rows, d] array of the store's dtype, when given). An uncompressed
        one (`codec=none`, `mapped`) is memory-mapped after its size is checked, then checked against
        its record: the array returned is the page cache itself (copied into `out` when given; a
        private mapping, so writing to it never reaches the file). A missing or damaged file raises
        DamagedStore naming it, on both paths.
        """
        if not 0 <= i < self.n_chunks:
            raise IndexError(f"chunk {i} out of range (0..{self.n_chunks - 1})")
        if self.mapped:
            rows = self._map("acts", i)
            if out is None:
                return rows
            out[...] = rows
            return out
        return self._read("acts", i, out)

    @property
    def mapped(self) -> bool:
        """Whether acts chunks are stored uncompressed on local disk, so that `read_chunk_raw` memory-maps them."""
        return not self.acts.compressors and not self.location.remote

    def read_chunks(self, ids: list[int], threads: int | None = None) -> Iterator[np.ndarray]:
        """Chunks `ids` as `read_chunk_raw` gives them, in order, read, checked and decoded by `threads`
        threads (default: every core) a few chunks ahead of the caller. Memory: threads + 1 chunks."""
        threads = threads or cpu_cores()
        if threads == 1:
            yield from map(self.read_chunk_raw, ids)
            return
        with ThreadPoolExecutor(threads, thread_name_prefix="store-read") as pool:
            ahead: deque[Future] = deque()
            todo = iter(ids)
            try:
                for i in itertools.islice(todo, threads + 1):
                    ahead.append(pool.submit(self.read_chunk_raw, i))
                while ahead:
                    rows = ahead.popleft().result()
                    for i in itertools.islice(todo, 1):
                        ahead.append(pool.submit(self.read_chunk_raw, i))
                    yield rows
            finally:
                for f in ahead:
                    f.cancel()

    def _array(self, name: str) -> zarr.Array:
        return {"acts": self.acts, "tokens": self.tokens, "contexts": self.contexts}[name]

    def _chunk_file(self, name: str, i: int) -> tuple[str, str]:
        """(the key of chunk i of array `name` in the store, how errors name it: `acts chunk 3 (acts/c/3/0)`)."""
        key = f"{name}/{self._array(name).metadata.encode_chunk_key(_chunk_coords(name, i))}"
        return key, f"{name} chunk {i} ({key})"

    def _read(self, name: str, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """Chunk i of array `name` ([chunk shape], the array's dtype), checked, then decoded into `out`
        (a new array when None): directly for blosc alone, whose header states the decoded size, else
        by a copy of what the codecs return."""
        array = self._array(name)
        key, where = self._chunk_file(name, i)
        data = self._fetch(name, i, key, where)
        shape, dtype = array.chunks, np.dtype(array.dtype).newbyteorder("<")
        size = int(np.prod(shape))
        out = np.empty(shape, dtype=dtype) if out is None else out
        codecs = list(reversed(array.compressors))  # the last one applied when writing is undone first
        direct = len(codecs) == 1 and isinstance(codecs[0], zarr.codecs.BloscCodec)
        try:
            if direct:
                _decode(codecs[0], data, out)
            else:
                for compressor in codecs:
                    data = _decode(compressor, data)
            values = out.reshape(-1) if direct else np.frombuffer(data, dtype=dtype)
        except Exception as e:  # a decompressor's error on damaged bytes (version-1 stores)
            raise self._damaged(f"{where} cannot be decoded ({e})") from None
        if values.size != size:
            raise self._damaged(f"{where} decodes to {values.size} values, not {size}")
        if not direct:
            out[...] = values.reshape(shape)
        return out

    def _map(self, name: str, i: int) -> np.ndarray:
        """Chunk i of an uncompressed array, memory-mapped (a private mapping: the file's pages are shared
        with the page cache, and a write to the array would stay in this process), its size checked
        before mapping (a short file would turn into a bus error on access) and its bytes against the
        checksum record."""
        array = self._array(name)
        key, where = self._chunk_file(name, i)
        dtype = np.dtype(array.dtype).newbyteorder("<")
        want = int(np.prod(array.chunks)) * dtype.itemsize
        try:
            assert isinstance(self.location, LocalLocation)
            fd = os.open(self.location.file(key), os.O_RDONLY)
        except FileNotFoundError:
            raise self._damaged(f"{where} is missing") from None
        try:
            size = os.fstat(fd).st_size
            if size != want:
                raise self._wrong_size(where, size, want)
            mapped = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)  # private: writes never reach the file
        finally:
            os.close(fd)
        if self.checked:
            self._check(i, name, where, mapped)
        return np.frombuffer(mapped, dtype=dtype).reshape(array.chunks)

    def _fetch(self, name: str, i: int, key: str, where: str) -> memoryview | bytes:
        """The bytes of chunk i's file `key` of array `name`, checked against its record (version 2): from
        the local cache when it holds a copy that matches, else from the store (and then cached; a remote
        file of known size is fetched in parallel ranges)."""
        want = self._want(i, name, where) if self.checked else None
        if self.cache is not None and want is not None:
            cached = self.cache.get(key)
            if cached is not None:
                if len(cached) == want[0] and zlib.crc32(cached) == want[1]:
                    return cached
                self.cache.drop(key)
        try:
            data = self.location.read_view(key, size=want[0] if want else None)
        except FileNotFoundError:
            raise self._damaged(f"{where} is missing") from None
        if want is not None:
            self._compare(where, data, want)
            if self.cache is not None:
                self.cache.put(key, data)
        return data

    def _record(self, i: int) -> dict[str, Any] | None:
        """Chunk i's checksum record {array: [bytes, crc32]}, or None if it is missing or unreadable
        (read once per chunk: `_records`)."""
        try:
            record = json.loads(self.location.read_text(_record_key(i), max_bytes=1 << 16))
        except (OSError, ValueError):  # missing, not a file, not JSON
            return None
        return record if isinstance(record, dict) else None

    def _want(self, i: int, name: str, where: str) -> list[int]:
        """[bytes, crc32] recorded for chunk i's file of array `name` when it was committed."""
        want = (self._records(i) or {}).get(name)
        if not (isinstance(want, list) and len(want) == 2 and all(type(v) is int and v >= 0 for v in want)):
            raise self._damaged(f"{where} has no readable checksum record ({CHECKSUMS}/{i}.json)")
        return want

    def _check(self, i: int, name: str, where: str, data: memoryview | mmap.mmap) -> None:
        """Compare a chunk file's bytes with the size and CRC-32 recorded when it was committed."""
        self._compare(where, data, self._want(i, name, where))

    def _compare(self, where: str, data: memoryview | bytes | mmap.mmap, want: list[int]) -> None:
        if len(data) != want[0]:
            raise self._wrong_size(where, len(data), want[0])
        if zlib.crc32(data) != want[1]:
            raise self._damaged(f"{where} does not match the checksum recorded when it was written")

    def _wrong_size(self, where: str, size: int, want: int) -> DamagedStore:
        return self._damaged(f"{where} has {size:,} bytes where {want:,} were written (truncated or overwritten)")

    def _damaged(self, what: str) -> DamagedStore:
        return DamagedStore(f"store {self.path} is damaged: {what}; {_remedy(self.path)}", what)

    def read_tokens(self, i: int) -> np.ndarray:
        """Token ids [chunk_rows] int32 of chunk i's rows, checked like `read_chunk_raw`."""
        if not 0 <= i < self.n_chunks:
            raise IndexError(f"chunk {i} out of range (0..{self.n_chunks - 1})")
        return self._read("tokens", i)

    def read_chunk(self, i: int) -> np.ndarray:
        """Chunk i as float32 [chunk_rows, d]."""
        return self.as_float(self.read_chunk_raw(i))

    def as_float(self, raw: np.ndarray) -> np.ndarray:
        """Rows as stored [n, d] -> float32 [n, d]."""
        return as_float(raw, self.acts_dtype)

    # ------------------------------------------------------------------ rows -> text

    def locate(self, row: int) -> tuple[int, int]:
        """Row -> (sequence index, position of the row's token in that sequence)."""
        seq, offset = divmod(int(row), self.rows_per_seq)
        return seq, self.first_pos + offset

    def row_at(self, seq: int, pos: int) -> int:
        """Inverse of `locate`: the row of position pos >= first_pos of sequence seq."""
        return seq * self.rows_per_seq + pos - self.first_pos

    def sequence(self, seq: int) -> np.ndarray:
        """Token ids [context_size] of sequence seq (contexts are read a chunk at a time, cached)."""
        chunk, i = divmod(int(seq), self.chunk_seqs)
        return self._sequences(chunk)[i]

    def _chunk_sequences(self, chunk: int) -> np.ndarray:
        return self._read("contexts", chunk)

    def sequences_of(self, chunk_ids: list[int], n: int) -> np.ndarray:
        """Token ids [n, context_size] of the first n sequences of the chunks `chunk_ids`, in order."""
        need = chunk_ids[: -(-n // self.chunk_seqs)]
        return np.concatenate([self._chunk_sequences(c) for c in need])[:n]

    def context(self, row: int) -> tuple[np.ndarray, int]:
        """(the sequence's token ids [context_size], position of `row` in it)."""
        seq, pos = self.locate(row)
        return self.sequence(seq), pos
