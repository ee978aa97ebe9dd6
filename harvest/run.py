"""The harvest: text -> LM up to the hooked block -> chunks of activations -> zarr store.

    preflight(cfg)   every check, in one clear line, before any model weight is read
    harvest(cfg)     preflight, then the chunk loop; resumes an unfinished store

Chunk i always holds sequences [i * chunk_seqs, (i + 1) * chunk_seqs) of the packed token
stream, so an interrupted harvest re-run with the same config writes the same rows in the same
order. Writing chunk i (a background thread) overlaps the forward passes of chunk i + 1.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from harvest import lm, store, text
from harvest.config import HarvestConfig, HarvestError

@dataclass
class Plan:
    """What preflight found: the config with `auto` values resolved, the device, the store layout."""

    cfg: HarvestConfig
    device: torch.device
    layout: store.Layout
    meta: dict
    resume: bool  # an unfinished or extendable store with the same config exists


def preflight(cfg: HarvestConfig) -> Plan:
    """All checks that can fail, cheapest first. Reads only the model's config, never its weights."""
    device = lm.pick_device(cfg.device)
    cfg = dataclasses.replace(cfg, dtype=lm.pick_dtype(cfg.dtype, device))  # the store records what ran
    text.check_dataset(cfg.dataset)
    config = lm.load_config(cfg.model)
    depth = lm.n_layers(config)
    if cfg.layer >= depth:
        raise HarvestError(f"layer {cfg.layer} is out of range: {cfg.model} has blocks 0..{depth - 1}")
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and cfg.context_size > max_pos:
        raise HarvestError(f"context_size {cfg.context_size} exceeds {cfg.model}'s {max_pos} positions")
    layout = store.Layout(
        d_model=int(config.hidden_size), context_size=cfg.context_size, first_pos=0 if cfg.keep_pos0 else 1,
        chunk_seqs=cfg.chunk_seqs, n_chunks=cfg.n_chunks, acts_dtype=cfg.store_dtype,
    )
    meta = {"model": cfg.model, "layer": cfg.layer, "site": cfg.site, "config": cfg.to_dict(),
            "tokenizer": cfg.model, "n_layers": depth}  # lm.load_lm reads the tokenizer from the model's name
    return Plan(cfg, device, layout, meta, resume=_check_store(cfg))


def _check_store(cfg: HarvestConfig) -> bool:
    """True if a resumable store with this config exists; raises if the path cannot be used."""
    path = Path(cfg.store)
    if path.exists():
        if not store.is_store(path):
            if path.is_dir() and not any(path.iterdir()):
                return False  # an empty folder: fine to harvest into
            raise HarvestError(f"store path {path} exists and is not an activation store; choose another store=")
        if cfg.overwrite:
            return False
        old = store.ActivationStore(path)
        old_identity = {k: v for k, v in old.attrs["config"].items() if k in cfg.identity()}
        if old_identity != cfg.identity():
            diff = ", ".join(f"{k}: {old_identity.get(k)!r} -> {v!r}" for k, v in cfg.identity().items()
                             if old_identity.get(k) != v)
            raise HarvestError(f"store {path} was harvested with a different config ({diff}); "
                               "choose another store= or pass overwrite=true to replace it")
        done = old.attrs["progress"]["chunks_done"]
        if done > cfg.n_chunks:
            raise HarvestError(f"store {path} already holds {done * old.chunk_rows} tokens, more than tokens={cfg.tokens}; "
                               "raise tokens or choose another store=")
        return True
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise HarvestError(f"store {path} is not writable: {ancestor} is a file, not a folder")
    try:
        tempfile.TemporaryDirectory(dir=ancestor).cleanup()
    except OSError as e:
        raise HarvestError(f"store {path} is not writable: cannot create anything in {ancestor} ({e.strerror})") from None
    return False


@dataclass
class Result:
    store: Path
    rows: int  # rows written by this call
    seconds: float  # wall time of the chunk loop (model loading excluded)
    write_seconds: float  # of which spent writing chunks (overlapped with the forward passes)


def harvest(cfg: HarvestConfig) -> Result:
    """Run (or resume) a harvest into cfg.store."""
    plan = preflight(cfg)
    cfg, L = plan.cfg, plan.layout
    if cfg.overwrite and store.is_store(cfg.store):
        store.remove(cfg.store)
        plan.resume = False
    if plan.resume:
        writer = store.StoreWriter.reopen(cfg.store, L, plan.meta)
    else:
        writer = store.StoreWriter.create(cfg.store, L, store.codec(cfg.codec, cfg.codec_level), plan.meta)
    if writer.chunks_done == L.n_chunks:
        print(f"store {cfg.store} is complete ({writer.chunks_done * L.chunk_rows:,} tokens); nothing to do")
        return Result(Path(cfg.store), 0, 0.0, 0.0)

    model, tokenizer = lm.load_lm(cfg.model, plan.device, keep_layers=cfg.layer + 1)
    reader = lm.SiteReader(model, cfg.layer, cfg.site, getattr(torch, cfg.dtype))
    packer = text.Packer(
        text.iter_documents(cfg.dataset, cfg.seed), tokenizer, cfg.context_size,
        text.separator_id(tokenizer, cfg.dataset.separator), text.PackState(**writer.pack_state),
        packing=cfg.dataset.packing,
    )

    bar = tqdm(total=L.n_rows, initial=writer.chunks_done * L.chunk_rows, unit="tok", unit_scale=True,
               desc=f"harvest {Path(cfg.store).name}", disable=not cfg.progress, smoothing=0.1)
    pending: Future | None = None
    start_chunk, t0 = writer.chunks_done, time.perf_counter()
    with bar, ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer") as pool:
        for i in range(writer.chunks_done, L.n_chunks):
            seqs = packer.take(L.chunk_seqs)
            if len(seqs) < L.chunk_seqs:
                if pending is not None:
                    pending.result()
                done = writer.chunks_done * L.chunk_rows
                raise HarvestError(f"the dataset ran out after {done:,} stored tokens (< tokens={cfg.tokens:,}); "
                                   f"add text, or pass tokens={done} to mark this store complete")
            acts = _forward_chunk(reader, seqs, cfg.batch_size, plan.device, L)
            if pending is not None:
                pending.result()  # at most one chunk in flight; commits stay in order
            pending = pool.submit(writer.write_chunk, i, acts, seqs, _state_dict(packer.state))
            bar.update(L.chunk_rows)
        if pending is not None:
            pending.result()
    rows = (writer.chunks_done - start_chunk) * L.chunk_rows
    return Result(Path(cfg.store), rows, time.perf_counter() - t0, writer.write_seconds)


def _state_dict(state: text.PackState) -> dict:
    return {"docs_consumed": state.docs_consumed, "carry": list(state.carry)}


def _forward_chunk(reader: lm.SiteReader, seqs: np.ndarray, batch_size: int, device: torch.device,
                   L: store.Layout) -> np.ndarray:
    """seqs [chunk_seqs, ctx] -> stored rows [chunk_rows, d] (float16, or bfloat16 bits as uint16)."""
    ids = torch.from_numpy(seqs).to(device)
    out = []
    for batch in lm.iter_batches(ids, batch_size):
        acts = reader(batch)[:, L.first_pos :]  # [b, rows_per_seq, d]
        out.append(acts.reshape(-1, L.d_model))
    acts = torch.cat(out)
    if L.acts_dtype == "bfloat16":
        return acts.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    acts = acts.to(torch.float16)
    if not torch.isfinite(acts).all():
        raise HarvestError("activations overflow float16 (|x| > 65504); harvest again with store_dtype=bfloat16")
    return acts.cpu().numpy()
