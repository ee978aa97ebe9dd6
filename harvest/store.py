"""THE activation store format: the only module that knows how activations lie on disk.

A store is a zarr v3 group (a folder) holding, for R rows (tokens) of a d-wide site:

    acts      [R, d]        float16 (or bfloat16 kept as uint16 bits), chunks of C rows, compressed
    tokens    [R]           int32, the token id at each row
    contexts  [S, ctx]      int32, the full token sequence each row comes from (S = R / rows_per_seq)

Rows are stored sequence by sequence: row r is position `first_pos + r % rows_per_seq` of
sequence `r // rows_per_seq` (first_pos is 1 when position 0 is excluded). A chunk is C =
chunk_seqs * rows_per_seq rows, i.e. whole sequences, and is the unit of writing and reading.

Group attributes: model, layer, site, d_model, context_size, tokenizer, n_tokens, complete,
config (the full harvest config), mean and var (per dimension, over the rows written, computed in
float64 from the stored 16-bit values), plus layout fields and the resume state `progress`.

Crash safety: zarr writes every chunk file and zarr.json through a temporary file + rename. A
chunk's data is written first; then the attributes, which advance `progress`, are written in one
atomic step. A kill at any moment leaves either the old or the new progress; chunks past it are
simply written again, with the same bytes.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs

FORMAT = "switch-sae/activations"
FORMAT_VERSION = 1


def codec(name: str, level: int) -> list:
    """zarr v3 bytes-to-bytes codecs for a codec name (README: measurements behind the default).

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


class RunningStats:
    """Per-dimension count, mean and sum of squared deviations, merged chunk by chunk (Chan et al.).

    Kept in float64 and saved exactly (JSON round-trips doubles), so a resumed harvest ends with
    the same statistics as an uninterrupted one.
    """

    def __init__(self, d: int, n: int = 0, mean: list[float] | None = None, m2: list[float] | None = None):
        self.n = n
        self.mean = np.zeros(d) if mean is None else np.asarray(mean, dtype=np.float64)
        self.m2 = np.zeros(d) if m2 is None else np.asarray(m2, dtype=np.float64)

    def update(self, x: np.ndarray) -> None:
        """x [rows, d] (any float dtype)."""
        x = x.astype(np.float64)
        nb = len(x)
        mb = x.mean(axis=0)
        m2b = ((x - mb) ** 2).sum(axis=0)
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + delta**2 * (self.n * nb / n)
        self.n = n

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
    def chunk_rows(self) -> int:
        return self.chunk_seqs * self.rows_per_seq

    @property
    def n_rows(self) -> int:
        return self.n_chunks * self.chunk_rows


def is_store(path: str | Path) -> bool:
    try:
        return zarr.open_group(str(path), mode="r").attrs.get("format") == FORMAT
    except Exception:
        return False


def remove(path: str | Path) -> None:
    """Delete a store; refuses anything that is not one."""
    if not is_store(path):
        raise ValueError(f"{path} is not an activation store; not deleting it")
    shutil.rmtree(path)


class StoreWriter:
    """Creates a store or reopens one to resume/extend it, and commits chunks in order."""

    def __init__(self, group: zarr.Group, layout: Layout):
        self.group = group
        self.layout = layout
        attrs = dict(group.attrs)
        progress = attrs.get("progress", {})
        self.chunks_done: int = progress.get("chunks_done", 0)
        self.pack_state: dict[str, Any] = progress.get("pack_state", {"docs_consumed": 0, "carry": []})
        s = progress.get("stats")
        self.stats = RunningStats(layout.d_model, s["n"], s["mean"], s["m2"]) if s else RunningStats(layout.d_model)
        self._acts = group["acts"]
        self._tokens = group["tokens"]
        self._contexts = group["contexts"]
        self.write_seconds = 0.0  # time spent in write_chunk, for benchmarks
        for partial in Path(group.store.root).rglob("*.partial"):  # litter from a kill mid-write
            partial.unlink(missing_ok=True)
        self._resize(layout.n_chunks)

    @classmethod
    def create(cls, path: str | Path, layout: Layout, compressors: list, meta: dict[str, Any]) -> StoreWriter:
        """Build the empty store beside `path` and rename it into place: it appears whole or not at all."""
        path = Path(path)
        staging = path.with_name(path.name + ".creating")
        shutil.rmtree(staging, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(str(staging), mode="w-")
        L = layout
        group.create_array("acts", shape=(L.n_rows, L.d_model), chunks=(L.chunk_rows, L.d_model),
                           dtype="float16" if L.acts_dtype == "float16" else "uint16",
                           compressors=compressors, fill_value=0)
        group.create_array("tokens", shape=(L.n_rows,), chunks=(L.chunk_rows,), dtype="int32",
                           compressors=[zarr.codecs.ZstdCodec(level=3)], fill_value=0)
        group.create_array("contexts", shape=(L.n_chunks * L.chunk_seqs, L.context_size),
                           chunks=(L.chunk_seqs, L.context_size), dtype="int32",
                           compressors=[zarr.codecs.ZstdCodec(level=3)], fill_value=0)
        group.attrs.update({
            "format": FORMAT, "format_version": FORMAT_VERSION, **meta,
            "d_model": L.d_model, "context_size": L.context_size, "first_pos": L.first_pos,
            "rows_per_seq": L.rows_per_seq, "chunk_rows": L.chunk_rows, "acts_dtype": L.acts_dtype,
            "n_tokens": 0, "complete": False, "n_chunks_target": L.n_chunks,
        })
        staging.rename(path)  # replaces `path` only if it is an empty folder
        return cls(zarr.open_group(str(path), mode="r+"), layout)

    @classmethod
    def reopen(cls, path: str | Path, layout: Layout, meta: dict[str, Any]) -> StoreWriter:
        group = zarr.open_group(str(path), mode="r+")
        done = group.attrs.get("progress", {}).get("chunks_done", 0)
        if layout.n_chunks < done:
            raise ValueError(f"the store already holds {done} chunks, more than the {layout.n_chunks} asked for")
        # the budget may have grown (extend) or shrunk to what is written; config/runtime keys refresh
        group.attrs.update({**meta, "n_chunks_target": layout.n_chunks,
                            "complete": done == layout.n_chunks})
        return cls(group, layout)

    def _resize(self, n_chunks: int) -> None:
        L = self.layout
        if self._acts.shape[0] != n_chunks * L.chunk_rows:
            self._acts.resize((n_chunks * L.chunk_rows, L.d_model))
            self._tokens.resize((n_chunks * L.chunk_rows,))
            self._contexts.resize((n_chunks * L.chunk_seqs, L.context_size))

    def write_chunk(self, i: int, acts: np.ndarray, contexts: np.ndarray, pack_state: dict[str, Any]) -> None:
        """Write chunk i (must be the next one) and commit it.

        acts [chunk_rows, d] float16 or uint16 (bfloat16 bits); contexts [chunk_seqs, ctx] int.
        """
        t0 = time.perf_counter()
        L = self.layout
        assert i == self.chunks_done, f"chunk {i} written out of order (next is {self.chunks_done})"
        assert acts.shape == (L.chunk_rows, L.d_model) and contexts.shape == (L.chunk_seqs, L.context_size)
        rows = slice(i * L.chunk_rows, (i + 1) * L.chunk_rows)
        self._acts[rows] = acts
        self._tokens[rows] = contexts[:, L.first_pos :].reshape(-1).astype(np.int32)
        self._contexts[i * L.chunk_seqs : (i + 1) * L.chunk_seqs] = contexts.astype(np.int32)
        self.stats.update(as_float(acts, L.acts_dtype))
        self.chunks_done = i + 1
        self._commit(pack_state)
        self.write_seconds += time.perf_counter() - t0

    def _commit(self, pack_state: dict[str, Any]) -> None:
        L = self.layout
        self.pack_state = pack_state
        self.group.attrs.update({
            "n_tokens": self.chunks_done * L.chunk_rows,
            "complete": self.chunks_done == L.n_chunks,
            "mean": self.stats.mean.tolist(),
            "var": self.stats.var.tolist(),
            "progress": {"chunks_done": self.chunks_done, "pack_state": pack_state, "stats": self.stats.to_json()},
        })


def as_float(acts: np.ndarray, acts_dtype: str) -> np.ndarray:
    """Stored rows -> float32 [rows, d]."""
    if acts_dtype == "bfloat16":
        return (acts.astype(np.uint32) << 16).view(np.float32)
    return acts.astype(np.float32)


class ActivationStore:
    """Read-only view of a store: attributes, chunks as float32, and the context of any row."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not is_store(path):
            raise FileNotFoundError(f"{path} is not an activation store (run `make harvest` first)")
        self.group = zarr.open_group(str(path), mode="r")
        self.attrs: dict[str, Any] = dict(self.group.attrs)
        self.acts = self.group["acts"]
        self.tokens = self.group["tokens"]
        self.contexts = self.group["contexts"]

    @property
    def d_model(self) -> int:
        return self.attrs["d_model"]

    @property
    def chunk_rows(self) -> int:
        return self.attrs["chunk_rows"]

    @property
    def n_rows(self) -> int:
        """Rows written and committed (may be fewer than the arrays' length while incomplete)."""
        return self.attrs["n_tokens"]

    @property
    def n_chunks(self) -> int:
        return self.n_rows // self.chunk_rows

    @property
    def complete(self) -> bool:
        return bool(self.attrs["complete"])

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self.attrs["mean"])

    @property
    def var(self) -> np.ndarray:
        return np.asarray(self.attrs["var"])

    def stored_bytes(self, name: str = "acts") -> int:
        """Bytes the array takes on disk (compressed chunk files)."""
        return sum(f.stat().st_size for f in (self.path / name).rglob("*") if f.is_file() and f.name != "zarr.json")

    def read_chunk_raw(self, i: int) -> np.ndarray:
        """Chunk i as stored, [chunk_rows, d] float16 or uint16 (bfloat16 bits).

        An uncompressed chunk is memory-mapped (its file holds the raw little-endian rows);
        a compressed one is read and decompressed whole.
        """
        if not 0 <= i < self.n_chunks:
            raise IndexError(f"chunk {i} out of range (0..{self.n_chunks - 1})")
        if not self.acts.compressors:
            f = self.path / "acts" / "c" / str(i) / "0"
            if f.exists():
                return np.memmap(f, dtype=self.acts.dtype, mode="r", shape=(self.chunk_rows, self.d_model))
        return self.acts[i * self.chunk_rows : (i + 1) * self.chunk_rows]

    def read_chunk(self, i: int) -> np.ndarray:
        """Chunk i as float32 [chunk_rows, d]."""
        return as_float(self.read_chunk_raw(i), self.attrs["acts_dtype"])

    def context(self, row: int) -> tuple[np.ndarray, int]:
        """(the sequence's token ids [context_size], position of `row` in it)."""
        seq, offset = divmod(row, self.attrs["rows_per_seq"])
        return self.contexts[seq], self.attrs["first_pos"] + offset
