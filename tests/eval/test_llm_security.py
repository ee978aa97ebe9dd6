"""The autointerp HTTP client keeps the API key to the configured endpoint's origin.

Real loopback servers: one that redirects, one on another port (another origin) that records what
reaches it. The end-to-end check runs `python -m eval.autointerp` against a scripted server and
looks for the key in every file the run leaves and in what the CLI printed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from eval.detection import EXPLAINER_SYSTEM
from eval.llm import ChatClient, Counters, Endpoint, LLMError, base_url_problem, origin
from tests.conftest import ROOT
from tests.eval.test_autointerp import RUN_ARGS, Server, excerpts, tiny_run  # noqa: F401  (tiny_run: a fixture)

KEY_ENV = "LLM_SECURITY_TEST_KEY"
MESSAGES = [{"role": "user", "content": "hello"}]

Route = Callable[[str, str], tuple[int, dict[str, str], dict[str, Any] | None]]


def answer(text: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


class Recorder:
    """An HTTP server on 127.0.0.1 that records (method, path, headers, body) of every request and
    answers `route(method, path)` -> (status, extra headers, JSON body or None)."""

    def __init__(self, route: Route):
        self.route = route
        self.seen: list[dict[str, Any]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def handle_any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                recorder.seen.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                      "body": self.rfile.read(n) if n else b""})
                status, headers, body = recorder.route(self.command, self.path)
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = handle_any

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.root = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def recorder():
    started = []

    def start(route: Route) -> Recorder:
        started.append(Recorder(route))
        return started[-1]

    yield start
    for r in started:
        r.close()


@pytest.fixture
def key(monkeypatch) -> str:
    value = f"sk-test-{uuid.uuid4().hex}"
    monkeypatch.setenv(KEY_ENV, value)
    return value


def keyed_client(base_url: str, counters: Counters | None = None) -> ChatClient:
    return ChatClient(Endpoint(base_url, "m", KEY_ENV, 0.0, 16), counters or Counters(), timeout_s=5, max_retries=2,
                      backoff_s=0.01)


def elsewhere_and_redirector(recorder, code: int) -> tuple[Recorder, Recorder]:
    """(a server on another port that would answer anything, one that redirects every request to it)."""
    other = recorder(lambda method, path: (200, {}, answer("stolen")))
    redirector = recorder(lambda method, path: (code, {"Location": f"{other.root}/v1/chat/completions"}, None))
    return other, redirector


def test_the_other_server_would_see_the_key_under_plain_urllib(recorder, key):
    """The control: urllib's own redirect handling forwards the header to the other origin (a 302
    turns the POST into a GET that carries it), which is what the client must not do."""
    other, redirector = elsewhere_and_redirector(recorder, 302)
    req = urllib.request.Request(f"{redirector.root}/v1/chat/completions", data=b"{}", method="POST",
                                 headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        resp.read()
    assert other.seen and other.seen[0]["headers"].get("Authorization") == f"Bearer {key}"


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_origin_is_refused_and_nothing_goes_there(recorder, key, code):
    other, redirector = elsewhere_and_redirector(recorder, code)
    counters = Counters()
    with pytest.raises(LLMError) as refused:
        keyed_client(f"{redirector.root}/v1", counters).complete(MESSAGES)
    message = str(refused.value)
    assert "\n" not in message and key not in message
    assert f"from {redirector.root} to {other.root}: refused" in message and f"HTTP {code}" in message
    assert other.seen == []  # not even a request without the header
    assert [r["headers"].get("Authorization") for r in redirector.seen] == [f"Bearer {key}"]
    c = counters.as_dict()
    assert c["http_requests"] == 1 and c["retries"] == 0 and c["failed"] == 1 and c["errors"] == [message]


def test_a_redirect_to_another_scheme_or_a_named_host_is_another_origin(recorder, key):
    port = None

    def route(method: str, path: str) -> tuple[int, dict[str, str], None]:
        return 307, {"Location": f"https://127.0.0.1:{port}/v1/chat/completions"}, None
    redirector = recorder(route)
    port = redirector.httpd.server_address[1]  # the same host and port, but https
    with pytest.raises(LLMError, match=rf"from http://127.0.0.1:{port} to https://127.0.0.1:{port}: refused"):
        keyed_client(f"{redirector.root}/v1").complete(MESSAGES)
    assert len(redirector.seen) == 1
    assert origin("HTTP://LocalHost/v1") == "http://localhost:80" != origin("http://127.0.0.1/v1")
    assert origin("https://api.example.com/v1") == origin("https://API.example.com:443/other")
    assert origin("http://[::1]:8000/v1") == "http://[::1]:8000"


@pytest.mark.parametrize(("code", "method"), [(307, "POST"), (308, "POST"), (301, "GET"), (302, "GET"), (303, "GET")])
def test_a_redirect_within_the_origin_is_followed_with_the_key(recorder, key, code, method):
    def route(method: str, path: str) -> tuple[int, dict[str, str], dict[str, Any] | None]:
        if path == "/v1/chat/completions":
            return code, {"Location": "/v2/chat/completions"}, None
        return 200, {}, answer(f"answered a {method}")
    server = recorder(route)
    counters = Counters()
    assert keyed_client(f"{server.root}/v1", counters).complete(MESSAGES) == f"answered a {method}"
    first, second = server.seen
    assert (first["method"], first["path"]) == ("POST", "/v1/chat/completions")
    assert (second["method"], second["path"]) == (method, "/v2/chat/completions")
    assert first["headers"]["Authorization"] == second["headers"]["Authorization"] == f"Bearer {key}"
    if method == "POST":
        assert second["body"] == first["body"] and json.loads(second["body"])["messages"] == MESSAGES
    assert counters.as_dict()["http_requests"] == 1  # one call of urllib, redirects included


def test_a_server_that_quotes_the_key_back_does_not_get_it_into_errors_or_answers(recorder, key):
    secret = key.removeprefix("sk-test-")
    for pad in (0, 180):  # 180: the key straddles the 200 characters of the answer an error quotes
        said = {"error": f"{'x' * pad}invalid key Bearer {key} here"}
        server = recorder(lambda method, path, said=said: (401, {}, said))
        counters = Counters()
        with pytest.raises(LLMError) as refused:
            keyed_client(f"{server.root}/v1", counters).complete(MESSAGES)
        assert secret[:6] not in str(refused.value) and secret[:6] not in json.dumps(counters.as_dict())
        assert pad or "invalid key Bearer <API key> here" in str(refused.value)
    echo = recorder(lambda method, path: (200, {}, answer(f"you sent {key}")))
    assert keyed_client(f"{echo.root}/v1").complete(MESSAGES) == "you sent <API key>"


def test_a_base_url_with_credentials_is_refused_without_quoting_them():
    problem = base_url_problem("https://me:hunter2-password@api.example.com/v1")
    assert problem is not None and "user name or password" in problem and "hunter2" not in problem
    assert base_url_problem("https://api.example.com/v1") is None


def test_the_key_is_in_no_file_and_no_output_of_a_scored_run(tiny_run, tmp_path, key):  # noqa: F811
    """A scored `python -m eval.autointerp` run: the key reaches the server, and no file in the working
    folder (the run, its cache, anything Hydra writes) and no line of stdout or stderr holds it, even
    with a server that quotes it back in an error."""
    lock, quoted = threading.Lock(), []

    def respond(body: dict[str, Any]) -> tuple[int, str]:
        if body["messages"][0]["content"] == EXPLAINER_SYSTEM:
            return 200, "Explanation: fires on text."
        with lock:
            if not quoted:  # the first scorer request fails, quoting the key (a 400 is not retried)
                quoted.append(body)
                return 400, f"bad request from Bearer {key}"
        return 200, json.dumps([1] * len(excerpts(body)))
    server = Server(respond)
    work = tmp_path / "work"
    work.mkdir()
    run = work / "run"
    shutil.copytree(tiny_run / "run", run, ignore=shutil.ignore_patterns("autointerp*"))  # no cached answers
    env = {**os.environ, KEY_ENV: key, "PYTHONPATH": str(ROOT)}
    try:
        cli = subprocess.run([sys.executable, "-m", "eval.autointerp", f"run={run}", f"explainer.base_url={server.url}",
                              "explainer.model=tiny", f"explainer.api_key_env={KEY_ENV}", *RUN_ARGS],
                             cwd=work, env=env, capture_output=True, text=True, timeout=300, check=False)
    finally:
        server.close()
    assert cli.returncode == 0, cli.stderr
    assert server.requests and all(h.get("Authorization") == f"Bearer {key}" for h in server.headers)
    saved = json.loads((run / "autointerp.json").read_text())
    assert saved["n_scored"] >= 1 and (run / "autointerp_cache").is_dir()
    assert quoted and any("<API key>" in e for e in saved["counters"]["errors"])  # the quoted key, cut out
    files = [f for f in work.rglob("*") if f.is_file()]
    assert len(files) > 10
    assert [f for f in files if key.encode() in f.read_bytes()] == []
    assert key not in cli.stdout and key not in cli.stderr
    assert KEY_ENV in json.dumps(saved["config"])  # only the variable's name is recorded
