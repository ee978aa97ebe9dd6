"""`make bench-loader`: can the loader feed the trainer, and does its memory stay flat as stores grow?

Measured in one run on the demo store (d = 576), batch 8192:
  1. rows/s the loader delivers (shuffled windows, background read-ahead, float16 -> float32);
  2. rows/s the trainer consumes: full training steps of `topk` and width-matched `switch` (N = 8);
  3. peak RSS of a short training run (a fresh process each) on a store of S chunks and on one of
     4 S chunks, both copied from the demo store.

    python -m bench.loader [--store data/activations/smollm2-135m_resid_post20] [--chunks 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import copy_store, write_results
from harvest.held_out import split_chunks
from harvest.store import ActivationStore
from train.loader import Batches

ROOT = Path(__file__).resolve().parents[1]


def loader_rate(store: ActivationStore, batch: int, n_batches: int) -> float:
    train_ids, _ = split_chunks(store.n_chunks, 0.05)
    it = iter(Batches(store, train_ids, batch, seed=0, window_chunks=8))
    next(it)  # the first window's read is not overlapped with anything
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch / (time.perf_counter() - t0)


def trainer_rate(store: Path, model: list[str], steps: int) -> tuple[float, int]:
    """(rows/s over the logged steps, peak RSS in bytes) of `python -m train` in a fresh process."""
    with tempfile.TemporaryDirectory() as run:
        cmd = [sys.executable, "-c", _RUN, str(store), run, str(steps), *model]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
        return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


# Trains in-process (no Hydra output folders), then prints [rows/s after the first step, peak RSS].
_RUN = """
import json, resource, sys
from pathlib import Path
from runtime.config import compose_app
from train.config import TrainConfig
from train.loop import train
from train.run_dir import RunDir
store, run, steps, *model = sys.argv[1:]
cfg = TrainConfig.from_omegaconf(compose_app('train', [f'data.store={store}', f'budget=steps:{steps}', 'batch_size=8192',
                                                       'log_every=1', 'progress=false', f'checkpoint_every={10**9}',
                                                       *model]))
train(cfg, Path(run))
rates = [r['tokens_per_s'] for r in RunDir(run).read_metrics()][1:]
print(json.dumps([sum(rates) / len(rates), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="data/activations/smollm2-135m_resid_post20")
    parser.add_argument("--chunks", type=int, default=20,
                        help="chunks of the small store (the large one has 4x; at least 20, so that the default "
                             "data.eval_frac holds one out)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per measurement")
    parser.add_argument("--out", default="results/bench/loader.json")
    args = parser.parse_args()
    src = ActivationStore(args.store)
    batch = 8192
    report: dict = {"store": args.store, "d": src.d_model, "batch": batch, "threads": torch.get_num_threads()}
    report["loader_rows_s"] = loader_rate(src, batch, n_batches=20)
    print(f"loader: {report['loader_rows_s']:,.0f} rows/s (batch {batch}, shuffled windows of 8 chunks)")
    for name, model in [("topk", ["model=topk"]), ("switch", ["model=switch", "model.n_experts=8"])]:
        rate, _ = trainer_rate(Path(args.store), model, args.steps)
        report[f"trainer_rows_s_{name}"] = rate
        print(f"trainer {name:<7} (width 24576, k 64): {rate:,.0f} rows/s consumed "
              f"-> loader / trainer = {report['loader_rows_s'] / rate:.1f}x")
    with tempfile.TemporaryDirectory(dir=Path(args.store).parent) as tmp:
        for n in (args.chunks, 4 * args.chunks):
            path = copy_store(src, Path(tmp) / f"s{n}", [i % src.n_chunks for i in range(n)]).path
            _, rss = trainer_rate(path, ["model=topk", "model.width=4096", "data.window_chunks=4"], args.steps)
            raw_gb = n * src.chunk_rows * src.d_model * 2 / 1e9
            report[f"peak_rss_bytes_{n}_chunks"] = rss
            print(f"peak RSS training on {n:>4} chunks ({raw_gb:.2f} GB of activations): {rss / 1e9:.2f} GB")
    write_results(args.out, report)


if __name__ == "__main__":
    main()
