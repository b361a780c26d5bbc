"""Estimated latency from a spec sheet (roofline), for targets that cannot be measured here.

A forward pass of one decoder block costs ``max(bytes / bandwidth, flops / peak compute)`` plus a
fixed per-layer launch overhead; the spec-sheet figures and the overheads (an explicit assumption,
stated in the target file) come from the target definition. Decode reads every weight in its storage
format plus the KV cache at the context; prefill of P tokens does ``2·params·P`` flops on the matmuls
plus causal attention. The LM head runs on the last token only (as llama.cpp and TensorRT-LLM do).
Peak rates are spec-sheet peaks, so estimates are optimistic lower bounds: a measured table wins.
"""

from __future__ import annotations

from dataclasses import dataclass

from subnet.formats import get_format
from targets.registry import Target, TargetError

KV_BYTES = 2  # f16 KV cache, the default of llama.cpp CUDA, TensorRT and ONNX Runtime CUDA fp16 graphs
INT8_COMPUTE = {"int8"}  # weight formats whose matmuls run on int8 tensor cores (W8A8); the rest use fp16


@dataclass(frozen=True)
class Roofline:
    """The figures a roofline estimate needs (from a Target's spec sheet and stated assumptions)."""

    bandwidth_gbps: float
    compute_tflops: dict[str, float]  # fp32 / fp16 / int8 dense peaks
    per_layer_us: float
    per_forward_us: float
    runtime_overhead_mb: float
    source: str
    assumptions: str

    @classmethod
    def of(cls, target: Target) -> "Roofline":
        if target.bandwidth_gbps is None or not target.compute_tflops:
            raise TargetError(
                f"target {target.name!r} has no spec-sheet bandwidth/compute (it is measured): profile it with "
                f"`packager profile --target {target.name}` instead of estimating"
            )
        lo = target.launch_overhead_us
        return cls(
            bandwidth_gbps=target.bandwidth_gbps,
            compute_tflops=dict(target.compute_tflops),
            per_layer_us=lo.get("per_layer", 0.0),
            per_forward_us=lo.get("per_forward", 0.0),
            runtime_overhead_mb=target.runtime_overhead_mb or 0.0,
            source=target.source,
            assumptions=target.assumptions,
        )

    @classmethod
    def from_dict(cls, d: dict) -> "Roofline":
        return cls(**d)

    def to_dict(self) -> dict:
        return dict(vars(self))

    def compute_dtype(self, fmt: str) -> str:
        if fmt == "f32":
            return "fp32"
        return "int8" if fmt in INT8_COMPUTE and "int8" in self.compute_tflops else "fp16"

    def matmul_ms(self, params: float, fmt: str, tokens: int) -> tuple[float, float]:
        """(memory ms, compute ms) of one weight matrix of ``params`` weights applied to ``tokens`` rows."""
        mem = params * get_format(fmt).bits / 8 / (self.bandwidth_gbps * 1e9) * 1e3
        flops = 2.0 * params * tokens
        comp = flops / (self.compute_tflops[self.compute_dtype(fmt)] * 1e12) * 1e3
        return mem, comp


def block_ms(
    r: Roofline,
    linears: dict[str, tuple[int, int, str]],
    heads: int,
    kv_heads: int,
    head_dim: int,
    phase: str,
    tokens: int,
    context: int,
    batch: int = 1,
) -> float:
    """Estimated ms of one decoder block; ``linears`` maps name -> (out, in, format).

    decode: ``tokens`` = 1 per sequence at ``context`` cached tokens; prefill: ``tokens`` = P, context = P.
    """
    rows = tokens * batch
    mem = comp = 0.0
    for o, i, fmt in linears.values():
        m, c = r.matmul_ms(o * i, fmt, rows)
        mem += m
        comp += c
    kv = 2 * kv_heads * head_dim * batch * KV_BYTES
    if phase == "decode":
        mem += kv * context / (r.bandwidth_gbps * 1e9) * 1e3  # read the cache
        attn_flops = 4.0 * heads * head_dim * context * batch
    else:
        mem += kv * tokens / (r.bandwidth_gbps * 1e9) * 1e3  # write the cache
        attn_flops = 4.0 * heads * head_dim * tokens * (tokens + 1) / 2 * batch  # causal
    comp += attn_flops / (r.compute_tflops["fp16"] * 1e12) * 1e3
    return max(mem, comp) + r.per_layer_us / 1e3


def fixed_ms(r: Roofline, vocab: int, hidden: int, head_format: str, batch: int = 1) -> float:
    """Estimated ms outside the blocks: the LM head on the last token plus the per-forward overhead."""
    mem, comp = r.matmul_ms(vocab * hidden, head_format, batch)
    return max(mem, comp) + r.per_forward_us / 1e3
