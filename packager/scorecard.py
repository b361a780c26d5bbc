"""The deployment scorecard: scorecard.json (versioned), scorecard.md and a self-contained scorecard.html.

Every figure is a dict ``{"value", "unit", "kind", "source"}`` where kind is ``measured`` (source says
where and when), ``estimated`` (source names the profile) or ``computed`` (exact, from the spec or
the file itself). A figure measured in a runtime also holds ``settings``: how the runtime loaded and ran
the model, and for peak memory what the figure counts (``targets.backend.memory_record``), so that a
later measurement knows whether it is comparable. Renderers never invent numbers: they print what the
card holds.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

SCHEMA = "packager.scorecard/2"  # 2: runtime measurements hold their settings as a field, not only in the source


def schema_version(card: dict) -> int:
    """The version number of a scorecard's schema (``packager.scorecard/N``; 1 where it names none)."""
    name = str(card.get("schema", "packager.scorecard/1"))
    prefix, _, n = name.rpartition("/")
    if prefix != "packager.scorecard" or not n.isdigit():
        raise ValueError(f"scorecard schema {name!r} is not packager.scorecard/N: this is not a packager scorecard")
    return int(n)


def figure(value, unit: str, kind: str, source: str, settings: dict | None = None) -> dict:
    """One scorecard figure with its provenance (and, for a runtime measurement, its ``settings``)."""
    assert kind in ("measured", "estimated", "computed"), kind
    fig = {"value": value, "unit": unit, "kind": kind, "source": source}
    return fig if settings is None else {**fig, "settings": settings}


def _fmt(fig: dict | None) -> str:
    if not fig or fig.get("value") is None:
        return "—"
    v = fig["value"]
    if isinstance(v, float):
        v = f"{v:,.3g}" if abs(v) < 100 else f"{v:,.1f}"
    elif isinstance(v, int):
        v = f"{v:,}"
    unit = f" {fig['unit']}" if fig.get("unit") else ""
    return f"{v}{unit}"


def _ratio(base: dict | None, packed: dict | None, lower_is_better: bool) -> str:
    try:
        b, p = float(base["value"]), float(packed["value"])
    except (TypeError, KeyError, ValueError):
        return ""
    if b <= 0 or p <= 0:
        return ""
    r = b / p if lower_is_better else p / b
    return f"{r:.2f}x"


ROWS = [  # key, label, lower is better
    ("parameters", "parameters", True),
    ("size_mb", "size on disk", True),
    ("peak_memory_mb", "peak memory", True),
    ("prefill_ms", "prefill / time to first token", True),
    ("decode_ms_per_token", "decode latency", True),
    ("tokens_per_s", "decode throughput", False),
    ("perplexity_runtime", "perplexity (in runtime)", True),
    ("perplexity_simulated", "perplexity (search, before recovery)", True),
    ("predicted_decode_ms", "decode latency (cost model)", True),
    ("predicted_prefill_ms", "prefill (cost model)", True),
    ("predicted_peak_memory_mb", "peak memory (cost model)", True),
]


PAIRED_ROWS = ("decode_ms_per_token", "tokens_per_s")  # gain: the median of per-round ratios, where measured so


def table_rows(section: dict) -> list[tuple[str, dict, dict, str, str]]:
    """(label, base figure, packaged figure, ratio, provenance) for one runtime section."""
    base, packed = section["base"], section["packaged"]
    rows = []
    keys = [k for k, _, _ in ROWS] + sorted(k for k in packed if k.startswith("task:"))
    labels = {k: label for k, label, _ in ROWS}
    lower = {k: lo for k, _, lo in ROWS}
    for k in keys:
        if k not in base and k not in packed:
            continue
        b, p = base.get(k), packed.get(k)
        label = labels.get(k, k.replace("task:", "task accuracy: "))
        ratio = _ratio(b, p, lower.get(k, False))
        paired = section.get("decode_speedup")
        if paired and k in PAIRED_ROWS and p and p.get("kind") == "measured":
            ratio = f"{paired['median']:.2f}x ({paired['low']:.2f}–{paired['high']:.2f}x over {paired['rounds']} rounds)"
        src = (p or b or {}).get("kind", "") + ": " + (p or b or {}).get("source", "")
        rows.append((label, b, p, ratio, src))
    return rows


def write_json(card: dict, path: Path) -> Path:
    card = {"schema": SCHEMA, **card}
    path.write_text(json.dumps(card, indent=1, default=str))
    return path


SELECTION_HEADER = ("shortlisted candidate", "predicted decode ms", "floor-check ppl before recovery",
                    "after short recovery", "floor", "meets it")  # fmt: skip


def selection_rows(sel: dict) -> list[tuple[str, ...]]:
    """One row of text per shortlisted candidate, in SELECTION_HEADER's order."""
    return [(t["spec"], f"{t['predicted_decode_ms']:.2f}", f"{t['floor_ppl_before']:.2f}", f"{t['floor_ppl_after']:.2f}",
             f"{t['floor_ppl_limit']:.2f}", "yes" if t["meets_floor"] else "no") for t in sel["shortlist"]]  # fmt: skip


def promotion_line(sel: dict) -> str | None:
    """Sentences on the shortlisted candidate given the full recovery, if one was, and on each member of
    its family it stepped down to."""
    p = sel.get("promoted")
    if not p:
        return None
    other = "the fastest shortlisted candidate meeting it" if any(t["meets_floor"] for t in sel["shortlist"]) else "the fallback"

    def outcome(r: dict) -> str:
        text = f" on {256 * r['train_blocks']:,} calibration tokens" if r.get("train_blocks") else ""
        return (f"{r['spec']}: floor-check ppl {r['floor_ppl_before']:.2f} → {r['floor_ppl_after']:.2f} after "
                f"{r['steps_run']} steps{text} ({r['wall_s']:.0f} s), floor {r['floor_ppl_limit']:.2f}")

    tries = [*p.get("missed", []), p]
    lines = [f"promoted to {'long' if p.get('long') else 'full'} recovery: {outcome(tries[0])}"]
    lines += [f"missed, so it stepped down one format share: {outcome(r)}" for r in tries[1:]]
    return "; ".join(lines) + f": {'met, so it won' if p['meets_floor'] else f'missed, so {other} won'}."


def floor_line(sec: dict) -> str | None:
    """Whether the packaged model meets the accuracy floor in this runtime (its own perplexity vs the base's)."""
    f = sec.get("accuracy_floor")
    if not f:
        return None
    verdict = "met" if f["met"] else "MISSED"
    line = (f"accuracy floor in this runtime (+{f['max_increase']:.0%} over the base's {f['base']:.2f}, at most "
            f"{f['limit']:.2f}): {verdict} ({f['packaged']:.2f}, {f['packaged'] / f['base'] - 1:+.1%}")
    ci = f.get("increase_ci95")
    if not ci:
        return line + ")"
    line += f"; 95% interval {ci['low'] - 1:+.1%} to {ci['high'] - 1:+.1%}, paired bootstrap over {ci['blocks']} blocks)"
    if f["met"] and ci["high"] > 1 + f["max_increase"]:
        line += ": the interval reaches past the floor"
    elif not f["met"] and ci["low"] <= 1 + f["max_increase"]:
        line += ": the interval reaches under the floor"
    return line


def recovery_summary(rec: dict, cfg: dict) -> str:
    """One sentence on the winner's recovery: the floor check's perplexity before and after it, and on what."""
    line = (f"LoRA + distillation ({rec['steps_run']} steps, {rec['wall_s']:.0f} s, {rec['stopped_reason']}; trained on "
            f"{256 * rec.get('train_blocks', cfg['recover_blocks']):,} calibration tokens, early-stopped on {255 * cfg['val_blocks']:,} held-out ones)")
    if "floor_ppl_after" not in rec:
        return line + f": perplexity {rec['ppl_before']:.2f} → {rec['ppl_after']:.2f} on the early-stopping blocks"
    return (line + f": floor-check perplexity {rec['floor_ppl_before']:.2f} → {rec['floor_ppl_after']:.2f} on "
            f"{255 * cfg['floor_blocks']:,} tokens of held-out calibration documents (the check split), floor {rec['floor_ppl_limit']:.2f}: "
            f"{'met' if rec['meets_floor'] else 'missed'} (formats simulated)")  # fmt: skip


def recovery_line(sec: dict) -> str | None:
    """One sentence on this runtime's own recovery (where its formats round the winner differently)."""
    r = sec.get("recovery")
    if not r:
        return None
    share = r.get("format_share", 1.0)
    rest = "the exact twins'" if r.get("widened_to") == "exact" else "the base's"
    kept = "" if share == 1.0 else (f"; at format share {share:g}: {r['narrow_blocks']} blocks keep the carried formats, "
                                    f"the more rounding-sensitive rest {rest}")  # fmt: skip
    tries = r.get("tries", [])
    tried = "" if len(tries) < 2 else "; tried " + ", ".join(
        f"share {t['format_share']:g} → {t['floor_ppl_after']:.2f} ({t['wall_s']:.0f} s)" for t in tries)
    gptq = f", with GPTQ redone for {r['gptq_linears']} linears at this runtime's formats" if r.get("gptq_linears") else ""
    lay = r.get("relayout")
    why = (f"relaid for speed ({', '.join(lay['swaps'])}: {lay['decode_ms'][0]:.2f} → {lay['decode_ms'][1]:.2f} ms/token "
           "predicted), then recovered" if lay else "recovered again")  # fmt: skip
    line = (f"{why} for this runtime's formats ({r['changed']} tensors change format, e.g. {r['example']}"
            f"{kept}): floor-check ppl {r['floor_ppl_before']:.2f} → {r['floor_ppl_after']:.2f} after {r['steps_run']} "
            f"steps ({r['wall_s']:.0f} s, warm-started from the winner's recovery{gptq}), floor {r['floor_ppl_limit']:.2f}: "
            f"{'met' if r['meets_floor'] else 'missed'} (formats simulated){tried}")  # fmt: skip
    return line if r.get("used", True) else line + "; so this runtime ships the winner's weights in their exact formats"


def runtime_lines(sec: dict) -> list[str]:
    """The sentences under a runtime's table: its own recovery, and its accuracy-floor verdict."""
    return [line for line in (recovery_line(sec), floor_line(sec)) if line]


def to_markdown(card: dict) -> str:
    """The scorecard as Markdown."""
    out = [f"# Deployment scorecard: {card['model']['source']} on {card['target']['name']}", ""]
    out.append(f"- target: {card['target']['name']} — {card['target'].get('description', '')}")
    out.append(f"- workload: {card['workload']}")
    out.append(f"- measured on: {card['machine'].get('device')} ({card['machine'].get('cores')} cores), "
               f"{card['machine'].get('date')}")  # fmt: skip
    for note in card["model"].get("notes", []):
        out.append(f"- note: {note}")
    s = card["spec_summary"]
    out.append(f"- packaged sub-network: {s}")
    for name, sec in card["runtimes"].items():
        out += ["", f"## {name} {sec.get('version', '')}", "", f"artifact: `{sec.get('artifact', '')}`", ""]
        if sec.get("engine"):
            out += [f"engine: {sec['engine']}", ""]
        if sec.get("not_predicted"):
            out += [f"no cost-model prediction: {sec['not_predicted']}", ""]
        out.append("| metric | base | packaged | gain | provenance |")
        out.append("|---|---|---|---|---|")
        for label, b, p, ratio, src in table_rows(sec):
            out.append(f"| {label} | {_fmt(b)} | {_fmt(p)} | {ratio} | {src} |")
        for line in runtime_lines(sec):
            out += ["", line]
        par = sec.get("parity")
        if par:
            out += ["", f"parity vs torch (same simulated formats): max |Δlogit| {par.get('max_abs_diff', 0):.3g}, "
                        f"top-1 agreement {100 * par.get('top1_agreement', 0):.1f}% on {par.get('n_tokens')} tokens"]  # fmt: skip
    srch = card.get("search")
    if srch:
        out += ["", "## Search", "", f"strategy {srch['strategy']}, {srch['evaluations']} evaluations, seed {srch['seed']}, "
                f"hypervolume {srch['hypervolume']:.4f}, {srch['wall_s']:.0f} s"]  # fmt: skip
    sel = card.get("selection")
    if sel:
        out += ["", "## Selection", "", f"winner: {sel['how']}."]
        if sel["shortlist"]:
            out += ["", "| " + " | ".join(SELECTION_HEADER) + " |", "|---" * len(SELECTION_HEADER) + "|"]
            out += ["| " + " | ".join(row) + " |" for row in selection_rows(sel)]
        promoted = promotion_line(sel)
        if promoted:
            out += ["", promoted]
    rec = card.get("recovery")
    if rec:
        cfg = card.get("config", {})
        out += ["", "## Recovery", "", recovery_summary(rec, cfg)]
    out += ["", "Figures marked *measured* were taken on the machine above; *estimated* ones come from the "
            "named profile; *computed* ones are exact counts.", ""]  # fmt: skip
    return "\n".join(out)


def _img(path: Path | None) -> str:
    if not path or not Path(path).is_file():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}">'


def to_html(card: dict, plots: list[Path]) -> str:
    """A self-contained HTML page (inline CSS, plots embedded as data URIs; no network needed)."""
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Scorecard: {e(card['model']['source'])} on {e(card['target']['name'])}</title>",
        "<style>body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1000px;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child,th:last-child{text-align:left}.src{color:#666;font-size:12px;text-align:left}"
        ".measured{color:#075}.estimated{color:#a60}.computed{color:#345}img{max-width:100%;margin:.5em 0}</style>",
        "</head><body>",
        f"<h1>Deployment scorecard</h1><p><b>{e(card['model']['source'])}</b> on <b>{e(card['target']['name'])}</b>"
        f" — {e(card['target'].get('description', ''))}</p>",
        f"<p>workload: {e(str(card['workload']))}<br>measured on: {e(str(card['machine'].get('device')))} "
        f"({card['machine'].get('cores')} cores), {e(str(card['machine'].get('date')))}<br>"
        f"packaged sub-network: {e(card['spec_summary'])}</p>",
    ]
    for note in card["model"].get("notes", []):
        parts.append(f"<p class='src'>note: {e(note)}</p>")
    for name, sec in card["runtimes"].items():
        parts.append(f"<h2>{e(name)} {e(str(sec.get('version', '')))}</h2><p class='src'>artifact: {e(str(sec.get('artifact', '')))}</p>")
        if sec.get("engine"):
            parts.append(f"<p>engine: {e(sec['engine'])}</p>")
        if sec.get("not_predicted"):
            parts.append(f"<p class='src'>no cost-model prediction: {e(sec['not_predicted'])}</p>")
        parts.append("<table><tr><th>metric</th><th>base</th><th>packaged</th><th>gain</th><th>provenance</th></tr>")
        for label, b, p, ratio, src in table_rows(sec):
            kind = (p or b or {}).get("kind", "")
            parts.append(f"<tr><td>{e(label)}</td><td>{e(_fmt(b))}</td><td>{e(_fmt(p))}</td><td>{e(ratio)}</td>"
                         f"<td class='src {kind}'>{e(src)}</td></tr>")  # fmt: skip
        parts.append("</table>")
        parts += [f"<p>{e(line)}</p>" for line in runtime_lines(sec)]
        par = sec.get("parity")
        if par:
            parts.append(f"<p>parity vs torch: max |Δlogit| {par.get('max_abs_diff', 0):.3g}, top-1 agreement "
                         f"{100 * par.get('top1_agreement', 0):.1f}% on {par.get('n_tokens')} tokens</p>")  # fmt: skip
    sel = card.get("selection")
    if sel:
        parts.append(f"<h2>Selection</h2><p>winner: {e(sel['how'])}.</p>")
        if sel["shortlist"]:
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in SELECTION_HEADER) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in selection_rows(sel)]
            parts.append("</table>")
        promoted = promotion_line(sel)
        if promoted:
            parts.append(f"<p>{e(promoted)}</p>")
    parts.append("<h2>Plots</h2>")
    parts += [_img(p) for p in plots]
    parts.append("<h2>Sub-network spec</h2><pre>" + e(json.dumps(card["spec"], indent=1)[:20000]) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_all(card: dict, folder: Path, plots: list[Path]) -> list[Path]:
    """Write scorecard.json, scorecard.md and scorecard.html into ``folder``."""
    folder = Path(folder)
    paths = [write_json(card, folder / "scorecard.json")]
    (folder / "scorecard.md").write_text(to_markdown(card))
    (folder / "scorecard.html").write_text(to_html(card, plots))
    return paths + [folder / "scorecard.md", folder / "scorecard.html"]
