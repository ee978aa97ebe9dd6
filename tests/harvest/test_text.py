"""harvest.text: packing documents into fixed-length sequences, local sources, exact resume."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from harvest.config import DatasetConfig, HarvestError
from harvest.text import Packer, PackState, check_dataset, iter_documents, separator_id
from tests.conftest import documents


def _ds(name, **kw) -> DatasetConfig:
    base = dict(name=str(name), config=None, split="train", text_field="text", separator=None, packing="concat",
                shuffle_buffer=0)
    base.update(kw)
    return DatasetConfig(**base)


def test_packing_is_separator_plus_tokens_cut_without_padding(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    docs = documents(30)
    sep = separator_id(tok, None)
    seqs = Packer(docs, tok, 16, sep, tokenize_batch=7).take(1000)
    expected = np.concatenate([[sep] + tok(d, add_special_tokens=False).input_ids for d in docs])
    n = len(expected) // 16
    assert seqs.shape == (n, 16)  # ran out: only whole sequences, the tail is never padded
    np.testing.assert_array_equal(seqs.reshape(-1), expected[: n * 16])


def test_document_packing_puts_the_separator_only_at_position_0(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    docs = documents(30)
    sep = separator_id(tok, None)
    seqs = Packer(docs, tok, 16, sep, tokenize_batch=7, packing="document").take(1000)
    assert (seqs[:, 0] == sep).all() and not (seqs[:, 1:] == sep).any()
    expected = []
    for d in docs:  # each document gives its whole 15-token pieces; the tail is dropped
        ids = tok(d, add_special_tokens=False).input_ids
        expected += [ids[i : i + 15] for i in range(0, len(ids) - 14, 15)]
    np.testing.assert_array_equal(seqs[:, 1:], np.array(expected))


@pytest.mark.parametrize("packing", ["document", "concat"])
def test_resumed_packer_continues_exactly(tokenizer_dir, packing):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    docs = documents(60)
    full = Packer(docs, tok, 16, 0, packing=packing).take(120)
    first = Packer(docs, tok, 16, 0, packing=packing)
    a = first.take(37)
    state = PackState(first.state.docs_consumed, list(first.state.carry))
    b = Packer(docs, tok, 16, 0, state=state, packing=packing).take(83)
    np.testing.assert_array_equal(np.concatenate([a, b]), full)


def test_local_txt_jsonl_parquet_give_the_same_documents(tmp_path):
    docs = documents(12)
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(d)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    pq.write_table(pa.table({"body": docs}), tmp_path / "d.parquet")
    assert list(iter_documents(_ds(tmp_path / "txt"), 0)) == docs  # one document per .txt file
    assert list(iter_documents(_ds(tmp_path / "d.jsonl", text_field="body"), 0)) == docs
    assert list(iter_documents(_ds(tmp_path / "d.parquet", text_field="body"), 0)) == docs


def test_shuffle_is_seeded(corpus_jsonl):
    a = list(iter_documents(_ds(corpus_jsonl, shuffle_buffer=1000), seed=1))
    b = list(iter_documents(_ds(corpus_jsonl, shuffle_buffer=1000), seed=1))
    c = list(iter_documents(_ds(corpus_jsonl, shuffle_buffer=1000), seed=2))
    assert a == b and a != c and sorted(a) == sorted(c)


def test_missing_column_and_missing_file_are_clear(corpus_jsonl, tmp_path):
    with pytest.raises(HarvestError, match="no 'body' column"):
        next(iter_documents(_ds(corpus_jsonl, text_field="body"), 0))
    with pytest.raises(HarvestError, match="does not exist"):
        check_dataset(_ds(tmp_path / "nope.jsonl"))
    with pytest.raises(HarvestError, match="Hub is unreachable.*preset=demo"):
        check_dataset(_ds("someone/some-dataset"))


def test_separator_must_be_one_token(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert separator_id(tok, "<|endoftext|>") == tok.eos_token_id
    with pytest.raises(HarvestError, match="not a single token"):
        separator_id(tok, "<|no such token|>")
