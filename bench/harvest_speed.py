"""`make bench-harvest`: how close the harvest runs to the forward pass it cannot avoid.

Measured in one run, on the demo model and corpus, with the same token sequences:
  (a) forward to the hooked block only (the harvest's floor),
  (b) the full harvest: text -> forward -> float16 -> compressed zarr chunks, committed,
  (c) a full-depth forward with a hook (what a naive harvester does).
Then the store codecs on the harvested activations: compression ratio, write and read MB/s.

    python -m bench.harvest_speed [--rounds 5] [--out results/bench/harvest.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from bench import write_results
from harvest import lm, store, text
from harvest.config import HarvestConfig
from harvest.run import harvest
from runtime.config import compose_app
from runtime.device import autocast, pick_device, pick_dtype

ROOT = Path(__file__).resolve().parents[1]


def _demo_config(overrides: list[str]) -> HarvestConfig:
    return HarvestConfig.from_omegaconf(compose_app("harvest", ["preset=demo", *overrides]))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _codec_table(acts: np.ndarray, tmp: Path) -> list[dict]:
    """Write the same float16 rows with each codec; ratio, write MB/s, whole-chunk read MB/s."""
    rows = []
    chunk = 64 * 127
    for name, level in [("none", 0), ("zstd", 1), ("zstd", 3), ("blosc_zstd", 1), ("blosc_zstd", 3), ("blosc_zstd", 9)]:
        path = tmp / f"codec-{name}-{level}"
        arr = zarr.create_array(str(path), shape=acts.shape, chunks=(chunk, acts.shape[1]), dtype="float16",
                                compressors=store.codec(name, level), fill_value=0)
        t0 = time.perf_counter()
        arr[:] = acts
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(0, len(acts), chunk):
            arr[i : i + chunk]
        read_s = time.perf_counter() - t0
        on_disk = arr.nbytes_stored()  # the chunks and the array's metadata (under 1 KB)
        mb = acts.nbytes / 1e6
        rows.append({"codec": name, "level": level, "ratio": acts.nbytes / on_disk,
                     "write_MBps": mb / write_s, "read_MBps": mb / read_s})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of (a), (b), (c), in alternating order")
    parser.add_argument("--out", default="results/bench/harvest.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        cfg = _demo_config(["progress=false", f"model={ROOT / 'data/models/smollm2-135m'}",
                            f"dataset.name={ROOT / 'data/corpus/offline.jsonl'}"])
        # each round: 2 chunks of 32 sequences x 128 tokens (so one write overlaps a forward, as in a long run)
        cfg = dataclasses.replace(cfg, chunk_seqs=cfg.batch_size)
        cfg = dataclasses.replace(cfg, tokens=2 * cfg.chunk_rows)
        device = pick_device(cfg.device)
        dtype = getattr(torch, pick_dtype(cfg.dtype, device))
        model, tokenizer = lm.load_lm(cfg.model, device)  # full depth, for (c)
        truncated, _ = lm.load_lm(cfg.model, device, keep_layers=cfg.layer + 1)  # as the harvest loads it, for (a)
        packer = text.Packer(text.iter_documents(cfg.dataset, cfg.seed), tokenizer, cfg.context_size,
                             text.separator_id(tokenizer, cfg.dataset.separator))
        seqs = torch.from_numpy(packer.take(2 * cfg.chunk_seqs)).to(device)  # the chunks the harvest writes
        batches = list(lm.iter_batches(seqs, cfg.batch_size))
        print(f"device {device}, dtype {str(dtype).removeprefix('torch.')}, threads {torch.get_num_threads()}, "
              f"layer {cfg.layer} of {lm.n_layers(model.config)}, {len(batches)} batches of {cfg.batch_size} x "
              f"{cfg.context_size}, {args.rounds} rounds")

        reader = lm.SiteReader(truncated, cfg.layer, cfg.site, dtype)
        module = lm.site_module(model, cfg.layer, cfg.site)

        @torch.inference_mode()
        def full_forward():  # the naive harvester: whole model, logits included, hook keeps the site
            kept = []
            handle = module.register_forward_hook(lambda m, a, out: kept.append(out))
            with autocast(device, dtype):
                for b in batches:
                    model(input_ids=b, use_cache=False)
            handle.remove()

        def stop_forward():
            for b in batches:
                reader(b)

        stop_forward(), full_forward()  # warm-up
        times: dict[str, list[float]] = {"a": [], "b": [], "c": []}
        results = []
        for r in range(args.rounds):
            for key in ("abc" if r % 2 == 0 else "cba"):
                if key == "a":
                    times["a"].append(_timed(stop_forward))
                elif key == "c":
                    times["c"].append(_timed(full_forward))
                else:  # loads its own truncated model; result.seconds counts the chunk loop only
                    result = harvest(dataclasses.replace(cfg, store=str(tmp / f"store{r}")))
                    times["b"].append(result.seconds)
                    results.append(result)
            print(f"round {r + 1}: (a) {times['a'][-1]:.1f} s  (b) {times['b'][-1]:.1f} s  (c) {times['c'][-1]:.1f} s")
        s = store.ActivationStore(results[-1].store)
        raw = s.n_rows * s.d_model * 2
        write_mbps = raw * len(results) / 1e6 / sum(r.write_seconds for r in results)
        ratio = raw / s.stored_bytes("acts")
        acts = np.concatenate([store.ActivationStore(r.store).acts[:] for r in results])
        codecs = _codec_table(acts, tmp)

    n_tok = seqs.numel()
    rate = {k: n_tok / statistics.median(v) for k, v in times.items()}
    # this machine's speed drifts by up to 2x over tens of seconds: ratios are taken within each round
    b_over_a = statistics.median(a / b for a, b in zip(times["a"], times["b"], strict=True))
    a_over_c = statistics.median(c / a for a, c in zip(times["a"], times["c"], strict=True))
    report = {
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "model": cfg.model, "layer": cfg.layer, "n_layers": s.n_layers, "rounds": args.rounds,
        "tokens_per_round": n_tok, "seconds": times,
        "forward_to_block_tok_s": rate["a"], "harvest_tok_s": rate["b"], "full_forward_hook_tok_s": rate["c"],
        "harvest_over_forward_to_block": b_over_a, "stop_speedup_over_full": a_over_c,
        "store_codec": f"{cfg.codec}:{cfg.codec_level}", "store_write_MBps": write_mbps, "store_ratio": ratio,
        "codecs": codecs,
    }
    print(f"\nmedians of {args.rounds} rounds, {n_tok} tokens each (the harvest stores {s.n_rows}: position 0 excluded);")
    print("ratios are medians of the ratios within each round")
    print(f"(a) forward to block {cfg.layer}        {rate['a']:8.0f} tok/s")
    print(f"(b) full harvest to zarr         {rate['b']:8.0f} tok/s   (b)/(a) = {b_over_a:.3f}  [target >= 0.90]")
    print(f"(c) full-depth forward + hook    {rate['c']:8.0f} tok/s   (a)/(c) = {a_over_c:.2f}   [target >= 1.30]")
    print(f"store ({cfg.codec} level {cfg.codec_level}): write {write_mbps:.0f} MB/s (writer thread, beside the forward), "
          f"compression ratio {ratio:.3f}")
    print(f"\ncodecs on the same {len(acts)} rows (alone, no forward running):")
    print("codec        level  ratio  write MB/s  read MB/s")
    for c in codecs:
        print(f"{c['codec']:<12} {c['level']:>5}  {c['ratio']:5.3f}  {c['write_MBps']:10.0f}  {c['read_MBps']:9.0f}")
    print()
    write_results(args.out, report)


if __name__ == "__main__":
    main()
