"""eval/geometry.py: nearest-neighbour cosines, expert matrices and `python -m eval.geometry` (offline, fast)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from eval.geometry import (GeometryConfig, GeometryError, cofiring, cross_expert_max, cross_expert_partner,
                           expert_similarity, group_max, nn_cosine, overlap_excess, plan)
from tests.conftest import CONF, ROOT
from train.saes import build, save


def brute_nn(w: torch.Tensor) -> torch.Tensor:
    """Reference: the full [M, M] cosine matrix, diagonal masked, max per row."""
    u = torch.nn.functional.normalize(w.double(), dim=-1)
    sims = u @ u.T
    sims.fill_diagonal_(-torch.inf)
    return sims.amax(1)


def planted(seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """64 random unit vectors in d=32, then 8 copies of rows 0..7: four exact, four at cosine 0.95.
    Returns ([72, 32] with rows rescaled to random norms, the planted cosine of rows 0..7)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.normalize(torch.randn(64, 32, generator=g), dim=-1)
    cos = [1.0] * 4 + [0.95] * 4
    copies = []
    for i, c in enumerate(cos):
        u = torch.randn(32, generator=g)
        u = torch.nn.functional.normalize(u - (u @ base[i]) * base[i], dim=0)  # orthogonal to row i
        copies.append(c * base[i] + (1 - c**2) ** 0.5 * u)
    w = torch.cat([base, torch.stack(copies)])
    return w * torch.rand(len(w), 1, generator=g).add(0.5), cos  # norms in [0.5, 1.5): cosines must not care


def test_planted_duplicates_are_found_exactly():
    w, cos = planted()
    nn = nn_cosine(w, block=4096)
    assert (nn > 0.9).sum().item() == 16  # both members of each of the 8 pairs, nothing else
    for i, c in enumerate(cos):
        assert nn[i].item() == pytest.approx(c, abs=1e-5) and nn[64 + i].item() == pytest.approx(c, abs=1e-5)
    assert torch.allclose(nn.double(), brute_nn(w), atol=1e-5)
    # blocks smaller than M (and not dividing it) give the same values
    for block in (1, 5, 16):
        assert torch.allclose(nn_cosine(w, block=block), nn, atol=1e-6)


def test_zero_rows_have_cosine_zero_and_change_nothing_else():
    w, _ = planted()
    nn = nn_cosine(torch.cat([w, torch.zeros(1, 32)]), block=7)
    assert nn[-1].item() == 0.0
    assert torch.allclose(nn[:-1], torch.maximum(nn_cosine(w, block=4096), torch.zeros(())), atol=1e-6)


def experts_with_a_copy() -> torch.Tensor:
    """[4, 8, 16] random experts; expert 1 is an exact copy of expert 0 in shuffled order."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 8, 16, generator=g)
    w[1] = w[0, torch.randperm(8, generator=g)]
    return w


def test_expert_similarity_matches_brute_force_and_excludes_self():
    w = experts_with_a_copy()
    mat = expert_similarity(w, block=3)
    assert mat[0, 1].item() == pytest.approx(1.0, abs=1e-6) and mat[1, 0].item() == pytest.approx(1.0, abs=1e-6)
    u = torch.nn.functional.normalize(w.double(), dim=-1)
    for a in range(4):
        for b in range(4):
            sims = u[a] @ u[b].T  # [8, 8]
            if a == b:
                sims.fill_diagonal_(-torch.inf)
            assert mat[a, b].item() == pytest.approx(sims.amax(1).mean().item(), abs=1e-5)
    assert (mat.diagonal() < 0.9).all()  # a feature never matches itself


def test_cross_expert_duplicates():
    w = experts_with_a_copy()
    gmax = group_max(w.reshape(32, 16), 4, block=5)
    cross = cross_expert_max(gmax)
    assert ((cross > 0.9).nonzero().flatten() < 16).all() and (cross > 0.9).sum().item() == 16
    assert torch.allclose(gmax.amax(1).double(), brute_nn(w.reshape(32, 16)), atol=1e-5)
    with pytest.raises(ValueError):
        group_max(w.reshape(32, 16), 5, block=4096)


# ---------------------------------------------------------------------------------- config and CLI

def test_cross_expert_partner_matches_brute_force():
    torch.manual_seed(0)
    w = torch.randn(24, 8)
    best, partner = cross_expert_partner(w, 3, block=5)
    unit = w / w.norm(dim=1, keepdim=True)
    sims = unit @ unit.T
    own = torch.arange(24) // 8
    sims[own[:, None] == own[None]] = -torch.inf
    torch.testing.assert_close(best, sims.max(1).values)
    assert torch.equal(partner, sims.max(1).indices)


def test_overlap_excess_is_0_for_random_and_1_for_copies():
    torch.manual_seed(0)
    random = cross_expert_partner(torch.randn(512, 16), 4, 128)[0].mean().item()
    again = cross_expert_partner(torch.randn(512, 16), 4, 128)[0].mean().item()
    assert abs(overlap_excess(again, random)) < 0.05
    copies = torch.randn(128, 16).repeat(4, 1)  # every expert holds the same 128 directions
    assert overlap_excess(cross_expert_partner(copies, 4, 128)[0].mean().item(), random) == pytest.approx(1.0)


def test_cofiring_by_hand():
    """Firings (token, latent): (0, 0), (0, 5), (1, 0), (2, 5), (2, 1); latents 0 and 5 are each other's
    near-duplicates. Their firings: 4, of which 2 (token 0) have the partner firing too."""
    rows, latents = torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0, 5, 0, 5, 1])
    got = cofiring(rows, latents, torch.tensor([[0, 5], [5, 0]]), 8)
    assert got == {"firings": 5, "duplicate_firings": 4, "duplicate_firing_share": 0.8, "cofire": 0.5}
    assert cofiring(rows, latents, torch.zeros(0, 2, dtype=torch.long), 8)["cofire"] is None


def cfg(*overrides: str) -> GeometryConfig:
    with initialize_config_dir(config_dir=str(CONF / "eval"), version_base="1.3"):
        return GeometryConfig.from_omegaconf(compose("geometry", overrides=list(overrides)))


def save_run(path: Path, arch: str, **kw) -> Path:
    torch.manual_seed(0)
    save(build(arch, **kw), path / "sae")
    return path


@pytest.mark.parametrize("overrides, expect", [
    ([], "run=<dir> is required"),
    (["run=[]"], "run=<dir> is required"),
    (["run=RUN", "threshold=0"], "threshold must be a number in (0, 1], got 0"),
    (["run=RUN", "threshold=1.5"], "threshold must be a number in (0, 1], got 1.5"),
    (["run=RUN", "tsne_samples=1"], "tsne_samples must be an integer >= 2"),
    (["run=RUN", "block=0"], "block must be an integer >= 1"),
    (["run=RUN", "tsne=maybe"], "tsne must be true or false"),
    (["run=RUN", "tsne_iter=10"], "tsne_iter must be an integer >= 250"),
    (["run=MISSING"], "does not exist"),
    (["run=EMPTY"], "has no trained SAE"),
    (["run=[RUN,RUN]"], "is given twice"),
    (["run=RUN", "topk_run=RUN"], "is a switch run"),
    (["run=RUN", "topk_run=WIDE"], "the baseline needs the same total width"),
])
def test_bad_input_is_rejected_before_any_work(tmp_path, overrides, expect):
    run = save_run(tmp_path / "sw", "switch", d=16, n_experts=4, expert_width=16, k=4, alpha=3.0)
    wide = save_run(tmp_path / "wide", "topk", d=16, width=96, k=4)
    (tmp_path / "empty").mkdir()
    paths = {"RUN": run, "WIDE": wide, "MISSING": tmp_path / "missing", "EMPTY": tmp_path / "empty"}
    for key, p in paths.items():
        overrides = [o.replace(key, str(p)) for o in overrides]
    with pytest.raises(GeometryError, match=re.escape(expect)):
        plan(cfg(*overrides))
    assert not list(tmp_path.rglob("geometry*"))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eval.geometry", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_end_to_end_switch_and_topk(tmp_path):
    torch.manual_seed(0)
    sw = build("switch", d=16, n_experts=4, expert_width=16, k=4, alpha=3.0)
    with torch.no_grad():
        sw.W_dec[2, 5] = sw.W_dec[0, 3]  # a planted duplicate across experts 0 and 2
        sw.W_enc.add_(0.3 * torch.randn_like(sw.W_enc))  # encoder no longer tied to the decoder
    save(sw, tmp_path / "switch" / "sae")
    save_run(tmp_path / "topk", "topk", d=16, width=64, k=4)
    r = cli(f"run=[{tmp_path / 'switch'},{tmp_path / 'topk'}]", f"topk_run={tmp_path / 'topk'}", "tsne_samples=40",
            "tsne_pca=8", "tsne_iter=250", "device=cpu", "bins=20")
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "switch" / "geometry.json").read_text())
    dec = sw.W_dec.detach().reshape(64, 16)
    nn = brute_nn(dec)
    assert out["threshold"] == 0.9 and out["arch"] == "switch" and out["n_experts"] == 4
    assert out["nn_cos_mean"] == out["decoder"]["nn_cos_mean"] == pytest.approx(nn.mean().item(), abs=1e-5)
    assert out["dup_frac"] == out["decoder"]["dup_frac"] == (nn > 0.9).sum().item() / 64
    assert out["dup_frac"] >= 2 / 64 and out["cross_expert_dup_frac"] >= 2 / 64
    assert torch.allclose(torch.tensor(out["decoder"]["expert_similarity"]), expert_similarity(dec.view(4, 16, 16), block=4096),
                          atol=1e-5)
    assert out["encoder"]["nn_cos_mean"] == pytest.approx(brute_nn(sw.W_enc.detach().reshape(64, 16)).mean().item(),
                                                          abs=1e-5)
    assert out["encoder"]["nn_cos_mean"] != out["decoder"]["nn_cos_mean"]
    assert out["baseline"]["kind"] == "random blocks of topk run topk"
    assert out["tsne"]["samples"] == 40 and out["tsne"]["perplexity"] == 13
    topk = json.loads((tmp_path / "topk" / "geometry.json").read_text())
    assert topk["baseline"] is None and topk["cross_expert_dup_frac"] is None and "dup_frac" in topk["encoder"]
    for png in ("switch/geometry_nn_cos.png", "switch/geometry_experts.png", "switch/geometry_tsne.png",
                "topk/geometry_nn_cos.png", "topk/geometry_tsne.png", "geometry_compare.png"):
        assert (tmp_path / png).stat().st_size > 5_000, png
    assert not (tmp_path / "topk" / "geometry_experts.png").exists()
    assert not list(tmp_path.rglob(".*.tmp"))
    assert "baseline (topk blocks)" in r.stdout and "switch" in r.stdout


def test_cli_missing_run_is_one_line_and_exit_2(tmp_path):
    r = cli(f"run={tmp_path / 'nope'}")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("geometry: error:") and "nope" in lines[0]
