"""runtime.lock: a lock file someone else wrote, in any shape, is read safely: a launch is refused while
its holder may live and takes the lock over once it is stale, never a traceback."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from runtime.lock import LockedError, WriterLock, holder

GOOD = {"host": socket.gethostname(), "pid": os.getpid(), "started": None, "time": 0.0, "command": "x"}
WRONG = [1, 2.5, "text", [1], {"a": 1}, None, True]  # a value of every JSON type
# every field given a value of every other type, then JSON that is no object, and text that is no JSON
SHAPES = [json.dumps({**GOOD, field: value}) for field in GOOD for value in WRONG
          if not (field == "started" and (value is None or isinstance(value, str)))
          and not (field == "time" and type(value) in (int, float))
          and not (field == "command" and isinstance(value, str))
          and not (field == "host" and isinstance(value, str))
          and not (field == "pid" and type(value) is int)]
SHAPES += [json.dumps({k: v for k, v in GOOD.items() if k != field}) for field in ("host", "pid")]
SHAPES += [json.dumps(v) for v in WRONG if not isinstance(v, dict)] + ["", "{", "\x00\xff", "{" * 10_000]


def aged(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


@pytest.mark.parametrize("content", SHAPES, ids=[f"shape{i}" for i in range(len(SHAPES))])  # the pid varies
def test_a_lock_file_of_any_other_shape_is_taken_over_once_stale(content, tmp_path, capsys):
    lock = tmp_path / "x.lock"
    lock.write_text(content)
    aged(lock, 60)
    assert holder(lock) is None
    with WriterLock(lock, "run x"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "taking over a stale lock" in capsys.readouterr().err and not lock.exists()


@pytest.mark.parametrize("content", SHAPES[:3] + SHAPES[-4:], ids=[f"shape{i}" for i in range(7)])  # the pid varies
def test_a_lock_file_of_another_shape_just_written_refuses_a_launch(content, tmp_path):
    lock = tmp_path / "x.lock"
    lock.write_text(content)
    with pytest.raises(LockedError, match=r"^run x is being written by another process: .*lock file being written"):
        WriterLock(lock, "run x").acquire()
    assert lock.read_text() == content


def test_a_live_holder_is_named_and_other_things_at_the_lock_path_are_named(tmp_path):
    lock = tmp_path / "x.lock"
    lock.write_text(json.dumps({**GOOD, "time": time.time()}))
    with pytest.raises(LockedError, match=rf"^run x is being written by another process: pid {os.getpid()} on "):
        WriterLock(lock, "run x").acquire()
    folder = tmp_path / "y.lock"
    folder.mkdir()
    aged(folder, 60)
    with pytest.raises(LockedError, match=r"y\.lock is in the way of its lock file and cannot be removed \(Is a "
                                          r"directory\); remove it and relaunch$"):
        WriterLock(folder, "run y").acquire()
    fifo = tmp_path / "z.lock"
    os.mkfifo(fifo)
    aged(fifo, 60)
    with WriterLock(fifo, "run z"):  # read without blocking, stale, replaced
        assert fifo.is_file()
