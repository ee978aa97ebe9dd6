"""Automated interpretability against a real loopback chat-completions server with scripted answers.

The LLM side (prompts, parsing, retries, cache, concurrency, scores) runs on hand-made samples; one
module-scoped tiny run (harvested + trained here) checks the SAE side end to end, in-process and via the CLI.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import numpy as np
import pytest
import torch
from hydra import compose as hydra_compose, initialize_config_dir

from eval.autointerp import AutointerpConfig, AutointerpError, main, run_autointerp
from eval.detection import (EXPLAINER_SYSTEM, Context, FeatureSample, aggregate, explain_and_score, parse_explanation,
                            parse_judgments, wilson)
from eval.llm import ChatClient, Counters, Endpoint, LLMError, ResponseCache
from harvest.run import harvest
from harvest.store import ActivationStore
from tests.conftest import CONF, ROOT, compose, harvest_overrides
from tests.train.test_loop import make_cfg
from harvest.held_out import split_chunks
from train.loop import train
from train.saes import load

Responder = Callable[[dict[str, Any]], tuple[int, str]]


class Server:
    """A chat-completions server on 127.0.0.1: records every request, answers with `responder(body)`
    -> (status, content), and tracks the most requests it ever had in flight at once."""

    def __init__(self, responder: Responder, delay: float = 0.0):
        self.responder, self.delay = responder, delay
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, **body})
                    server.headers.append(dict(self.headers))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay)
                    status, content = server.responder(body)
                except Exception as e:  # noqa: BLE001  (a broken script is a 500, seen by the test)
                    status, content = 500, repr(e)
                finally:
                    with server.lock:
                        server.in_flight -= 1
                data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
                                  if status == 200 else {"error": content}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(responder: Responder, delay: float = 0.0) -> Server:
        servers.append(Server(responder, delay))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def is_explainer(body: dict[str, Any]) -> bool:
    return body["messages"][0]["content"] == EXPLAINER_SYSTEM


def excerpts(body: dict[str, Any]) -> list[str]:
    return re.findall(r"^Excerpt \d+: (.*)$", body["messages"][1]["content"], re.M)


def banana(body: dict[str, Any]) -> tuple[int, str]:
    """Explains every feature as "banana"; judges an excerpt active iff it contains "banana"."""
    if is_explainer(body):
        return 200, "Let me see.\nExplanation: the word banana."
    return 200, json.dumps([int("banana" in e) for e in excerpts(body)])


def client(server: Server, counters: Counters | None = None, cache: ResponseCache | None = None,
           **kw: Any) -> ChatClient:
    opts = dict(timeout_s=5, max_retries=3, backoff_s=0.01) | kw
    return ChatClient(Endpoint(server.url, "test-model", "OPENAI_API_KEY", 0.0, 256), counters or Counters(), cache, **opts)


def ctx(row: int, decile: int, text: str) -> Context:
    return Context(row, decile, float(decile), text, text, [])


def samples() -> list[FeatureSample]:
    """Feature 7: "banana" in deciles 6-10 only and in 1 of 4 negatives; feature 2: in every decile."""
    explain = [Context(0, -1, 9.0, "I ate a banana", "I ate a <<banana>>", [(" banana", 9.0)])]
    f7 = [ctx(10 * d + i, d, f"ctx {d}.{i}: " + ("a ripe banana" if d > 5 else "an apple"))
          for d in range(1, 11) for i in range(2)]
    f7 += [ctx(500 + i, 0, f"neg {i}: " + ("banana bread" if i == 0 else "plain text")) for i in range(4)]
    f2 = [ctx(10 * d, d, f"two {d}: banana split") for d in range(1, 11)]
    f2 += [ctx(600 + i, 0, f"none {i}: nothing here") for i in range(3)]
    explain2 = [Context(1, -1, 9.0, "a banana split", "a <<banana>> split", [(" banana", 9.0)])]
    return [FeatureSample(7, 30, 9.0, explain, f7), FeatureSample(2, 20, 9.0, explain2, f2)]


def test_prompts_and_scores_with_a_scripted_scorer(serve, monkeypatch):
    monkeypatch.setenv("AUTOINTERP_TEST_KEY", "s3cret")
    server = serve(banana)
    counters = Counters()
    keyed = ChatClient(Endpoint(server.url, "explainer-llm", "AUTOINTERP_TEST_KEY", 0.0, 64), counters,
                       timeout_s=5, backoff_s=0.01)
    scorer = ChatClient(Endpoint(server.url, "scorer-llm", "AUTOINTERP_UNSET_VAR", 0.0, 32), counters,
                        timeout_s=5, backoff_s=0.01)
    res = explain_and_score(samples(), keyed, scorer, batch_contexts=3, concurrency=2, seed=1)
    assert all(r["path"] == "/v1/chat/completions" for r in server.requests)
    explains = [b for b in server.requests if is_explainer(b)]
    scores = [(b, h) for b, h in zip(server.requests, server.headers, strict=True) if not is_explainer(b)]
    assert len(explains) == 2 and {b["model"] for b in explains} == {"explainer-llm"}
    assert all(re.search("^Excerpt 1: (I ate a|a) <<banana>>", b["messages"][1]["content"], re.M) and
               'Active tokens: " banana" 10' in b["messages"][1]["content"] for b in explains)
    assert explains[0]["max_tokens"] == 64 and explains[0]["temperature"] == 0.0
    # 24 + 13 contexts in batches of <= 3; the key only goes to the role whose variable is set
    assert len(scores) == 8 + 5 and {b["model"] for b, _ in scores} == {"scorer-llm"}
    assert all(h.get("Authorization") == "Bearer s3cret" for b, h in zip(server.requests, server.headers, strict=True)
               if is_explainer(b))
    assert all("Authorization" not in h for _, h in scores)
    seen7 = []
    for b, _ in scores:
        user = b["messages"][1]["content"]
        assert user.startswith("Explanation: the word banana.\n\nExcerpt 1: ") and "<<" not in user
        assert [int(n) for n in re.findall(r"^Excerpt (\d+):", user, re.M)] == list(range(1, len(excerpts(b)) + 1))
        n, system = len(excerpts(b)), b["messages"][0]["content"]
        if n > 1:  # the answer format, with the number of excerpts, in the system prompt and after the excerpts
            assert f"Reply with exactly {n} lines" in system and user.endswith(f'to "{n}: ...".')
        else:  # a single excerpt is a plain yes/no question
            assert "Reply with only yes or no." in system and user.endswith("Answer yes or no.")
        seen7 += [e for e in excerpts(b) if e.startswith(("ctx", "neg"))]
    texts7 = [c.text for c in samples()[0].contexts]
    assert sorted(seen7) == sorted(texts7) and seen7 != texts7  # every context once, shuffled
    r7, r2 = res
    assert r7["status"] == "ok" and r7["explanation"] == "the word banana."
    assert r7["recall"] == [0.0] * 5 + [1.0] * 5 and r7["judged"] == [2] * 10
    assert r7["negative_accuracy"] == 0.75 and r7["recall_all"] == 0.5 and r7["balanced_accuracy"] == 0.625
    assert r7["recall_ci"][0][0] == 0.0 and 0.5 < r7["recall_ci"][0][1] < 0.9
    assert r7["recall_ci"][9][1] == 1.0 and r7["recall_ci"][9][0] == pytest.approx(1 - r7["recall_ci"][0][1])
    assert r2["recall"] == [1.0] * 10 and r2["negative_accuracy"] == 1.0 and r2["balanced_accuracy"] == 1.0
    assert r7["unparseable"] == r7["failed"] == 0
    agg = aggregate(res, 0.95, 500, 0)
    assert agg["recall"][0]["mean"] == 0.5 and agg["recall"][0]["n"] == 2
    assert agg["recall"][0]["lo"] == 0.0 and agg["recall"][0]["hi"] == 1.0  # two features: 0 and 1
    assert agg["recall"][9] == {"mean": 1.0, "lo": 1.0, "hi": 1.0, "n": 2}
    assert agg["balanced_accuracy"]["mean"] == pytest.approx(0.8125)
    assert counters.as_dict()["calls"] == 15 and counters.as_dict()["http_requests"] == 15


def test_wilson_interval():
    lo, hi = wilson(8, 10, 0.95)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 0, 0.95) is None and wilson(0, 5, 0.95)[0] == 0.0


def test_parsing():
    assert parse_judgments("[1, 0, 1]", 3) == [1, 0, 1]
    assert parse_judgments("Sure! Here: [true, false]\n", 2) == [1, 0]
    assert parse_judgments('<think>maybe [0, 0]</think> ["yes", "no"]', 2) == [1, 0]
    assert parse_judgments("[1, 0] then corrected: [0, 1, 1]", 3) == [0, 1, 1]
    assert parse_judgments("1: yes\n2: No\nExcerpt 3: yes", 3) == [1, 0, 1]
    assert parse_judgments("1. no\n2) yes", 2) == [0, 1]
    for bad in ("[1, 0]", "[1, 2, 0]", "yes yes no", "1: yes\n3: no", "", "[1, 0, oops]",
                "Excerpt 1: The cat sat.\nExcerpt 2: KING HENRY.\nExcerpt 3:", "1: yes\n2: no\n3: no\n2: yes"):
        assert parse_judgments(bad, 3) is None, bad  # echoes, gaps and contradictions are never guessed
    assert parse_judgments("1: yes\n2: no\n2: No, it is not\n3: yes", 3) == [1, 0, 1]  # a repeat that agrees
    assert parse_judgments("**2**: yes\n**1**: no", 2) == [0, 1]
    # one excerpt: a reply that starts with its verdict
    assert parse_judgments("No. The feature is not active in", 1) == [0]
    assert parse_judgments("**Yes**, it is about fruit.", 1) == [1]
    assert parse_judgments("Answer: no", 1) == [0] and parse_judgments("1: yes", 1) == [1]
    for bad in ("The feature is active in excerpt 1, but not in the context.", "Excerpt 1: She ate a banana.",
                "Excerpt 2: No, no, no", "1", "Nothing fits.", "yes"):
        assert parse_judgments(bad, 1 if bad != "yes" else 2) is None, bad
    assert parse_explanation("  Explanation: Plural nouns.  ") == "Plural nouns."
    assert parse_explanation("<think>hmm</think>\n**Explanation:** \"dates in 1999\"\n") == "dates in 1999"
    assert parse_explanation("Tokens after a comma.") == "Tokens after a comma."
    assert parse_explanation("Explanation:   \n") is None and parse_explanation("") is None
    # the prompt's excerpts copied back are no explanation (answers of the 135M demo model)
    assert parse_explanation('Excerpt 1: "man governed with one!"\nExcerpt 2: "inable baseness, it is') is None
    assert parse_explanation('Excerpt 1:\n\nThe feature is "and".\n\nExcerpt 2:\n') == 'The feature is "and".'
    assert parse_explanation("Explanation: Excerpt 3: to keep\nActive tokens: \" to\" 10") is None


def test_garbage_and_line_answers_are_counted_not_raised(serve):
    def answer(body: dict[str, Any]) -> tuple[int, str]:
        if is_explainer(body):
            return 200, "Explanation: banana"
        n = len(excerpts(body))
        if any(e.startswith(("two", "none")) for e in excerpts(body)):  # feature 2: the "1: yes" format
            return 200, "\n".join(f"{i}: {'yes' if 'banana' in e else 'no'}" for i, e in enumerate(excerpts(body), 1))
        return 200, "I cannot tell." if "apple" in excerpts(body)[0] else f"[{','.join(['1'] * (n - 1))}]"
    server = serve(answer)
    counters = Counters()
    res = explain_and_score(samples(), client(server, counters), client(server, counters), batch_contexts=4)
    r7, r2 = res
    assert r7["unparseable"] == 6 and r7["status"] == "ok" and r7["recall"] == [None] * 10
    assert all(c["judged"] is None for c in r7["contexts"]) and r7["balanced_accuracy"] is None
    assert r2["unparseable"] == 0 and r2["recall"] == [1.0] * 10 and r2["negative_accuracy"] == 1.0
    assert r7["scorer_answers"] == r7["scorer_unparseable"] == 6 and r2["scorer_unparseable"] == 0

    def bad_explainer(body: dict[str, Any]) -> tuple[int, str]:
        return (200, "Explanation:") if is_explainer(body) else banana(body)
    server = serve(bad_explainer)
    silent = FeatureSample(9, 0, 0.0, [], [ctx(700, 0, "never fires")])  # e.g. an explicitly asked dead latent
    res = explain_and_score([*samples(), silent], client(server), client(server))
    assert [r["status"] for r in res] == ["unparseable"] * 2 + ["no_examples"]
    assert [r["unparseable"] for r in res] == [1, 1, 0]
    assert len(server.requests) == 2  # nothing scored without an explanation, nothing asked without examples
    assert aggregate(res, 0.95, 10, 0)["balanced_accuracy"]["n"] == 0


def test_cache_makes_a_rerun_free(serve, tmp_path):
    server = serve(banana)
    first, second = Counters(), Counters()
    cache = ResponseCache(tmp_path / "cache")
    a = explain_and_score(samples(), client(server, first, cache), client(server, first, cache), batch_contexts=5)
    sent = len(server.requests)
    assert sent == 2 + 5 + 3 and first.as_dict()["cache_hits"] == 0
    b = explain_and_score(samples(), client(server, second, cache), client(server, second, cache), batch_contexts=5)
    assert len(server.requests) == sent and a == b
    assert second.as_dict()["cache_hits"] == second.as_dict()["calls"] == sent
    assert second.as_dict()["http_requests"] == 0
    files = sorted((tmp_path / "cache").rglob("*"))
    assert len([f for f in files if f.is_file()]) == sent and not [f for f in files if ".tmp" in f.name]
    # another temperature is another request
    warm = ChatClient(Endpoint(server.url, "test-model", "OPENAI_API_KEY", 0.7, 256), Counters(), cache, timeout_s=5,
                      max_retries=0)
    warm.complete(server.requests[0]["messages"])
    assert len(server.requests) == sent + 1


@pytest.mark.parametrize("status", [500, 429])
def test_retries_then_success(serve, status):
    calls = []

    def flaky(body: dict[str, Any]) -> tuple[int, str]:
        calls.append(1)
        return (status, "busy") if len(calls) <= 2 else (200, "fine")
    counters = Counters()
    assert client(serve(flaky), counters).complete([{"role": "user", "content": "x"}]) == "fine"
    c = counters.as_dict()
    assert c["retries"] == 2 and c["http_requests"] == 3 and c["failed"] == 0 and c["calls"] == 1


def test_failures_are_counted_not_raised(serve):
    down = serve(lambda body: (503, "overloaded"))
    counters = Counters()
    res = explain_and_score(samples(), client(down, counters, max_retries=2), client(down, counters))
    c = counters.as_dict()
    assert [r["status"] for r in res] == ["failed"] * 2 and [r["failed"] for r in res] == [1, 1]
    assert c["failed"] == 2 and c["http_requests"] == 6 and c["retries"] == 4
    assert "HTTP 503" in c["errors"][0] and "gave up after 3 attempts" in c["errors"][0]
    # a client error is not retried
    counters = Counters()
    with pytest.raises(LLMError, match="HTTP 404"):
        client(serve(lambda body: (404, "no such model")), counters).complete([{"role": "user", "content": "x"}])
    assert counters.as_dict()["http_requests"] == 1
    # nothing listening: connection errors are retried, then fail
    port = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    url = f"http://127.0.0.1:{port.server_address[1]}/v1"
    port.server_close()
    counters = Counters()
    refused = ChatClient(Endpoint(url, "m", "OPENAI_API_KEY", 0.0, 256), counters, timeout_s=2, max_retries=2, backoff_s=0.01)
    with pytest.raises(LLMError, match="cannot reach"):
        refused.complete([{"role": "user", "content": "x"}])
    assert counters.as_dict()["http_requests"] == 3 and counters.as_dict()["failed"] == 1


def test_concurrency_is_bounded(serve):
    server = serve(banana, delay=0.15)
    res = explain_and_score(samples(), client(server), client(server), batch_contexts=2, concurrency=3)
    assert len(server.requests) == 2 + 12 + 7 and res[0]["balanced_accuracy"] == 0.625
    assert 2 <= server.max_in_flight <= 3


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF / "eval"), version_base="1.3"):
        return hydra_compose("autointerp", overrides=list(overrides))


@pytest.mark.parametrize("overrides, message", [
    ([], "run=<run dir> is required"),
    (["run=x"], "explainer.model=<name> is required"),
    (["run=x", "explainer.model=m", "n_features=0"], "n_features must be an integer >= 1, got 0"),
    (["run=x", "explainer.model=m", "per_decile=0"], "per_decile must be an integer >= 1, got 0"),
    (["run=x", "explainer.model=m", "explainer.base_url=localhost:8000/v1"],
     "explainer.base_url 'localhost:8000/v1' must start with http:// or https://"),
    (["run=x", "explainer.model=m", "scorer.base_url=http://"], "scorer.base_url 'http://' has no host"),
    (["run=x", "explainer.model=m", "window=4", "after=4"], "after must be below window, got after=4, window=4"),
    (["run=x", "explainer.model=m", "concurrency=0"], "concurrency must be an integer >= 1, got 0"),
    (["run=x", "explainer.model=m", "features=[]"], "features must be a non-empty list of latent ids >= 0"),
])
def test_bad_config(overrides, message):
    with pytest.raises(AutointerpError, match=re.escape(message)):
        AutointerpConfig.from_omegaconf(compose_cfg(*overrides))


def test_scorer_defaults_to_the_explainer():
    cfg = AutointerpConfig.from_omegaconf(compose_cfg("run=x", "explainer.model=m", "scorer.max_tokens=7"))
    assert cfg.scorer == Endpoint("http://localhost:8000/v1", "m", "OPENAI_API_KEY", 0.0, 7)


@pytest.fixture(scope="module")
def tiny_run(tiny_gpt2, corpus_jsonl, tmp_path_factory):
    """A 20-chunk store of the tiny GPT-2 (d=32) and a topk run with 10 held-out chunks (300 rows)."""
    root = tmp_path_factory.mktemp("autointerp")
    harvest(compose(harvest_overrides(tiny_gpt2, corpus_jsonl, root / "store", tokens=600)))
    train(make_cfg(root / "store", "model=topk", "model.width=64", "model.k=4", "budget=steps:40", "batch_size=32",
                   "data.eval_frac=0.5"), root / "run")
    return root


RUN_ARGS = ["n_features=3", "min_active=8", "n_explain=2", "per_decile=1", "n_negative=3", "window=8", "after=2",
            "batch_size=64", "outlier_factor=null", "device=cpu", "progress=false", "backoff_s=0.01"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # runpy: the module was imported before
def test_nothing_scored_exits_non_zero_and_keeps_the_earlier_result(tiny_run, tmp_path, monkeypatch, capsys):
    """An endpoint nobody listens at: `python -m eval.autointerp` says why in one line, exits 2, and an
    earlier autointerp.json is left as it was (it used to be replaced by a result of 0 scored features)."""
    from tests.test_bad_input import run_in_process

    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    (run / "autointerp.json").write_text('{"earlier": "result"}')
    port = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    url = f"http://127.0.0.1:{port.server_address[1]}/v1"
    port.server_close()
    monkeypatch.chdir(tmp_path)
    code, err = run_in_process("eval.autointerp", [f"run={run}", f"explainer.base_url={url}", "explainer.model=tiny",
                                                   *RUN_ARGS, "max_retries=0", "cache=false"], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("autointerp: error: no feature was scored (3 failed; first error: "), err
    assert "cannot reach" in last and last.endswith(f"{run / 'autointerp.json'} is left as it was")
    assert (run / "autointerp.json").read_text() == '{"earlier": "result"}'
    assert not (run / "autointerp.png").exists()


def test_end_to_end_on_a_tiny_run(tiny_run, serve, tmp_path, capsys):
    def answer(body: dict[str, Any]) -> tuple[int, str]:
        if is_explainer(body):
            return 200, "Explanation: fires on text."
        return 200, json.dumps([1] * len(excerpts(body)))  # "fires" everywhere
    server = serve(answer)
    run = tiny_run / "run"
    args = [f"run={run}", f"explainer.base_url={server.url}", "explainer.model=tiny", *RUN_ARGS]
    out = run_autointerp(AutointerpConfig.from_omegaconf(compose_cfg(*args)))
    saved = json.loads((run / "autointerp.json").read_text())
    assert saved["aggregate"] == json.loads(json.dumps(out["aggregate"]))
    assert (run / "autointerp.png").stat().st_size > 5000

    # independent activations of every held-out row
    store = ActivationStore(tiny_run / "store")
    held = split_chunks(store.n_chunks, 0.5)[1]
    rows = np.concatenate([np.arange(i * store.chunk_rows, (i + 1) * store.chunk_rows) for i in held])
    x = torch.from_numpy(np.concatenate([store.read_chunk(i) for i in held]))
    with torch.no_grad():
        codes = load(run / "sae").encode(x)
    acts = torch.zeros(len(x), 64).scatter_(1, codes.idx, codes.vals).numpy()
    act = {int(r): a for r, a in zip(rows, acts, strict=True)}
    tok = __import__("transformers").AutoTokenizer.from_pretrained(store.model)
    feats = saved["features"]
    assert saved["scanned_rows"] == 300 and len(feats) == 3 and saved["n_scored"] == 3
    explain_prompts = [b["messages"][1]["content"] for b in server.requests if is_explainer(b)]
    for f in feats:
        j = f["feature"]
        assert f["n_active"] == int((acts[:, j] > 0).sum()) >= 8
        assert f["max_activation"] == pytest.approx(acts[:, j].max())
        assert f["density"] == pytest.approx(f["n_active"] / 300)
        top_row = int(rows[acts[:, j].argmax()])
        piece = tok.decode([int(store.tokens[top_row])])
        prompt = next(p for p in explain_prompts if f["explain_examples"][0] in p)
        assert any(piece in span for span in re.findall(r"<<(.*?)>>", f["explain_examples"][0])), (piece, prompt)
        assert all(e.replace("<<", "").replace(">>", "") and "<<" in e for e in f["explain_examples"])
        deciles = [c for c in f["contexts"] if c["decile"] > 0]
        negatives = [c for c in f["contexts"] if c["decile"] == 0]
        assert len(negatives) == 3 and all(act[c["row"]][j] == 0 and "<<" not in c["marked"] for c in negatives)
        assert all(act[c["row"]][j] > 0 and c["activation"] == pytest.approx(act[c["row"]][j]) for c in deciles)
        assert all(c["text"] == c["marked"].replace("<<", "").replace(">>", "") for c in f["contexts"])
        by_d = sorted(deciles, key=lambda c: c["decile"])
        assert all(a["activation"] <= b["activation"] for a, b in zip(by_d, by_d[1:], strict=False))
        top_seq = top_row // store.rows_per_seq
        assert all(c["row"] // store.rows_per_seq != top_seq for c in deciles)
        assert f["recall_all"] == 1.0 and f["negative_accuracy"] == 0.0 and f["balanced_accuracy"] == 0.5
    assert saved["aggregate"]["balanced_accuracy"] == {"mean": 0.5, "lo": 0.5, "hi": 0.5, "n": 3}
    sent = len(server.requests)
    assert saved["counters"]["http_requests"] == sent and saved["counters"]["unparseable"] == 0
    n_contexts = sum(len(f["contexts"]) for f in feats)
    assert saved["parsing"] == {"explanations": {"answers": 3, "unparseable": 0},
                                "judgments": {"answers": sent - 3, "unparseable": 0},
                                "contexts": {"asked": n_contexts, "judged": n_contexts, "unjudged": 0}}
    assert saved["server"] is None and saved["timing_s"]["total"] >= saved["timing_s"]["llm"] > 0

    # the CLI, on the warm cache: the same scores and not one request
    cli = subprocess.run([sys.executable, "-m", "eval.autointerp", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert len(server.requests) == sent and "balanced accuracy" in cli.stdout and "0.500  [0.500, 0.500]" in cli.stdout
    again = json.loads((run / "autointerp.json").read_text())
    assert again["counters"]["cache_hits"] == again["counters"]["calls"] == sent
    assert [f["recall"] for f in again["features"]] == [f["recall"] for f in feats]

    # bad input: one line, exit 2, nothing written
    (run / "autointerp.json").unlink()
    with pytest.raises(SystemExit) as exit_:
        main.__wrapped__(compose_cfg(*args, "features=[64]"))  # the body of the CLI (the CLI itself ran above)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and not (run / "autointerp.json").exists()
    assert err.startswith("autointerp: error: features [64] out of range: the SAE has 64 latents")
    with pytest.raises(AutointerpError, match="no trained SAE"):
        run_autointerp(AutointerpConfig.from_omegaconf(compose_cfg(f"run={tmp_path}", "explainer.model=m")))
    with pytest.raises(AutointerpError, match="does not exist"):
        run_autointerp(AutointerpConfig.from_omegaconf(compose_cfg(f"run={tmp_path / 'nope'}", "explainer.model=m")))
