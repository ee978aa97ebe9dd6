"""harvest/synth.py: a synthetic store with a recorded ground truth; eval/truth.py scores directions against it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from eval.truth import MIN_ROWS, absorption, recovery
from harvest.config import HarvestError
from harvest.store import ActivationStore, DamagedStore, verify
from harvest.synth import DICTIONARY, SynthConfig, Truth, read_truth, synthesize, true_codes
from runtime.config import compose_app
from runtime.location import Location
from eval.run import evaluate
from tests.conftest import ROOT, eval_config
from train.saes import load

SMALL = ["tokens=2048", "chunk_rows=512", "d=32", "features=96", "l0=4", "clusters=4", "parents=4", "children=3",
         "groups=4", "group_size=2", "group_rate=0.05", "progress=false"]


def cfg(path, *extra) -> SynthConfig:
    return SynthConfig.from_omegaconf(compose_app("synth", [f"store={path}", *SMALL, *extra]))


def test_the_store_is_seeded_and_records_its_truth(tmp_path):
    a = synthesize(cfg(tmp_path / "a"))
    b = synthesize(cfg(tmp_path / "b"))
    c = synthesize(cfg(tmp_path / "c", "seed=1"))
    assert a.complete and a.n_rows == 2048 and a.d_model == 32 and verify(a.path, progress=False).ok
    same = [np.array_equal(a.read_chunk_raw(i), b.read_chunk_raw(i)) for i in range(a.n_chunks)]
    assert all(same) and not np.array_equal(a.read_chunk_raw(0), c.read_chunk_raw(0))
    truth = read_truth(a)
    drawn = Truth.draw(cfg(tmp_path / "a"))
    assert np.array_equal(truth.dictionary, drawn.dictionary) and truth.parents == drawn.parents
    assert truth.dictionary.shape == (96, 32) and np.allclose(np.linalg.norm(truth.dictionary, axis=1), 1, atol=1e-6)
    # the rows are the recorded model: codes @ dictionary + noise, as stored (float16)
    codes, x = drawn.rows(cfg(tmp_path / "a"), 1)
    assert np.array_equal(a.read_chunk_raw(1), x.astype(np.float16))
    assert np.abs(x - codes @ truth.dictionary).std() < 0.01
    assert np.array_equal(true_codes(a, truth, 1), codes)  # what eval reads back for absorption


def test_the_structure_holds_in_the_codes(tmp_path):
    config = cfg(tmp_path / "x", "tokens=20480", "chunk_rows=20480")
    truth = Truth.draw(config)
    codes, _ = truth.rows(config, 0)
    fires = codes > 0
    for parent, kids in truth.parents.items():
        assert not (fires[:, kids] & ~fires[:, [parent]]).any()  # a child never fires without its parent
        assert fires[:, kids].any()
    for group in truth.groups:
        together = fires[:, group].all(axis=1).mean()
        assert together > 0.03  # group_rate 0.05, besides chance
    free = truth.rates > 0
    # l0 = 4 features fire on their own, and 4 groups of 2 fire together in 5% of the rows besides
    assert abs(fires[:, free].sum(1).mean() - (4 + 4 * 2 * 0.05)) < 0.15
    order = np.argsort(-truth.rates[free])
    observed = fires[:, free].mean(0)[order]
    assert observed[:5].mean() > 10 * observed[-20:].mean()  # a power law: frequent and rare features


def test_recovery_is_one_for_the_truth_and_near_zero_for_random_directions(tmp_path):
    truth = read_truth(synthesize(cfg(tmp_path / "s")))
    true = torch.from_numpy(truth.dictionary)
    exact = recovery(true, true)
    assert exact["recovered"] == 1.0 and exact["duplicates"] == 0 and exact["matched_latents"] == 96
    twice = recovery(torch.cat([true, true[:10] * 2]), true)
    assert twice["recovered"] == 1.0 and twice["duplicates"] == 10
    random = recovery(torch.randn(200, 32, generator=torch.Generator().manual_seed(0)), true)
    assert random["recovered"] < 0.05 and random["best_cos_mean"] < 0.8


def test_absorption_by_hand():
    """Two parents over 4 MIN_ROWS rows: parent 0 fires everywhere, with a child in the second half;
    parent 1 fires in the first 2 MIN_ROWS rows only with a child in rows MIN_ROWS .. 2 MIN_ROWS - 1."""
    n = 4 * MIN_ROWS
    half = torch.arange(n) >= 2 * MIN_ROWS
    parent_on = torch.stack([torch.ones(n, dtype=torch.bool), ~half], 1)
    child_on = torch.stack([half, (torch.arange(n) >= MIN_ROWS) & ~half], 1)
    # parent 0's latent fires only without the child (fully absorbed); parent 1's fires on every parent row
    fires = torch.stack([~half, ~half], 1)
    got = absorption(fires, parent_on, child_on)
    assert got == {"absorption": 0.5, "parent_recall": 1.0, "parents": 2}
    # a latent that fires on half of the parent-alone rows and half of the child rows absorbs nothing
    fires[:, 0] = torch.arange(n) % 2 == 0
    assert absorption(fires, parent_on, child_on)["absorption"] == 0.0
    # too few rows of either kind: not scored
    assert absorption(fires[:MIN_ROWS], parent_on[:MIN_ROWS], child_on[:MIN_ROWS])["parents"] == 0


def test_a_damaged_truth_is_named(tmp_path):
    s = synthesize(cfg(tmp_path / "s"))
    data = bytearray(Location.of(s.path).read(DICTIONARY))
    data[-1] ^= 1
    Location.of(s.path).write(DICTIONARY, bytes(data))
    with pytest.raises(DamagedStore, match=r"its truth truth/dictionary\.npy does not match its recorded CRC-32"):
        read_truth(ActivationStore(s.path))


@pytest.mark.parametrize(("extra", "message"), [
    (["chunk_rows=200"], "chunk_rows must be a multiple of 128, got 200"),
    (["features=10"], r"parents x \(1 \+ children\) \+ groups x group_size = 24 features, more than features=10"),
    (["child_rate=2"], "child_rate must be a number in"),
], ids=["chunk", "too-few-features", "rate"])
def test_bad_values_fail_in_one_line(extra, message, tmp_path):
    with pytest.raises(HarvestError, match=message):
        cfg(tmp_path / "s", *extra)


def test_the_cli_writes_a_store_an_sae_trains_on(tmp_path):
    out = subprocess.run([sys.executable, "-m", "harvest.synth", f"store={tmp_path / 's'}", *SMALL], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "96 true features" in out.stdout
    again = subprocess.run([sys.executable, "-m", "harvest.synth", f"store={tmp_path / 's'}", *SMALL, "seed=3"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"synth: error: store {tmp_path / 's'} holds other rows than this config makes; pass overwrite=true to "
        "replace it, or choose another store="]
    from tests.train.test_loop import make_cfg
    from train.loop import train

    train(make_cfg(tmp_path / "s", "model.width=64", "model.k=4", "budget=steps:10", "batch_size=64",
                   "data.eval_frac=0.25", "eval_every=5", "eval_tokens=64"), tmp_path / "run")
    # eval scores it against the truth and skips CE (there is no LM), saying so
    [result] = evaluate(eval_config(tmp_path / "run", ce=True))
    assert result.ce_sae is None and any("no CE loss: the store is synthetic" in n for n in result.notes)
    assert 0 <= result.truth_recovered <= 1 and 0 < result.truth_best_cos_mean < 1 and result.truth_duplicates >= 0
    assert result.truth_absorption is None or 0 <= result.truth_absorption <= 1
    sae = load(tmp_path / "run" / "sae")
    found = recovery(sae.decoder_directions().detach(), torch.from_numpy(read_truth(ActivationStore(tmp_path / "s")).dictionary))
    assert result.truth_recovered == found["recovered"]
