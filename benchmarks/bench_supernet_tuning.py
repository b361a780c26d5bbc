"""Does sandwich-rule supernet LoRA tuning make supernet perplexity rank sub-networks the way recovery does?

On the embedded SmolLM2 (importance-sorted exactly as `packager search` sorts it), K sub-networks are
drawn from the uniform llama.cpp search space (2-3 KV groups), spread over 15-55% fewer parameters (formats simulated).
For each: held-out supernet perplexity before tuning, after `tune_supernet` (adapter merged), and after
an individual short QAT recovery of the extracted sub-network from the untuned sorted base (what `pack`
ships). Prints the table, Spearman rank correlations of each supernet ranking with the after-recovery
ranking, which candidate each ranking would pick under a perplexity floor, and wall times.

    .venv/bin/python benchmarks/bench_supernet_tuning.py [--k 8] [--tune-steps 80] [--recover-steps 40] \
        [--json out.json] [--work DIR]

Training text is the calibration split; early stopping of recovery uses a quarter of the evaluation
blocks and every perplexity in the table is on the other three quarters (never trained or stopped on).
With --json the numbers are saved after every phase and candidate; a rerun with the same file keeps
every phase whose settings did not change (the adapter is kept in --work).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr

from search.evaluate import perplexity
from search.importance import sort_model
from search.recovery import RecoveryConfig, recover
from search.space import SearchSpace, SpaceConfig
from search.supernet_tuning import (
    SupernetTuningConfig,
    load_supernet_adapter,
    tune_supernet,
    tuning_summary,
)
from search.text import token_blocks
from subnet.extract import extract
from subnet.loading import load_model
from subnet.quant import fake_quantize_model
from subnet.spec import SubnetSpec
from subnet.supernet import Supernet


def draw_candidates(space: SearchSpace, k: int, lo: float, hi: float, seed: int) -> list[SubnetSpec]:
    """``k`` random specs of ``space``, one per equal-width bin of parameter reduction in [lo, hi]."""
    rng = random.Random(seed)
    base = SubnetSpec.full(space.arch).num_params()
    bins: list[list[SubnetSpec]] = [[] for _ in range(k)]
    for _ in range(4000):
        spec = space.decode([rng.randrange(n) for n in space.sizes])
        cut = 1 - spec.num_params() / base
        if lo <= cut < hi:
            bins[min(k - 1, int((cut - lo) / (hi - lo) * k))].append(spec)
    return [rng.choice(b) for b in bins if b]


def describe(spec: SubnetSpec) -> str:
    ly = spec.layers[0]
    return (f"{len(spec.layers)}L {ly.heads}q/{ly.kv_heads}kv MLP{ly.mlp} "
            f"{ly.formats['q_proj']}/{ly.formats['gate_proj']} emb {spec.embed_format}")  # fmt: skip


def pick(ppls: list[float], params: list[float], quantile: float) -> int:
    """Index of the smallest candidate whose perplexity is within the ``quantile`` of its own ranking."""
    floor = sorted(ppls)[max(0, round(quantile * len(ppls)) - 1)]
    ok = [i for i, p in enumerate(ppls) if p <= floor]
    return min(ok, key=lambda i: params[i])


# what each phase's numbers depend on: a rerun keeps a phase whose settings are unchanged
PHASES = {
    "candidates": (("k", "min_cut", "max_cut", "eval_blocks", "seed"), ("supernet ppl before tuning",), ()),
    "tuning": (("tune_steps", "tune_seq_len", "tune_batch", "tune_lr", "calib_blocks"),
               ("supernet tuning", "supernet ppl after tuning"), ("ppl_tuned",)),
    "recovery": (("recover_steps", "calib_blocks"), ("recoveries",), ("ppl_recovered", "recover_s")),
}


def resume(old: dict, settings: dict) -> dict:
    """``old`` saved numbers, less the phases whose settings differ from ``settings``."""
    fresh = {"settings": settings, "wall_s": {}, "rows": []}
    same = {ph: all(old.get("settings", {}).get(k) == settings[k] for k in keys) for ph, (keys, _, _) in PHASES.items()}
    if not same["candidates"]:
        return fresh
    for ph, (_, walls, fields) in PHASES.items():
        if not same[ph]:
            for w in walls:
                old["wall_s"].pop(w, None)
            for r in old["rows"]:
                for f in fields:
                    r.pop(f, None)
            if ph == "tuning":
                old.pop("base_ppl_tuned", None)
    old["settings"] = settings
    return old


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=8, help="sub-networks")
    ap.add_argument("--min-cut", type=float, default=0.15)
    ap.add_argument("--max-cut", type=float, default=0.55)
    ap.add_argument("--tune-steps", type=int, default=80)
    ap.add_argument("--tune-seq-len", type=int, default=128)
    ap.add_argument("--tune-batch", type=int, default=2)
    ap.add_argument("--tune-lr", type=float, default=SupernetTuningConfig.lr)
    ap.add_argument("--recover-steps", type=int, default=40)
    ap.add_argument("--eval-blocks", type=int, default=24, help="x 256 held-out tokens: 1/4 early stopping, 3/4 table")
    ap.add_argument("--calib-blocks", type=int, default=64, help="x 256 calibration tokens to train on")
    ap.add_argument("--floor-quantile", type=float, default=0.5,
                    help="a ranking's floor admits this fraction of candidates; it picks the smallest admitted")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="save (and resume from) the numbers here")
    ap.add_argument("--work", default="out/bench_supernet_tuning", help="folder for the adapter")
    args = ap.parse_args()
    console = Console()
    torch.set_num_threads(2)
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "work")}
    state = {"settings": settings, "wall_s": {}, "rows": []}
    if args.json and Path(args.json).is_file():
        state = resume(json.loads(Path(args.json).read_text()), settings)
        console.print(f"resuming from {args.json}: done {', '.join(state['wall_s']) or 'nothing'}")

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(state, indent=1))

    def timed(phase: str, fn):
        if phase in state["wall_s"]:
            return
        t = time.perf_counter()
        fn()
        state["wall_s"][phase] = time.perf_counter() - t
        console.print(f"{phase}: {state['wall_s'][phase]:.0f} s")
        save()

    t = time.perf_counter()
    lm = load_model(None)
    model, tok, arch = lm.model, lm.tokenizer, lm.arch
    imp = sort_model(model, token_blocks(tok, "calibration", 256, 16))  # as `packager search` sorts
    console.print(f"load + importance sort: {time.perf_counter() - t:.0f} s")
    sorted_state = {k: v.clone() for k, v in model.state_dict().items()}
    # one KV group left is catastrophic on SmolLM2 (ppl > 10^4 before and after anything) and would make any
    # ranking look right: candidates keep 2 or 3 of its 3 KV groups
    space = SearchSpace(arch, "llama.cpp", SpaceConfig(mode="uniform", kv_heads=[3, 2]), imp.layer_rank)
    specs = draw_candidates(space, args.k, args.min_cut, args.max_cut, args.seed)
    base_params = SubnetSpec.full(arch).num_params()
    calib = token_blocks(tok, "calibration", 256, args.calib_blocks)
    held = token_blocks(tok, "evaluation", 256, args.eval_blocks)
    val, test = held[0::4], torch.cat([held[i::4] for i in (1, 2, 3)])
    if not state["rows"]:
        state["rows"] = [{"spec": s.to_dict(), "shape": describe(s), "params_m": s.num_params() / 1e6,
                          "cut": 1 - s.num_params() / base_params} for s in specs]  # fmt: skip
    rows = state["rows"]
    specs = [SubnetSpec.from_dict(r["spec"]) for r in rows]
    net = Supernet(model)

    def supernet_ppl(key: str):
        def fn():
            state["base_" + key] = net.activate(SubnetSpec.full(arch)).perplexity(test)
            for r, s in zip(rows, specs):
                r[key] = net.activate(s).perplexity(test)

        return fn

    timed("supernet ppl before tuning", supernet_ppl("ppl_before"))
    adapter = Path(args.work) / "adapter"
    cfg = SupernetTuningConfig(steps=args.tune_steps, seq_len=args.tune_seq_len, batch_size=args.tune_batch,
                               lr=args.tune_lr, seed=args.seed)  # fmt: skip
    timed("supernet tuning", lambda: tune_supernet(model, space, calib, cfg, out_dir=adapter, force=True))
    console.print(tuning_summary(adapter))
    load_supernet_adapter(model, adapter)
    timed("supernet ppl after tuning", supernet_ppl("ppl_tuned"))
    model.load_state_dict(sorted_state)  # recovery starts from the untuned sorted base, as `pack` does
    rcfg = RecoveryConfig(max_steps=args.recover_steps, qat=True, eval_every=max(1, args.recover_steps // 2),
                          seed=args.seed)  # fmt: skip
    for i, (r, s) in enumerate(zip(rows, specs)):
        if "ppl_recovered" in r:
            continue
        res = recover(model, extract(model, s), s, calib, val, rcfg)
        r["ppl_recovered"] = perplexity(fake_quantize_model(res.model, s, inplace=True), test)
        r.update(recover_s=res.wall_s, recover_steps=res.steps_run, stopped=res.stopped_reason)
        console.print(f"candidate {i}: {r['shape']}: recovered ppl {r['ppl_recovered']:.2f} ({res.wall_s:.0f} s)")
        save()
    state["wall_s"]["recoveries"] = sum(r["recover_s"] for r in rows)

    before, tuned, rec = ([r[k] for r in rows] for k in ("ppl_before", "ppl_tuned", "ppl_recovered"))
    params = [r["params_m"] for r in rows]
    state["spearman"] = {"before_vs_recovered": float(spearmanr(before, rec).statistic),
                         "tuned_vs_recovered": float(spearmanr(tuned, rec).statistic)}  # fmt: skip
    picks = {name: pick(v, params, args.floor_quantile) for name, v in
             (("before tuning", before), ("after tuning", tuned), ("after recovery", rec))}  # fmt: skip
    state["picks"] = picks
    save()

    table = Table(title=f"SmolLM2-135M sorted; uniform llama.cpp space; supernet tuning {args.tune_steps} steps "
                        f"({args.tune_batch}x{args.tune_seq_len}), recovery {args.recover_steps} QAT steps; "
                        f"held-out ppl on {test.numel()} tokens, formats simulated")  # fmt: skip
    for col in ("#", "sub-network", "params M", "cut", "ppl before", "ppl tuned", "ppl recovered", "recover s"):
        table.add_column(col)
    table.add_row("base", "full, f32", f"{base_params / 1e6:.1f}", "0%", f"{state['base_ppl_before']:.2f}",
                  f"{state['base_ppl_tuned']:.2f}", "", "")  # fmt: skip
    for i, r in enumerate(rows):
        table.add_row(str(i), r["shape"], f"{r['params_m']:.1f}", f"{r['cut']:.0%}", f"{r['ppl_before']:.2f}",
                      f"{r['ppl_tuned']:.2f}", f"{r['ppl_recovered']:.2f}", f"{r['recover_s']:.0f}")  # fmt: skip
    console.print(table)
    sp = state["spearman"]
    console.print(f"Spearman rho vs after-recovery ranking: before tuning {sp['before_vs_recovered']:.3f}, "
                  f"after tuning {sp['tuned_vs_recovered']:.3f}")  # fmt: skip
    truth = picks["after recovery"]
    for name in ("before tuning", "after tuning"):
        i = picks[name]
        verdict = "same as" if i == truth else f"differs from (recovered ppl {rec[i]:.2f} vs {rec[truth]:.2f})"
        console.print(f"smallest within the best {args.floor_quantile:.0%} by {name}: #{i}, {verdict} "
                      f"the after-recovery pick #{truth}")  # fmt: skip
    console.print("wall s: " + ", ".join(f"{k} {v:.0f}" for k, v in state["wall_s"].items())
                  + f"; torch threads {torch.get_num_threads()}")  # fmt: skip


if __name__ == "__main__":
    main()
