"""Export SmolLM2 (full and a pruned heterogeneous spec) to ONNX per weight format; print time, size,
parity and (optionally) prefill / decode latency with ONNX Runtime, measured in interleaved rounds
(medians). ``--graphs fused,standard`` exports each both ways: the fused ONNX Runtime graph
(GroupQueryAttention, fused RMSNorms; what pack ships) and the standard-ops graph (the modules' own
attention ops), to show what the fusion buys. ``--kv shared,copied`` times each artifact with its KV cache
bound in place (what the runner does where the graph allows) and copied in and out every step. Run it
on a quiet machine.

    .venv/bin/python benchmarks/bench_export_onnx.py --out /tmp/bench-onnx [--formats f32,int8s_b32,int4s_b32] \
        [--measure int8s_b32,int4s_b32] [--graphs fused,standard] [--kv shared,copied] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from subnet.extract import extract
from subnet.formats import get_format
from subnet.loading import load_model
from subnet.spec import SubnetSpec
from targets import onnxrt
from targets.backend import Workload


def specs(arch, fmt: str, embed: str = "f32") -> dict[str, SubnetSpec]:
    """full, and a pruned one: 4 late blocks dropped, every third MLP at 1024, every fourth layer 2 KV heads;
    linears in ``fmt``, the (tied) embedding in ``embed``."""
    full = SubnetSpec.uniform(arch, fmt="f32")
    pruned = SubnetSpec.uniform(arch, layers=[i for i in range(arch.num_layers) if i not in (21, 23, 25, 27)])
    for j, ly in enumerate(pruned.layers):
        if j % 3 == 1:
            ly.mlp = 1024
        if j % 4 == 2:
            ly.kv_heads, ly.heads = 2, 6
    out = {}
    for name, spec in (("full", full), ("pruned", pruned)):
        for ly in spec.layers:  # a format a row cannot hold stays f32 (none here: rows are 576, 1536, 1024, 384)
            for lin, (_, row) in spec.linear_shapes(ly).items():
                ly.formats[lin] = fmt if get_format(fmt).fits(row) else "f32"
        spec.embed_format = spec.lm_head_format = embed
        out[name] = spec.validate()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/bench-onnx")
    ap.add_argument("--formats", default="f32,int8s_b32,int4s_b32")
    ap.add_argument("--which", default="full,pruned")
    ap.add_argument("--embed", default="int8s_b32", help="embedding (and tied LM head) format")
    ap.add_argument("--graphs", default="fused", help="fused and/or standard (see the module docstring)")
    ap.add_argument("--measure", default="int8s_b32,int4s_b32", help="formats to time (empty: none)")
    ap.add_argument("--kv", default="shared", help="shared and/or copied: the KV cache measured in place (IO "
                    "binding, where the graph allows) and/or copied in and out every step")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(None)
    rows, arts = [], {}
    for fmt in args.formats.split(","):
        for name, spec in specs(lm.arch, fmt, args.embed).items():
            if name not in args.which.split(","):
                continue
            model = extract(lm.model, spec)
            for graph in args.graphs.split(","):
                t0 = time.perf_counter()
                art = onnxrt.export(model, lm.tokenizer, spec, Path(args.out) / f"{name}-{fmt}-{graph}", force=True,
                                    fused=graph == "fused")  # fmt: skip
                row = {
                    "spec": name, "format": fmt, "graph": graph, "params_M": round(spec.num_params() / 1e6, 1),
                    "export_s": round(time.perf_counter() - t0, 1), "size_MB": round(art.meta["size_bytes"] / 1e6, 1),
                    "max_abs_diff": round(art.meta["parity"]["max_abs_diff"], 5),
                    "top1": round(art.meta["parity"]["top1_agreement"], 3),
                }
                print(json.dumps(row), flush=True)
                timed = fmt in args.measure.split(",")
                for kv in args.kv.split(",") if timed else [""]:  # a row per KV-cache variant timed
                    rows.append({**row, "kv": kv})
                    if timed:
                        arts[len(rows) - 1] = art
    runs = {i: [] for i in arts}
    for _ in range(args.rounds):  # interleaved, so drift in the machine's speed hits every artifact alike
        for i, art in arts.items():
            runs[i].append(onnxrt.measure(art, Workload(args.prompt, args.gen), threads=args.threads,
                                          shared_kv=rows[i]["kv"] == "shared"))  # fmt: skip
    for i, ms in runs.items():
        rows[i].update(prefill_ms=round(statistics.median(m.prefill_ms for m in ms), 1),
                       decode_ms_tok=round(statistics.median(m.decode_ms_per_token for m in ms), 2),
                       rss_MB=round(statistics.median(m.peak_rss_mb for m in ms)))  # fmt: skip
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")


if __name__ == "__main__":
    main()
