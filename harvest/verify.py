"""`python -m harvest.verify store=<path>`: check every committed chunk of a store, list the bad ones.

Each chunk file of each array is read, compared with the size and CRC-32 recorded when it was
committed (stores of format version 2; older ones only for presence and decodability) and decoded.

    exit 0   the store is intact
    exit 1   damage found: one line per bad chunk, then how to repair
    exit 2   bad input (no such store)

Repair: rerun the harvest command that wrote the store with `repair=true` (harvest/run.py): it
re-creates exactly the bad chunks (and lost array metadata) and verifies the store again.
"""

from __future__ import annotations

import sys

from harvest import store
from harvest.config import HarvestError
from runtime.errors import one_line_errors


def parse(argv: list[str]) -> str:
    """The store path from `store=<path>` (the only argument)."""
    if len(argv) != 1 or not argv[0].startswith("store="):
        raise HarvestError("usage: python -m harvest.verify store=<path of an activation store>")
    path = argv[0].split("=", 1)[1]
    if not store.looks_like_store(path):
        raise HarvestError(f"{path} is not an activation store")
    return path


def main(argv: list[str]) -> int:
    with one_line_errors("harvest.verify"):
        path = parse(argv)
        verdict = store.verify(path, progress=sys.stderr.isatty())
    if verdict.ok:
        print(f"store {path}: {verdict.checked} chunks x {len(store.ARRAYS)} arrays checked; all intact")
        return 0
    for problem in verdict.problems:
        print(problem)
    for i, damage in sorted(verdict.bad.items()):
        print(f"chunk {i}: " + "; ".join(damage))
    if verdict.bad:
        print(f"store {path}: {len(verdict.bad)} of {verdict.checked} chunks damaged; rerun the harvest command "
              "that wrote it with repair=true to re-create them")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
