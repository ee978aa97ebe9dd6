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
    assert not (tmp_path / ("ckpt.bin" + PARTIAL)).exists()
