"""Training batches straight from the LM (`data.source=stream`): no store, the text read once.

The stream. The training side of the text (harvest/stream.py: every document but the held-out ones)
goes through the LM chunk by chunk, in order. W = `data.shuffle_tokens` / chunk rows chunks make a
window (the shuffle buffer); the rows of window g are permuted with the seed [seed, g] (outlier rows
replaced by other rows of the window, as the store loader does: train/loader.py `shuffled_order`),
and the windows, concatenated, are cut into batches: batch s is rows [s * B, (s + 1) * B). So the
rows of a batch are a pure function of the text, the seed, B, W and s.

Resume. The text position at the start of each window is recorded as it is made; a checkpoint at
step s holds the one of the window that batch s starts in (`state(s)`), and a launch from it runs the
LM again on that window's text and serves from row s * B of it on: the same batches as a run that
was never stopped (the LM computes the same rows for the same text on the same device and threads).

Overlap. The next window is computed by a background thread while the trainer steps through the
current one (the LM and the SAE then share the cores on a CPU; on CUDA, put the LM on the same or
another GPU with the stream's `device=`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from harvest.held_out import outliers, stored_tensor
from harvest.stream import TRAIN, StreamLM
from runtime.errors import ToolkitError
from train.loader import shuffled_order


class TextRanOut(ToolkitError):
    """The training side of the text ended before the run's budget."""


class StreamBatches:
    """Iterates over training batches [batch_size, d] float32 on `device`, from `start_step` on.

    `start`: the checkpoint's `state(start_step)`; None for a run from step 0."""

    def __init__(self, source: StreamLM, period: int, batch_size: int, seed: int, window_chunks: int,
                 start_step: int = 0, device: str | torch.device = "cpu", cut: float | None = None,
                 start: dict[str, Any] | None = None):
        self.source, self.period, self.batch_size, self.seed = source, period, batch_size, seed
        self.window_chunks, self.device, self.cut = window_chunks, torch.device(device), cut
        self.window_rows = window_chunks * source.layout.chunk_rows
        self.step = start_step
        first = start_step * batch_size // self.window_rows
        if first > 0 and (start is None or start.get("window") != first):
            raise ValueError(f"resuming at step {start_step} needs the text position of window {first}")
        self.chunks = source.chunks(TRAIN, period, start["pack_state"] if first > 0 else None)
        self.starts: dict[int, dict[str, Any]] = {}  # window -> the text position at its start
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="stream-lm")
        self._windows: dict[int, Future] = {}
        self._next = first  # the next window the LM thread makes

    def state(self, step: int) -> dict[str, Any]:
        """What a checkpoint after `step` steps holds to resume exactly: the window that batch `step`
        starts in and the text position at its start."""
        g = step * self.batch_size // self.window_rows
        try:
            self._window(g)  # its start is recorded once the LM thread has begun it
        except TextRanOut:
            pass  # the budget ends where the text does: nothing more will be read
        with self._lock:
            return {"window": g, "pack_state": self.starts[g]}

    def _make(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Window g (made strictly in order, on the LM thread): (its rows [W x C, d] as stored, its order)."""
        with self._lock:
            self.starts[g] = self.chunks.state
            for old in [w for w in self.starts if w < g - 2]:
                del self.starts[old]
        parts = []
        for _ in range(self.window_chunks):
            got = self.chunks.next()
            if got is None:
                tokens = g * self.window_rows + sum(len(p) for p in parts)
                raise TextRanOut(f"the training text ran out after {tokens:,} tokens of the stream (window {g}); "
                                 "add text, or lower the budget")
            parts.append(got[0])
        rows = np.concatenate(parts)
        bad = outliers(rows, self.cut) if self.cut is not None else None
        return rows, shuffled_order(np.random.default_rng([self.seed, g, 2]), len(rows), bad)

    def _window(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        while self._next <= g + 1:  # window g and the one after it are on their way
            self._windows[self._next] = self._pool.submit(self._make, self._next)
            self._next += 1
        for old in [w for w in self._windows if w < g]:
            del self._windows[old]
        return self._windows[g].result()

    def __iter__(self) -> Iterator[torch.Tensor]:
        try:
            while True:
                yield self._batch(self.step)
                self.step += 1
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _batch(self, step: int) -> torch.Tensor:
        out = np.empty((self.batch_size, self.source.layout.d_model), dtype=self.source.layout.stored_dtype)
        row, at = step * self.batch_size, 0
        while at < self.batch_size:
            g, lo = divmod(row + at, self.window_rows)
            take = min(self.batch_size - at, self.window_rows - lo)
            rows, order = self._window(g)
            out[at : at + take] = rows[order[lo : lo + take]]
            at += take
        return stored_tensor(out).to(self.device, torch.float32)
