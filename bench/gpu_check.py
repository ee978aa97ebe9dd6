"""`make gpu-check`: everything a first GPU should tell us, in one script of at most about 10 minutes.

  1. the tests marked `cuda` (tests/test_cuda.py: the loader's pinned, side-stream path against the
     CPU path, training on the device, a harvest on the device), which are skipped on CPU-only machines;
  2. the paper-shape step (d 768, batch 8192, k 32, M 24576) of TopK and width-matched Switch N 16, in
     float32 and bfloat16 autocast, with the TopK / Switch ratio in each dtype;
  3. training fed by the loader: the real loader on the demo store, full training steps of each
     architecture on the device, and the fraction of the GPU's time spent waiting for data, measured
     with CUDA events (the gap between the end of one step's work and the start of the next's);
  4. a short harvest of the demo preset on the GPU (tokens/s).

    python -m bench.gpu_check [--steps 20]   -> results/bench/gpu_check.json + a summary

On a machine without CUDA it says so in one line and exits 2.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import SWITCH_ALPHA, write_results

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "data/activations/smollm2-135m_resid_post20"


def cuda_tests() -> dict:
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py"], cwd=ROOT,
                         capture_output=True, text=True)
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr.strip()[-300:]
    print(f"cuda tests: {last}")
    return {"returncode": out.returncode, "summary": last}


def step_times(steps: int) -> dict:
    from bench.train_step import BATCH, build_entry, time_steps

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        for arch, n, match in (("topk", None, None), ("switch", 16, "width")):
            sae, _, _ = build_entry(arch, n, match)
            out[f"{arch}_{name}_step_s"] = s = time_steps(sae, steps, dtype, device="cuda")
            print(f"{arch:<7}{name:<10} {s * 1e3:8.2f} ms/step  {BATCH / s:>12,.0f} rows/s")
            del sae
        out[f"topk_over_switch_{name}"] = out[f"topk_{name}_step_s"] / out[f"switch_{name}_step_s"]
        print(f"TopK / Switch N 16 in {name}: {out[f'topk_over_switch_{name}']:.2f}x")
    return out


def fed_by_the_loader(steps: int) -> dict:
    """Full training steps on loader batches; the GPU's idle gaps between steps (CUDA events) / total."""
    from harvest.held_out import norm_cut, split_chunks
    from harvest.store import ActivationStore
    from train.loader import Batches
    from train.recipe import apply_update, make_optimizer
    from train.saes import build

    store = ActivationStore(STORE)
    train_ids, _ = split_chunks(store.n_chunks, 0.05)
    d, out = store.d_model, {}
    for name, kwargs in {"topk": dict(width=24576, k=32),
                         "switch_n16": dict(n_experts=16, expert_width=24576 // 16, k=32, alpha=SWITCH_ALPHA)}.items():
        sae = build("switch" if name.startswith("switch") else "topk", d=d, **kwargs).cuda()
        batches = iter(Batches(store, train_ids, 8192, 0, 8, device="cuda", cut=norm_cut(store, 10.0)))
        sae.init_from_batch(next(batches))
        params = list(sae.parameters())
        opt = make_optimizer(params, 1e-4, (0.9, 0.999))
        marks = []  # (start, end) events of each step's GPU work
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            x = next(batches)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = sae(x).losses["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            apply_update(sae, opt, params, 1.0)
            end.record()
            marks.append((start, end))
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        busy = sum(s.elapsed_time(e) for s, e in marks) / 1e3
        gaps = sum(marks[i][1].elapsed_time(marks[i + 1][0]) for i in range(len(marks) - 1)) / 1e3
        span = marks[0][0].elapsed_time(marks[-1][1]) / 1e3
        out[name] = {"steps": steps, "wall_s": wall, "gpu_busy_s": busy, "gpu_wait_s": gaps,
                     "wait_fraction": gaps / span, "rows_s": steps * 8192 / wall}
        print(f"{name}: {steps * 8192 / wall:,.0f} rows/s fed by the loader; the GPU waited for data "
              f"{gaps / span:.1%} of the time ({gaps:.2f} s of {span:.2f} s)")
        del sae, batches
    return out


def gpu_harvest(tokens: int = 260_096) -> dict:
    from harvest.config import HarvestConfig
    from harvest.run import harvest
    from runtime.config import compose_app

    with tempfile.TemporaryDirectory() as tmp:
        cfg = HarvestConfig.from_omegaconf(compose_app("harvest", [
            "preset=demo", f"store={tmp}/s", f"tokens={tokens}", "device=cuda", "progress=false"]))
        result = harvest(cfg)
    rate = result.rows / result.seconds
    print(f"harvest on the GPU (demo preset, {result.rows:,} tokens): {rate:,.0f} tokens/s, writer busy "
          f"{result.write_seconds:.1f} s of {result.seconds:.1f} s")
    return {"tokens": result.rows, "seconds": result.seconds, "tokens_s": rate, "write_seconds": result.write_seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per entry")
    parser.add_argument("--out", default=str(ROOT / "results/bench/gpu_check.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: error: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine",
              file=sys.stderr)
        raise SystemExit(2)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(f"GPU: {report['gpu']}, torch {report['torch']}")
    report["tests"] = cuda_tests()
    report["steps"] = step_times(args.steps)
    if STORE.exists():
        report["loader"] = fed_by_the_loader(args.steps)
    else:
        print(f"no demo store at {STORE}: `make harvest preset=demo` first for the loader measurement")
    report["harvest"] = gpu_harvest()
    write_results(args.out, report)


if __name__ == "__main__":
    main()
