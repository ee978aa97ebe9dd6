"""harvest.store: running statistics, bfloat16 rows, and a harvested store's contents."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from harvest.held_out import split_chunks
from harvest.run import harvest
from harvest.store import ActivationStore, Layout, RunningStats, as_float
from tests.conftest import compose, harvest_overrides


def test_running_stats_merge_equals_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(1000, 7)).astype(np.float16)
    stats = RunningStats(7)
    for part in np.array_split(x, [1, 50, 333, 900]):
        stats.update(part)
    np.testing.assert_allclose(stats.mean, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.var, x.astype(np.float64).var(0), rtol=1e-10)
    again = RunningStats(7, **{k: v for k, v in stats.to_json().items()})
    assert again.n == 1000 and np.array_equal(again.m2, stats.m2)


def test_bfloat16_bits_round_trip():
    x = torch.randn(5, 3) * 1e6
    bits = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(as_float(bits, "bfloat16"), x.to(torch.bfloat16).float().numpy())


def test_store_round_trips_rows_tokens_contexts_and_statistics(tiny_gpt2, corpus_jsonl, tmp_path):
    cfg = compose(harvest_overrides(tiny_gpt2, corpus_jsonl, tmp_path / "s", tokens=100))
    harvest(cfg)
    s = ActivationStore(tmp_path / "s")
    a = s.attrs
    # 100 tokens round up to 4 chunks of 2 sequences x 15 rows (position 0 dropped)
    assert (a["n_tokens"], a["complete"], s.chunk_rows, s.n_chunks) == (120, True, 30, 4)
    assert (a["model"], a["layer"], a["site"], a["d_model"], a["context_size"]) == (str(tiny_gpt2), 2, "resid_post", 32, 16)
    assert a["tokenizer"] == str(tiny_gpt2) and a["config"]["tokens"] == 100 and a["config"]["dataset"]["name"] == str(corpus_jsonl)
    rows = np.concatenate([s.read_chunk(i) for i in range(s.n_chunks)]).astype(np.float64)
    np.testing.assert_allclose(s.mean, rows.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s.var, rows.var(0), rtol=1e-9, atol=1e-12)
    contexts = s.contexts[:]
    np.testing.assert_array_equal(s.tokens[:], contexts[:, 1:].reshape(-1))
    # every row is the activation of its context at its position, computed independently
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    with torch.no_grad():
        hidden = model(torch.from_numpy(contexts).long(), output_hidden_states=True).hidden_states[3]
    for row in [0, 14, 15, 61, 119]:
        ctx, pos = s.context(row)
        seq = row // 15
        np.testing.assert_array_equal(ctx, contexts[seq])
        np.testing.assert_allclose(rows[row], hidden[seq, pos].numpy(), rtol=2e-3, atol=2e-3)


def test_store_api_answers_every_fact_later_stages_need(tiny_gpt2, corpus_jsonl, tmp_path):
    cfg = compose(harvest_overrides(tiny_gpt2, corpus_jsonl, tmp_path / "s", tokens=100))
    harvest(cfg)
    s = ActivationStore(tmp_path / "s")
    assert (s.model, s.tokenizer_name, s.layer, s.site, s.d_model) == (str(tiny_gpt2), str(tiny_gpt2), 2, "resid_post", 32)
    assert (s.context_size, s.first_pos, s.rows_per_seq, s.chunk_seqs, s.acts_dtype) == (16, 1, 15, 2, "float16")
    assert s.identity() == {"path": str(tmp_path / "s"), "model": str(tiny_gpt2), "layer": 2, "site": "resid_post",
                            "d_model": 32, "context_size": 16, "first_pos": 1}
    assert s.harvest_config["tokens"] == 100 and split_chunks(s.n_chunks, 0.5) == ([0, 2], [1, 3])
    assert s.layout == Layout(d_model=32, context_size=16, first_pos=1, chunk_seqs=2, n_chunks=4, acts_dtype="float16")
    contexts = s.contexts[:]
    for row in [0, 14, 15, 61, 119]:
        seq, pos = s.locate(row)
        assert (seq, pos) == (row // 15, 1 + row % 15) and s.row_at(seq, pos) == row
        np.testing.assert_array_equal(s.sequence(seq), contexts[seq])
        assert s.tokens[row] == contexts[seq, pos]
    np.testing.assert_array_equal(s.sequences_of([1, 3], 3), contexts[[2, 3, 6]])


@pytest.mark.parametrize("codec_name", ["blosc_zstd", "zstd", "none"])
@pytest.mark.parametrize("acts_dtype", ["float16", "bfloat16"])
def test_the_writer_encodes_every_chunk_file_as_zarr_does(tmp_path, codec_name, acts_dtype):
    """StoreWriter encodes and writes chunk files itself (in parallel threads, CRC from the bytes it
    writes): every file is byte for byte what zarr's own writer makes for the same values, and zarr
    reads the store back."""
    import zarr

    from harvest.store import ARRAYS, StoreWriter, _create_arrays, codec, write_chunks

    rng = np.random.default_rng(0)
    layout = Layout(d_model=12, context_size=9, first_pos=1, chunk_seqs=3, n_chunks=4, acts_dtype=acts_dtype)
    floats = [(rng.normal(size=(24, 12)) * 5).astype(np.float32) for _ in range(4)]
    acts = [x.astype(np.float16) if acts_dtype == "float16" else
            torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16) for x in floats]
    seqs = [rng.integers(0, 500, size=(3, 9)) for _ in range(4)]
    writer = StoreWriter.create(tmp_path / "ours", layout, codec(codec_name, 1), {"model": "m", "layer": 0,
                                                                                  "site": "s", "config": {}})
    write_chunks(((writer, i, acts[i], seqs[i], {}) for i in range(4)), threads=3)
    theirs = zarr.open_group(str(tmp_path / "theirs"), mode="w-")
    _create_arrays(theirs, layout, codec(codec_name, 1))
    for i in range(4):
        theirs["acts"][24 * i : 24 * (i + 1)] = acts[i]
        theirs["tokens"][24 * i : 24 * (i + 1)] = seqs[i][:, 1:].reshape(-1)
        theirs["contexts"][3 * i : 3 * (i + 1)] = seqs[i]
    for name in ARRAYS:
        files = sorted(p.relative_to(tmp_path / "theirs") for p in (tmp_path / "theirs" / name).rglob("*")
                       if p.is_file() and p.name != "zarr.json")
        assert len(files) == 4
        for f in files:
            assert (tmp_path / "ours" / f).read_bytes() == (tmp_path / "theirs" / f).read_bytes(), f
    store = ActivationStore(tmp_path / "ours")
    np.testing.assert_array_equal(store.acts[:], np.concatenate(acts))
    assert store.complete and store.n_rows == 96
