"""eval.firings on hand-made stores and SAEs: what a scan keeps and reads, feature choice, top
firings, decile samples, windows."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from eval.firings import choose, deciles, scan, sequence_rows, top, values_at, window
from harvest.held_out import HeldOut
from train.saes.base import Codes


class Store:
    """The ActivationStore API over 6 sequences of 4 tokens (position 0 has no row: 3 rows each),
    2 sequences per chunk; chunk i's rows are rows[6 i : 6 i + 6]."""

    first_pos, context_size, chunk_rows = 1, 4, 6

    def __init__(self, rows: np.ndarray | None = None):
        self.rows = rows

    def read_chunk(self, i):
        return self.rows[6 * i : 6 * i + 6]

    def read_chunks(self, ids):
        return map(self.read_chunk, ids)

    def as_float(self, raw):
        return raw.astype(np.float32)

    def locate(self, row):
        return row // 3, 1 + row % 3

    def row_at(self, seq, pos):
        return 3 * seq + pos - 1

    def sequence(self, seq):
        return np.arange(24).reshape(6, 4)[seq] + 100


class Relu:
    """An SAE whose codes are relu(x): dense, M = d; or, sparse, the top-1 of relu(x)."""

    def __init__(self, d: int, sparse: bool):
        self.n_latents, self.sparse = d, sparse

    def split(self, rows):
        return rows, rows  # an autoencoder: it reads the row and reconstructs it

    def encode(self, x):
        z = x.relu()
        if not self.sparse:
            return Codes(dense=z)
        v, i = z.max(1, keepdim=True)
        return Codes(idx=i, vals=v)


def fake_run(sparse: bool, cut=None):
    """3 chunks of 6 rows, d = 4; chunks 0 and 2 held out; row 13 (in chunk 2) is an outlier."""
    x = np.random.default_rng(0).normal(size=(18, 4)).astype(np.float32)
    x[13] *= 100
    store = Store(x)
    return SimpleNamespace(store=store, sae=Relu(4, sparse), held=HeldOut(store, (0, 2), cut, None)), x


def expected(x: np.ndarray, rows: np.ndarray, sparse: bool) -> list[tuple[int, int, float]]:
    z = np.maximum(x[rows], 0)
    if sparse:
        z = np.where(z == z.max(1, keepdims=True), z, 0)
    return sorted((int(rows[r]), int(f), float(z[r, f])) for r, f in zip(*np.nonzero(z), strict=True))


@pytest.mark.parametrize("sparse", [False, True])
def test_scan_keeps_every_firing_of_the_rows_it_reads(sparse):
    run, x = fake_run(sparse, cut=50.0)
    cpu = torch.device("cpu")
    exact = scan(run, cpu, max_tokens=8, batch_size=4, whole_chunks=False)
    assert exact.seen.tolist() == [0, 1, 2, 3, 4, 5, 12, 14]  # the first 8 rows left after outlier 13
    triples = sorted(zip(exact.rows.tolist(), exact.latents.tolist(), exact.acts.tolist(), strict=True))
    assert triples == expected(x, exact.seen, sparse)
    assert exact.counts.tolist() == np.bincount(exact.latents, minlength=4).tolist()
    assert exact.latents.tolist() == sorted(exact.latents.tolist())
    for f in range(4):
        rows, acts = exact.of(f)
        assert rows.tolist() == sorted(r for r, g, _ in triples if g == f) and (acts > 0).all()

    whole = scan(run, cpu, max_tokens=7, batch_size=4, whole_chunks=True)  # 7 rows: two whole chunks
    assert whole.seen.tolist() == [0, 1, 2, 3, 4, 5, 12, 14, 15, 16, 17]
    assert len(scan(run, cpu, max_tokens=6, batch_size=4, whole_chunks=True).seen) == 6

    some = scan(run, cpu, max_tokens=100, batch_size=5, whole_chunks=False, only=[2, 0])
    assert set(some.latents.tolist()) <= {0, 2} and len(some.rows) == some.counts[[0, 2]].sum()
    assert some.counts.tolist() == whole.counts.tolist()  # every latent is counted
    none = scan(run, cpu, max_tokens=100, batch_size=5, whole_chunks=False, only=[])
    assert len(none.rows) == 0 and none.counts.tolist() == whole.counts.tolist()


def test_choose():
    counts = np.array([0, 5, 1, 9, 5, 2])
    assert choose(counts, [4, 1, 4], 1, 0) == [1, 4]
    assert choose(counts, "top_density", 3, 0) == [1, 3, 4]  # 9, then the 5s
    assert choose(counts, "top_density", 2, 0) == [1, 3]  # of the tied 5s the lower id
    assert choose(counts, "random", 9, 0) == [1, 2, 3, 4, 5]  # every alive latent
    assert choose(counts, "random", 9, 0, min_count=5) == [1, 3, 4]
    picks = {tuple(choose(counts, "random", 2, seed)) for seed in range(20)}
    assert len(picks) > 1 and all(len(p) == 2 and counts[list(p)].min() > 0 for p in picks)
    assert choose(counts, "random", 2, 3) == choose(counts, "random", 2, 3)
    assert choose(counts, "random", 2, 0, min_count=10) == []
    assert choose(None, [3, 0], 1, 0) == [0, 3]
    with pytest.raises(ValueError, match="pass the counts"):
        choose(None, "random", 1, 0)


def test_top_strongest_first_and_one_per_sequence():
    rows = np.array([0, 1, 2, 3, 6, 7])  # sequences 0, 0, 0, 1, 2, 2
    acts = np.array([5.0, 9.0, 5.0, 1.0, 3.0, 4.0], dtype=np.float32)
    assert top(Store(), rows, acts, 4).tolist() == [1, 0, 2, 5]  # ties in row order
    assert top(Store(), rows, acts, 9, one_per_sequence=True).tolist() == [1, 5, 3]
    assert top(Store(), rows, acts, 2, one_per_sequence=True).tolist() == [1, 5]


@pytest.mark.parametrize("m", [1, 3, 10, 13, 57])
def test_deciles_split_by_rank_and_sample_from_each(m):
    acts = np.random.default_rng(m).permutation(m).astype(np.float32) + 1
    parts = deciles(acts, 2, np.random.default_rng(0))
    assert len(parts) == 10
    ranked = np.concatenate([part for part, _ in parts])
    assert sorted(ranked.tolist()) == list(range(m)) and (np.diff(acts[ranked]) > 0).all()  # weakest first
    assert parts[-1][0][-1] == acts.argmax()  # the strongest is always in decile 10
    assert [len(p) for p, _ in parts] == [m * (d + 1) // 10 - m * d // 10 for d in range(10)]
    for part, pick in parts:
        assert len(pick) == min(2, len(part)) and set(pick) <= set(part) and len(set(pick)) == len(pick)
    among = np.arange(0, m, 2)
    kept = np.concatenate([part for part, _ in deciles(acts, 1, np.random.default_rng(0), among=among)])
    assert sorted(kept.tolist()) == among.tolist()


def test_windows_stay_in_their_sequence():
    store = Store()
    ids, rows, center = window(store, 4, 5, 1)  # sequence 1, position 2
    assert ids.tolist() == [104, 105, 106, 107] and rows.tolist() == [-1, 3, 4, 5] and center == 2
    ids, rows, center = window(store, 6, 1, 1)  # sequence 2, position 1
    assert ids.tolist() == [108, 109, 110] and rows.tolist() == [-1, 6, 7] and center == 1
    assert sequence_rows(store, 2).tolist() == [6, 7, 8]
    f_rows, f_acts = np.array([2, 4, 5]), np.array([5.0, 3.0, 1.0], dtype=np.float32)
    assert values_at(np.array([-1, 2, 3, 4, 5, 9]), f_rows, f_acts).tolist() == [0.0, 5.0, 0.0, 3.0, 1.0, 0.0]
    assert values_at(np.array([-1, 2]), f_rows[:0], f_acts[:0]).tolist() == [0.0, 0.0]
