"""Training-step throughput (cells/s) and peak memory of the PerturbDiff step at the authors' size.

One step = the stochastic objective (self-conditioning and guidance-dropout coins alternate over
the timed steps, as in training) + backward + grad clipping + AdamW, as `perturbdiff.train` runs it
(`clip_and_step`, fused AdamW, `keep_freed_memory` on CPU). Each case runs in a fresh subprocess so
its peak RSS is its own. Every case is also timed with the energy term computed by plain torch
(torch.cdist, `loss = naive`) to show the loss's share of the step. The phase columns split the
step into the objective (self-conditioning pass + forward + loss), backward, and clip + AdamW.

    python benchmarks/bench_train_step.py            # the cases recorded in results/train.md
    python benchmarks/bench_train_step.py --quick    # tiny smoke version
    python benchmarks/bench_train_step.py --device cuda --bf16   # on a GPU (peak = CUDA allocator)
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

CASES = [  # (genes, set size, sets per batch)
    (2000, 64, 2), (18080, 64, 1), (2000, 256, 2),
]


def naive_energy(x, y, weights=None):
    """geomloss-style half energy distance with torch.cdist (the authors' cost model)."""
    def mean_dist(a, b):
        return torch.cdist(a, b).mean((1, 2))
    return mean_dist(x, y) - 0.5 * mean_dist(x, x) - 0.5 * mean_dist(y, y)


def run_case(genes, set_size, sets, width, depth, heads, steps, naive, bf16, threads, compile=False,
             keep_memory=True, device="cpu"):
    from perturbdiff import diffusion as D
    from perturbdiff.diffusion import GaussianDiffusion, LossConfig
    from perturbdiff.model import PerturbDiffModel
    from perturbdiff.heap import keep_freed_memory
    from perturbdiff.train import clip_and_step, make_optimizer
    from perturbdiff.config import DEFAULTS

    torch.set_num_threads(threads)
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    if keep_memory and not on_gpu:
        keep_freed_memory()
    if naive:
        D.set_discrepancy = lambda pred, target, w, cfg: naive_energy(target, pred)
    vocab = {"perturbation": [f"p{i}" for i in range(50)], "context": ["a", "b"], "batch": ["b0"]}
    torch.manual_seed(0)
    model = PerturbDiffModel(genes, vocab, width=width, depth=depth, heads=heads).to(device)
    opt = make_optimizer(model, DEFAULTS["optim"])
    params = [p for p in model.parameters() if p.requires_grad]
    net = model
    if compile:
        net = torch.compile(model)
    diff = GaussianDiffusion()
    cfg = LossConfig(exclude_padding=False)
    batch = {"x": torch.rand(sets, set_size, genes) * 0.3, "ctrl": torch.rand(sets, set_size, genes) * 0.3,
             "mask": torch.ones(sets, set_size, dtype=torch.bool), "pert": torch.zeros(sets, dtype=torch.long),
             "context": torch.zeros(sets, dtype=torch.long), "batch": torch.zeros(sets, dtype=torch.long)}
    batch = {k: v.to(device) for k, v in batch.items()}
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else None
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    coins = [(False, False), (True, False), (False, True), (True, True)]

    phases = [0.0, 0.0, 0.0]

    def step(i):
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        drop, sc = coins[i % 4]
        out = diff.training_losses(net, batch, cfg, torch.Generator(device).manual_seed(i), drop_cond=drop,
                                   self_cond=sc, drop_control=False, autocast=autocast)
        sync()
        t1 = time.perf_counter()
        out["loss"].backward()
        sync()
        t2 = time.perf_counter()
        clip_and_step(opt, params, 1.0)
        sync()
        t3 = time.perf_counter()
        for k, dt in enumerate((t1 - t0, t2 - t1, t3 - t2)):
            phases[k] += dt

    t0 = time.perf_counter()
    for i in range(4 if compile else 2):  # warm-up (compile: every coin combination once)
        step(i)
    warm = time.perf_counter() - t0
    phases[:] = [0.0, 0.0, 0.0]
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    sync()
    sec = (time.perf_counter() - t0) / steps
    total = sum(phases)
    peak = (torch.cuda.max_memory_allocated(device) if on_gpu
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"genes": genes, "set_size": set_size, "sets": sets, "naive_loss": naive, "bf16": bf16,
            "compile": compile, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "s_per_step": round(sec, 3), "cells_per_s": round(sets * set_size / sec, 1),
            "fwd_pct": round(100 * phases[0] / total), "bwd_pct": round(100 * phases[1] / total),
            "opt_pct": round(100 * phases[2] / total), "warmup_s": round(warm, 1),
            "peak_GiB": round(peak / 2**30, 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model and sizes (smoke test)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per case (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="also time bf16 autocast")
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile (compile time = the warmup_s column)")
    ap.add_argument("--no-keep-memory", action="store_true",
                    help="leave glibc's defaults (freed blocks go back to the system)")
    ap.add_argument("--cases", help="G,S,B;G,S,B... instead of the recorded cases")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (peak memory: RSS on CPU, allocator on GPU)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: JSON args of one case
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_case(**json.loads(args.one))))
        return
    size = dict(width=64, depth=2, heads=4) if args.quick else dict(width=512, depth=8, heads=8)
    cases = [(200, 16, 2)] if args.quick else CASES
    if args.cases:
        cases = [tuple(int(v) for v in c.split(",")) for c in args.cases.split(";")]
    jobs = []
    for genes, s, b in cases:
        base = dict(genes=genes, set_size=s, sets=b, naive=False, bf16=False,
                    keep_memory=not args.no_keep_memory, device=args.device)
        jobs += [base, {**base, "naive": True}]
        if args.bf16:
            jobs.append({**base, "bf16": True})
        if args.compile:
            jobs.append({**base, "compile": True})
    print(f"{'G':>6} {'S':>4} {'B':>2} {'loss':>6} {'variant':>8} {'params':>8} {'s/step':>7} {'cells/s':>8} "
          f"{'fwd%':>5} {'bwd%':>5} {'opt%':>5} {'peak':>8}")
    for job in jobs:
        spec = json.dumps({**job, **size, "steps": args.steps, "threads": args.threads})
        out = subprocess.run([sys.executable, __file__, "--one", spec], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        variant = "bf16" if r["bf16"] else f"compile({r['warmup_s']:.0f}s)" if r["compile"] else "fp32"
        print(f"{r['genes']:>6} {r['set_size']:>4} {r['sets']:>2} {'naive' if r['naive_loss'] else 'ops':>6} "
              f"{variant:>8} {r['params_M']:>7}M {r['s_per_step']:>7} {r['cells_per_s']:>8} "
              f"{r['fwd_pct']:>5} {r['bwd_pct']:>5} {r['opt_pct']:>5} {r['peak_GiB']:>6}GiB", flush=True)


if __name__ == "__main__":
    main()
