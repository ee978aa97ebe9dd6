"""The harvest: text -> LM up to the hooked block -> chunks of activations -> zarr store.

    preflight(cfg)   every check, in one clear line, before any model weight is read
    harvest(cfg)     preflight, then the chunk loop; resumes an unfinished store

Chunk i always holds sequences [i * chunk_seqs, (i + 1) * chunk_seqs) of the packed token
stream, so an interrupted harvest re-run with the same config writes the same rows in the same
order. Chunks are compressed and written by `writer_threads` threads at once (zarr compresses with
the GIL released), overlapping the forward passes of the next chunks, and committed strictly in
chunk order: a chunk's files may exist before the chunks ahead of it are committed, never its
commit, so a kill at any moment resumes as before.

Several processes (`torchrun --nproc_per_node=R -m harvest ...`, runtime/ranks.py) write one
parted store (see harvest/store.py): document j goes to rank j % R, which packs its own token
stream from its documents and writes global chunks r, r + R, ... from it. Rank 0 alone creates,
resizes and finally merges the store, with barriers around; each rank resumes from its own state.
A parted store continues only with the same R (and a single-process one only with one process).

One harvest at a time writes a store: rank 0 holds the lock file `<store>.lock` (runtime/lock.py) from
preflight to return; a second launch is refused in one line naming the holder. `repair=true` first
re-creates the chunks `store.verify` finds damaged, from the same config (`repair`). A full disk stops
the harvest in one line; every committed chunk is intact and the same command resumes.
"""

from __future__ import annotations

import dataclasses
import itertools
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from harvest import lm, store, text
from harvest.config import HarvestConfig, HarvestError
from runtime.cpu import cpu_cores
from runtime.device import pick_device, pick_dtype
from runtime.files import disk_full
from runtime.lock import WriterLock
from runtime.ranks import Ranks, barrier, join


@dataclass
class Plan:
    """What preflight found: the config with `auto` values resolved, this process's place, the store layout."""

    cfg: HarvestConfig
    ranks: Ranks  # rank, world and device of this process
    layout: store.Layout
    meta: dict
    progress: store.Progress | None  # of an existing store with the same config to resume, extend or finish
    writer_threads: int  # chunks compressed and written at once


    @property
    def device(self) -> torch.device:
        return self.ranks.device

    @property
    def finished(self) -> bool:
        """Every rank of the existing store has written its share: at most marking it complete is left."""
        return self.progress is not None and self.progress.finished(self.layout.n_chunks)


def preflight(cfg: HarvestConfig) -> Plan:
    """All checks that can fail, cheapest first. Reads only the model's config, never its weights.

    Under torchrun every rank runs it on the same files, so a refusal is raised on every rank."""
    ranks = join(pick_device(cfg.device))
    cfg = dataclasses.replace(cfg, dtype=pick_dtype(cfg.dtype, ranks.device))  # the store records what ran
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
    threads = cpu_cores() if cfg.writer_threads == "auto" else int(cfg.writer_threads)
    return Plan(cfg, ranks, layout, meta, progress=_check_store(cfg, ranks.world), writer_threads=threads)


def _check_store(cfg: HarvestConfig, world: int) -> store.Progress | None:
    """The progress of a resumable store with this config; None for a new store. Raises if the path
    cannot be used, or if the store needs more chunks from another number of processes than `world`."""
    path = Path(cfg.store)
    if path.exists():
        if cfg.overwrite and store.looks_like_store(path):
            return None
        if not store.is_store(path):
            if path.is_dir() and not any(path.iterdir()):
                return None  # an empty folder: fine to harvest into
            if store.looks_like_store(path):
                raise HarvestError(f"store {path} is damaged beyond repair: its zarr.json (the store's attributes "
                                   "and progress) is lost; harvest it again with overwrite=true")
            raise HarvestError(f"store path {path} exists and is not an activation store; choose another store=")
        attrs = store.read_attrs(path)
        old_identity = {k: v for k, v in attrs["config"].items() if k in cfg.identity()}
        if old_identity != cfg.identity():
            diff = ", ".join(f"{k}: {old_identity.get(k)!r} -> {v!r}" for k, v in cfg.identity().items()
                             if old_identity.get(k) != v)
            raise HarvestError(f"store {path} was harvested with a different config ({diff}); "
                               "choose another store= or pass overwrite=true to replace it")
        progress = store.read_progress(path)
        if not progress.fits(cfg.n_chunks):
            raise HarvestError(f"store {path} already holds {sum(progress.done) * attrs['chunk_rows']} tokens, "
                               f"more than tokens={cfg.tokens}; raise tokens or choose another store=")
        if progress.world != world and not progress.finished(cfg.n_chunks):
            how = "one process (python -m harvest)" if progress.world == 1 else \
                f"torchrun --nproc_per_node={progress.world}"
            raise HarvestError(f"store {path} was harvested by {progress.world} process(es) and can only be "
                               f"continued by as many, not {world}: relaunch with {how}, choose another store= or pass "
                               "overwrite=true to replace it")
        return progress
    if cfg.repair:
        raise HarvestError(f"repair=true needs an existing store: there is none at {path}")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise HarvestError(f"store {path} is not writable: {ancestor} is a file, not a folder")
    try:
        tempfile.TemporaryDirectory(dir=ancestor).cleanup()
    except OSError as e:
        raise HarvestError(f"store {path} is not writable: cannot create anything in {ancestor} ({e.strerror})") from None
    return None


@dataclass
class Result:
    store: Path
    rows: int  # rows written by this call (by all ranks)
    seconds: float  # wall time of the chunk loop (model loading excluded)
    write_seconds: float  # of which spent writing this rank's chunks (overlapped with the forward passes)
    rank: int = 0  # the process that returns it (0: the one that prints)


def harvest(cfg: HarvestConfig) -> Result:
    """Run (or resume, or repair) a harvest into cfg.store; under torchrun, this rank's part of it."""
    plan = preflight(cfg)
    lock = WriterLock(store.lock_path(plan.cfg.store), f"store {plan.cfg.store}", HarvestError)
    lock.check()  # on every rank, so that all refuse together; rank 0 takes it once all have looked
    barrier(plan.ranks)
    with lock if plan.ranks.is_main else nullcontext():
        try:
            return _harvest(plan)
        except OSError as e:
            if not disk_full(e):
                raise
            done = store.committed_chunks(plan.cfg.store)
            raise HarvestError(f"disk full writing {e.filename or plan.cfg.store}: the store is intact with "
                               f"{len(done)} committed chunks ({len(done) * plan.layout.chunk_rows:,} tokens; "
                               "temporaries removed); free space and rerun the same command to resume") from None


def _harvest(plan: Plan) -> Result:
    cfg, L, ranks = plan.cfg, plan.layout, plan.ranks
    before = sum(plan.progress.done) if plan.progress else 0
    barrier(ranks)  # every rank has read the store before rank 0 changes it
    if cfg.repair:
        if ranks.is_main:
            repair(plan)
        barrier(ranks)
    if plan.finished:
        if ranks.is_main:
            store.finish(cfg.store, L, plan.meta)
            print(f"store {cfg.store} is complete ({L.n_rows:,} tokens); nothing to do")
        barrier(ranks)
        return Result(Path(cfg.store), 0, 0.0, 0.0, ranks.rank)
    writer = _open_writer(plan)
    model, tokenizer = lm.load_lm(cfg.model, plan.device, keep_layers=cfg.layer + 1)
    reader = lm.SiteReader(model, cfg.layer, cfg.site, getattr(torch, cfg.dtype))
    documents = itertools.islice(text.iter_documents(cfg.dataset, cfg.seed), ranks.rank, None, ranks.world)
    packer = text.Packer(
        documents, tokenizer, cfg.context_size, text.separator_id(tokenizer, cfg.dataset.separator),
        text.PackState(**writer.pack_state), packing=cfg.dataset.packing,
    )

    todo = writer.chunk_ids[writer.chunks_done :]
    share = f" (rank 0 of {ranks.world})" if ranks.world > 1 else ""
    bar = tqdm(total=len(writer.chunk_ids) * L.chunk_rows, initial=writer.chunks_done * L.chunk_rows, unit="tok",
               unit_scale=True, desc=f"harvest {Path(cfg.store).name}{share}",
               disable=not (cfg.progress and ranks.is_main), smoothing=0.1)
    t0 = time.perf_counter()
    with bar:
        writer.write_chunks(_forward_chunks(plan, reader, packer, todo, bar), plan.writer_threads)
    seconds = time.perf_counter() - t0
    barrier(ranks)  # every rank has committed its last chunk
    progress = store.read_progress(cfg.store)
    if not progress.finished(L.n_chunks):
        raise HarvestError(_ran_out(cfg, L, progress))
    if ranks.is_main:
        store.finish(cfg.store, L, plan.meta)
    barrier(ranks)  # the store is complete on every rank's return
    rows = (sum(progress.done) - before) * L.chunk_rows
    return Result(Path(cfg.store), rows, seconds, writer.write_seconds, ranks.rank)


def repair(plan: Plan) -> list[int]:
    """Rank 0: restore lost array metadata, then re-create every chunk `store.verify` finds damaged, from
    the same config: the text is packed again from the start (per rank share of a parted store) and the
    LM runs only on the bad chunks. Returns the chunk ids re-created; the store is verified again after."""
    cfg, L = plan.cfg, plan.layout
    restored = store.restore_metadata(cfg.store, L, store.codec(cfg.codec, cfg.codec_level))
    if restored:
        print(f"restored the metadata of array(s) {', '.join(restored)} of {cfg.store}")
    verdict = store.verify(cfg.store, progress=cfg.progress)
    if verdict.problems:
        raise HarvestError(verdict.problems[0])
    if not verdict.bad:
        print(f"store {cfg.store}: {verdict.checked} chunks verified intact; nothing to repair")
        return []
    bad = sorted(verdict.bad)
    model, tokenizer = lm.load_lm(cfg.model, plan.device, keep_layers=cfg.layer + 1)
    reader = lm.SiteReader(model, cfg.layer, cfg.site, getattr(torch, cfg.dtype))
    writer = store.StoreWriter.attach(cfg.store, L, 0)
    progress = store.read_progress(cfg.store)
    target = store.read_attrs(cfg.store)["n_chunks_target"]
    changed = []
    bar = tqdm(total=len(bad), unit="chunk", desc=f"repair {Path(cfg.store).name}", disable=not cfg.progress)
    with bar:
        for rank, done in enumerate(progress.done):
            ids = list(store.chunk_ids(target, rank, progress.world)[:done])
            wanted = set(ids) & set(bad)
            if not wanted:
                continue
            documents = itertools.islice(text.iter_documents(cfg.dataset, cfg.seed), rank, None, progress.world)
            packer = text.Packer(documents, tokenizer, cfg.context_size,
                                 text.separator_id(tokenizer, cfg.dataset.separator), text.PackState(),
                                 packing=cfg.dataset.packing)
            for i in ids[: ids.index(max(wanted)) + 1]:
                seqs = packer.take(L.chunk_seqs)  # chunk i's sequences, whether or not it is bad
                if i in wanted:
                    acts = _forward_chunk(reader, seqs, cfg.batch_size, plan.device, L)
                    changed += [f"{name} chunk {i}" for name in writer.rewrite_chunk(i, acts, seqs)]
                    bar.update()
    after = store.verify(cfg.store, progress=False)
    if not after.ok:
        raise HarvestError(f"repair of {cfg.store} failed: chunk(s) {sorted(after.bad)} are still damaged")
    same = "identical to what was first written" if not changed else \
        f"{', '.join(changed)} differ from what was first written (another device or dtype?)"
    print(f"repaired chunk(s) {', '.join(map(str, bad))} of {cfg.store}: {same}; verified intact")
    return bad


def _open_writer(plan: Plan) -> store.StoreWriter:
    """This rank's writer: rank 0 creates (or replaces, or reopens and resizes) the store, then the others attach."""
    cfg, L, ranks = plan.cfg, plan.layout, plan.ranks
    if not ranks.is_main:
        barrier(ranks)  # the arrays exist, at their final size
        return store.StoreWriter.attach(cfg.store, L, ranks.rank)
    if cfg.overwrite and store.looks_like_store(cfg.store):
        store.remove(cfg.store)
    if plan.progress is not None:
        writer = store.StoreWriter.reopen(cfg.store, L, plan.meta)
    else:
        writer = store.StoreWriter.create(cfg.store, L, store.codec(cfg.codec, cfg.codec_level), plan.meta,
                                          world=ranks.world)
    barrier(ranks)
    return writer


def _ran_out(cfg: HarvestConfig, L: store.Layout, progress: store.Progress) -> str:
    """The one line for a text that ran out before every rank had its share: what to pass instead."""
    stored, fit = sum(progress.done) * L.chunk_rows, progress.prefix * L.chunk_rows
    head = f"the dataset ran out after {stored:,} stored tokens (< tokens={cfg.tokens:,}); add text, or "
    if progress.finished(progress.prefix):  # always so with one process
        return head + f"pass tokens={fit} to mark this store complete"
    return head + f"harvest tokens={fit} (what every rank's share of the text holds) into another store="


def _forward_chunks(plan: Plan, reader: lm.SiteReader, packer: text.Packer, todo: list[int], bar: tqdm
                    ) -> Iterator[tuple[int, np.ndarray, np.ndarray, dict]]:
    """(chunk id, its stored rows, its sequences, the packer's state after it) for the chunks `todo`, in
    order, until this rank's text runs out (every rank says so once all have stopped)."""
    L = plan.layout
    for i in todo:
        seqs = packer.take(L.chunk_seqs)
        if len(seqs) < L.chunk_seqs:
            return
        yield i, _forward_chunk(reader, seqs, plan.cfg.batch_size, plan.device, L), seqs, _state_dict(packer.state)
        bar.update(L.chunk_rows)


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
