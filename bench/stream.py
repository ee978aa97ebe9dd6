"""`make bench-stream`: what training without a cache costs, against training on the cached store.

At the demo's settings (SmolLM2-135M block 20 for the stream, the demo store for the cache, batch
2048, k 32, width 1024), in rounds of alternating order, one process each time:
  - training tokens/s on the demo store (`data.source=store`), TopK and Switch N 4;
  - the same runs with `data.source=stream` (the LM runs inside training, `data.stream='preset=demo'`);
  - the LM alone: tokens/s of `harvest.stream` chunks (packing, forward to the site, rows as stored);
tokens/s is the steady rate: tokens over seconds of the steps after the first shuffle window (whose
rows the stream makes before training starts), from the per-step log (validation off); the stream's
held-out harvest at the start of a run is not counted either. The LM's share of a streaming step
is 1 - (streaming rate / cached rate): the time the SAE would not have waited for with a cache.

    python -m bench.stream [--steps 16] [--rounds 2] [--shuffle-tokens 8128]   -> results/bench/stream.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import write_results
from harvest.config import HarvestConfig
from harvest.store import is_store
from harvest.stream import TRAIN, StreamLM
from runtime.cli import compose_checked
from runtime.config import compose_app
from train.config import TrainConfig
from train.loop import train

ROOT = Path(__file__).resolve().parents[1]
BATCH = 2048
DEMO = [f"batch_size={BATCH}", "model.k=32", "model.width=1024", "eval_every=0", "log_every=1", "progress=false",
        "data.eval_frac=0.1", "checkpoint_every=1000"]
ARCHS = {"topk": ["model=topk"], "switch4": ["model=switch", "model.n_experts=4"]}


def training_rate(overrides: list[str], folder: Path, skip: int) -> float:
    """Training tokens/s of a fresh run with these overrides: tokens over seconds of its steps after
    the first `skip`, from the per-step log."""
    train(TrainConfig.from_omegaconf(compose_app("train", overrides)), folder)
    rates = [json.loads(line)["tokens_per_s"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    steady = rates[skip:]
    return len(steady) * BATCH / sum(BATCH / r for r in steady)


def lm_rate(stream: str, chunks: int = 2) -> float:
    """Tokens/s of the stream's LM alone: chunks of training text packed, run to the site, stored dtype."""
    source = StreamLM.load(HarvestConfig.from_omegaconf(compose_checked("harvest", stream.split())))
    it = source.chunks(TRAIN, 10)
    it.next()  # warm-up
    t0 = time.perf_counter()
    for _ in range(chunks):
        it.next()
    return chunks * source.layout.chunk_rows / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=str(ROOT / "data/activations/smollm2-135m_resid_post20"))
    parser.add_argument("--stream", default="preset=demo", help="data.stream: harvest overrides of the LM")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shuffle-tokens", type=int, default=8128, help="data.shuffle_tokens of the streaming runs")
    parser.add_argument("--out", default=str(ROOT / "results/bench/stream.json"))
    args = parser.parse_args(argv)
    if not is_store(args.store):
        sys.exit(f"bench-stream: error: {args.store} is not an activation store (make harvest preset=demo builds it)")
    common = [*DEMO, f"budget=steps:{args.steps}"]
    sources = {"cached": [f"data.store={args.store}"],
               "stream": ["data.source=stream", f"data.stream='{args.stream}'",
                          f"data.shuffle_tokens={args.shuffle_tokens}", "data.held_out_tokens=8128"]}
    runs: dict[str, list[float]] = {f"{a}, {s}": [] for a in ARCHS for s in sources}
    with tempfile.TemporaryDirectory() as tmp:
        k = 0
        for r in range(args.rounds):
            for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
                arch, source = name.split(", ")
                k += 1
                skip = -(-args.shuffle_tokens // BATCH)  # the first window's steps
                runs[name].append(training_rate([*common, *ARCHS[arch], *sources[source]], Path(tmp) / str(k), skip))
                print(f"round {r + 1}: {name}: {runs[name][-1]:,.0f} tokens/s", flush=True)
    lm = lm_rate(args.stream)
    report = {"steps": args.steps, "rounds": runs, "lm_alone_tokens_s": lm,
              **{name: statistics.median(v) for name, v in runs.items()}}
    print(f"{'training tokens/s (median of rounds)':<40}{'cached':>12}{'stream':>12}{'stream/cached':>15}{'LM share':>10}")
    for arch in ARCHS:
        ratios = [s / c for s, c in zip(runs[f"{arch}, stream"], runs[f"{arch}, cached"], strict=True)]
        ratio = statistics.median(ratios)
        report[f"{arch}_stream_over_cached"] = ratio
        print(f"{arch:<40}{report[f'{arch}, cached']:>12,.0f}{report[f'{arch}, stream']:>12,.0f}{ratio:>15.3f}"
              f"{1 - ratio:>10.0%}")
    print(f"the LM alone (packing + forward to the site): {lm:,.0f} tokens/s")
    write_results(args.out, report)


if __name__ == "__main__":
    main()
