"""The local server that `serve` starts for autointerp (eval/serve.py): readiness, one-line failures,
and nothing left running afterwards. Stand-in servers are small Python scripts; one slow test runs the
real `transformers serve` on the demo model through our client."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from eval.autointerp import AutointerpConfig, AutointerpError
from eval.detection import Context, FeatureSample, explain_and_score, scorer_messages
from eval.llm import ChatClient, Counters, Endpoint, LLMError
from eval.serve import LocalServer, ServeError, check_model_folder, serving
from harvest.offline import repair_architectures
from tests.conftest import OFFLINE_MODEL
from tests.eval.test_autointerp import banana, client, compose_cfg, samples, serve  # noqa: F401  (serve: a fixture)

# A stand-in server: writes its pid and its child's pid to argv[1], keeps a child running (so that
# the whole group must be stopped), ignores SIGTERM if argv[3] says so, then either answers GET
# /health and /v1/models with 200 (argv[2] == "serve") or never listens.
STAND_IN = r"""
import http.server, os, signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
open(sys.argv[1], "w").write(f"{os.getpid()} {child.pid}")
if sys.argv[3] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("stand-in server starting", flush=True)
if sys.argv[2] != "serve":
    time.sleep(300)
class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path in ("/health", "/v1/models") else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[4])), Ok).serve_forever()
"""


def stand_in(pids: Path, mode: str, stubborn: bool = False):
    return lambda host, port: [sys.executable, "-c", STAND_IN, str(pids), mode, "stubborn" if stubborn else "-",
                               str(port)]


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by its parent, does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def pids_of(path: Path, wait_s: float = 30.0) -> list[int]:
    deadline = time.monotonic() + wait_s
    while not (path.exists() and path.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [int(p) for p in path.read_text().split()]


def gone(pids: list[int], wait_s: float = 5.0) -> bool:
    deadline = time.monotonic() + wait_s
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(alive(p) for p in pids)


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")


@needs_proc
@pytest.mark.parametrize("stubborn", [False, True])
def test_a_server_never_ready_is_stopped_and_reported_in_one_line(tmp_path, stubborn):
    log, pids = tmp_path / "server.log", tmp_path / "pids"
    server = LocalServer(stand_in(pids, "hang", stubborn), model="m", log=log, timeout_s=4, grace_s=1, name="stand-in")
    t0 = time.monotonic()
    with pytest.raises(ServeError) as e, server:
        pytest.fail("the block must not run")
    message = str(e.value)
    assert "\n" not in message and message.startswith("stand-in was not ready within 4 s")
    assert message.endswith(f"its log: {log}") and "GET /health, /v1/models" in message
    assert "stand-in server starting" in log.read_text()
    assert gone(pids_of(pids))  # the server and its child, even the one that ignores SIGTERM
    assert time.monotonic() - t0 < 4 + 1 + 5


@needs_proc
def test_a_server_that_exits_is_reported_with_its_log(tmp_path):
    log = tmp_path / "server.log"

    def crash(host: str, port: int) -> list[str]:
        return [sys.executable, "-c", "import sys; print('cannot load the model'); sys.exit(3)"]
    message = re.escape(f"stand-in exited with code 3 before it was ready; its log: {log}")
    with pytest.raises(ServeError, match=message), LocalServer(crash, model="m", log=log, timeout_s=30, name="stand-in"):
        pass
    assert "cannot load the model" in log.read_text()


@needs_proc
@pytest.mark.parametrize("leave", ["normally", "error", "ctrl-c", "sigterm"])
def test_the_whole_group_is_stopped_however_the_block_ends(tmp_path, leave):
    pids = tmp_path / "pids"
    server = LocalServer(stand_in(pids, "serve"), model="m", log=tmp_path / "log", timeout_s=30, grace_s=2)
    before = signal.getsignal(signal.SIGTERM)
    raised = {"normally": None, "error": RuntimeError, "ctrl-c": KeyboardInterrupt, "sigterm": SystemExit}[leave]
    try:
        with server:
            assert server.base_url == f"http://127.0.0.1:{server.port}/v1" and server.ready_s is not None
            running = pids_of(pids)
            assert all(alive(p) for p in running)
            if leave == "error":
                raise RuntimeError("scoring failed")
            if leave == "ctrl-c":
                raise KeyboardInterrupt
            if leave == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)  # becomes SystemExit while the server runs
                time.sleep(5)
                pytest.fail("SIGTERM did not end the block")
    except BaseException as e:  # noqa: BLE001
        assert raised is not None and isinstance(e, raised), e
        if leave == "sigterm":
            assert e.code == 128 + signal.SIGTERM
    assert gone(running) and server.proc is None
    assert signal.getsignal(signal.SIGTERM) == before  # our handler is removed again
    server.stop()  # idempotent


def test_ctrl_c_during_scoring_sends_nothing_more(serve):  # noqa: F811  (the fixture imported above)
    """Ctrl-C in the middle of the LLM calls: queued calls never start, and the run ends at once (the
    server is stopped right after, by the `with` block around the calls)."""
    server = serve(banana, delay=0.2)
    explainer, scorer = client(server), client(server)
    interrupt = threading.Timer(0.6, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    interrupt.start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        explain_and_score(samples(), explainer, scorer, batch_contexts=1, concurrency=2)  # 2 + 37 calls
    assert time.monotonic() - t0 < 2
    time.sleep(0.5)  # the two calls that were running end; nothing else is sent
    sent = len(server.requests)
    time.sleep(0.5)
    assert len(server.requests) == sent <= 2 + 2 * 4
    with pytest.raises(LLMError, match="cancelled"):
        scorer.complete([{"role": "user", "content": "x"}])


def test_cancel_cuts_retries_short(serve):  # noqa: F811
    down = serve(lambda body: (503, "loading"))
    slow = client(down, max_retries=5, backoff_s=1.0)  # 1 + 2 + 4 + 8 + 16 s of backoff without cancel()
    errors: list[Exception] = []

    def call() -> None:
        try:
            slow.complete([{"role": "user", "content": "x"}])
        except LLMError as e:
            errors.append(e)
    worker = threading.Thread(target=call)
    worker.start()
    time.sleep(0.3)
    slow.cancel()
    worker.join(timeout=2)
    assert not worker.is_alive() and "cancelled" in str(errors[0]) and len(down.requests) <= 2


def test_model_folder_checks(tmp_path):
    with pytest.raises(ServeError, match=f"model folder {tmp_path / 'nope'} does not exist$"):
        check_model_folder(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": None}))
    with pytest.raises(ServeError) as e:
        check_model_folder(tmp_path)
    assert str(e.value).startswith(f'{tmp_path / "config.json"} has no "architectures" entry, which transformers serve')
    assert "python -m harvest.offline" in str(e.value) and "\n" not in str(e.value)
    # harvest.offline repairs it, once
    assert repair_architectures(tmp_path) and not repair_architectures(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    with pytest.raises(ServeError, match="holds no weights"):
        check_model_folder(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    check_model_folder(tmp_path)


def test_a_config_json_that_is_no_regular_file_is_refused_at_once(tmp_path):
    """A FIFO named config.json used to hang the check (reading it waits for a writer)."""
    os.mkfifo(tmp_path / "config.json")
    start = time.monotonic()
    with pytest.raises(ServeError, match=f"cannot read {tmp_path / 'config.json'}: .*not a regular file"):
        check_model_folder(tmp_path)
    assert time.monotonic() - start < 5


def test_autointerp_checks_the_served_folder_before_any_work(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(AutointerpError, match='has no "architectures" entry'):
        AutointerpConfig.from_omegaconf(compose_cfg("run=x", f"serve={tmp_path}"))
    with pytest.raises(AutointerpError, match="serve_timeout_s must be a number > 0, got 0"):
        AutointerpConfig.from_omegaconf(compose_cfg("run=x", f"serve={tmp_path}", "serve_timeout_s=0"))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    cfg = AutointerpConfig.from_omegaconf(compose_cfg("run=x", f"serve={tmp_path}"))  # no explainer.model needed
    assert cfg.serve == str(tmp_path) and cfg.serve_timeout_s == 300


def _servable() -> str | None:
    """Why the real demo model cannot be served here, or None."""
    if not (OFFLINE_MODEL / "model.safetensors").exists():
        return "offline model not built; run `make setup`"
    try:
        check_model_folder(OFFLINE_MODEL)
    except ServeError as e:
        return str(e)
    return None


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(_servable() is not None, reason=str(_servable()))
def test_real_transformers_serve_on_the_demo_model(tmp_path):
    """`transformers serve` on loopback, offline, answering our client; stopped afterwards."""
    log = tmp_path / "server.log"
    with serving(str(OFFLINE_MODEL), log, timeout_s=240, threads=1) as server:  # 1: robust on a busy machine
        assert server.base_url.startswith("http://127.0.0.1:") and server.model == str(OFFLINE_MODEL.resolve())
        pid = server.proc.pid
        counters = Counters()
        explainer, scorer = (ChatClient(Endpoint(server.base_url, server.model, None, 0.0, max_tokens), counters,
                                        timeout_s=120, max_retries=1) for max_tokens in (8, 4))
        sample = FeatureSample(1, 3, 5.0, [Context(0, -1, 5.0, "a ripe banana", "a ripe <<banana>>", [(" banana", 5.0)])],
                               [Context(1, 10, 5.0, "an apple and a pear", "an <<apple>> and a <<pear>>")])
        [res] = explain_and_score([sample], explainer, scorer, batch_contexts=1, concurrency=1)
        # whatever the 135M model says is recorded as it is: an explanation or "unparseable", never a failure
        assert res["status"] in ("ok", "unparseable") and res["explainer_answer"] and res["failed"] == 0
        if res["status"] == "unparseable":  # no explanation, so nothing was scored: ask the scorer directly
            assert scorer.complete(scorer_messages("the names of fruits", ["an apple and a pear"])).strip()
        else:
            assert res["scorer_answers"] == 1
        assert counters.as_dict()["failed"] == 0 and counters.as_dict()["http_requests"] == 2
    assert gone([pid]) and " serve " in log.read_text().splitlines()[0]
