"""eval/absorption.py (`python -m eval.absorption`): first-letter absorption. The word tokens of a real
tokenizer, the probe on separable data, the letter latents and the scoring of rows by hand, and the app end
to end on a tiny harvested store for a TopK and a Switch run, with bad input in one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from eval.absorption import LETTERS, fit_probe, letter_latents, score_rows, word_letters
from harvest.run import harvest
from tests.conftest import ROOT, compose, harvest_overrides
from tests.train.test_loop import make_cfg
from train.loop import train


def test_word_tokens_of_a_real_tokenizer(tiny_gpt2):
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    letters = word_letters(tok)
    ids = {text: tok.encode(text) for text in (" the", " The", "the", " 42", " a", " caf\u00e9")}
    assert [len(v) for v in ids.values()][:2] == [1, 1]
    assert letters[ids[" the"][0]] == LETTERS.index("t") and letters[ids[" The"][0]] == LETTERS.index("t")
    assert letters[ids["the"][0]] == -1  # no leading space: inside a word
    assert all(letters[i] == -1 for i in ids[" 42"]) and all(letters[i] == -1 for i in ids[" a"])  # one letter
    assert 0 < (letters >= 0).mean() < 1


def test_the_probe_separates_separable_letters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(26, 16, generator=g) * 4
    y = torch.arange(26).repeat(20)
    x = centres[y] + torch.randn(len(y), 16, generator=g) + 3  # off-centre: the bias must absorb the mean
    w, c = fit_probe(x, y)
    assert w.shape == (26, 16) and ((x @ w.T + c).argmax(1) == y).float().mean() > 0.99


def test_letter_latents_by_hand():
    """Rows 0-3 are letter a, rows 4-5 letter b. Latent 7 fires on rows 0, 1; latent 9 on rows 2, 3 (a split
    'a' feature); latent 3 on rows 0, 4. For a: 7 alone F1 2*2/(2+4) = 0.67, with 9 F1 1.0: both kept."""
    rows = np.array([0, 1, 2, 3, 0, 4])
    latents = np.array([7, 7, 9, 9, 3, 3])
    y = np.array([0, 0, 0, 0, 1, 1])
    mains = letter_latents(rows, latents, y, 10, gain=0.03, max_main=3)
    assert sorted(mains[0]["latents"]) == [7, 9] and mains[0]["f1"] == pytest.approx(1.0)
    assert mains[1]["latents"] == [3] and mains[1]["f1"] == pytest.approx(2 * 1 / (2 + 2))
    assert letter_latents(rows, latents, y, 10, gain=0.03, max_main=1)[0]["latents"] == [7]


def test_scoring_rows_by_hand():
    """Four rows of one letter, main latent 0. Row 0: the main latent fires. Row 1: only latent 1 fires, aligned
    with the probe (cos 0.5): absorbed. Row 2: latent 2 fires, orthogonal to the probe: a false negative, not
    absorbed. Row 3: latents 1 (projection 0.5) and 3 (projection 2.0) fire; latent 1's share 0.2 < 0.4 and
    latent 3's cosine 0.01 < 0.025: not absorbed."""
    dec_dot = np.array([1.0, 0.5, 0.0, 0.2])
    dec_cos = np.array([1.0, 0.5, 0.0, 0.01])
    rows, latents, vals = np.array([0, 1, 2, 3, 3]), np.array([0, 1, 2, 1, 3]), np.array([1.0, 1, 1, 1, 10])
    fn, absorbed = score_rows(rows, latents, vals, 4, [0], dec_dot, dec_cos, cos_min=0.025, share_min=0.4)
    assert fn.tolist() == [False, True, True, True] and absorbed.tolist() == [False, True, False, False]


@pytest.fixture(scope="module")
def runs(tiny_gpt2, corpus_jsonl, tmp_path_factory):
    root = tmp_path_factory.mktemp("absorption")
    harvest(compose(harvest_overrides(tiny_gpt2, corpus_jsonl, root / "store", tokens=600)))
    for name, model in {"topk": ["model=topk", "model.width=64", "model.k=4"],
                        "switch": ["model=switch", "model.width=64", "model.n_experts=4", "model.k=4"]}.items():
        train(make_cfg(root / "store", *model, "budget=steps:30", "batch_size=32"), root / name)
    return root


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eval.absorption", *args, "device=cpu", "progress=false"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", ["topk", "switch"])
def test_the_app_end_to_end(runs, name):
    out = cli(f"run={runs / name}", "min_tokens=1")
    assert out.returncode == 0, out.stderr
    result = json.loads((runs / name / "absorption.json").read_text())
    assert result["arch"] == name and 0 <= result["probe_accuracy"] <= 1 and result["probe_rows"] > 0
    assert result["letters_scored"] >= 1 and 0 <= result["absorption"] <= result["fn_rate"] <= 1
    scored = [e for e in result["letters"].values() if e["correct_rows"] >= 1]
    assert all(0 <= e["absorption"] <= e["fn_rate"] <= 1 and 1 <= len(e["main_latents"]) <= 3 for e in scored)
    assert f"({name}): probe accuracy" in out.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["cos_min=2"], "cos_min must be a number in [-1, 1], got 2"),
    (["max_main=0"], "max_main must be an integer >= 1, got 0"),
])
def test_bad_values_are_refused_before_any_work(runs, args, message):
    from eval.absorption import AbsorptionConfig, AbsorptionError
    from runtime.config import compose_app

    with pytest.raises(AbsorptionError, match=re.escape(message)) as e:
        AbsorptionConfig.from_omegaconf(compose_app("eval", [f"run={runs / 'topk'}", *args], "absorption"))
    assert "\n" not in str(e.value)


def test_a_missing_run_is_one_line_and_exit_2(runs):
    out = cli(f"run={runs / 'missing'}")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert "does not exist" in out.stderr and not (runs / "missing").exists()
