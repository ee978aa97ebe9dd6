"""Two stores of one harvest read side by side, for a transcoder: rows [x | y], x the source site's
activation of a token ([d_in], e.g. mlp_in) and y the target site's ([d_out], e.g. mlp_out).

A `PairedStore` is read like one store whose rows are d_in + d_out wide: chunk i is the two stores'
chunks i laid side by side, so everything that reads rows (the training loader, the held-out view,
the outlier cut, which then looks at the norm of the pair) works unchanged and every row stays a token's
two activations. Whatever does not concern the rows (tokens, contexts, identity, tokenizer) is the
source store's. `train.saes.base.SAE.split` cuts a row back into x and y.

The two stores must come from one pass of one harvest: the same model, layer, token ids and layout
(`check_pair`, before any work; one line naming what differs).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from harvest.config import HarvestError
from harvest.store import ActivationStore


class PairedStore:
    """`source` and `target` read side by side (module docstring); every attribute this class does not
    define is the source store's."""

    def __init__(self, source: ActivationStore, target: ActivationStore):
        check_pair(source, target)
        self.source, self.target = source, target
        self.d_in, self.d_out = source.d_model, target.d_model

    def __getattr__(self, name: str) -> Any:
        return getattr(self.source, name)

    @property
    def d_model(self) -> int:
        """The width of a paired row, d_in + d_out."""
        return self.d_in + self.d_out

    @property
    def mapped(self) -> bool:
        return False  # a paired chunk is assembled, never a memory map

    def read_chunk_raw(self, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """Chunk i as stored, [chunk_rows, d_in + d_out]: the source's rows, then the target's."""
        x, y = self.source.read_chunk_raw(i), self.target.read_chunk_raw(i)
        if out is None:
            return np.concatenate([x, y], axis=1)
        out[:, : self.d_in], out[:, self.d_in :] = x, y
        return out

    def read_chunks(self, ids: list[int], threads: int | None = None) -> Iterator[np.ndarray]:
        for x, y in zip(self.source.read_chunks(ids, threads), self.target.read_chunks(ids, threads), strict=True):
            yield np.concatenate([x, y], axis=1)

    def read_chunk(self, i: int) -> np.ndarray:
        return self.as_float(self.read_chunk_raw(i))


def check_pair(source: ActivationStore, target: ActivationStore) -> None:
    """HarvestError (one line) unless `target` holds the same tokens as `source`, at another site of one
    harvest: the same model, layer, layout (rows, chunks, context, first position, 16-bit dtype), complete
    alike and the same token ids in its first chunk."""
    where = f"data.store={source.path} and data.target={target.path}"
    if source.path == target.path:
        raise HarvestError(f"{where} are one store: a transcoder reads one site and reconstructs another")
    for key in ("model", "layer"):
        a, b = getattr(source, key), getattr(target, key)
        if a != b:
            raise HarvestError(f"{where} are of different {key}s ({a!r} vs {b!r}): a transcoder's two sites come "
                               "from one harvest (site=[mlp_in,mlp_out])")
    shape = [("rows", "n_rows"), ("chunks", "n_chunks"), ("rows per chunk", "chunk_rows"),
             ("context size", "context_size"), ("first position", "first_pos"), ("stored dtype", "acts_dtype")]
    for name, attr in shape:
        a, b = getattr(source, attr), getattr(target, attr)
        if a != b and isinstance(a, int):
            raise HarvestError(f"{where} differ in length: {name} {a:,} vs {b:,}; a transcoder's two sites come "
                               "from one harvest (site=[mlp_in,mlp_out]), which writes them alike")
        if a != b:
            raise HarvestError(f"{where} differ: {name} {a!r} vs {b!r}")
    if source.complete != target.complete:
        raise HarvestError(f"{where}: one is complete and the other not; finish the harvest first")
    if source.n_chunks and not np.array_equal(source.read_tokens(0), target.read_tokens(0)):
        raise HarvestError(f"{where} hold different tokens: harvest the two sites in one pass (site=[mlp_in,mlp_out])")
