"""`make bench-dist`: Switch SAE training on 2 processes (gloo, CPU) against one process, same global batch.

One run, one machine, the same SAE and the same global batch B of random rows for every entry:
  - one process, 2 threads: the whole batch;
  - expert parallel, 2 processes of 1 thread: each rank routes its B/2 rows, holds N/2 experts and
    their Adam moments, and exchanges tokens with the other rank (train/expert_parallel.py);
  - data parallel, 2 processes of 1 thread: each rank holds the whole SAE and all-reduces every
    gradient (train/dist.py).
Each entry: median seconds of full training steps (forward, backward, gradient synchronisation,
the recipe's update) after one warm-up step, and tokens/s. For expert parallelism, the bytes its
all-to-alls sent to the other rank per step, forward and backward, beside the least any exchange
of activations must move: 2 x (B - tokens whose expert is on their own rank) x d x 4 bytes (float32)
each way, x out and E(x) back. The default shape is the paper's FLOP-matched Switch at N = 8
(d 768, 8 experts of 24576 latents, k 32).

    python -m bench.dist [--batch 4096] [--steps 3] [--quick]   -> results/bench/dist.json + a table
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench import SWITCH_ALPHA, write_results
from runtime.ranks import spawn_local
from train.dist import DataParallel, Dist, init
from train.expert_parallel import ExpertParallel
from train.recipe import apply_update, make_optimizer
from train.saes.switch import SwitchSAE

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def _batch(args: argparse.Namespace) -> torch.Tensor:
    """The global batch [B, d], the same in every process."""
    return 10 * torch.randn(args.batch, args.d, generator=torch.Generator().manual_seed(0))


def _time(args: argparse.Namespace, dist: Dist, layout_name: str) -> dict:
    """Median step seconds of this process's part of the job, and the exchange's bytes per step."""
    torch.manual_seed(0)
    full = SwitchSAE(d=args.d, n_experts=args.n_experts, expert_width=args.expert_width, k=args.k,
                     alpha=SWITCH_ALPHA)
    x = _batch(args)
    full.init_from_batch(x[:1024])
    layout = ExpertParallel(dist, WORLD) if layout_name == "expert" else DataParallel(dist)
    sae = layout.prepare(full)
    del full
    x = x.chunk(dist.world)[dist.rank]
    params = list(sae.parameters())
    opt = make_optimizer(params, 1e-4, (0.9, 0.999))
    times, local = [], 0
    for i in range(args.steps + 1):
        if i == 1:  # after the warm-up step
            sent = dict(layout.groups.sent) if layout_name == "expert" else {}
        if i >= 1 and layout_name == "expert":  # tokens the step keeps local (this routing, outside the timing)
            with torch.no_grad():
                local += int((sae.route(x)[1] // (args.n_experts // WORLD) == dist.rank).sum())
        dist.barrier()
        t = time.perf_counter()
        loss = sae(x).losses["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        layout.sync_grads()
        apply_update(sae, opt, params, 1.0, layout.grad_norm)
        dist.barrier()
        if i >= 1:
            times.append(time.perf_counter() - t)
    out = {"step_s": statistics.median(times)}
    if layout_name == "expert":
        out.update({k: (v - sent[k]) / args.steps for k, v in layout.groups.sent.items()}, local=local / args.steps)
    return out


def _ranks(args: argparse.Namespace, out: str) -> None:
    """One of the WORLD processes (`spawn_local`): both layouts timed; rank 0 writes the results."""
    dist = init(torch.device("cpu"))
    results = {}
    for layout_name in ("expert", "data"):
        mine = torch.tensor(list(_time(args, dist, layout_name).values()), dtype=torch.float64)
        results[layout_name] = {"step_s": dist.all_reduce_max(mine[:1]).item()}  # the slower rank sets the pace
        if layout_name == "expert":  # bytes and local tokens summed over the ranks
            fwd, bwd, local = dist.all_reduce_sum(mine[1:]).tolist()
            results[layout_name].update(forward_bytes=fwd, backward_bytes=bwd, local_tokens=local)
    if dist.is_main:
        Path(out).write_text(json.dumps(results))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096, help="global batch (tokens per step)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per entry (after one warm-up step)")
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--n-experts", type=int, default=8)
    parser.add_argument("--expert-width", type=int, default=24576)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="experts of 2048 latents, batch 1024")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench" / "dist.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.expert_width, args.batch = 2048, 1024
    shape = f"d {args.d}, N {args.n_experts} x {args.expert_width} latents, k {args.k}, global batch {args.batch}"
    print(f"Switch SAE {shape}; one process with {WORLD} threads vs {WORLD} gloo processes with 1 thread each")

    torch.set_num_threads(WORLD)
    one = _time(args, Dist(0, 1, 0, torch.device("cpu")), "data")
    with tempfile.TemporaryDirectory() as tmp:
        spawn_local(_ranks, WORLD, args, f"{tmp}/ranks.json")
        ranks = json.loads(Path(tmp, "ranks.json").read_text())
    ep, dp = ranks["expert"], ranks["data"]
    row_bytes = args.d * 4
    minimum = ep["min_bytes_each_way"] = 2 * (args.batch - ep["local_tokens"]) * row_bytes
    rows = [{"entry": "one process", **one}, {"entry": "expert parallel", **ep}, {"entry": "data parallel", **dp}]
    print(f"{'entry':<18}{'step s':>9}{'tok/s':>10}{'vs one':>8}")
    for r in rows:
        r["tokens_per_s"] = args.batch / r["step_s"]
        r["speedup"] = one["step_s"] / r["step_s"]
        print(f"{r['entry']:<18}{r['step_s']:>9.3f}{r['tokens_per_s']:>10.0f}{r['speedup']:>7.2f}x")
    print(f"all-to-all bytes per step, both ranks: forward {ep['forward_bytes'] / 1e6:.3f} MB, backward "
          f"{ep['backward_bytes'] / 1e6:.3f} MB; minimum each way 2 x ({args.batch} - {ep['local_tokens']:.0f} local "
          f"tokens) x {args.d} x 4 B = {minimum / 1e6:.3f} MB (measured / minimum: forward "
          f"{ep['forward_bytes'] / minimum:.4f}, backward {ep['backward_bytes'] / minimum:.4f})")
    params = args.n_experts * args.d + 2 * args.d + 2 * args.n_experts * args.expert_width * args.d  # router, biases, experts
    print(f"data parallel all-reduces every gradient instead: {params * 4 / 1e6:.0f} MB of float32 per rank per step")
    write_results(args.out, {"shape": vars(args) | {"world": WORLD}, "entries": rows})


if __name__ == "__main__":
    main()
