"""Proof of the cost model: predicted vs measured latency and memory of random SmolLM2 sub-networks.

Draws N random sub-networks of the embedded SmolLM2 (half uniform, half heterogeneous; mixed
per-layer formats the runtime holds and its profile table covers), exports each for real (GGUF for
llama.cpp, ONNX for ONNX Runtime), measures prefill and decode on this machine with the runtime's
backend, and prints per runtime: MAPE and Spearman rank correlation of decode ms/token and prefill ms,
and predicted vs measured peak memory. Optionally calibrates on the first K runs (scored on the rest)
and writes the calibrated table (--save-table). --rows re-scores the runs of an earlier --out file
(e.g. against a refitted table) without measuring again. --calibrate-rows calibrates on other runs
(whole models at uniform formats from ``bench_format_mixes.py --measure --out``) and scores all of
these; --per-format gives each weight format its own calibration scale.

    .venv/bin/python benchmarks/bench_costmodel.py --runtime llama.cpp --n 30 --threads 1

Slow (an export per sub-network, then --rounds interleaved rounds of measurements, so drift in the
machine's speed hits every sub-network alike) and sensitive to other load on the CPU: report the
load with the numbers. Results are appended to --out after the last round.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from profiles import costmodel, profiler  # noqa: E402
from subnet.formats import get_format  # noqa: E402
from subnet.spec import LayerSpec, SubnetSpec  # noqa: E402
from targets.backend import Workload  # noqa: E402
from targets.registry import get_target  # noqa: E402


def draw_spec(rng: random.Random, base, formats: list[str], embed_formats: list[str], hetero: bool,
              prune_hidden: bool = True) -> SubnetSpec:  # fmt: skip
    """A random sub-network: depth, heads, KV heads, MLP width, model width and per-layer formats."""
    depth = rng.randint(base.num_layers // 3, base.num_layers)
    kept = sorted(rng.sample(range(base.num_layers), depth))
    hidden = base.hidden_size
    if prune_hidden:
        hidden = rng.choice([h for h in range(base.hidden_size // 2, base.hidden_size + 1, 64)])

    def shape():
        kv = rng.randint(1, base.num_kv_heads)
        return kv * rng.randint(1, base.group_size), kv, rng.randrange(256, base.intermediate_size + 1, 64)

    fitting = [f for f in formats if get_format(f).fits(hidden)]  # e.g. no blocks of 64 at width 416

    def fmts():
        a, m = rng.choice(fitting), rng.choice(fitting)
        return {"q_proj": a, "k_proj": a, "v_proj": a, "o_proj": a, "gate_proj": m, "up_proj": m, "down_proj": m}

    common, cf = shape(), fmts()
    layers = []
    for i in kept:
        heads, kv, mlp = shape() if hetero else common
        layers.append(LayerSpec(i, heads, kv, mlp, fmts() if hetero else dict(cf)))
    emb = rng.choice(embed_formats)
    return SubnetSpec(base, hidden, layers, emb, emb).validate()


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def mape(pred, meas) -> float:
    return 100 * statistics.fmean(abs(p - m) / m for p, m in zip(pred, meas))


def row_workload(row: dict, wl: Workload) -> Workload:
    """The workload a run was measured under (rows of bench_format_mixes record theirs), else ``wl``."""
    return Workload(**row["workload"]) if "workload" in row else wl


def repredict(rows: list[dict], tgt, runtime: str, wl: Workload, table: dict) -> list[dict]:
    """Set the predicted fields of measured ``rows`` from ``table`` (refitted or calibrated since)."""
    for r in rows:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cost = costmodel.predict(SubnetSpec.from_dict(r["spec"]), tgt, runtime, row_workload(r, wl), table)
        r["pred_decode_ms_per_token"], r["pred_prefill_ms"] = cost.decode_ms_per_token, cost.prefill_ms
        r["pred_peak_memory_mb"] = cost.peak_memory_mb
    return rows


def measured_runs(a, tgt, table: dict, wl: Workload) -> list[dict]:
    """Draw and export ``a.n`` random sub-networks, measure them in ``a.rounds`` interleaved rounds
    (medians), and append each run to ``a.out``."""
    from subnet.loading import load_model

    threads = a.threads or table.get("threads") or 1
    lm = load_model(None)
    formats = [f for f in table["model"]["formats"] if f in tgt.formats(a.runtime)]
    embeds = profiler.EMBED_FORMATS[a.runtime] or formats
    rng = random.Random(a.seed)
    specs = {k: draw_spec(rng, lm.arch, formats, [e for e in embeds if e in formats], hetero=bool(k % 2),
                          prune_hidden=not a.keep_hidden) for k in range(a.n)}  # fmt: skip
    print(f"{a.runtime}: {a.n} sub-networks, formats {formats}, embed {embeds}, threads {threads}, workload {wl}, "
          f"{a.rounds} interleaved rounds")  # fmt: skip
    measured = profiler.measure_interleaved(lm.model, lm.tokenizer, specs, a.runtime, wl, threads, a.rounds, a.repeats)
    rows = []
    for k, spec in specs.items():
        m = measured[k]
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            cost = costmodel.predict(spec, tgt, a.runtime, wl, table)
        row = {"k": k, "hetero": bool(k % 2), "layers": len(spec.layers), "hidden": spec.hidden_size,
               "formats": sorted(spec.formats_used()), "spec": spec.to_dict(), "workload": vars(wl), "rounds": m["rounds"],
               "pred_decode_ms_per_token": cost.decode_ms_per_token, "meas_decode_ms_per_token": m["decode_ms"],
               "decode_spread": m["decode_spread"], "decode_rounds": m["decode_rounds"],
               "prefill_rounds": m["prefill_rounds"], "pred_prefill_ms": cost.prefill_ms, "meas_prefill_ms": m["prefill_ms"],
               "pred_peak_memory_mb": cost.peak_memory_mb, "meas_peak_memory_mb": m["peak_rss_mb"],
               "warnings": [str(x.message) for x in w]}  # fmt: skip
        rows.append(row)
        with Path(a.out).open("a") as f:
            f.write(json.dumps({"runtime": a.runtime, **row}) + "\n")
        print(f"[{k + 1}/{a.n}] {len(spec.layers)} layers hidden {spec.hidden_size} {'hetero' if k % 2 else 'uniform'} "
              f"{row['formats']}: decode {cost.decode_ms_per_token:.2f} pred / {m['decode_ms']:.2f} meas ms/tok "
              f"(spread {100 * m['decode_spread']:.0f}%), prefill {cost.prefill_ms:.0f} / {m['prefill_ms']:.0f} ms, "
              f"mem {cost.peak_memory_mb:.0f} / {m['peak_rss_mb']:.0f} MiB")  # fmt: skip
    return rows


def read_rows(path, runtime: str) -> list[dict]:
    """The runs of one runtime in a JSON-lines file written by this script or bench_format_mixes."""
    return [r for r in map(json.loads, Path(path).read_text().splitlines()) if r["runtime"] == runtime]


def summarize(rows: list[dict], runtime: str, calib_k: int) -> None:
    from rich.console import Console
    from rich.table import Table

    scored = rows[calib_k:]
    t = Table(title=f"{runtime}: predicted vs measured on {len(scored)} random SmolLM2 sub-networks"
              + (f" (calibrated on {calib_k} others)" if calib_k else ""))  # fmt: skip
    for c in ("quantity", "MAPE %", "Spearman", "pred range", "meas range"):
        t.add_column(c)
    for key, label in (("decode_ms_per_token", "decode ms/token"), ("prefill_ms", "prefill ms"),
                       ("peak_memory_mb", "peak memory MiB")):  # fmt: skip
        pkey = "pred_" + key
        mkey = "meas_" + key
        p = [r[pkey] for r in scored]
        m = [r[mkey] for r in scored]
        if not scored or min(m) <= 0:
            continue
        t.add_row(label, f"{mape(p, m):.1f}", f"{spearman(p, m):.3f}",
                  f"{min(p):.1f}..{max(p):.1f}", f"{min(m):.1f}..{max(m):.1f}")  # fmt: skip
    for phase, label in (("decode", "decode ms/token"), ("prefill", "prefill ms")):
        floor = self_agreement(scored, phase + "_rounds")
        if floor:
            t.add_row(f"{label}: one round vs the others' median", f"{floor[0]:.1f}", f"{floor[1]:.3f}", "", "")
    Console().print(t)


def self_agreement(rows: list[dict], key: str) -> tuple[float, float] | None:
    """How well the measurements predict themselves: each round of every run scored against the median
    of that run's other rounds, as (MAPE %, mean Spearman over rounds). A predictor of the medians cannot
    be expected to do better than this. None when the runs hold fewer than 2 rounds each."""
    rounds = [r[key] for r in rows if len(r.get(key) or []) >= 2]
    if len(rounds) < 3 or len(rounds) != len(rows):
        return None
    n = min(len(rs) for rs in rounds)
    others = [[statistics.median(rs[:i] + rs[i + 1 : n]) for rs in rounds] for i in range(n)]
    one = [[rs[i] for rs in rounds] for i in range(n)]
    return (statistics.fmean(mape(o, m) for o, m in zip(others, one)),
            statistics.fmean(spearman(o, m) for o, m in zip(others, one)))  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", default="llama.cpp", choices=["llama.cpp", "onnxruntime"])
    ap.add_argument("--target", default="laptop-cpu")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="default: the table's threads")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds: every sub-network is measured once per round (medians)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default: the target's workload)")
    ap.add_argument("--gen", type=int, default=None,
                    help="generated tokens (default: the target's workload; 16 is too few to time a 1 ms/token model)")
    ap.add_argument("--calibrate", type=int, default=0, help="calibrate on the first K runs, score the rest")
    ap.add_argument("--save-table", default=None,
                    help="write the table with this calibration here (e.g. profiles/tables/<target>__<runtime>.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-hidden", action="store_true",
                    help="keep the base hidden size (the default search space) instead of drawing one")
    ap.add_argument("--table", default=None, help="profile table (default: the target's)")
    ap.add_argument("--out", default="bench_costmodel.jsonl")
    ap.add_argument("--calibrate-rows", default=None,
                    help="calibrate on the runs of this file (bench_format_mixes --out, say) and score every run here")
    ap.add_argument("--per-format", action="store_true", help="calibrate a scale per weight format too")
    ap.add_argument("--rows", default=None,
                    help="re-score the runs of an earlier --out file instead of measuring (a refitted table, say)")
    a = ap.parse_args(argv)

    tgt = get_target(a.target)
    table = costmodel.load_table(tgt, a.runtime, path=a.table)
    wl = Workload(a.prompt or tgt.workload.prompt_tokens, a.gen or tgt.workload.gen_tokens)
    if a.rows:
        rows = read_rows(a.rows, a.runtime)[: a.n]
        print(f"{a.runtime}: re-scoring {len(rows)} runs of {a.rows} with {table['path']}")
        repredict(rows, tgt, a.runtime, wl, table)
    else:
        rows = measured_runs(a, tgt, table, wl)
    calib = rows[: a.calibrate]
    if a.calibrate_rows:  # calibrate on other runs (e.g. whole models from bench_format_mixes); score all of these
        calib = read_rows(a.calibrate_rows, a.runtime)
        print(f"calibrating on the {len(calib)} runs of {a.calibrate_rows}")
    if calib:
        from targets.backend import Measurement

        pairs = [(SubnetSpec.from_dict(r["spec"]), Measurement(a.runtime, r["meas_prefill_ms"], r["meas_decode_ms_per_token"],
                  r["meas_peak_memory_mb"], a.repeats, vars(row_workload(r, wl)), {})) for r in calib]  # fmt: skip
        costmodel.calibrate(table, pairs, per_format=a.per_format)
        for phase in ("decode", "prefill"):
            c = table["calibration"][phase]
            print(f"{phase}: scale {c['scale']:.3f}" + "".join(f", {f} {v:.3f}" for f, v in c.get("format_scales", {}).items())
                  + f"; calibration runs' MAPE {c['mape_before']:.1f}% → {c['mape_after']:.1f}%")  # fmt: skip
        if a.save_table:
            print(f"calibrated table written to {costmodel.write_table(table, a.save_table)}")
        repredict(rows, tgt, a.runtime, wl, table)
    summarize(rows, a.runtime, 0 if a.calibrate_rows else a.calibrate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
