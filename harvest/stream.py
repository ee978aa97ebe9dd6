"""Activations straight from the LM, never stored: what training without a cache reads.

    lm = StreamLM.load(cfg)                          # a harvest config: model, site, text, packing
    chunks = lm.chunks(TRAIN, period, pack_state)    # rows [chunk_rows, d] as a harvest stores them
    rows, seqs = chunks.next()                       # ... chunk after chunk; chunks.state: where the text stands
    write_held_out(lm, period, path, n_chunks)       # the held-out side, as an ordinary store

The harvest's own pieces in the harvest's order: documents (`text.iter_documents`), `text.Packer`,
`lm.SitesReader` at one (layer, site), `run.forward_chunk`; the rows are what a harvest of the same
config would store (float16, or bfloat16 bits), chunk by chunk.

Held-out text. Document j of the text (in the order `text.iter_documents` gives, fixed by the
dataset and the seed) is held out iff j % P == P - 1, P = `held_out_period(eval_frac)`: a store's
rule for held-out chunks, applied to documents. Each side is packed on its own (`documents`), so no
token of a held-out document is ever in a training sequence. (A text that occurs twice in the corpus
can fall on both sides: the split is by position, not by content.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from harvest import lm, store, text
from harvest.config import HarvestConfig, HarvestError
from harvest.run import check_model, forward_chunk, store_meta
from runtime.device import pick_device, pick_dtype

TRAIN, HELD_OUT = "train", "held_out"


def documents(cfg: HarvestConfig, side: str, period: int) -> Iterator[str]:
    """The texts of one side of the split (module docstring), in order."""
    for j, doc in enumerate(text.iter_documents(cfg.dataset, cfg.seed)):
        if (j % period == period - 1) == (side == HELD_OUT):
            yield doc


@dataclass
class StreamLM:
    """The LM of a harvest config, loaded once, up to its one (layer, site)."""

    cfg: HarvestConfig
    layout: store.Layout  # of the rows it gives (n_chunks: the config's budget, unused here)
    n_layers: int
    device: torch.device
    model: torch.nn.Module
    tokenizer: Any
    reader: lm.SitesReader

    @classmethod
    def load(cls, cfg: HarvestConfig) -> StreamLM:
        """Checks as a harvest's preflight does (one line each), then loads the model."""
        if len(cfg.sites) != 1:
            raise HarvestError(f"a stream reads one (layer, site); the config names {len(cfg.sites)}")
        device = pick_device(cfg.device)
        cfg = dataclasses.replace(cfg, dtype=pick_dtype(cfg.dtype, device))
        layout, depth = check_model(cfg)
        model, tokenizer = lm.load_lm(cfg.model, device, keep_layers=cfg.layer + 1)
        reader = lm.SitesReader(model, [(cfg.layer, cfg.site)], getattr(torch, cfg.dtype))
        return cls(cfg, layout, depth, device, model, tokenizer, reader)

    def chunks(self, side: str, period: int, pack_state: dict[str, Any] | None = None) -> Chunks:
        """Chunks of one side of the text, from the packer state `pack_state` on (None: its start)."""
        packer = text.Packer(documents(self.cfg, side, period), self.tokenizer, self.cfg.context_size,
                             text.separator_id(self.tokenizer, self.cfg.dataset.separator),
                             text.PackState(**pack_state) if pack_state else text.PackState(),
                             packing=self.cfg.dataset.packing)
        return Chunks(self, packer)



class Chunks:
    """One side's chunks from the LM, in order; `state` is where the text stands (a packer state)."""

    def __init__(self, source: StreamLM, packer: text.Packer):
        self.source, self.packer = source, packer

    @property
    def state(self) -> dict[str, Any]:
        return {"docs_consumed": self.packer.state.docs_consumed, "carry": list(self.packer.state.carry)}

    def next(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(rows [chunk_rows, d] as stored, sequences [chunk_seqs, ctx]) of the next chunk; None once the
        text runs out (a partial chunk is dropped, as a harvest drops it)."""
        L, cfg = self.source.layout, self.source.cfg
        seqs = self.packer.take(L.chunk_seqs)
        if len(seqs) < L.chunk_seqs:
            return None
        rows = forward_chunk(self.source.reader, seqs, cfg.batch_size, self.source.device, L)[0]()
        return rows, seqs


def write_held_out(source: StreamLM, period: int, path: str, n_chunks: int, progress: bool = False
                   ) -> store.ActivationStore:
    """The store at `path` of the first n_chunks chunks of held-out text (fewer if the held-out text
    runs out; at least one), marked `held_out_only` (every chunk is held out: harvest/held_out.py). A
    complete one of the same LM, site and size is reused; anything else at `path` is replaced."""
    meta = {**store_meta(source.cfg, source.n_layers), "held_out_only": True}
    if store.is_store(path):
        found = store.ActivationStore(path)
        if found.complete and found.n_chunks == n_chunks and found.harvest_config == meta["config"]:
            return found
        store.remove(path)
    layout = dataclasses.replace(source.layout, n_chunks=n_chunks)
    cfg = source.cfg
    writer = store.StoreWriter.create(path, layout, store.codec(cfg.codec, cfg.codec_level), meta)
    chunks = source.chunks(HELD_OUT, period)
    for i in tqdm(range(n_chunks), desc="held-out text", unit="chunk", disable=not progress):
        got = chunks.next()
        if got is None:
            break
        writer.write_chunk(i, got[0], got[1], chunks.state)
    if writer.chunks_done == 0:
        raise HarvestError(f"the held-out text (every {period}th document) does not fill one chunk of "
                           f"{layout.chunk_rows} rows; add text or raise data.eval_frac")
    store.finish(path, dataclasses.replace(layout, n_chunks=writer.chunks_done), meta)
    return store.ActivationStore(path)

