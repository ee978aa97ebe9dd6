"""`make bench`: seconds per training step of TopK and Switch SAEs beside their roofline bound.

One run, one machine, the same inputs for every entry (d 768, batch 8192, k 32, random data):
  - the machine's matmul peak (fp32, bf16) at the encoder's shape and its memory bandwidth (copy);
  - dense `topk` M 24576; width-matched `switch` M 24576, N 4..64; FLOP-matched `switch` (every
    expert 24576 latents) N 2, 4, 8; `switch_reference` N 16: the reference code's algorithm (the
    full-width encoder for every token, then every other expert's latents masked out, plain autograd);
  - the variants (`VARIANTS`): batchtopk, matryoshka and jumprelu M 24576, topk with AuxK, switch N 16 with
    AuxK, two active experts (k split, or one TopK over both: routing=global), a shared expert (2048 of the
    24576 latents) or the router bias, and the Matryoshka Switch N 16;
  - each entry: median seconds of full training steps (forward, backward, projection, clip, Adam,
    renormalisation: `train.recipe.apply_update`, as the trainer runs them) after one warm-up step.

Roofline bound of a step (`bound`), two phases: forward + backward, max(FLOPs / matmul peak,
bytes / bandwidth), plus the per-parameter updates, bytes / bandwidth (memory-bound: they touch
every parameter every step and do not shrink with N). FLOPs from `train.saes.flops.sae_cost`, as the
entry's kernels run them (the dense grouped path of narrow experts does more FLOPs than the sparse
one; the reference algorithm adds its full-width encoder); the FLOP ratio column is theoretical
(`algorithmic_cost`). Bytes are the unavoidable traffic in fp32: every parameter read once, the
batch in, the reconstruction and its gradient, the codes; Adam reads parameter, gradient and both
moments and writes three of them (28 bytes per parameter), clipping reads every gradient for the
global norm (4; the rescale rides in Adam's pass), the decoder constraint reads and writes the
decoder and its gradient (16 per decoder parameter). Intermediates a fused kernel need not write
(pre-activations) and the k-row gathers of the sparse path (B k d reads, 0.8 GB per pass at paper
scale, each row read ~10 times per batch) are not counted, so the bound is optimistic.

bf16: the same steps under `torch.autocast(bfloat16)` for topk and every switch entry (the reference
runs in fp32 only), bounded by the bf16 matmul peak, printed side by side with fp32 with the TopK /
Switch N 16 ratio in each dtype. It pays only where the CPU has bf16 units (AMX, AVX512-BF16) or on
GPU tensor cores. The loss check trains a TopK and a Switch SAE twice each with the real trainer on
the demo store (200 steps, fp32 and bf16, three seeds; `LOSS_CHECK`) and compares the means of the
final training losses and of the final held-out MSEs.

    python -m bench.train_step [--steps 3] [--quick | --variants] [--compile]   -> results/bench/train.json + a table
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench import SWITCH_ALPHA, write_results
from runtime.config import compose_app
from train.recipe import apply_update, make_optimizer
from train.saes import SAE, Codes, build
from train.saes.flops import algorithmic_cost, sae_cost
from train.saes.switch import SwitchSAE
from train.saes.kernels import topk_relu

D, BATCH, K, WIDTH = 768, 8192, 32, 24576
ROOT = Path(__file__).resolve().parents[1]


class SwitchReference(SwitchSAE):
    """The reference code's Switch forward: every expert's encoder on every token ([B, M] pre-activations),
    then the unchosen experts' latents masked out before the TopK. Same outputs as SwitchSAE; the
    baseline to beat, kept here only."""

    def encode_routed(self, x: torch.Tensor, probs: torch.Tensor, expert: torch.Tensor) -> Codes:
        pre = (x - self.b_pre) @ self.W_enc.view(-1, self.d).T  # [B, M]: the full width
        owner = torch.arange(self.n_latents, device=x.device) // self.expert_width
        pre = pre.masked_fill(owner[None, :] != expert[:, None], float("-inf"))
        vals, idx = topk_relu(pre, self.k)
        return Codes(idx=idx, vals=probs.gather(1, expert[:, None]) * vals, expert=expert, probs=probs)


def matmul_gflops(dtype: torch.dtype, reps: int = 3) -> float:
    """Achieved GFLOP/s of [BATCH, D] x [D, WIDTH] in `dtype` (median of reps after a warm-up)."""
    a, b = torch.randn(BATCH, D, dtype=dtype), torch.randn(D, WIDTH, dtype=dtype)
    times = []
    for i in range(reps + 1):
        t = time.perf_counter()
        a @ b
        if i:
            times.append(time.perf_counter() - t)
    return 2 * BATCH * D * WIDTH / statistics.median(times) / 1e9


def bandwidth_gbps(mbytes: int = 512, reps: int = 5) -> float:
    """Copy bandwidth: (read + write) bytes / seconds, median of reps."""
    a = torch.ones(mbytes * 2**20 // 4)
    b = torch.empty_like(a)
    times = []
    for i in range(reps + 1):
        t = time.perf_counter()
        b.copy_(a)
        if i:
            times.append(time.perf_counter() - t)
    return 2 * a.numel() * 4 / statistics.median(times) / 1e9


@dataclass
class Entry:
    arch: str
    n_experts: int | None
    match: str | None
    dtype: str
    batch_size: int
    step_s: float
    flops_train_per_token: float
    bound_s: float
    tokens_per_s: float
    gflops: float  # achieved: flops_train_per_token * batch / step_s
    flop_ratio_vs_topk: float  # theoretical: topk's training FLOPs / this entry's (train.saes.flops.algorithmic_cost)
    compiled: bool  # torch.compile (--compile)


# The variants (docs/benchmarks.md): constructor arguments beside d. AuxK entries run
# with one latent in ten marked dead (`DEAD_EVERY`), so that its extra work is timed; their bound counts
# only the SAE's own formula (AuxK's work depends on how many latents are dead).
VARIANTS = {
    "batchtopk": dict(arch="batchtopk", width=WIDTH, k=K, theta_decay=0.99),
    "jumprelu": dict(arch="jumprelu", width=WIDTH, l0_coeff=0.003, warmup_frac=0.05, bandwidth=0.01,
                     threshold_init=0.03),
    "topk_auxk": dict(arch="topk", width=WIDTH, k=K, aux_k=512, aux_coeff=1 / 32),
    "switch_auxk": dict(arch="switch", n_experts=16, expert_width=WIDTH // 16, k=K, alpha=SWITCH_ALPHA, aux_k=512,
                        aux_coeff=1 / 32),
    "switch_top2": dict(arch="switch", n_experts=16, expert_width=WIDTH // 16, k=K, alpha=SWITCH_ALPHA,
                        active_experts=2),
    "switch_shared": dict(arch="switch", n_experts=16, expert_width=(WIDTH - 2048) // 16, k=K, alpha=SWITCH_ALPHA,
                          shared_width=2048, shared_k=8),
    "switch_bias": dict(arch="switch", n_experts=16, expert_width=WIDTH // 16, k=K, alpha=SWITCH_ALPHA,
                        balance="bias", bias_rate=0.001),
    "switch_top2_global": dict(arch="switch", n_experts=16, expert_width=WIDTH // 16, k=K, alpha=SWITCH_ALPHA,
                               active_experts=2, routing="global"),
    "matryoshka": dict(arch="matryoshka", width=WIDTH, k=K, theta_decay=0.99),
    "matryoshka_switch": dict(arch="matryoshka_switch", n_experts=16, expert_width=WIDTH // 16, k=K,
                              alpha=SWITCH_ALPHA),
}
DEAD_EVERY = 10


def build_entry(arch: str, n: int | None, match: str | None) -> tuple[SAE, float, int]:
    """(module, training FLOPs per token as implemented, decoder parameters)."""
    if arch == "topk":
        sae = build("topk", d=D, width=WIDTH, k=K)
        return sae, sae_cost(sae).train, WIDTH * D
    if arch in VARIANTS:
        kwargs = dict(VARIANTS[arch])
        sae = build(kwargs.pop("arch"), d=D, **kwargs)
        if getattr(sae, "aux_k", 0):
            sae.dead = torch.arange(sae.n_latents) % DEAD_EVERY == 0
        return sae, sae_cost(sae).train, sae.n_latents * D
    e = WIDTH // n if match == "width" else WIDTH
    if arch == "switch":
        sae = SwitchSAE(d=D, n_experts=n, expert_width=e, k=K, alpha=SWITCH_ALPHA)
        return sae, sae_cost(sae).train, n * e * D
    # the reference: plain autograd through the full-width encoder, forward and backward, on every token
    sae = SwitchReference(d=D, n_experts=n, expert_width=e, k=K, alpha=SWITCH_ALPHA)
    return sae, sae_cost(sae, sparse_backward=False).train + 6 * D * (n * e - e), n * e * D


def bound(sae: SAE, flops_per_token: float, dec_params: int, peak: float, bw: float) -> float:
    """Roofline lower bound in seconds of one training step (module docstring)."""
    params = sum(p.numel() for p in sae.parameters())
    io = BATCH * D * 4 * 3 + BATCH * K * 12  # x in, reconstruction out and its gradient, codes
    compute = max(BATCH * flops_per_token / (peak * 1e9), (params * 4 + io) / (bw * 1e9))
    memory_only = (28 * params + 4 * params + 16 * dec_params) / (bw * 1e9)  # Adam, clip, constraint
    return compute + memory_only


def time_steps(sae: SAE, steps: int, dtype: torch.dtype, compile: bool = False,
               device: str | torch.device = "cpu") -> float:
    """Median seconds of full training steps after warm-up (one step, two with `compile`), on `device`
    (CUDA steps are timed to completion: synchronised before and after)."""
    device = torch.device(device)
    torch.manual_seed(0)
    x = (torch.randn(BATCH, D) * 10).to(device)
    sae = sae.to(device)
    sae.init_from_batch(x[:1024])
    params = list(sae.parameters())
    opt = make_optimizer(params, 1e-4, (0.9, 0.999))
    model = torch.compile(sae) if compile else sae
    warmup = 2 if compile else 1
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(steps + warmup):
        sync()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(x).losses["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        apply_update(sae, opt, params, 1.0)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


# The loss check's SAEs on the demo store (d 576): TopK, and a width-matched Switch whose experts
# (e 576, k 32: e / k 18) run the sparse kernels, which compute in bf16 under autocast.
LOSS_CHECK = {"topk": ["model=topk", "model.width=2304", "model.k=32"],
              "switch": ["model=switch", "model.n_experts=4", "model.width=2304", "model.k=32"]}
LOSS_CHECK_SEEDS = (0, 1, 2)


def bf16_loss_check(steps: int = 200) -> list[dict] | None:
    """Each `LOSS_CHECK` SAE trained with the real trainer on the demo store (batch 1024, `steps`
    steps) in fp32 and in bf16 autocast, once per seed of LOSS_CHECK_SEEDS: the final training loss
    and the final held-out MSE (validation.jsonl) per run, and the relative bf16 - fp32 difference of
    their means over the seeds. Several seeds because a Switch's trajectory forks wherever a token's
    expert flips: one seed's difference says little. None when the store is missing."""
    import tempfile

    from harvest.store import is_store
    from train.config import TrainConfig
    from train.loop import train
    from train.run_dir import RunDir

    if not is_store(compose_app("train", []).data.store):
        return None
    rows = []
    for arch, model in LOSS_CHECK.items():
        runs: dict[str, dict[str, list[float]]] = {}
        for dtype in ("float32", "bfloat16"):
            runs[dtype] = {"loss": [], "heldout_mse": [], "seconds": []}
            for seed in LOSS_CHECK_SEEDS:
                overrides = [f"budget=steps:{steps}", "batch_size=1024", *model, f"dtype={dtype}", f"seed={seed}",
                             "progress=false", f"log_every={steps}", "device=cpu"]
                with tempfile.TemporaryDirectory() as tmp:
                    t = time.perf_counter()
                    train(TrainConfig.from_omegaconf(compose_app("train", overrides)), Path(tmp))
                    runs[dtype]["seconds"].append(time.perf_counter() - t)
                    run = RunDir(tmp)
                    runs[dtype]["loss"].append(run.read_metrics()[-1]["loss"])
                    runs[dtype]["heldout_mse"].append(run.read_validation()[-1]["mse"])
        diff = {key: statistics.mean(runs["bfloat16"][key]) / statistics.mean(runs["float32"][key]) - 1
                for key in ("loss", "heldout_mse")}
        rows.append({"arch": "bf16_loss_check", "sae": arch, "model": model, "steps": steps, "batch_size": 1024,
                     "seeds": list(LOSS_CHECK_SEEDS), "runs": runs, "rel_diff_loss": diff["loss"],
                     "rel_diff_heldout_mse": diff["heldout_mse"]})
    return rows


def _floats(values: list[float]) -> str:
    return "/".join(f"{v:.0f}" for v in values)


def side_by_side(entries: list[Entry]) -> None:
    """Each entry measured in both dtypes: step time and step / bound in each, and TopK / Switch N 16 in each."""
    by = {(e.arch, e.n_experts, e.match, e.dtype): e for e in entries}
    print(f"\n{'entry':<28}{'fp32 s':>9}{'bf16 s':>9}{'fp32/bf16':>10}{'fp32 step/bound':>17}{'bf16 step/bound':>17}")
    for (arch, n, match, dtype), e32 in by.items():
        e16 = by.get((arch, n, match, "bfloat16"))
        if dtype != "float32" or e16 is None:
            continue
        name = arch + (f" N={n} {match}" if n else "")
        print(f"{name:<28}{e32.step_s:>9.3f}{e16.step_s:>9.3f}{e32.step_s / e16.step_s:>10.2f}"
              f"{e32.step_s / e32.bound_s:>17.1f}{e16.step_s / e16.bound_s:>17.1f}")
    for dtype in ("float32", "bfloat16"):
        t, s = by.get(("topk", None, None, dtype)), by.get(("switch", 16, "width", dtype))
        if t and s:
            print(f"topk / switch N=16 width-matched in {dtype}: {t.step_s / s.step_s:.2f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per entry (after warm-up)")
    parser.add_argument("--quick", action="store_true", help="only topk, switch N=16 and the reference, fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile every entry's module")
    parser.add_argument("--variants", action="store_true", help="only topk, switch N=16 and the variants, fp32")
    parser.add_argument("--no-loss-check", action="store_true", help="skip the bf16 loss check")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench" / "train.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    peak32, peak16, bw = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16, reps=1), bandwidth_gbps()
    peaks = {torch.float32: peak32, torch.bfloat16: peak16}
    print(f"matmul peak fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s; copy bandwidth {bw:.1f} GB/s "
          f"({torch.get_num_threads()} threads)")
    fp32, bf16 = torch.float32, torch.bfloat16
    grid = [("topk", None, None, fp32)] + [("switch", n, "width", fp32) for n in (4, 8, 16, 32, 64)]
    grid += [("switch", n, "flops", fp32) for n in (2, 4, 8)] + [("switch_reference", 16, "width", fp32)]
    # every TopK and Switch entry in both dtypes, side by side (the reference: fp32 only)
    grid = [g for base in grid for g in ([base] if base[0] == "switch_reference" else [base, (*base[:3], bf16)])]
    grid += [(name, None, None, fp32) for name in VARIANTS]
    if args.variants:
        grid = [("topk", None, None, fp32), ("switch", 16, "width", fp32)] + [(v, None, None, fp32) for v in VARIANTS]
    if args.quick:
        grid = [g for g in grid if (g[0] == "topk" or g[1] == 16) and g[3] == fp32]
    topk_flops = algorithmic_cost(build("topk", d=D, width=WIDTH, k=K)).train
    entries = []
    print(f"{'entry':<32}{'step s':>9}{'tok/s':>9}{'GFLOP/s':>9}{'bound s':>9}{'step/bound':>11}{'FLOP ratio':>11}")
    for arch, n, match, dtype in grid:
        sae, flops, dec = build_entry(arch, n, match)
        step = time_steps(sae, args.steps, dtype, args.compile)
        dt = str(dtype).removeprefix("torch.")
        theory = flops if arch == "switch_reference" else algorithmic_cost(sae).train  # the reference: its own algorithm
        e = Entry(arch, n, match, dt, BATCH, step, flops, bound(sae, flops, dec, peaks[dtype], bw), BATCH / step,
                  flops * BATCH / step / 1e9, topk_flops / theory, args.compile)
        entries.append(e)
        name = arch + (f" N={n} {match}" if n else "") + ("" if dtype == fp32 else f" {dt}")
        print(f"{name:<32}{e.step_s:>9.3f}{e.tokens_per_s:>9.0f}{e.gflops:>9.0f}{e.bound_s:>9.3f}"
              f"{e.step_s / e.bound_s:>11.1f}{e.flop_ratio_vs_topk:>11.1f}", flush=True)
        del sae
    rows = [asdict(e) for e in entries] + [
        {"arch": "matmul_peak", "dtype": "float32", "gflops": peak32},
        {"arch": "matmul_peak", "dtype": "bfloat16", "gflops": peak16},
        {"arch": "mem_bandwidth", "gbps": bw}]
    by = {(e.arch, e.n_experts, e.match, e.dtype): e.step_s for e in entries}
    topk = by[("topk", None, None, "float32")]
    for n in (16, 64):
        if ("switch", n, "width", "float32") in by:
            print(f"topk / switch N={n} width-matched step time: {topk / by[('switch', n, 'width', 'float32')]:.2f}x")
    if ("switch_reference", 16, "width", "float32") in by:
        ratio = by[("switch_reference", 16, "width", "float32")] / by[("switch", 16, "width", "float32")]
        print(f"reference / switch N=16: {ratio:.2f}x")
    if ("switch", 8, "flops", "float32") in by:
        print(f"switch N=8 flop-matched / topk: {by[('switch', 8, 'flops', 'float32')] / topk:.2f}x")
    if ("topk", None, None, "bfloat16") in by:
        print(f"topk fp32 / bf16 step time: {topk / by[('topk', None, None, 'bfloat16')]:.2f}x")
        side_by_side(entries)
    if not (args.quick or args.variants or args.no_loss_check):
        checks = bf16_loss_check()
        if checks is None:
            print("bf16 loss check skipped: no demo store (make demo, or make harvest, builds it)")
        for check in checks or []:
            rows.append(check)
            f32, b16 = check["runs"]["float32"], check["runs"]["bfloat16"]
            print(f"bf16 loss check ({' '.join(check['model'])}, 200 steps x 1024 demo tokens, seeds "
                  f"{check['seeds']}): final loss fp32 {_floats(f32['loss'])}, bf16 {_floats(b16['loss'])}: means "
                  f"{check['rel_diff_loss']:+.2%} apart; held-out MSE fp32 {_floats(f32['heldout_mse'])}, bf16 "
                  f"{_floats(b16['heldout_mse'])}: means {check['rel_diff_heldout_mse']:+.2%} apart")
    write_results(args.out, rows)


if __name__ == "__main__":
    main()
