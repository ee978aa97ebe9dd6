"""Stores on object storage: `memory://` in this process and a real S3 API (moto's server on loopback,
the `s3_server` fixture). The guarantees of local stores hold there: resume after kill -9 gives the
uninterrupted store, damage is named, one writer at a time, readers see only committed chunks,
credentials are never written anywhere, and bad locations fail in one line before any work."""

from __future__ import annotations

import hashlib
import json
import re
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from harvest import store
from harvest.cache import ChunkCache
from harvest.config import RUNTIME_KEYS, HarvestError
from harvest.run import harvest
from harvest.store import ActivationStore, StoreWriter
from harvest.verify import main as verify_main
from runtime.loopback_s3 import KEY_ID, SECRET
from runtime import lock as lock_module
from runtime.location import Location
from runtime.lock import WriterLock, holder
from tests.conftest import ROOT, compose, harvest_overrides, run_cli

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def digest(where) -> dict[str, str]:
    """{key: sha256} of every object of a store but its root zarr.json, which records the store's own
    path in its config; `same_store` compares that one's attributes."""
    loc = Location.of(where)
    return {k: hashlib.sha256(loc.read(k)).hexdigest() for k in loc.keys() if k != "zarr.json"}


def same_store(a, b) -> None:
    """The two stores hold the same bytes and the same attributes (the config's runtime keys apart, such
    as the store's own path)."""
    assert digest(a) == digest(b)
    attrs_a, attrs_b = store.read_attrs(a), store.read_attrs(b)
    for attrs in (attrs_a, attrs_b):
        attrs["config"] = {k: v for k, v in attrs["config"].items() if k not in RUNTIME_KEYS}
    assert attrs_a == attrs_b


@pytest.fixture(scope="module")
def local_store(tiny_gpt2, corpus_jsonl, tmp_path_factory):
    """The store every remote harvest below must equal: the same config, on local disk."""
    path = tmp_path_factory.mktemp("local") / "s"
    harvest(compose(harvest_overrides(tiny_gpt2, corpus_jsonl, path, tokens=600)))
    return path


@pytest.mark.parametrize("where", ["memory", "s3"])
def test_a_remote_store_equals_the_local_one_and_reads_the_same(where, tiny_gpt2, corpus_jsonl, local_store, request):
    url = ("memory://remote-test/s.zarr" if where == "memory" else f"{request.getfixturevalue('bucket')}/acts/s.zarr")
    result = harvest(compose(harvest_overrides(tiny_gpt2, corpus_jsonl, url, tokens=600)))
    assert str(result.store) == url and result.rows == 600
    same_store(url, local_store)
    remote, local = ActivationStore(url), ActivationStore(local_store)
    assert remote.complete and remote.path == url and remote.identity()["path"] == url
    for i in range(remote.n_chunks):
        assert np.array_equal(remote.read_chunk_raw(i), local.read_chunk_raw(i))
        assert np.array_equal(remote.read_tokens(i), local.read_tokens(i))
    assert [r.tobytes() for r in remote.read_chunks(list(range(remote.n_chunks)))] == \
        [r.tobytes() for r in local.read_chunks(list(range(local.n_chunks)))]
    assert store.verify(url, progress=False).ok
    assert not store.lock_location(url).exists()  # released
    # run again: nothing to do; extend: the new chunks only
    assert harvest(compose(harvest_overrides(tiny_gpt2, corpus_jsonl, url, tokens=600))).rows == 0
    assert harvest(compose(harvest_overrides(tiny_gpt2, corpus_jsonl, url, tokens=900))).rows == 300
    assert ActivationStore(url).n_rows == 900
    if where == "memory":
        Location.of(url).delete_tree()


def _progress(url: str) -> int:
    try:
        return json.loads(Location.of(url).read("zarr.json"))["attributes"]["progress"]["chunks_done"]
    except (OSError, KeyError, ValueError):
        return 0


def test_kill_9_on_s3_then_resume_gives_the_uninterrupted_store(tiny_gpt2, corpus_jsonl, bucket, s3_server):
    """`python -m harvest` into S3, killed twice mid-run (3 chunks written at once, so kills land inside
    writes); each re-run resumes (the dead process's lock is taken over: same host, pid gone); the
    result equals an uninterrupted harvest into the same bucket, object for object."""
    killed, clean = f"{bucket}/killed.zarr", f"{bucket}/clean.zarr"
    args = harvest_overrides(tiny_gpt2, corpus_jsonl, killed, tokens=1500, writer_threads=3)  # 50 chunks
    env = {**os.environ, **ONE_THREAD, **s3_server.env}
    kills = 0
    for kill_after in (3, 20):
        proc = subprocess.Popen([sys.executable, "-m", "harvest", *args], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while _progress(killed) < kill_after and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = _progress(killed)
        assert done >= kill_after, f"the harvest stopped at chunk {done} before the kill"
        if done == 50:
            break
        kills += 1
        assert not ActivationStore(killed).complete
        assert store.lock_location(killed).exists()  # the dead process's lock stays behind
    assert kills >= 1
    out = run_cli(args, env={**ONE_THREAD, **s3_server.env})
    assert out.returncode == 0, out.stderr
    assert "taking over a stale lock" in out.stderr
    out = run_cli(harvest_overrides(tiny_gpt2, corpus_jsonl, clean, tokens=1500, writer_threads=1),
                  env={**ONE_THREAD, **s3_server.env})
    assert out.returncode == 0, out.stderr
    same_store(killed, clean)


def test_verify_names_a_deleted_and_an_overwritten_object(tiny_gpt2, corpus_jsonl, local_store, bucket, capsys):
    url = f"{bucket}/s.zarr"
    harvest(compose(harvest_overrides(tiny_gpt2, corpus_jsonl, url, tokens=600)))
    loc = Location.of(url)
    loc.delete("acts/c/3/0")
    data = bytearray(loc.read("tokens/c/5"))
    data[-1] ^= 1
    loc.write("tokens/c/5", bytes(data))  # the same size, another last byte
    capsys.readouterr()
    assert verify_main([f"store={url}"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "chunk 3: acts chunk 3 (acts/c/3/0) is missing"
    assert out[1] == "chunk 5: tokens chunk 5 (tokens/c/5) does not match the checksum recorded when it was written"
    with pytest.raises(store.DamagedStore, match=rf"^store {url} is damaged: acts chunk 3 \(acts/c/3/0\) is missing"):
        ActivationStore(url).read_chunk(3)
    harvest(compose(harvest_overrides(tiny_gpt2, corpus_jsonl, url, tokens=600, repair="true")))
    assert verify_main([f"store={url}"]) == 0
    same_store(url, local_store)


def test_a_reader_of_an_incomplete_remote_store_sees_only_committed_chunks(local_store, bucket):
    url = f"{bucket}/partial.zarr"
    src = ActivationStore(local_store)
    writer = StoreWriter.create(url, src.layout, store.codec("blosc_zstd", 3), {"model": "m", "config": {}})
    seqs = [src.sequences_of([i], src.chunk_seqs) for i in range(4)]
    for i in range(2):
        writer.write_chunk(i, src.read_chunk_raw(i), seqs[i], {"docs_consumed": 0, "carry": []})
    writer.write_files(2, src.read_chunk_raw(2), seqs[2])  # written, not committed
    reader = ActivationStore(url)
    assert reader.n_chunks == 2 and not reader.complete
    assert store.committed_chunks(url) == [0, 1]
    with pytest.raises(IndexError):
        reader.read_chunk(2)
    assert np.array_equal(reader.read_chunk_raw(1), src.read_chunk_raw(1))


def test_the_second_writer_is_refused_and_a_lease_runs_out(tiny_gpt2, corpus_jsonl, bucket, s3_server):
    url = f"{bucket}/s.zarr"
    args = harvest_overrides(tiny_gpt2, corpus_jsonl, url, tokens=600)
    lock = store.lock_location(url)
    code = ("import sys, time; from runtime.lock import WriterLock; "
            "WriterLock(sys.argv[1], 'store').acquire(); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, lock.url], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **s3_server.env})
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(HarvestError, match=rf"^store {url} is being written by another process: pid {proc.pid} on "):
            harvest(compose(args))
        assert not store.is_store(url)  # nothing written
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # a lock from another host: live while its lease runs, stale after; a stale lease is taken over
    record = {"host": "node-17", "pid": 4242, "started": None, "time": time.time(), "command": "python -m harvest"}
    lock.write("", json.dumps({**record, "renewed": time.time()}).encode())
    with pytest.raises(HarvestError, match=r"pid 4242 on node-17 .*if that job is dead, its lease runs out 300 s "
                                           r"after its last renewal, or delete .*s\.zarr\.lock and relaunch$"):
        harvest(compose(args))
    lock.write("", json.dumps({**record, "renewed": time.time() - lock_module.LEASE_SECONDS - 1}).encode())
    assert holder(lock) is None
    harvest(compose(args))
    assert ActivationStore(url).complete and not lock.exists()


def test_a_lease_is_renewed_and_a_holder_that_lost_it_stops(bucket, monkeypatch):
    """While held, the lease is renewed by compare-and-swap; a holder whose lock was taken over (it
    stalled past its lease) finds out at its next renewal and `ensure()` refuses."""
    monkeypatch.setattr(lock_module, "LEASE_SECONDS", 0.4)
    lock = Location.of(f"{bucket}/x.lock")
    with WriterLock(lock, "store x") as held:
        first = json.loads(lock.read(""))["renewed"]
        deadline = time.time() + 10
        while json.loads(lock.read(""))["renewed"] == first and time.time() < deadline:
            time.sleep(0.05)
        assert json.loads(lock.read(""))["renewed"] > first  # renewed in place
        held.ensure()
        lock.write("", json.dumps({"host": "node-17", "pid": 1, "started": None, "time": 0.0}).encode())  # taken over
        with pytest.raises(lock_module.LockedError, match=r"^store x: lost its lock .*x\.lock"):
            while time.time() < deadline + 10:  # the next renewal finds out
                held.ensure()
                time.sleep(0.05)
    assert json.loads(lock.read(""))["host"] == "node-17"  # the new holder's lock is left alone


def test_two_launches_racing_for_a_lock_on_s3_one_wins(bucket):
    """The lock object is created with If-None-Match: * (the server refuses the second PUT), and a stale
    one is taken over with If-Match on its ETag: of two takers, one wins."""
    loc = Location.of(f"{bucket}/race.lock")
    assert loc.create("", b"a") and not loc.create("", b"b")
    assert loc.read("") == b"a"
    etag = loc.etag("")
    new = loc.replace_if("", b"c", etag)
    assert new == loc.etag("") and loc.replace_if("", b"d", etag) is None
    assert loc.read("") == b"c"


def test_credentials_appear_in_no_file_and_no_output(tiny_gpt2, corpus_jsonl, bucket, s3_server, tmp_path):
    """harvest -> train -> eval -> dashboard -> export against the S3 store, as a user runs them: the
    credentials (from the environment) are in none of the store's objects, the run folder's files, the
    export, or anything printed."""
    url = f"{bucket}/creds.zarr"
    env = {**os.environ, **s3_server.env, **ONE_THREAD}
    run = tmp_path / "run"
    commands = [
        ["harvest", *harvest_overrides(tiny_gpt2, corpus_jsonl, url, tokens=600)],
        ["train", f"data.store={url}", f"hydra.run.dir={run}", "model=switch", "model.width=64", "model.k=4",
         "model.n_experts=4", "budget=steps:20", "batch_size=32", "progress=false", "device=cpu",
         "eval_every=10", "eval_tokens=200", f"data.cache_dir={tmp_path / 'cache'}"],
        ["eval", f"run={run}", "progress=false", "device=cpu"],
        ["eval.dashboard", f"run={run}", "n_features=2", "device=cpu", "max_tokens=2000"],
        ["interop.export", f"run={run}", "format=saelens", f"out={tmp_path / 'export'}"],
    ]
    printed = []
    for command in commands:
        out = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, (command[0], out.stderr[-3000:])
        printed.append(out.stdout + out.stderr)
    assert json.loads((run / "store.json").read_text())["path"] == url
    assert list((tmp_path / "cache").rglob("acts/c/*/0"))  # the run read through its cache
    loc = Location.of(url)
    blobs = [loc.read(k) for k in loc.keys()] + [f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()]
    blobs += [p.encode() for p in printed]
    assert len(blobs) > 50
    for secret in (SECRET, KEY_ID):
        assert not any(secret.encode() in b for b in blobs)


@pytest.mark.parametrize(("store_url", "env", "message"), [
    ("s3://", {}, r"s3:// is not a usable URL: it names no bucket \(expected s3://<bucket>/<path>\)"),
    ("nosuchproto://b/x", {}, r"nosuchproto://b/x: unknown protocol 'nosuchproto'"),
    (f"s3://{KEY_ID}:{SECRET}@b/x", {}, r"s3://<hidden>@b/x: credentials in a URL end up in configs and logs"),
    ("{bucket}/x", {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""},
     r"{bucket}/x: no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \(or AWS_PROFILE\)"),
    ("{bucket}/x", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"},
     r"{bucket}/x: the endpoint does not answer \(http://127\.0\.0\.1:9, from AWS_ENDPOINT_URL\)"),
    ("s3://no-such-bucket-here/x", {}, r"s3://no-such-bucket-here/x: bucket 'no-such-bucket-here' does not exist"),
    ("{bucket}", {}, r"{bucket}: a store needs a path inside the bucket \({bucket}/<name>\)"),
], ids=["no-bucket", "unknown-protocol", "credentials-in-url", "no-credentials", "unreachable", "no-bucket-there",
        "bucket-root"])
def test_bad_locations_fail_in_one_line_before_any_work(store_url, env, message, tiny_gpt2, corpus_jsonl, bucket,
                                                        s3_server):
    store_url, message = store_url.replace("{bucket}", bucket), message.replace("{bucket}", bucket)
    clean = {k: v for k, v in {**s3_server.env, **env}.items()}
    full = {**os.environ, **clean}
    for k, v in clean.items():
        if v == "":
            full.pop(k)
    out = subprocess.run([sys.executable, "-m", "harvest", *harvest_overrides(tiny_gpt2, corpus_jsonl, store_url)],
                         cwd=ROOT, env=full, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harvest: error: "), out.stderr
    assert re.search(message, lines[0]), lines[0]
    assert SECRET not in out.stderr
    assert Location.of(bucket).keys() == []  # nothing written


def upload(local, url: str) -> None:
    """Copy a local store to `url`, its root zarr.json last (as a harvest there would leave it)."""
    src, dst = Location.of(local), Location.of(url)
    for key in [k for k in src.keys() if k != "zarr.json"] + ["zarr.json"]:
        dst.write(key, src.read(key))


def test_a_local_cache_serves_later_reads_checked_and_evicts_by_size(local_store, bucket, tmp_path):
    url = f"{bucket}/cached.zarr"
    upload(local_store, url)
    local = ActivationStore(local_store)
    n = local.n_chunks
    first = ChunkCache(tmp_path / "cache", 1e9, url)
    reader = ActivationStore(url, cache=first)
    for i in range(n):
        assert np.array_equal(reader.read_chunk_raw(i), local.read_chunk_raw(i))
    assert (first.hits, first.misses) == (0, n)
    Location.of(url).delete("acts/c/0/0")  # from now on only the cache holds chunk 0
    again = ChunkCache(tmp_path / "cache", 1e9, url)
    reader = ActivationStore(url, cache=again)
    for i in range(n):
        assert np.array_equal(reader.read_chunk_raw(i), local.read_chunk_raw(i))
    assert (again.hits, again.misses) == (n, 0)
    # a cached copy that does not match the store's record is dropped and fetched again, never used
    copy = again.files.file("acts/c/1/0")
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1
    copy.write_bytes(bytes(data))
    assert np.array_equal(reader.read_chunk_raw(1), local.read_chunk_raw(1))
    assert copy.read_bytes() == Location.of(local_store).read("acts/c/1/0")
    # evicted by size: the folder never holds much more than max_bytes
    one = Location.of(local_store).size("acts/c/2/0")
    small = ChunkCache(tmp_path / "small", 3.5 * one, url)
    reader = ActivationStore(url, cache=small)
    for i in range(1, n):
        reader.read_chunk_raw(i)
        assert sum(f.stat().st_size for f in (tmp_path / "small").rglob("*") if f.is_file()) <= 3.5 * one
    assert small.files.keys() == [f"acts/c/{i}/0" for i in range(n - 3, n)]  # the most recent ones


def _parts_done(url: str) -> int:
    """Chunks committed by the ranks of a parted store so far (0 before it exists)."""
    loc = Location.of(url)
    done = 0
    for rank in range(2):
        try:
            done += json.loads(loc.read(f"parts/rank-{rank}.json"))["chunks_done"]
        except (OSError, KeyError, ValueError):
            pass
    return done


def kill_9_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (torchrun starts its workers in sessions of
    their own, so killing its process group would leave them running)."""
    import psutil  # installed with accelerate

    parent = psutil.Process(pid)
    for p in [*parent.children(recursive=True), parent]:
        p.send_signal(signal.SIGKILL)


def test_two_ranks_write_one_store_in_a_bucket_and_resume_after_kill_9(tiny_gpt2, corpus_jsonl, bucket, s3_server,
                                                                       tmp_path):
    """torchrun's ranks (here 2 on this host; on a cluster, on several) write their shares of one parted
    store in the bucket, each committing its own chunks; killed mid-run (every process of the launch)
    and relaunched, they end with the store two ranks write on local disk."""
    env = {**os.environ, **ONE_THREAD, **s3_server.env}
    url = f"{bucket}/parted.zarr"

    def torchrun(store_at) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "harvest",
             *harvest_overrides(tiny_gpt2, corpus_jsonl, store_at, tokens=3000)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    proc = torchrun(url)
    deadline = time.time() + 180
    while _parts_done(url) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    kill_9_tree(proc.pid)
    proc.communicate()
    assert 4 <= _parts_done(url) < 100 and not ActivationStore(url).complete
    for store_at in (url, tmp_path / "local"):
        proc = torchrun(store_at)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    s = ActivationStore(url)
    assert s.complete and s.n_rows == 3000 and s.attrs["parts"]["world"] == 2
    same_store(url, tmp_path / "local")


@pytest.mark.parametrize(("env", "message"), [
    ({"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}, "no credentials"),
    ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "the endpoint does not answer"),
], ids=["no-credentials", "unreachable"])
def test_training_on_a_store_it_cannot_reach_fails_in_one_line(env, message, bucket, s3_server, tmp_path):
    full = {**os.environ, **s3_server.env, **env}
    for k, v in env.items():
        if v == "":
            full.pop(k)
    out = subprocess.run([sys.executable, "-m", "train", f"data.store={bucket}/x.zarr", f"hydra.run.dir={tmp_path / 'r'}",
                          "progress=false", "device=cpu"], cwd=ROOT, env=full, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"train: error: {bucket}/x.zarr: {message}"), out.stderr
    assert SECRET not in out.stderr
    assert not (tmp_path / "r" / "checkpoint.pt").exists()
