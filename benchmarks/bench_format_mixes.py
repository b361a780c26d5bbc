"""Format mixes on a packed model's importance-sorted base: perplexity before recovery, size, decode.

Reads a pack work folder (its ``sorted/`` model and ``importance.json``), builds each mix the way the
uniform search space does (the chosen formats go to the ``share`` of blocks least sensitive to
rounding, the rest keep the widest format), and prints its simulated held-out perplexity next to
the target's cost-model size and decode prediction. Shows which format levers exist before recovery.
``--measure R`` also exports every mix for the runtime and measures its decode and prefill on this
machine in R interleaved rounds (medians), next to the prediction: a direct check of the profile
table on whole models, where the formats' relative speeds matter most to the search.

    .venv/bin/python benchmarks/bench_format_mixes.py --work out/smollm2-laptop-cpu.work \\
        [--mix q8_0,q4_0,q4_k:1.0:q8_0 ...] [--eval-blocks 8] [--measure 5 --out mixes.jsonl]

A mix is ``ATTN,MLP[,DOWN]:SHARE:EMBED`` (DOWN overrides down_proj's format; EMBED is the tied
embedding / LM head). Without --measure it is torch-only: other load slows it but does not change
its figures. With --measure, run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import track  # noqa: E402
from rich.table import Table  # noqa: E402

from packager.pack import cost_fn  # noqa: E402
from profiles.costmodel import CostModelError  # noqa: E402
from profiles.profiler import measure_interleaved  # noqa: E402
from search.importance import Importance  # noqa: E402
from search.space import SearchSpace, SpaceConfig  # noqa: E402
from search.text import token_blocks  # noqa: E402
from subnet.arch import ATTN_LINEARS, MLP_LINEARS  # noqa: E402
from subnet.spec import SubnetSpec  # noqa: E402
from subnet.supernet import Supernet  # noqa: E402
from targets.backend import Workload  # noqa: E402
from targets.registry import get_target  # noqa: E402

DEFAULT_MIXES = [
    "q8_0,q8_0:1.0:q8_0",  # the base at the widest format
    "q8_0,q4_0:0.8:q8_0",
    "q8_0,q4_0:0.8:q5_0",
    "q8_0,q4_0:0.8:iq4_nl",
    "q8_0,q4_0:0.8:q4_0",
    "q8_0,q4_0:1.0:q8_0",
    "q8_0,q4_0:1.0:q5_0",
    "q8_0,iq4_nl:1.0:q5_0",
    "q5_0,q4_0:0.8:q5_0",
    "q8_0,q4_0,q4_k:1.0:q8_0",
    "q8_0,q4_0,q5_0:1.0:q8_0",
    "q8_0,q4_0,q6_k:1.0:q8_0",
]


def parse_mix(text: str) -> tuple[str, str, str | None, float, str]:
    """(attention, MLP, down_proj or None, share, embedding) of ``ATTN,MLP[,DOWN]:SHARE:EMBED``."""
    try:
        fmts, share, emb = text.split(":")
        parts = fmts.split(",")
        if len(parts) not in (2, 3):
            raise ValueError
        return parts[0], parts[1], parts[2] if len(parts) == 3 else None, float(share), emb
    except ValueError:
        raise SystemExit(f"bad --mix {text!r}: write ATTN,MLP[,DOWN]:SHARE:EMBED, e.g. q8_0,q4_0:0.8:q8_0") from None


def mix_spec(space: SearchSpace, text: str) -> SubnetSpec:
    """The full-size spec of one mix; blocks outside its share keep the space's widest format."""
    attn, mlp, down, share, emb = parse_mix(text)
    arch = space.arch
    spec = SubnetSpec.uniform(arch, fmt=space.config.attn_formats[0], embed_format=emb)
    narrow = space.narrow_blocks(list(range(arch.num_layers)), share)
    for ly in spec.layers:
        if ly.index in narrow:
            ly.formats = {n: attn for n in ATTN_LINEARS} | {n: mlp for n in MLP_LINEARS}
            if down:
                ly.formats["down_proj"] = down
    return spec.validate(arch)


def measure_mixes(model, tokenizer, specs: dict[str, SubnetSpec], runtime: str, workload: Workload, threads: int,
                  rounds: int, repeats: int = 3) -> dict[str, dict]:  # fmt: skip
    """Every mix exported for ``runtime`` and measured in ``rounds`` interleaved rounds (medians)."""
    return measure_interleaved(model, tokenizer, specs, runtime, workload, threads, rounds, repeats)


def measured_row(runtime: str, mix: str, spec: SubnetSpec, cost: dict, measured: dict, workload: Workload) -> dict:
    """One measured mix as a ``bench_costmodel`` run (its ``--calibrate-rows`` / ``--rows`` read these)."""
    return {"runtime": runtime, "mix": mix, "formats": sorted(spec.formats_used()), "spec": spec.to_dict(),
            "workload": vars(workload), "pred_decode_ms_per_token": cost["decode_ms"],
            "meas_decode_ms_per_token": measured["decode_ms"], "pred_prefill_ms": cost["prefill_ms"],
            "meas_prefill_ms": measured["prefill_ms"], "pred_peak_memory_mb": cost["memory_mb"],
            "meas_peak_memory_mb": measured["peak_rss_mb"]}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("out/smollm2-laptop-cpu.work"), help="a pack work folder")
    ap.add_argument("--mix", action="append", default=None, help="ATTN,MLP[,DOWN]:SHARE:EMBED (repeatable)")
    ap.add_argument("--target", default="laptop-cpu")
    ap.add_argument("--runtime", default="llama.cpp")
    ap.add_argument("--eval-blocks", type=int, default=8, help="x 256 held-out tokens (the search's evaluation split)")
    ap.add_argument("--measure", type=int, default=0, metavar="ROUNDS",
                    help="also export each mix and measure it on this machine, in this many interleaved rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None,
                    help="with --measure: append each mix's run here (JSON lines, bench_costmodel's row format)")
    a = ap.parse_args(argv)
    if not (a.work / "sorted").is_dir() or not (a.work / "importance.json").is_file():
        raise SystemExit(f"{a.work} has no sorted/ model and importance.json: pass a pack work folder past its prepare stage")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(a.work / "sorted", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(a.work / "sorted")
    blocks = token_blocks(tokenizer, "evaluation", 256, a.eval_blocks)
    imp = Importance.load(a.work / "importance.json")
    net = Supernet(model)
    space = SearchSpace(net.arch, a.runtime, SpaceConfig(mode="uniform"), imp.layer_rank, imp.quant_rank)
    target = get_target(a.target)
    cost = cost_fn(target, a.runtime)
    specs = {m: mix_spec(space, m) for m in a.mix or DEFAULT_MIXES}
    measured = measure_mixes(model, tokenizer, specs, a.runtime, target.workload, a.threads, a.measure) if a.measure else {}
    net.prepare({f for s in specs.values() for f in s.formats_used()})
    t = Table(title=f"format mixes on {a.work / 'sorted'} ({blocks.numel()} held-out tokens, formats simulated; "
                    f"size and decode: {a.target}/{a.runtime} cost model"
                    + (f"; measured: {a.measure} interleaved rounds, {target.workload.prompt_tokens}-token prompt, "
                       f"{target.workload.gen_tokens} generated, {a.threads} threads)" if measured else ")"))  # fmt: skip
    for col in ("mix", "ppl before recovery", "vs first", "size MiB", "x smaller",
                "decode ms (predicted)", "x faster", "eval s"):  # fmt: skip
        t.add_column(col, justify="right")
    if measured:
        for col in ("decode ms (measured)", "x faster", "spread", "predicted / measured", "prefill ms (measured)"):
            t.add_column(col, justify="right")
    first = None
    for m, spec in track(specs.items(), description="mixes", console=Console(stderr=True)):
        t0 = time.perf_counter()
        ppl = net.activate(spec).perplexity(blocks)
        try:
            c = cost(spec)
        except CostModelError as e:  # a format the table does not cover
            c = {"size_mb": spec.weight_bytes() / 2**20} | dict.fromkeys(("decode_ms", "prefill_ms", "memory_mb"), float("nan"))
            print(f"{m}: no decode prediction ({e}); size is the weights alone", file=sys.stderr)
        first = first or (ppl, c, measured.get(m))
        row = [m, f"{ppl:.2f}", f"{100 * (ppl / first[0] - 1):+.1f}%", f"{c['size_mb']:.1f}",
               f"{first[1]['size_mb'] / c['size_mb']:.2f}", f"{c['decode_ms']:.2f}",
               f"{first[1]['decode_ms'] / c['decode_ms']:.2f}", f"{time.perf_counter() - t0:.0f}"]  # fmt: skip
        if measured:
            me = measured[m]
            if a.out:
                with a.out.open("a") as f:
                    f.write(json.dumps(measured_row(a.runtime, m, spec, c, me, target.workload)) + "\n")
            row += [f"{me['decode_ms']:.2f}", f"{first[2]['decode_ms'] / me['decode_ms']:.2f}",
                    f"{100 * me['decode_spread']:.0f}%", f"{c['decode_ms'] / me['decode_ms']:.2f}", f"{me['prefill_ms']:.0f}"]  # fmt: skip
        t.add_row(*row)
    Console(width=200).print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
