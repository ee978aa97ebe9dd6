"""`python -m pipeline.demo [overrides]` (= `make demo`): the whole pipeline on the offline preset.

harvest (or reuse) the demo store -> train every run of conf/demo/demo.yaml -> evaluate them all
(one LM, shared clean / zero-ablated passes) -> `<out>/report.md` with plots and stage timings.
Every stage's config is composed and checked before any work starts; re-running resumes: a complete
store is reused, finished runs are skipped, up-to-date eval.json files are kept.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from harvest.config import HarvestConfig
from harvest.held_out import held_out_period
from runtime.config import compose_app
from runtime.errors import ToolkitError, one_line_errors
from train.config import TrainConfig


PAPER_TOKENS = 100_000 * 8192  # the paper's training tokens per run


class DemoError(ToolkitError):
    """Bad demo config; printed as one line."""


def plan(cfg: DictConfig) -> tuple[HarvestConfig, dict[str, TrainConfig], DictConfig]:
    """Compose and check every stage's config: (harvest, {run name: train config}, eval overrides)."""
    harvest_cfg = HarvestConfig.from_omegaconf(compose_app("harvest", cfg.harvest))
    runs = {}
    for name, overrides in cfg.runs.items():
        train_cfg = TrainConfig.from_omegaconf(
            compose_app("train", [*cfg.train, *overrides, f"data.store={harvest_cfg.store}"]))
        train_cfg.sae_kwargs(d=1)  # checks k against the width before anything runs
        runs[name] = train_cfg
    if not runs:
        raise DemoError("runs is empty: nothing to train")
    eval_cfg = compose_app("eval", [*cfg.eval, f"run={Path(cfg.out) / 'runs'}"])
    return harvest_cfg, runs, eval_cfg


def intro(store_tokens: int, runs: dict[str, TrainConfig]) -> list[str]:
    """The report's opening paragraph: what was run and how far its numbers reach."""
    first = next(iter(runs.values()))
    budget = first.run_budget
    tokens = budget.amount if budget.kind == "tokens" else budget.amount * first.batch_size
    scale = f", some {PAPER_TOKENS / tokens:,.0f}x fewer than the paper's 100K steps x 8192" \
        if budget.kind in ("steps", "tokens") else ""
    return [f"{len(runs)} SAEs trained on a store of the demo model ({store_tokens:,} harvested tokens, every "
            f"{held_out_period(first.data.eval_frac)}th chunk held out), each for `budget={budget}` at batch "
            f"{first.batch_size:,}{f' ({tokens:,.0f} tokens{scale})' if scale else ''}, with held-out validation "
            f"every {first.eval_every} steps. Widths are at most a few thousand latents, the corpus is not "
            "OpenWebText, and each number comes from one seed. The statements below are read off these runs' "
            "held-out numbers; where they differ from the paper, that is what this scale shows, not a verdict on "
            "the method.", ""]


def run_demo(cfg: DictConfig) -> Path:
    """All stages; returns the report's path."""
    from eval.report import build_report
    from eval.run import EvalConfig, evaluate, table
    from harvest.run import harvest as run_harvest
    from harvest.store import ActivationStore, is_store, read_progress
    from train.loop import train

    harvest_cfg, runs, eval_overrides = plan(cfg)
    eval_cfg = EvalConfig.from_omegaconf(eval_overrides)
    out = Path(cfg.out)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    store_path = harvest_cfg.store
    if is_store(store_path) and ActivationStore(store_path).complete:
        print(f"[demo] 1/4 harvest: reusing the complete store {store_path}")
    else:
        print(f"[demo] 1/4 harvest: {harvest_cfg.tokens:,} tokens of {harvest_cfg.model} into {store_path}")
        if is_store(store_path):  # an interrupted harvest: resume it, never ask for less than it holds
            held = read_progress(store_path).prefix * ActivationStore(store_path).chunk_rows
            harvest_cfg = dataclasses.replace(harvest_cfg, tokens=max(harvest_cfg.tokens, held))
        run_harvest(harvest_cfg)
    timings["harvest"] = time.perf_counter() - t

    for i, (name, train_cfg) in enumerate(runs.items()):
        t = time.perf_counter()
        print(f"[demo] 2/4 train {i + 1}/{len(runs)}: {name}")
        train(train_cfg, out / "runs" / name)
        timings[f"train {name}"] = time.perf_counter() - t

    t = time.perf_counter()
    print(f"[demo] 3/4 eval: {len(runs)} runs on the held-out chunks")
    results = evaluate(eval_cfg)
    if results:
        print(table(results))
    timings["eval"] = time.perf_counter() - t

    t = time.perf_counter()
    report = build_report(out / "runs", out, title=cfg.title, intro=intro(harvest_cfg.tokens, runs))
    timings["report"] = time.perf_counter() - t
    (out / "timings.json").write_text(json.dumps(timings, indent=2))
    lines = ["", "## Demo stage timings (this run, this machine)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()] + [f"| total | {sum(timings.values()):.0f} |", ""]
    lines += [f"Settings: `conf/demo/{cfg.name}.yaml` (" + OmegaConf.to_yaml({"train": list(cfg.train)}).strip()
              + ").", ""]
    with open(report, "a") as f:
        f.write("\n".join(lines))
    print(f"[demo] 4/4 report: {report} ({sum(timings.values()):.0f} s in all)")
    return report


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.demo [--config-name=<name>] [overrides]`: conf/demo/<name>.yaml (default demo)."""
    args = sys.argv[1:] if argv is None else list(argv)
    names = [a.split("=", 1)[1] for a in args if a.startswith("--config-name=")]
    with one_line_errors("demo"):
        run_demo(compose_app("demo", [a for a in args if not a.startswith("--config-name=")],
                             names[-1] if names else None))


if __name__ == "__main__":
    main()
