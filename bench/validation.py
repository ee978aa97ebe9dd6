"""`make bench-validation`: what validation during training costs, at the demo's settings.

Trains the same runs (TopK and Switch N=8 at width 2048 on the demo store, with the shared training
settings of conf/demo/demo.yaml: its budget, batch, k and validation) with the demo's validation and
without, alternating within each round, and prints the wall-clock ratio of each pair: ratios are
taken side by side because this machine's speed drifts. Writes results/bench/validation.json.

    python -m bench.validation [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench import write_results
from harvest.store import is_store
from runtime.config import compose_app
from train.config import TrainConfig
from train.loop import train

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"topk": ["model=topk", "model.width=2048"],
          "switch N=8": ["model=switch", "model.n_experts=8", "model.width=2048"]}


def timed_run(model: list[str], validation: bool) -> float:
    """Seconds of one training run with the demo's settings (conf/demo/demo.yaml `train`), with its
    validation or without, in a fresh folder (the store is already on disk)."""
    shared = list(compose_app("demo", []).train)
    cfg = TrainConfig.from_omegaconf(compose_app("train", [*shared, *model, "progress=false",
                                                           *([] if validation else ["eval_every=0"])]))
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        train(cfg, Path(tmp))
        return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "results" / "bench" / "validation.json"))
    args = parser.parse_args()
    if not is_store(compose_app("train", []).data.store):
        raise SystemExit("bench-validation: error: no demo store (make demo, or make harvest preset=demo, builds it)")
    settings = " ".join(compose_app("demo", []).train)
    rows = []
    for name, model in MODELS.items():
        pairs = [(timed_run(model, False), timed_run(model, True)) for _ in range(args.rounds)]
        ratio = statistics.median(b / a for a, b in pairs)
        rows.append({"model": name, "settings": settings, "seconds_without": [a for a, _ in pairs],
                     "seconds_with": [b for _, b in pairs], "ratio_with_over_without": ratio})
        print(f"{name:<12} without validation {statistics.median(a for a, _ in pairs):.1f} s, with "
              f"{statistics.median(b for _, b in pairs):.1f} s: {ratio:.3f}x")
    print(f"settings (conf/demo/demo.yaml): {settings}")
    write_results(args.out, rows)


if __name__ == "__main__":
    main()
