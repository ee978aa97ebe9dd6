"""What only a GPU can show (marked `cuda`: skipped here, run by `make gpu-check` on a machine with one):
the loader's pinned-memory, side-stream path delivers exactly the CPU path's batches, training runs on
the device fed by it, and a harvest on the GPU writes a store whose rows match the CPU's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from harvest.run import harvest
from harvest.held_out import norm_cut, split_chunks
from harvest.store import ActivationStore
from tests.conftest import compose, harvest_overrides
from tests.train.test_loader import random_store
from train.loader import Batches

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("codec_name,acts_dtype", [("blosc_zstd", "float16"), ("none", "float16"), ("none", "bfloat16")])
@pytest.mark.parametrize("start", [0, 9])
def test_cuda_batches_equal_cpu_batches(tmp_path, codec_name, acts_dtype, start):
    store = random_store(tmp_path / "s", codec_name, acts_dtype)
    train, _ = split_chunks(store.n_chunks, 0.25)
    cut = norm_cut(store, 10.0)
    cpu = iter(Batches(store, train, 40, 5, 4, start_step=start, cut=cut))
    gpu = iter(Batches(store, train, 40, 5, 4, start_step=start, cut=cut, device="cuda"))
    for s in range(25):
        got = next(gpu)
        assert got.device.type == "cuda" and got.dtype == torch.float32
        torch.testing.assert_close(got.cpu(), next(cpu), rtol=0, atol=0, msg=f"batch {start + s}")


def test_a_batch_kept_by_the_trainer_is_not_overwritten(tmp_path):
    """The pinned staging buffers are reused; the device batches handed out never are."""
    store = random_store(tmp_path / "s", "none", "float16")
    train, _ = split_chunks(store.n_chunks, 0.25)
    batches = iter(Batches(store, train, 40, 5, 4, device="cuda"))
    held = [next(batches) for _ in range(20)]
    copies = [b.clone() for b in held]
    for _ in range(20):
        next(batches)
    torch.cuda.synchronize()
    for a, b in zip(held, copies):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_training_on_cuda_fed_by_the_loader(tmp_path):
    from tests.train.test_loop import make_cfg, synthetic_store
    from train.loop import train

    store = synthetic_store(tmp_path / "s", n_chunks=12)
    cfg = make_cfg(store, "budget=steps:40", "device=cuda", "model=switch", "model.n_experts=4", "model.width=64",
                   "model.k=4", "eval_every=20", "log_every=10")
    train(cfg, tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 40 and all(np.isfinite(line["loss"]) for line in lines)
    first, last = lines[0]["loss"], lines[-1]["loss"]
    assert last < first  # it learns


def test_harvest_on_cuda_matches_cpu(tiny_gpt2, corpus_jsonl, tmp_path):
    for device in ("cpu", "cuda"):
        harvest(compose(harvest_overrides(tiny_gpt2, corpus_jsonl, tmp_path / device, device=device)))
    cpu, gpu = ActivationStore(tmp_path / "cpu"), ActivationStore(tmp_path / "cuda")
    assert gpu.n_rows == cpu.n_rows
    np.testing.assert_array_equal(gpu.tokens[:], cpu.tokens[:])
    np.testing.assert_allclose(gpu.acts[:].astype(np.float32), cpu.acts[:].astype(np.float32), rtol=2e-2, atol=2e-2)
