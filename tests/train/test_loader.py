"""train.loader: held-out split, every training row once per epoch, exact restart at any step."""

import mmap

import numpy as np
import pytest
import torch

from harvest.run import harvest
from harvest.held_out import HeldOut, norm_cut, split_chunks
from harvest.store import ActivationStore, StoreWriter
from tests.conftest import compose, harvest_overrides
from train.loader import Batches


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
    rows = torch.cat(list(HeldOut(store, tuple(held), None, None).rows()))
    np.testing.assert_array_equal(rows.numpy(), np.concatenate([store.read_chunk(i) for i in held]))
    assert len(torch.cat(list(HeldOut(store, tuple(held), None, None).rows(max_rows=40)))) == 40


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
    kept = torch.cat(list(HeldOut(store, (2, 3), cut, 10.0).rows(counts=counts)))
    assert counts == {"read": 2 * store.chunk_rows, "dropped": 3} and len(kept) == 2 * store.chunk_rows - 3


# ---------------------------------------------------------------------------------------------------
# The parallel and memory-mapped paths against the stream spelled out in plain numpy


def reference_batches(store, chunk_ids, batch_size, seed, window_chunks, cut=None):
    """The stream as train/loader.py defines it, one window at a time in plain numpy: every window's
    rows concatenated, permuted, outliers replaced by seeded rows of the window, cut into batches."""
    window_chunks = min(window_chunks, len(chunk_ids))
    n_windows = -(-len(chunk_ids) // window_chunks)
    pending = np.zeros((0, store.d_model), np.float32)
    for epoch in range(10**6):
        order = np.random.default_rng([seed, epoch]).permutation(chunk_ids)
        for w in range(n_windows):
            ids = order[w * window_chunks : (w + 1) * window_chunks]
            rows = np.concatenate([store.as_float(np.array(store.read_chunk_raw(i))) for i in ids])
            rng = np.random.default_rng([seed, epoch, w, 1])
            rows = rows[rng.permutation(len(rows))]
            if cut is not None:
                bad = np.linalg.norm(rows, axis=1) > cut
                if bad.any():
                    rows[bad] = rows[rng.choice(np.flatnonzero(~bad), size=int(bad.sum()))]
            pending = np.concatenate([pending, rows])
            while len(pending) >= batch_size:
                yield torch.from_numpy(pending[:batch_size])
                pending = pending[batch_size:]


def random_store(path, codec_name, acts_dtype, n_chunks=12, d=24, outliers_at=((2, 3), (2, 17), (5, 0), (7, 31))):
    """A store of random rows (chunks of 4 sequences x 16 rows) with a few planted huge rows."""
    from harvest.store import Layout, codec

    rng = np.random.default_rng(1)
    layout = Layout(d_model=d, context_size=17, first_pos=1, chunk_seqs=4, n_chunks=n_chunks, acts_dtype=acts_dtype)
    writer = StoreWriter.create(path, layout, codec(codec_name, 1), {"model": "random", "layer": 0, "site": "none",
                                                                     "config": {}})
    for i in range(n_chunks):
        rows = rng.normal(size=(layout.chunk_rows, d)).astype(np.float32) * 3
        for c, r in outliers_at:
            if c == i:
                rows[r] *= 1000
        stored = (torch.from_numpy(rows).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
                  if acts_dtype == "bfloat16" else rows.astype(np.float16))
        writer.write_chunk(i, stored, np.zeros((4, 17), dtype=np.int64), {})
    return ActivationStore(path)


@pytest.fixture(scope="module", params=[("blosc_zstd", "float16"), ("none", "float16"), ("zstd", "bfloat16"),
                                        ("none", "bfloat16")], ids=lambda p: "-".join(p))
def random(request, tmp_path_factory):
    return random_store(tmp_path_factory.mktemp("random") / "s", *request.param)


def test_only_uncompressed_stores_are_memory_mapped(random):
    assert random.mapped == (random.harvest_config == {} and random.stored_bytes() == random.n_rows * random.d_model * 2)


@pytest.mark.parametrize("threads,read_ahead", [(1, 0), (2, 1), (3, 3)])
@pytest.mark.parametrize("start", [0, 7, 23])
def test_batches_equal_the_plain_stream_on_every_path(random, threads, read_ahead, start):
    """Compressed (decoded into window buffers) and uncompressed (memory-mapped) stores, float16 and
    bfloat16, any threads and read-ahead, started mid-window and across epochs: the plain stream's batches."""
    train, _ = split_chunks(random.n_chunks, 0.25)  # 9 training chunks: windows of 4, 4, 1
    cut = norm_cut(random, 10.0)
    reference = reference_batches(random, train, 40, 5, 4, cut)
    expected = [next(reference) for _ in range(start + 30)][start:]  # 30 batches x 40 rows: two epochs
    fast = iter(Batches(random, train, 40, 5, 4, start_step=start, cut=cut, threads=threads, read_ahead=read_ahead))
    for s, want in enumerate(expected):
        torch.testing.assert_close(next(fast), want, rtol=0, atol=0, msg=f"batch {start + s}")
    assert max(b.norm(dim=1).max() for b in expected) < cut  # the planted rows were replaced


def test_uncompressed_chunks_are_memory_mapped_and_compressed_ones_decoded(random):
    raw = random.read_chunk_raw(3)
    out = np.empty_like(raw)
    assert random.read_chunk_raw(3, out=out) is out
    np.testing.assert_array_equal(out, raw)
    np.testing.assert_array_equal(out, random.acts[3 * random.chunk_rows : 4 * random.chunk_rows])
    base = raw
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(getattr(base, "obj", None), mmap.mmap) == random.mapped  # mapped: the page cache, no copy
    raw[0, 0] += 1  # writable, and (mapped privately) the file is untouched: the next read is intact
    np.testing.assert_array_equal(random.read_chunk_raw(3)[0], random.acts[3 * random.chunk_rows])


def test_the_parallel_chunk_reader_keeps_order(random):
    ids = [5, 0, 11, 3, 3, 8]
    for threads in (1, 2, 4):
        got = list(random.read_chunks(ids, threads=threads))
        assert len(got) == len(ids)
        for i, rows in zip(ids, got):
            np.testing.assert_array_equal(rows, random.read_chunk_raw(i))


@pytest.mark.parametrize("codec_name", ["none", "blosc_zstd"])
@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_chunk_is_named_on_every_read_path(tmp_path, codec_name, damage):
    """Batches (memory-mapped or decoded, read ahead by workers), the ordered reader and eval_rows name a
    truncated, altered or missing chunk in one line; a truncated file is never mapped (no bus error)."""
    from harvest.store import DamagedStore

    store = random_store(tmp_path / "s", codec_name, "float16")
    f = tmp_path / "s" / "acts" / "c" / "4" / "0"
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        f.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip":
        data[len(data) // 2] ^= 1
        f.write_bytes(bytes(data))
    else:
        f.unlink()
    store = ActivationStore(tmp_path / "s")
    readers = {
        "batches": lambda: [b for _, b in zip(range(20), Batches(store, list(range(12)), 40, 0, 4, threads=2))],
        "read_chunks": lambda: list(store.read_chunks([3, 4, 5], threads=2)),
        "the held-out rows": lambda: list(HeldOut(store, (4,), None, None).rows()),
        "norm_cut of chunk 4 read directly": lambda: store.read_chunk(4),
    }
    for name, read in readers.items():
        with pytest.raises(DamagedStore, match=r"^store .* is damaged: acts chunk 4 \(acts/c/4/0\) ") as e:
            read()
        assert "\n" not in str(e.value), name
