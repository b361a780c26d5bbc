"""Which wide blocks to narrow next, after recovery: the pre-recovery rounding ranking against each
block's cost measured on the recovered winner.

The search narrows the blocks least sensitive to rounding first (``quant_rank``, measured on the
model before any recovery). This reads a finished pack's work folder, takes its recovered winner,
and asks what narrowing each of the winner's still-wide blocks would cost now: the floor-check
perplexity with that one block at the narrow formats, no further training. It then builds the
``--narrow-more`` block set both ways (the next blocks of ``quant_rank``, and the blocks cheapest
after recovery) and recovers each for ``--steps`` steps, warm-started from the recovered winner (the
runtime recoveries' warm start: GPTQ's compensation for the newly rounded linears swapped in) or,
with ``--start scratch``, from the base as the pack's own recoveries start (GPTQ-rounded), on the
pack's training text or ``--recover-blocks`` of it. It reports the floor check before and after, its
limit, and the llama.cpp size. ``--only`` recovers one of the two block sets.

    .venv/bin/python benchmarks/bench_post_recovery_order.py --bundle out/smollm2-laptop-cpu \\
        [--narrow-more 4] [--steps 60] [--start warm|scratch] [--recover-blocks 640] [--patience-share 1] [--only post]

Torch only (no timing): other load slows it but does not change its figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.progress import track  # noqa: E402
from rich.table import Table  # noqa: E402

from packager.pack import Pack, PackConfig, cost_fn, narrowed_blocks  # noqa: E402
from search.recovery import RecoveryConfig, recover  # noqa: E402
from subnet.spec import SubnetSpec  # noqa: E402

console = Console()


def narrowed(spec: SubnetSpec, blocks: set[int], like: int) -> SubnetSpec:
    """``spec`` with ``blocks`` in the formats of block ``like`` (a narrow one)."""
    out = SubnetSpec.from_dict(spec.to_dict())
    fmts = dict(next(ly.formats for ly in out.layers if ly.index == like))
    for ly in out.layers:
        if ly.index in blocks:
            ly.formats = dict(fmts)
    return out.validate()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True, help="bundle folder of a finished `packager pack`")
    ap.add_argument("--narrow-more", type=int, default=4, help="how many of the winner's wide blocks to narrow")
    ap.add_argument("--steps", type=int, default=60, help="recovery steps for each block set")
    ap.add_argument("--start", choices=("warm", "scratch"), default="warm",
                    help="warm: from the recovered winner; scratch: from the base, as the pack's recoveries")
    ap.add_argument("--recover-blocks", type=int, help="x 256 tokens of training text (default: the pack's)")
    ap.add_argument("--patience-share", type=float, default=RecoveryConfig.patience_share,
                    help="early stopping's patience as a share of the run's evaluations (1: run every step)")
    ap.add_argument("--only", choices=("pre", "post"), help="recover only the set chosen before / after recovery")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args()

    work = a.bundle.with_name(a.bundle.name + ".work")
    cfg = PackConfig(**json.loads((work / "stages.json").read_text())["config"])
    p = Pack(cfg, a.bundle, resume=True, force=True)  # reads the finished run; writes nothing but recoveries
    text = p.holdout(a.recover_blocks) if a.recover_blocks else p.recovery_blocks
    winner, base_spec = p.winner_spec(), p.base_spec()
    narrow = narrowed_blocks(winner, base_spec)
    wide = [ly.index for ly in winner.layers if ly.index not in narrow]
    if not wide or not narrow:
        raise SystemExit(f"the winner of {a.bundle} has no wide and narrow blocks to compare: nothing to do")
    limit = p.floor_limit(p.sorted_model(), base_spec)
    model, scales = p.recovered_model(p.search_runtime)
    size = cost_fn(p.target, p.search_runtime)
    at_winner = p.checked_ppl(model, winner, scales)
    single = {b: p.checked_ppl(model, narrowed(winner, {b}, narrow[0]), scales)
              for b in track(wide, description="one wide block narrowed")}  # fmt: skip

    t = Table(title=f"Recovered winner: floor check {at_winner:.2f} (limit {limit:.2f}); each wide block narrowed alone")
    for c in ("block", "rounding rank (pre-recovery)", "floor check", "cost"):
        t.add_column(c, justify="right")
    rank = p.rounding_rank()
    for b in sorted(wide, key=single.get):
        t.add_row(str(b), str(rank.index(b)), f"{single[b]:.2f}", f"{single[b] / at_winner - 1:+.2%}")
    console.print(t)

    k = min(a.narrow_more, len(wide))
    sets = {"pre": ("pre-recovery rounding rank", [b for b in rank if b in wide][:k]),
            "post": ("post-recovery cost", sorted(wide, key=single.get)[:k])}  # fmt: skip
    rows = []
    for how, blocks in (sets[a.only],) if a.only else sets.values():
        spec = narrowed(winner, set(blocks), narrow[0])
        if a.start == "warm":
            start, st_scales, regptq = p.runtime_warm_start(spec)
        else:
            start, st_scales = p.rounded_subnet(p.sorted_model(), spec, p.calibration_blocks())
            regptq = len(st_scales)
        before = p.checked_ppl(start, spec, st_scales)
        name = "-".join(map(str, [a.start, len(text.train), a.steps, f"{a.patience_share:g}", *sorted(blocks)]))
        run_dir = work / "bench-post-recovery-order" / name
        res = recover(p.sorted_model(), start, spec, text.train, text.held,
                      RecoveryConfig(max_steps=a.steps, qat=True, patience_share=a.patience_share),
                      block_scales=st_scales, out_dir=run_dir, resume=True)  # fmt: skip
        after = p.checked_ppl(res.model, spec, res.block_scales)
        rows.append({"how": how, "blocks": sorted(blocks), "narrow_blocks": len(narrow) + k,
                     "size_mb": size(spec)["size_mb"], "floor_before": before, "floor_after": after,
                     "limit": limit, "steps": res.steps_run, "wall_s": res.wall_s, "gptq_linears": regptq})  # fmt: skip

    t = Table(title=f"{k} more blocks narrowed, {a.steps} steps from "
              f"{'the recovered winner' if a.start == 'warm' else 'the base (GPTQ-rounded)'}")
    for c in ("chosen by", "blocks", "narrow blocks", "size MiB (cost model)", "floor check before", "after",
              "limit", "meets", "steps", "wall s"):  # fmt: skip
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(r["how"], ",".join(map(str, r["blocks"])), str(r["narrow_blocks"]), f"{r['size_mb']:.1f}",
                  f"{r['floor_before']:.2f}", f"{r['floor_after']:.2f}", f"{r['limit']:.2f}",
                  "yes" if r["floor_after"] <= r["limit"] else "no", str(r["steps"]), f"{r['wall_s']:.0f}")  # fmt: skip
    console.print(t)
    if a.json:
        a.json.write_text(json.dumps({"winner_floor": at_winner, "limit": limit, "single": single, "sets": rows}, indent=1))


if __name__ == "__main__":
    main()
