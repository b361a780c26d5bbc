"""Export SmolLM2 (full and a pruned heterogeneous spec) to ONNX in f32/int8/int4_b32; print time, size,
parity and (optionally) prefill / decode latency with ONNX Runtime.

    .venv/bin/python benchmarks/bench_export_onnx.py --out /tmp/bench-onnx [--measure f32,int4_b32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from subnet.extract import extract
from subnet.formats import get_format
from subnet.loading import load_model
from subnet.spec import SubnetSpec
from targets import onnxrt
from targets.backend import Workload


def specs(arch, fmt: str) -> dict[str, SubnetSpec]:
    """full, and a pruned one: 4 late blocks dropped, every third MLP at 1024, every fourth layer 2 KV heads."""
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
        out[name] = spec.validate()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/bench-onnx")
    ap.add_argument("--formats", default="f32,int8,int4_b32")
    ap.add_argument("--which", default="full,pruned")
    ap.add_argument("--measure", default="f32,int4_b32", help="formats to time (empty: none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(None)
    rows = []
    for fmt in args.formats.split(","):
        for name, spec in specs(lm.arch, fmt).items():
            if name not in args.which.split(","):
                continue
            model = extract(lm.model, spec)
            t0 = time.perf_counter()
            art = onnxrt.export(model, lm.tokenizer, spec, Path(args.out) / f"{name}-{fmt}", force=True)
            row = {
                "spec": name, "format": fmt, "params_M": round(spec.num_params() / 1e6, 1),
                "export_s": round(time.perf_counter() - t0, 1), "size_MB": round(art.meta["size_bytes"] / 1e6, 1),
                "max_abs_diff": round(art.meta["parity"]["max_abs_diff"], 5),
                "top1": round(art.meta["parity"]["top1_agreement"], 3),
            }
            if fmt in args.measure.split(","):
                m = onnxrt.measure(art, Workload(args.prompt, args.gen), threads=args.threads)
                row.update(prefill_ms=round(m.prefill_ms, 1), decode_ms_tok=round(m.decode_ms_per_token, 2),
                           rss_MB=round(m.peak_rss_mb))
            rows.append(row)
            print(json.dumps(row), flush=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")


if __name__ == "__main__":
    main()
