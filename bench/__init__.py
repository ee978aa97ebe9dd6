"""Benchmarks (`make bench`, `bench-dist`, `bench-loader`, `bench-harvest`, `bench-validation`, `bench-data`,
`bench-stream`, `gpu-check`): each prints ratios
measured side by side in one run and writes its numbers as JSON under results/bench/.

    harvest_speed   tokens/s of forward-to-block vs harvest vs full forward, codecs
    train_step      training step time of TopK / Switch / the reference algorithm vs roofline
    dist            expert-parallel vs one-process Switch tokens/s, all-to-all bytes vs the minimum
    loader          batches/s of the loader vs the trainer's consumption, peak memory
    data            the data path side by side: loader (compressed, memory-mapped), its bounds, the harvest
                    writer, the LM, training consumption here and on an H100 on paper
    gpu_check       on a CUDA machine: the cuda tests, step times fp32/bf16, GPU wait for data, a GPU harvest
    validation      wall-clock of training with vs without validation, at the demo's settings
    stream          training tokens/s straight from the LM (data.source=stream) vs from the cached store

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


def store_like(src, dest: str | Path, n_chunks: int, codec_name: str | None = None):
    """An empty store at `dest` with src's layout for n_chunks chunks and src's codec (or `codec_name`):
    its StoreWriter. (harvest.store is imported here, not at the top: `import bench` stays light.)"""
    import dataclasses

    from harvest.store import StoreWriter, codec

    config = src.harvest_config
    compressors = codec(codec_name, 1) if codec_name else codec(config["codec"], config["codec_level"])
    meta = {"model": src.model, "layer": src.layer, "site": src.site, "config": config, "tokenizer": src.tokenizer_name}
    return StoreWriter.create(dest, dataclasses.replace(src.layout, n_chunks=n_chunks), compressors, meta)


def copy_store(src, dest: str | Path, ids: list[int], codec_name: str | None = None):
    """A store at `dest` holding src's chunks `ids` in that order (repeats allowed), with src's codec or
    `codec_name`: an ActivationStore."""
    import numpy as np

    from harvest.store import ActivationStore

    writer = store_like(src, dest, len(ids), codec_name)
    for k, i in enumerate(ids):
        writer.write_chunk(k, np.array(src.read_chunk_raw(i)), src.sequences_of([i], src.chunk_seqs), {})
    return ActivationStore(dest)
