"""`make bench-store`: what checking every chunk against its checksum costs when reading a store.

Copies a store's chunks into a fresh store (format version 2, CRC-32 recorded per chunk file) and
reads every chunk of both, alternating within each round: the copy with its checksum check, the
original as it is read (a version-1 store: no record to check), and the original through zarr's own
reader (how stores were read before checksums). Prints ms per chunk; writes results/bench/store_read.json.

    python -m bench.store_read [--store data/activations/smollm2-135m_resid_post20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


from bench import copy_store, write_results
from harvest.store import ActivationStore


def per_chunk_ms(read, n: int) -> float:
    t = time.perf_counter()
    for i in range(n):
        read(i)
    return (time.perf_counter() - t) / n * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="data/activations/smollm2-135m_resid_post20")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="results/bench/store_read.json")
    args = parser.parse_args()
    src = ActivationStore(args.store)
    L, C = src.layout, src.chunk_rows
    with tempfile.TemporaryDirectory(dir=Path(args.store).parent) as tmp:
        checked = copy_store(src, Path(tmp) / "checked", list(range(L.n_chunks)), "blosc_zstd")
        chunk_mb = checked.stored_bytes() / L.n_chunks / 1e6
        readers = {"checked (crc32 + size)": checked.read_chunk_raw, "unchecked (version 1)": src.read_chunk_raw,
                   "zarr's reader": lambda i: src.acts[i * C : (i + 1) * C]}
        times: dict[str, list[float]] = {name: [] for name in readers}
        for _ in range(args.rounds):
            for name, read in readers.items():
                times[name].append(per_chunk_ms(read, L.n_chunks))
    print(f"{L.n_chunks} chunks of {C} rows x {L.d_model} ({chunk_mb:.1f} MB compressed), {args.rounds} rounds:")
    result = {name: statistics.median(t) for name, t in times.items()}
    for name, ms in result.items():
        print(f"  {name:24s} {ms:6.1f} ms/chunk (median; rounds: {', '.join(f'{t:.1f}' for t in times[name])})")
    ratio = result["checked (crc32 + size)"] / result["zarr's reader"]
    print(f"checked / zarr's reader: {ratio:.2f}x")
    write_results(args.out, {"ms_per_chunk": result, "rounds": times, "checked_over_zarr": ratio})


if __name__ == "__main__":
    main()
