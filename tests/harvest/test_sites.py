"""Several sites in one pass of the LM (`layer=[...]`, `site=[...]`): one store per (layer, site), each
byte for byte what harvesting that site alone writes, also after kill -9 and resume, and when the stores
were left at different places."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from harvest.config import RUNTIME_KEYS
from harvest.run import harvest
from harvest.store import ActivationStore
from tests.conftest import ROOT, compose, harvest_overrides, run_cli

SITES = [(1, "resid_post"), (1, "mlp_out"), (3, "attn_out"), (3, "resid_post")]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # bit-identical float32 across processes


def _digest(folder: Path) -> str:
    """Of every file of a store but its root attributes (which record its path and runtime keys)."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / "zarr.json"):
        h.update(str(f.relative_to(folder)).encode() + f.read_bytes())
    return h.hexdigest()


def _same_store(a: Path, b: Path) -> None:
    assert _digest(a) == _digest(b), f"{a} and {b} differ"
    x, y = ActivationStore(a), ActivationStore(b)
    for key in ("n_tokens", "complete", "mean", "var", "progress", "layer", "site", "n_layers"):
        assert x.attrs[key] == y.attrs[key], key
    assert {k: v for k, v in x.attrs["config"].items() if k not in RUNTIME_KEYS} == \
           {k: v for k, v in y.attrs["config"].items() if k not in RUNTIME_KEYS}


def _several(tiny_gpt2, corpus_jsonl, path: Path, **extra) -> list[str]:
    return harvest_overrides(tiny_gpt2, corpus_jsonl, "x", layer="[1,3]", site="[resid_post,mlp_out,attn_out]",
                             **extra) + [f"store='{path}/{{site}}{{layer}}'"]


def _alone(tiny_gpt2, corpus_jsonl, path: Path, layer: int, site: str, **extra) -> list[str]:
    return harvest_overrides(tiny_gpt2, corpus_jsonl, path / f"{site}{layer}", layer=layer, site=site, **extra)


def test_several_sites_in_one_pass_equal_single_site_harvests(tiny_gpt2, corpus_jsonl, tmp_path):
    result = harvest(compose(_several(tiny_gpt2, corpus_jsonl, tmp_path / "one-pass", tokens=450)))
    assert [p.name for p in result.stores] == ["resid_post1", "mlp_out1", "attn_out1", "resid_post3", "mlp_out3",
                                               "attn_out3"]
    for layer, site in SITES:
        harvest(compose(_alone(tiny_gpt2, corpus_jsonl, tmp_path / "alone", layer, site, tokens=450)))
        _same_store(tmp_path / "one-pass" / f"{site}{layer}", tmp_path / "alone" / f"{site}{layer}")


def test_stores_left_at_different_places_are_each_completed(tiny_gpt2, corpus_jsonl, tmp_path):
    """One store already complete at a smaller budget, one half written, the others new: one command
    extends, resumes and starts them from the same pass, each equal to a single-site harvest."""
    one_pass = tmp_path / "one-pass"
    harvest(compose(_alone(tiny_gpt2, corpus_jsonl, one_pass, 1, "resid_post", tokens=150)))
    harvest(compose(_alone(tiny_gpt2, corpus_jsonl, one_pass, 3, "mlp_out", tokens=300)))
    result = harvest(compose(_several(tiny_gpt2, corpus_jsonl, one_pass, tokens=450)))
    assert result.rows == 450
    for layer, site in SITES:
        harvest(compose(_alone(tiny_gpt2, corpus_jsonl, tmp_path / "alone", layer, site, tokens=450)))
        _same_store(one_pass / f"{site}{layer}", tmp_path / "alone" / f"{site}{layer}")


def _committed(store: Path) -> int:
    try:
        return json.loads((store / "zarr.json").read_text())["attributes"]["progress"]["chunks_done"]
    except (OSError, KeyError, ValueError):
        return 0


def test_kill_9_then_resume_gives_the_single_site_stores(tiny_gpt2, corpus_jsonl, tmp_path):
    """Killed twice while writing six stores from one pass (3 chunks written at once), then run again:
    every store equals that of an uninterrupted run, one chunk at a time, byte for byte (which equals the
    single-site harvests: the test above)."""
    args = _several(tiny_gpt2, corpus_jsonl, tmp_path / "killed", tokens=1200, writer_threads=3)  # 40 chunks each
    watched = tmp_path / "killed" / "attn_out3"
    for kill_after in (5, 20):
        proc = subprocess.Popen([sys.executable, "-m", "harvest", *args], cwd=ROOT, env={**os.environ, **ONE_THREAD},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while _committed(watched) < kill_after and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _committed(watched) >= kill_after
    assert not ActivationStore(watched).complete
    out = run_cli(args, env=ONE_THREAD)
    assert out.returncode == 0, out.stderr
    clean = run_cli(_several(tiny_gpt2, corpus_jsonl, tmp_path / "clean", tokens=1200, writer_threads=1), env=ONE_THREAD)
    assert clean.returncode == 0, clean.stderr
    for layer, site in SITES:
        _same_store(tmp_path / "killed" / f"{site}{layer}", tmp_path / "clean" / f"{site}{layer}")


def test_mlp_in_and_mlp_out_from_one_pass_are_the_mlp_s_input_and_output(tiny_gpt2, corpus_jsonl, tmp_path):
    """A transcoder's two sites: the block's MLP applied to the mlp_in rows gives the mlp_out rows (up to the
    stores' float16), row for row."""
    import torch

    from harvest.lm import load_lm, site_module

    overrides = harvest_overrides(tiny_gpt2, corpus_jsonl, "x", layer=2, site="[mlp_in,mlp_out]", tokens=300)
    harvest(compose(overrides + [f"store='{tmp_path}/{{site}}'"]))
    x_in, x_out = (ActivationStore(tmp_path / site) for site in ("mlp_in", "mlp_out"))
    assert x_in.site == "mlp_in" and x_in.n_rows == x_out.n_rows
    model, _ = load_lm(tiny_gpt2, torch.device("cpu"))
    mlp = site_module(model, 2, "mlp_out")
    for i in range(x_in.n_chunks):
        with torch.no_grad():
            predicted = mlp(torch.from_numpy(x_in.read_chunk(i))).numpy()
        stored = x_out.read_chunk(i)
        assert abs(predicted - stored).max() <= 2e-3 * max(1.0, abs(stored).max())
        assert abs(x_in.read_chunk(i) - stored).max() > 0.1  # not the same activation twice
