"""Latency and memory of a SubnetSpec on a target + runtime, from a profile table.

A table is JSON (shipped in ``profiles/tables/<target>__<runtime>.json``, or measured by the
profiler into ``$PACKAGER_HOME/profiles/``, which takes precedence). It is one of two kinds:

* ``fitted`` (provenance ``measured``): whole small models measured on the device; latency is a
  non-negative least-squares fit, additive over decoder blocks, of per-format weight counts (decode
  reads weights: cost ~ bytes per format), attention at the context, a per-layer and a fixed term.
  The LM head has its own per-format decode cost: one large matrix-vector product runs at a different
  speed per weight than a block's small ones (measured on llama.cpp CPU: 2-5x cheaper for q8_0/q4_0).
  Weights past a row's last full SIMD step have their own per-format cost too: ggml's AVX-512 f16 dot
  product takes 64 elements per step and the rest one at a time (measured on llama.cpp CPU: 20 f16
  blocks decode 26% slower at model width 544 than at 512, for 6% more weights).
* ``roofline`` (provenance ``estimated``): spec-sheet bandwidth/compute (see ``profiles.roofline``).

Latency is additive: ``total = fixed_cost + sum(layer_cost per kept block)``, which is what the
differentiable search needs (E_p[latency] = sum over layers of expected per-choice costs). A
calibration (scale + offset per phase, fitted on whole-model measurements) is stored in the table;
a per-format calibration also scales each weight format's features on its own (the grid's small
models can misjudge the formats' relative speeds: on a 2-vCPU AMD EPYC they put q4_0 26% ahead of
iq4_nl for the whole SmolLM2, which measured level with it).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from profiles import roofline
from subnet.arch import ArchInfo
from subnet.formats import LLAMA_CPP, ONNXRUNTIME, effective_format, get_format
from subnet.spec import SubnetSpec
from targets.backend import BACKENDS, Measurement, Workload, cpu_features, cpu_model, read_json
from targets.registry import Target, get_target

TABLES_DIR = Path(__file__).with_name("tables")
TABLE_VERSION = 4  # 2: per-format LM head decode features (h:<format>); 3: row-tail features (t:<format>);
# 4: per-format peak memory (m:/e:<format>)
LATENCY_VERSION = 3  # the last version whose latency features changed (an older table's calibration is void)
SIMD_STEP = 64  # elements per step of a row-wise dot product (ggml's AVX-512 f16 kernel)
PHASES = ("decode", "prefill")
MIB = 2**20
MIN_OFFSET_FIT = 12  # whole-model runs needed before calibration also fits an offset


class CostModelError(ValueError):
    """A spec, table or workload the cost model cannot price, with the fix in one line."""


class TableMismatchWarning(UserWarning):
    """The table was measured on another machine or with another runtime version."""


class OutsideGridWarning(UserWarning):
    """A spec or workload outside the profiled grid: the cost is extrapolated."""


@dataclass
class Cost:
    """Predicted latency and memory of one sub-network under one workload."""

    prefill_ms: float
    ttft_ms: float  # time to first token: the prefill produces the first token's logits
    decode_ms_per_token: float
    tokens_per_s: float
    total_ms: float  # ttft + (gen_tokens - 1) decode steps
    peak_memory_mb: float  # weights + KV cache at the workload's context + runtime overhead (MiB)
    size_mb: float  # on disk (MiB)
    provenance: str
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# ---- geometry ------------------------------------------------------------------------------

def block_linears(heads: int, kv_heads: int, mlp: int, hidden: int, head_dim: int, formats) -> dict:
    """name -> (out, in, format) of one decoder block's linears; ``formats`` is one name or a dict."""
    shapes = {
        "q_proj": (heads * head_dim, hidden),
        "k_proj": (kv_heads * head_dim, hidden),
        "v_proj": (kv_heads * head_dim, hidden),
        "o_proj": (hidden, heads * head_dim),
        "gate_proj": (mlp, hidden),
        "up_proj": (mlp, hidden),
        "down_proj": (hidden, mlp),
    }
    fmt = (lambda n: formats) if isinstance(formats, str) else formats.__getitem__
    return {n: (o, i, fmt(n)) for n, (o, i) in shapes.items()}


def stored_format(runtime: str, fmt: str, row: int) -> str:
    """The format a runtime's file really stores for a row of this length (llama.cpp's K-quant fallbacks)."""
    return effective_format(fmt, row) if runtime == LLAMA_CPP else fmt


def runtime_format(runtime: str, fmt: str, row: int) -> str:
    """The format a runtime really computes with for a row of this length: what its file stores, and f32
    for ONNX Runtime's f16 (float16 storage whose Cast ONNX Runtime folds when it loads the graph)."""
    fmt = stored_format(runtime, fmt, row)
    return "f32" if runtime == ONNXRUNTIME and fmt == "f16" else fmt


def runtime_linears(runtime: str, heads: int, kv_heads: int, mlp: int, hidden: int, head_dim: int, formats) -> dict:
    """``block_linears`` with each format as the runtime really stores it (``runtime_format``)."""
    lin = block_linears(heads, kv_heads, mlp, hidden, head_dim, formats)
    return {n: (o, i, runtime_format(runtime, f, i)) for n, (o, i, f) in lin.items()}


def decode_context(workload: Workload) -> float:
    """Mean cached context over the generated tokens (what a decode ms/token averages over)."""
    return workload.prompt_tokens + workload.gen_tokens / 2


# ---- features of the fitted model -----------------------------------------------------------

def layer_features(phase: str, heads, kv_heads, hidden, head_dim, linears: dict, workload: Workload) -> dict:
    """Named features of one decoder block (the fitted model is linear in them)."""
    f: dict[str, float] = {"layer": 1.0}
    tokens = 1 if phase == "decode" else workload.prompt_tokens
    for o, i, fmt in linears.values():
        f["w:" + fmt] = f.get("w:" + fmt, 0.0) + o * i * tokens / 1e6
        if i % SIMD_STEP:
            f["t:" + fmt] = f.get("t:" + fmt, 0.0) + tail_weights(o, i) * tokens
    if phase == "decode":
        c = decode_context(workload)
        f["attn"] = heads * head_dim * c / 1e6
        f["kv"] = kv_heads * head_dim * c / 1e6
    else:
        p = workload.prompt_tokens
        f["act"] = hidden * p / 1e6
        f["attn"] = heads * head_dim * p * p / 1e6
    return f


def tail_weights(rows: int, row_length: int) -> float:
    """Millions of weights a row-wise dot product handles after its last full SIMD step."""
    return rows * (row_length % SIMD_STEP) / 1e6


def fixed_features(phase: str, vocab: int, hidden: int, head_format: str, workload: Workload) -> dict:
    """Named features outside the blocks: constant, embedding lookup and LM head."""
    head = vocab * hidden / 1e6
    if phase == "decode":  # the LM head is one matrix-vector product at its own per-weight cost per format
        f = {"const": 1.0, "h:" + head_format: head}
        if hidden % SIMD_STEP:
            f["t:" + head_format] = tail_weights(vocab, hidden)
        return f
    return {"const": 1.0, "head": head, "headP": head * workload.prompt_tokens}


def _dot(coef: dict, feats: dict) -> float:
    return sum(coef.get(k, 0.0) * v for k, v in feats.items())


# ---- the additive cost API --------------------------------------------------------------------

def _calib(table: dict, phase: str) -> tuple[float, float]:
    c = table.get("calibration", {}).get(phase)
    return (c["scale"], c["offset"]) if c else (1.0, 0.0)


def feature_format(name: str) -> str | None:
    """The weight format a fitted feature prices (``w:``, ``t:``, ``h:``, ``m:``, ``e:<format>``); None for
    shape terms."""
    return name.partition(":")[2] or None


def calibrated_coef(table: dict, phase: str) -> dict:
    """The fitted coefficients of a phase with its calibration's scales applied: a weight format's
    features take that format's scale where the calibration fitted one, every other feature the
    calibration's scale."""
    scale, _ = _calib(table, phase)
    per_fmt = table.get("calibration", {}).get(phase, {}).get("format_scales", {})
    return {k: v * per_fmt.get(feature_format(k), scale) for k, v in table["model"][phase]["coef"].items()}


def layer_cost(
    table: dict,
    heads: int,
    kv_heads: int,
    mlp: int,
    hidden: int,
    formats,
    phase: str = "decode",
    workload: Workload | None = None,
    head_dim: int | None = None,
) -> float:
    """ms one decoder block adds (decode: per token; prefill: for the whole prompt), calibrated."""
    workload = workload or Workload(**table["workload"])
    hd = head_dim or table["head_dim"]
    lin = runtime_linears(table["runtime"], heads, kv_heads, mlp, hidden, hd, formats)
    if table["kind"] == "roofline":
        scale, _ = _calib(table, phase)
        r = roofline.Roofline.from_dict(table["roofline"])
        tokens = 1 if phase == "decode" else workload.prompt_tokens
        ctx = decode_context(workload) if phase == "decode" else workload.prompt_tokens
        return scale * roofline.block_ms(r, lin, heads, kv_heads, hd, phase, tokens, ctx, workload.batch)
    missing = {f for _, _, f in lin.values()} - set(table["model"]["formats"])
    if missing:
        raise CostModelError(_format_msg(table, missing))
    return _dot(calibrated_coef(table, phase), layer_features(phase, heads, kv_heads, hidden, hd, lin, workload))


def fixed_cost(
    table: dict,
    hidden: int,
    head_format: str,
    phase: str = "decode",
    workload: Workload | None = None,
    vocab: int | None = None,
) -> float:
    """ms outside the blocks (LM head, embedding, per-token overhead), calibrated (offset included)."""
    workload = workload or Workload(**table["workload"])
    vocab = vocab or table["vocab"]
    head_format = runtime_format(table["runtime"], head_format, hidden)
    scale, offset = _calib(table, phase)
    if table["kind"] == "roofline":
        r = roofline.Roofline.from_dict(table["roofline"])
        return scale * roofline.fixed_ms(r, vocab, hidden, head_format, workload.batch) + offset
    if head_format not in table["model"].get("head_formats", table["model"]["formats"]):
        raise CostModelError(_format_msg(table, {head_format}, "LM head"))
    return _dot(calibrated_coef(table, phase), fixed_features(phase, vocab, hidden, head_format, workload)) + offset


def _format_msg(table: dict, missing, role: str = "") -> str:
    have = table["model"].get("head_formats" if role else "formats", table["model"]["formats"])
    return (
        f"{role + ' ' if role else ''}format(s) {', '.join(sorted(missing))} were not profiled in the "
        f"{table['target']}/{table['runtime']} table (it has {', '.join(have)}): profile them or choose a profiled format"
    )


def spec_latency(table: dict, spec: SubnetSpec, phase: str, workload: Workload) -> float:
    """Calibrated ms of a whole spec in one phase: fixed + sum of its blocks."""
    b = spec.base
    total = fixed_cost(table, spec.hidden_size, spec.lm_head_format, phase, workload, vocab=b.vocab_size)
    for ly in spec.layers:
        total += layer_cost(table, ly.heads, ly.kv_heads, ly.mlp, spec.hidden_size, ly.formats, phase, workload, b.head_dim)
    return total


# ---- memory and size --------------------------------------------------------------------------

def kv_cache_mb(spec: SubnetSpec, workload: Workload, kv_bytes: float) -> float:
    tokens = workload.context * workload.batch
    return 2 * sum(ly.kv_heads for ly in spec.layers) * spec.base.head_dim * tokens * kv_bytes / MIB


def memory_features(runtime: str, spec: SubnetSpec, workload: Workload, kv_bytes: float) -> dict:
    """Named features of the peak-memory model (MiB): the blocks' weights per format the runtime computes
    with, at its bytes (``m:<format>``); the embedding / LM head per stored format (``e:<format>``: a
    runtime may keep the stored table for the lookup beside a converted or repacked copy for the head);
    the KV cache at the workload's context; and the number of blocks (``layer``: what a runtime holds
    per block besides its weights, 0.47 MiB in ONNX Runtime on SmolLM2's grid, none in llama.cpp).
    Norms and biases are left to the constant."""
    f = {"const": 1.0, "kv": kv_cache_mb(spec, workload, kv_bytes), "layer": float(len(spec.layers))}
    for name, fmt, rows, length in spec.weight_matrices():
        if name.startswith("layers."):
            fmt, role = runtime_format(runtime, fmt, length), "m:"
        else:
            fmt, role = stored_format(runtime, fmt, length), "e:"
        f[role + fmt] = f.get(role + fmt, 0.0) + rows * length * get_format(fmt).bits / 8 / MIB
    return f


def memory_mb(table: dict, spec: SubnetSpec, workload: Workload) -> tuple[float, float]:
    """(peak memory MiB, size on disk MiB) of a spec under a workload."""
    weights = spec.weight_bytes() / MIB
    kv_bytes = table.get("kv_bytes", roofline.KV_BYTES)
    if table["kind"] == "roofline":
        return weights + kv_cache_mb(spec, workload, kv_bytes) + table["roofline"]["runtime_overhead_mb"], weights
    m = table["model"]["memory"]
    feats = memory_features(table["runtime"], spec, workload, kv_bytes)
    missing = sorted(feature_format(k) for k in feats if k not in m["coef"] and feature_format(k))
    if missing and "weights" not in m:
        raise CostModelError(
            f"the peak memory of format(s) {', '.join(missing)} was not profiled in the {table['target']}/"
            f"{table['runtime']} table: profile them (`packager profile`) or choose a profiled format"
        )
    peak = sum(m["coef"].get(k, m.get("weights", 0.0)) * v for k, v in feats.items())
    return peak, weights + table["model"]["size"]["offset_mb"]


# ---- whole-spec prediction ----------------------------------------------------------------------

def provenance(table: dict) -> str:
    cal = table.get("calibration")
    how = ""
    if cal:
        how = f", calibrated on {cal['n']} whole-model runs" + (" per format" if "format_scales" in cal["decode"] else "")
    if table["provenance"] == "measured":
        fp = table.get("fingerprint", {})
        return (
            f"measured: {fp.get('device', '?')}, {fp.get('cores', '?')} cores, {table.get('threads')} threads, "
            f"{table['runtime']} {table.get('runtime_version', '?')}, {str(fp.get('date', table.get('date', '?')))[:10]}{how}"
        )
    return f"estimated: roofline from {table.get('source', 'the spec sheet')}{how}"


def check_spec(table: dict, spec: SubnetSpec, workload: Workload) -> list[str]:
    """Where a spec or workload lies outside the table's profiled grid (one line per dimension)."""
    rng = table.get("ranges")
    if not rng:
        return []
    out = []
    vals = {
        "heads": [ly.heads for ly in spec.layers],
        "kv_heads": [ly.kv_heads for ly in spec.layers],
        "mlp": [ly.mlp for ly in spec.layers],
        "hidden": [spec.hidden_size],
        "prompt_tokens": [workload.prompt_tokens],
        "context": [decode_context(workload)],
        "batch": [workload.batch],
    }
    for dim, xs in vals.items():
        if dim not in rng:
            continue
        lo, hi = rng[dim]
        bad = [x for x in xs if not lo <= x <= hi]
        if bad:
            out.append(f"{dim} {sorted(set(bad))[0] if len(set(bad)) == 1 else sorted(set(bad))} is outside the "
                       f"profiled range {lo}..{hi} of {table['target']}/{table['runtime']}: extrapolating linearly")
    return out


def predict(
    spec: SubnetSpec,
    target: str | Target,
    runtime: str | None = None,
    workload: Workload | None = None,
    table: dict | str | os.PathLike | None = None,
) -> Cost:
    """Latency, memory and size of ``spec`` on ``target``/``runtime`` under ``workload``."""
    tgt = get_target(target)
    rt = tgt.runtime(runtime)
    workload = workload or tgt.workload
    if table is None or not isinstance(table, dict):
        table = load_table(tgt, rt, path=table)
    if table["runtime"] != rt:
        raise CostModelError(f"table is for runtime {table['runtime']!r}, not {rt!r}: pass the {rt} table")
    bad = sorted(f for f in spec.formats_used() if f not in tgt.formats(rt))
    if bad:
        raise CostModelError(
            f"{tgt.name}/{rt} cannot run format(s) {', '.join(bad)}; it runs {', '.join(tgt.formats(rt))}"
        )
    notes = check_spec(table, spec, workload)
    for n in notes:
        warnings.warn(n, OutsideGridWarning, stacklevel=2)
    prefill = spec_latency(table, spec, "prefill", workload)
    decode = spec_latency(table, spec, "decode", workload)
    peak, size = memory_mb(table, spec, workload)
    return Cost(
        prefill_ms=prefill,
        ttft_ms=prefill,
        decode_ms_per_token=decode,
        tokens_per_s=1000.0 / decode,
        total_ms=prefill + max(workload.gen_tokens - 1, 0) * decode,
        peak_memory_mb=peak,
        size_mb=size,
        provenance=provenance(table),
        warnings=notes,
    )


# ---- fitting and calibration -------------------------------------------------------------------

def point_spec(p: dict, base: ArchInfo) -> SubnetSpec:
    """The spec of a grid point: the first ``layers`` blocks of ``base`` (deepened if needed) cut to its shape."""
    base = ArchInfo(**{**base.to_dict(), "num_layers": max(base.num_layers, p["layers"])})
    return SubnetSpec.uniform(base, layers=list(range(p["layers"])), heads=p["heads"], kv_heads=p["kv_heads"],
                              mlp=p["mlp"], hidden_size=p["hidden"], fmt=p["format"],
                              embed_format=p["embed_format"]).validate()  # fmt: skip


def point_workload(p: dict) -> Workload:
    """The workload a grid point was measured under."""
    return Workload(p["prompt_tokens"], p["gen_tokens"], p.get("batch", 1))


def point_spec_features(table: dict, point: dict, phase: str) -> dict:
    """Features of one profiled whole model (a grid point: N identical blocks)."""
    wl = point_workload(point)
    hd, rt = point.get("head_dim", table["head_dim"]), table["runtime"]
    lin = runtime_linears(rt, point["heads"], point["kv_heads"], point["mlp"], point["hidden"], hd, point["format"])
    feats = fixed_features(phase, point.get("vocab", table["vocab"]), point["hidden"],
                           runtime_format(rt, point["embed_format"], point["hidden"]), wl)
    for k, v in layer_features(phase, point["heads"], point["kv_heads"], point["hidden"], hd, lin, wl).items():
        feats[k] = feats.get(k, 0.0) + point["layers"] * v
    return feats


def _nnls_relative(rows: list[dict], y: np.ndarray) -> tuple[dict, np.ndarray]:
    """Non-negative least squares on relative error; returns coef by feature name and predictions."""
    from scipy.optimize import nnls

    names = sorted({k for r in rows for k in r})
    a = np.array([[r.get(k, 0.0) for k in names] for r in rows])
    w = 1.0 / y
    norm = np.maximum(np.abs(a * w[:, None]).max(axis=0), 1e-12)  # column scaling for conditioning
    x, _ = nnls(a * w[:, None] / norm, y * w, maxiter=50 * len(names))
    x = x / norm
    return dict(zip(names, x.tolist())), a @ x


def fit_table(table: dict) -> dict:
    """Fit the latency, memory and size models of a measured table from its raw points (in place)."""
    measured = [p for p in table["points"] if "decode_ms_per_token" in p]
    pts = [p for p in measured if p.get("role", "fit") == "fit"]
    held = [p for p in measured if p.get("role") == "holdout"]
    if len(pts) < 3:
        raise CostModelError(f"a table needs at least 3 measured points to fit, it has {len(pts)}: profile more")
    model: dict = {"formats": sorted({p["format"] for p in pts}),  # of blocks: a head format alone prices no block
                   "head_formats": sorted({p["embed_format"] for p in pts})}
    for phase, key in (("decode", "decode_ms_per_token"), ("prefill", "prefill_ms")):
        rows = [point_spec_features(table, p, phase) for p in pts]
        y = np.array([p[key] for p in pts])
        coef, pred = _nnls_relative(rows, y)
        model[phase] = {"coef": coef, "mape": _mape(pred, y)}
        if held:
            yh = np.array([p[key] for p in held])
            ph = np.array([_dot(coef, point_spec_features(table, p, phase)) for p in held])
            model[phase]["holdout_mape"] = _mape(ph, yh)
            model[phase]["holdout_n"] = len(held)
    weights = np.array([p["weights_mb"] for p in pts])
    model["memory"] = fit_memory(table)
    model["size"] = {"offset_mb": float(np.median(np.array([p["size_mb"] for p in pts]) - weights))}
    table["model"] = model
    table["kind"] = "fitted"
    table["ranges"] = _ranges(pts)
    return table


def fit_memory(table: dict) -> dict:
    """Fit the peak-memory model of a measured table from its points' peak RSS (``memory_features``):
    resident MiB per MiB of each weight format, which is not 1 (llama.cpp keeps a repacked copy of its
    4-bit blocks beside the mapped file; ONNX Runtime folds float16 into float32)."""
    base = ArchInfo(**table["base"])
    seen = [p for p in table["points"] if p.get("peak_rss_mb", 0) > 0]  # a 0 means the backend could not see it
    pts = [p for p in seen if p.get("role", "fit") == "fit"]
    if len(pts) < 3:
        return {"coef": {"const": 0.0, "kv": 1.0}, "weights": 1.0,
                "note": "no usable peak RSS measured: weights + KV only"}  # fmt: skip

    def rows(points):
        return [memory_features(table["runtime"], point_spec(p, base), point_workload(p), table["kv_bytes"])
                for p in points]  # fmt: skip

    y = np.array([p["peak_rss_mb"] for p in pts])
    coef, pred = _nnls_relative(rows(pts), y)
    mem = {"coef": coef, "mape": _mape(pred, y)}
    held = [p for p in seen if p.get("role") == "holdout"]
    if held:
        mem["holdout_mape"] = _mape([_dot(coef, f) for f in rows(held)], [p["peak_rss_mb"] for p in held])
        mem["holdout_n"] = len(held)
    return mem


def _mape(pred, y) -> float:
    return float(np.mean(np.abs(np.asarray(pred) - np.asarray(y)) / np.asarray(y)) * 100)


def _ranges(pts: list[dict]) -> dict:
    def r(xs):
        return [min(xs), max(xs)]

    return {
        "heads": r([p["heads"] for p in pts]),
        "kv_heads": r([p["kv_heads"] for p in pts]),
        "mlp": r([p["mlp"] for p in pts]),
        "hidden": r([p["hidden"] for p in pts]),
        "prompt_tokens": r([p["prompt_tokens"] for p in pts]),
        "context": r([p["prompt_tokens"] + p["gen_tokens"] / 2 for p in pts]),
        "batch": r([p.get("batch", 1) for p in pts]),
    }


def calibrate(table: dict, measurements: list[tuple[SubnetSpec, Measurement]], per_format: bool = False) -> dict:
    """Fit measured ≈ scale·predicted + offset per phase on whole-model runs; store it in the table.

    Fewer than MIN_OFFSET_FIT runs fit a scale only (the median ratio); more fit scale and offset.
    ``per_format`` (fitted tables) also gives each weight format its own scale (``_format_scales``):
    a grid of small models can misjudge the formats' relative speeds, which whole models pin down.
    """
    if not measurements:
        raise CostModelError("calibration needs at least one (spec, measurement) pair")
    if per_format and table["kind"] != "fitted":
        raise CostModelError(f"per-format calibration needs a fitted (measured) table, not a {table['kind']} one")
    table.pop("calibration", None)
    cal: dict = {"n": len(measurements)}
    workloads = [Workload(**{k: m.workload[k] for k in ("prompt_tokens", "gen_tokens", "batch") if k in m.workload})
                 for _, m in measurements]  # fmt: skip
    runs = list(zip(measurements, workloads))
    measured = {}
    for phase, key in (("decode", "decode_ms_per_token"), ("prefill", "prefill_ms")):
        p = np.array([spec_latency(table, spec, phase, wl) for (spec, _), wl in runs])
        y = measured[phase] = np.array([getattr(m, key) for (_, m), _ in runs])
        if len(p) >= MIN_OFFSET_FIT and np.ptp(p) > 1e-9 and not per_format:
            scale, offset = np.polyfit(p, y, 1)
        else:  # few (noisy) runs: a robust scale only; an offset fitted on them extrapolates badly
            scale, offset = float(np.median(y / p)), 0.0
        cal[phase] = {"scale": float(scale), "offset": float(offset), "mape_before": _mape(p, y)}
        if per_format:
            parts = [_format_parts(table, spec, phase, wl) for (spec, _), wl in runs]
            cal[phase] |= _format_scales(parts, y, float(scale))
    table["calibration"] = cal
    for phase, y in measured.items():  # scored through the calibrated prediction itself
        cal[phase]["mape_after"] = _mape([spec_latency(table, spec, phase, wl) for (spec, _), wl in runs], y)
    return table


FORMAT_PRIOR = 1.0  # per-format calibration: the pull of each format's scale towards the common one, in runs


def _format_parts(table: dict, spec: SubnetSpec, phase: str, workload: Workload) -> dict[str, float]:
    """Uncalibrated ms of a spec split by the weight format each fitted feature prices ("" = shape terms)."""
    coef, rt, h, hd = table["model"][phase]["coef"], table["runtime"], spec.hidden_size, spec.base.head_dim
    feats = [fixed_features(phase, spec.base.vocab_size, h, runtime_format(rt, spec.lm_head_format, h), workload)]
    for ly in spec.layers:
        lin = runtime_linears(rt, ly.heads, ly.kv_heads, ly.mlp, h, hd, ly.formats)
        feats.append(layer_features(phase, ly.heads, ly.kv_heads, h, hd, lin, workload))
    parts: dict[str, float] = {}
    for f in feats:
        for k, v in f.items():
            g = feature_format(k) or ""
            parts[g] = parts.get(g, 0.0) + coef.get(k, 0.0) * v
    return parts


def _format_scales(parts: list[dict[str, float]], y: np.ndarray, common: float) -> dict:
    """Scales per group (weight format; "" = shape terms) minimising relative error, each pulled
    towards ``common`` as much as FORMAT_PRIOR runs holding the group at its mean share would pull."""
    from scipy.optimize import nnls

    groups = sorted({g for pt in parts for g, c in pt.items() if c > 0})
    a = np.array([[pt.get(g, 0.0) / yi for g in groups] for pt, yi in zip(parts, y)])  # share of each run's ms
    prior = np.sqrt(FORMAT_PRIOR) * np.diag(a.mean(axis=0))
    x, _ = nnls(np.vstack([a, prior]), np.concatenate([np.ones(len(y)), prior @ np.full(len(groups), common)]))
    fit = dict(zip(groups, x.tolist()))
    return {"scale": fit.pop("", common), "format_scales": fit, "format_prior_runs": FORMAT_PRIOR}


# ---- tables on disk ---------------------------------------------------------------------------

def table_name(target: str, runtime: str) -> str:
    return f"{target}__{runtime}.json"


def user_tables_dir() -> Path:
    from subnet.loading import packager_home

    return packager_home() / "profiles"


def shipped_tables(target: str, runtime: str) -> list[Path]:
    """The shipped tables of target+runtime: the default one, then those measured on other CPUs
    (``<target>__<runtime>--<cpu>.json``)."""
    default = TABLES_DIR / table_name(target, runtime)
    return [p for p in [default, *sorted(TABLES_DIR.glob(f"{target}__{runtime}--*.json"))] if p.is_file()]


def table_path(target: str, runtime: str) -> Path:
    """The table used for target+runtime: a profiled one in $PACKAGER_HOME/profiles wins over the shipped
    ones; of those, the one measured on the machine most like this one (``machine_distance``: the same CPU
    first, then the fewest SIMD features differing), the default on a tie."""
    user = user_tables_dir() / table_name(target, runtime)
    if user.is_file():
        return user
    shipped = shipped_tables(target, runtime)
    if not shipped:
        return TABLES_DIR / table_name(target, runtime)
    return min(shipped, key=lambda p: machine_distance(_fingerprint(str(p), p.stat().st_mtime)))


def machine_distance(fp: dict | None) -> tuple[int, int]:
    """How unlike this machine a measured table's fingerprint is, in order: whether the CPU name or core
    count differs, then how many SIMD features differ ((0, 0): alike, or no fingerprint or features
    recorded, as ``machine_mismatch`` reads them). On a CPU no table was measured on, the features
    still pick the closest (stop 43: on an Intel Xeon with AVX-512 and VNNI the AVX-512 VNNI EPYC's
    llama.cpp table priced random sub-networks 12.5% off, the AVX2 EPYC's 207%)."""
    if fp is None:
        return 0, 0
    other = int((fp.get("device"), fp.get("cores")) != (cpu_model(), os.cpu_count()))
    theirs = fp.get("cpu_features")
    return other, 0 if theirs is None else len(set(theirs) ^ set(cpu_features()))


@lru_cache(maxsize=32)
def _fingerprint(path: str, mtime: float) -> dict | None:
    table = read_table(path)
    return table.get("fingerprint") if table.get("provenance") == "measured" else None


def read_table(path: str | os.PathLike) -> dict:
    table = read_json(path, "profile table", CostModelError)
    if not isinstance(table, dict) or table.get("format") != "packager-profile":
        raise CostModelError(f"{path} is not a packager profile table (no \"format\": \"packager-profile\")")
    return table


def write_table(table: dict, path: str | os.PathLike) -> Path:
    """Write a table atomically (temp file, then rename); where it was loaded from is not kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({k: v for k, v in table.items() if k != "path"}, indent=1))
    os.replace(tmp, path)
    return path


def runtime_version(runtime: str) -> str | None:
    """Installed version of a runtime (the backend's own ``version()`` when it has one)."""
    module, dist = BACKENDS[runtime]
    try:
        return str(importlib.import_module(module).version())
    except Exception:  # backend missing or its runtime not importable: fall back to the package version
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None


def machine_mismatch(fp: dict | None) -> str | None:
    """How the machine of a measured table's fingerprint differs from this one (None: alike, or no fingerprint)."""
    if fp is None:
        return None
    here = (cpu_model(), os.cpu_count())
    if (fp.get("device"), fp.get("cores")) != here:
        return (f"was measured on {fp.get('device')!r} ({fp.get('cores')} cores) but this machine is {here[0]!r} "
                f"({here[1]} cores)")  # fmt: skip
    theirs, ours = set(fp.get("cpu_features") or ()), set(cpu_features())
    if fp.get("cpu_features") is not None and theirs != ours:
        # the same name on other silicon (an AVX2-only and an AVX-512 VNNI "AMD EPYC" both say "AMD EPYC")
        only = [", ".join(sorted(x)) or "nothing more" for x in (theirs - ours, ours - theirs)]
        return (f"was measured on a {fp.get('device')!r} with other SIMD features (it had {only[0]}; "
                f"this one has {only[1]}), so its kernels and speeds differ")  # fmt: skip
    return None


def table_mismatches(table: dict, target: Target) -> list[str]:
    """Why a measured table may not describe this machine (host targets only): machine, runtime version."""
    if table.get("provenance") != "measured" or not target.host:
        return []
    where = f"profile table {target.name}/{table['runtime']}"
    redo = f"re-run `packager profile --target {target.name} --runtime {table['runtime']}`"
    out = []
    machine = machine_mismatch(table.get("fingerprint", {}))
    if machine:
        out.append(f"{where} {machine}: {redo}")
    have = runtime_version(table["runtime"])
    if table.get("runtime_version") != have:
        out.append(f"{where} was measured with {table['runtime']} {table.get('runtime_version')} but {have} is "
                   f"installed: {redo}")  # fmt: skip
    return out


@lru_cache(maxsize=32)
def _load_cached(path: str, mtime: float, target_name: str, runtime: str) -> str:
    """The table file as JSON; a fitted table of an older version is refitted here, once per file version."""
    table = read_table(path)
    if table.get("kind") == "fitted" and "model" in table and table.get("version", 1) < TABLE_VERSION:
        dropped, refit = None, table.get("version", 1) < LATENCY_VERSION
        if refit:
            fit_table(table)
            dropped = table.pop("calibration", None)
        else:  # only the memory model changed: the latency fit and its calibration stand
            table["model"]["memory"] = fit_memory(table)
        table["version"] = TABLE_VERSION
        what = "refitted" if refit else "its peak-memory model refitted"
        warnings.warn(f"WARNING: {path} was fitted by an older packager: {what} from its {len(table['points'])} "
                      "points" + (", its calibration dropped (re-calibrate it, see README)" if dropped else ""),
                      TableMismatchWarning, stacklevel=3)  # fmt: skip
    return json.dumps(table)


def load_table(target: str | Target, runtime: str | None = None, path=None, check: bool = True) -> dict:
    """The profile table of target+runtime (or the file at ``path``); warns loudly on a mismatch."""
    tgt = get_target(target)
    rt = tgt.runtime(runtime)
    p = Path(path) if path else table_path(tgt.name, rt)
    if not p.is_file():
        hint = (f"run `packager profile --target {tgt.name} --runtime {rt}`" if tgt.host
                else f"build the estimate with profiles.profiler.estimate_table('{tgt.name}', '{rt}')")
        raise CostModelError(f"no profile table for {tgt.name}/{rt} (looked for {p}): {hint}")
    table = json.loads(_load_cached(str(p), p.stat().st_mtime, tgt.name, rt))
    if table.get("runtime") != rt or table.get("target") != tgt.name:
        raise CostModelError(
            f"{p} is the table of {table.get('target')}/{table.get('runtime')}, not {tgt.name}/{rt}"
        )
    if table.get("kind") == "fitted" and "model" not in table:
        raise CostModelError(f"{p} has raw points but no fitted model (an interrupted profile): re-run the profile")
    if check:
        for msg in table_mismatches(table, tgt):
            warnings.warn("WARNING: " + msg, TableMismatchWarning, stacklevel=2)
    table["path"] = str(p)
    return table
