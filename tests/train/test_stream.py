"""data.source=stream: training straight from the LM. Resume is exact, the held-out text never meets
the training text, eval and validation read the run's store of held-out text, bad values fail in one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from harvest.store import ActivationStore
from harvest.stream import HELD_OUT, TRAIN, StreamLM, documents
from tests.conftest import ROOT, harvest_overrides
from tests.train.test_loop import assert_same_weights, make_cfg, train_killed_at
from train.config import TrainError
from train.loop import train
from train.run_dir import RunDir

PERIOD = 4  # data.eval_frac=0.25: every 4th document is held out


@pytest.fixture(scope="module")
def marked_corpus(tmp_path_factory):
    """200 documents, document j marked `<j>` throughout, so that any sequence tells which documents it holds."""
    path = tmp_path_factory.mktemp("marked") / "docs.jsonl"
    words = "the store keeps every chunk it commits and names any damage".split()
    path.write_text("".join(json.dumps({"text": " ".join(f"<{j}> {words[(j + i) % len(words)]}" for i in range(12))})
                            + "\n" for j in range(200)))
    return path


def stream_overrides(model, corpus) -> str:
    return " ".join(harvest_overrides(model, corpus, "unused", tokens=300))


def stream_cfg(model, corpus, *extra):
    return make_cfg("unused", "data.source=stream", f"data.stream='{stream_overrides(model, corpus)}'",
                    "data.shuffle_tokens=120", "data.held_out_tokens=120", "data.eval_frac=0.25", "model=switch",
                    "model.width=64", "model.k=4", "model.n_experts=4", "budget=steps:20", "checkpoint_every=10",
                    "batch_size=32", "eval_every=10", "eval_tokens=60", *extra)


def test_a_streaming_run_resumes_exactly(tiny_gpt2, marked_corpus, tmp_path, monkeypatch):
    """Killed between checkpoints (in the second shuffle window), resumed from the text position its
    checkpoint holds: the weights of a run that never stopped, bit for bit."""
    cfg = stream_cfg(tiny_gpt2, marked_corpus)
    train(cfg, tmp_path / "straight")
    train_killed_at(cfg, tmp_path / "killed", 15, monkeypatch)
    train(cfg, tmp_path / "killed")
    assert_same_weights(tmp_path / "straight" / "sae", tmp_path / "killed" / "sae")
    for run in ("straight", "killed"):
        assert [json.loads(line)["step"] for line in (tmp_path / run / "validation.jsonl").read_text().splitlines()] \
            == [0, 10, 20]


def marks(tokenizer, seqs) -> set[int]:
    """The documents whose complete `<j>` marks the sequences hold."""
    return {int(m) for seq in seqs for m in re.findall(r"<(\d+)>", tokenizer.decode(seq))}


def test_held_out_text_never_meets_training_text(tiny_gpt2, marked_corpus, tmp_path):
    cfg = stream_cfg(tiny_gpt2, marked_corpus, "budget=steps:5", "eval_every=0")
    train(cfg, tmp_path / "run")
    source = StreamLM.load(cfg.data.stream_config())
    held = ActivationStore(tmp_path / "run" / RunDir.HELD_OUT)
    assert held.held_out_only and held.complete
    held_docs = marks(source.tokenizer, held.sequences_of(list(range(held.n_chunks)), held.n_chunks * held.chunk_seqs))
    chunks = source.chunks(TRAIN, PERIOD)
    trained = marks(source.tokenizer, [seq for _ in range(20) for seq in chunks.next()[1]])
    assert held_docs and trained
    assert all(j % PERIOD == PERIOD - 1 for j in held_docs)
    assert all(j % PERIOD != PERIOD - 1 for j in trained)
    # the two sides partition the text
    stream_cfg_ = cfg.data.stream_config()
    every = list(documents(stream_cfg_, TRAIN, 10**9))  # no document held out
    train_side, held_side = list(documents(stream_cfg_, TRAIN, PERIOD)), list(documents(stream_cfg_, HELD_OUT, PERIOD))
    assert held_side == every[PERIOD - 1 :: PERIOD]
    assert sorted(train_side + held_side) == sorted(every) and not set(train_side) & set(held_side)


def test_eval_and_the_cli_read_a_streaming_run(tiny_gpt2, marked_corpus, tmp_path):
    """`python -m train data.source=stream ...` then `python -m eval`: eval reads the run's held-out store."""
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "train", "data.source=stream",
                          f"data.stream='{stream_overrides(tiny_gpt2, marked_corpus)}'", "data.shuffle_tokens=120",
                          "data.held_out_tokens=120", "data.eval_frac=0.25", "model=topk", "model.width=64",
                          "model.k=4", "budget=steps:10", "batch_size=32", "eval_every=5", "eval_tokens=60",
                          "progress=false", "device=cpu", f"hydra.run.dir={run}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    out = subprocess.run([sys.executable, "-m", "eval", f"run={run}", "progress=false", "device=cpu", "ce_seqs=2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((run / "eval.json").read_text())
    assert result["store"] == str(run / RunDir.HELD_OUT) and result["ce_sae"] is not None
    assert RunDir(run).run_config().store == str(run / RunDir.HELD_OUT)


@pytest.mark.parametrize(("extra", "message"), [
    (["data.eval_frac=0", "eval_every=0"], "data.source=stream holds out documents for validation and eval: "
                                           "data.eval_frac must be > 0"),
    (["data.stream='preset=nope'"], "unknown preset 'nope'; choose one of demo, paper"),
    (["data.stream='layr=2'"], "unknown key 'layr'; did you mean 'layer'?"),
    (["data.shuffle_tokens=0"], "data.shuffle_tokens must be an integer >= 1, got 0"),
], ids=["no-held-out", "bad-preset", "bad-key", "no-shuffle"])
def test_bad_stream_values_fail_in_one_line(extra, message, tiny_gpt2, marked_corpus):
    with pytest.raises(TrainError) as e:
        stream_cfg(tiny_gpt2, marked_corpus, *extra)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_stream_beyond_its_model_fails_in_one_line_before_any_work(tiny_gpt2, marked_corpus, tmp_path):
    cfg = stream_cfg(tiny_gpt2, marked_corpus, f"data.stream='{stream_overrides(tiny_gpt2, marked_corpus)} layer=9'")
    with pytest.raises(TrainError, match=r"^layer 9 is out of range: .* has blocks 0\.\.3$"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / RunDir.HELD_OUT).exists() and not (tmp_path / "run" / RunDir.CHECKPOINT).exists()


def test_a_store_of_held_out_text_is_refused_for_training(tiny_gpt2, marked_corpus, tmp_path):
    train(stream_cfg(tiny_gpt2, marked_corpus, "budget=steps:2", "eval_every=0"), tmp_path / "run")
    with pytest.raises(TrainError, match="holds held-out text only"):
        train(make_cfg(tmp_path / "run" / RunDir.HELD_OUT, "model.width=64", "model.k=4", "budget=steps:2"),
              tmp_path / "other")
