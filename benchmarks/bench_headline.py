"""Headline benchmark (issue 8): packed SmolLM2 vs what a user would do instead, side by side, one run.

Measured on this machine in one process tree, interleaved: for llama.cpp, the packed GGUF, the
sequential prune-then-quantize bundle's GGUF (if given), the base in the search's widest format
(our exporter), and llama.cpp's own Q8_0 and Q4_K_M of the base (llama_model_quantize from an F32
GGUF); for ONNX Runtime, the packed model vs the base in the same formats, the sequential bundle's
ONNX model (if given) and, where onnxruntime-genai is installed (``pip install -e '.[bench]'``), its
model builder's int4 export of the base (what an ONNX Runtime user would do instead). Columns: size,
decode tokens/s (median over rounds), decode speed-up over the base at the same precision (the median
of the per-round ratios, each pairing two measurements taken moments apart, and their range), prefill
ms, peak RSS, held-out perplexity (scored in the runtime on the scorecard's evaluation blocks, none of
which the search scored) and its ratio to the base at the same precision with a paired bootstrap 95%
interval, and decode speed as a fraction of this machine's memory-bandwidth roofline (bytes read per
token / measured bandwidth; in ONNX Runtime the float32 bytes the kernels get where the file stores
float16 behind a Cast).

    .venv/bin/python benchmarks/bench_headline.py --packed out/smollm2-laptop-cpu [--sequential out/seq] \\
        [--rounds 3] [--eval-blocks 32]
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from search.evaluate import perplexity_ratio
from search.text import report_blocks
from subnet.extract import extract
from subnet.loading import embedded_model_dir, load_model
from subnet.spec import SubnetSpec
from targets import llamacpp, onnxrt
from targets.backend import Workload, measure_interleaved, paired_speedup, runner_nll_per_block
from targets.onnx_graph import weight_bytes


def perplexity_cells(mod, variants: dict, blocks, threads: int, ref: str) -> dict[str, str]:
    """Table cells per variant: its perplexity on ``blocks`` scored in runtime ``mod``, and its ratio to
    variant ``ref``'s on the same blocks with a paired bootstrap 95% interval."""
    tokens = blocks.shape[1] - 1
    nll = {}
    for name, path in variants.items():
        runner = mod.load(path, threads=threads)
        nll[name] = runner_nll_per_block(runner, blocks)
        getattr(runner, "close", lambda: None)()
    cells = {}
    for name, sums in nll.items():
        r = perplexity_ratio(nll[ref], sums, tokens)
        vs = "—" if name == ref else f"{r['ratio'] - 1:+.1%} ({r['low'] - 1:+.1%} to {r['high'] - 1:+.1%})"
        cells[name] = f"{np.exp(sums.mean() / tokens):.2f} | {vs}"
    return cells


def measure_rounds(mod, variants: dict, wl: Workload, threads: int, rounds: int) -> dict[str, dict[str, list]]:
    """Decode ms/token, prefill ms and peak RSS of each variant in runtime ``mod``, once per round, the
    variants taking turns (``targets.backend.measure_interleaved``)."""
    runs = measure_interleaved(mod, variants, wl, threads, rounds)
    return {name: {"decode": [m.decode_ms_per_token for m in ms], "prefill": [m.prefill_ms for m in ms],
                   "rss": [m.peak_rss_mb for m in ms]} for name, ms in runs.items()}  # fmt: skip


def speedup_cell(rows: dict, name: str, ref: str) -> str:
    """``name``'s decode speed-up over ``ref``, round by round (``targets.backend.paired_speedup``): the
    median ratio and the range over the rounds."""
    if name == ref:
        return "—"
    s = paired_speedup(rows[ref]["decode"], rows[name]["decode"])
    return f"{s['median']:.2f}x ({s['low']:.2f}x to {s['high']:.2f}x)"


def memory_bandwidth_gbs(mb: int = 512, repeats: int = 5) -> float:
    """Measured copy bandwidth (read + write bytes / s) of a large numpy array, median of repeats."""
    a = np.ones(mb * 2**20 // 8)
    b = np.empty_like(a)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - t)
    return 2 * a.nbytes / statistics.median(times) / 1e9


def llama_quantize(src: Path, dst: Path, ftype_name: str) -> Path:
    """llama.cpp's own quantizer (what `llama-quantize` does) on a GGUF."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {ftype_name} failed ({rc})")
    return dst


def genai_int4(hf_dir: Path, out: Path) -> Path | None:
    """onnxruntime-genai's model builder on the base: int4 weights (its defaults for the CPU: RTN, block
    32, int8 compute, the LM head too) and a GroupQueryAttention graph. None without onnxruntime-genai."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return None
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(hf_dir), "-i", str(hf_dir),
                    "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(out / "cache")], check=True,
                   capture_output=True)  # fmt: skip
    path = out / "model.onnx"
    graph = onnx.load(str(path), load_external_data=False)  # its KV head size is a named dim: our runner needs it
    config = json.loads((hf_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    for i in graph.graph.input:
        if i.name.startswith("past_key_values."):
            i.type.tensor_type.shape.dim[3].dim_value = head_dim
    onnx.save(graph, str(path))  # the weights stay in its external data file
    return path


def bundle_artifact(bundle: Path, runtime: str) -> Path | None:
    d = bundle / "artifacts" / runtime
    if not d.is_dir():
        return None
    return next(d.glob("*.gguf" if runtime == "llama.cpp" else "*.onnx"), None)


def gguf_weight_bytes(path: Path) -> int:
    """Bytes of tensor data in a GGUF (what decode reads per token, KV cache aside)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)


def onnx_weight_bytes(path: Path) -> int:
    """Bytes of weight data an ONNX model's kernels read per decode token (KV cache aside)."""
    return weight_bytes(onnx.load(str(path), load_external_data=False).graph)


def roofline_cell(decode_ms: float, weight_bytes: int, bandwidth_gbs: float) -> str:
    """Decode tokens/s as a share of the bandwidth roofline: reading ``weight_bytes`` once per token."""
    return f"{100 * (1000 / decode_ms) / (bandwidth_gbs * 1e9 / weight_bytes):.0f}%"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--packed", required=True, type=Path, help="bundle folder written by `packager pack`")
    ap.add_argument("--sequential", type=Path, default=None, help="bundle packed with --strategy sequential")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds (medians reported)")
    ap.add_argument("--eval-blocks", type=int, default=32, help="x 256 evaluation tokens scored in each runtime")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    card = json.loads((args.packed / "scorecard.json").read_text())
    wl = Workload(**card["workload"])
    loaded = load_model(card["config"]["model"])
    tok = loaded.tokenizer
    evals = report_blocks(tok, args.eval_blocks)
    work = Path(tempfile.mkdtemp(prefix="headline-"))

    # the base in the packed model's reference formats was exported by pack next to the bundle
    pack_work = args.packed.with_name(args.packed.name + ".work") / "artifacts"
    base_spec = SubnetSpec.full(SubnetSpec.from_dict(card["spec"]).base, fmt="f32")
    f32 = llamacpp.export(extract(loaded.model, base_spec), tok, base_spec, work / "base-f32.gguf").path
    variants = {
        "packed (joint search)": bundle_artifact(args.packed, "llama.cpp"),
        "base, same precision (our exporter)": pack_work / "llama.cpp" / "base.gguf",
        "base, llama.cpp Q8_0": llama_quantize(Path(f32), work / "base-Q8_0.gguf", "Q8_0"),
        "base, llama.cpp Q4_K_M": llama_quantize(Path(f32), work / "base-Q4_K_M.gguf", "Q4_K_M"),
    }
    if args.sequential:
        variants["sequential prune→quantize"] = bundle_artifact(args.sequential, "llama.cpp")
    variants = {k: v for k, v in variants.items() if v is not None and Path(v).exists()}

    bw = memory_bandwidth_gbs()
    rows = measure_rounds(llamacpp, variants, wl, args.threads, args.rounds)
    print(f"\nHeadline benchmark — {loaded.source} on this machine ({card['machine'].get('device')}), "
          f"{args.threads} threads, workload {wl}, {args.rounds} interleaved rounds, medians; "
          f"measured copy bandwidth {bw:.1f} GB/s")
    print("\n### llama.cpp\n")
    ref = "base, same precision (our exporter)"
    ppl = perplexity_cells(llamacpp, variants, evals, args.threads, ref)
    print(f"| model | size MiB | decode tok/s | decode vs {ref} (per round: median, range) | prefill ms | "
          f"peak RSS MiB | ppl (held-out, in llama.cpp) | vs {ref} (95% interval) | % of bandwidth roofline |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, path in variants.items():
        r = rows[name]
        dec = statistics.median(r["decode"])
        print(f"| {name} | {Path(path).stat().st_size / 2**20:.1f} | {1000 / dec:.1f} | {speedup_cell(rows, name, ref)} | "
              f"{statistics.median(r['prefill']):.1f} | {statistics.median(r['rss']):.0f} | {ppl[name]} | "
              f"{roofline_cell(dec, gguf_weight_bytes(Path(path)), bw)} |")  # fmt: skip

    onnx_packed = bundle_artifact(args.packed, "onnxruntime")
    if onnx_packed is not None:
        ov = {"packed": onnx_packed, "base, same precision": pack_work / "onnxruntime" / "base" / "model.onnx"}
        hf_dir = Path(card["config"]["model"]) if card["config"]["model"] else embedded_model_dir()
        genai = genai_int4(hf_dir, work / "genai-int4") if hf_dir.is_dir() else None
        if genai is not None:
            ov["base, onnxruntime-genai int4"] = genai
        sequential = bundle_artifact(args.sequential, "onnxruntime") if args.sequential else None
        if sequential is not None:
            ov["sequential prune→quantize"] = sequential
        orows = measure_rounds(onnxrt, ov, wl, args.threads, args.rounds)
        print("\n### ONNX Runtime\n")
        ref = "base, same precision"
        ppl = perplexity_cells(onnxrt, ov, evals, args.threads, ref)
        print(f"| model | size MiB | decode tok/s | decode vs {ref} (per round: median, range) | prefill ms | "
              f"peak RSS MiB | ppl (held-out, in ORT) | vs {ref} (95% interval) | % of bandwidth roofline |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, path in ov.items():
            r = orows[name]
            dec = statistics.median(r["decode"])
            size = sum(p.stat().st_size for p in Path(path).parent.glob("model.onnx*"))
            print(f"| {name} | {size / 2**20:.1f} | {1000 / dec:.1f} | "
                  f"{speedup_cell(orows, name, ref)} | {statistics.median(r['prefill']):.1f} | "
                  f"{statistics.median(r['rss']):.0f} | {ppl[name]} | {roofline_cell(dec, onnx_weight_bytes(Path(path)), bw)} |")  # fmt: skip


if __name__ == "__main__":
    main()
