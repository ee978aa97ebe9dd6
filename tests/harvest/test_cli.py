"""`python -m harvest` as a user runs it: one-line errors, and resume after kill -9."""

import json
import signal
import subprocess
import sys
import time

import numpy as np

from harvest.run import harvest
from harvest.store import ActivationStore
from tests.conftest import ROOT, compose, harvest_overrides, run_cli


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
    """Kill the harvest three times mid-run (chunks are written every few ms, so kills land inside
    writes too); each re-run resumes; the result equals an uninterrupted harvest byte for byte."""
    args = harvest_overrides(tiny_gpt2, corpus_jsonl, tmp_path / "killed", tokens=3000)  # 100 chunks
    for kill_after in (3, 30, 65):
        proc = subprocess.Popen([sys.executable, "-m", "harvest", *args], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while _progress(tmp_path / "killed") < kill_after and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = _progress(tmp_path / "killed")
        assert kill_after <= done < 100, f"kill landed at chunk {done}"
        assert not ActivationStore(tmp_path / "killed").complete
    out = run_cli(args)
    assert out.returncode == 0, out.stderr

    harvest(compose(harvest_overrides(tiny_gpt2, corpus_jsonl, tmp_path / "clean", tokens=3000)))
    killed, clean = ActivationStore(tmp_path / "killed"), ActivationStore(tmp_path / "clean")
    assert killed.complete and killed.n_rows == clean.n_rows == 3000
    for name in ("acts", "tokens", "contexts"):
        np.testing.assert_array_equal(killed.group[name][:], clean.group[name][:])
    for key in ("mean", "var", "n_tokens", "progress"):
        assert killed.attrs[key] == clean.attrs[key]
    assert not list((tmp_path / "killed").rglob("*.partial"))
