"""`python -m eval.autointerp run=<run dir> explainer.model=<name>`: automated interpretability.

Detection scoring (Juang et al. 2024; the Switch SAE paper's section 4.4 and Figure 6). For each of
a set of latents ("features"): an explainer LLM reads the feature's top activating contexts, with
the activating tokens marked <<like this>>, and writes a one-sentence explanation; a scorer LLM
reads the explanation and shuffled, numbered batches of unmarked contexts, drawn evenly from the
10 activation deciles of the feature plus contexts where it does not fire, and says for each
whether the feature fires. Reported: recall per decile (decile 10 = strongest activations),
accuracy on non-activating contexts, and balanced accuracy ((recall over all activating contexts +
non-activating accuracy) / 2), per feature with Wilson intervals and averaged over features with
percentile-bootstrap intervals (features resampled). Writes `<run>/autointerp.json` and
`<run>/autointerp.png`.

Two layers: `collect` (here) needs the SAE and its store and returns `FeatureSample`s (plain text);
`eval.detection.explain_and_score` needs only those and two `ChatClient`s (eval/llm.py), so it is
testable alone.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import harvest  # noqa: F401  (reproducible MKL settings before torch runs)
from eval.detection import N_DECILES, Context, FeatureSample, aggregate, explain_and_score
from eval.llm import ChatClient, Counters, Endpoint, ResponseCache, base_url_problem
from eval.run import EvalConfig, EvalError, Run, open_run
from harvest.config import HarvestError
from harvest.lm import load_config, pick_device



class AutointerpError(Exception):
    """Bad input; printed as one line (`autointerp: error: ...`) before any work starts."""


@dataclass(frozen=True)
class AutointerpConfig:
    """Every key of conf/eval/autointerp.yaml (documented there)."""

    run: str
    explainer: Endpoint
    scorer: Endpoint
    store: str | None = None
    features: list[int] | None = None
    n_features: int = 50
    min_active: int | None = None
    seed: int = 0
    max_tokens: int = 1_000_000
    batch_size: int = 4096
    outlier_factor: float | str | None = "run"
    window: int = 32
    after: int = 4
    n_explain: int = 20
    per_decile: int = 5
    n_negative: int = 50
    batch_contexts: int = 5
    concurrency: int = 8
    timeout_s: float = 120.0
    max_retries: int = 5
    backoff_s: float = 1.0
    cache: bool = True
    cache_dir: str | None = None
    ci: float = 0.95
    n_bootstrap: int = 1000
    device: str = "auto"
    progress: bool = True

    @classmethod
    def from_omegaconf(cls, cfg: DictConfig) -> AutointerpConfig:
        if OmegaConf.is_missing(cfg, "run"):
            raise AutointerpError("run=<run dir> is required: a training run directory holding sae/")
        if "explainer" in cfg and OmegaConf.is_missing(cfg.explainer, "model"):
            raise AutointerpError("explainer.model=<name> is required: the model name the server serves "
                                  "(e.g. explainer.model=Qwen/Qwen2.5-7B-Instruct); scorer.model defaults to it")
        raw = OmegaConf.to_container(cfg, resolve=True)
        try:
            explainer = Endpoint(**raw.pop("explainer"))
            scorer = Endpoint(**{k: getattr(explainer, k) if v is None else v for k, v in raw.pop("scorer").items()})
            out = cls(explainer=explainer, scorer=scorer, **raw)
        except (TypeError, KeyError) as e:
            raise AutointerpError(f"bad autointerp config: {e}") from None
        out.check()
        return out

    def check(self) -> None:
        """Raise AutointerpError on the first bad value."""
        checks = [
            (self.n_features >= 1, f"n_features must be >= 1, got {self.n_features}"),
            (self.per_decile >= 1, f"per_decile must be >= 1, got {self.per_decile}"),
            (self.n_explain >= 1, f"n_explain must be >= 1, got {self.n_explain}"),
            (self.n_negative >= 0, f"n_negative must be >= 0, got {self.n_negative}"),
            (self.batch_contexts >= 1, f"batch_contexts must be >= 1, got {self.batch_contexts}"),
            (self.min_active is None or self.min_active >= 1,
             f"min_active must be >= 1 or null, got {self.min_active}"),
            (self.features is None or (len(self.features) > 0 and all(isinstance(f, int) and f >= 0
                                                                       for f in self.features)),
             f"features must be null or a non-empty list of latent ids >= 0, got {self.features}"),
            (self.max_tokens >= 1 and self.batch_size >= 1, "max_tokens and batch_size must be >= 1"),
            (self.after >= 0 and self.window > self.after, f"need 0 <= after < window, got after={self.after}, "
                                                           f"window={self.window}"),
            (self.concurrency >= 1, f"concurrency must be >= 1, got {self.concurrency}"),
            (self.max_retries >= 0 and self.backoff_s >= 0, "max_retries and backoff_s must be >= 0"),
            (self.timeout_s > 0, f"timeout_s must be > 0, got {self.timeout_s}"),
            (0 < self.ci < 1, f"ci must be in (0, 1), got {self.ci}"),
            (self.n_bootstrap >= 1, f"n_bootstrap must be >= 1, got {self.n_bootstrap}"),
            (self.outlier_factor in ("run", None) or (isinstance(self.outlier_factor, (int, float))
                                                      and self.outlier_factor > 1),
             f"outlier_factor must be run, null or a number > 1, got {self.outlier_factor!r}"),
        ]
        for role, e in (("explainer", self.explainer), ("scorer", self.scorer)):
            problem = base_url_problem(e.base_url)
            checks += [(problem is None, f"{role}.base_url {problem}"),
                       (isinstance(e.model, str) and e.model.strip() != "", f"{role}.model must be a model name"),
                       (e.max_tokens >= 1 and e.temperature >= 0, f"{role}: need max_tokens >= 1 and temperature >= 0")]
        for ok, message in checks:
            if not ok:
                raise AutointerpError(message)


# ---------------------------------------------------------------- collecting examples (needs the SAE)


class Windows:
    """Renders the window of a store row (`window` tokens ending `after` tokens past the row's token)."""

    def __init__(self, run: Run, tokenizer: Any, window: int, after: int):
        self.store, self.tok, self.window, self.after = run.store, tokenizer, window, after
        a = run.store.attrs
        self.rps, self.first, self.ctx = a["rows_per_seq"], a["first_pos"], a["context_size"]
        self.chunk_seqs = a["chunk_rows"] // a["rows_per_seq"]
        self._chunks: dict[int, np.ndarray] = {}

    def span(self, row: int) -> tuple[np.ndarray, int, int, int, int]:
        """(sequence ids, sequence index, window start, window end, position of the row)."""
        seq, off = divmod(row, self.rps)
        c = seq // self.chunk_seqs
        if c not in self._chunks:
            self._chunks[c] = np.asarray(self.store.contexts[c * self.chunk_seqs : (c + 1) * self.chunk_seqs])
        pos = self.first + off
        lo, hi = max(0, pos - (self.window - 1 - self.after)), min(self.ctx, pos + self.after + 1)
        return self._chunks[c][seq % self.chunk_seqs], seq, lo, hi, pos

    def rows(self, row: int) -> list[int]:
        """The store rows inside the window of `row`."""
        _, seq, lo, hi, _ = self.span(row)
        return [seq * self.rps + p - self.first for p in range(max(lo, self.first), hi)]

    def _pieces(self, ids: list[int]) -> list[str]:
        """Each token's text, from decoding growing prefixes (keeps word-initial spaces)."""
        out, prev = [], ""
        for i in range(len(ids)):
            cur = self.tok.decode(ids[: i + 1], clean_up_tokenization_spaces=False)
            out.append(cur[len(prev):] if cur.startswith(prev) else self.tok.decode(ids[i : i + 1]))
            prev = cur
        return [p.replace("\n", "\\n") for p in out]

    def render(self, row: int, acts: dict[int, float], decile: int) -> Context:
        ids, seq, lo, hi, pos = self.span(row)
        pieces = self._pieces([int(t) for t in ids[lo:hi]])
        vals = [acts.get(seq * self.rps + p - self.first, 0.0) if p >= self.first else 0.0 for p in range(lo, hi)]
        marked, run_open = [], False
        for piece, v in zip(pieces, vals, strict=True):
            if v > 0 and not run_open:
                marked.append("<<")
            elif v <= 0 and run_open:
                marked.append(">>")
            run_open = v > 0
            marked.append(piece)
        marked.append(">>" if run_open else "")
        tokens = [(p, float(v)) for p, v in zip(pieces, vals, strict=True) if v > 0]
        return Context(row, decile, float(acts.get(row, 0.0)), "".join(pieces), "".join(marked), tokens)


def active_codes(codes: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch row, latent, value) of every non-zero code."""
    if codes.dense is not None:
        r, j = (codes.dense > 0).nonzero(as_tuple=True)
        return r, j, codes.dense[r, j]
    r, kk = (codes.vals > 0).nonzero(as_tuple=True)
    return r, codes.idx[r, kk], codes.vals[r, kk]


def _encoded(run: Run, cfg: AutointerpConfig, device: torch.device) -> Iterator[tuple[np.ndarray, tuple]]:
    """(store row ids, active codes) batch by batch over the held-out chunks (whole chunks until
    max_tokens rows are read; rows above the run's norm cut are skipped)."""
    C, seen = run.store.chunk_rows, 0
    for i in run.held:
        x = run.store.read_chunk(i)
        rows = np.arange(i * C, (i + 1) * C)
        if run.cut is not None:
            keep = np.linalg.norm(x, axis=1) <= run.cut
            x, rows = x[keep], rows[keep]
        for s in range(0, len(x), cfg.batch_size):
            with torch.no_grad():
                codes = run.sae.encode(torch.from_numpy(x[s : s + cfg.batch_size]).to(device))
                active = tuple(t.cpu() for t in active_codes(codes))
            yield rows[s : s + cfg.batch_size], active
        seen += C
        if seen >= cfg.max_tokens:
            return


def choose_features(run: Run, cfg: AutointerpConfig, device: torch.device) -> list[int]:
    """`cfg.features`, or n_features latents drawn (seeded) among those firing >= min_active times."""
    if cfg.features is not None:
        return sorted(set(cfg.features))
    counts, n_rows = torch.zeros(run.sae.n_latents, dtype=torch.long), 0
    for rows, (_, j, _) in _encoded(run, cfg, device):
        counts += torch.bincount(j, minlength=run.sae.n_latents)
        n_rows += len(rows)
    need = cfg.min_active or cfg.n_explain + N_DECILES * cfg.per_decile
    alive = np.flatnonzero(counts.numpy() >= need)
    if len(alive) == 0:
        raise AutointerpError(f"no latent fires {need}+ times in the {n_rows:,} scanned held-out rows; lower "
                              f"min_active or n_explain/per_decile, or raise max_tokens")
    rng = np.random.default_rng(cfg.seed)
    return sorted(int(f) for f in rng.choice(alive, min(cfg.n_features, len(alive)), replace=False))


def gather(run: Run, cfg: AutointerpConfig, features: list[int], device: torch.device
           ) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """({feature: (rows, values) where it fires}, every scanned row id)."""
    where = torch.full((run.sae.n_latents,), -1, dtype=torch.long)
    where[torch.tensor(features)] = torch.arange(len(features))
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    scanned = []
    for rows, (r, j, v) in _encoded(run, cfg, device):
        f = where[j]
        keep = f >= 0
        parts.append((f[keep].numpy(), rows[r[keep].numpy()], v[keep].float().numpy()))
        scanned.append(rows)
    f, rows, vals = (np.concatenate(p) for p in zip(*parts, strict=True)) if parts else (np.zeros(0, int),) * 3
    every = np.concatenate(scanned) if scanned else np.zeros(0, dtype=np.int64)
    return {feat: (rows[f == i], vals[f == i]) for i, feat in enumerate(features)}, every


def sample_feature(feature: int, rows: np.ndarray, vals: np.ndarray, scanned: np.ndarray, win: Windows,
                   cfg: AutointerpConfig) -> FeatureSample:
    """Top examples (one per sequence) to explain from; deciles of the other sequences' activating
    rows and non-activating windows to score on. Seeded by (seed, feature)."""
    rng = np.random.default_rng([cfg.seed, feature])
    acts = dict(zip(rows.tolist(), vals.tolist(), strict=True))
    order = np.argsort(vals, kind="stable")
    top, seqs = [], set()
    for i in order[::-1]:
        if len(top) == cfg.n_explain:
            break
        if (s := rows[i] // win.rps) not in seqs:
            top.append(i)
            seqs.add(s)
    pool = np.array([i for i in order if rows[i] // win.rps not in seqs], dtype=int)  # ascending activation
    contexts = []
    for d, part in enumerate(np.array_split(pool, N_DECILES), start=1):
        for i in rng.choice(part, min(cfg.per_decile, len(part)), replace=False):
            contexts.append(win.render(int(rows[i]), acts, d))
    negatives: set[int] = set()
    for row in rng.choice(scanned, min(len(scanned), 20 * cfg.n_negative + 20), replace=False) if len(scanned) else []:
        if len(negatives) == cfg.n_negative:
            break
        if not any(r in acts for r in win.rows(int(row))):
            negatives.add(int(row))
    contexts += [win.render(r, acts, 0) for r in sorted(negatives)]
    return FeatureSample(feature, len(rows), float(vals.max()) if len(vals) else 0.0,
                         [win.render(int(rows[i]), acts, -1) for i in top], contexts)


def collect(run: Run, cfg: AutointerpConfig, tokenizer: Any, device: torch.device) -> tuple[list[FeatureSample], int]:
    """The samples of the chosen features and the number of held-out rows scanned."""
    features = choose_features(run, cfg, device)
    found, scanned = gather(run, cfg, features, device)
    win = Windows(run, tokenizer, cfg.window, cfg.after)
    return [sample_feature(f, *found[f], scanned, win, cfg) for f in features], len(scanned)


# ---------------------------------------------------------------- outputs


def plot(agg: dict[str, Any], path: Path, title: str) -> None:
    """Figure 6 style: mean recall per decile and non-activating accuracy, bootstrap CI error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bars = [*agg["recall"], agg["negative_accuracy"]]
    labels = [str(d) for d in range(1, N_DECILES + 1)] + ["not\nactive"]
    mean = [b["mean"] if b["mean"] is not None else 0.0 for b in bars]
    err = [[m - b["lo"] if b["mean"] is not None else 0.0 for m, b in zip(mean, bars, strict=True)],
           [b["hi"] - m if b["mean"] is not None else 0.0 for m, b in zip(mean, bars, strict=True)]]
    fig = Figure(figsize=(7, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.bar(range(len(bars)), mean, yerr=err, capsize=3, color=["tab:blue"] * N_DECILES + ["tab:gray"])
    ax.set_xticks(range(len(bars)), labels)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("activation decile (10 = strongest)")
    ax.set_ylabel("fraction judged correctly")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    fig.savefig(path, dpi=120)


def _cell(b: dict[str, Any]) -> str:
    if b["mean"] is None:
        return "-"
    return f"{b['mean']:.3f}  [{b['lo']:.3f}, {b['hi']:.3f}]  n={b['n']}"


def table(out: dict[str, Any]) -> str:
    agg, c = out["aggregate"], out["counters"]
    rows = [(f"recall decile {d}", b) for d, b in enumerate(agg["recall"], start=1)]
    rows += [("recall (all)", agg["recall_all"]), ("non-active accuracy", agg["negative_accuracy"]),
             ("balanced accuracy", agg["balanced_accuracy"])]
    lines = [f"{out['run']}: {out['n_scored']} of {len(out['features'])} features scored "
             f"(mean, {round(100 * out['config']['ci'])}% bootstrap CI over features)"]
    lines += [f"  {name:<20} {_cell(b)}" for name, b in rows]
    lines.append("  " + ", ".join(f"{k} {c[k]}" for k in (*Counters.KEYS, "unparseable")))
    lines += [f"  error: {e}" for e in c["errors"]]
    return "\n".join(lines)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def _open(cfg: AutointerpConfig) -> tuple[Run, Any, torch.device]:
    """Check the run and load its SAE, store and tokenizer (every check before any work)."""
    run_dir = Path(cfg.run)
    if not run_dir.is_dir():
        raise AutointerpError(f"run {run_dir} does not exist")
    if not (run_dir / "sae" / "sae.json").exists():
        raise AutointerpError(f"no trained SAE in {run_dir}: expected {run_dir}/sae/sae.json")
    try:
        device = pick_device(cfg.device)
        ecfg = EvalConfig(run=cfg.run, store=cfg.store, max_tokens=cfg.max_tokens, batch_size=cfg.batch_size,
                          dead_window=None, outlier_factor=cfg.outlier_factor, ce=False, ce_seqs=1, ce_batch=1,
                          redo=True, device=cfg.device, dtype="float32", progress=False)
        run = open_run(run_dir, ecfg, device)
        name = run.store.attrs.get("tokenizer") or run.store.attrs["model"]
        load_config(name)  # one clear line for a missing model / unreachable hub
    except (EvalError, HarvestError) as e:
        raise AutointerpError(str(e)) from None
    bad = [f for f in cfg.features or [] if f >= run.sae.n_latents]
    if bad:
        raise AutointerpError(f"features {bad} out of range: the SAE has {run.sae.n_latents} latents")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001  (any loader failure is one line)
        raise AutointerpError(f"cannot load the tokenizer of {name!r}: {str(e).strip().splitlines()[0]}") from None
    return run, tokenizer, device


def clients(cfg: AutointerpConfig, run_dir: Path) -> tuple[ChatClient, ChatClient, Counters]:
    counters = Counters()
    cache = ResponseCache(cfg.cache_dir or run_dir / "autointerp_cache") if cfg.cache else None
    kw = dict(counters=counters, cache=cache, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
              backoff_s=cfg.backoff_s)
    return ChatClient(cfg.explainer, **kw), ChatClient(cfg.scorer, **kw), counters


def run_autointerp(cfg: AutointerpConfig) -> dict[str, Any]:
    """Collect, explain, score; writes <run>/autointerp.json and autointerp.png and returns the JSON."""
    run, tokenizer, device = _open(cfg)
    samples, n_rows = collect(run, cfg, tokenizer, device)
    explainer, scorer, counters = clients(cfg, run.dir)
    results = explain_and_score(samples, explainer, scorer, batch_contexts=cfg.batch_contexts,
                                concurrency=cfg.concurrency, seed=cfg.seed, ci=cfg.ci, progress=cfg.progress)
    for r in results:
        r["density"] = r["n_active"] / max(1, n_rows)
    agg = aggregate(results, cfg.ci, cfg.n_bootstrap, cfg.seed)
    unparseable = sum(r["unparseable"] for r in results)
    out = {
        "run": str(run.dir), "store": str(run.store.path), "n_latents": run.sae.n_latents,
        "arch": run.config["model"]["arch"], "scanned_rows": n_rows,
        "config": asdict(cfg), "n_scored": sum(r["status"] == "ok" for r in results),
        "aggregate": agg, "counters": {**counters.as_dict(), "unparseable": unparseable},
        "notes": ["decile 10 holds the strongest activations; explanation examples' sequences are left out of them",
                  f"per-feature intervals: Wilson {cfg.ci:g}; aggregates: mean over scored features with a "
                  f"percentile bootstrap {cfg.ci:g} interval ({cfg.n_bootstrap} resamples of the features)",
                  "balanced_accuracy = (recall over all activating contexts + non-active accuracy) / 2",
                  "status: ok | failed (explainer call failed) | unparseable (no explanation in the answer) | "
                  "no_examples (the feature never fires in the scanned rows); only ok features are aggregated"],
        "features": results,
    }
    _write_json(run.dir / "autointerp.json", out)
    plot(agg, run.dir / "autointerp.png", f"Detection scoring: {run.dir.parent.name}/{run.dir.name} "
                                          f"({out['n_scored']} features, scorer {cfg.scorer.model})")
    return out


@hydra.main(config_path="../conf/eval", config_name="autointerp", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: one line `autointerp: error: ...` and exit 2 on bad input."""
    try:
        out = run_autointerp(AutointerpConfig.from_omegaconf(cfg))
    except AutointerpError as e:
        print(f"autointerp: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(table(out))
    print(f"written: {out['run']}/autointerp.json, {out['run']}/autointerp.png")


if __name__ == "__main__":
    main()
