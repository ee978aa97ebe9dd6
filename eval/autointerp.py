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

Two layers: `collect` (here, reading the firings with eval/firings.py) needs the SAE and its store
and returns `FeatureSample`s (plain text); `eval.detection.explain_and_score` needs only those and
two `ChatClient`s (eval/llm.py), so it is testable alone.

With `serve=demo` (or `serve=<model folder>`) the run starts its own server first (eval/serve.py:
`transformers serve` on a free loopback port, offline), points the explainer and the scorer at it,
and stops it when the LLM calls are done, whatever happens (its log: <run>/autointerp_server.log).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from eval.detection import Context, FeatureSample, aggregate, explain_and_score
from eval.firings import N_DECILES, Firings, choose, deciles, open_run, scan, sequence_rows, top, values_at, window
from eval.llm import ChatClient, Counters, Endpoint, ResponseCache, base_url_problem
from eval.options import HELD_OUT_RULES, PATH, WHOLE_KEYS, HeldOutOptions
from eval.plots import figure, save_png
from eval.serve import check_model_folder, model_folder, serving, transformers_serve
from runtime.cli import launch
from runtime.config import (ENV_NAME, FLAG, NULL, Rule, as_whole, check_values, instantiate, integer, list_of, number, require,
                            require_given, text)
from runtime.errors import ToolkitError, one_line_errors, reraise_as
from train.run_dir import RunDir, TrainedRun



CACHE_DIR = "autointerp_cache"  # answers already received, in the run folder unless cache_dir is set
PLOT = "autointerp.png"
SERVER_LOG = "autointerp_server.log"  # the output of the server that `serve` starts, in the run folder
SERVED = "(the served model)"  # explainer.model until the server that `serve` names has started


class AutointerpError(ToolkitError):
    """Bad input; printed as one line (`autointerp: error: ...`) before any work starts."""


@dataclass(frozen=True)
class AutointerpConfig(HeldOutOptions):
    """Every key of conf/eval/autointerp.yaml, which holds and documents every default."""

    explainer: Endpoint
    scorer: Endpoint
    features: list[int] | None
    n_features: int
    min_active: int | None
    seed: int
    window: int
    after: int
    n_explain: int
    per_decile: int
    n_negative: int
    batch_contexts: int
    concurrency: int
    timeout_s: float
    max_retries: int
    backoff_s: float
    cache: bool
    cache_dir: str | None
    ci: float
    n_bootstrap: int
    serve: str | None
    serve_timeout_s: float
    serve_threads: int | None

    @classmethod
    def from_omegaconf(cls, cfg: DictConfig) -> AutointerpConfig:
        require_given(cfg, "run", AutointerpError, "run=<run dir> is required: a training run directory holding sae/")
        if "explainer" in cfg and OmegaConf.is_missing(cfg.explainer, "model") and not cfg.get("serve"):
            raise AutointerpError("explainer.model=<name> is required: the model name the server serves "
                                  "(e.g. explainer.model=Qwen/Qwen2.5-7B-Instruct); scorer.model defaults to it")
        raw = OmegaConf.to_container(cfg, resolve=True)
        if raw.get("serve") and raw["explainer"]["model"] == "???":
            raw["explainer"]["model"] = SERVED  # replaced by the server's model once it runs
        as_whole(raw, *WHOLE_KEYS)
        check_values(raw, RULES, AutointerpError, "conf/eval/autointerp.yaml")
        explainer = Endpoint(**raw.pop("explainer"))
        scorer = Endpoint(**{k: getattr(explainer, k) if v is None else v for k, v in raw.pop("scorer").items()})
        out = instantiate(cls, {**raw, "explainer": explainer, "scorer": scorer}, AutointerpError, "autointerp")
        out.check()
        return out

    def check(self) -> None:
        """The checks across keys (every value has passed its rule): AutointerpError on the first."""
        checks = [(self.window > self.after, f"after must be below window, got after={self.after}, "
                                             f"window={self.window}")]
        for role, e in (("explainer", self.explainer), ("scorer", self.scorer)):
            problem = base_url_problem(e.base_url)
            checks.append((problem is None, f"{role}.base_url {problem}"))
        require(checks, AutointerpError)
        if self.serve is not None:  # the folder and the server command, before any work
            with reraise_as(AutointerpError):
                folder = model_folder(self.serve)
                check_model_folder(folder)
                transformers_serve(folder)


def _endpoint_rules(role: str, optional: bool) -> dict[str, Rule]:
    """The rules of an `explainer` or `scorer` block; every scorer value may be null (the explainer's)."""
    rules = {"base_url": text("an http:// or https:// URL"), "model": text("a model name"),
             "api_key_env": ENV_NAME | NULL,
             "temperature": number(0), "max_tokens": integer(1)}
    return {f"{role}.{key}": rule | NULL if optional and key != "api_key_env" else rule for key, rule in rules.items()}


# every key of conf/eval/autointerp.yaml (documented there) and what its value must be
RULES: dict[str, Rule] = {
    **HELD_OUT_RULES,
    "features": list_of(integer(0), "a non-empty list of latent ids >= 0 like [3,17,42]") | NULL,
    "n_features": integer(1),
    "min_active": integer(1) | NULL,
    "seed": integer(0),
    "window": integer(1),
    "after": integer(0),
    "n_explain": integer(1),
    "per_decile": integer(1),
    "n_negative": integer(0),
    "batch_contexts": integer(1),
    **_endpoint_rules("explainer", optional=False),
    **_endpoint_rules("scorer", optional=True),
    "concurrency": integer(1),
    "timeout_s": number(0, lo_open=True),
    "max_retries": integer(0),
    "backoff_s": number(0),
    "cache": FLAG,
    "cache_dir": PATH | NULL,
    "ci": number(0, 1, lo_open=True, hi_open=True),
    "n_bootstrap": integer(1),
    "serve": text("demo or a model folder") | NULL,
    "serve_timeout_s": number(0, lo_open=True),
    "serve_threads": integer(1) | NULL,
}


# ---------------------------------------------------------------- collecting examples (needs the SAE)


class Windows:
    """Renders the window of a store row (`window` tokens ending `after` tokens past the row's token)."""

    def __init__(self, run: TrainedRun, tokenizer: Any, window: int, after: int):
        self.store, self.tok, self.before, self.after = run.store, tokenizer, window - 1 - after, after

    def rows(self, row: int) -> np.ndarray:
        """The store rows inside the window of `row`."""
        _, rows, _ = window(self.store, row, self.before, self.after)
        return rows[rows >= 0]

    def _pieces(self, ids: list[int]) -> list[str]:
        """Each token's text, from decoding growing prefixes (keeps word-initial spaces)."""
        out, prev = [], ""
        for i in range(len(ids)):
            cur = self.tok.decode(ids[: i + 1], clean_up_tokenization_spaces=False)
            out.append(cur[len(prev):] if cur.startswith(prev) else self.tok.decode(ids[i : i + 1]))
            prev = cur
        return [p.replace("\n", "\\n") for p in out]

    def render(self, row: int, f_rows: np.ndarray, f_vals: np.ndarray, decile: int) -> Context:
        """The context of `row`, its tokens marked where the feature (firings f_rows [n_f] ascending,
        f_vals [n_f]) fires."""
        ids, rows, center = window(self.store, row, self.before, self.after)
        pieces = self._pieces([int(t) for t in ids])
        vals = values_at(rows, f_rows, f_vals)
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
        return Context(row, decile, float(vals[center]), "".join(pieces), "".join(marked), tokens)


def scan_held_out(run: TrainedRun, cfg: AutointerpConfig, device: torch.device, only: list[int]) -> Firings:
    """The firings of `only` ([]: counts only) in whole held-out chunks until max_tokens rows are read."""
    return scan(run, device, max_tokens=cfg.max_tokens, batch_size=cfg.batch_size, whole_chunks=True, only=only,
                progress=cfg.progress)


def choose_features(run: TrainedRun, cfg: AutointerpConfig, device: torch.device) -> list[int]:
    """`cfg.features`, or n_features latents drawn (seeded) among those firing >= min_active times."""
    if cfg.features is not None:
        return choose(None, cfg.features, cfg.n_features, cfg.seed)
    counted = scan_held_out(run, cfg, device, only=[])
    need = cfg.min_active or cfg.n_explain + N_DECILES * cfg.per_decile
    chosen = choose(counted.counts, "random", cfg.n_features, cfg.seed, min_count=need)
    if not chosen:
        raise AutointerpError(f"no latent fires {need}+ times in the {len(counted.seen):,} scanned held-out rows; "
                              f"lower min_active or n_explain/per_decile, or raise max_tokens")
    return chosen


def sample_feature(feature: int, rows: np.ndarray, vals: np.ndarray, scanned: np.ndarray, win: Windows,
                   cfg: AutointerpConfig) -> FeatureSample:
    """Top examples (one per sequence) to explain from; deciles of the other sequences' activating
    rows and non-activating windows to score on. rows [n_f] ascending, vals [n_f]: the feature's
    firings; scanned [n]: every scanned row. Seeded by (seed, feature)."""
    rng = np.random.default_rng([cfg.seed, feature])
    explain = top(win.store, rows, vals, cfg.n_explain, one_per_sequence=True)
    shown = [sequence_rows(win.store, win.store.locate(rows[i])[0]) for i in explain]
    pool = np.flatnonzero(~np.isin(rows, np.concatenate(shown) if shown else []))
    contexts = [win.render(int(rows[i]), rows, vals, d)
                for d, (_, pick) in enumerate(deciles(vals, cfg.per_decile, rng, among=pool), start=1) for i in pick]
    negatives: set[int] = set()
    for row in rng.choice(scanned, min(len(scanned), 20 * cfg.n_negative + 20), replace=False) if len(scanned) else []:
        if len(negatives) == cfg.n_negative:
            break
        if not np.isin(win.rows(int(row)), rows).any():
            negatives.add(int(row))
    contexts += [win.render(r, rows, vals, 0) for r in sorted(negatives)]
    return FeatureSample(feature, len(rows), float(vals.max()) if len(vals) else 0.0,
                         [win.render(int(rows[i]), rows, vals, -1) for i in explain], contexts)


def collect(run: TrainedRun, cfg: AutointerpConfig, tokenizer: Any, device: torch.device) -> tuple[list[FeatureSample], int]:
    """The samples of the chosen features and the number of held-out rows scanned. Drawn features cost
    two passes (one only counting), so that only the chosen features' firings are ever held."""
    features = choose_features(run, cfg, device)
    firings = scan_held_out(run, cfg, device, only=features)
    win = Windows(run, tokenizer, cfg.window, cfg.after)
    return [sample_feature(f, *firings.of(f), firings.seen, win, cfg) for f in features], len(firings.seen)


# ---------------------------------------------------------------- outputs


def plot(agg: dict[str, Any], path: Path, title: str) -> None:
    """Figure 6 style: mean recall per decile and non-activating accuracy, bootstrap CI error bars."""
    bars = [*agg["recall"], agg["negative_accuracy"]]
    labels = [str(d) for d in range(1, N_DECILES + 1)] + ["not\nactive"]
    mean = [b["mean"] if b["mean"] is not None else 0.0 for b in bars]
    err = [[m - b["lo"] if b["mean"] is not None else 0.0 for m, b in zip(mean, bars, strict=True)],
           [b["hi"] - m if b["mean"] is not None else 0.0 for m, b in zip(mean, bars, strict=True)]]
    fig, axes = figure(1, 1, (7, 3.8))
    ax = axes[0, 0]
    ax.bar(range(len(bars)), mean, yerr=err, capsize=3, color=["tab:blue"] * N_DECILES + ["tab:gray"])
    ax.set_xticks(range(len(bars)), labels)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("activation decile (10 = strongest)")
    ax.set_ylabel("fraction judged correctly")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    save_png(fig, path)


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
    p = out["parsing"]
    lines.append(f"  unparseable answers: {p['explanations']['unparseable']} of {p['explanations']['answers']} "
                 f"explanations, {p['judgments']['unparseable']} of {p['judgments']['answers']} scorer answers; "
                 f"contexts judged {p['contexts']['judged']} of {p['contexts']['asked']}")
    t = out["timing_s"]
    lines.append(f"  time: {t['total']:.0f} s (collect {t['collect']:.0f} s, server start {t['server_start']:.0f} s, "
                 f"LLM calls {t['llm']:.0f} s)")
    lines += [f"  error: {e}" for e in c["errors"]]
    return "\n".join(lines)


def _open(cfg: AutointerpConfig) -> tuple[TrainedRun, Any, torch.device]:
    """Check the run and load its SAE, store and tokenizer (every check before any work)."""
    with reraise_as(AutointerpError):
        run, tokenizer, device = open_run(cfg.run, cfg.store, cfg.outlier_factor, cfg.device)
    bad = [f for f in cfg.features or [] if f >= run.sae.n_latents]
    if bad:
        raise AutointerpError(f"features {bad} out of range: the SAE has {run.sae.n_latents} latents")
    return run, tokenizer, device


def clients(cfg: AutointerpConfig, run: RunDir) -> tuple[ChatClient, ChatClient, Counters]:
    counters = Counters()
    cache = ResponseCache(cfg.cache_dir or run.file(CACHE_DIR)) if cfg.cache else None
    kw = dict(counters=counters, cache=cache, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
              backoff_s=cfg.backoff_s)
    return ChatClient(cfg.explainer, **kw), ChatClient(cfg.scorer, **kw), counters


@contextlib.contextmanager
def served(cfg: AutointerpConfig, run: RunDir) -> Iterator[tuple[AutointerpConfig, dict[str, Any] | None]]:
    """`cfg` as it is (serve=null), or with both endpoints pointing at the server that `serve` names,
    started for the `with` block and stopped after it (eval/serve.py); and what to record of it."""
    if cfg.serve is None:
        yield cfg, None
        return
    log = run.file(SERVER_LOG)
    print(f"autointerp: starting transformers serve on {model_folder(cfg.serve)} (log: {log})", flush=True)
    with reraise_as(AutointerpError), serving(cfg.serve, log, cfg.serve_timeout_s, cfg.serve_threads) as server:
        print(f"autointerp: {server.base_url} ready in {server.ready_s:.1f} s", flush=True)
        local = {"base_url": server.base_url, "model": server.model, "api_key_env": None}
        yield (replace(cfg, explainer=replace(cfg.explainer, **local), scorer=replace(cfg.scorer, **local)),
               {"server": "transformers serve", "model_folder": server.model, "base_url": server.base_url,
                "threads": cfg.serve_threads, "ready_s": round(server.ready_s or 0.0, 2), "log": str(log)})


def parsing(results: list[dict[str, Any]]) -> dict[str, Any]:
    """How many answers could be read: explanations, scorer answers, and the contexts left unjudged."""
    explained = [r for r in results if r["status"] in ("ok", "unparseable")]
    scored = [r for r in results if r["status"] == "ok"]
    contexts = sum(len(r["contexts"]) for r in scored)
    judged = sum(sum(r["judged"]) + r["negatives_judged"] for r in scored)
    return {"explanations": {"answers": len(explained), "unparseable": sum(r["status"] == "unparseable" for r in explained)},
            "judgments": {"answers": sum(r["scorer_answers"] for r in scored),
                          "unparseable": sum(r["scorer_unparseable"] for r in scored)},
            "contexts": {"asked": contexts, "judged": judged, "unjudged": contexts - judged}}


def refuse_if_nothing_scored(results: list[dict[str, Any]], counters: Counters, run: RunDir) -> None:
    """AutointerpError when not one feature was scored (an unreachable endpoint, a refused key, answers
    that never parse, features that never fire): the command did not do its job, so it exits non-zero
    and an earlier autointerp.json stays as it was."""
    if any(r["status"] == "ok" for r in results):
        return
    statuses = Counter(r["status"] for r in results)
    why = ", ".join(f"{n} {status}" for status, n in sorted(statuses.items())) or "no features"
    first = counters.as_dict()["errors"][:1]
    raise AutointerpError(f"no feature was scored ({why}{'; first error: ' + first[0] if first else ''}); "
                          f"{run.file(RunDir.AUTOINTERP)} is left as it was")


def run_autointerp(cfg: AutointerpConfig) -> dict[str, Any]:
    """Collect, explain, score; writes <run>/autointerp.json and autointerp.png and returns the JSON."""
    t0 = time.monotonic()
    run, tokenizer, device = _open(cfg)
    samples, n_rows = collect(run, cfg, tokenizer, device)
    t1 = time.monotonic()
    with served(cfg, run.dir) as (live, server):  # live: cfg, pointing at the server it started if any
        cfg = live
        t2 = time.monotonic()
        explainer, scorer, counters = clients(cfg, run.dir)
        results = explain_and_score(samples, explainer, scorer, batch_contexts=cfg.batch_contexts,
                                    concurrency=cfg.concurrency, seed=cfg.seed, ci=cfg.ci, progress=cfg.progress)
        t3 = time.monotonic()
    refuse_if_nothing_scored(results, counters, run.dir)
    for r in results:
        r["density"] = r["n_active"] / max(1, n_rows)
    agg = aggregate(results, cfg.ci, cfg.n_bootstrap, cfg.seed)
    unparseable = sum(r["unparseable"] for r in results)
    out = {
        "run": str(run.dir), "store": str(run.store.path), "n_latents": run.sae.n_latents,
        "arch": run.config.arch, "scanned_rows": n_rows,
        "config": asdict(cfg), "server": server, "n_scored": sum(r["status"] == "ok" for r in results),
        "aggregate": agg, "counters": {**counters.as_dict(), "unparseable": unparseable},
        "parsing": parsing(results),
        "timing_s": {"collect": round(t1 - t0, 2), "server_start": round(t2 - t1, 2), "llm": round(t3 - t2, 2),
                     "total": round(time.monotonic() - t0, 2)},
        "notes": ["decile 10 holds the strongest activations; explanation examples' sequences are left out of them",
                  f"per-feature intervals: Wilson {cfg.ci:g}; aggregates: mean over scored features with a "
                  f"percentile bootstrap {cfg.ci:g} interval ({cfg.n_bootstrap} resamples of the features)",
                  "balanced_accuracy = (recall over all activating contexts + non-active accuracy) / 2",
                  "status: ok | failed (explainer call failed) | unparseable (no explanation in the answer) | "
                  "no_examples (the feature never fires in the scanned rows); only ok features are aggregated",
                  "an unparseable scorer answer leaves its contexts unjudged (judged: null); they count in no "
                  "score, and parsing.contexts.unjudged says how many there were"],
        "features": results,
    }
    run.dir.write_result(RunDir.AUTOINTERP, out, indent=1)
    scorer_name = Path(cfg.scorer.model).name if server else cfg.scorer.model  # served: the folder's name
    plot(agg, run.dir.file(PLOT), f"Detection scoring: {run.dir.path.parent.name}/{run.dir.name} "
                                          f"({out['n_scored']} features, scorer {scorer_name})")
    return out


@hydra.main(config_path="../conf/eval", config_name="autointerp", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: one line `autointerp: error: ...` and exit 2 on bad input."""
    with one_line_errors("autointerp"):
        out = run_autointerp(AutointerpConfig.from_omegaconf(cfg))
    print(table(out))
    print(f"written: {out['run']}/{RunDir.AUTOINTERP}, {out['run']}/autointerp.png")


if __name__ == "__main__":
    launch("autointerp", main, AutointerpConfig.from_omegaconf, conf="eval")
