"""train.run_dir: the run folder's files are written whole, read back as written, and a finished run
opens only with the store it belongs to."""

import pytest
import torch

from harvest.store import ActivationStore
from runtime.errors import ToolkitError
from tests.train.test_loop import make_cfg, synthetic_store
from train.loop import train
from train.run_dir import RunDir, RunError
from train.saes import build


def test_files_round_trip(tmp_path):
    run = RunDir(tmp_path / "r")
    run.create()
    assert not (run.has_config or run.has_sae or run.finished or run.has_checkpoint)
    config = {"data": {"store": "s", "eval_frac": 0.05}, "model": {"arch": "topk", "width": 16}, "lr": None}
    run.write_config(config)
    assert run.read_config() == config
    for log in (run.METRICS, run.VALIDATION):
        with run.open_log(log) as f:
            f.write("".join(f'{{"step": {s}}}\n' for s in (0, 10, 20, 30)))
    run.drop_logs_after(20)
    assert run.read_metrics() == run.read_validation() == [{"step": 0}, {"step": 10}, {"step": 20}]
    run.save_checkpoint({"step": 7, "w": torch.arange(3)})
    state = run.load_checkpoint(torch.device("cpu"))
    assert state["step"] == 7 and torch.equal(state["w"], torch.arange(3))
    assert [p.name for p in run.path.iterdir() if "partial" in p.name] == []
    sae = build("topk", d=8, width=16, k=2)
    run.save_sae(sae)
    assert run.has_sae and run.sae_config() == {"arch": "topk", "d": 8, "width": 16, "k": 2, "aux_k": 0,
                                                      "aux_coeff": 0.03125, "transcoder": False, "skip": False}
    assert torch.equal(run.load_sae().W_dec, sae.W_dec)
    assert run.done() == {} and not run.result_is_fresh("eval.json")
    run.mark_done({"step": 1})
    run.write_result("eval.json", {"mse": 1.5})
    assert run.finished and run.done() == {"step": 1} and run.read_result("eval.json") == {"mse": 1.5}
    assert run.result_is_fresh("eval.json")
    assert RunDir.find(tmp_path) == [run] and RunDir.find(run.path) == [run]


def test_open_checks_the_run_and_its_store(tmp_path):
    store = synthetic_store(tmp_path / "store", n_chunks=10, d=16)
    train(make_cfg(store, "budget=steps:4", "model.width=32", "model.k=2"), tmp_path / "run")
    trained = RunDir(tmp_path / "run").open(torch.device("cpu"))
    assert trained.sae.d == 16 and trained.held.chunks == (9,) and isinstance(trained.store, ActivationStore)
    assert sum(len(x) for x in trained.held.rows(10_000)) == trained.store.chunk_rows
    other = synthetic_store(tmp_path / "narrow", n_chunks=4, d=8)
    with pytest.raises(RunError, match="d=16 activations but store"):
        RunDir(tmp_path / "run").open(torch.device("cpu"), store=str(other))
    with pytest.raises(ToolkitError, match="does not exist"):
        RunDir(tmp_path / "nope").open(torch.device("cpu"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="has no trained SAE"):
        RunDir(tmp_path / "empty").check_trained()


def test_a_log_cut_short_loses_its_last_line_only_and_a_resume_removes_it(tmp_path):
    """A kill or a full disk during an append leaves a last line without its newline: readers leave it
    out, the next launch's drop_logs_after removes it from the file; a damaged line anywhere else is
    named in one line."""
    run = RunDir(tmp_path / "r")
    run.create()
    f = run.path / run.METRICS
    f.write_bytes(b'{"step": 0}\n{"step": 10}\n{"step": 20, "lo')
    assert run.read_metrics() == [{"step": 0}, {"step": 10}] and run.last_logged_step() == 10
    run.drop_logs_after(10)
    assert f.read_bytes() == b'{"step": 0}\n{"step": 10}\n'
    for bad in (b'{"step": 0}\n{"step": 1\n{"step": 20}\n', b'{"step": 0}\n[1, 2]\n{"step": 20}\n',
                b'{"step": 0}\n{"step": "10"}\n{"step": 20}\n', b'{"step": 0}\n\xff\xfe\n{"step": 20}\n'):
        f.write_bytes(bad)
        with pytest.raises(RunError, match=rf"^{f} line 2 is not a log record \(.*\); delete that line"):
            run.read_metrics()


def test_non_finite_weights_are_refused_when_a_run_is_opened(tmp_path):
    run = RunDir(tmp_path / "r")
    run.create()
    sae = build("topk", d=8, width=16, k=2)
    with torch.no_grad():
        sae.W_dec[3, :2] = float("nan")
        sae.b_pre[0] = float("inf")
    run.save_sae(sae)
    with pytest.raises(RunError, match=r"sae\.safetensors holds non-finite weights: b_pre \(1 value\), W_dec "
                                       r"\(2 values\); nothing computed"):
        run.load_sae()


def test_results_are_refused_while_a_launch_writes_the_run(tmp_path):
    from tests.train.test_run_faults import _hold

    run = RunDir(tmp_path / "r")
    run.create()
    holder = _hold(run.path / RunDir.LOCK)
    try:
        with pytest.raises(RunError, match=f"is being written by another process: pid {holder.pid} on "):
            run.write_result(RunDir.EVAL, {"mse": 1.0})
        assert not run.file(RunDir.EVAL).exists()
    finally:
        holder.kill()
        holder.wait()
    run.write_result(RunDir.EVAL, {"mse": 1.0})  # the holder died: its lock is stale
    assert run.read_result(RunDir.EVAL) == {"mse": 1.0}


SHAPES = [b"[1, 2]", b'"text"', b"3", b"null", b"true", b"", b"{", b"\xff\xfe"]
READERS = {RunDir.STORE: RunDir.read_store, RunDir.DONE: RunDir.done, RunDir.TRACKER: RunDir.read_tracker,
           "sae/sae.json": RunDir.sae_config, RunDir.EVAL: lambda run: run.read_result(RunDir.EVAL),
           RunDir.CONFIG: RunDir.read_config}


@pytest.mark.parametrize("content", SHAPES + [b"model: 3", b"{model: {arch: topk}, data: [1]}"])
@pytest.mark.parametrize("name", list(READERS))
def test_a_run_file_of_another_shape_is_named_in_one_line(name, content, tmp_path):
    """Every JSON (and YAML) file of a run folder that someone else may have written is parsed at the
    boundary: anything but the object it should hold is one RunError naming the file, never a traceback."""
    run = RunDir(tmp_path / "r")
    run.create()
    run.save_sae(build("topk", d=8, width=16, k=2))
    run.mark_done({"step": 1})
    (run.path / name).write_bytes(content)
    with pytest.raises(RunError) as e:
        READERS[name](run)
    assert str(e.value).startswith(f"{run.path / name} ") and "\n" not in str(e.value)
