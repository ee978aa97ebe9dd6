"""Evaluate trained runs: reconstruction metrics, CE loss recovered and FLOPs -> `<run>/eval.json`.

A run is a training run directory (`sae/`, `config.yaml`, `store.json`, `done.json`). Metrics use
the store's held-out chunks (the same split the run trained without). Runs on the same store share
one LM and one set of clean / zero-ablated passes: their SAEs are patched in turn on the same batch.
A run trained with an experiment tracker (logger=wandb|tensorboard: its tracker.json) also gets
eval.json's numbers in that tracked run, under eval/ (`track_result`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from eval.ce import ce_metrics
from eval.firings import encode_rows
from eval.options import HeldOutOptions
from eval.result import EvalResult
from eval.truth import absorption, best_match, recovery
from harvest.lm import load_config, load_lm
from harvest.synth import is_synthetic, read_truth, true_codes
from runtime.config import FLAG, NULL, Rule, integer, one_of
from runtime.device import pick_device
from runtime.errors import ToolkitError, reraise_as
from runtime.tracking import reopen
from train.metrics import reconstruction_metrics
from train.run_dir import RunDir, TrainedRun
from train.saes.flops import algorithmic_cost, sae_cost

CE_GROUP = 8  # SAEs patched per pass over the CE batches (bounds memory on big sweeps)


class EvalError(ToolkitError):
    """Bad input; printed as one line before any work starts."""


@dataclass(frozen=True)
class EvalConfig(HeldOutOptions):
    """conf/eval/eval.yaml (every key documented there)."""

    dead_window: int | None
    ce: bool
    ce_seqs: int
    ce_batch: int
    redo: bool
    dtype: str
    track: bool

    @classmethod
    def from_omegaconf(cls, cfg: DictConfig) -> EvalConfig:
        """The typed config of a composed conf/eval/eval.yaml, every value checked; EvalError in one line."""
        return cls.compose(cfg, EvalError, "eval", "run= is required: a run directory or a folder of runs", RULES,
                           whole=("dead_window",))


# the keys of conf/eval/eval.yaml besides eval.options.HELD_OUT_RULES' (documented there), and their values
RULES: dict[str, Rule] = {
    "dead_window": integer(1) | NULL,
    "ce": FLAG,
    "ce_seqs": integer(1),
    "ce_batch": integer(1),
    "redo": FLAG,
    "dtype": one_of("float32", "bfloat16"),
    "track": FLAG,
}


def find_runs(path: Path) -> list[RunDir]:
    """`path` itself if it is a run, else every run below it (folders holding sae/sae.json)."""
    if not path.exists():
        raise EvalError(f"run {path} does not exist")
    runs = RunDir.find(path)
    if not runs:
        hint = " (has it finished training?)" if RunDir(path).has_config else ""
        raise EvalError(f"no trained SAE under {path}: expected {path}/sae/sae.json{hint}")
    return runs


def recon_and_cost(run: TrainedRun, cfg: EvalConfig) -> dict[str, Any]:
    """Everything in eval.json except the CE metrics."""
    counts: dict[str, int] = {}
    rows = run.held.rows(cfg.max_tokens, counts)
    metrics = reconstruction_metrics(run.sae, rows, batch_size=cfg.batch_size, dead_window=cfg.dead_window,
                                     dtype=getattr(torch, cfg.dtype))
    done = run.dir.done()
    layout = run.sae.layout()
    cost = algorithmic_cost(run.sae)  # sparse backward for topk and switch, whatever kernels the trainer ran
    dense = sae_cost(run.sae, sparse_backward=False)
    train_tokens = done.get("tokens", 0)
    notes = [
        "position 0 excluded from training, metrics and CE (dropped by the harvest)" if run.store.first_pos
        else "position 0 included (harvested with keep_pos0=true)",
        f"rows with norm > {run.held.factor} x the median row norm left out of training and metrics and kept clean "
        "in CE"
        if run.held.cut is not None else "no outlier rows left out",
        "fve = 1 - sum_j Var(x_j - x_hat_j) / sum_j Var(x_j), variances over held-out tokens",
    ]
    return {
        "run": str(run.dir), "store": str(run.store.path), "arch": run.sae.arch,
        "match": type(run.sae).width_match(run.config.model),
        "d": layout.d, "n_latents": layout.n_latents, "k": layout.k, "n_experts": layout.n_experts or None,
        "sae": run.sae.config(), "train_steps": done.get("step"), "train_tokens": train_tokens,
        **metrics,
        "outlier_frac": counts["dropped"] / max(1, counts["read"]), "norm_cut": run.held.cut,
        "params": cost.params, "flops_forward_per_token": cost.forward, "flops_train_per_token": cost.train,
        "flops_train_dense_per_token": dense.train,
        "train_flops": cost.train * train_tokens,
        **truth_metrics(run, cfg.max_tokens, cfg.batch_size),
        "notes": notes,
    }


def truth_metrics(run: TrainedRun, max_rows: int, batch_size: int) -> dict[str, Any]:
    """A synthetic store's truth against the SAE (eval/truth.py); {} on other stores: the decoder directions
    against the true ones, and absorption on the hierarchies over the first max_rows held-out rows."""
    if not is_synthetic(run.store):
        return {}
    truth = read_truth(run.store)
    learned, true = run.sae.decoder_directions().detach().cpu(), torch.from_numpy(truth.dictionary)
    found = recovery(learned, true)
    out = {"truth_recovered": found["recovered"], "truth_best_cos_mean": found["best_cos_mean"],
           "truth_duplicates": found["duplicates"], "truth_absorption": None, "truth_parent_recall": None}
    if not truth.parents:
        return out
    parents = torch.tensor(list(truth.parents))
    children = [torch.tensor(kids) for kids in truth.parents.values()]
    latent = best_match(learned, true[parents])  # [P]
    fires, parent_on, child_on = [], [], []
    for ids, x in run.held.rows_with_ids(max_rows):
        chunk = int(ids[0]) // run.store.chunk_rows
        codes = torch.from_numpy(true_codes(run.store, truth, chunk)[ids - chunk * run.store.chunk_rows]) > 0
        parent_on.append(codes[:, parents])
        child_on.append(torch.stack([codes[:, kids].any(1) for kids in children], dim=1))
        rows, latents, _ = encode_rows(run.sae, x[:, : run.sae.d], batch_size, next(run.sae.parameters()).device)
        fired = torch.zeros(len(x), learned.shape[0], dtype=torch.bool)
        fired[torch.from_numpy(rows), torch.from_numpy(latents)] = True
        fires.append(fired[:, latent])
    scored = absorption(torch.cat(fires), torch.cat(parent_on), torch.cat(child_on))
    out.update(truth_absorption=scored["absorption"], truth_parent_recall=scored["parent_recall"])
    return out


def held_out_contexts(run: TrainedRun, n_seqs: int) -> torch.Tensor:
    """Token ids [n, ctx] of the first n sequences of the run's held-out chunks."""
    return torch.from_numpy(run.held.sequences(n_seqs))


def evaluate(cfg: EvalConfig) -> list[EvalResult]:
    """Evaluate every run `cfg.run` names; returns their results (also written to <run>/eval.json)."""
    with reraise_as(EvalError):
        device = pick_device(cfg.device)
        dirs = find_runs(Path(cfg.run))
        if not cfg.redo:
            fresh = [d for d in dirs if d.result_is_fresh(RunDir.EVAL)]
            for d in fresh:
                print(f"{d}: {RunDir.EVAL} is up to date (redo=true evaluates again)")
            dirs = [d for d in dirs if d not in fresh]
        runs = [d.open(device, cfg.store, cfg.outlier_factor) for d in dirs]  # every check before any work
        with_lm = [r for r in runs if not is_synthetic(r.store)]  # a synthetic store has no LM to measure CE on
        if cfg.ce:
            for name in {r.store.model for r in with_lm}:
                try:
                    load_config(name)
                except ToolkitError as e:
                    raise EvalError(f"cannot load the LM for CE loss ({e}); ce=false skips it") from None
    results = {r.dir.path: recon_and_cost(r, cfg) for r in runs}
    if cfg.ce:
        _add_ce(with_lm, results, cfg, device)
        for r in runs:
            if is_synthetic(r.store):
                results[r.dir.path]["notes"].append("no CE loss: the store is synthetic (harvest/synth.py), without an LM")
    final = [EvalResult(**results[r.dir.path]) for r in runs]
    for r, result in zip(runs, final, strict=True):
        result.write(r.dir)
        if cfg.track:
            track_result(r.dir, result)
    return final


def track_result(run: RunDir, result: EvalResult) -> None:
    """eval.json's numbers into the tracked run the training recorded (RunDir.TRACKER), if any, under
    eval/: the W&B run's summary (resumed by its id), or TensorBoard scalars at the last training step.
    A tracker that cannot be opened (its package missing, W&B unreachable) costs one warning line on
    stderr, not the eval: eval.json is written either way."""
    state = run.read_tracker()
    if state is None:
        return
    try:
        with reopen(state, run.path) as tracker:
            tracker.summarize(result.to_json(), result.train_steps or 0, "eval")
    except Exception as e:  # ToolkitError from runtime.tracking, or whatever the tracker's package raises
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"eval: warning: {run}: eval.json not logged to its {state.get('kind')} run ({why})", file=sys.stderr)


def _add_ce(runs: list[TrainedRun], results: dict[Path, dict[str, Any]], cfg: EvalConfig, device: torch.device
            ) -> None:
    """CE metrics for every run; runs with the same store and cut share the clean and zero passes."""
    groups: dict[tuple, list[TrainedRun]] = {}
    for r in runs:  # a transcoder's group: its target store too (a PairedStore's)
        target = getattr(r.store, "target", None)
        groups.setdefault((r.store.location.identity, target and target.location.identity, r.held.cut), []).append(r)
    for group in groups.values():
        store = group[0].store
        target = getattr(store, "target", None)
        site, source = (store.site, None) if target is None else (target.site, store.site)
        model, _ = load_lm(store.model, device)
        contexts = held_out_contexts(group[0], cfg.ce_seqs)
        for start in range(0, len(group), CE_GROUP):
            part = group[start : start + CE_GROUP]
            out = ce_metrics(model, store.layer, site, {str(r.dir): r.sae for r in part}, contexts,
                             store.first_pos, part[0].held.cut, cfg.ce_batch, getattr(torch, cfg.dtype), cfg.progress,
                             source)
            for r in part:
                results[r.dir.path].update(out[str(r.dir)])
                results[r.dir.path]["notes"].append(f"CE over {out[str(r.dir)]['ce_tokens']:,} predictions of "
                                               f"{len(contexts)} held-out sequences")
        del model


TABLE_KEYS = ("arch", "match", "n_experts", "n_latents", "k", "mse", "nmse", "fve", "l0", "dead_frac",
              "expert_entropy", "ce_clean", "ce_sae", "ce_zero", "loss_recovered", "delta_ce", "kl", "params",
              "flops_forward_per_token", "flops_train_per_token", "eval_tokens", "outlier_frac")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e6 else f"{v:.3e}"
    return str(v)


def table(results: list[EvalResult]) -> str:
    """Metrics as text: one row per key, one column per run."""
    names = [Path(r.run).name for r in results]
    cols = [[_fmt(r.get(k)) for k in TABLE_KEYS] for r in results]
    width = max(len(k) for k in TABLE_KEYS)
    colw = [max(len(n), *(len(c) for c in col)) for n, col in zip(names, cols, strict=True)]
    lines = [" " * width + "  " + "  ".join(n.rjust(w) for n, w in zip(names, colw, strict=True))]
    for i, k in enumerate(TABLE_KEYS):
        lines.append(k.ljust(width) + "  " + "  ".join(col[i].rjust(w) for col, w in zip(cols, colw, strict=True)))
    notes = sorted({n for r in results for n in r.notes})
    return "\n".join(lines + ["notes:"] + [f"  - {n}" for n in notes])
