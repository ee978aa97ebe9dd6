"""A local OpenAI-compatible chat server for autointerp: start it, wait until it answers, stop it.

    with LocalServer(transformers_serve(folder), model=str(folder), log=path, timeout_s=300) as server:
        ChatClient(Endpoint(server.base_url, server.model, ...))   # http://127.0.0.1:<port>/v1

The server is `transformers serve` (the `transformers[serving]` extra, installed by `make setup`),
serving one local model folder with HF_HUB_OFFLINE=1 on a free port of 127.0.0.1. `LocalServer` owns
the process:

- it is started in a session of its own (its own process group), with stdin closed and stdout and
  stderr written to `log`; so Ctrl-C in the terminal reaches only us, and we stop it in order;
- it is ready when every path in `ready` (GET /health and /v1/models) answers HTTP 200; a server that
  exits first, or is not ready within `timeout_s`, is stopped and reported in one line (ServeError)
  naming its log;
- leaving the `with` block for any reason (the end, an exception, Ctrl-C, or SIGTERM / SIGHUP, which
  are turned into SystemExit while the server runs) stops the whole process group: SIGTERM, up to
  `grace_s` for a clean exit, then SIGKILL to whatever of the group is left (even if a second
  Ctrl-C interrupts that wait).

The port is found by binding port 0 and closing the socket before the server binds it: another
process could take it in between, in which case the server exits and that is reported like any
other failed start.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType, TracebackType

from harvest.offline import MODEL_DIR
from runtime.errors import ToolkitError
from runtime.files import read_text_file

DEMO = "demo"  # `serve: demo` = the offline demo model that `make setup` builds
DEMO_MODEL = Path("data") / MODEL_DIR
HOST = "127.0.0.1"  # loopback only: nothing outside this machine can reach the server
READY_PATHS = ("/health", "/v1/models")
POLL_S = 0.5
GRACE_S = 5.0  # for a clean exit after SIGTERM (uvicorn waits for a request still being generated)
WEIGHTS = ("*.safetensors", "*.bin", "*.gguf")

# a command line, given the host and port the server must listen on
Command = Callable[[str, int], list[str]]


class ServeError(ToolkitError):
    """A model folder that cannot be served, or a server that did not start; one line."""


def model_folder(serve: str) -> Path:
    """The model folder a `serve` value names: `demo` is the offline demo model."""
    return DEMO_MODEL if serve == DEMO else Path(serve)


def check_model_folder(folder: Path) -> None:
    """ServeError unless `folder` holds a config.json naming its model class, and weights."""
    if not folder.is_dir():
        hint = ": run `make setup` to build it" if folder == DEMO_MODEL else ""
        raise ServeError(f"model folder {folder} does not exist{hint}")
    config = folder / "config.json"
    try:
        architectures = json.loads(read_text_file(config)).get("architectures")
    except (OSError, ValueError, AttributeError) as e:
        raise ServeError(f"cannot read {config}: {e}") from None
    if not architectures:
        raise ServeError(f'{config} has no "architectures" entry, which transformers serve needs to pick the model '
                         'class; `python -m harvest.offline` repairs the demo model (make autointerp-demo runs it), '
                         'elsewhere add e.g. "architectures": ["LlamaForCausalLM"]')
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHTS):
        raise ServeError(f"model folder {folder} holds no weights ({', '.join(WEIGHTS)})")


def _console_script(name: str) -> str | None:
    """The console script `name` installed beside this Python (the venv's bin/), else on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.is_file() and os.access(here, os.X_OK) else shutil.which(name)


def transformers_serve(folder: Path, dtype: str = "auto") -> Command:
    """The command line of `transformers serve <folder>` (its only model), checked to be installed."""
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    exe = _console_script("transformers")
    if missing or exe is None:
        raise ServeError(f"transformers serve is not installed ({', '.join(missing) or 'no transformers command'} "
                         "missing): pip install 'transformers[serving]' (make setup installs it)")

    def command(host: str, port: int) -> list[str]:
        return [exe, "serve", str(folder), "--host", host, "--port", str(port), "--dtype", dtype,
                "--log-level", "info"]

    return command


def free_port(host: str = HOST) -> int:
    """A TCP port that was free on `host` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _answers_200(url: str, timeout_s: float) -> bool:
    """Whether GET url answers HTTP 200 (no proxy: the server is on loopback)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class LocalServer:
    """One server process on loopback, started and stopped with `with` (see the module docstring)."""

    def __init__(self, command: Command, *, model: str, log: Path, timeout_s: float, name: str = "the model server",
                 ready: tuple[str, ...] = READY_PATHS, grace_s: float = GRACE_S, env: dict[str, str] | None = None):
        self.command, self.model, self.log, self.timeout_s = command, model, Path(log), timeout_s
        self.name, self.ready, self.grace_s = name, ready, grace_s
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
        self.host, self.port = HOST, 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_s: float | None = None  # seconds from start to ready
        self._started = 0.0  # time.monotonic() at start()
        self._old_handlers: dict[int, object] = {}

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What an Endpoint's base_url must be (POSTs go to <base_url>/chat/completions)."""
        return f"{self.origin}/v1"

    def __enter__(self) -> LocalServer:
        self._trap_signals()
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            self._restore_signals()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self.stop()
        finally:
            self._restore_signals()

    def start(self) -> None:
        """Start the process on a free port, its output going to the log file."""
        self.port = free_port(self.host)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        argv = self.command(self.host, self.port)
        with self.log.open("wb") as log:
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True)
        self._started = time.monotonic()

    def wait_ready(self) -> None:
        """Return once every `ready` path answers 200; ServeError (the log's path in it) if the process
        exits first or the timeout passes."""
        assert self.proc is not None, "start() first"
        deadline = self._started + self.timeout_s
        urls = [self.origin + p for p in self.ready]
        while True:
            if (code := self.proc.poll()) is not None:
                raise ServeError(f"{self.name} exited with code {code} before it was ready; its log: {self.log}")
            if all(_answers_200(u, timeout_s=min(5.0, self.timeout_s)) for u in urls):
                self.ready_s = time.monotonic() - self._started
                return
            if time.monotonic() >= deadline:
                raise ServeError(f"{self.name} was not ready within {self.timeout_s:g} s (no HTTP 200 from GET "
                                 f"{', '.join(self.ready)} at {self.origin}); stopped it; its log: {self.log}")
            time.sleep(POLL_S)

    def stop(self) -> None:
        """Stop the whole process group: SIGTERM, up to grace_s, then SIGKILL what is left. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        group = proc.pid  # the leader of its own session: its pid is the group id
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        try:
            proc.wait(timeout=self.grace_s)
        except subprocess.TimeoutExpired:
            pass
        finally:  # also when a second Ctrl-C cuts the wait short
            with contextlib.suppress(ProcessLookupError):  # children that outlived the leader, or a stuck leader
                os.killpg(group, signal.SIGKILL)
            proc.wait()

    # SIGTERM / SIGHUP would end Python without running __exit__; while the server runs, they raise
    # SystemExit instead (only the main thread can set handlers; elsewhere they are left alone)
    def _trap_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, _exit_on_signal)

    def _restore_signals(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._old_handlers.clear()


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def serving(serve: str, log: Path, timeout_s: float, threads: int | None = None,
            dtype: str = "auto") -> Iterator[LocalServer]:
    """`transformers serve` on the model folder a `serve` value names, ready, for the `with` block.
    threads: the server's CPU threads (OMP_NUM_THREADS, MKL_NUM_THREADS); None = torch's default."""
    folder = model_folder(serve)
    check_model_folder(folder)
    model = str(folder.resolve())  # the server's only model; requests name it by this path
    env = {} if threads is None else {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with LocalServer(transformers_serve(Path(model), dtype), model=model, log=log, timeout_s=timeout_s,
                     name=f"transformers serve ({folder})", env=env) as server:
        yield server
