"""Bad input on the command line of every app is refused as a user sees it: exit code 2, one line
`<app>: error: ...` on stderr naming the key, within seconds, and nothing left on disk.

Every case runs from an empty working folder (tmp_path), where Hydra would put a run folder
(train: runs/<arch>/<overrides>/.hydra/) and where every store, run and output path of the case
points; the folder must be as empty afterwards. Most cases run in this process, exactly as
`python -m <app>` runs them (runpy of the app's __main__ with sys.argv set), which keeps the module
fast; a few run as real subprocesses to show that the CLI behaves the same.
"""

from __future__ import annotations

import json
import logging
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from tests.conftest import CONF, ROOT, documents
from tests.train.test_loop import synthetic_store

# module run by `python -m` -> the app name its errors start with
APPS = {"harvest": "harvest", "train": "train", "eval": "eval", "eval.report": "report", "eval.geometry": "geometry",
        "eval.dashboard": "dashboard", "eval.autointerp": "autointerp"}
# arguments every case of an app starts with; {tmp} is the case's working folder, {store} a real
# (small) activation store, {corpus} a real .jsonl corpus with fields id and text
BASE = {
    "harvest": ["preset=demo", "store={tmp}/s", "device=cpu", "progress=false"],
    "train": ["data.store={store}", "device=cpu", "progress=false"],
    "eval": ["run={tmp}/run", "ce=false", "progress=false"],
    "eval.report": ["sweep={tmp}/sweep"],
    "eval.geometry": ["run={tmp}/run"],
    "eval.dashboard": ["run={tmp}/run", "progress=false"],
    "eval.autointerp": ["run={tmp}/run", "explainer.model=m", "progress=false"],
}

# the `model=` options the train CLI lists, one per conf/train/model/*.yaml
MODELS = ", ".join(sorted(p.stem for p in (CONF / "train" / "model").glob("*.yaml")))
# (app module, the bad arguments, text the one line must contain: the key, the value, what is allowed)
CASES = [
    # harvest: conf/harvest/harvest.yaml
    ("harvest", ["codec_level=100"], "codec_level must be an integer in 0..9 with codec=blosc_zstd, got 100"),
    ("harvest", ["codec=zstd", "codec_level=23"], "codec_level must be an integer in -131072..22 with codec=zstd"),
    ("harvest", ["codec=gzip"], "codec must be one of blosc_zstd, zstd, none, got 'gzip'"),
    ("harvest", ["repair=true", "overwrite=true"], "repair=true and overwrite=true contradict each other"),
    ("harvest", ["writer_threads=0"], "writer_threads must be auto or an integer >= 1, got 0"),
    ("harvest", ["writer_threads=2.5"], "writer_threads must be auto or an integer >= 1, got 2.5"),
    ("harvest", ["layer=-1"], "layer must be an integer >= 0 or a list of them, got -1"),
    ("harvest", ["layer=[]"], "layer must be an integer >= 0 or a list of them, got []"),
    ("harvest", ["layer=[3,3]"], "layer lists 3 more than once"),
    ("harvest", ["site=[]"], "site must be one of resid_post, attn_out, mlp_in, mlp_out, or a list of them, got []"),
    ("harvest", ["site=[mlp_out,mlp_out]"], "site lists mlp_out more than once"),
    ("harvest", ["site=[mlp_out,attn_out]", "store={tmp}/one"], "names one store for 2 sites: put {{site}} in it"),
    ("harvest", ["context_size=1"], "context_size must be an integer >= 2, got 1"),
    ("harvest", ["tokens=1.5"], "tokens must be an integer >= 1, got 1.5"),
    ("harvest", ["tokens=10"], "tokens=10 is below one chunk"),
    ("harvest", ["chunk_seqs=0"], "chunk_seqs must be an integer >= 1, got 0"),
    ("harvest", ["batch_size=true"], "batch_size must be an integer >= 1, got true"),
    ("harvest", ["keep_pos0=maybe"], "keep_pos0 must be true or false, got 'maybe'"),
    ("harvest", ["site=mlp_mid"], "site must be one of resid_post, attn_out, mlp_in, mlp_out, or a list of them, got 'mlp_mid'"),
    ("harvest", ["dtype=float8"], "dtype must be one of auto, float32, bfloat16, float16, got 'float8'"),
    ("harvest", ["store_dtype=float32"], "store_dtype must be one of float16, bfloat16, got 'float32'"),
    ("harvest", ["dataset.packing=pad"], "dataset.packing must be one of document, concat, got 'pad'"),
    ("harvest", ["dataset.shuffle_buffer=-1"], "dataset.shuffle_buffer must be an integer >= 0, got -1"),
    ("harvest", ["dataset.split=''"], "dataset.split must be a non-empty string, got ''"),
    ("harvest", ["device=tpu9"], "device must be auto, cpu, cuda, cuda:N or mps, got 'tpu9'"),
    ("harvest", ["seed=-3"], "seed must be an integer >= 0, got -3"),
    ("harvest", ["overwrite=yes"], "overwrite must be true or false, got 'yes'"),
    ("harvest", ["dataset.shufle_buffer=3"], "unknown key 'dataset.shufle_buffer'; did you mean 'dataset.shuffle_buffer'?"),
    ("harvest", ["preset=tiny"], "unknown preset 'tiny'; choose one of demo, paper"),
    ("harvest", ["model={tmp}/no-model", "dataset.name={corpus}", "dataset.text_field=body"],
     "dataset.text_field 'body' is not a field of the records of"),
    # train: conf/train/train.yaml and conf/train/model/*.yaml
    ("train", ["model=switch", "model.n_experts=0"], "model.n_experts must be an integer >= 1, got 0"),
    ("train", ["model=switch", "model.n_experts=-4"], "model.n_experts must be an integer >= 1, got -4"),
    ("train", ["model=switch", "model.alpha=lots"], "model.alpha must be a number >= 0, got 'lots'"),
    ("train", ["model=switch", "model.match=depth"], "model.match must be one of width, flops, got 'depth'"),
    ("train", ["model=switch", "model.n_experts=7"], "model.width=24576 is not divisible by model.n_experts=7"),
    ("train", ["model.width=-8"], "model.width must be an integer >= 1, got -8"),
    ("train", ["model.k=2.5"], "model.k must be an integer >= 1, got 2.5"),
    ("train", ["model.width=64", "model.k=65"], "model.k=65 is larger than model.width=64"),
    ("train", ["model=batchtopk", "model.width=64", "model.k=65"], "model.k=65 is larger than model.width=64"),
    ("train", ["model=batchtopk", "model.k=0"], "model.k must be an integer >= 1, got 0"),
    ("train", ["model=relu", "model.warmup_frac=2"], "model.warmup_frac must be a number in [0, 1], got 2"),
    ("train", ["model=gated", "model.l1_coeff=-1"], "model.l1_coeff must be a number >= 0, got -1"),
    ("train", ["model=jumprelu", "model.bandwidth=0"], "model.bandwidth must be a number > 0, got 0"),
    ("train", ["model=jumprelu", "model.bandwidth=-0.01"], "model.bandwidth must be a number > 0, got -0.01"),
    ("train", ["model=jumprelu", "model.l0_coeff=-1"], "model.l0_coeff must be a number >= 0, got -1"),
    ("train", ["model=jumprelu", "model.warmup_frac=1.5"], "model.warmup_frac must be a number in [0, 1], got 1.5"),
    ("train", ["model=jumprelu", "model.warmup_frac=-0.1"], "model.warmup_frac must be a number in [0, 1], got -0.1"),
    ("train", ["model=jumprelu", "model.threshold_init=0"], "model.threshold_init must be a number > 0, got 0"),
    ("train", ["model=jumprelu", "model.l0_coef=1"], "unknown key 'model.l0_coef'; did you mean 'model.l0_coeff'?"),
    ("train", ["model.widht=3"], "unknown key 'model.widht'; did you mean 'model.width'?"),
    ("train", ["foo=1"], "unknown key 'foo'"),
    ("train", ["+foo=1"], "unknown key 'foo'"),
    ("train", ["model=moe"], f"unknown model 'moe'; choose one of {MODELS}"),
    ("train", ["model=topk,switch"], "'model=topk,switch' gives several values: add -m (--multirun)"),
    ("train", ["data.window_chunks=0"], "data.window_chunks must be an integer >= 1, got 0"),
    ("train", ["data.threads=0"], "data.threads must be auto or an integer >= 1, got 0"),
    ("train", ["data.threads=many"], "data.threads must be auto or an integer >= 1, got 'many'"),
    ("train", ["data.read_ahead=-1"], "data.read_ahead must be an integer >= 0, got -1"),
    ("train", ["data.eval_frac=0.9"], "data.eval_frac must be a number in [0, 0.5]"),
    ("train", ["data.outlier_factor=1"], "data.outlier_factor must be a number > 1 or null, got 1"),
    ("train", ["data.allow_incomplete=1"], "data.allow_incomplete must be true or false, got 1"),
    ("train", ["adam_betas=[2,3]"], "adam_betas must be a pair [beta1, beta2] of numbers in [0, 1), got [2, 3]"),
    ("train", ["adam_betas=[0.9]"], "adam_betas must be a pair [beta1, beta2] of numbers in [0, 1), got [0.9]"),
    ("train", ["grad_clip=-1"], "grad_clip must be a number > 0, got -1"),
    ("train", ["dead_window=0"], "dead_window must be an integer >= 1, got 0"),
    ("train", ["batch_size=0"], "batch_size must be an integer >= 1, got 0"),
    ("train", ["lr=0"], "lr must be a number > 0 or null, got 0"),
    ("train", ["lr_decay_frac=1.5"], "lr_decay_frac must be a number in [0, 1], got 1.5"),
    ("train", ["eval_every=sometimes"], "eval_every must be auto or an integer >= 0, got 'sometimes'"),
    ("train", ["eval_tokens=0"], "eval_tokens must be an integer >= 1, got 0"),
    ("train", ["log_every=0"], "log_every must be an integer >= 1, got 0"),
    ("train", ["seed=-1"], "seed must be an integer >= 0, got -1"),
    ("train", ["dtype=float16"], "dtype must be one of float32, bfloat16, got 'float16'"),
    ("train", ["compile=1"], "compile must be true or false, got 1"),
    ("train", ["expert_parallel=0"], "expert_parallel must be an integer >= 1, got 0"),
    ("train", ["device=tpu9"], "device must be auto, cpu, cuda, cuda:N or mps, got 'tpu9'"),
    ("train", ["budget=steps:0"], "budget 'steps:0' must be positive"),
    ("train", ["data.store={tmp}/nowhere"], "data.store {tmp}/nowhere is not an activation store"),
    # train: conf/train/logger/*.yaml (runtime/tracking.py); a missing wandb is tests/train/test_tracking.py's
    ("train", ["logger=mlflow"], "unknown logger 'mlflow'; choose one of none, tensorboard, wandb"),
    ("train", ["logger.project=p"], "unknown key 'logger.project' (every key is documented in conf/train/logger/none.yaml)"),
    ("train", ["logger=tensorboard", "logger.project=p"], "unknown key 'logger.project'"),
    ("train", ["logger=wandb", "logger.mode=cloud"], "logger.mode must be one of online, offline, disabled or null, got 'cloud'"),
    ("train", ["logger=wandb", "logger.project=''"], "logger.project must be a W&B project name, got ''"),
    ("train", ["logger=wandb", "logger.tags=tiny"], "logger.tags must be a list of tags (non-empty strings of at most 64"),
    ("train", ["logger=wandb", "logger.entity=3"], "logger.entity must be a non-empty name or null, got 3"),
    ("train", ["logger=tensorboard", "logger.name=../up"], "logger.name must be a relative folder name (no leading /, no ..)"),
    ("train", ["logger=tensorboard", "logger.kind=mlflow"], "logger.kind must be one of none, wandb, tensorboard"),
    ("train", ["data.eval_frac=0.05"], "too few to hold one out for evaluation at data.eval_frac=0.05"),
    ("train", ["data.eval_frac=0.5", "budget=tokens:100", "batch_size=4096"], "budget tokens:100 is less than one step"),
    # eval: conf/eval/eval.yaml
    ("eval", ["ce_seqs=0"], "ce_seqs must be an integer >= 1, got 0"),
    ("eval", ["dtype=float16"], "dtype must be one of float32, bfloat16, got 'float16'"),
    ("eval", ["outlier_factor=0.5"], "outlier_factor must be run, null or a number > 1, got 0.5"),
    ("eval", ["max_tokens=0"], "max_tokens must be an integer >= 1, got 0"),
    ("eval", ["dead_window=0"], "dead_window must be an integer >= 1 or null, got 0"),
    ("eval", ["redo=maybe"], "redo must be true or false, got 'maybe'"),
    ("eval", ["track=1"], "track must be true or false, got 1"),
    ("eval", ["device=gpu"], "device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    ("eval", ["ce_seq=4"], "unknown key 'ce_seq'; did you mean 'ce_seqs'?"),
    ("eval", [], "run {tmp}/run does not exist"),
    # report: conf/eval/report.yaml
    ("eval.report", ["out=3"], "out must be a path or null, got 3"),
    ("eval.report", ["titel=x"], "unknown key 'titel'; did you mean 'title'?"),
    ("eval.report", [], "sweep folder {tmp}/sweep does not exist"),
    # geometry: conf/eval/geometry.yaml
    ("eval.geometry", ["threshold=0"], "threshold must be a number in (0, 1], got 0"),
    ("eval.geometry", ["tsne_iter=10"], "tsne_iter must be an integer >= 250, got 10"),
    ("eval.geometry", ["block=0"], "block must be an integer >= 1, got 0"),
    ("eval.geometry", ["bins=1.5"], "bins must be an integer >= 1, got 1.5"),
    ("eval.geometry", ["tsne=maybe"], "tsne must be true or false, got 'maybe'"),
    ("eval.geometry", ["tsne_perplexity=0"], "tsne_perplexity must be a number > 0, got 0"),
    ("eval.geometry", ["run=[]"], "run=<dir> is required"),
    # dashboard: conf/eval/dashboard.yaml
    ("eval.dashboard", ["features=densest"], "features must be random, top_density or a non-empty list"),
    ("eval.dashboard", ["n_features=0"], "n_features must be an integer >= 1, got 0"),
    ("eval.dashboard", ["n_top=-1"], "n_top must be an integer >= 0, got -1"),
    ("eval.dashboard", ["left=-1"], "left must be an integer >= 0, got -1"),
    ("eval.dashboard", ["bins=0"], "bins must be an integer >= 1, got 0"),
    ("eval.dashboard", ["outlier_factor=abc"], "outlier_factor must be run, null or a number > 1, got 'abc'"),
    # autointerp: conf/eval/autointerp.yaml
    ("eval.autointerp", ["ci=1"], "ci must be a number in (0, 1), got 1"),
    ("eval.autointerp", ["concurrency=0"], "concurrency must be an integer >= 1, got 0"),
    ("eval.autointerp", ["explainer.temperature=-1"], "explainer.temperature must be a number >= 0, got -1"),
    ("eval.autointerp", ["scorer.max_tokens=0"], "scorer.max_tokens must be an integer >= 1 or null, got 0"),
    ("eval.autointerp", ["explainer.base_url=localhost:8000"], "explainer.base_url 'localhost:8000' must start with"),
    ("eval.autointerp", ["after=40"], "after must be below window, got after=40, window=32"),
    ("eval.autointerp", ["timeout_s=0"], "timeout_s must be a number > 0, got 0"),
    ("eval.autointerp", ["max_retries=-1"], "max_retries must be an integer >= 0, got -1"),
    ("eval.autointerp", ["features=[-1]"], "features must be a non-empty list of latent ids >= 0"),
    ("eval.autointerp", ["min_active=0"], "min_active must be an integer >= 1 or null, got 0"),
    ("eval.autointerp", ["cache=2"], "cache must be true or false, got 2"),
    ("eval.autointerp", ["serve=no_model"], "model folder no_model does not exist"),
    ("eval.autointerp", ["serve=demo", "serve_timeout_s=0"], "serve_timeout_s must be a number > 0, got 0"),
    ("eval.autointerp", ["explainer.api_key_env=sk-live-1234abcd"],  # a pasted key is refused, and not repeated
     "explainer.api_key_env must be the name of an environment variable (UPPER_CASE letters, digits and _, or a name "
     "set in the environment), not the key itself or null, got something else (not shown)"),
    ("eval.autointerp", ["scorer.api_key_env=sk4f9aD81kQz0pLmXw7"],  # one without a dash, too
     "scorer.api_key_env must be the name of an environment variable (UPPER_CASE letters, digits and _, or a name "
     "set in the environment), not the key itself or null, got something else (not shown)"),
]
# a few cases again as real `python -m <app>` processes, one per app kind
SUBPROCESS = [
    ("harvest", ["codec_level=100"], "codec_level must be an integer in 0..9 with codec=blosc_zstd, got 100"),
    ("train", ["model.widht=3"], "unknown key 'model.widht'; did you mean 'model.width'?"),
    ("eval", ["dtype=float16"], "dtype must be one of float32, bfloat16, got 'float16'"),
    ("eval.geometry", ["threshold=0"], "threshold must be a number in (0, 1], got 0"),
    ("eval.autointerp", ["explainer.temperature=-1"], "explainer.temperature must be a number >= 0, got -1"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A real store (6 chunks: too few to hold one out at the default data.eval_frac=0.05) and a real
    corpus, outside the cases' working folders."""
    root = tmp_path_factory.mktemp("inputs")
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(documents(20))))
    return {"store": synthetic_store(root / "store", n_chunks=6), "corpus": corpus}


def command(module: str, args: list[str], tmp: Path, inputs: dict[str, Path]) -> list[str]:
    """The case's full argument list, its placeholders filled in."""
    return [a.format(tmp=tmp, **inputs) for a in [*BASE[module], *args]]


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def run_in_process(module: str, argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of `python -m <module> <argv>`, run in this process as runpy runs it."""
    assert not GlobalHydra.instance().is_initialized(), "a previous run left Hydra initialised"
    saved_argv, handlers, level = sys.argv, logging.root.handlers[:], logging.root.level
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = saved_argv
        GlobalHydra.instance().clear()  # a Hydra main that ran leaves it set
        logging.root.handlers[:], logging.root.level = handlers, level  # Hydra's job logging, undone
    return code, capsys.readouterr().err


def check_refusal(module: str, code: int, err: str, expect: str, seconds: float, before: list[str],
                  after: list[str]) -> None:
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith(f"{APPS[module]}: error: ") and expect in lines[0], lines[0]
    assert seconds < 30
    assert after == before, f"left on disk: {sorted(set(after) - set(before))}"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # runpy: the module was imported before
@pytest.mark.parametrize(("module", "args", "expect"), CASES, ids=[f"{m}:{' '.join(a)}" for m, a, _ in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(module, args, expect, inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = files(tmp_path)
    start = time.perf_counter()
    code, err = run_in_process(module, command(module, args, tmp_path, inputs), capsys)
    check_refusal(module, code, err, expect.format(tmp=tmp_path), time.perf_counter() - start, before,
                  files(tmp_path))


@pytest.mark.parametrize(("module", "args", "expect"), SUBPROCESS, ids=[m for m, _, _ in SUBPROCESS])
def test_the_real_cli_behaves_the_same(module, args, expect, inputs, tmp_path):
    before = files(tmp_path)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", module, *command(module, args, tmp_path, inputs)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=60)
    check_refusal(module, out.returncode, out.stderr, expect, time.perf_counter() - start, before, files(tmp_path))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # runpy: the module was imported before
@pytest.mark.parametrize(("module", "args", "expect"), [
    ("train", ["hydra.run.dir={tmp}/blocker/run"], "hydra.run.dir={tmp}/blocker/run cannot be created: {tmp}/blocker "
                                                   "is not a folder"),
    ("train", ["hydra.run.dir={tmp}/run", "logger=tensorboard", "logger.dir={tmp}/blocker/tb"],
     "logger.dir={tmp}/blocker/tb cannot be created: {tmp}/blocker is not a folder"),
], ids=["run-dir", "tracker-dir"])
def test_output_folders_that_cannot_be_created_are_one_line(module, args, expect, inputs, tmp_path, monkeypatch,
                                                           capsys):
    """A file where a folder should go: refused in one line, before anything is written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocker").write_text("a file")
    before = files(tmp_path)
    code, err = run_in_process(module, command(module, args, tmp_path, inputs), capsys)
    check_refusal(module, code, err, expect.format(tmp=tmp_path), 0.0, before, files(tmp_path))


def test_the_table_covers_every_app_and_forty_values():
    assert {m for m, _, _ in CASES} == set(APPS) and len(CASES) >= 40
