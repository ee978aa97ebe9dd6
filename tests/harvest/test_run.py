"""harvest.run: every bad input fails in one clear line before any work; stores are never mixed."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from harvest.config import HarvestError
from harvest.run import harvest, preflight
from harvest.store import ActivationStore
from tests.conftest import compose, documents, harvest_overrides


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize(("extra", "message"), [
    ({"site": "mlp_mid"}, "site must be one of resid_post, attn_out, mlp_in, mlp_out, or a list of them, got 'mlp_mid'"),
    ({"layer": 4}, r"layer 4 is out of range: .* has blocks 0\.\.3"),
    ({"layer": "[1,9]", "store": "'{store}_{layer}'"}, r"layer 9 is out of range: .* has blocks 0\.\.3"),
    ({"tokens": 29}, "tokens=29 is below one chunk"),
    ({"context_size": 65}, "exceeds .*64 positions"),
    ({"dataset.name": "/nonexistent/docs.jsonl"}, "does not exist"),
    ({"dataset.name": "someone/unknown-dataset"}, "Hub is unreachable; use the embedded offline preset"),
    ({"store": "/proc/version/store"}, "is not writable: /proc/version is a file"),
    ({"store": "/proc/sys/harvest-store"}, "is not writable: cannot create anything in /proc/sys"),
    ({"codec": "gzip"}, "codec must be one of blosc_zstd, zstd, none, got 'gzip'"),
    ({"codec_level": 10}, "codec_level must be an integer in 0..9 with codec=blosc_zstd, got 10"),
    ({"tokens": 1.5}, "tokens must be an integer >= 1, got 1.5"),
    ({"dataset.packing": "pad"}, "dataset.packing must be one of document, concat, got 'pad'"),
    ({"dataset.text_field": "body"}, "dataset.text_field 'body' is not a field of the records of .*; their fields: id, text"),
])
def test_bad_input_is_refused_before_any_work(tiny_gpt2, corpus_jsonl, tmp_path, extra, message):
    extra = {k: v.replace("{store}", str(tmp_path / "s")) if isinstance(v, str) else v for k, v in extra.items()}
    overrides = harvest_overrides(tiny_gpt2, corpus_jsonl, tmp_path / "s", **extra)
    with pytest.raises(HarvestError, match=message):
        preflight(compose(overrides))
    assert not list(tmp_path.iterdir())


def test_unknown_models_are_refused(tmp_path, corpus_jsonl):
    with pytest.raises(HarvestError, match="model folder 'data/nowhere/model' does not exist.*make setup"):
        preflight(compose(harvest_overrides("data/nowhere/model", corpus_jsonl, tmp_path / "s")))
    with pytest.raises(HarvestError, match="neither a local folder nor cached.*preset=demo"):
        preflight(compose(harvest_overrides("someone/unknown-model", corpus_jsonl, tmp_path / "s")))
    (tmp_path / "m").mkdir()
    with pytest.raises(HarvestError, match="unknown model"):
        preflight(compose(harvest_overrides(tmp_path / "m", corpus_jsonl, tmp_path / "s")))


def test_other_config_is_refused_then_overwritten_on_request(tiny_gpt2, corpus_jsonl, tmp_path):
    store = tmp_path / "s"
    harvest(compose(harvest_overrides(tiny_gpt2, corpus_jsonl, store)))
    before = _digest(store)
    with pytest.raises(HarvestError, match=r"different config \(layer: 2 -> 1\).*overwrite=true"):
        harvest(compose(harvest_overrides(tiny_gpt2, corpus_jsonl, store, layer=1)))
    assert _digest(store) == before  # nothing touched
    harvest(compose(harvest_overrides(tiny_gpt2, corpus_jsonl, store, layer=1, overwrite="true")))
    assert ActivationStore(store).layer == 1


def test_runtime_keys_may_change_and_the_budget_may_grow(tiny_gpt2, corpus_jsonl, tmp_path):
    """batch_size is not identity; a larger budget extends the store to what a fresh run writes."""
    harvest(compose(harvest_overrides(tiny_gpt2, corpus_jsonl, tmp_path / "a", tokens=60)))
    harvest(compose(harvest_overrides(tiny_gpt2, corpus_jsonl, tmp_path / "a", tokens=150, batch_size=1)))
    harvest(compose(harvest_overrides(tiny_gpt2, corpus_jsonl, tmp_path / "b", tokens=150)))
    a, b = ActivationStore(tmp_path / "a"), ActivationStore(tmp_path / "b")
    assert a.complete and a.n_rows == b.n_rows == 150
    np.testing.assert_array_equal(a.acts[:], b.acts[:])
    np.testing.assert_array_equal(a.var, b.var)
    with pytest.raises(HarvestError, match="more than tokens=60"):
        harvest(compose(harvest_overrides(tiny_gpt2, corpus_jsonl, tmp_path / "a", tokens=60)))


def test_running_out_of_text_says_what_to_do(tiny_gpt2, tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents(20)))
    with pytest.raises(HarvestError, match=r"ran out after .* pass tokens=(\d+) to mark this store complete") as e:
        harvest(compose(harvest_overrides(tiny_gpt2, small, tmp_path / "s", tokens=10**5)))
    s = ActivationStore(tmp_path / "s")
    assert not s.complete and s.n_rows > 0
    rows = int(re.search(r"tokens=(\d+) to mark", str(e.value)).group(1))
    harvest(compose(harvest_overrides(tiny_gpt2, small, tmp_path / "s", tokens=rows)))
    assert ActivationStore(tmp_path / "s").complete


def test_llama_attn_out_and_bfloat16_storage(tiny_llama, corpus_jsonl, tmp_path):
    harvest(compose(harvest_overrides(tiny_llama, corpus_jsonl, tmp_path / "s", site="attn_out",
                                      store_dtype="bfloat16", keep_pos0="true", codec="none")))
    s = ActivationStore(tmp_path / "s")
    assert s.acts_dtype == "bfloat16" and s.chunk_rows == 32  # keep_pos0: 2 x 16 rows
    assert np.isfinite(s.read_chunk(0)).all() and s.read_chunk(0).std() > 0


def test_store_appears_whole_and_leftovers_of_a_killed_creation_are_cleared(tiny_gpt2, corpus_jsonl, tmp_path):
    (tmp_path / "s.creating").mkdir()  # what a kill during store creation leaves behind
    (tmp_path / "s.creating" / "zarr.json").write_text("{}")
    (tmp_path / "s").mkdir()  # an empty folder is a fine place for a new store
    harvest(compose(harvest_overrides(tiny_gpt2, corpus_jsonl, tmp_path / "s")))
    assert ActivationStore(tmp_path / "s").complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_activations_beyond_float16_overflow_are_refused_in_one_line(tiny_gpt2, corpus_jsonl, tmp_path):
    """An LM whose residual stream overflows float16 stops the harvest with the remedy (store_dtype=bfloat16),
    the check read once the chunk's rows reach the host; with bfloat16 storage the same LM harvests."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(1e6)
    model.save_pretrained(tmp_path / "huge")
    AutoTokenizer.from_pretrained(tiny_gpt2).save_pretrained(tmp_path / "huge")
    with pytest.raises(HarvestError, match=r"^activations overflow float16 .* store_dtype=bfloat16$"):
        harvest(compose(harvest_overrides(tmp_path / "huge", corpus_jsonl, tmp_path / "s", layer=0)))
    harvest(compose(harvest_overrides(tmp_path / "huge", corpus_jsonl, tmp_path / "b", layer=0, store_dtype="bfloat16")))
    assert ActivationStore(tmp_path / "b").complete
