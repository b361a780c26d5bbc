"""GGUF export of the embedded SmolLM2: export time, file size, parity vs torch, llama.cpp speed.

    .venv/bin/python benchmarks/bench_export_gguf.py [--threads 2] [--measure q8_0,q4_0] [--out DIR]

Parity compares llama.cpp's logits (f32 KV cache) with the extracted torch model under the same
simulated weight quantization, on 64 tokens of fixed English text. Speed runs each GGUF in a fresh
process (f16 KV cache, 128-token prompt, 64 greedy tokens, median of 5 after a warm-up). CPU timings
on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from subnet.extract import extract
from subnet.loading import load_model
from subnet.spec import SubnetSpec
from targets import llamacpp
from targets.backend import Workload
from targets.gguf_export import write_gguf


def specs(arch) -> dict[str, SubnetSpec]:
    hetero = SubnetSpec.uniform(arch, layers=[i for i in range(arch.num_layers) if i not in (20, 25)], fmt="q8_0")
    for ly in hetero.layers[5::6]:
        ly.heads, ly.kv_heads = 6, 2
    for ly in hetero.layers[3::5]:
        ly.mlp = 1280
    mixed = SubnetSpec.full(arch, fmt="q8_0")
    for ly in mixed.layers[3:27]:
        ly.formats.update(gate_proj="iq4_nl", up_proj="iq4_nl")
    return {
        "f32": SubnetSpec.full(arch, fmt="f32"),
        "f16": SubnetSpec.full(arch, fmt="f16"),
        "q8_0": SubnetSpec.full(arch, fmt="q8_0"),
        "q4_0": SubnetSpec.full(arch, fmt="q4_0"),
        "q4_k(fallback)": SubnetSpec.full(arch, fmt="q4_k"),
        "q8_0+iq4_nl mlp": mixed,
        "hetero q8_0 (28 layers)": hetero,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--measure", default="q8_0,q4_0", help="comma-separated spec names to time")
    ap.add_argument("--out", default=None, help="folder for the GGUFs (default: a temp folder)")
    a = ap.parse_args()
    base = load_model(None)
    tok = base.tokenizer
    ids = tok.encode(llamacpp.PARITY_TEXT * 2, add_special_tokens=False)[:64]
    out = Path(a.out or tempfile.mkdtemp(prefix="bench-gguf-"))
    rows, arts = [], {}
    for name, spec in specs(base.arch).items():
        sub_spec = spec
        if any(f["written"] != f["requested"] for f in _fallbacks(spec)):
            sub_spec = SubnetSpec.full(base.arch)  # extraction validates formats; slice with f32 instead
        sub = extract(base.model, sub_spec)
        t0 = time.perf_counter()
        art = write_gguf(sub, tok, spec, out / f"{len(arts)}.gguf")
        export_s = time.perf_counter() - t0
        p = llamacpp.parity(art, sub, ids)
        arts[name] = art
        rows.append((name, art.meta["arch"], export_s, art.meta["bytes"] / 2**20, len(art.meta["fallbacks"]), p))
    print(f"\nSmolLM2-135M GGUF export, parity on {len(ids)} tokens (llama-cpp-python {llamacpp.version()})")
    print(f"{'spec':26} {'arch':6} {'export s':>8} {'MiB':>7} {'fallbk':>6} {'max|d|':>8} {'mean|d|':>8} {'top1':>6}")
    for name, arch, s, mb, nf, p in rows:
        print(f"{name:26} {arch:6} {s:8.1f} {mb:7.1f} {nf:6d} {p['max_abs_diff']:8.2e} "
              f"{p['mean_abs_diff']:8.2e} {p['top1_agreement']:6.1%}")  # fmt: skip
    wl = Workload(prompt_tokens=128, gen_tokens=64)
    print(f"\nllama.cpp speed, {a.threads} threads, prompt {wl.prompt_tokens}, {wl.gen_tokens} greedy tokens (noisy)")
    print(f"{'spec':26} {'prefill ms':>10} {'decode ms/tok':>13} {'tok/s':>7} {'peak RSS MiB':>12}")
    for name in filter(None, a.measure.split(",")):
        m = llamacpp.measure(arts[name], wl, threads=a.threads, repeats=5)
        print(f"{name:26} {m.prefill_ms:10.1f} {m.decode_ms_per_token:13.2f} {m.tokens_per_s:7.1f} {m.peak_rss_mb:12.1f}")


def _fallbacks(spec):
    from targets.gguf_export import effective_spec

    return effective_spec(spec)[1]


if __name__ == "__main__":
    main()
