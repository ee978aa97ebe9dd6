"""Benchmarks (`make bench`, `bench-dist`, `bench-loader`, `bench-harvest`, `bench-validation`, `bench-data`,
`gpu-check`): each prints ratios
measured side by side in one run and writes its numbers as JSON under results/bench/.

    harvest_speed   tokens/s of forward-to-block vs harvest vs full forward, codecs
    train_step      training step time of TopK / Switch / the reference algorithm vs roofline
    dist            expert-parallel vs one-process Switch tokens/s, all-to-all bytes vs the minimum
    loader          batches/s of the loader vs the trainer's consumption, peak memory
    data            the data path side by side: loader (compressed, memory-mapped), its bounds, the harvest
                    writer, the LM, training consumption here and on an H100 on paper
    gpu_check       on a CUDA machine: the cuda tests, step times fp32/bf16, GPU wait for data, a GPU harvest
    validation      wall-clock of training with vs without validation, at the demo's settings

They sit above the stages and import them; no stage imports a benchmark.
"""

import json
from pathlib import Path
from typing import Any

import runtime  # noqa: F401  (reproducibility settings before torch loads)
from runtime.config import CONF

# The load-balancing weight of conf/train/model/switch.yaml, for the Switch modules built directly.
SWITCH_ALPHA = float(__import__("omegaconf").OmegaConf.load(CONF / "train" / "model" / "switch.yaml").alpha)


def write_results(path: str | Path, results: Any) -> Path:
    """Write a benchmark's results as indented JSON (folders created) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(f"written: {path}")
    return path
