"""`python -m harvest` as a user runs it: one-line errors, and resume after kill -9."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from harvest.store import ActivationStore
from tests.conftest import ROOT, harvest_overrides, run_cli


def test_paper_preset_without_hub_names_the_offline_preset(tmp_path):
    out = run_cli([f"store={tmp_path}/s"], env={"HF_HOME": str(tmp_path / "hf")})
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harvest: error:") and "preset=demo" in lines[0], out.stderr
    assert not (tmp_path / "s").exists()


def test_bad_input_is_one_line_on_stderr(tiny_gpt2, corpus_jsonl, tmp_path):
    out = run_cli(harvest_overrides(tiny_gpt2, corpus_jsonl, tmp_path / "s", layer=9))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"harvest: error: layer 9 is out of range: {tiny_gpt2} has blocks 0..3"]


def _progress(store) -> int:
    try:
        return json.loads((store / "zarr.json").read_text())["attributes"]["progress"]["chunks_done"]
    except (OSError, KeyError, ValueError):
        return 0


def test_kill_9_at_any_moment_then_resume_gives_the_uninterrupted_store(tiny_gpt2, corpus_jsonl, tmp_path):
    """Kill the harvest up to three times mid-run (chunks are written every few ms, so kills land inside
    writes too); each re-run resumes; the result equals an uninterrupted harvest byte for byte. The
    killed runs write 3 chunks at once (commits in order), the uninterrupted one a chunk at a time.

    Every process computes on one thread: with two, MKL's float32 results occasionally differ in the
    last bit between processes on a busy machine (seen as 1-ulp float16 differences in a few values),
    which is not what this test is about."""
    one_thread = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = harvest_overrides(tiny_gpt2, corpus_jsonl, tmp_path / "killed", tokens=3000, writer_threads=3)  # 100 chunks
    kills = 0
    for kill_after in (3, 25, 50):
        proc = subprocess.Popen([sys.executable, "-m", "harvest", *args], cwd=ROOT, env={**os.environ, **one_thread},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while _progress(tmp_path / "killed") < kill_after and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = _progress(tmp_path / "killed")
        assert done >= kill_after, f"the harvest stopped at chunk {done} before the kill"
        if done == 100:
            break  # this kill came after the last chunk (a slow poll on a busy machine)
        kills += 1
        assert not ActivationStore(tmp_path / "killed").complete
    assert kills >= 1
    out = run_cli(args, env=one_thread)
    assert out.returncode == 0, out.stderr
    out = run_cli(harvest_overrides(tiny_gpt2, corpus_jsonl, tmp_path / "clean", tokens=3000, writer_threads=1),
                  env=one_thread)
    assert out.returncode == 0, out.stderr
    killed, clean = ActivationStore(tmp_path / "killed"), ActivationStore(tmp_path / "clean")
    assert killed.complete and killed.n_rows == clean.n_rows == 3000
    for name in ("contexts", "tokens", "acts"):
        a, b = killed.group[name][:], clean.group[name][:]
        differing = sorted({int(r) // 30 for r in np.nonzero((a != b).reshape(len(a), -1).any(1))[0]})
        assert not differing, f"{name} differs in chunks {differing} (kills: {kills})"
    for key in ("mean", "var", "n_tokens", "progress"):
        assert killed.attrs[key] == clean.attrs[key]
    assert not list((tmp_path / "killed").rglob("*.partial"))
