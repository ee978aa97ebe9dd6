"""The harvest: text -> LM up to the last hooked site -> chunks of activations -> one zarr store per site.

    preflight(cfg)   every check, in one clear line, before any model weight is read: one Plan per store
    harvest(cfg)     preflight, then the chunk loop; resumes unfinished stores

Chunk i always holds sequences [i * chunk_seqs, (i + 1) * chunk_seqs) of the packed token
stream, so an interrupted harvest re-run with the same config writes the same rows in the same
order. Per chunk: a thread packs and tokenises the next chunk's text while the LM runs; one forward
pass reads every (layer, site) and stops after the last (`lm.SitesReader`); on CUDA the rows travel to
pinned host memory while the next forward runs; `writer_threads` threads encode and write chunk files
(the GIL released), and commits follow strictly in chunk order per store (`store.write_chunks`): a
chunk's files may exist before the chunks ahead of it are committed, never its commit, so a kill at
any moment resumes as before. Stores left at different places resume from one pass: the text restarts
where the store furthest behind stopped, and each store skips the chunks it holds.

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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from harvest import lm, store, text
from harvest.config import HarvestConfig, HarvestError
from runtime.cpu import thread_count
from runtime.device import pick_device, pick_dtype
from runtime.files import disk_full
from runtime.location import LocalLocation, Location
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


def preflight(cfg: HarvestConfig) -> list[Plan]:
    """All checks that can fail, cheapest first, for every (layer, site) harvested: one Plan per store.
    Reads only the model's config, never its weights.

    Under torchrun every rank runs it on the same files, so a refusal is raised on every rank."""
    ranks = join(pick_device(cfg.device))
    cfg = dataclasses.replace(cfg, dtype=pick_dtype(cfg.dtype, ranks.device))  # the store records what ran
    layout, depth = check_model(cfg)
    threads = thread_count(cfg.writer_threads)
    plans = []
    for layer, site in cfg.sites:
        one = cfg.for_site(layer, site)
        meta = store_meta(one, depth)
        plans.append(Plan(one, ranks, layout, meta, progress=_check_store(one, ranks.world), writer_threads=threads))
    return plans


def store_meta(cfg: HarvestConfig, n_layers: int) -> dict:
    """The attributes a store of one (layer, site) records about where its rows come from."""
    return {"model": cfg.model, "layer": cfg.layer, "site": cfg.site, "config": cfg.to_dict(),
            "tokenizer": cfg.model, "n_layers": n_layers}  # lm.load_lm reads the tokenizer from the model's name


def check_model(cfg: HarvestConfig) -> tuple[store.Layout, int]:
    """(the layout of the rows the config harvests, the model's number of blocks), after the checks of
    the text and the model that need no weights: HarvestError in one line otherwise."""
    text.check_dataset(cfg.dataset)
    config = lm.load_config(cfg.model)
    depth = lm.n_layers(config)
    for layer, _ in cfg.sites:
        if layer >= depth:
            raise HarvestError(f"layer {layer} is out of range: {cfg.model} has blocks 0..{depth - 1}")
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and cfg.context_size > max_pos:
        raise HarvestError(f"context_size {cfg.context_size} exceeds {cfg.model}'s {max_pos} positions")
    layout = store.Layout(
        d_model=int(config.hidden_size), context_size=cfg.context_size, first_pos=0 if cfg.keep_pos0 else 1,
        chunk_seqs=cfg.chunk_seqs, n_chunks=cfg.n_chunks, acts_dtype=cfg.store_dtype,
    )
    return layout, depth


def _check_store(cfg: HarvestConfig, world: int) -> store.Progress | None:
    """The progress of a resumable store with this config; None for a new store. Raises if the path
    cannot be used, or if the store needs more chunks from another number of processes than `world`.
    A store at an URL is reached once here, so that missing credentials or an endpoint that does not
    answer are refused before any work."""
    path = Location.of(cfg.store)
    path.check_writable()
    if path.exists():
        if cfg.overwrite and store.looks_like_store(path):
            return None
        if not store.is_store(path):
            if path.is_dir() and not path.listdir():
                return None  # an empty folder: fine to harvest into
            if store.unfinished_creation(path):
                return None  # what a creation killed on object storage left: the next one clears it
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
    if not isinstance(path, LocalLocation):
        return None
    ancestor = path.file().parent
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
    stores: list[Location]  # one per (layer, site), in the config's order
    rows: int  # rows written by this call (by all ranks), per store
    seconds: float  # wall time of the chunk loop (model loading excluded)
    write_seconds: float  # of which spent writing this rank's chunks (overlapped with the forward passes)
    rank: int = 0  # the process that returns it (0: the one that prints)

    @property
    def store(self) -> Location:
        """The store of a single-site harvest."""
        return self.stores[0]


def harvest(cfg: HarvestConfig) -> Result:
    """Run (or resume, or repair) a harvest into its store, or its stores (one per (layer, site), all
    from one pass of the LM); under torchrun, this rank's part of it."""
    plans = preflight(cfg)
    ranks = plans[0].ranks
    locks = [WriterLock(store.lock_location(p.cfg.store), f"store {p.cfg.store}", HarvestError) for p in plans]
    for lock in locks:
        lock.check()  # on every rank, so that all refuse together; rank 0 takes them once all have looked
    barrier(ranks)
    with ExitStack() as held:
        if ranks.is_main:
            for lock in locks:
                held.enter_context(lock)
        try:
            return _harvest(plans, guard=lambda: [lock.ensure() for lock in locks])
        except OSError as e:
            if not disk_full(e):
                raise
            raise HarvestError(_disk_full(e, plans)) from None


def _disk_full(e: OSError, plans: list[Plan]) -> str:
    """The one line for a full disk: what is intact and how to resume."""
    done = {p.cfg.store: store.committed_chunks(p.cfg.store) if store.is_store(p.cfg.store) else [] for p in plans}
    rows = plans[0].layout.chunk_rows
    if len(plans) == 1:
        n = len(done[plans[0].cfg.store])
        intact = f"the store is intact with {n} committed chunks ({n * rows:,} tokens; temporaries removed)"
    else:
        intact = "the stores are intact (" + ", ".join(f"{path}: {len(ids)} committed chunks" for path, ids in
                                                       done.items()) + "; temporaries removed)"
    return f"disk full writing {e.filename or plans[0].cfg.store}: {intact}; free space and rerun the same command to resume"


def _harvest(plans: list[Plan], guard: Callable[[], object]) -> Result:
    """The harvest proper; `guard()` is called before every commit and raises if this process no longer
    holds the stores' locks (a lease on object storage can be lost)."""
    first, ranks, L = plans[0], plans[0].ranks, plans[0].layout
    before = [sum(p.progress.done) if p.progress else 0 for p in plans]
    barrier(ranks)  # every rank has read the stores before rank 0 changes them
    if first.cfg.repair:
        for plan in plans:
            if ranks.is_main:
                repair(plan)
            barrier(ranks)
    for plan in plans:
        if plan.finished:
            if ranks.is_main:
                store.finish(plan.cfg.store, L, plan.meta)
                print(f"store {plan.cfg.store} is complete ({L.n_rows:,} tokens); nothing to do")
            barrier(ranks)
    todo = [p for p in plans if not p.finished]
    if not todo:
        return Result([Location.of(p.cfg.store) for p in plans], 0, 0.0, 0.0, ranks.rank)
    writers = [_open_writer(p) for p in todo]
    for writer in writers:
        writer.guard = guard
    cfg = todo[0].cfg
    model, tokenizer = lm.load_lm(cfg.model, first.device, keep_layers=max(p.cfg.layer for p in todo) + 1)
    reader = lm.SitesReader(model, [(p.cfg.layer, p.cfg.site) for p in todo], getattr(torch, cfg.dtype))
    behind = min(writers, key=lambda w: w.chunks_done)  # the text resumes where the store furthest behind stopped
    documents = itertools.islice(text.iter_documents(cfg.dataset, cfg.seed), ranks.rank, None, ranks.world)
    packer = text.Packer(
        documents, tokenizer, cfg.context_size, text.separator_id(tokenizer, cfg.dataset.separator),
        text.PackState(**behind.pack_state), packing=cfg.dataset.packing,
    )
    share = f" (rank 0 of {ranks.world})" if ranks.world > 1 else ""
    name = Location.of(cfg.store).name if len(todo) == 1 else f"{len(todo)} stores"
    bar = tqdm(total=len(behind.chunk_ids) * L.chunk_rows, initial=behind.chunks_done * L.chunk_rows, unit="tok",
               unit_scale=True, desc=f"harvest {name}{share}", disable=not (cfg.progress and ranks.is_main),
               smoothing=0.1)
    t0 = time.perf_counter()
    with bar:
        store.write_chunks(_forward_chunks(todo[0], reader, packer, writers, behind.chunks_done, bar),
                           first.writer_threads)
    seconds = time.perf_counter() - t0
    write_seconds = sum(w.write_seconds for w in writers)
    barrier(ranks)  # every rank has committed its last chunk
    rows = []
    for plan, done_before in zip(plans, before):
        progress = store.read_progress(plan.cfg.store)
        if not progress.finished(L.n_chunks):
            raise HarvestError(_ran_out(plan.cfg, L, progress))
        rows.append((sum(progress.done) - done_before) * L.chunk_rows)
    if ranks.is_main:
        for plan in todo:
            store.finish(plan.cfg.store, L, plan.meta)
    barrier(ranks)  # the stores are complete on every rank's return
    return Result([Location.of(p.cfg.store) for p in plans], max(rows), seconds, write_seconds, ranks.rank)


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
    reader = lm.SitesReader(model, [(cfg.layer, cfg.site)], getattr(torch, cfg.dtype))
    writer = store.StoreWriter.attach(cfg.store, L, 0)
    progress = store.read_progress(cfg.store)
    target = store.read_attrs(cfg.store)["n_chunks_target"]
    changed = []
    bar = tqdm(total=len(bad), unit="chunk", desc=f"repair {Location.of(cfg.store).name}", disable=not cfg.progress)
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
                    acts = forward_chunk(reader, seqs, cfg.batch_size, plan.device, L)[0]()
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


def _forward_chunks(plan: Plan, reader: lm.SitesReader, packer: text.Packer, writers: list[store.StoreWriter],
                    start: int, bar: tqdm) -> Iterator[tuple[store.StoreWriter, int, np.ndarray, np.ndarray, dict]]:
    """(store writer, chunk id, its stored rows at that writer's site, its sequences, the packer's state
    after it), chunk after chunk of this rank from its `start`-th on, for every store that has not
    committed the chunk yet (stores resumed from different places skip what they hold), until this
    rank's text runs out (every rank says so once all have stopped).

    Off the LM's critical path: the next chunk's text is packed and tokenised by a thread while the
    LM runs, and (on CUDA) a chunk's rows travel to pinned host memory while the next chunk's forward
    runs, so the device never waits for the host."""
    L = plan.layout
    ids = writers[0].chunk_ids
    with ThreadPoolExecutor(1, thread_name_prefix="tokenizer") as tokenizer:
        text_ahead = tokenizer.submit(_take, packer, L.chunk_seqs)
        previous = None  # (k, id, rows, seqs, state) of the chunk whose rows are on their way to the host
        for k in range(start, len(ids)):
            seqs, state = text_ahead.result()
            if len(seqs) < L.chunk_seqs:
                break
            text_ahead = tokenizer.submit(_take, packer, L.chunk_seqs)
            rows = forward_chunk(reader, seqs, plan.cfg.batch_size, plan.device, L)  # copies started
            if previous is not None:
                yield from _arrived(*previous, writers)
                bar.update(L.chunk_rows)
            previous = (k, ids[k], rows, seqs, state)
        if previous is not None:
            yield from _arrived(*previous, writers)
            bar.update(L.chunk_rows)


def _take(packer: text.Packer, n: int) -> tuple[np.ndarray, dict]:
    """The next n sequences and the packer's state after them."""
    return packer.take(n), _state_dict(packer.state)


def _arrived(k: int, i: int, rows: list[Callable[[], np.ndarray]], seqs: np.ndarray, state: dict,
             writers: list[store.StoreWriter]) -> Iterator[tuple[store.StoreWriter, int, np.ndarray, np.ndarray, dict]]:
    """Chunk i (this rank's k-th) for each store that still needs it, once its rows are on the host."""
    for writer, host in zip(writers, rows):
        if writer.chunks_done <= k:
            yield writer, i, host(), seqs, state


def _state_dict(state: text.PackState) -> dict:
    return {"docs_consumed": state.docs_consumed, "carry": list(state.carry)}


def forward_chunk(reader: lm.SitesReader, seqs: np.ndarray, batch_size: int, device: torch.device,
                   L: store.Layout) -> list[Callable[[], np.ndarray]]:
    """seqs [chunk_seqs, ctx] -> per site of the reader, a call giving its stored rows [chunk_rows, d] on
    the host (float16, or bfloat16 bits as uint16), their copy from the device already started."""
    ids = torch.from_numpy(seqs).to(device)
    per_site: list[list[torch.Tensor]] = [[] for _ in reader.sites]
    for batch in lm.iter_batches(ids, batch_size):
        for out, acts in zip(per_site, reader(batch)):
            out.append(acts[:, L.first_pos :].reshape(-1, L.d_model))  # [b * rows_per_seq, d]
    return [_to_host(torch.cat(out), L) for out in per_site]


def _to_host(acts: torch.Tensor, L: store.Layout) -> Callable[[], np.ndarray]:
    """float32 rows on the device -> a call giving the store's 16-bit rows on the host. On CUDA the rows
    are converted there and copied into pinned memory asynchronously: the call waits for the copy (and
    only then reads the overflow check, so nothing synchronises before it)."""
    bf16 = L.acts_dtype == "bfloat16"
    stored = acts.to(torch.bfloat16).view(torch.int16) if bf16 else acts.to(torch.float16)
    finite = torch.ones((), dtype=torch.bool, device=acts.device) if bf16 else torch.isfinite(stored).all()
    if acts.device.type == "cuda":
        host = torch.empty(stored.shape, dtype=stored.dtype, pin_memory=True)
        host.copy_(stored, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
    else:
        host, copied = stored, None

    def arrived() -> np.ndarray:
        if copied is not None:
            copied.synchronize()
        if not bool(finite):
            raise HarvestError("activations overflow float16 (|x| > 65504); harvest again with store_dtype=bfloat16")
        rows = host.numpy()
        return rows.view(np.uint16) if bf16 else rows

    return arrived
