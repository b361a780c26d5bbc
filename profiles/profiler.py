"""The profiler: measure building-block latency on this machine with the real runtime, into a table.

Each grid point is a small random model cut from the base architecture (default: the embedded
SmolLM2's shape and vocabulary, so the LM head costs what it really costs): N identical decoder
blocks of one shape (query heads, KV heads, MLP width, model width) in one weight format, plus an
embedding format and a workload (prompt P, generated tokens G). It is extracted with
``subnet.extract``, exported by the runtime's own exporter and timed by the backend's ``measure``
(warm-up, repeats, medians). Per-block costs come from regressing over depths and shapes
(``profiles.costmodel.fit_table``); held-out points report the interpolation error.

Resumable: every measured point is written to the table file as soon as it completes, and a rerun
skips the points already there. ``estimate_table`` builds the roofline table of a remote target.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from profiles import costmodel, roofline
from profiles.costmodel import MIB, block_linears, point_spec, point_workload, read_table, write_table
from subnet.arch import ArchInfo
from subnet.formats import LLAMA_CPP, ONNXRUNTIME, TENSORRT, get_format
from subnet.spec import SubnetSpec
from targets.backend import Workload, backend, fingerprint, memory_record
from targets.registry import Target, get_target

# The embedded SmolLM2-135M's shape: the default base the grid covers.
SMOLLM2 = ArchInfo("llama", 30, 576, 9, 3, 64, 1536, 49152, True)
KV_BYTES = {LLAMA_CPP: 2, ONNXRUNTIME: 4, TENSORRT: 2}  # KV cache element size: llama.cpp f16, ORT f32 graph
PROFILE_WORKLOAD = Workload(prompt_tokens=64, gen_tokens=16, batch=1)
# Default formats profiled per runtime (the search space's defaults and their neighbours)
PROFILE_FORMATS = {
    LLAMA_CPP: ["f16", "q8_0", "q5_0", "q4_0", "iq4_nl"],
    ONNXRUNTIME: ["f32", "int8", "int8_b32", "int8s_b32", "int4_b32", "int4_b64", "int4s_b32"],
}
EMBED_FORMATS = {LLAMA_CPP: None, ONNXRUNTIME: ["f32", "f16", "int8s_b32"]}  # None: any format the layers use


class ProfileError(ValueError):
    """A profile that cannot run here, with the reason and the fix in one line."""


# ---- the grid ---------------------------------------------------------------------------------

def _point(layers, heads, kv, mlp, hidden, fmt, embed, wl: Workload, role="fit") -> dict:
    return {"layers": layers, "heads": heads, "kv_heads": kv, "mlp": mlp, "hidden": hidden, "format": fmt,
            "embed_format": embed, "prompt_tokens": wl.prompt_tokens, "gen_tokens": wl.gen_tokens,
            "batch": wl.batch, "role": role}  # fmt: skip


def point_key(p: dict) -> str:
    """Identity of a grid point (for resume)."""
    keys = ("layers", "heads", "kv_heads", "mlp", "hidden", "format", "embed_format", "prompt_tokens", "gen_tokens", "batch")
    return "|".join(str(p[k]) for k in keys)


def default_grid(runtime: str, base: ArchInfo = SMOLLM2, formats: list[str] | None = None,
                 workload: Workload = PROFILE_WORKLOAD) -> list[dict]:  # fmt: skip
    """A small grid covering the search space of ``base``: every format at two depths (a third of the
    base's and all of it, as a sub-network's) and two block shapes (the base's, and a small, narrow one),
    and at a model width 32 off the base's (a row tail for a 64-wide SIMD step, see costmodel.SIMD_STEP; a
    block off, and the small shape block-aligned, for a format whose blocks are wider and has no fallback);
    width, KV heads, model width and prompt length varied on two formats; every embedding format the
    runtime can store (any block format for llama.cpp, f32/f16/int8s_b32 for ONNX Runtime) under blocks of
    another format (a quantized block format otherwise goes under the quantized table: a 4-bit block under
    a float32 head would be measured mostly as the head's reads); a few held-out shapes (``role:
    holdout``) between them to report the interpolation error."""
    fmts = list(formats or PROFILE_FORMATS[runtime])
    embeds = EMBED_FORMATS[runtime]

    quantized_heads = [e for e in embeds or () if get_format(e).quantized]

    def emb(f):  # the table a block format is measured under: its own, else the kind a deployment pairs it with
        if embeds is None or f in embeds:
            return f
        return quantized_heads[-1] if quantized_heads and get_format(f).quantized else embeds[0]

    h, q, kv, mlp = base.hidden_size, base.num_heads, base.num_kv_heads, base.intermediate_size
    g = base.group_size
    d_lo, d_hi = max(2, base.num_layers // 3), max(4, base.num_layers)
    mid = (d_lo + d_hi) // 2
    pts = []
    for f in fmts:
        fmt = get_format(f)  # widths its blocks divide where it has no fallback (ORT's blocks of 64: no 32-wide tail)
        step = 32 if fmt.fallback else max(32, fmt.block)
        pts.append(_point(d_lo, q, kv, mlp, h, f, emb(f), workload))
        pts.append(_point(d_hi, q, kv, mlp, h, f, emb(f), workload))
        # the narrowest widths searched and drawn
        pts.append(_point(d_hi, g, 1, _align(mlp // 4, max(64, step)), _align(h // 2, step), f, emb(f), workload))
        pts.append(_point(mid, q, kv, mlp, h - step, f, emb(f), workload))
    a, b = fmts[len(fmts) // 2], fmts[-1]  # two formats for the shared dimensions
    for f in (a, b):
        pts.append(_point(mid, q, kv, _align(mlp // 2, 64), _align(h * 2 // 3, 64), f, emb(f), workload))
        pts.append(_point(mid, 2 * g, 2 if kv >= 2 else 1, mlp, h, f, emb(f), workload))
        pts.append(_point(mid, q, kv, mlp, h, f, emb(f), Workload(workload.prompt_tokens // 4, workload.gen_tokens)))
        # the long prompt at the other depth, so per-layer and per-model prompt costs are told apart
        pts.append(_point(d_hi, q, kv, mlp, h, f, emb(f), Workload(workload.prompt_tokens * 4, workload.gen_tokens)))
    heads = fmts if embeds is None else embeds
    if len(fmts) > 1 and len(heads) > 1:  # every embedding / LM head format under blocks of another format,
        for e in heads:  # at the shallow depth, where the head is a large share: its cost is not the blocks'
            pts.append(_point(d_lo, q, kv, mlp, h, a if e != a else b, e, workload))
    # held out: shapes and depths between the grid's
    f1, f2 = fmts[1 % len(fmts)], fmts[-2 if len(fmts) > 1 else 0]
    kv2 = max(1, kv - 1)
    pts.append(_point((mid + d_hi) // 2, g * kv2, kv2, _align(mlp * 2 // 3, 64), h, f1, emb(f1), workload, "holdout"))
    pts.append(_point((d_lo + mid) // 2, q, kv, _align(mlp // 2, 64), _align(h * 5 // 6, 64), f2, emb(f2), workload,
                      "holdout"))  # fmt: skip
    pts.append(_point(mid + 1, q, kv, mlp, h, fmts[0], emb(fmts[-1]) if embeds is None else emb(fmts[0]),
                      Workload(workload.prompt_tokens * 2, workload.gen_tokens), "holdout"))
    seen, out = set(), []
    for p in pts:
        if point_key(p) not in seen:
            seen.add(point_key(p))
            out.append(p)
    return out


def _align(x: int, step: int) -> int:
    return max(step, (x // step) * step)


# ---- measuring one point with the real runtime -------------------------------------------------

class RandomBase:
    """A random model of the base architecture (depth = the deepest grid point) and a tokenizer."""

    def __init__(self, base: ArchInfo, depth: int, tokenizer=None):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        self.arch = ArchInfo(**{**base.to_dict(), "num_layers": depth})
        cfg = LlamaConfig(
            vocab_size=base.vocab_size, hidden_size=base.hidden_size, intermediate_size=base.intermediate_size,
            num_hidden_layers=depth, num_attention_heads=base.num_heads, num_key_value_heads=base.num_kv_heads,
            head_dim=base.head_dim, tie_word_embeddings=base.tie_word_embeddings, max_position_embeddings=8192,
            rope_theta=100000.0,
        )  # fmt: skip
        self.model = LlamaForCausalLM(cfg).eval()
        self.tokenizer = tokenizer if tokenizer is not None else _embedded_tokenizer()


def _embedded_tokenizer():
    from transformers import AutoTokenizer

    from subnet.loading import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir())


def export_for(runtime: str, model, tokenizer, spec: SubnetSpec, out: Path):
    """Export with the runtime's own exporter (no parity run: the weights are random)."""
    if runtime == LLAMA_CPP:
        from targets.gguf_export import write_gguf

        return write_gguf(model, tokenizer, spec, out / "model.gguf")
    if runtime == ONNXRUNTIME:
        from targets.onnx_export import export_onnx

        return export_onnx(model, spec, out / "onnx")
    raise ProfileError(f"no exporter for runtime {runtime!r} here")


def measure_for(runtime: str):
    """The backend's ``measure(artifact, workload, threads, repeats)``."""
    if runtime == LLAMA_CPP:
        from targets.llamacpp import measure
    elif runtime == ONNXRUNTIME:
        from targets.onnxrt import measure
    else:
        raise ProfileError(f"no backend can measure runtime {runtime!r} here")
    return measure


def memory_settings(runtime: str) -> dict:
    """What a peak RSS measured by the runtime's backend today depends on besides the model: how it loads
    the model (its ``DEPLOYMENT``; none where it has no choices) and what the figure counts
    (``targets.backend.memory_record``)."""
    return memory_record(getattr(backend(runtime), "DEPLOYMENT", {}))


def measure_interleaved(model, tokenizer, specs: dict[str, SubnetSpec], runtime: str, workload: Workload,
                        threads: int, rounds: int, repeats: int = 3) -> dict[str, dict]:  # fmt: skip
    """Extract every ``name -> spec`` from ``model`` and export it for ``runtime``, then measure them
    all in ``rounds`` interleaved rounds, so drift in the machine's speed hits every one alike: per
    name, the median decode ms/token, prefill ms and peak RSS, the decode spread (max - min over the
    rounds, relative to the median), and each round's decode and prefill times."""
    import statistics

    from rich.console import Console
    from rich.progress import track

    from subnet.extract import extract

    measure, console = measure_for(runtime), Console(stderr=True)
    work = Path(tempfile.mkdtemp(prefix="packager-interleaved-"))
    try:
        arts = {name: export_for(runtime, extract(model, spec), tokenizer, spec, work / str(i))
                for i, (name, spec) in enumerate(track(specs.items(), description="export", console=console))}  # fmt: skip
        runs: dict[str, list] = {name: [] for name in specs}
        for _ in track(range(rounds), description="measure rounds", console=console):
            for name, art in arts.items():
                runs[name].append(measure(art, workload, threads, repeats))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(rs, key):
        return statistics.median(getattr(r, key) for r in rs)

    return {name: {"decode_ms": med(rs, "decode_ms_per_token"), "prefill_ms": med(rs, "prefill_ms"),
                   "peak_rss_mb": med(rs, "peak_rss_mb"), "rounds": len(rs),
                   "decode_spread": (max(r.decode_ms_per_token for r in rs) - min(r.decode_ms_per_token for r in rs))
                   / med(rs, "decode_ms_per_token"),
                   "decode_rounds": [r.decode_ms_per_token for r in rs], "prefill_rounds": [r.prefill_ms for r in rs]}
            for name, rs in runs.items()}  # fmt: skip


class RealMeasure:
    """Measure a grid point for real: extract from a random base, export, time with the backend."""

    def __init__(self, runtime: str, base: ArchInfo, depth: int, threads: int, repeats: int = 5, tokenizer=None):
        self.runtime, self.threads, self.repeats = runtime, threads, repeats
        self.rb = RandomBase(base, depth, tokenizer)
        self.measure = measure_for(runtime)

    def __call__(self, point: dict) -> dict:
        from subnet.extract import extract

        spec = point_spec(point, self.rb.arch)
        work = Path(tempfile.mkdtemp(prefix="packager-profile-"))
        try:
            t0 = time.perf_counter()
            art = export_for(self.runtime, extract(self.rb.model, spec), self.rb.tokenizer, spec, work)
            t1 = time.perf_counter()
            wl = point_workload(point)
            m = self.measure(art, wl, self.threads, self.repeats)
            size = sum(Path(f).stat().st_size for f in art.files if Path(f).is_file())
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return {"prefill_ms": m.prefill_ms, "decode_ms_per_token": m.decode_ms_per_token,
                "peak_rss_mb": m.peak_rss_mb, "size_mb": size / MIB, "export_s": round(t1 - t0, 2),
                "measure_s": round(time.perf_counter() - t1, 2), "settings": m.settings,
                "memory_settings": m.memory_settings}  # fmt: skip


# ---- the profile loop -------------------------------------------------------------------------

def new_table(target: Target, runtime: str, base: ArchInfo, grid: list[dict], threads: int, version: str | None,
              device: str | None = None) -> dict:  # fmt: skip
    fp = fingerprint(runtime, version or "unknown", threads, device)
    return {
        "format": "packager-profile",
        "version": costmodel.TABLE_VERSION,
        "target": target.name,
        "runtime": runtime,
        "kind": "fitted",
        "provenance": "measured",
        "source": f"profiled on this machine with {runtime} {version}",
        "fingerprint": fp,
        "runtime_version": version,
        "threads": threads,
        "date": fp["date"],
        "base": base.to_dict(),
        "head_dim": base.head_dim,
        "vocab": base.vocab_size,
        "kv_bytes": KV_BYTES.get(runtime, 2),
        "workload": vars(PROFILE_WORKLOAD).copy(),
        "grid": grid,
        "points": [],
    }


def profile(
    target: str | Target,
    runtime: str | None = None,
    grid: list[dict] | None = None,
    out: str | Path | None = None,
    resume: bool = True,
    threads: int | None = None,
    repeats: int = 5,
    base: ArchInfo = SMOLLM2,
    formats: list[str] | None = None,
    measure_point: Callable[[dict], dict] | None = None,
    progress: bool = True,
) -> dict:
    """Profile ``runtime`` on this machine for ``target``; write and return the fitted table.

    ``out`` defaults to ``$PACKAGER_HOME/profiles/<target>__<runtime>.json`` (which then replaces the
    shipped table). With ``resume`` an existing table at ``out`` from the same machine and runtime
    version is continued: its points are skipped. ``measure_point`` (point -> results) replaces the
    real export+measure, for tests.
    """
    import os

    tgt = get_target(target)
    rt = tgt.runtime(runtime)
    if not tgt.host:
        raise ProfileError(
            f"target {tgt.name!r} is a remote device: run `packager profile` on the device itself (this machine "
            f"is {fingerprint(rt, '')['device']}), or use its estimated table"
        )
    if rt == TENSORRT:
        try:
            from targets.tensorrt import available
        except ImportError as e:
            raise ProfileError(f"TensorRT cannot be profiled here: {e}") from None
        ok, why = available()
        raise ProfileError(f"TensorRT cannot be profiled here: {why}" if not ok else
                           "TensorRT profiling is not implemented for the host target")  # fmt: skip
    threads = threads or os.cpu_count()
    grid = grid if grid is not None else default_grid(rt, base, formats)
    bad = sorted({p["format"] for p in grid} - set(tgt.formats(rt)))
    if bad:
        raise ProfileError(f"{tgt.name}/{rt} does not run format(s) {', '.join(bad)}; it runs {', '.join(tgt.formats(rt))}")
    out = Path(out) if out else costmodel.user_tables_dir() / costmodel.table_name(tgt.name, rt)
    version = costmodel.runtime_version(rt)
    table = _resume_or_new(out, resume, tgt, rt, base, grid, threads, version)
    done = {point_key(p) for p in table["points"]}
    todo = [p for p in grid if point_key(p) not in done]
    if todo and measure_point is None:
        depth = max(p["layers"] for p in grid)
        measure_point = RealMeasure(rt, base, depth, threads, repeats)
    _run(table, todo, measure_point, out, base, rt, progress, len(grid) - len(todo))
    costmodel.fit_table(table)
    write_table(table, out)
    return table


def remeasure_memory(table_path: str | Path, out: str | Path | None = None, threads: int | None = None,
                     measure_point: Callable[[dict], dict] | None = None, progress: bool = True) -> dict:
    """Re-measure the peak RSS of a table's points that were measured under other load settings than the
    backend's now, or counted something else (``memory_settings``), refit its memory model and write it to
    ``out`` (default: in place). Latency, its fit and its calibration are kept: a load setting such as
    llama.cpp's mmap moves memory, not speed. Every finished point is written, so an interrupted run resumes."""
    import os

    table = read_table(table_path)
    rt, out = table["runtime"], Path(out or table_path)
    now = memory_settings(rt)
    todo = [p for p in table["points"] if "decode_ms_per_token" in p and p.get("memory_settings") != now]
    threads = threads or table.get("threads") or os.cpu_count()
    if todo and measure_point is None:
        base = ArchInfo(**table["base"])
        measure_point = RealMeasure(rt, base, max(p["layers"] for p in todo), threads, repeats=1)
    from rich.progress import Progress

    with Progress(disable=not progress) as bar:
        task = bar.add_task(f"peak memory {table['target']}/{rt}", total=len(todo))
        for p in todo:
            p["peak_rss_mb"] = measure_point(dict(p))["peak_rss_mb"]
            p["memory_settings"] = now
            write_table(table, out)
            bar.advance(task)
    if todo:
        table["memory_measured"] = {**fingerprint(rt, costmodel.runtime_version(rt) or "unknown", threads), "settings": now}
    table["model"]["memory"] = costmodel.fit_memory(table)
    write_table(table, out)
    return table


def _resume_or_new(out: Path, resume: bool, tgt, rt, base, grid, threads, version) -> dict:
    if out.is_file() and resume:
        table = read_table(out)
        here = fingerprint(rt, version or "unknown", threads)
        fp = table.get("fingerprint", {})
        diffs = [f"{k} {fp.get(k)!r} vs {here[k]!r}" for k in ("device", "cores", "runtime_version", "threads")
                 if fp.get(k) != here[k]]  # fmt: skip
        if table.get("runtime") != rt or table.get("target") != tgt.name:
            diffs.append(f"table is for {table.get('target')}/{table.get('runtime')}")
        if diffs:
            raise ProfileError(
                f"cannot resume {out}: it was measured differently ({'; '.join(diffs)}); pass resume=False "
                f"(--no-resume) to start over, or another output path"
            )
        table["grid"] = table.get("grid", []) + [p for p in grid if point_key(p) not in
                                                 {point_key(q) for q in table.get("grid", [])}]  # fmt: skip
        return table
    return new_table(tgt, rt, base, grid, threads, version)


def _run(table: dict, todo: list[dict], measure_point, out: Path, base: ArchInfo, rt: str, progress: bool,
         already: int) -> None:  # fmt: skip
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    cols = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[last]}"))  # fmt: skip
    with Progress(*cols, disable=not progress, transient=False) as bar:
        task = bar.add_task(f"profile {table['target']}/{rt}", total=len(todo) + already, completed=already, last="")
        for p in todo:
            res = measure_point(dict(p))
            rec = {**p, **res, "weights_mb": point_spec(p, base).weight_bytes() / MIB, "load_avg_1m": _load()}
            table["points"].append(rec)
            write_table(table, out)  # resumable: every finished point is on disk
            bar.update(task, advance=1, last=f"{p['layers']}x({p['heads']}q/{p['kv_heads']}kv/{p['mlp']}/{p['hidden']}) "
                       f"{p['format']}: {res['decode_ms_per_token']:.2f} ms/tok")  # fmt: skip


def _load() -> float | None:
    """1-minute load average while the point ran (other jobs on the CPU inflate and scatter timings)."""
    import os

    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# ---- estimated tables (roofline) ----------------------------------------------------------------

def estimate_table(target: str | Target, runtime: str | None = None, base: ArchInfo = SMOLLM2) -> dict:
    """The roofline table of a remote target from its spec sheet, with per-block points for reference."""
    tgt = get_target(target)
    rt = tgt.runtime(runtime)
    r = roofline.Roofline.of(tgt)
    wl = tgt.workload
    table = {
        "format": "packager-profile",
        "version": costmodel.TABLE_VERSION,
        "target": tgt.name,
        "runtime": rt,
        "kind": "roofline",
        "provenance": "estimated",
        "source": r.source,
        "assumptions": r.assumptions,
        "date": datetime.now(timezone.utc).date().isoformat(),
        "base": base.to_dict(),
        "head_dim": base.head_dim,
        "vocab": base.vocab_size,
        "kv_bytes": roofline.KV_BYTES,
        "workload": vars(wl).copy(),
        "roofline": r.to_dict(),
        "formats": tgt.formats(rt),
        "points": [],
    }
    g = base.group_size
    shapes = [(base.num_heads, base.num_kv_heads, base.intermediate_size, base.hidden_size),
              (g, 1, base.intermediate_size // 3, base.hidden_size)]  # fmt: skip
    for fmt in tgt.formats(rt):
        for heads, kv, mlp, hidden in shapes:
            lin = block_linears(heads, kv, mlp, hidden, base.head_dim, fmt)
            lin = {n: (o, i, costmodel.runtime_format(rt, f, i)) for n, (o, i, f) in lin.items()}
            table["points"].append({
                "block": {"heads": heads, "kv_heads": kv, "mlp": mlp, "hidden": hidden, "format": fmt},
                "workload": vars(wl).copy(),
                "decode_ms": roofline.block_ms(r, lin, heads, kv, base.head_dim, "decode", 1,
                                               costmodel.decode_context(wl), wl.batch),
                "prefill_ms": roofline.block_ms(r, lin, heads, kv, base.head_dim, "prefill", wl.prompt_tokens,
                                                wl.prompt_tokens, wl.batch),
            })  # fmt: skip
    return table


def write_estimated_tables(folder: str | Path = costmodel.TABLES_DIR) -> list[Path]:
    """(Re)write the estimated table of every remote target and runtime into ``folder``."""
    from targets.registry import list_targets

    out = []
    for t in list_targets():
        if t.host or t.bandwidth_gbps is None:
            continue
        for rt in t.runtimes:
            out.append(write_table(estimate_table(t, rt), Path(folder) / costmodel.table_name(t.name, rt)))
    return out


def summary(table: dict) -> list[str]:
    """Human-readable lines about a table (for `packager profile` / `packager targets`)."""
    lines = [f"{table['target']}/{table['runtime']}: {costmodel.provenance(table)}"]
    if table.get("kind") == "fitted" and "model" in table:
        m = table["model"]
        lines.append(f"  {len(table['points'])} grid points, formats {', '.join(m['formats'])}")
        for ph in costmodel.PHASES:
            held = m[ph].get("holdout_mape")
            lines.append(f"  {ph}: fit MAPE {m[ph]['mape']:.1f}%" + (f", held-out MAPE {held:.1f}%" if held is not None else ""))
    elif table.get("kind") == "roofline":
        r = table["roofline"]
        lines.append(f"  roofline: {r['bandwidth_gbps']} GB/s, {r['compute_tflops']} TFLOP/s, "
                     f"launch {r['per_layer_us']} us/layer + {r['per_forward_us']} us/forward (assumed)")  # fmt: skip
    if table.get("notes"):
        lines.append(f"  note: {table['notes']}")
    return lines
