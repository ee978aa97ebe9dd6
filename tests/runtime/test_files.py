"""runtime.files: a write either lands whole or leaves the old file untouched."""

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
