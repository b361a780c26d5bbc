"""Speed of quantization simulation: torch fast path vs ggml reference path, per format.

Usage: .venv/bin/python benchmarks/bench_quant.py [--rows 576 --cols 1536 --repeat 5] [--model]
Prints a table (ms per weight matrix); --model also times fake_quantize_model on the embedded SmolLM2.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from subnet.formats import FORMATS
from subnet.quant import _FAST, fake_quantize, fake_quantize_ggml


def _best_ms(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * min(times)


def bench_formats(rows: int, cols: int, repeat: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(rows, cols) * 0.02
    print(f"weight {rows}x{cols} float32, torch threads {torch.get_num_threads()}, best of {repeat}")
    print(f"{'format':10} {'fast ms':>9} {'ggml ms':>9}  fast==ggml")
    for name, f in FORMATS.items():
        if not f.fits(cols) or name == "f32":
            continue
        fast = _best_ms(lambda: fake_quantize(w, name), repeat) if name in _FAST else None
        ref = _best_ms(lambda: fake_quantize_ggml(w, name), repeat) if f.ggml_type else None
        same = ""
        if fast is not None and ref is not None:
            a, b = fake_quantize(w, name), fake_quantize_ggml(w, name)
            same = str(torch.equal(a.view(torch.int32), b.view(torch.int32)))
        fmt = lambda v: f"{v:9.2f}" if v is not None else f"{'-':>9}"  # noqa: E731
        print(f"{name:10} {fmt(fast)} {fmt(ref)}  {same}")


def bench_model(fmt: str) -> None:
    from subnet.loading import load_model
    from subnet.quant import fake_quantize_model
    from subnet.spec import SubnetSpec

    loaded = load_model(None)
    model, spec = loaded.model, SubnetSpec.full(loaded.arch, fmt)
    n = sum(p.numel() for p in model.parameters())
    for inplace in (False, True):
        target = model
        if inplace:
            target = copy.deepcopy(model)
        t = time.perf_counter()
        fake_quantize_model(target, spec, inplace=inplace)
        print(f"fake_quantize_model(SmolLM2 {n / 1e6:.1f}M params, all {fmt}, inplace={inplace}): "
              f"{time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=576)
    ap.add_argument("--cols", type=int, default=1536)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--model", action="store_true")
    ap.add_argument("--model-format", default="q8_0")
    a = ap.parse_args()
    bench_formats(a.rows, a.cols, a.repeat)
    if a.model:
        bench_model(a.model_format)
