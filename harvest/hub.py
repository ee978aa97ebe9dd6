"""Is the Hugging Face Hub reachable? Answered once, in about a second, before anything loads.

Without this check, transformers and datasets retry an unreachable hub for ~25 s per file before
failing with a long traceback. We probe once; if the hub is down we switch both libraries to
offline mode, so that cached models still load and everything else fails at once.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

OFFLINE_HINT = "use the embedded offline preset: make harvest preset=demo"


@functools.cache
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """True if a TCP connection to the hub endpoint opens; False in offline mode or on failure."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        go_offline()
        return False


def go_offline() -> None:
    """Make transformers and datasets use only local files from now on in this process."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:  # these libraries read the variables at import time; update them if already imported
        import huggingface_hub.constants as hc

        hc.HF_HUB_OFFLINE = True
        import datasets.config as dc

        dc.HF_HUB_OFFLINE = True
        dc.HF_DATASETS_OFFLINE = True
    except Exception:  # pragma: no cover - library internals moved; env vars still apply to new imports
        pass


def is_local(name: str) -> bool:
    return os.path.exists(os.path.expanduser(name))


def looks_like_path(name: str) -> bool:
    """A hub id is `name` or `org/name`; anything else with slashes, or starting ./ / ~, is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


MISSING_PATH_HINT = "relative paths are read from the current folder; `make setup` builds the offline model and corpus"
