"""Supernet benchmark (issue 3) on the embedded SmolLM2, this machine.

Prints: candidate evaluations per minute (perplexity on a fixed token budget, formats simulated),
peak RSS during a 50-candidate sweep vs the model's own fp32 size, and the perplexity of the base,
of 3 importance-sorted prunes and of the same prunes without sorting.

    .venv/bin/python benchmarks/bench_supernet.py [--candidates 50] [--eval-blocks 8]
"""

from __future__ import annotations

import argparse
import gc
import threading
import time

import numpy as np
import psutil

import subnet  # noqa: F401  (before torch, so that MKL does not cache freed buffers: see subnet.heap)
import torch

from search.importance import sort_model
from search.space import SearchSpace, SpaceConfig
from search.text import token_blocks
from subnet.loading import load_model
from subnet.spec import SubnetSpec
from subnet.supernet import Supernet


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


class PeakSampler:
    """Samples this process's RSS every 20 ms while active; ``peak`` is the maximum seen."""

    def __enter__(self):
        self.peak, self._stop = rss_mb(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def prunes(arch, rank):
    """Three prunes of increasing strength: depth, MLP width, and both."""
    return {
        "drop 4 blocks": SubnetSpec.uniform(arch, layers=sorted(rank[:26])),
        "MLP 75% everywhere": SubnetSpec.uniform(arch, mlp=1152),
        "drop 2 blocks + MLP 87.5% + 2/3 KV groups": SubnetSpec.uniform(arch, layers=sorted(rank[:28]), mlp=1344,
                                                                        kv_heads=2),
    }  # fmt: skip


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", type=int, default=50)
    ap.add_argument("--eval-blocks", type=int, default=8, help="x 256 tokens per evaluation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", nargs="+", default=None,
                    help="weight formats of the sweep (default: the llama.cpp search defaults)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rss0 = rss_mb()
    loaded = load_model(None)
    model, tok, arch = loaded.model, loaded.tokenizer, loaded.arch
    fp32_mb = sum(p.numel() * 4 for p in {id(p): p for p in model.parameters()}.values()) / 2**20
    evals = token_blocks(tok, "evaluation", 256, args.eval_blocks)
    calib = token_blocks(tok, "calibration", 256, 32)

    rss_model = rss_mb()
    t = time.time()
    imp = sort_model(model, calib)
    sort_s = time.time() - t
    net = Supernet(model)
    rank = imp.layer_rank

    # the sweep first, with nothing but the sorted model in memory: random joint candidates, formats
    # simulated, on one in-place supernet
    fmts = args.formats or []
    space = SearchSpace(arch, "llama.cpp", SpaceConfig(mode="hetero", attn_formats=fmts, mlp_formats=fmts,
                                                       embed_formats=fmts), rank)  # fmt: skip
    rng = np.random.default_rng(0)
    gc.collect()
    rss_before = rss_mb()
    t = time.time()
    with PeakSampler() as sampler:  # the search prepares its formats' block scales first (Problem does)
        t_prep = time.time()
        net.prepare(space.formats)
        prep_s = time.time() - t_prep
        for _ in range(args.candidates):
            x = [int(rng.integers(n)) for n in space.sizes]
            net.activate(space.decode(x)).perplexity(evals)
    sweep_s = time.time() - t
    peak = sampler.peak

    # sorted vs unsorted prunes (the unsorted model is a fresh load of the original weights)
    unsorted = Supernet(load_model(None).model)
    base_ppl = net.activate(SubnetSpec.full(arch)).perplexity(evals)
    rows = []
    for name, spec in prunes(arch, rank).items():
        s = net.activate(spec).perplexity(evals)
        # unsorted: the same shapes as first-k prefixes of the original units and the *last* blocks dropped
        naive = SubnetSpec.from_dict(spec.to_dict())
        for ly, keep in zip(naive.layers, range(len(naive.layers))):
            ly.index = keep
        u = unsorted.activate(naive).perplexity(evals)
        rows.append((name, spec.num_params() / 1e6, s, u))

    tokens = evals.numel()
    print(f"\nSupernet benchmark — embedded SmolLM2-135M, {args.threads} threads, {tokens} eval tokens per candidate")
    print(f"importance sort (magnitude units + cosine blocks, {calib.numel()} calibration tokens): {sort_s:.1f} s")
    print(f"block scales searched for the kept-scale formats before the sweep: {prep_s:.1f} s (in the sweep's wall)")
    print("\n| candidates | wall s | evaluations / min | s / evaluation |")
    print("|---|---|---|---|")
    print(f"| {args.candidates} (hetero, formats {', '.join(space.config.mlp_formats)} simulated) | {sweep_s:.1f} | {60 * args.candidates / sweep_s:.1f} "
          f"| {sweep_s / args.candidates:.2f} |")  # fmt: skip
    print("\n| memory | MiB |")
    print("|---|---|")
    print(f"| process RSS before loading the model | {rss0:.0f} |")
    print(f"| model fp32 weights | {fp32_mb:.0f} |")
    print(f"| RSS with the model loaded | {rss_model:.0f} |")
    print(f"| RSS before the sweep (after sorting) | {rss_before:.0f} |")
    print(f"| peak RSS during the sweep, block-scale search included (sampled every 20 ms) | {peak:.0f} |")
    print(f"| (peak during sweep - RSS before loading) / fp32 size | {(peak - rss0) / fp32_mb:.2f}x |")
    print("\n| sub-network | params (M) | ppl sorted | ppl unsorted | unsorted / sorted |")
    print("|---|---|---|---|---|")
    print(f"| base | {arch_params(arch):.1f} | {base_ppl:.2f} | {base_ppl:.2f} | 1.00 |")
    for name, p, s, u in rows:
        print(f"| {name} | {p:.1f} | {s:.2f} | {u:.2f} | {u / s:.2f}x |")


def arch_params(arch) -> float:
    return SubnetSpec.full(arch).num_params() / 1e6


if __name__ == "__main__":
    main()
