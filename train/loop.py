"""The training loop: batches from the store -> SAE -> loss -> recipe step, with logs and checkpoints.

`train(cfg, run_dir)` reads as the recipe: check the run folder, open the store (data.source=stream:
load the LM and harvest the run's held-out text, `open_stream`), join the ranks,
build the SAE, turn the budget into a `run_length` (train/budget.py), `resume` from a checkpoint,
`record_launch`, open the experiment tracker (`open_tracker`, logger=none: one that does nothing),
then `Trainer.fit` step by step (`train_step`, `metrics`, `save_checkpoint`, `validate` on the
held-out sample of train/validation.py) and `finish`. The folder's files are `train.run_dir.RunDir`'s.
Every metrics.jsonl and validation.jsonl line also goes to the tracker (train/..., val/...).
Launching into a folder with a checkpoint continues from it (unless resume=false); a finished run is
skipped, which makes re-launched sweeps resume where they stopped.

Several processes (`torchrun --nproc_per_node=R -m train ...`, train/dist.py): rank r trains on its
own chunks with batch_size / R rows a step (`data_shard`); the SAE is replicated (data parallel) or,
with expert_parallel=G, Switch experts are split over G ranks (train/expert_parallel.py); logged
metrics are those of the global batch and only rank 0 writes the run folder. The checkpoint holds
the whole state: a run resumes on any number of ranks and either layout, at the same step (its data
order then differs from a run that kept R, since every rank's batch s is a pure function of its
shard and s).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from harvest import held_out
from harvest.cache import ChunkCache
from harvest.held_out import HeldOut
from harvest.paired import PairedStore
from harvest.run import check_model
from harvest.store import ActivationStore
from harvest.stream import StreamLM, write_held_out
from runtime.config import flatten
from runtime.cpu import thread_count
from runtime.device import autocast, pick_device
from runtime.errors import reraise_as
from runtime.files import disk_full, remove_litter
from runtime.location import Location
from runtime.tracking import Tracker, start
from train.budget import BudgetError, Length
from train.config import RUNTIME_KEYS, TrainConfig, TrainError
from train.dist import DataParallel, Dist, init
from train.expert_parallel import ExpertParallel
from train.loader import Batches
from train.recipe import apply_update, default_lr, lr_factor, make_optimizer
from train.run_dir import RunDir
from train.saes import SAE, Output, build
from train.saes.flops import algorithmic_cost
from train.stream import StreamBatches
from train.validation import Validator


def open_store(cfg: TrainConfig) -> ActivationStore | PairedStore:
    """The run's store, read through a local chunk cache when `data.cache_dir` is set; a transcoder's
    (data.target) paired with its target's (harvest/paired.py: rows [x | y])."""
    store = _open_one(cfg, cfg.data.store, "data.store")
    if cfg.data.target is None:
        return store
    with reraise_as(TrainError):
        return PairedStore(store, _open_one(cfg, cfg.data.target, "data.target"))


def _open_one(cfg: TrainConfig, path: str, key: str) -> ActivationStore:
    cache = None if cfg.data.cache_dir is None else \
        ChunkCache(cfg.data.cache_dir, cfg.data.cache_gb * 1e9, Location.of(path).identity)
    try:
        store = ActivationStore(path, cache=cache)
    except FileNotFoundError:
        raise TrainError(f"{key} {path} is not an activation store (run `make harvest` first)") from None
    if not store.complete and not cfg.data.allow_incomplete:
        raise TrainError(f"store {path} is incomplete ({store.n_rows:,} tokens so far); finish the harvest "
                         "or pass data.allow_incomplete=true")
    return store


def data_shard(train_ids: list[int], batch_size: int, seed: int, rank: int, world: int) -> tuple[list[int], int, int]:
    """Rank `rank` of `world`: (its chunks train_ids[rank::world], disjoint from the other ranks';
    its batch_size / world rows a step; its data seed, seed + 10_000 * rank). Rank 0 keeps the seed,
    so a one-process run reads the same batches as rank 0 alone would."""
    return train_ids[rank::world], batch_size // world, seed + 10_000 * rank


def _build(cfg: TrainConfig, d: int) -> SAE:
    try:
        return build(cfg.model["arch"], **cfg.sae_kwargs(d))
    except ValueError as e:
        raise TrainError(str(e)) from None


class DeadLatents:
    """Tokens since each latent last fired; dead = silent for `window` tokens. With several ranks
    `tokens` counts every rank's tokens, and the ranks' `last` are merged by a max over ranks
    (a latent's last firing on any rank) before it is logged or saved."""

    def __init__(self, n_latents: int, window: int, device: torch.device):
        self.window = window
        self.tokens = 0
        self.last = torch.zeros(n_latents, dtype=torch.long, device=device)

    def update(self, out: Output, batch: int) -> None:
        self.tokens += batch
        self.last.masked_fill_(out.codes.fired(len(self.last)), self.tokens)

    def mask(self) -> torch.Tensor:
        """[M] bool: the latents silent for `window` tokens (on this rank, since the last merge)."""
        return (self.tokens - self.last) >= self.window

    def fraction(self) -> float:
        return self.mask().float().mean().item()


def batch_metrics(out: Output, dist: Dist) -> dict:
    """Loss terms, L0 (mean number of non-zero codes per token) and expert load of the step's batch,
    over all ranks: the values of the union of the ranks' equal-sized batches. (Each rank's codes may
    cover another number of tokens, as with expert parallelism: L0 is a ratio of sums.)"""
    active = out.codes.active()
    sums = dist.all_reduce_sum(torch.stack([*(v.detach().float() for v in out.losses.values()),
                                            active.sum().float(), active.new_tensor(len(active), dtype=torch.float)]))
    record = dict(zip(out.losses, (sums[:-2] / dist.world).tolist()))
    record["l0"] = (sums[-2] / sums[-1]).item()
    if "expert_load" in out.stats:
        record["expert_load"] = (dist.all_reduce_sum(out.stats["expert_load"].detach()) / dist.world).tolist()
    return record



def check_same_run(cfg: TrainConfig, run: RunDir) -> None:
    """A run folder holds one run: relaunching it with other settings is refused, not silently mixed.
    Keys Hydra leaves out of run names (RUNTIME_KEYS) may change between launches."""
    if not run.has_config or not cfg.resume:
        return
    old = flatten(run.read_config())
    new = flatten(json.loads(json.dumps(cfg.to_dict())))  # tuples as lists, as the saved YAML has them
    added = added_keys(cfg.model["arch"])  # keys newer than the run: absent there means their default
    diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in RUNTIME_KEYS and old.get(k) != new.get(k)
            and not (k not in old and k in added and added[k] == new.get(k))]
    if diff:
        raise TrainError(f"{run} holds a run with other settings ({', '.join(diff)}); use another run "
                         "directory or delete this one")


def added_keys(arch: str) -> dict[str, Any]:
    """Every key of conf/train/train.yaml and conf/train/model/<arch>.yaml with its default, flattened as a
    run's config is: a run trained before a key existed ran with what is now its default."""
    from omegaconf import OmegaConf

    from train.config import CONF
    from train.saes.base import model_yaml

    train_yaml = OmegaConf.to_container(OmegaConf.load(CONF / "train.yaml"))
    train_yaml = {k: v for k, v in train_yaml.items() if k not in ("defaults", "hydra")}
    return {**flatten(train_yaml), **flatten({"model": model_yaml(arch)})}


# ------------------------------------------------------------------------------------ the recipe

def clock() -> float:
    """Seconds on a monotonic clock: the time of seconds budgets and logs (tests replace it)."""
    return time.perf_counter()


@dataclass
class Trainer:
    """Everything one rank trains with, and where it is: `step` steps done in `seconds` of training
    (validation not counted), `dead` latents tracked. `validator` is rank 0's (None elsewhere or
    without validation); `eval_every` steps between validations (0: none); `tracker` gets every
    logged line (rank 0's; elsewhere, and with logger=none, one that does nothing)."""

    cfg: TrainConfig
    run: RunDir
    dist: Dist
    layout: DataParallel
    sae: SAE
    opt: torch.optim.Optimizer
    base_lr: float
    length: Length
    batches: Iterator[torch.Tensor]
    step: int
    seconds: float
    dead: DeadLatents
    flops_per_token: float
    validator: Validator | None
    eval_every: int
    tracker: Tracker = field(default_factory=Tracker)
    data_state: Callable[[int], dict] | None = None  # a stream's position for a checkpoint at a step (train/stream.py)

    def __post_init__(self) -> None:
        self.params = list(self.sae.parameters())
        self.model = torch.compile(self.sae) if self.cfg.compile else self.sae
        self.dtype = getattr(torch, self.cfg.dtype)
        self.last_good = self.step  # the step of the newest checkpoint

    @property
    def finished(self) -> bool:
        return self.length.finished(self.step, self.seconds)

    def lr(self) -> float:
        """The learning rate of the next step: constant, then decaying over the budget's last part."""
        done = self.length.elapsed(self.step, self.seconds)
        return self.base_lr * lr_factor(done, self.length.total, self.cfg.lr_decay_frac)

    def train_step(self) -> Output:
        """One optimizer step on the next batch; stops every rank at once if the loss is not finite."""
        rows = next(self.batches)  # [B, d], or a transcoder's [B, 2 d]: x and its target side by side
        x, target = self.sae.split(rows)
        self.sae.schedule(self.length.elapsed(self.step, self.seconds), self.length.total)
        if self.sae.uses_dead_latents:
            self.sae.dead = self.dead.mask()  # AuxK revives these
        for group in self.opt.param_groups:
            group["lr"] = self.lr()
        with autocast(self.dist.device, self.dtype):
            out = self.model(x) if target is x else self.model(x, target)
        loss = out.losses["loss"]
        total = self.dist.all_reduce_sum(loss.detach())  # the same on every rank
        if not torch.isfinite(total):
            raise TrainError(f"loss became {(total / self.dist.world).item()} at step {self.step}; stopped. The last "
                             f"good checkpoint (step {self.last_good}) is kept in {self.run}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.layout.sync_grads()
        apply_update(self.sae, self.opt, self.params, self.cfg.grad_clip, self.layout.grad_norm)
        self.dead.update(out, len(x) * self.dist.world)
        self.step += 1
        return out

    def metrics(self, out: Output, tokens_per_s: float) -> dict[str, Any]:
        """The metrics.jsonl line of the step just taken (a collective: every rank calls it)."""
        self.dead.last = self.dist.all_reduce_max(self.dead.last)
        return {"step": self.step, "tokens": self.dead.tokens, **batch_metrics(out, self.dist),
                "dead_frac": self.dead.fraction(), "lr": self.lr(), "tokens_per_s": tokens_per_s,
                "world_size": self.dist.world}

    def validate(self) -> None:
        """The validation.jsonl line of the SAE as it is now (a collective: every rank calls it)."""
        full = self.layout.full_sae(self.sae)
        if self.validator is None:
            return
        record = {"step": self.step, "tokens": self.dead.tokens, "train_flops": self.dead.tokens * self.flops_per_token,
                  "seconds": self.seconds, **self.validator(full)}
        with self.run.open_log(RunDir.VALIDATION) as log:
            log.write(json.dumps(record) + "\n")
        self.tracker.log(record, self.step, "val")

    def save_checkpoint(self) -> None:
        """The whole training state, gathered from every rank's shard, written by rank 0. Tensors and
        plain values only (`resume` reads it with torch.load(weights_only=True)): the SAE's and Adam's
        state dicts (tensors; Adam's param_groups hold numbers, bools, None, a betas tuple and lists of
        parameter ids), the CPU RNG state as a uint8 tensor, the dead-latent counters (a tensor and an
        int), the step, world size and expert_parallel (ints) and the seconds trained (a float)."""
        self.dead.last = self.dist.all_reduce_max(self.dead.last)
        weights, moments = self.layout.full_state(self.sae, self.opt)
        if self.dist.is_main:
            self.run.save_checkpoint({"sae": weights, "opt": moments, "step": int(self.step),
                                      "seconds": float(self.seconds), "dead_tokens": int(self.dead.tokens),
                                      "dead_last": self.dead.last, "rng": torch.get_rng_state(),
                                      "world_size": int(self.dist.world),
                                      "expert_parallel": int(self.cfg.expert_parallel),
                                      **({"stream": self.data_state(self.step)} if self.data_state else {})})
        self.last_good = self.step

    def _agree_on_seconds(self) -> None:
        """With a seconds budget on several ranks, every rank takes the slowest one's time, so that
        they decay the lr alike and stop at the same step."""
        if self.length.timed and self.dist.world > 1:
            t = torch.tensor(self.seconds, dtype=torch.float64, device=self.dist.device)
            self.seconds = self.dist.all_reduce_max(t).item()

    def fit(self) -> None:
        """Steps until the budget is spent: logging every log_every steps, checkpointing every
        checkpoint_every, validating every eval_every (and from the first step, and at the last)."""
        cfg, main = self.cfg, self.dist.is_main
        unit = dict(unit="s", bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]") \
            if self.length.timed else {}
        total, done = (self.length.total, self.seconds) if self.length.timed else (self.length.steps, self.step)
        bar = tqdm(total=total, initial=done, desc=f"train {cfg.model['arch']}", disable=not (cfg.progress and main),
                   **unit)
        if self.eval_every and self.step == 0:
            self.validate()
        t_log, tokens_log = clock(), 0
        with bar, self.run.open_log(RunDir.METRICS) if main else open(os.devnull, "w") as log:
            while not self.finished:
                t0 = clock()
                out = self.train_step()
                dt = clock() - t0
                self.seconds += dt
                self._agree_on_seconds()
                tokens_log += cfg.batch_size
                bar.update(dt if self.length.timed else 1)
                last = self.finished
                if self.step % cfg.log_every == 0 or last:
                    now = clock()
                    record = self.metrics(out, tokens_log / (now - t_log))
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    self.tracker.log(record, self.step, "train")
                    bar.set_postfix(loss=f"{record['loss']:.4g}", tok_s=f"{record['tokens_per_s']:.0f}")
                    t_log, tokens_log = now, 0
                if self.step % cfg.checkpoint_every == 0 or last:
                    self.save_checkpoint()
                if self.eval_every and (self.step % self.eval_every == 0 or last):
                    t_val = clock()
                    self.validate()
                    t_log += clock() - t_val  # validation time is no training throughput

    def finish(self) -> Path:
        """Save the whole SAE and mark the run done (rank 0); every rank returns once it is saved."""
        sae = self.layout.full_sae(self.sae)
        if self.dist.is_main:
            self.run.save_sae(sae)
            self.run.mark_done({"step": self.step, "tokens": self.dead.tokens, "world_size": self.dist.world})
        self.dist.barrier()
        return self.run.path / RunDir.SAE


def resume(cfg: TrainConfig, run: RunDir, sae: SAE, dead: DeadLatents, store: ActivationStore, dist: Dist
           ) -> tuple[int, dict | None]:
    """Load the run's checkpoint into the SAE, the dead-latent tracker and the RNG: (step, the
    checkpoint, whose optimizer and schedule state are loaded once they exist). (0, None) for a new run."""
    if not (cfg.resume and run.has_checkpoint):
        return 0, None
    with reraise_as(TrainError):  # a file holding more than tensors and plain values is refused, not run
        state = run.load_checkpoint(dist.device)
    needed = {"sae", "opt", "step", "dead_tokens", "dead_last", "rng"}
    missing = sorted(needed - set(state)) if isinstance(state, dict) else sorted(needed)
    if missing or not (isinstance(state["sae"], dict) and isinstance(state["sae"].get("b_pre"), torch.Tensor)):
        raise TrainError(f"{run.path / RunDir.CHECKPOINT} is not a checkpoint of this toolkit (it lacks "
                         f"{', '.join(missing) or 'sae.b_pre'}); delete it to train this run from scratch, or use "
                         "another run directory")
    d = state["sae"]["b_pre"].shape[0]
    if d != store.d_in:
        raise TrainError(f"{run} holds a run on d={d} activations, but the store {cfg.data.store} has "
                         f"d={store.d_in}; use another run directory")
    try:
        sae.load_state_dict(state["sae"])
    except RuntimeError:
        raise TrainError(f"{run} holds a checkpoint of another architecture or width; "
                         "use another run directory or resume=false") from None
    dead.tokens, dead.last = state["dead_tokens"], state["dead_last"]
    torch.set_rng_state(state["rng"])
    if dist.is_main:
        print(f"resuming {run} at step {state['step']} (saved by {state.get('world_size', 1)} ranks with "
              f"expert_parallel={state.get('expert_parallel', 1)}, now {dist.world} with {cfg.expert_parallel})")
    return state["step"], state


def record_launch(cfg: TrainConfig, run: RunDir, store: ActivationStore, step: int, dist: Dist) -> int | None:
    """Rank 0, once every rank has read the folder: forget logged steps to be redone (from scratch:
    every line, the step-0 validation included), write this launch's config and store identity.
    Returns the last step the earlier launches logged (None: none, or not rank 0)."""
    dist.barrier()
    if not dist.is_main:
        return None
    logged = run.last_logged_step()
    run.drop_logs_after(step if step else -1)
    run.write_config(cfg.to_dict())
    run.write_store(store)
    return logged


def open_tracker(cfg: TrainConfig, run: RunDir, step: int, logged: int | None, group: str | None, dist: Dist
                 ) -> Tracker:
    """Rank 0's experiment tracker (runtime/tracking.py), its config logged and its run recorded in
    the folder (RunDir.TRACKER): a launch from a checkpoint continues the tracked run recorded there.
    Other ranks, and logger=none, get a Tracker that does nothing."""
    if not dist.is_main or cfg.tracking.kind == "none":
        return Tracker()
    config = {**json.loads(json.dumps(cfg.to_dict())), "run_dir": str(run.path.resolve()), "world_size": dist.world}
    with reraise_as(TrainError):
        tracker = start(cfg.tracking, run.path, config=config, step=step, previous=run.read_tracker(),
                        logged=logged, group=group)
    run.write_tracker(tracker.state())
    return tracker


def split_chunks(cfg: TrainConfig, store: ActivationStore, dist: Dist) -> tuple[list[int], list[int]]:
    """(training chunk ids, held-out chunk ids). Refused: a store too small to hold a chunk out (at
    data.eval_frac > 0), too small to give every rank a chunk, or a store of held-out text alone."""
    if store.held_out_only:
        raise TrainError(f"store {cfg.data.store} holds held-out text only (a streaming run's, for its validation and "
                         "eval): nothing in it is for training")
    train_ids, held = held_out.split_chunks(store.n_chunks, cfg.data.eval_frac)
    if cfg.data.eval_frac > 0 and not held:
        raise TrainError(f"store {cfg.data.store} has {store.n_chunks} chunks, too few to hold one out for evaluation "
                         f"at data.eval_frac={cfg.data.eval_frac} "
                         f"(every {held_out.held_out_period(cfg.data.eval_frac)}th "
                         "chunk): harvest more tokens, or train without a held-out set with data.eval_frac=0 "
                         "eval_every=0 (and evaluate on another store)")
    if len(train_ids) < dist.world:
        raise TrainError(f"the store has {len(train_ids)} training chunks, fewer than the {dist.world} ranks")
    return train_ids, held


def run_length(cfg: TrainConfig, flops_per_token: float) -> tuple[Length, int]:
    """(how long the run trains, steps between validations); refused before any work: a budget
    below one step, or an eval_every longer than the run."""
    try:
        length = Length.of(cfg.run_budget, cfg.batch_size, flops_per_token)
    except BudgetError as e:
        raise TrainError(str(e)) from None
    every = cfg.validation_interval(length.steps)
    if length.steps is not None and every > length.steps:
        raise TrainError(f"eval_every={every} is longer than the run ({length.steps} steps for budget={cfg.budget}); "
                         "lower it, or set eval_every=auto")
    return length, every


def training_batches(cfg: TrainConfig, store: ActivationStore, train_ids: list[int], dist: Dist, step: int,
                     cut: float | None) -> Iterator[torch.Tensor]:
    """This rank's batches from `step` on (train/loader.py), rows above the norm cut left out."""
    shard = data_shard(train_ids, cfg.batch_size, cfg.seed, dist.rank, dist.world)
    return iter(Batches(store, *shard, cfg.data.window_chunks, step, dist.device, cut,
                        threads=thread_count(cfg.data.threads), read_ahead=cfg.data.read_ahead))


def check_stream(cfg: TrainConfig) -> int:
    """data.source=stream, before any work: the text and the model of data.stream (their config alone,
    no weights) and one process; the width d of the rows it will give. TrainError in one line."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TrainError("data.source=stream trains on one process (its LM reads the text in one order); "
                         "launch without torchrun, or harvest a store for data-parallel training")
    with reraise_as(TrainError):
        return check_model(cfg.data.stream_config())[0].d_model


def open_stream(cfg: TrainConfig, run: RunDir) -> tuple[StreamLM, ActivationStore]:
    """data.source=stream: the LM of data.stream, and the run's store of held-out text (harvested now
    unless the folder holds it complete: harvest/stream.py)."""
    with reraise_as(TrainError):
        source = StreamLM.load(cfg.data.stream_config())
        n_chunks = -(-cfg.data.held_out_tokens // source.layout.chunk_rows)
        held = write_held_out(source, held_out.held_out_period(cfg.data.eval_frac), str(run.path / RunDir.HELD_OUT),
                              n_chunks, progress=cfg.progress)
    return source, held


def stream_batches(cfg: TrainConfig, source: StreamLM, dist: Dist, step: int, cut: float | None,
                   state: dict | None) -> StreamBatches:
    """The batches from `step` on, straight from the LM (train/stream.py), resumed where the checkpoint
    `state` says the text stood."""
    if step > 0 and (state is None or "stream" not in state):
        raise TrainError(f"{RunDir.CHECKPOINT} of this run holds no stream position: it was not trained with "
                         "data.source=stream; train it with the source it began with")
    window = -(-cfg.data.shuffle_tokens // source.layout.chunk_rows)
    return StreamBatches(source, held_out.held_out_period(cfg.data.eval_frac), cfg.batch_size, cfg.seed, window,
                         step, dist.device, cut, state.get("stream") if state else None)


def optimizer(cfg: TrainConfig, sae: SAE, layout: DataParallel, state: dict | None) -> tuple[torch.optim.Optimizer, float]:
    """(Adam over the (sharded) SAE, restored from the checkpoint `state` if any; the base lr)."""
    base_lr = cfg.lr if cfg.lr is not None else default_lr(sae.n_latents)
    opt = make_optimizer(list(sae.parameters()), base_lr, cfg.adam_betas)
    if state is not None:
        layout.load_opt(opt, state["opt"])
    return opt, base_lr


def validator(cfg: TrainConfig, held: HeldOut, dist: Dist, every: int) -> Validator | None:
    """Rank 0's validation on the held-out view's fixed sample (train/validation.py), or None."""
    if not (every and dist.is_main):
        return None
    return Validator(held.sample(cfg.eval_tokens), cfg.batch_size, dist.device, getattr(torch, cfg.dtype))


def train(cfg: TrainConfig, run_dir: Path, group: str | None = None) -> Path:
    """Train (or resume, or skip if finished) the run in `run_dir`; returns the saved SAE's folder.
    `group`: the sweep folder when Hydra runs a sweep (the tracker's group, see conf/train/logger).

    One launch at a time trains a run folder: rank 0 holds its lock file (RunDir.LOCK) throughout and a
    second launch is refused in one line naming the holder. A full disk stops the run in one line; the
    last checkpoint is intact and the same command resumes from it."""
    run = RunDir(run_dir)
    run.create()
    check_same_run(cfg, run)
    if run.finished:
        print(f"{run} has finished; skipping (delete {RunDir.DONE} to train again)")
        return run.path / RunDir.SAE
    device = pick_device(cfg.device)
    store = None if cfg.data.streamed else open_store(cfg)  # a stream's LM loads once the run is locked ...
    if cfg.data.streamed:
        check_stream(cfg)  # ... but its text and model are checked now
    dist = init(device)  # one process: a Dist whose collectives do nothing
    lock = run.writer_lock(f"run {run}", TrainError)
    lock.check()  # on every rank, so that all refuse together; rank 0 takes it once all have looked
    dist.barrier()
    with lock if dist.is_main else nullcontext():
        if dist.is_main:
            remove_litter(run.path, RunDir.CHECKPOINT)  # a killed launch's half-written checkpoint
        try:
            return _train(cfg, run, store, dist, group)
        except OSError as e:
            if not disk_full(e):
                raise
            raise TrainError(f"disk full writing {e.filename or run}: {run} keeps its last complete checkpoint "
                             "(temporaries removed); free space and relaunch the same command to resume") from None


def _train(cfg: TrainConfig, run: RunDir, store: ActivationStore | None, dist: Dist, group: str | None) -> Path:
    """The recipe, in the locked run folder (`store` None: a stream's, opened here)."""
    if cfg.batch_size % dist.world:
        raise TrainError(f"batch_size {cfg.batch_size} is not divisible by the number of ranks {dist.world}")
    layout = ExpertParallel(dist, cfg.expert_parallel) if cfg.expert_parallel > 1 else DataParallel(dist)
    if store is None:
        source, store = open_stream(cfg, run)
    else:
        source, (train_ids, _) = None, split_chunks(cfg, store, dist)

    torch.manual_seed(cfg.seed)
    sae = _build(cfg, store.d_in).to(dist.device)  # the whole SAE, sharded by layout.prepare below
    flops_per_token = algorithmic_cost(sae).train
    length, every = run_length(cfg, flops_per_token)
    dead = DeadLatents(sae.n_latents, cfg.dead_window, dist.device)
    step, state = resume(cfg, run, sae, dead, store, dist)
    logged = record_launch(cfg, run, store, step, dist)

    held = HeldOut.of(store, cfg.data.eval_frac, cfg.data.outlier_factor)  # the norm cut reads chunk 0
    if source is None:
        batches, data_state = training_batches(cfg, store, train_ids, dist, step, held.cut), None
    else:
        stream = stream_batches(cfg, source, dist, step, held.cut, state)
        batches, data_state = iter(stream), stream.state
    first = next(batches)
    if step == 0 and dist.is_main:
        sae.init_from_batch(first)  # b_pre (and b_router) from (rank 0's) first training batch
    sae = layout.prepare(sae)
    opt, base_lr = optimizer(cfg, sae, layout, state)
    with open_tracker(cfg, run, step, logged, group, dist) as tracker:  # closed (failed) if training stops
        trainer = Trainer(cfg, run, dist, layout, sae, opt, base_lr, length, itertools.chain([first], batches),
                          step, state.get("seconds", 0.0) if state else 0.0, dead, flops_per_token,
                          validator(cfg, held, dist, every), every, tracker, data_state)
        trainer.fit()
        return trainer.finish()
