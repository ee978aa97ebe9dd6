"""The training loop: batches from the store -> SAE -> loss -> recipe step, with logs and checkpoints.

A run directory holds `config.yaml` (resolved), `store.json` (which activations), `metrics.jsonl` (one line per logged step),
`checkpoint.pt` (replaced atomically), and at the end `sae/` (weights + config, `train.saes.load`)
and `done.json`. Launching into a directory with a checkpoint continues from it (unless
resume=false); a finished run is skipped, which makes re-launched sweeps resume where they stopped.

Several processes (`torchrun --nproc_per_node=R -m train ...`, train/dist.py): rank r trains on its
own chunks with batch_size / R rows a step (`data_shard`); the SAE is replicated (data parallel) or,
with expert_parallel=G, Switch experts are split over G ranks (train/expert_parallel.py); logged
metrics are those of the global batch and only rank 0 writes the run directory. The checkpoint holds
the whole state: a run resumes on any number of ranks and either layout, at the same step (its data
order then differs from a run that kept R, since every rank's batch s is a pure function of its
shard and s).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from harvest.lm import autocast, pick_device
from harvest.store import ActivationStore
from train.config import TrainConfig, TrainError
from train.dist import DataParallel, Dist, init
from train.expert_parallel import ExpertParallel
from train.loader import Batches, norm_cut, split_chunks
from train.recipe import apply_update, default_lr, lr_factor, make_optimizer
from train.saes import SAE, Output, build, save

CHECKPOINT = "checkpoint.pt"


def open_store(cfg: TrainConfig) -> ActivationStore:
    try:
        store = ActivationStore(cfg.data.store)
    except FileNotFoundError:
        raise TrainError(f"data.store {cfg.data.store} is not an activation store (run `make harvest` first)") from None
    if not store.complete and not cfg.data.allow_incomplete:
        raise TrainError(f"store {cfg.data.store} is incomplete ({store.n_rows:,} tokens so far); finish the harvest "
                         "or pass data.allow_incomplete=true")
    return store


def store_identity(store: ActivationStore) -> dict:
    """What a run records about its store, so that eval can refuse a different one."""
    return {"path": str(store.path), **{k: store.attrs.get(k) for k in ("model", "layer", "site", "d_model",
                                                                         "context_size", "first_pos")}}


def data_shard(train_ids: list[int], batch_size: int, seed: int, rank: int, world: int) -> tuple[list[int], int, int]:
    """Rank `rank` of `world`: (its chunks train_ids[rank::world], disjoint from the other ranks';
    its batch_size / world rows a step; its data seed, seed + 10_000 * rank). Rank 0 keeps the seed,
    so one process reads exactly what it read before data parallelism existed."""
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
        c = out.codes
        fired = c.idx[c.active()] if c.idx is not None else c.active().any(dim=0).nonzero(as_tuple=True)[0]
        self.last[fired] = self.tokens

    def fraction(self) -> float:
        return ((self.tokens - self.last) >= self.window).float().mean().item()


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


def _save_checkpoint(run_dir: Path, payload: dict) -> None:
    """Write to a temporary file, flush to disk, then rename over the old one: never half-written."""
    tmp = run_dir / (CHECKPOINT + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / CHECKPOINT)


def _drop_metrics_after(path: Path, step: int) -> None:
    """Forget log lines of steps a resumed run will redo (they came after its checkpoint)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


# Keys that may change between launches of the same run (they do not change what is trained).
RUNTIME_KEYS = ("resume", "device", "progress", "log_every", "checkpoint_every", "compile", "expert_parallel")


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_same_run(cfg: TrainConfig, run_dir: Path) -> None:
    """A run folder holds one run: relaunching it with other settings is refused, not silently mixed."""
    saved = run_dir / "config.yaml"
    if not saved.exists() or not cfg.resume:
        return
    old = _flat(json.loads(json.dumps(OmegaConf.to_container(OmegaConf.load(saved)))))
    new = _flat(json.loads(json.dumps(cfg.to_dict())))
    diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in RUNTIME_KEYS and old.get(k) != new.get(k)]
    if diff:
        raise TrainError(f"{run_dir} holds a run with other settings ({', '.join(diff)}); use another run "
                         "directory or delete this one")


def train(cfg: TrainConfig, run_dir: Path) -> Path:
    """Train (or resume, or skip if finished) the run in `run_dir`; returns the saved SAE's folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_same_run(cfg, run_dir)
    if (run_dir / "done.json").exists():
        print(f"{run_dir} has finished; skipping (delete done.json to train again)")
        return run_dir / "sae"
    store = open_store(cfg)
    dist = init(pick_device(cfg.device))  # one process: a Dist whose collectives do nothing
    device = dist.device
    if cfg.batch_size % dist.world:
        raise TrainError(f"batch_size {cfg.batch_size} is not divisible by the number of ranks {dist.world}")
    layout = ExpertParallel(dist, cfg.expert_parallel) if cfg.expert_parallel > 1 else DataParallel(dist)
    torch.manual_seed(cfg.seed)
    sae = _build(cfg, store.d_model).to(device)  # the whole SAE, sharded by layout.prepare below
    train_ids, _ = split_chunks(store.n_chunks, cfg.data.eval_frac)
    if len(train_ids) < dist.world:
        raise TrainError(f"the store has {len(train_ids)} training chunks, fewer than the {dist.world} ranks")
    dead = DeadLatents(sae.n_latents, cfg.dead_window, device)
    step, state = 0, None
    ckpt = run_dir / CHECKPOINT
    if cfg.resume and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        if state["sae"]["b_pre"].shape[0] != store.d_model:
            raise TrainError(f"{run_dir} holds a run on d={state['sae']['b_pre'].shape[0]} activations, but the store "
                             f"{cfg.data.store} has d={store.d_model}; use another run directory")
        try:
            sae.load_state_dict(state["sae"])
        except RuntimeError:
            raise TrainError(f"{run_dir} holds a checkpoint of another architecture or width; "
                             "use another run directory or resume=false") from None
        step, dead.tokens, dead.last = state["step"], state["dead_tokens"], state["dead_last"]
        torch.set_rng_state(state["rng"])
        if dist.is_main:
            print(f"resuming {run_dir} at step {step} (saved by {state.get('world_size', 1)} ranks with "
                  f"expert_parallel={state.get('expert_parallel', 1)}, now {dist.world} with {cfg.expert_parallel})")
    dist.barrier()  # every rank has read the run directory before rank 0 rewrites it
    if dist.is_main:
        if step:
            _drop_metrics_after(run_dir / "metrics.jsonl", step)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg.to_dict()))
        (run_dir / "store.json").write_text(json.dumps(store_identity(store), indent=2))

    cut = norm_cut(store, cfg.data.outlier_factor)
    shard = data_shard(train_ids, cfg.batch_size, cfg.seed, dist.rank, dist.world)
    batches = iter(Batches(store, *shard, cfg.data.window_chunks, step, device, cut))
    first = next(batches)
    if step == 0 and dist.is_main:
        sae.init_from_batch(first)  # b_pre (and b_router) from (rank 0's) first training batch
    sae = layout.prepare(sae)
    base_lr = cfg.lr if cfg.lr is not None else default_lr(sae.n_latents)
    opt = make_optimizer(list(sae.parameters()), base_lr, cfg.adam_betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps, cfg.lr_decay_frac))
    if state is not None:
        layout.load_opt(opt, state["opt"])
        sched.load_state_dict(state["sched"])
    batches = itertools.chain([first], batches)
    dtype = getattr(torch, cfg.dtype)
    params = list(sae.parameters())
    model = torch.compile(sae) if cfg.compile else sae
    last_good = step
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.model['arch']}",
               disable=not (cfg.progress and dist.is_main))
    t_log, tokens_log = time.perf_counter(), 0
    with bar, open(run_dir / "metrics.jsonl" if dist.is_main else os.devnull, "a") as log:
        while step < cfg.steps:
            x = next(batches)
            sae.schedule(step, cfg.steps)
            with autocast(device, dtype):
                out = model(x)
            loss = out.losses["loss"]
            total = dist.all_reduce_sum(loss.detach())  # so that every rank stops at the same step
            if not torch.isfinite(total):
                raise TrainError(f"loss became {(total / dist.world).item()} at step {step}; stopped. The last good "
                                 f"checkpoint (step {last_good}) is kept in {run_dir}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            layout.sync_grads()
            apply_update(sae, opt, params, cfg.grad_clip, layout.grad_norm)
            sched.step()
            dead.update(out, len(x) * dist.world)
            step += 1
            tokens_log += len(x) * dist.world
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                dead.last = dist.all_reduce_max(dead.last)
                now = time.perf_counter()
                record = {"step": step, "tokens": dead.tokens, **batch_metrics(out, dist), "dead_frac": dead.fraction(),
                          "lr": sched.get_last_lr()[0], "tokens_per_s": tokens_log / (now - t_log),
                          "world_size": dist.world}
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{record['loss']:.4g}", tok_s=f"{record['tokens_per_s']:.0f}")
                t_log, tokens_log = now, 0
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                dead.last = dist.all_reduce_max(dead.last)
                weights, moments = layout.full_state(sae, opt)
                if dist.is_main:
                    _save_checkpoint(run_dir, {"sae": weights, "opt": moments, "sched": sched.state_dict(),
                                               "step": step, "dead_tokens": dead.tokens, "dead_last": dead.last,
                                               "rng": torch.get_rng_state(), "world_size": dist.world,
                                               "expert_parallel": cfg.expert_parallel})
                last_good = step
    sae = layout.full_sae(sae)
    if dist.is_main:
        save(sae, run_dir / "sae")
        (run_dir / "done.json").write_text(json.dumps({"step": step, "tokens": dead.tokens, "world_size": dist.world}))
    dist.barrier()  # the other ranks return once the SAE is saved
    return run_dir / "sae"
