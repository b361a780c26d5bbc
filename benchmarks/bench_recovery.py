"""Recovery fine-tuning on SmolLM2: held-out perplexity of three pruned sub-networks before and after
LoRA + KD recovery, next to the base, and the wall time of each recovery on this machine.

    .venv/bin/python benchmarks/bench_recovery.py [--steps 150] [--batch 4] [--seq-len 256] [--json out.json]

The base is importance-sorted (search.importance.sort_model, magnitude units + cosine blocks) on
calibration text; sub-networks keep the top-k blocks and prefix widths. Recovery trains on the
calibration split, early-stops on a validation slice of the evaluation split, and the table reports
perplexity on the rest of the evaluation split (never seen by training or early stopping).
"""

from __future__ import annotations

import argparse
import json
import time

from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from safetensors.torch import load_file, save_file

from search.evaluate import perplexity

from search.importance import Importance, sort_model
from search.recovery import RecoveryConfig, recover
from search.text import token_blocks
from subnet.arch import arch_of
from subnet.extract import extract
from subnet.loading import load_model
from subnet.spec import SubnetSpec

# (target reduction, kept blocks, KV heads, MLP width): shapes chosen to land near each target
SHAPES = [(0.25, 27, 3, 1024), (0.40, 24, 2, 896), (0.55, 18, 2, 640)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=RecoveryConfig.max_steps)
    ap.add_argument("--batch", type=int, default=RecoveryConfig.batch_size)
    ap.add_argument("--seq-len", type=int, default=RecoveryConfig.seq_len)
    ap.add_argument("--lr", type=float, default=RecoveryConfig.lr)
    ap.add_argument("--rank", type=int, default=RecoveryConfig.rank)
    ap.add_argument("--eval-every", type=int, default=RecoveryConfig.eval_every)
    ap.add_argument("--eval-blocks", type=int, default=32, help="held-out blocks: 1/4 for early stopping, rest for the table")
    ap.add_argument("--only", type=float, nargs="*", help="run only these target reductions (e.g. 0.25)")
    ap.add_argument("--json", help="write the rows here as JSON")
    ap.add_argument("--sorted-cache", help="folder to keep the importance-sorted base in (reused when present)")
    args = ap.parse_args()
    console = Console()

    lm = load_model(None)
    model, tok = lm.model.float().eval(), lm.tokenizer
    L = args.seq_len
    t = time.perf_counter()
    cache = Path(args.sorted_cache) if args.sorted_cache else None
    if cache and (cache / "importance.json").is_file():
        model.load_state_dict(load_file(str(cache / "model.safetensors")), strict=False)
        importance = Importance.load(cache / "importance.json")
    else:
        importance = sort_model(model, token_blocks(tok, "calibration", L, 16))
        if cache:
            cache.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
                      str(cache / "model.safetensors"))  # fmt: skip
            importance.save(cache / "importance.json")
    console.print(f"importance sort: {time.perf_counter() - t:.0f} s")
    n_calib = max(RecoveryConfig.min_calib_windows, args.steps * args.batch)
    calib = token_blocks(tok, "calibration", L, n_calib)
    held = token_blocks(tok, "evaluation", L, args.eval_blocks)
    val, test = held[0::4], torch.cat([held[i::4] for i in (1, 2, 3)])
    arch = arch_of(model.config)
    base_params = SubnetSpec.full(arch).num_params()
    ppl_base = perplexity(model, test)
    config = RecoveryConfig(max_steps=args.steps, batch_size=args.batch, seq_len=L, lr=args.lr, rank=args.rank,
                            alpha=2 * args.rank, eval_every=args.eval_every)  # fmt: skip

    rows = []
    for target, depth, kv, mlp in SHAPES:
        if args.only and not any(abs(target - o) < 1e-6 for o in args.only):
            continue
        spec = SubnetSpec.uniform(arch, layers=importance.keep_layers(depth), kv_heads=kv, mlp=mlp)
        sub = extract(model, spec)
        before = perplexity(sub, test)
        res = recover(model, sub, spec, calib, val, config)
        after = perplexity(res.model, test)
        closed = (before - after) / (before - ppl_base)
        rows.append({
            "target": target, "reduction": 1 - spec.num_params() / base_params, "params_m": spec.num_params() / 1e6,
            "shape": f"{depth} blocks, {kv * arch.group_size}q/{kv}kv heads, MLP {mlp}",
            "ppl_base": ppl_base, "ppl_before": before, "ppl_after": after, "gap_closed": closed,
            "steps": res.steps_run, "best_step": res.best_step, "stopped": res.stopped_reason, "wall_s": res.wall_s,
            "s_per_step": res.wall_s / max(1, res.steps_run), "history": res.history,
        })  # fmt: skip
        console.print(rows[-1])
        del sub, res

    table = Table(title=f"recovery on SmolLM2-135M (LoRA r={config.rank}, KD T={config.temperature}, "
                        f"{config.batch_size}x{L} tokens/step, lr {config.lr}; held-out ppl on {test.numel()} tokens)")  # fmt: skip
    for col in ("params cut", "shape", "base ppl", "before", "after", "gap closed", "steps (best)", "stop", "wall s"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            f"{r['reduction']:.1%}", r["shape"], f"{r['ppl_base']:.2f}", f"{r['ppl_before']:.2f}",
            f"{r['ppl_after']:.2f}", f"{r['gap_closed']:.0%}", f"{r['steps']} ({r['best_step']})", r["stopped"],
            f"{r['wall_s']:.0f}",
        )  # fmt: skip
    console.print(table)
    console.print(f"threads: {torch.get_num_threads()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
