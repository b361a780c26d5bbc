"""Search benchmark (issue 6): every strategy on the same problem, same budget, several seeds.

Embedded SmolLM2, laptop-cpu target (llama.cpp formats and its profile table), this machine. Prints
per strategy and seed: hypervolume, the best predicted decode latency at perplexity within 5% of the
base, and wall time; then the mean over seeds, and joint (NSGA-II/LINAS/differentiable) vs
sequential at equal accuracy. Writes a front plot per seed next to --out.

    .venv/bin/python benchmarks/bench_search.py --budget 200 --seeds 0 1 2 [--mode uniform]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from packager.cli import _search_problem
from search.problem import Budgets
from search.run import plot_front, run_search

STRATEGIES = ["nsga2", "linas", "random", "sequential", "differentiable"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--strategies", nargs="+", default=STRATEGIES)
    ap.add_argument("--mode", default="uniform", choices=["uniform", "hetero"])
    ap.add_argument("--eval-blocks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="out/bench_search")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    problem = _search_problem(None, "laptop-cpu", None, args.mode, Budgets(), False, eval_blocks=args.eval_blocks)
    rows = []
    for seed in args.seeds:
        results = {}
        for strategy in args.strategies:
            problem.cache.clear()
            problem.history.clear()
            problem.base_ppl = None
            res = run_search(problem, strategy, args.budget, seed, progress=False)
            best = res.best_within(0.05)
            results[strategy] = res
            rows.append((strategy, seed, res.hypervolume, best.decode_ms if best else float("nan"),
                         best.ppl if best else float("nan"), res.base.decode_ms, res.base.ppl, res.wall_s))  # fmt: skip
            print(f"{strategy:14s} seed {seed}: HV {res.hypervolume:.4f}, best@5% {rows[-1][3]:.3f} ms "
                  f"(ppl {rows[-1][4]:.2f}; base {res.base.ppl:.2f} @ {res.base.decode_ms:.3f} ms), "
                  f"{res.wall_s:.0f} s", flush=True)  # fmt: skip
        plot_front(results, out / f"fronts_seed{seed}.png", f"SmolLM2 on laptop-cpu/llama.cpp, budget {args.budget}")

    print(f"\nSearch benchmark — SmolLM2-135M, laptop-cpu (llama.cpp formats), mode {args.mode}, "
          f"budget {args.budget} evaluations, seeds {args.seeds}, {args.eval_blocks * 255} eval tokens per candidate")
    print("\n| strategy | hypervolume (mean ± sd) | best decode ms @ ≤5% ppl (mean) | speed-up vs base | wall s (mean) |")
    print("|---|---|---|---|---|")
    means = {}
    for s in args.strategies:
        r = [row for row in rows if row[0] == s]
        hv = [x[2] for x in r]
        lat = [x[3] for x in r]
        means[s] = statistics.mean(lat)
        sd = statistics.stdev(hv) if len(hv) > 1 else 0.0
        print(f"| {s} | {statistics.mean(hv):.4f} ± {sd:.4f} | {means[s]:.3f} | {r[0][5] / means[s]:.2f}x | "
              f"{statistics.mean(x[7] for x in r):.0f} |")  # fmt: skip
    if "sequential" in means:
        for s in ("nsga2", "linas", "differentiable"):
            if s in means:
                print(f"{s} vs sequential at ≤5% perplexity: {means['sequential'] / means[s]:.2f}x predicted decode speed")


if __name__ == "__main__":
    main()
