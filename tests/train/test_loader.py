"""train.loader: held-out split, every training row once per epoch, exact restart at any step."""

import numpy as np
import pytest
import torch

from harvest.run import harvest
from harvest.store import ActivationStore, StoreWriter, split_chunks
from tests.conftest import compose, harvest_overrides
from train.loader import Batches, eval_rows, norm_cut


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


def test_chunks_read_as_zarr_wrote_them_with_every_codec(store):
    """The store decodes chunk files itself (after checking them): the rows zarr's own reader gives."""
    raw = store.read_chunk_raw(3)
    assert raw.dtype == store.acts.dtype and raw.shape == (30, store.d_model)
    np.testing.assert_array_equal(raw, store.acts[90:120])


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


def test_outlier_rows_are_replaced_in_training_and_dropped_in_eval(tmp_path):
    from tests.train.test_loop import synthetic_store

    store = ActivationStore(synthetic_store(tmp_path / "s", n_chunks=10, d=8))
    rows = np.concatenate([store.read_chunk(i) for i in range(10)])
    norms = np.linalg.norm(rows, axis=1)
    cut = norm_cut(store, 10.0)
    assert cut == pytest.approx(10 * np.median(np.linalg.norm(store.read_chunk(0), axis=1)))
    assert norms.max() < cut  # no outliers yet: plant some by rewriting two chunks
    big = store.read_chunk(2)
    big[[0, 5, 7]] *= 100
    writer = StoreWriter.attach(tmp_path / "s", store.layout, 0)  # through the writer: checksums recorded
    writer.rewrite_chunk(2, big.astype(np.float16), store.sequences_of([2], store.chunk_seqs))
    store = ActivationStore(tmp_path / "s")
    train, held = split_chunks(10, 0.5)  # chunk 2 is a training chunk
    assert 2 in train
    stream = iter(Batches(store, train, batch_size=32, seed=0, window_chunks=5, cut=cut))
    served = torch.cat([next(stream) for _ in range(len(train) * store.chunk_rows // 32)])
    assert served.norm(dim=1).max() < cut and len(served) == (len(train) * store.chunk_rows // 32) * 32
    plain = iter(Batches(store, train, batch_size=32, seed=0, window_chunks=5))
    assert torch.cat([next(plain) for _ in range(len(train) * store.chunk_rows // 32)]).norm(dim=1).max() > cut
    counts = {}
    kept = torch.cat(list(eval_rows(store, [2, 3], cut=cut, counts=counts)))
    assert counts == {"read": 2 * store.chunk_rows, "dropped": 3} and len(kept) == 2 * store.chunk_rows - 3
