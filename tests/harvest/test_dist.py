"""Harvest on 2 CPU processes (gloo): one parted store, read like any other.

The `parted` fixture makes every store once: the reference store through the real command line
(`python -m torch.distributed.run --standalone --nproc_per_node=2 -m harvest ...`), single-process
harvests of the even and of the odd documents, and, in one `runtime.ranks.spawn_local` of 2
ranks, a harvest killed mid-chunk and resumed, one left killed, and runs that must be refused.
Every process computes on one thread (see test_cli's kill test), so equal means equal bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from harvest import store
from harvest.config import HarvestError
from runtime.location import LocalLocation
from runtime.ranks import spawn_local
from harvest.run import harvest
from harvest.store import ActivationStore, RunningStats
from tests.conftest import ROOT, compose, documents, harvest_overrides
from tests.harvest.test_run import _digest
from train.loader import Batches

WORLD = 2
TOKENS = 270  # 9 chunks of 2 sequences x 15 rows: rank 0 writes chunks 0, 2, .., 8 and rank 1 chunks 1, 3, .., 7
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_REAL_WRITE = LocalLocation.write


class Killed(Exception):
    pass


def _killed_at(commits: dict[int, int]):
    """A LocalLocation.write that dies, as a kill would, while writing this rank's commits[rank]-th part
    file: after that chunk's arrays and the temporary file, before the rename commits them."""
    count = [0]

    def write(self, key: str, data: bytes) -> None:
        part = key.startswith(store.PARTS + "/")  # chunk files and checksum records are written too
        count[0] += part
        if part and count[0] == commits[int(os.environ["RANK"])]:
            path = self.file(key)
            path.with_name(path.name + ".partial").write_text("{")
            raise Killed
        _REAL_WRITE(self, key, data)

    return write


def _job(cfg, outcome: Path, kill: dict[int, int] | None = None) -> None:
    """harvest(cfg) on this rank (killed where `kill` says); what happened goes to outcome.<rank>.json."""
    LocalLocation.write = _killed_at(kill) if kill else _REAL_WRITE
    try:
        result = {"rows": harvest(cfg).rows}
    except HarvestError as e:
        result = {"error": str(e)}
    except Killed:
        result = {"killed": True}
    finally:
        LocalLocation.write = _REAL_WRITE
    outcome.with_name(f"{outcome.name}.{os.environ['RANK']}.json").write_text(json.dumps(result))


def _run_jobs(jobs: list) -> None:
    """One rank of a `spawn_local` job: the jobs in order (the same on every rank), each begun once
    every rank has ended the previous one, as a relaunched job would."""
    for job, *args in jobs:
        job(*args)
        torch.distributed.barrier()  # the first job's harvest joined the process group


def _outcomes(path: Path) -> list[dict]:
    return [json.loads(path.with_name(f"{path.name}.{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def parted(tiny_gpt2, corpus_jsonl, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parted")

    def args(name: str) -> list[str]:
        """The overrides of every harvest of the whole corpus here, into the store tmp/name."""
        return harvest_overrides(tiny_gpt2, corpus_jsonl, tmp / name, tokens=TOKENS)

    docs = documents()
    for name, share in [("even", docs[0::2]), ("odd", docs[1::2])]:
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in share))
    torchrun = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", "-m", "harvest",
         *args("two")], cwd=ROOT, env={**os.environ, **ONE_THREAD}, capture_output=True, text=True, timeout=300)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    real_commit = store.StoreWriter._commit

    def commit(writer: store.StoreWriter, pack_state: dict) -> None:
        if writer.chunks_done == 3:
            raise Killed  # chunk 2's arrays are written, its commit is not
        real_commit(writer, pack_state)

    try:  # in this process, no process group: single-process harvests
        harvest(compose(harvest_overrides(tiny_gpt2, tmp / "even.jsonl", tmp / "even", tokens=150)))  # rank 0's 5 chunks
        harvest(compose(harvest_overrides(tiny_gpt2, tmp / "odd.jsonl", tmp / "odd", tokens=120)))  # rank 1's 4 chunks
        with pytest.MonkeyPatch.context() as m, pytest.raises(Killed):
            m.setattr(store.StoreWriter, "_commit", commit)
            harvest(compose(args("single")))
    finally:
        torch.set_num_threads(threads)
    single_digest = _digest(tmp / "single")
    two_digest = _digest(tmp / "two") if torchrun.returncode == 0 else None

    small = tmp / "small.jsonl"
    small.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:6]))
    jobs = [
        (_job, compose(args("killed")), tmp / "killed", {0: 3, 1: 2}),  # rank 0 dies in chunk 4, rank 1 in chunk 3
        (_job, compose(args("killed")), tmp / "resumed"),
        (_job, compose(args("stopped")), tmp / "stopped", {0: 2, 1: 2}),
        (_job, compose(args("single")), tmp / "refused"),
        (_job, compose(args("two")), tmp / "again"),
        (_job, compose(harvest_overrides(tiny_gpt2, small, tmp / "short", tokens=3000)), tmp / "short"),
        (_job, compose(harvest_overrides(tiny_gpt2, corpus_jsonl, tmp / "x", tokens=TOKENS, layer="[1,2]")
                       + [f"store='{tmp}/sites-{{layer}}'"]), tmp / "sites"),  # both layers from one pass
        (_job, compose(harvest_overrides(tiny_gpt2, corpus_jsonl, tmp / "layer1", tokens=TOKENS, layer=1)),
         tmp / "layer1"),
    ]
    spawn_local(_run_jobs, WORLD, jobs)
    return {"tmp": tmp, "torchrun": torchrun, "single_digest": single_digest, "two_digest": two_digest,
            "args": args}


def test_torchrun_writes_one_complete_store_with_its_manifest(parted):
    out = parted["torchrun"]
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count(f"wrote {TOKENS:,} tokens") == 1 and out.stdout.count("store: ") == 1  # rank 0 reports
    s = ActivationStore(parted["tmp"] / "two")
    assert s.complete and s.n_rows == TOKENS and s.n_chunks == 9
    even, odd = (ActivationStore(parted["tmp"] / n).attrs["progress"]["pack_state"]["docs_consumed"] for n in ("even", "odd"))
    assert s.attrs["parts"] == {"world": 2, "ranks": [
        {"rank": 0, "chunk_ids": {"start": 0, "stop": 9, "step": 2}, "n_tokens": 150, "docs_consumed": even},
        {"rank": 1, "chunk_ids": {"start": 1, "stop": 9, "step": 2}, "n_tokens": 120, "docs_consumed": odd}]}
    assert "progress" not in s.attrs  # each rank's resume state lives in its own file
    assert sorted(p.name for p in (parted["tmp"] / "two" / "parts").iterdir()) == ["rank-0.json", "rank-1.json"]


def test_rows_are_the_single_process_harvests_of_each_ranks_documents(parted):
    """Global chunk 2k is chunk k of a one-process harvest of documents 0, 2, 4, ..; chunk 2k + 1 of 1, 3, 5, .."""
    two = ActivationStore(parted["tmp"] / "two")
    for rank, name in enumerate(("even", "odd")):
        ref = ActivationStore(parted["tmp"] / name)
        for k in range(ref.n_chunks):
            i = 2 * k + rank
            np.testing.assert_array_equal(two.read_chunk_raw(i), ref.read_chunk_raw(k))
            np.testing.assert_array_equal(two.tokens[i * 30 : (i + 1) * 30], ref.tokens[k * 30 : (k + 1) * 30])
            np.testing.assert_array_equal(two.contexts[2 * i : 2 * i + 2], ref.contexts[2 * k : 2 * k + 2])


def test_rank_0_packs_only_its_own_documents(parted, tiny_gpt2):
    """Rank 0's sequences, in chunk order, are its own token stream: [eos] + document j, j = 0, 2, 4, .."""
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    stream = [t for doc in documents()[0::2][:60] for t in [tok.eos_token_id, *tok(doc, add_special_tokens=False)["input_ids"]]]
    two = ActivationStore(parted["tmp"] / "two")
    seqs = np.concatenate([two.contexts[2 * i : 2 * i + 2] for i in range(0, 9, 2)]).reshape(-1)
    assert seqs.tolist() == stream[: len(seqs)]


def test_merged_statistics_are_those_of_all_stored_rows(parted):
    s = ActivationStore(parted["tmp"] / "two")
    rows = np.concatenate([s.read_chunk(i) for i in range(s.n_chunks)]).astype(np.float64)
    np.testing.assert_allclose(s.mean, rows.mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(s.var, rows.var(0), rtol=1e-10, atol=1e-14)
    a, b = RunningStats.of(rows[:100]), RunningStats.of(rows[100:])  # the merge itself, on uneven halves
    a.merge(b)
    np.testing.assert_allclose(a.var, rows.var(0), rtol=1e-12)


def test_killed_ranks_resume_to_the_uninterrupted_store(parted):
    tmp = parted["tmp"]
    assert _outcomes(tmp / "killed") == [{"killed": True}] * 2
    assert _outcomes(tmp / "resumed") == [{"rows": 6 * 30}] * 2  # 3 + 3 chunks were left
    killed, clean = ActivationStore(tmp / "killed"), ActivationStore(tmp / "two")
    for name in ("acts", "tokens", "contexts"):
        np.testing.assert_array_equal(killed.group[name][:], clean.group[name][:])
    for key in ("n_tokens", "complete", "mean", "var", "parts"):
        assert killed.attrs[key] == clean.attrs[key]
    assert not list((tmp / "killed").rglob("*.partial"))


def test_an_unfinished_parted_store_says_so_and_refuses_one_process(parted):
    path = parted["tmp"] / "stopped"
    s = ActivationStore(path)
    assert _outcomes(parted["tmp"] / "stopped") == [{"killed": True}] * 2
    assert (s.complete, s.n_rows, s.attrs["parts"]) == (False, 0, {"world": 2})
    assert store.read_progress(path) == store.Progress(2, (1, 1))
    before = _digest(path)
    with pytest.raises(HarvestError) as e:
        harvest(compose(parted["args"]("stopped")))
    assert str(e.value) == (f"store {path} was harvested by 2 process(es) and can only be continued by as many, "
                            "not 1: relaunch with torchrun --nproc_per_node=2, choose another store= or pass "
                            "overwrite=true to replace it")
    assert _digest(path) == before


def test_two_processes_refuse_an_unfinished_single_process_store(parted):
    errors = [o["error"] for o in _outcomes(parted["tmp"] / "refused")]
    assert errors[0] == errors[1] and "\n" not in errors[0]
    assert errors[0].startswith(f"store {parted['tmp'] / 'single'} was harvested by 1 process(es)")
    assert "relaunch with one process (python -m harvest)" in errors[0]
    assert _digest(parted["tmp"] / "single") == parted["single_digest"]


def test_a_complete_store_has_nothing_to_do_with_any_number_of_processes(parted, capsys):
    path = parted["tmp"] / "two"
    assert _outcomes(parted["tmp"] / "again") == [{"rows": 0}] * 2
    assert harvest(compose(parted["args"]("two"))).rows == 0
    assert "is complete (270 tokens); nothing to do" in capsys.readouterr().out
    assert _digest(path) == parted["two_digest"]


def test_text_running_out_is_one_error_on_every_rank(parted):
    """6 documents, 3 per rank, for a budget of 100 chunks: each rank stops where its text ends, and every
    rank names the same budget, one that every rank's share of the text holds."""
    path = parted["tmp"] / "short"
    progress = store.read_progress(path)
    errors = [o["error"] for o in _outcomes(path)]
    stored, fit = sum(progress.done) * 30, progress.prefix * 30
    assert 0 < fit < stored < 3000 and errors[0] == errors[1]
    assert errors[0].startswith(f"the dataset ran out after {stored:,} stored tokens (< tokens=3,000); add text, or ")
    assert errors[0].endswith(f"pass tokens={fit} to mark this store complete" if progress.finished(progress.prefix)
                              else f"harvest tokens={fit} (what every rank's share of the text holds) into another store=")
    assert not ActivationStore(path).complete


def test_activation_store_and_batches_read_it_as_one_dataset(parted):
    s = ActivationStore(parted["tmp"] / "two")
    rows = np.concatenate([s.read_chunk(i) for i in range(s.n_chunks)])
    epoch = iter(Batches(s, list(range(s.n_chunks)), batch_size=27, seed=0, window_chunks=4))
    seen = torch.cat([next(epoch) for _ in range(TOKENS // 27)]).numpy()
    assert sorted(map(bytes, seen)) == sorted(map(bytes, rows))  # one epoch: every row once
    ctx, pos = s.context(31)  # row 1 of chunk 1 (rank 1's first chunk): sequence 2, position 2
    assert (ctx.tolist(), pos) == (s.contexts[2].tolist(), 2)


def test_several_sites_on_two_ranks_equal_their_single_site_parted_stores(parted):
    from tests.harvest.test_sites import _digest as data_digest  # every file but the root attributes

    tmp = parted["tmp"]
    assert all("rows" in o for o in _outcomes(tmp / "sites")), _outcomes(tmp / "sites")
    assert data_digest(tmp / "sites-2") == data_digest(tmp / "two")
    assert data_digest(tmp / "sites-1") == data_digest(tmp / "layer1")
    assert ActivationStore(tmp / "sites-1").complete and ActivationStore(tmp / "sites-2").complete
