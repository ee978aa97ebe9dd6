"""runtime.files: a write either lands whole or leaves the old file untouched."""

import io
import json

import pytest

from runtime.files import PARTIAL, write_atomic, write_json, write_text


def test_write_json_and_text_replace_the_file(tmp_path):
    p = tmp_path / "a.json"
    write_json(p, {"x": 1, "name": "é"})
    assert json.loads(p.read_text()) == {"x": 1, "name": "é"}
    write_text(p, "new")
    assert p.read_text() == "new"
    assert list(tmp_path.iterdir()) == [p]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_litter(tmp_path):
    p = tmp_path / "ckpt.bin"
    p.write_bytes(b"old")

    def broken(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(p, broken, durable=True)
    assert p.read_bytes() == b"old"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["ckpt.bin"]  # no temporary left
    assert not list(tmp_path.glob("*" + PARTIAL))


def test_remove_litter_removes_temporaries_of_one_file_or_of_all(tmp_path):
    from runtime.files import remove_litter

    (tmp_path / "sub").mkdir()
    for name in ("checkpoint.pt.1a2b.partial", "metrics.jsonl.3c4d.partial", "sub/0.9f.partial", "keep.json"):
        (tmp_path / name).write_text("x")
    remove_litter(tmp_path, "checkpoint.pt")
    assert not (tmp_path / "checkpoint.pt.1a2b.partial").exists() and (tmp_path / "metrics.jsonl.3c4d.partial").exists()
    remove_litter(tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == ["keep.json"]


def test_read_text_file_reads_regular_files_only(tmp_path):
    """Files other processes or people may have written: a FIFO is refused at once (reading it would
    block until someone writes), a folder, a file too large or not UTF-8 in one OSError naming it."""
    import errno
    import os

    from runtime.files import read_text_file

    (tmp_path / "ok.json").write_text('{"a": "é"}')
    assert read_text_file(tmp_path / "ok.json") == '{"a": "é"}'
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    (tmp_path / "big").write_bytes(b"x" * 101)
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00")
    for name, why in (("fifo", "not a regular file"), ("folder", "not a regular file"),
                      ("big", "101 bytes, more than the 100 expected"), ("binary", "not UTF-8 text")):
        with pytest.raises(OSError) as e:
            read_text_file(tmp_path / name, max_bytes=100)
        assert e.value.filename == str(tmp_path / name) and e.value.strerror == why
        assert e.value.errno in (errno.EINVAL, errno.EFBIG)


def test_disk_full_is_found_behind_a_librarys_own_error(tmp_path):
    """torch.save reports a full disk as RuntimeError("... unexpected pos ..."); write_atomic raises the
    OSError behind it, naming the file, and leaves the old content and no litter."""
    import errno

    import torch

    from runtime.files import disk_full, disk_full_behind

    class Full(io.RawIOBase):  # a disk with 100 bytes left
        def __init__(self, f):
            self.f, self.n = f, 0

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:
            self.n += len(b)
            if self.n > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

    path = tmp_path / "state.pt"
    path.write_bytes(b"old")
    with pytest.raises(OSError) as e:
        write_atomic(path, lambda f: torch.save({"w": torch.zeros(1000)}, Full(f)))
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["state.pt"]
    try:
        torch.save({"w": torch.zeros(1000)}, Full(io.BytesIO()))
    except RuntimeError as wrapped:
        assert disk_full(wrapped) and disk_full_behind(wrapped).errno == errno.ENOSPC
    assert not disk_full(RuntimeError("something else")) and not disk_full(OSError(errno.EACCES, "denied"))
