"""Where ONNX Runtime's decode time goes: a decode step against its linears alone, per-kernel times of
exported models, and one MatMulNBits layout against another at SmolLM2's shapes.

``--split A [B ...]``: each ONNX artifact (folder or model.onnx) prefills ``--prompt`` tokens, then
decodes ``--gen`` with its KV cache bound in place (the runner's path), no profiler; beside it, in
turns, the same graph's MatMulNBits alone (each reading a graph input, the constant subgraphs that
feed them kept). Prints ms per token of the step, of its session run (the rest is the runner's
Python), and of the linears, whose stored bytes over their time give the bandwidth they draw.

``--profile A [B ...]``: the same decode under ONNX Runtime's profiler; prints the decode steps'
kernel time per op type and per MatMulNBits shape (role, bits, block, N x K). The profiler adds a
few µs to every node it times (a Sigmoid over 1,536 floats: 0.76 µs per node unprofiled, 4.0 µs as
profiled, stop 48), so it overstates the share of the many small kernels: ``--split`` gives the
linears' real share.

``--kernels``: one MatMulNBits (or dynamic int8 MatMulInteger) per layout, at M = 1, for SmolLM2's
gate/up (N 3072, K 576), down (576 x 1536) and LM head (49152 x 576) shapes. Each layout runs as
copies with ``--weights-mb`` of distinct random codes, more than the cache one process gets on these
VMs (an int4 gate/up ran at 31 µs per call over 10 MB and 40 MB of codes, 65–69 µs over 100 MB and
200 MB, stop 48), so that they come from memory as a whole model's do; prints µs per call (median of
7 timings).

    .venv/bin/python benchmarks/bench_ort_kernels.py --split out/pack.work/artifacts/onnxruntime/{base,packaged}
    .venv/bin/python benchmarks/bench_ort_kernels.py --profile out/pack.work/artifacts/onnxruntime/{base,packaged}
    .venv/bin/python benchmarks/bench_ort_kernels.py --kernels [--threads 2]

Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from targets.onnx_graph import MS_DOMAIN, attrs, drop_unused_initializers, weight_bytes  # noqa: E402
from targets.onnxrt import SharedKV, load, session  # noqa: E402

SHAPES = {"gate_up": (3072, 576), "down": (576, 1536), "head": (49152, 576)}  # N, K
# (label, bits, block, zero points) for MatMulNBits; None: dynamic int8 (MatMulInteger per output channel)
LAYOUTS = [("int8s_b32 (q8_0's twin)", 8, 32, False), ("int8_b32", 8, 32, True), ("8-bit b128", 8, 128, False),
           ("int4s_b32 (q4_0's twin)", 4, 32, False), ("int4_b32", 4, 32, True), ("int4_b64", 4, 64, True),
           ("4-bit b128 + zero points", 4, 128, True), ("int8 (MatMulInteger)", None, None, None)]  # fmt: skip


def decode_ms(runner, prompt: int, gen: int) -> float:
    """ms per token of ``gen`` decode steps after a ``prompt``-token prefill (not timed), the KV cache
    bound in place as the runner binds it."""
    cache = SharedKV(runner, 1, prompt + gen)
    cache.step(np.arange(100, 100 + prompt)[None])
    start = time.perf_counter()
    for i in range(gen):
        cache.step(np.array([[200 + i]]))
    return (time.perf_counter() - start) / gen * 1e3


def linears_only(path: Path, threads: int) -> tuple:
    """A session of ``path``'s MatMulNBits alone, each reading its own graph input [1, 1, K] (the constant
    subgraphs that feed them kept: float16 scales' Casts, a tied head's Reshape); its feed; and the bytes
    the linears read (``weight_bytes``: codes, scales as float32, zero points)."""
    model = onnx.load(str(path))
    known, nodes = {t.name for t in model.graph.initializer}, []
    for n in model.graph.node:
        if n.op_type == "MatMulNBits" or all(not t or t in known for t in n.input):
            nodes.append(n)
            known.update(n.output if n.op_type != "MatMulNBits" else [])
    linears = [n for n in nodes if n.op_type == "MatMulNBits"]
    widths = {n.input[0]: attrs(n)["K"] for n in linears}
    graph = helper.make_graph(nodes, "linears",
                              [helper.make_tensor_value_info(t, TensorProto.FLOAT, [1, 1, k]) for t, k in widths.items()],
                              [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in linears],
                              model.graph.initializer)  # fmt: skip
    linears_model = helper.make_model(graph, opset_imports=model.opset_import)
    drop_unused_initializers(linears_model)
    rng = np.random.default_rng(0)
    feed = {t: rng.random((1, 1, k), dtype=np.float32) for t, k in widths.items()}
    return session(linears_model.SerializeToString(), threads), feed, weight_bytes(linears_model.graph)


def split(paths: list, threads: int, prompt: int, gen: int, rounds: int) -> None:
    """Print each artifact's decode step against its session run and its linears alone, in interleaved
    rounds (medians)."""
    models = []
    for path in paths:
        runner, spent = load(path, threads=threads), []
        run = runner.session.run_with_iobinding

        def timed(io, run=run, spent=spent):  # the session's own time, without the runner's Python
            start = time.perf_counter()
            run(io)
            spent.append(time.perf_counter() - start)

        runner.session.run_with_iobinding = timed
        linears, feed, nbytes = linears_only(runner.path, threads)
        decode_ms(runner, prompt, 4)  # warm-up: first runs allocate and prepack
        for _ in range(4):
            linears.run(None, feed)
        models.append((path, runner, spent, linears, feed, nbytes))
    times = collections.defaultdict(list)
    for _ in range(rounds):
        for path, runner, spent, linears, feed, _ in models:
            spent.clear()
            times[path, "step"].append(decode_ms(runner, prompt, gen))
            times[path, "run"].append(sum(spent[1:]) / gen * 1e3)  # spent[0]: the prefill
            start = time.perf_counter()
            for _ in range(gen):
                linears.run(None, feed)
            times[path, "linears"].append((time.perf_counter() - start) / gen * 1e3)
    print(f"\n{rounds} rounds, {prompt}-token prompt, {gen} decode steps, {threads} threads; ms per token (medians)\n")
    print("| model | decode step | session run | MatMulNBits alone | their share | their MB | their GB/s | rest of the graph |")
    print("|---|---|---|---|---|---|---|---|")
    for path, _, _, _, _, nbytes in models:
        step, run, lin = (statistics.median(times[path, k]) for k in ("step", "run", "linears"))
        print(f"| {path} | {step:.2f} | {run:.2f} | {lin:.2f} | {lin / step:.0%} | {nbytes / 1e6:.1f} | "
              f"{nbytes / lin / 1e6:.1f} | {run - lin:.2f} |")  # fmt: skip


def profile(path, threads: int, prompt: int, gen: int, prefix: str) -> None:
    """Print the decode steps' kernel time of one artifact, per op type and per MatMulNBits shape."""
    runner = load(path, threads=threads, profile=prefix)
    wall = decode_ms(runner, prompt, gen)
    events = json.loads(Path(runner.session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    prefill_end = runs[0]["ts"] + runs[0]["dur"]
    shapes = {n.name: attrs(n) for n in onnx.load(str(runner.path), load_external_data=False).graph.node
              if n.op_type == "MatMulNBits"}  # fmt: skip
    by_op, by_shape, calls = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < prefill_end:
            continue
        op, node = e["args"]["op_name"], e["name"][: -len("_kernel_time")]
        by_op[op] += e["dur"]
        calls[op] += 1
        if op == "MatMulNBits":
            a = shapes[node]
            by_shape[(re.sub(r"\d+", "#", node), a["bits"], a["block_size"], a["N"], a["K"])] += e["dur"]
    total = sum(by_op.values())
    print(f"\n{path}: {wall:.2f} ms/token decode under the profiler, kernels {total / gen / 1e3:.2f} ms/token")
    for op, us in by_op.most_common():
        print(f"  {op:34s} {us / gen / 1e3:7.3f} ms {100 * us / total:5.1f}%  {calls[op] // gen} calls")
    print("  MatMulNBits by node name, bits, block, N x K:")
    for (name, bits, block, n, k), us in by_shape.most_common():
        print(f"    {name:40s} {bits}-bit b{block:<4d} {n:>5d} x {k:<5d} {us / gen / 1e3:7.3f} ms")


def layout_nodes(rng, n: int, k: int, bits, block, zero_points, tag: str) -> tuple[list, list]:
    """One layout's node(s) and random initializers, computing ``y_{tag}`` = x @ W^T from input ``x``."""
    if bits is None:
        w = rng.integers(-127, 128, (k, n), dtype=np.int8)
        nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], [f"xq{tag}", f"xs{tag}", f"xz{tag}"]),
                 helper.make_node("MatMulInteger", [f"xq{tag}", f"w{tag}", f"xz{tag}", f"wz{tag}"], [f"yi{tag}"]),
                 helper.make_node("Cast", [f"yi{tag}"], [f"yf{tag}"], to=TensorProto.FLOAT),
                 helper.make_node("Mul", [f"xs{tag}", f"ws{tag}"], [f"s{tag}"]),
                 helper.make_node("Mul", [f"yf{tag}", f"s{tag}"], [f"y{tag}"])]  # fmt: skip
        inits = [nh.from_array(w, f"w{tag}"), nh.from_array(np.zeros(n, np.int8), f"wz{tag}"),
                 nh.from_array(rng.random(n, dtype=np.float32) * 1e-3, f"ws{tag}")]  # fmt: skip
        return nodes, inits
    blocks = -(-k // block)
    inits = [nh.from_array(rng.integers(0, 256, (n, blocks, block * bits // 8), dtype=np.uint8), f"q{tag}"),
             nh.from_array(rng.random(n * blocks, dtype=np.float32) * 1e-3, f"s{tag}")]  # fmt: skip
    if zero_points:
        inits.append(nh.from_array(rng.integers(0, 256, n * -(-blocks * bits // 8), dtype=np.uint8), f"z{tag}"))
    node = helper.make_node("MatMulNBits", ["x", *[t.name for t in inits]], [f"y{tag}"], domain=MS_DOMAIN,
                            K=k, N=n, bits=bits, block_size=block, accuracy_level=4)  # fmt: skip
    return [node], inits


def time_layout(shape: str, layout: tuple, threads: int, weights_mb: float) -> float:
    """µs per call of one layout at one shape, over copies with ``weights_mb`` of distinct codes in all
    (median of 7 timings)."""
    rng = np.random.default_rng(0)
    n, k = SHAPES[shape]
    copies = max(1, int(weights_mb * 1e6 // (n * k * (layout[1] or 8) / 8)))
    nodes, inits = [], []
    for c in range(copies):
        more_nodes, more_inits = layout_nodes(rng, n, k, *layout[1:], tag=f"_{c}")
        nodes += more_nodes
        inits += more_inits
    graph = helper.make_graph(nodes, "layout", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
                              [helper.make_tensor_value_info(f"y_{c}", TensorProto.FLOAT, None) for c in range(copies)],
                              inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS_DOMAIN, 1)])
    sess = session(model.SerializeToString(), threads)
    feed = {"x": rng.random((1, 1, k), dtype=np.float32)}
    for _ in range(5):
        sess.run(None, feed)
    timings = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(10):
            sess.run(None, feed)
        timings.append((time.perf_counter() - start) / 10 / copies * 1e6)
    return statistics.median(timings)


def kernels(threads: int, weights_mb: float) -> None:
    """Print µs per call of every layout at every shape."""
    print(f"| layout | {' | '.join(f'{s} ({n} x {k})' for s, (n, k) in SHAPES.items())} |")
    print(f"|---|{'---|' * len(SHAPES)}")
    for layout in LAYOUTS:
        print(f"| {layout[0]} | " + " | ".join(f"{time_layout(s, layout, threads, weights_mb):.1f} µs" for s in SHAPES)
              + " |", flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", nargs="+", default=[], help="ONNX artifacts: decode step against its linears alone")
    ap.add_argument("--profile", nargs="+", default=[], help="ONNX artifact folders (or model.onnx) to profile")
    ap.add_argument("--kernels", action="store_true", help="time single MatMulNBits layouts at SmolLM2's shapes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (--split)")
    ap.add_argument("--weights-mb", type=float, default=200.0, help="MB of codes per layout and shape (--kernels)")
    ap.add_argument("--profile-prefix", default="/tmp/ort_kernels_profile")
    args = ap.parse_args()
    if not (args.split or args.profile or args.kernels):
        ap.error("give --split ARTIFACT ..., --profile ARTIFACT ... and/or --kernels")
    if args.split:
        split(args.split, args.threads, args.prompt, args.gen, args.rounds)
    for path in args.profile:
        profile(path, args.threads, args.prompt, args.gen, args.profile_prefix)
    if args.kernels:
        kernels(args.threads, args.weights_mb)


if __name__ == "__main__":
    main()
