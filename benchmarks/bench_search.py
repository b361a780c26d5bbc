"""Search benchmark (issue 6): every strategy on the same problem, same budget, several seeds.

Embedded SmolLM2, laptop-cpu target (llama.cpp formats and its profile table), this machine. Prints
per strategy and seed: hypervolume, the best predicted decode latency at perplexity within 5% of the
base (and within 10% and 20%), and wall time; then the mean over seeds, and joint (NSGA-II/LINAS/differentiable) vs
sequential at equal accuracy. Writes a front plot per seed next to --out; finished (strategy, seed) runs
are kept in --out, so an interrupted benchmark continues where it stopped.

    .venv/bin/python benchmarks/bench_search.py --budget 200 --seeds 0 1 2 [--mode uniform]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from packager.cli import _search_problem
from search.problem import Budgets
from search.run import plot_front, run_search

STRATEGIES = ["nsga2", "linas", "random", "sequential", "differentiable"]
FLOORS = (0.05, 0.10, 0.20)  # perplexity increase over the base at which the fastest candidate is compared


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
    done_path = out / f"rows_{args.mode}_b{args.budget}_e{args.eval_blocks}.json"
    done = json.loads(done_path.read_text()) if done_path.exists() else {}  # finished (strategy, seed) runs
    for seed in args.seeds:
        results = {}
        for strategy in args.strategies:
            key = f"{strategy}/{seed}"
            if key in done:
                continue
            problem.cache.clear()
            problem.history.clear()
            problem.base_ppl = None
            res = run_search(problem, strategy, args.budget, seed, progress=False)
            results[strategy] = res
            best = {f: res.best_within(f) for f in FLOORS}
            done[key] = {"hv": res.hypervolume, "wall_s": res.wall_s, "base_ms": res.base.decode_ms, "base_ppl": res.base.ppl,
                         "best_ms": {str(f): b.decode_ms if b else None for f, b in best.items()}}  # fmt: skip
            done_path.write_text(json.dumps(done, indent=1))
            print(f"{strategy:14s} seed {seed}: HV {res.hypervolume:.4f}, best ms at ≤5/10/20% ppl "
                  + " / ".join(_ms(done[key]["best_ms"][str(f)]) for f in FLOORS)
                  + f" (base {res.base.ppl:.2f} @ {res.base.decode_ms:.3f} ms), {res.wall_s:.0f} s", flush=True)  # fmt: skip
        if results:
            plot_front(results, out / f"fronts_seed{seed}.png", f"SmolLM2 on laptop-cpu/llama.cpp, budget {args.budget}")

    print(f"\nSearch benchmark — SmolLM2-135M, laptop-cpu (llama.cpp formats), mode {args.mode}, "
          f"budget {args.budget} evaluations, seeds {args.seeds}, {args.eval_blocks * 255} eval tokens per candidate")
    floors = " | ".join(f"best ms @ ≤{f:.0%} ppl (speed-up)" for f in FLOORS)
    print(f"\n| strategy | hypervolume (mean ± sd) | {floors} | wall s (mean) |")
    print("|---|---|" + "---|" * len(FLOORS) + "---|")
    means = {}
    for s in args.strategies:
        r = [done[f"{s}/{seed}"] for seed in args.seeds if f"{s}/{seed}" in done]
        if not r:
            continue
        hv = [x["hv"] for x in r]
        means[s] = {f: _mean([x["best_ms"][str(f)] for x in r]) for f in FLOORS}
        sd = statistics.stdev(hv) if len(hv) > 1 else 0.0
        cells = " | ".join(f"{_ms(means[s][f])} ({r[0]['base_ms'] / means[s][f]:.2f}x)" if means[s][f] else "none"
                           for f in FLOORS)  # fmt: skip
        print(f"| {s} | {statistics.mean(hv):.4f} ± {sd:.4f} | {cells} | {statistics.mean(x['wall_s'] for x in r):.0f} |")
    if "sequential" in means:
        for s in ("nsga2", "linas", "differentiable"):
            if s in means:
                ratios = [f"{means['sequential'][f] / means[s][f]:.2f}x at ≤{f:.0%}" if means[s][f] and means["sequential"][f]
                          else f"n/a at ≤{f:.0%}" for f in FLOORS]  # fmt: skip
                print(f"{s} vs sequential, predicted decode speed at equal accuracy: {', '.join(ratios)}")


def _mean(values):
    """Mean of the seeds that found a candidate (None where none did)."""
    found = [v for v in values if v is not None]
    return statistics.mean(found) if found else None


def _ms(v) -> str:
    return f"{v:.3f}" if v is not None else "none"

if __name__ == "__main__":
    main()
