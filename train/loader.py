"""Shuffled training batches from a harvest store, read whole chunk by whole chunk, on every core.

The stream. The rows a run sees are a pure function of (store, seed, batch size, window size) and
the step: epoch e visits the training chunks in a seeded order, W chunks at a time (a "window");
the rows of each window are permuted with a seed of their own, and the windows are concatenated into
one stream that is cut into batches. Batch s is rows [s * B, (s + 1) * B) of that stream, so a
resumed run restarts at any step without replaying anything: its whole data position is the step.
How the rows are read (threads, read-ahead, memory maps) never changes which rows a batch holds.

Outlier rows: some LMs write a few activations with hundreds of times the typical norm (massive
activations: SmolLM2 at mid-sequence separators and early "." / "\\n" tokens, ~0.1% of rows, ~90% of
the variance). With `cut` set, rows whose norm exceeds it are left out: each is replaced by another
(seeded, random) row of the same window, so batches keep their size and the stream stays a pure
function of the step. The cut is harvest/held_out.py's `norm_cut`, the one validation and eval use.

How a batch is made. A window is never copied or permuted as a whole: its order is an index map
[rows] into its chunks, and a batch is one gather of B rows through it.
  - compressed stores: `threads` workers read, check and decode the window's chunks side by side
    (each straight into its slice of one window buffer; decoding releases the GIL), computing each
    row's norm for the cut as they go, `read_ahead` windows ahead of the one being served;
  - uncompressed stores (`codec=none`): a chunk file is the array, memory-mapped
    (`ActivationStore.read_chunk_raw`), so a batch gathers straight from the page cache, with no
    decode and no window buffer;
  - the gathers of the next batches run on the same workers while the trainer steps. A batch stays in
    the store's 16-bit dtype until it reaches the device: on CUDA it is gathered into pinned memory,
    copied on a side stream one batch ahead and converted to float32 there; on the CPU a worker
    converts it.

Memory: at most (2 + read_ahead) decoded windows (none for a memory-mapped store) and a few batches,
independent of the store's size.

Which chunks are held out (for evaluation, never trained on), and how they are read: harvest/held_out.py.
"""

from __future__ import annotations

import atexit
import heapq
import itertools
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

from harvest.held_out import outliers, stored_tensor
from harvest.store import ActivationStore
from runtime.cpu import cpu_cores

def shuffled_order(rng: np.random.Generator, n_rows: int, bad: np.ndarray | None) -> np.ndarray:
    """A window's stream order [n_rows]: a permutation drawn from `rng`, then each outlier row (bad
    [n_rows], in the window's row order) replaced by a random non-outlier row of the window."""
    order = rng.permutation(n_rows)
    if bad is not None:
        bad = bad[order]
        if bad.any():
            order[bad] = order[rng.choice(np.flatnonzero(~bad), size=int(bad.sum()))]
    return order


@dataclass
class Window:
    """One window's rows as read: its chunks ([C, d] each, slices of `buffer` when decoded, memory maps
    otherwise) and `order`, the window's row order in the stream (indices into the chunks' rows laid
    end to end)."""

    chunks: list[np.ndarray]
    order: np.ndarray  # [rows] int64
    buffer: np.ndarray | None  # [rows, d]: the decoded chunks side by side; None when memory-mapped

    def gather(self, lo: int, hi: int, out: np.ndarray) -> None:
        """out [hi - lo, d] <- the window's stream rows [lo, hi)."""
        index = self.order[lo:hi]
        if self.buffer is not None:
            np.take(self.buffer, index, axis=0, out=out, mode="clip")  # indices are valid: no checking pass
            return
        chunk, offset = np.divmod(index, len(self.chunks[0]))
        for c in np.unique(chunk):
            at = np.flatnonzero(chunk == c)
            out[at] = self.chunks[c][offset[at]]


class _Reading:
    """A window being read: one future per chunk, each giving (rows [C, d], outlier mask [C] or None)."""

    def __init__(self, futures: list[Future], buffer: np.ndarray | None):
        self.futures, self.buffer = futures, buffer
        self.window: Window | None = None

    def ready(self) -> bool:
        return self.window is not None or all(f.done() for f in self.futures)


class Batches:
    """Iterates over training batches [batch_size, d] float32 (on `device`) from `start_step` on, forever.

    threads: workers that read, decode and gather (None: every core); read_ahead: windows read ahead
    of the one being served (>= 0)."""

    def __init__(self, store: ActivationStore, chunk_ids: list[int], batch_size: int, seed: int,
                 window_chunks: int, start_step: int = 0, device: str | torch.device = "cpu",
                 cut: float | None = None, threads: int | None = None, read_ahead: int = 1):
        if not chunk_ids:
            raise ValueError("no training chunks")
        self.store, self.chunk_ids, self.batch_size, self.seed = store, list(chunk_ids), batch_size, seed
        self.window_chunks = min(window_chunks, len(chunk_ids))
        self.start_step, self.device, self.cut = start_step, torch.device(device), cut
        self.threads, self.read_ahead = threads or cpu_cores(), read_ahead
        self.epoch_rows = len(chunk_ids) * store.chunk_rows
        self.windows_per_epoch = -(-len(chunk_ids) // self.window_chunks)
        self.in_flight = max(2, self.threads)  # batches being gathered ahead of the trainer

    # ------------------------------------------------------------------ the stream: pure functions

    def _window_chunks(self, g: int) -> list[int]:
        """Chunk ids of window g (counted over epochs: g = epoch x windows per epoch + w)."""
        epoch, w = divmod(g, self.windows_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.chunk_ids)
        return order[w * self.window_chunks : (w + 1) * self.window_chunks].tolist()

    def _window_rows(self, g: int) -> int:
        w = g % self.windows_per_epoch
        return (min(len(self.chunk_ids), (w + 1) * self.window_chunks) - w * self.window_chunks) * self.store.chunk_rows

    def _order(self, g: int, bad: np.ndarray | None) -> np.ndarray:
        """Window g's stream order [rows]: a seeded permutation, then each outlier (bad [rows], in chunk
        order) replaced by a seeded random non-outlier row of the window."""
        epoch, w = divmod(g, self.windows_per_epoch)
        return shuffled_order(np.random.default_rng([self.seed, epoch, w, 1]), self._window_rows(g), bad)

    def _pieces(self, step: int) -> list[tuple[int, int, int]]:
        """Batch `step` as [(window g, first row, end row)] within each window it takes rows from."""
        row, left, pieces = step * self.batch_size, self.batch_size, []
        full = self.window_chunks * self.store.chunk_rows
        while left:
            epoch, in_epoch = divmod(row, self.epoch_rows)
            g, lo = epoch * self.windows_per_epoch + in_epoch // full, in_epoch % full
            hi = min(self._window_rows(g), lo + left)
            pieces.append((g, lo, hi))
            row, left = row + hi - lo, left - (hi - lo)
        return pieces

    # ------------------------------------------------------------------ reading and gathering

    def _read_chunk(self, i: int, out: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        rows = self.store.read_chunk_raw(i, out)
        return rows, (outliers(rows, self.cut) if self.cut is not None else None)

    def _start_window(self, g: int, workers: _Workers, free: list[np.ndarray]) -> _Reading:
        ids, C = self._window_chunks(g), self.store.chunk_rows
        buffer = None
        if not self.store.mapped:
            full = (self.window_chunks * C, self.store.d_model)
            buffer = free.pop() if free else np.empty(full, dtype=np.dtype(self.store.acts.dtype))
        futures = [workers.submit(READ, self._read_chunk, i, None if buffer is None else buffer[k * C : (k + 1) * C])
                   for k, i in enumerate(ids)]
        return _Reading(futures, buffer)

    def _window(self, g: int, reading: _Reading) -> Window:
        """Window g once its chunks are read (waits for them)."""
        if reading.window is None:
            parts = [f.result() for f in reading.futures]
            bad = None if self.cut is None else np.concatenate([b for _, b in parts])
            rows = None if reading.buffer is None else reading.buffer[: self._window_rows(g)]
            reading.window = Window([r for r, _ in parts], self._order(g, bad), rows)
        return reading.window

    def _gather(self, pieces: list[tuple[Window, int, int]], out: np.ndarray | None) -> np.ndarray | torch.Tensor:
        """One batch: its rows gathered into `out` [B, d] (16-bit, pinned: CUDA), or on the CPU into this
        worker's scratch array and returned as a new float32 tensor."""
        if out is None:
            out = getattr(_scratch, "rows", None)
            if out is None or out.shape != (self.batch_size, self.store.d_model):
                out = _scratch.rows = np.empty((self.batch_size, self.store.d_model), np.dtype(self.store.acts.dtype))
        at = 0
        for window, lo, hi in pieces:
            window.gather(lo, hi, out[at : at + hi - lo])
            at += hi - lo
        if self.device.type == "cuda":
            return out
        return stored_tensor(out).to(self.device, torch.float32, copy=True)

    def __iter__(self) -> Iterator[torch.Tensor]:
        workers = _Workers(self.threads)
        try:
            yield from self._serve(workers)
        finally:
            workers.shutdown()

    def _serve(self, workers: _Workers) -> Iterator[torch.Tensor]:
        """The schedule: windows read `read_ahead` ahead; up to `in_flight` batches gathered ahead, a
        batch submitted once its windows are read (blocking only when nothing else is in flight). The
        workers take gathers before reads, so reading ahead never delays the next batch."""
        device = _Device(self.device, (self.batch_size, self.store.d_model), self.store.acts.dtype,
                         self.store.acts_dtype, ring=self.in_flight + 2)
        windows: dict[int, _Reading] = {}
        free: list[np.ndarray] = []  # window buffers to reuse
        pending: deque[tuple[int, Future, object]] = deque()  # (first window, gathering, staging token)
        sent: deque = deque()  # batches on their way to the device
        step = self.start_step
        while True:
            while len(pending) < self.in_flight:
                pieces = self._pieces(step)
                for g in range(pieces[0][0], pieces[-1][0] + self.read_ahead + 1):
                    if g not in windows:
                        windows[g] = self._start_window(g, workers, free)
                if pending and not all(windows[g].ready() for g, _, _ in pieces):
                    break
                parts = [(self._window(g, windows[g]), lo, hi) for g, lo, hi in pieces]
                out, token = device.staging()
                pending.append((pieces[0][0], workers.submit(GATHER, self._gather, parts, out), token))
                step += 1
            first, gathering, token = pending.popleft()
            for g in [g for g in windows if g < first]:  # no batch left to gather reads these
                done = windows.pop(g)
                if done.buffer is not None:
                    free.append(done.buffer)
            sent.append(device.send(gathering.result(), token))
            if len(sent) > device.lead:
                yield device.receive(sent.popleft())


_scratch = threading.local()  # each worker's 16-bit batch array, reused (the CPU path)
GATHER, READ = 0, 1  # task priorities of the loader's workers: lower first


class _Workers:
    """`n` threads that run tasks by priority, then in the order submitted; each task's Future.

    Every live pool is shut down at interpreter exit (before modules are torn down), so a loader that
    is never closed does not leave threads inside torch while the process ends."""

    live: weakref.WeakSet[_Workers] = weakref.WeakSet()

    def __init__(self, n: int):
        self.heap: list = []
        self.ready = threading.Condition()
        self.count = itertools.count()
        self.push, self.pop = heapq.heappush, heapq.heappop  # kept: usable while the interpreter exits
        self.threads = [threading.Thread(target=self._work, name=f"loader-{i}", daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()
        _Workers.live.add(self)

    def submit(self, priority: float, fn: Callable | None, *args: object) -> Future:
        future: Future = Future()
        with self.ready:
            self.push(self.heap, (priority, next(self.count), future, fn, args))
            self.ready.notify()
        return future

    def _work(self) -> None:
        while True:
            with self.ready:
                while not self.heap:
                    self.ready.wait()
                _, _, future, fn, args = self.pop(self.heap)
            if fn is None:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # handed to whoever waits for the result
                future.set_exception(e)

    def shutdown(self) -> None:
        """Cancel what has not started, let running tasks finish, stop the threads (idempotent)."""
        with self.ready:
            waiting, self.heap[:] = self.heap[:], []
        for _, _, future, _, _ in waiting:
            future.cancel()
        for _ in self.threads:
            self.submit(float("inf"), None)
        for t in self.threads:
            t.join()
        self.threads = []


@atexit.register
def _stop_every_pool() -> None:
    for workers in list(_Workers.live):
        workers.shutdown()


class _Device:
    """Where batches go. On the CPU a worker has already converted them (`lead` 0: nothing is sent
    ahead). On CUDA each is gathered into pinned 16-bit memory, copied on a side stream one batch ahead
    of the trainer (`lead` 1), and converted on the device (float16, or bfloat16 bits, -> float32)."""

    def __init__(self, device: torch.device, shape: tuple[int, int], stored: np.dtype, acts_dtype: str, ring: int):
        self.device, self.shape, self.stored = device, shape, np.dtype(stored)
        self.cuda = device.type == "cuda"
        self.lead = 1 if self.cuda else 0
        self.view = torch.bfloat16 if acts_dtype == "bfloat16" else torch.float16
        self.free: deque[tuple[torch.Tensor, torch.cuda.Event | None]] = deque()
        if self.cuda:
            self.stream = torch.cuda.Stream(device)
            self.free.extend((torch.empty(shape, dtype=torch.int16, pin_memory=True), None) for _ in range(ring))

    def staging(self) -> tuple[np.ndarray | None, torch.Tensor | None]:
        """(the array a batch is gathered into, its pinned tensor) on CUDA (reused once its copy is
        done); (None, None) on the CPU."""
        if not self.cuda:
            return None, None  # the worker gathers into its own scratch array
        pinned, copied = self.free.popleft()
        if copied is not None:
            copied.synchronize()
        return pinned.numpy().view(self.stored), pinned

    def send(self, batch: np.ndarray | torch.Tensor, pinned: torch.Tensor | None) -> object:
        """Start moving a gathered batch to the device; returns what `receive` takes."""
        if not self.cuda:
            return batch
        with torch.cuda.stream(self.stream):
            on_device = pinned.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        self.free.append((pinned, copied))
        return on_device, copied

    def receive(self, sent: object) -> torch.Tensor:
        """The batch as float32 on the device, ordered after its copy on the trainer's stream."""
        if not self.cuda:
            return sent
        on_device, copied = sent
        main = torch.cuda.current_stream(self.device)
        main.wait_event(copied)
        on_device.record_stream(main)
        return on_device.view(self.view).float()
