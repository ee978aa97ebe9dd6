"""The held-out view of a store: which chunks no run trains on, which rows are outliers, and every way a
later stage reads the held-out rows. Training, validation, eval, firings (dashboards, autointerp) and
CE all read them through `HeldOut`, so they agree on the rows.

The split. With a held-out fraction f > 0, every p-th chunk is held out, p = round(1 / f) (at least
2): spread over the corpus, and the same chunks when the store grows (`split_chunks`).

Outlier rows. Some LMs write a few activations with hundreds of times the typical norm (massive
activations: SmolLM2 at mid-sequence separators and early "." / "\\n" tokens, ~0.1% of rows, ~90% of
the variance). With an outlier factor c, rows whose norm exceeds c x the median row norm of chunk 0
(always a training chunk) are left out of training (train/loader.py replaces them), of validation and
of eval's metrics (`norm_cut`, `outliers`); eval reports how many it left out.

Reading (`HeldOut`), all in chunk order, float32:
    rows(max_rows)            [n, d] tensors without the outliers, at most max_rows rows in all (eval)
    rows_with_ids(max_rows)   (store row ids [n], rows [n, d]) per chunk (firings: which row fired)
    sample(n_rows)            a fixed sample of about n_rows rows spread over the held-out chunks
                              (validation during training: every run on the store sees the same rows)
    sequences(n)              token ids of the first n held-out sequences (CE loss)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from harvest.store import ActivationStore

NORM_BLOCK = 1024  # rows widened to float32 at a time for their norms (stays in cache)
SAMPLE_CHUNKS = 8  # held-out chunks the fixed sample is read from (bounds the read on big stores)


def held_out_period(eval_frac: float) -> int:
    """Every this-many-th chunk is held out at a held-out fraction eval_frac > 0."""
    return max(2, round(1 / eval_frac))


def split_chunks(n_chunks: int, eval_frac: float) -> tuple[list[int], list[int]]:
    """(training chunk ids, held-out chunk ids) of a store with n_chunks chunks (module docstring)."""
    if eval_frac <= 0:
        return list(range(n_chunks)), []
    period = held_out_period(eval_frac)
    held = [i for i in range(n_chunks) if i % period == period - 1]
    return [i for i in range(n_chunks) if i % period != period - 1], held


def stored_tensor(rows: np.ndarray) -> torch.Tensor:
    """Rows as stored (float16, or uint16 bfloat16 bits) or float32, as a torch tensor of the same bytes
    (float16, bfloat16 or float32; no copy)."""
    if rows.dtype == np.uint16:
        return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(rows)


def row_norms(rows: np.ndarray) -> np.ndarray:
    """rows [n, d] (float32, or as stored) -> float32 [n] Euclidean norms, computed in float32 by torch,
    NORM_BLOCK rows at a time (each block widened to float32 while it is in cache). A row's norm does
    not depend on the rows beside it, so every reader of a row gets the same bits."""
    x = stored_tensor(rows)
    return torch.cat([torch.linalg.vector_norm(x[s : s + NORM_BLOCK].float(), dim=1)
                      for s in range(0, len(x), NORM_BLOCK)] or [torch.zeros(0)]).numpy()


def norm_cut(store: ActivationStore, factor: float | None) -> float | None:
    """factor x the median row norm of chunk 0 (always a training chunk), or None (keep every row)."""
    if factor is None:
        return None
    return float(factor * np.median(row_norms(store.read_chunk_raw(0))))


def outliers(rows: np.ndarray, cut: float | None) -> np.ndarray:
    """rows [n, d] (float32 or as stored) -> bool [n]: which rows have a norm above the cut."""
    if cut is None:
        return np.zeros(len(rows), dtype=bool)
    return row_norms(rows) > cut


@dataclass(frozen=True)
class HeldOut:
    """The held-out chunks of `store` at a held-out fraction, and the norm cut of an outlier factor."""

    store: ActivationStore
    chunks: tuple[int, ...]  # held-out chunk ids, ascending
    cut: float | None  # rows with a larger norm are left out (None: none are)
    factor: float | None  # the outlier factor the cut came from

    @classmethod
    def of(cls, store: ActivationStore, eval_frac: float, outlier_factor: float | None) -> HeldOut:
        """The held-out chunks at eval_frac; every chunk of a store of held-out text alone (`held_out_only`)."""
        chunks = range(store.n_chunks) if store.held_out_only else split_chunks(store.n_chunks, eval_frac)[1]
        return cls(store, tuple(chunks), norm_cut(store, outlier_factor), outlier_factor)

    def rows(self, max_rows: int | None = None, counts: dict[str, int] | None = None) -> Iterator[torch.Tensor]:
        """The held-out rows in order, float32 [n, d] tensors per chunk, outliers left out, at most max_rows
        rows in all. `counts`, if given, receives the rows "read" and "dropped" (outliers)."""
        counts = {} if counts is None else counts
        counts.update(read=0, dropped=0)
        seen = 0
        for raw in self.store.read_chunks(list(self.chunks)):
            counts["read"] += len(raw)
            keep = ~outliers(raw, self.cut)
            counts["dropped"] += int((~keep).sum())
            rows = stored_tensor(raw[keep] if self.cut is not None else raw).float()
            if max_rows is not None:
                rows = rows[: max_rows - seen]
            seen += len(rows)
            yield rows
            if max_rows is not None and seen >= max_rows:
                return

    def rows_with_ids(self, max_rows: int, whole_chunks: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(store row ids [n] int64, float32 rows [n, d]) per held-out chunk in order, outliers left out.
        whole_chunks=False: exactly the first max_rows kept rows; True: whole chunks until at least
        max_rows rows (outliers included) were read, so that every row around a returned one was read."""
        rows_per_chunk, kept, read = self.store.chunk_rows, 0, 0
        for i, raw in zip(self.chunks, self.store.read_chunks(list(self.chunks))):
            if (read if whole_chunks else kept) >= max_rows:
                return
            local = np.flatnonzero(~outliers(raw, self.cut))
            local = local if whole_chunks else local[: max_rows - kept]
            yield i * rows_per_chunk + local, self.store.as_float(raw)[local]
            kept, read = kept + len(local), read + rows_per_chunk

    def sample(self, n_rows: int) -> np.ndarray:
        """The fixed sample, float32 [<= n_rows, d]: k = min(len(chunks), SAMPLE_CHUNKS) chunks evenly spaced
        along the held-out list, from each the same number of rows evenly spaced along the chunk; then
        the outliers left out. Runs on one store with the same split, cut and n_rows see the same rows."""
        if not self.chunks:
            raise ValueError("the store has no held-out chunk to sample")
        k = min(len(self.chunks), SAMPLE_CHUNKS)
        chosen = [self.chunks[i * len(self.chunks) // k] for i in range(k)]
        per_chunk = min(self.store.chunk_rows, -(-n_rows // k))
        offsets = np.linspace(0, self.store.chunk_rows - 1, per_chunk).round().astype(np.int64)
        rows = np.concatenate([self.store.as_float(raw[offsets]) for raw in self.store.read_chunks(chosen)])[:n_rows]
        return rows[~outliers(rows, self.cut)]

    def sequences(self, n: int) -> np.ndarray:
        """Token ids [<= n, context] of the first n held-out sequences."""
        return self.store.sequences_of(list(self.chunks), n)
