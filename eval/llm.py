"""A small client for OpenAI-compatible chat-completions endpoints (vLLM, llama.cpp, SGLang, OpenAI...).

Standard library only. `ChatClient.complete(messages)` POSTs {model, messages, temperature,
max_tokens} to `<base_url>/chat/completions` and returns `choices[0].message.content`:

- retries with exponential backoff (backoff_s x 2^attempt, or the server's Retry-After when larger,
  at most 60 s) on connection errors, timeouts, HTTP 408, 429 and 5xx; any other status fails at once;
- a response cache on disk: one JSON file per request, named by the sha256 of the canonical JSON
  request body (the base URL and API key are not part of the key), written through a temporary
  file and os.replace, so a re-run sends no request it has already had answered;
- counters shared by every client of a run (thread-safe): calls, HTTP requests, cache hits,
  retries, failed calls, and the first few distinct error messages;
- the API key goes to the endpoint's origin only (scheme, host and port of `base_url`): a redirect
  to another origin is refused with LLMError before anything is sent there, and the key is cut out
  of every answer and error message (some servers quote the request back). It is read from the
  environment at request time and written nowhere: not to the cache, the counters or the results.

Concurrency is bounded by the caller: `map_concurrent` runs calls on a pool of `concurrency` threads.
When the caller is interrupted (Ctrl-C, an error), calls not yet started are dropped, and
`ChatClient.cancel()` ends the running ones at their next retry or backoff instead of after all of them.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from runtime.errors import ToolkitError

RETRY_STATUS = frozenset({408, 429})  # and every 5xx
MAX_WAIT_S = 60.0
MAX_ERRORS_KEPT = 5

T = TypeVar("T")
R = TypeVar("R")


class LLMError(ToolkitError):
    """A call that failed for good (after its retries, or at once on a non-retryable answer)."""


@dataclass(frozen=True)
class Endpoint:
    """One role's server and sampling settings (conf/eval/autointerp.yaml `explainer`, `scorer`). The
    API key is read from the environment variable named `api_key_env` at request time (unset or empty:
    no Authorization header).

    The key is sent to `base_url`'s origin (scheme, host, port) and nowhere else. Redirects within
    that origin are followed with it (307 and 308 repeat the POST with its body; 301, 302 and 303
    become a GET, as urllib does); a redirect to any other origin, an http -> https upgrade
    included, is refused with an LLMError that names both origins, and nothing is sent to the
    target. Point `base_url` at the final address instead."""

    base_url: str
    model: str
    api_key_env: str | None
    temperature: float
    max_tokens: int


def base_url_problem(url: str) -> str | None:
    """Why `url` cannot be an endpoint's base URL, or None if it can."""
    if not isinstance(url, str) or not url.strip():
        return "is empty"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return f"{url!r} must start with http:// or https://"
    if not parts.hostname:
        return f"{url!r} has no host"
    try:
        parts.port  # noqa: B018  (raises on a malformed port)
    except ValueError:
        return f"{url!r} has a bad port"
    if parts.query or parts.fragment:
        return f"{url!r} must not have a query or fragment"
    if parts.username is not None or parts.password is not None:  # (not echoed: it may hold a password)
        return ("must not hold a user name or password (user:password@host); the API key goes in the environment "
                "variable named by api_key_env")
    return None


def origin(url: str) -> str:
    """scheme://host:port of `url`, lower case, the port filled in from the scheme: two URLs may share
    credentials only if their origins are equal."""
    parts = urllib.parse.urlsplit(url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:
        port = None
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


class SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirect handler, held to one origin: a redirect elsewhere raises LLMError before any
    request goes there (urllib would send the Authorization header along), and a 307 or 308 within
    the origin repeats the POST with its body and headers (urllib refuses to)."""

    def __init__(self, url: str):
        self.url, self.origin = url, origin(url)

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        if origin(newurl) != self.origin:
            fp.close()
            raise LLMError(f"{self.url} answered HTTP {code}, a redirect from {self.origin} to {origin(newurl)}: "
                           f"refused, the API key is only sent to {self.origin} (set base_url to the new address if "
                           "you trust it)")
        if code in (307, 308) and req.get_method() == "POST":
            return urllib.request.Request(newurl, data=req.data, headers=dict(req.headers), method="POST",
                                          origin_req_host=req.origin_req_host, unverifiable=True)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class Counters:
    """Thread-safe counts of what the clients did, shared by the explainer and the scorer."""

    KEYS = ("calls", "http_requests", "cache_hits", "retries", "failed")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(self.KEYS, 0)
        self.errors: list[str] = []

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def error(self, message: str) -> None:
        with self._lock:
            if message not in self.errors and len(self.errors) < MAX_ERRORS_KEPT:
                self.errors.append(message)

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counts, "errors": list(self.errors)}


class ResponseCache:
    """Response texts on disk, one `<sha256>.json` per request, under two-character subfolders."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @staticmethod
    def key(payload: dict[str, Any]) -> str:
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        try:
            return json.loads(self._path(key).read_text())["response"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, payload: dict[str, Any], response: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"request": payload, "response": response}, f, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class ChatClient:
    """Chat completions from one endpoint, with retries, an optional cache and shared counters."""

    def __init__(self, endpoint: Endpoint, counters: Counters | None = None, cache: ResponseCache | None = None,
                 timeout_s: float = 120.0, max_retries: int = 5, backoff_s: float = 1.0):
        self.endpoint = endpoint
        self.counters = counters or Counters()
        self.cache = cache
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.url = endpoint.base_url.rstrip("/") + "/chat/completions"
        self.opener = urllib.request.build_opener(SameOriginRedirects(self.url))
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Make every call of this client, running or to come, fail with LLMError at its next attempt or
        during its backoff (a request already sent still waits for its answer or its timeout)."""
        self._cancelled.set()

    def payload(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        e = self.endpoint
        return {"model": e.model, "messages": messages, "temperature": e.temperature, "max_tokens": e.max_tokens}

    def complete(self, messages: list[dict[str, str]]) -> str:
        """The answer's text; raises LLMError when the call fails for good."""
        self.counters.add("calls")
        payload = self.payload(messages)
        key = ResponseCache.key(payload)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            self.counters.add("cache_hits")
            return hit
        try:
            text = self._post(payload)
        except LLMError as e:
            self.counters.add("failed")
            self.counters.error(str(e))
            raise
        if self.cache is not None:
            self.cache.put(key, payload, text)
        return text

    def _key(self) -> str | None:
        """The API key, from the environment at request time (None: unset or empty)."""
        return (os.environ.get(self.endpoint.api_key_env) or None) if self.endpoint.api_key_env else None

    def _post(self, payload: dict[str, Any]) -> str:
        """The answer's text; neither it nor an LLMError holds the key, whatever the server sent back."""
        key = self._key()
        try:
            return self._send(json.dumps(payload).encode(), key)
        except LLMError as e:
            if key and key in str(e):
                raise LLMError(str(e).replace(key, "<API key>")) from None
            raise

    def _send(self, body: bytes, key: str | None) -> str:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        for attempt in range(self.max_retries + 1):
            if self._cancelled.is_set():
                raise LLMError(f"cancelled: the call to {self.url} was not sent")
            if attempt:
                self.counters.add("retries")
            self.counters.add("http_requests")
            wait = self.backoff_s * 2**attempt
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with self.opener.open(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
                return _content(_hide(raw, key), self.url)
            except urllib.error.HTTPError as e:
                detail = _hide(e.read(), key)[:200].decode(errors="replace").strip()
                problem = f"HTTP {e.code} from {self.url}" + (f": {detail}" if detail else "")
                if e.code not in RETRY_STATUS and e.code < 500:
                    raise LLMError(problem) from None
                wait = max(wait, _retry_after(e.headers.get("Retry-After")))
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, reset, timeout
                reason = getattr(e, "reason", None) or e
                problem = f"cannot reach {self.url}: {str(reason) or type(reason).__name__}"
            if attempt < self.max_retries:
                self._cancelled.wait(min(wait, MAX_WAIT_S))  # a sleep that cancel() cuts short
        raise LLMError(f"{problem} (gave up after {self.max_retries + 1} attempts)")


def _hide(raw: bytes, key: str | None) -> bytes:
    """`raw` with every copy of the key replaced, before anything cuts or keeps it (a server that
    echoes the request must not get the key into an error message, the cache or the results)."""
    return raw.replace(key.encode(), b"<API key>") if key else raw


def _retry_after(value: str | None) -> float:
    try:
        return float(value) if value is not None else 0.0
    except ValueError:
        return 0.0


def _content(raw: bytes, url: str) -> str:
    """choices[0].message.content of a chat-completions answer (None -> "")."""
    try:
        content = json.loads(raw)["choices"][0]["message"].get("content")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise LLMError(f"{url} answered something that is not a chat completion: {raw[:200]!r}") from None
    return content if isinstance(content, str) else ""


def map_concurrent(fn: Callable[[T], R], items: Iterable[T], concurrency: int,
                   progress: Callable[[], None] | None = None) -> list[R]:
    """[fn(item) for item in items] on `concurrency` threads, in order; `progress` is called after each."""

    def one(item: T) -> R:
        out = fn(item)
        if progress is not None:
            progress()
        return out

    pool = ThreadPoolExecutor(max_workers=concurrency)
    try:
        out = list(pool.map(one, items))
    except BaseException:  # Ctrl-C or an error: calls not yet started never start, running ones are not awaited
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return out
