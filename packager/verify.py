"""`packager verify BUNDLE`: integrity first, then (where this host can run the artifact) a re-measurement
compared with the scorecard, flagging drift beyond a tolerance."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from packager.bundle import BundleError, safe_extract, verify_integrity
from packager.scorecard import schema_version
from targets.backend import (PEAK_RSS, ExportError, Measurement, Workload, backend, measure_interleaved,
                             median_measurement, settings_text)

METRICS = (("decode_ms_per_token", "decode_ms_per_token"), ("prefill_ms", "prefill_ms"), ("peak_memory_mb", "peak_rss_mb"))


def _artifact_path(folder: Path, runtime: str) -> Path:
    pattern = "*.gguf" if runtime == "llama.cpp" else "*.onnx"
    found = sorted((folder / "artifacts" / runtime).glob(pattern))
    if not found:
        raise BundleError(f"bundle has no {pattern} artifact under artifacts/{runtime}")
    return found[0]


def not_comparable(schema: int, key: str, fig: dict, m: Measurement) -> str | None:
    """Why a measured figure ``fig`` (its row ``key``) of a scorecard of schema version ``schema`` cannot be
    compared with the measurement ``m``, or None: the runtime loaded or ran the model otherwise, or (peak
    memory) the figure counted something else. Schema 1 held those facts only in the peak memory's source."""
    if schema < 2:
        return _memory_source_not_comparable(fig["source"], m) if key == "peak_memory_mb" else None
    then, now = fig.get("settings", {}), (m.memory_settings if key == "peak_memory_mb" else m.settings)
    if then.get("peak_rss") != now.get("peak_rss"):
        return f"the scorecard's figure counted something other than {PEAK_RSS}"
    if then != now:
        return (f"the scorecard's figure was measured with {settings_text(then) or 'other settings'}, "
                f"this version's with {settings_text(now) or 'none'}")
    return None


def _memory_source_not_comparable(source: str, m: Measurement) -> str | None:
    """``not_comparable`` for a schema-1 peak memory, from its source: stop 41 named the load settings in
    brackets, stop 42 began the source with ``PEAK_RSS``."""
    if not source.startswith(PEAK_RSS):
        return f"the scorecard's figure counted something other than {PEAK_RSS}"
    how = settings_text(m.settings)
    if how and f"({how})" not in source:
        return f"the scorecard's figure was measured under other load settings than this version's ({how})"
    return None


def verify(bundle: str | Path, remeasure: bool = True, tolerance: float = 0.25, threads: int | None = None,
           rounds: int = 3) -> dict:  # fmt: skip
    """Check a bundle folder or .tar.gz; returns a report with per-runtime drift rows. The re-measurement
    is the median of ``rounds`` measurements (each a fresh process), as the scorecard's are."""
    bundle = Path(bundle)
    if not bundle.exists():
        raise BundleError(f"{bundle} does not exist")
    if rounds < 1:
        raise BundleError(f"rounds {rounds}: re-measure in at least 1 round (--rounds)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = safe_extract(bundle, Path(tmp)) if bundle.is_file() else bundle
        manifest = verify_integrity(folder)
        report = {"bundle": str(bundle), "files_checked": len(manifest["files"]), "runtimes": {}, "drift": []}
        if not remeasure:
            return report
        card = json.loads((folder / "scorecard.json").read_text())
        try:
            schema = schema_version(card)
        except ValueError as e:
            raise BundleError(f"{bundle}: {e}") from None
        wl = Workload(**card["workload"])
        for rt, sec in card["runtimes"].items():
            packed = sec["packaged"]
            if packed.get("decode_ms_per_token", {}).get("kind") != "measured":
                report["runtimes"][rt] = {"skipped": "the scorecard holds no measured figures for this runtime"}
                continue
            try:
                mod = backend(rt)
            except ExportError as e:
                report["runtimes"][rt] = {"skipped": str(e)}
                continue
            path = _artifact_path(folder, rt)
            runs = measure_interleaved(mod, {rt: path}, wl, threads or card["config"].get("threads", 2), rounds)
            m = median_measurement(runs[rt])
            rows = []
            for key, mkey in METRICS:
                want = packed[key]["value"]
                got = getattr(m, mkey)
                why = not_comparable(schema, key, packed[key], m)
                rel = None if why else (got / want - 1 if want else 0.0)
                flag = rel is not None and abs(rel) > tolerance
                rows.append({"metric": key, "scorecard": want, "measured_now": got, "drift": rel, "flag": flag,
                             **({"not_compared": why} if why else {})})  # fmt: skip
                if flag:
                    report["drift"].append(f"{rt} {key}: scorecard {want:.3g}, now {got:.3g} ({rel:+.0%})")
            report["runtimes"][rt] = {"rows": rows, "fingerprint": m.fingerprint}
        return report
