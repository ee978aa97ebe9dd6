"""Fault injection on stores: damaged data is named (never read as zeros, never a crash), verify lists
it, repair=true re-creates it byte for byte; one writer per store; a full disk stops in one line and
the same command resumes to the uninterrupted store."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harvest import store
from harvest.config import HarvestError
from harvest.run import harvest
from harvest.store import ActivationStore, DamagedStore
from harvest.verify import main as verify_main
from runtime.files import PARTIAL, write_atomic
from runtime.location import LocalLocation
from tests.conftest import ROOT, compose, harvest_overrides


def _digest(folder: Path) -> str:
    """Of every file of a store but its root attributes (which record the store's path and runtime keys)."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / "zarr.json"):
        h.update(str(f.relative_to(folder)).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def pristine(tiny_gpt2, corpus_jsonl, tmp_path_factory):
    """A complete 10-chunk store and the overrides that wrote it."""
    path = tmp_path_factory.mktemp("integrity") / "pristine"
    args = harvest_overrides(tiny_gpt2, corpus_jsonl, path)
    harvest(compose(args))
    return path, args


@pytest.fixture
def copy(pristine, tmp_path):
    """A fresh copy of the pristine store to damage, the overrides that harvest into it, its digest."""
    import shutil

    src, args = pristine
    dst = tmp_path / "store"
    shutil.copytree(src, dst)
    return dst, [a if not a.startswith("store=") else f"store={dst}" for a in args], _digest(src)


def _chunk_file(path: Path, name: str, i: int) -> Path:
    return path / name / "c" / (str(i) if name == "tokens" else f"{i}/0")


def _delete(f: Path) -> None:
    f.unlink()


def _garbage(f: Path) -> None:  # the same size, other bytes (a bad sector, a botched copy)
    f.write_bytes(os.urandom(f.stat().st_size))


def _truncate(f: Path) -> None:  # an interrupted copy or rsync
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_one_byte(f: Path) -> None:  # decodes fine without a checksum: only the record catches it
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


@pytest.mark.parametrize(("damage", "message"), [
    (_delete, r"acts chunk 3 \(acts/c/3/0\) is missing"),
    (_garbage, r"acts chunk 3 \(acts/c/3/0\) does not match the checksum"),
    (_truncate, r"acts chunk 3 \(acts/c/3/0\) has [\d,]+ bytes where [\d,]+ were written"),
    (_flip_one_byte, r"acts chunk 3 \(acts/c/3/0\) does not match the checksum"),
])
def test_a_damaged_chunk_is_named_never_read_as_zeros(copy, damage, message):
    path, _, _ = copy
    damage(_chunk_file(path, "acts", 3))
    s = ActivationStore(path)
    s.read_chunk(2)  # the others read as before
    with pytest.raises(DamagedStore, match=f"^store {path} is damaged: {message}.*repair=true") as e:
        s.read_chunk(3)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["tokens", "contexts"])
def test_damaged_token_ids_are_named_too(copy, name):
    path, _, _ = copy
    _garbage(_chunk_file(path, name, 4))
    s = ActivationStore(path)
    with pytest.raises(DamagedStore, match=f"{name} chunk 4"):
        s.read_tokens(4) if name == "tokens" else s.sequence(4 * s.chunk_seqs)


def test_lost_array_metadata_is_named(copy):
    path, _, _ = copy
    (path / "acts" / "zarr.json").unlink()
    with pytest.raises(DamagedStore, match=rf"store {path} is damaged: array 'acts' has no readable metadata "
                                           r"\(acts/zarr.json\)"):
        ActivationStore(path)


def test_verify_lists_every_bad_chunk_and_repair_recreates_them_byte_for_byte(copy, capsys):
    path, args, digest = copy
    assert verify_main([f"store={path}"]) == 0
    assert "10 chunks x 3 arrays checked; all intact" in capsys.readouterr().out
    _delete(_chunk_file(path, "acts", 1))
    _garbage(_chunk_file(path, "acts", 4))
    _truncate(_chunk_file(path, "contexts", 4))
    _truncate(_chunk_file(path, "tokens", 7))
    (path / "acts" / "zarr.json").unlink()
    assert verify_main([f"store={path}"]) == 1
    out = capsys.readouterr().out
    assert "array 'acts' has no readable metadata" in out
    (path / "acts" / "zarr.json").write_text("{")  # unreadable rather than missing: the same repair
    harvest(compose([*args, "repair=true"]))
    out = capsys.readouterr().out
    assert "restored the metadata of array(s) acts" in out
    assert "repaired chunk(s) 1, 4, 7" in out and "identical to what was first written" in out
    assert _digest(path) == digest  # the store is again exactly what the harvest wrote
    assert verify_main([f"store={path}"]) == 0


def test_verify_output_names_each_bad_chunk(copy, capsys):
    path, _, _ = copy
    _delete(_chunk_file(path, "acts", 2))
    _flip_one_byte(_chunk_file(path, "tokens", 5))
    assert verify_main([f"store={path}"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "chunk 2: acts chunk 2 (acts/c/2/0) is missing"
    assert lines[1].startswith("chunk 5: tokens chunk 5 (tokens/c/5) does not match the checksum")
    assert lines[2].startswith(f"store {path}: 2 of 10 chunks damaged; rerun the harvest command")


def test_repair_of_an_intact_store_changes_nothing(copy, capsys):
    path, args, digest = copy
    harvest(compose([*args, "repair=true"]))
    assert "10 chunks verified intact; nothing to repair" in capsys.readouterr().out
    assert _digest(path) == digest


def test_repair_needs_a_store(tiny_gpt2, corpus_jsonl, tmp_path):
    with pytest.raises(HarvestError, match="repair=true needs an existing store: there is none at"):
        harvest(compose([*harvest_overrides(tiny_gpt2, corpus_jsonl, tmp_path / "none"), "repair=true"]))
    assert not (tmp_path / "none").exists()


def test_lost_store_attributes_are_named_and_overwrite_replaces_the_remains(copy):
    path, args, digest = copy
    (path / "zarr.json").unlink()
    with pytest.raises(DamagedStore, match="zarr.json .* is missing or unreadable"):
        ActivationStore(path)
    with pytest.raises(HarvestError, match="damaged beyond repair: its zarr.json .* overwrite=true"):
        harvest(compose(args))
    harvest(compose([*args, "overwrite=true"]))
    assert _digest(path) == digest


@pytest.mark.parametrize("app", ["harvest.verify", "eval"])
def test_the_command_line_says_it_in_one_line(copy, tmp_path, app):
    """A damaged store through the real CLIs: verify (exit 1, the list) and a reader (exit 2, one line)."""
    path, _, _ = copy
    if app == "harvest.verify":
        _truncate(_chunk_file(path, "acts", 0))
        out = subprocess.run([sys.executable, "-m", "harvest.verify", f"store={path}"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and out.stdout.startswith("chunk 0: acts chunk 0 (acts/c/0/0) has ")
        return
    from tests.train.test_loop import make_cfg
    from train.loop import train

    run = tmp_path / "run"  # held out at eval_frac 0.1: chunk 9
    train(make_cfg(path, "budget=steps:4", "batch_size=60", "eval_every=0", "data.window_chunks=2"), run)
    _truncate(_chunk_file(path, "acts", 9))
    out = subprocess.run([sys.executable, "-m", "eval", f"run={run}", "ce=false"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert out.stderr.startswith(f"eval: error: store {path} is damaged: acts chunk 9 (acts/c/9/0) has ")


# ------------------------------------------------------------------ a full disk


def _disk_fills_writing(target: str):
    """A LocalLocation.write that, writing the file `target` of the store, writes part of its temporary
    file and then finds the disk full (as write(2) does), through the real atomic writer."""
    real = LocalLocation.write

    def write(self, key, data):
        if key != target:
            return real(self, key, data)
        path = self.file(key)

        def half(f):
            f.write(b'{"acts": [')
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        write_atomic(path, half)

    return write


def test_a_full_disk_stops_in_one_line_and_the_same_command_resumes(pristine, tmp_path, monkeypatch):
    src, args = pristine
    args = [a if not a.startswith("store=") else f"store={tmp_path / 's'}" for a in args]
    monkeypatch.setattr(LocalLocation, "write", _disk_fills_writing("checksums/3.json"))  # chunk 3's checksum record
    with pytest.raises(HarvestError) as e:
        harvest(compose(args))
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"disk full writing {tmp_path / 's' / 'checksums' / '3.json'}: the store is intact "
                              "with 3 committed chunks")
    assert message.endswith("free space and rerun the same command to resume")
    assert not list((tmp_path / "s").rglob("*" + PARTIAL))  # temporaries removed
    assert not store.lock_location(tmp_path / "s").exists()  # the lock is released
    monkeypatch.undo()
    harvest(compose(args))
    assert _digest(tmp_path / "s") == _digest(src)


# ------------------------------------------------------------------ one writer per store


def _hold_lock(path: Path) -> subprocess.Popen:
    """Another process that takes the store's writer lock and keeps it until killed."""
    code = ("import sys, time; from runtime.lock import WriterLock; "
            "WriterLock(sys.argv[1], 'store').acquire(); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(store.lock_location(path))], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_ones_lock_is_taken_over(copy, capsys):
    path, args, digest = copy
    holder = _hold_lock(path)
    try:
        with pytest.raises(HarvestError) as e:
            harvest(compose([*args, "tokens=600"]))  # would extend the store
        assert str(e.value).startswith(f"store {path} is being written by another process: pid {holder.pid} on ")
        assert _digest(path) == digest  # untouched
        assert ActivationStore(path).read_chunk(0).shape == (30, 32)  # readers keep working
        assert verify_main([f"store={path}"]) == 0
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    capsys.readouterr()
    harvest(compose([*args, "tokens=600"]))  # the dead holder's lock is stale: taken over
    assert "taking over a stale lock" in capsys.readouterr().err
    assert ActivationStore(path).n_rows == 600
    assert not store.lock_location(path).exists()


def test_a_real_harvest_holds_its_store_against_a_second_launch(tiny_gpt2, corpus_jsonl, tmp_path):
    """`python -m harvest` running: a second harvest into its store is refused naming it; the first
    one completes the store undisturbed."""
    args = harvest_overrides(tiny_gpt2, corpus_jsonl, tmp_path / "s", tokens=6000)
    first = subprocess.Popen([sys.executable, "-m", "harvest", *args], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not store.lock_location(tmp_path / "s").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    with pytest.raises(HarvestError, match=f"is being written by another process: pid {first.pid} on "):
        harvest(compose(args))
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    s = ActivationStore(tmp_path / "s")
    assert s.complete and s.n_rows == 6000 and verify_main([f"store={tmp_path / 's'}"]) == 0


def test_verify_refuses_bad_input_in_one_line(tmp_path, capsys):
    for argv in ([], [f"path={tmp_path}"], [f"store={tmp_path / 'nothing'}"]):
        with pytest.raises(SystemExit) as e:
            verify_main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("harvest.verify: error: ") and "\n" not in err


RECORDS = [b'{"acts": "abc", "tokens": [1, 2], "contexts": [1, 2]}', b'{"acts": [1], "tokens": [1, 2]}',
           b'{"acts": [1.5, 2], "tokens": [1, 2]}', b'{"acts": [true, 2], "tokens": [1, 2]}', b'{"acts": {"a": 1}}',
           b'{"acts": null}', b'{"acts": [-1, 2]}', b"[1, 2]", b'"text"', b"3", b"null", b"", b"{", b"\xff"]


@pytest.mark.parametrize("record", RECORDS, ids=range(len(RECORDS)))
def test_a_checksum_record_of_any_other_shape_names_the_chunk(copy, record, capsys):
    """A record someone else wrote (any JSON type where [bytes, crc32] belongs, or no JSON): verify and
    every reader name chunk 2 as damaged in one line; it never crashes or reads the chunk unchecked."""
    path = copy[0]
    (path / store.CHECKSUMS / "2.json").write_bytes(record)
    assert verify_main([f"store={path}"]) == 1
    out = capsys.readouterr().out
    assert "chunk 2" in out and "has no readable checksum record (checksums/2.json)" in out
    with pytest.raises(DamagedStore, match=r"acts chunk 2 \(acts/c/2/0\) has no readable checksum record"):
        ActivationStore(path).read_chunk(2)
