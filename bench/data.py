"""`make bench-data`: does the data path keep up with training, here and (on paper) on an H100?

One run, side by side, on chunks of the demo store (d 576, batches of 8192 rows, windows of 8
chunks, the outlier cut on as in training, warm page cache), in rounds of alternating order with the
median of each entry's rows/s:
  - the loader (`train.loader.Batches`) on the compressed store and on an uncompressed copy of the
    same chunks (memory-mapped), with 1 thread and with every core;
  - the loader on the same compressed chunks in a bucket of a loopback S3 server (moto's, started
    here: runtime/loopback_s3.py), with chunk files fetched in parallel ranges and whole, and through
    a warm local chunk cache (a second epoch, `data.cache_dir`);
  - the previous loader (one read-ahead thread, each window concatenated, permuted and converted
    whole; kept below as `serial_batches`), for the speed-up;
  - its bounds: reading, checking and decoding the same chunks (1 thread and every core), and a plain
    gather of the same rows from one memory-mapped array, converted to float32 (the copy bound);
  - the heap the loader holds (tracemalloc peak) on a few chunks and on every chunk of the store;
  - the harvest writer's ceiling: the store's own rows written again through `StoreWriter` (the LM
    replaced by precomputed activations), per codec and thread count, beside the LM forward alone;
  - ratios as medians of the ratios within each round (this machine's speed drifts within a minute);
  - the rows/s a training step consumes: TopK M 24576 and width-matched Switch N 16 at the paper
    shape (d 768, k 32), measured here, and on an H100 on paper (400 TFLOP/s of bf16 matmul,
    3.35 TB/s of HBM, the roofline of bench/train_step.py: FLOPs plus the per-step update traffic),
    with the loader cores that rate takes at the per-core rate measured here (the every-core rate
    divided by the cores; scaled by 576/768 to d 768: the loader's cost is per byte).

    python -m bench.data [--chunks 40] [--rounds 5] [--batches 24] [--quick]   -> results/bench/data.json
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from bench import copy_store, store_like, write_results
from harvest.held_out import norm_cut, split_chunks
from harvest.cache import ChunkCache
from harvest.store import ActivationStore, is_store, write_chunks
from runtime.loopback_s3 import LoopbackS3
from runtime import location
from runtime.cpu import cpu_cores
from train.loader import Batches

ROOT = Path(__file__).resolve().parents[1]
BATCH, WINDOW = 8192, 8
H100_TFLOPS, H100_TBPS = 400.0, 3.35


def serial_batches(store: ActivationStore, ids: list[int], batch_size: int, seed: int, window: int,
                   cut: float | None) -> Iterator[torch.Tensor]:
    """The previous loader, for comparison: one background thread reads a window's chunks one after
    another, concatenates and permutes the window, converts it to float32 for the outlier check, and
    every batch is concatenated and converted again. The same batches as `Batches`."""
    n_windows = -(-len(ids) // window)

    def read(epoch: int, w: int) -> np.ndarray:
        order = np.random.default_rng([seed, epoch]).permutation(ids)
        rows = np.concatenate([store.read_chunk_raw(i) for i in order[w * window : (w + 1) * window]])
        rng = np.random.default_rng([seed, epoch, w, 1])
        rows = rows[rng.permutation(len(rows))]
        bad = np.linalg.norm(store.as_float(rows), axis=1) > cut
        if bad.any():
            rows[bad] = rows[rng.choice(np.flatnonzero(~bad), size=int(bad.sum()))]
        return rows

    with ThreadPoolExecutor(1) as pool:
        epoch, w = 0, 0
        ahead = pool.submit(read, epoch, w)
        pending: list[np.ndarray] = []
        have = 0
        while True:
            window_rows = ahead.result()
            w += 1
            if w == n_windows:
                epoch, w = epoch + 1, 0
            ahead = pool.submit(read, epoch, w)
            while len(window_rows):
                take = min(batch_size - have, len(window_rows))
                pending.append(window_rows[:take])
                window_rows, have = window_rows[take:], have + take
                if have == batch_size:
                    yield torch.from_numpy(store.as_float(np.concatenate(pending)))
                    pending, have = [], 0


def rate(batches: Iterator[torch.Tensor], n: int) -> float:
    """Rows/s over n batches after the first (whose read overlaps nothing)."""
    first = next(batches)
    t0 = time.perf_counter()
    for _ in range(n):
        next(batches)
    return n * len(first) / (time.perf_counter() - t0)


def decode_rate(store: ActivationStore, ids: list[int], threads: int) -> float:
    """Rows/s of reading, checking and decoding the chunks `ids` in order (nothing else)."""
    t0 = time.perf_counter()
    for _ in store.read_chunks(ids, threads=threads):
        pass
    return len(ids) * store.chunk_rows / (time.perf_counter() - t0)


def gather_rate(flat: np.ndarray, n: int) -> float:
    """Rows/s of gathering n random batches from one memory-mapped [rows, d] array into float32."""
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(n):
        torch.from_numpy(flat[rng.integers(0, len(flat), BATCH)].astype(np.float32))
    return n * BATCH / (time.perf_counter() - t0)


def heap_peak(make: Callable[[], Iterator[torch.Tensor]], n: int) -> int:
    """Peak bytes allocated by Python and numpy while n batches are served (tracemalloc)."""
    tracemalloc.start()
    batches = make()
    for _ in range(n):
        next(batches)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def paired(runs: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of a's rate / b's rate, each pair measured in the same round."""
    return statistics.median(x / y for x, y in zip(runs[a], runs[b], strict=True))


def whole_object_reads(run: Callable[[], float]) -> Callable[[], float]:
    """`run` with remote chunk files fetched in one request each instead of parallel ranges."""
    def whole() -> float:
        ranges, location.RANGE_BYTES = location.RANGE_BYTES, 1 << 62
        try:
            return run()
        finally:
            location.RANGE_BYTES = ranges
    return whole


def measure_loaders(src: ActivationStore, tmp: Path, n_chunks: int, rounds: int, n_batches: int) -> dict:
    with LoopbackS3() as s3:
        return _measure_loaders(src, tmp, n_chunks, rounds, n_batches, s3.bucket("bench-data"))


def _measure_loaders(src: ActivationStore, tmp: Path, n_chunks: int, rounds: int, n_batches: int,
                     bucket: str) -> dict:
    ids = list(range(n_chunks))
    packed = copy_store(src, tmp / "compressed", ids)
    remote = copy_store(src, f"{bucket}/compressed.zarr", ids)
    cached = ActivationStore(remote.path, cache=ChunkCache(tmp / "cache", 1e12, remote.path))
    for _ in cached.read_chunks(ids):  # the first epoch fills the cache; the entry times later ones
        pass
    plain = copy_store(src, tmp / "uncompressed", ids, "none")
    flat = np.lib.format.open_memmap(tmp / "flat.npy", mode="w+", dtype=plain.acts.dtype,
                                     shape=(plain.n_rows, plain.d_model))
    for i in ids:
        flat[i * plain.chunk_rows : (i + 1) * plain.chunk_rows] = plain.read_chunk_raw(i)
    flat.flush()
    flat = np.load(tmp / "flat.npy", mmap_mode="r")
    cut = norm_cut(packed, 10.0)
    every = cpu_cores()
    entries: dict[str, Callable[[], float]] = {
        "previous loader, compressed": lambda: rate(serial_batches(packed, ids, BATCH, 0, WINDOW, cut), n_batches),
        **{f"loader, compressed, {t} thread(s)": (lambda t=t: rate(iter(Batches(
            packed, ids, BATCH, 0, WINDOW, cut=cut, threads=t)), n_batches)) for t in sorted({1, every})},
        **{f"loader, memory-mapped, {t} thread(s)": (lambda t=t: rate(iter(Batches(
            plain, ids, BATCH, 0, WINDOW, cut=cut, threads=t)), n_batches)) for t in sorted({1, every})},
        **{f"read + check + decode, {t} thread(s)": (lambda t=t: decode_rate(packed, ids, t))
           for t in sorted({1, every})},
        f"loader, S3 loopback, {every} thread(s)": lambda: rate(iter(Batches(
            remote, ids, BATCH, 0, WINDOW, cut=cut, threads=every)), n_batches),
        f"loader, S3 loopback, whole-object reads, {every} thread(s)": whole_object_reads(lambda: rate(iter(Batches(
            remote, ids, BATCH, 0, WINDOW, cut=cut, threads=every)), n_batches)),
        f"loader, S3 loopback through a warm local cache, {every} thread(s)": lambda: rate(iter(Batches(
            cached, ids, BATCH, 0, WINDOW, cut=cut, threads=every)), n_batches),
        f"read + check + decode, S3 loopback, {every} thread(s)": lambda: decode_rate(remote, ids, every),
        "plain gather from a memory-mapped array, to float32": lambda: gather_rate(flat, n_batches),
    }
    runs: dict[str, list[float]] = {name: [] for name in entries}
    names = list(entries)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            runs[name].append(entries[name]())
    out = {name: statistics.median(v) for name, v in runs.items()}
    out["rounds"] = runs
    # this machine's speed drifts within a minute: ratios are the median of the ratios within each round
    out["ratio_compressed_vs_decode_all"] = paired(runs, f"loader, compressed, {every} thread(s)",
                                                   f"read + check + decode, {every} thread(s)")
    out["ratio_compressed_vs_previous"] = paired(runs, f"loader, compressed, {every} thread(s)",
                                                 "previous loader, compressed")
    out["ratio_mapped_vs_gather"] = paired(runs, f"loader, memory-mapped, {every} thread(s)",
                                           "plain gather from a memory-mapped array, to float32")
    out["ratio_s3_vs_local"] = paired(runs, f"loader, S3 loopback, {every} thread(s)",
                                      f"loader, compressed, {every} thread(s)")
    out["ratio_s3_ranges_vs_whole"] = paired(runs, f"loader, S3 loopback, {every} thread(s)",
                                             f"loader, S3 loopback, whole-object reads, {every} thread(s)")
    out["ratio_s3_cached_vs_local"] = paired(runs, f"loader, S3 loopback through a warm local cache, {every} thread(s)",
                                             f"loader, compressed, {every} thread(s)")
    out["per_core_rows_s"] = {"compressed": out[f"loader, compressed, {every} thread(s)"] / every,
                              "memory-mapped": out[f"loader, memory-mapped, {every} thread(s)"] / every}
    return out


def measure_memory(src: ActivationStore, n_batches: int) -> dict:
    """Heap peak of the loader on 16 chunks and on every training chunk of the store (compressed)."""
    train_ids, _ = split_chunks(src.n_chunks, 0.05)
    cut = norm_cut(src, 10.0)
    out = {}
    for ids in (train_ids[:16], train_ids):
        out[f"heap_peak_bytes_{len(ids)}_chunks"] = heap_peak(
            lambda ids=ids: iter(Batches(src, ids, BATCH, 0, WINDOW, cut=cut)), n_batches)
    out["window_bytes"] = WINDOW * src.chunk_rows * src.d_model * 2
    return out


def writer_rate(src: ActivationStore, chunks: list[tuple[np.ndarray, np.ndarray]], dest: Path, codec_name: str,
                threads: int) -> float:
    """Rows/s of the harvest's writer alone (`harvest.store.write_chunks`: encoded and written `threads`
    chunks at once, committed in order) on precomputed chunks, into a new store at `dest`."""
    writer = store_like(src, dest, len(chunks), codec_name)
    t0 = time.perf_counter()
    write_chunks(((writer, k, acts, seqs, {}) for k, (acts, seqs) in enumerate(chunks)), threads)
    return len(chunks) * src.chunk_rows / (time.perf_counter() - t0)


def measure_writer(src: ActivationStore, tmp: Path, n_chunks: int, rounds: int) -> dict:
    """The writer's rows/s per codec and thread count (median of rounds, alternating order), the bytes
    each codec puts on disk, and the forward pass of the demo LM to the hooked block alone."""
    chunks = [(np.array(src.read_chunk_raw(i)), src.sequences_of([i], src.chunk_seqs)) for i in range(n_chunks)]
    grid = [(c, t) for c in ("blosc_zstd", "none") for t in sorted({1, cpu_cores()})]
    runs: dict[str, list[float]] = {f"{c}, {t} thread(s)": [] for c, t in grid}
    for c, t in grid:  # warm-up: the first writes of a process are slower (allocator, imports)
        writer_rate(src, chunks[:4], tmp / f"warm-{c}-{t}", c, t)
        shutil.rmtree(tmp / f"warm-{c}-{t}")
    for r in range(rounds):
        for c, t in grid if r % 2 == 0 else grid[::-1]:
            dest = tmp / f"w-{c}-{t}-{r}"
            runs[f"{c}, {t} thread(s)"].append(writer_rate(src, chunks, dest, c, t))
            if r == 0 and t == 1:
                runs.setdefault(f"bytes per row, {c}", []).append(ActivationStore(dest).stored_bytes() / (
                    n_chunks * src.chunk_rows))
            shutil.rmtree(dest)
    out = {name: statistics.median(v) for name, v in runs.items()}
    out["rounds"] = runs
    out["lm_forward_tok_s"] = lm_forward_rate(src)
    return out


def lm_forward_rate(src: ActivationStore, n_seqs: int = 64) -> float:
    """Tokens/s of the store's LM run to its hooked block (as the harvest runs it) on n_seqs sequences."""
    from harvest import lm
    from runtime.device import pick_device, pick_dtype

    cfg = src.harvest_config
    device = pick_device(cfg.get("device", "auto"))
    model, _ = lm.load_lm(src.model, device, keep_layers=src.layer + 1)
    reader = lm.SiteReader(model, src.layer, src.site, getattr(torch, pick_dtype(cfg.get("dtype", "auto"), device)))
    ids = torch.from_numpy(src.sequences_of(list(range(src.n_chunks)), n_seqs)).to(device)
    batches = list(lm.iter_batches(ids, cfg.get("batch_size", 32)))
    reader(batches[0])  # warm-up
    t0 = time.perf_counter()
    for b in batches:
        reader(b)
    return ids.numel() / (time.perf_counter() - t0)


def consumption(steps: int) -> dict:
    """Rows/s a training step consumes at the paper shape: measured here, and on an H100 on paper."""
    from bench.train_step import BATCH as B, bound, build_entry, time_steps

    out = {}
    for name, (arch, n, match) in {"topk": ("topk", None, None), "switch_n16": ("switch", 16, "width")}.items():
        sae, flops, dec = build_entry(arch, n, match)
        out[f"{name}_here_rows_s"] = B / time_steps(sae, steps, torch.float32)
        out[f"{name}_h100_on_paper_rows_s"] = B / bound(sae, flops, dec, H100_TFLOPS * 1e3, H100_TBPS * 1e3)
        del sae
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=str(ROOT / "data/activations/smollm2-135m_resid_post20"))
    parser.add_argument("--chunks", type=int, default=40, help="chunks of the store the loader entries read")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=24, help="batches timed per loader entry")
    parser.add_argument("--steps", type=int, default=2, help="training steps timed per architecture")
    parser.add_argument("--quick", action="store_true", help="loader entries only")
    parser.add_argument("--out", default=str(ROOT / "results/bench/data.json"))
    args = parser.parse_args(argv)
    if not is_store(args.store):
        sys.exit(f"bench-data: error: {args.store} is not an activation store (make harvest preset=demo builds the "
                 "demo store; --store= another one)")
    src = ActivationStore(args.store)
    report: dict = {"store": args.store, "d": src.d_model, "batch": BATCH, "window_chunks": WINDOW,
                    "cores": cpu_cores(), "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(dir=Path(args.store).parent) as tmp:
        report["loader"] = loaders = measure_loaders(src, Path(tmp), args.chunks, args.rounds, args.batches)
    print(f"{'entry (d ' + str(src.d_model) + ', rows/s, median of ' + str(args.rounds) + ')':<56}{'rows/s':>12}")
    for name, value in loaders.items():
        if isinstance(value, float) and not name.startswith("ratio"):
            print(f"{name:<56}{value:>12,.0f}")
    print("ratios: medians of the ratios within each round")
    print(f"loader / previous loader (compressed, every core): {loaders['ratio_compressed_vs_previous']:.2f}x")
    print(f"loader / read+check+decode (compressed, every core): {loaders['ratio_compressed_vs_decode_all']:.2f}")
    print(f"loader / plain memory-mapped gather (uncompressed, every core): {loaders['ratio_mapped_vs_gather']:.2f}")
    print(f"loader from loopback S3 / from local disk (compressed, every core): {loaders['ratio_s3_vs_local']:.2f} "
          "(the server is moto's, in Python: a bound on it, not on S3)")
    print(f"loader from loopback S3, parallel ranges / whole-object reads: {loaders['ratio_s3_ranges_vs_whole']:.2f}x")
    print(f"loader from loopback S3 through a warm local cache / from local disk: "
          f"{loaders['ratio_s3_cached_vs_local']:.2f}")
    if not args.quick:
        report["memory"] = memory = measure_memory(src, args.batches)
        print("loader heap peak: " + ", ".join(f"{k.split('_')[-2]} chunks {v / 1e6:.0f} MB"
                                               for k, v in memory.items() if k.startswith("heap")) +
              f" (a window is {memory['window_bytes'] / 1e6:.0f} MB)")
        with tempfile.TemporaryDirectory(dir=Path(args.store).parent) as tmp:
            report["writer"] = writer = measure_writer(src, Path(tmp), min(args.chunks, 16), args.rounds)
        print(f"{'harvest writer ceiling (precomputed rows, d ' + str(src.d_model) + ')':<56}{'rows/s':>12}")
        for name, value in writer.items():
            if isinstance(value, float) and not name.startswith(("bytes", "lm")):
                print(f"{name:<56}{value:>12,.0f}")
        every = cpu_cores()
        for c in ("blosc_zstd", "none"):
            scaling = paired(writer["rounds"], f"{c}, {every} thread(s)", f"{c}, 1 thread(s)")
            writer[f"scaling_{c}"] = scaling
            per_core_768 = writer[f"{c}, 1 thread(s)"] * src.d_model / 768
            writer[f"cores_for_1M_tok_s_d768_{c}"] = 1e6 / per_core_768
            print(f"{c}: {every} threads / 1 thread = {scaling:.2f}x; {writer[f'bytes per row, {c}']:.0f} bytes per "
                  f"row on disk; 1M tokens/s at d 768 takes {1e6 / per_core_768:.1f} writer cores at this rate")
        print(f"the LM forward to block {src.layer} alone: {writer['lm_forward_tok_s']:,.0f} tokens/s")
        report["consumption"] = use = consumption(args.steps)
        for name in ("topk", "switch_n16"):
            here, h100 = use[f"{name}_here_rows_s"], use[f"{name}_h100_on_paper_rows_s"]
            print(f"{name}: a training step consumes {here:,.0f} rows/s here; on an H100 (on paper) {h100:,.0f} rows/s")
            for kind, per_core in loaders["per_core_rows_s"].items():
                cores = h100 / (per_core * src.d_model / 768)
                use[f"{name}_h100_cores_{kind}"] = cores
                print(f"    = {cores:.1f} loader cores at this machine's {kind} per-core rate (scaled to d 768)")
    write_results(args.out, report)


if __name__ == "__main__":
    main()
