"""Shuffled training batches from a harvest store, read lazily, whole chunk by whole chunk.

The rows a run sees are a pure function of (store, seed, batch size, window size) and the step:
epoch e visits the training chunks in a seeded order, W chunks at a time (a "window"); the rows of
each window are permuted with a seed of their own, and the windows are concatenated into one
stream that is cut into batches. Batch s is rows [s * B, (s + 1) * B) of that stream, so a resumed
run restarts at any step without replaying anything: its whole data position is the step.

Memory: at most two windows (the one being served and the one a background thread reads ahead),
kept in the store's 16-bit dtype; independent of the store's size.

Outlier rows: some LMs write a few activations with hundreds of times the typical norm (massive
activations: SmolLM2 at mid-sequence separators and early "." / "\n" tokens, ~0.1% of rows, ~90% of
the variance). With `cut` set, rows whose norm exceeds it are left out: each is replaced by another
(seeded, random) row of the same window, so batches keep their size and the stream stays a pure
function of the step. `norm_cut` gives the cut; eval uses the same one and reports what it dropped.

Held-out chunks (for evaluation, never trained on) are the store's to say (`ActivationStore.split`).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from harvest.store import ActivationStore


def norm_cut(store: ActivationStore, factor: float | None) -> float | None:
    """factor x the median row norm of chunk 0 (always a training chunk), or None (keep every row)."""
    if factor is None:
        return None
    return float(factor * np.median(np.linalg.norm(store.read_chunk(0), axis=1)))


def outliers(rows: np.ndarray, cut: float | None) -> np.ndarray:
    """rows [n, d] float32 -> bool [n]: which rows have a norm above the cut."""
    if cut is None:
        return np.zeros(len(rows), dtype=bool)
    return np.linalg.norm(rows, axis=1) > cut


class Batches:
    """Iterates over training batches [batch_size, d] float32 from `start_step` on, forever."""

    def __init__(self, store: ActivationStore, chunk_ids: list[int], batch_size: int, seed: int,
                 window_chunks: int, start_step: int = 0, device: str | torch.device = "cpu",
                 cut: float | None = None):
        if not chunk_ids:
            raise ValueError("no training chunks")
        self.store, self.chunk_ids, self.batch_size, self.seed = store, list(chunk_ids), batch_size, seed
        self.window_chunks = min(window_chunks, len(chunk_ids))
        self.start_step, self.device, self.cut = start_step, torch.device(device), cut
        self.epoch_rows = len(chunk_ids) * store.chunk_rows
        self.windows_per_epoch = -(-len(chunk_ids) // self.window_chunks)

    def _window_chunks(self, epoch: int, w: int) -> list[int]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.chunk_ids)
        return order[w * self.window_chunks : (w + 1) * self.window_chunks].tolist()

    def _read_window(self, epoch: int, w: int) -> np.ndarray:
        """Rows of window w of epoch e, permuted, outliers replaced: [rows, d] in the store's dtype."""
        rows = np.concatenate([self.store.read_chunk_raw(i) for i in self._window_chunks(epoch, w)])
        rng = np.random.default_rng([self.seed, epoch, w, 1])
        rows = rows[rng.permutation(len(rows))]
        bad = outliers(self.store.as_float(rows), self.cut) if self.cut is not None else None
        if bad is not None and bad.any():
            rows[bad] = rows[rng.choice(np.flatnonzero(~bad), size=int(bad.sum()))]
        return rows

    def _windows(self, epoch: int, w: int) -> Iterator[np.ndarray]:
        """Windows from (epoch, w) on, each read by a background thread while the previous is served."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="loader") as pool:
            ahead: Future = pool.submit(self._read_window, epoch, w)
            while True:
                current = ahead.result()
                w += 1
                if w == self.windows_per_epoch:
                    epoch, w = epoch + 1, 0
                ahead = pool.submit(self._read_window, epoch, w)
                yield current

    def _locate(self, row: int) -> tuple[int, int, int]:
        """Stream row -> (epoch, window, offset inside the window)."""
        epoch, in_epoch = divmod(row, self.epoch_rows)
        full = self.window_chunks * self.store.chunk_rows
        return epoch, in_epoch // full, in_epoch % full

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch, w, offset = self._locate(self.start_step * self.batch_size)
        pending: list[np.ndarray] = []
        have = 0
        for window in self._windows(epoch, w):
            window = window[offset:]
            offset = 0
            while len(window):
                take = min(self.batch_size - have, len(window))
                pending.append(window[:take])
                window, have = window[take:], have + take
                if have == self.batch_size:
                    batch = self.store.as_float(np.concatenate(pending))
                    yield torch.from_numpy(batch).to(self.device, non_blocking=True)
                    pending, have = [], 0


def eval_rows(store: ActivationStore, chunk_ids: list[int], max_rows: int | None = None,
              cut: float | None = None, counts: dict[str, int] | None = None) -> Iterator[torch.Tensor]:
    """The held-out chunks in order, as float32 [rows, d] tensors without the rows above the norm
    cut (at most max_rows rows in all). `counts`, if given, receives "read" and "dropped" row counts."""
    counts = {} if counts is None else counts
    counts.update(read=0, dropped=0)
    seen = 0
    for i in chunk_ids:
        rows = store.read_chunk(i)
        counts["read"] += len(rows)
        if cut is not None:
            keep = ~outliers(rows, cut)
            counts["dropped"] += int((~keep).sum())
            rows = rows[keep]
        if max_rows is not None:
            rows = rows[: max_rows - seen]
        seen += len(rows)
        yield torch.from_numpy(rows)
        if max_rows is not None and seen >= max_rows:
            return
