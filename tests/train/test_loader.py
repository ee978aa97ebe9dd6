"""train.loader: held-out split, every training row once per epoch, exact restart at any step."""

import numpy as np
import pytest
import torch

from harvest.run import harvest
from harvest.store import ActivationStore
from tests.conftest import compose, harvest_overrides
from train.loader import Batches, eval_rows, split_chunks


@pytest.fixture(scope="module", params=["blosc_zstd", "none"])
def store(request, tiny_gpt2, corpus_jsonl, tmp_path_factory):
    path = tmp_path_factory.mktemp("loader") / "s"
    harvest(compose(harvest_overrides(tiny_gpt2, corpus_jsonl, path, tokens=600, codec=request.param)))
    return ActivationStore(path)  # 20 chunks of 30 rows


def test_split_holds_out_every_nth_chunk():
    train, held = split_chunks(20, 0.1)
    assert held == [9, 19] and len(train) == 18 and not set(train) & set(held)
    assert split_chunks(20, 0.0) == (list(range(20)), [])
    assert split_chunks(30, 0.1)[1] == [9, 19, 29]  # a grown store keeps its held-out chunks


def test_uncompressed_chunks_are_memory_mapped(store):
    raw = store.read_chunk_raw(3)
    assert isinstance(raw, np.memmap) == (store.acts.compressors == ())
    np.testing.assert_array_equal(np.asarray(raw), store.acts[90:120])


def test_an_epoch_serves_every_training_row_once_shuffled_and_none_held_out(store):
    train, held = split_chunks(store.n_chunks, 0.1)
    batches = iter(Batches(store, train, batch_size=45, seed=0, window_chunks=4))
    epoch = torch.cat([next(batches) for _ in range(len(train) * 30 // 45)])  # 540 rows = 12 batches
    expected = np.concatenate([store.read_chunk(i) for i in train])
    got = epoch.numpy()
    assert sorted(map(bytes, got)) == sorted(map(bytes, expected))  # a permutation of the training rows
    assert not np.array_equal(got, expected)  # ... and not in store order
    assert got.dtype == np.float32


@pytest.mark.parametrize("start", [1, 5, 13])
def test_restart_at_any_step_gives_the_same_batches(store, start):
    train, _ = split_chunks(store.n_chunks, 0.1)
    full = iter(Batches(store, train, batch_size=45, seed=3, window_chunks=4))
    reference = [next(full) for _ in range(start + 4)]  # crosses windows and the epoch boundary at 12
    resumed = iter(Batches(store, train, batch_size=45, seed=3, window_chunks=4, start_step=start))
    for s in range(start, start + 4):
        torch.testing.assert_close(next(resumed), reference[s], rtol=0, atol=0)


def test_eval_rows_are_the_held_out_chunks(store):
    _, held = split_chunks(store.n_chunks, 0.1)
    rows = torch.cat(list(eval_rows(store, held)))
    np.testing.assert_array_equal(rows.numpy(), np.concatenate([store.read_chunk(i) for i in held]))
    assert len(torch.cat(list(eval_rows(store, held, max_rows=40)))) == 40
