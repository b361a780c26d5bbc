"""Bundles: manifest integrity, tamper detection, safe unpacking; the scorecard renders."""

import html
import io
import json
import shutil
import subprocess
import tarfile

import pytest

from packager.bundle import BundleError, make_tarball, safe_extract, verify_integrity, write_manifest
from packager.scorecard import figure, schema_version, to_html, to_markdown, write_all


def make_bundle(tmp_path):
    b = tmp_path / "bundle"
    (b / "artifacts" / "llama.cpp").mkdir(parents=True)
    (b / "artifacts" / "llama.cpp" / "packaged.gguf").write_bytes(b"GGUF" + bytes(range(200)))
    (b / "spec.json").write_text("{}")
    write_manifest(b, {"packager": "test"})
    return b


def test_manifest_detects_any_changed_byte(tmp_path):
    b = make_bundle(tmp_path)
    assert len(verify_integrity(b)["files"]) == 2
    f = b / "artifacts" / "llama.cpp" / "packaged.gguf"
    data = bytearray(f.read_bytes())
    data[100] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="artifacts/llama.cpp/packaged.gguf has changed"):
        verify_integrity(b)


def test_missing_and_extra_files(tmp_path):
    b = make_bundle(tmp_path)
    (b / "extra.txt").write_text("x")
    with pytest.raises(BundleError, match="does not list: extra.txt"):
        verify_integrity(b)
    (b / "extra.txt").unlink()
    (b / "spec.json").unlink()
    with pytest.raises(BundleError, match="spec.json is missing"):
        verify_integrity(b)


def test_tarball_round_trip(tmp_path):
    b = make_bundle(tmp_path)
    tgz = make_tarball(b, tmp_path / "bundle.tar.gz")
    out = safe_extract(tgz, tmp_path / "unpacked")
    assert verify_integrity(out)["files"] == verify_integrity(b)["files"]


def _evil(tmp_path, name, kind=tarfile.REGTYPE, linkname=""):
    tgz = tmp_path / "evil.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, linkname
        data = b"x"
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return tgz


@pytest.mark.parametrize("name, kind, link, why", [
    ("/etc/evil", tarfile.REGTYPE, "", "absolute path"),
    ("bundle/../../evil", tarfile.REGTYPE, "", "'..' leads out"),
    ("bundle/link", tarfile.SYMTYPE, "/etc/passwd", "links are not allowed"),
    ("bundle/hard", tarfile.LNKTYPE, "bundle/x", "links are not allowed"),
])
def test_unsafe_members_are_refused(tmp_path, name, kind, link, why):
    with pytest.raises(BundleError, match=why):
        safe_extract(_evil(tmp_path, name, kind, link), tmp_path / "dest")
    assert not (tmp_path / "dest").exists() or not any((tmp_path / "dest").iterdir())


def test_corrupt_tarball(tmp_path):
    bad = tmp_path / "x.tar.gz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(BundleError, match="not a readable .tar.gz bundle"):
        safe_extract(bad, tmp_path / "d")


def sample_card():
    sec = {
        "version": "0.3.36", "artifact": "packaged.gguf",
        "base": {"decode_ms_per_token": figure(10.0, "ms/token", "measured", "here"),
                 "parameters": figure(134_515_008, "", "computed", "spec")},
        "packaged": {"decode_ms_per_token": figure(6.5, "ms/token", "measured", "here"),
                     "parameters": figure(90_000_000, "", "computed", "spec")},
        "parity": {"max_abs_diff": 0.01, "top1_agreement": 0.98, "n_tokens": 40},
    }
    return {"model": {"source": "embedded", "notes": ["Q4_1-dequantized base"]},
            "target": {"name": "laptop-cpu", "description": "cpu"}, "workload": {"prompt_tokens": 128},
            "machine": {"device": "cpu", "cores": 2, "date": "today"}, "spec": {"layers": []},
            "spec_summary": "26/30 layers", "runtimes": {"llama.cpp": sec}}


def test_scorecard_renders_ratios_and_provenance(tmp_path):
    card = sample_card()
    md = to_markdown(card)
    assert "| decode latency | 10 ms/token | 6.5 ms/token | 1.54x | measured: here |" in md
    assert "| parameters | 134,515,008 | 90,000,000 | 1.49x |" in md
    page = to_html(card, [])
    assert "<table>" in page and "http" not in page.replace("http-equiv", "")
    paths = write_all(card, tmp_path, [])
    assert json.loads(paths[0].read_text())["schema"] == "packager.scorecard/2"


def test_scorecard_schema_version_reads_old_cards_and_refuses_foreign_ones():
    assert schema_version({}) == 1 and schema_version({"schema": "packager.scorecard/2"}) == 2
    with pytest.raises(ValueError, match="'model-card/1' is not packager.scorecard/N"):
        schema_version({"schema": "model-card/1"})


def test_scorecard_says_whether_each_runtime_meets_the_accuracy_floor():
    card = sample_card()
    assert "accuracy floor" not in to_markdown(card)  # no in-runtime perplexity: no verdict
    card["runtimes"]["onnxruntime"] = dict(card["runtimes"]["llama.cpp"], accuracy_floor={
        "max_increase": 0.05, "base": 26.4, "packaged": 31.2, "limit": 27.72, "met": False})
    card["runtimes"]["llama.cpp"]["accuracy_floor"] = {"max_increase": 0.05, "base": 26.5, "packaged": 27.7,
                                                       "limit": 27.825, "met": True}
    md = to_markdown(card)
    assert "accuracy floor in this runtime (+5% over the base's 26.50, at most 27.82): met (27.70, +4.5%)" in md
    assert "(+5% over the base's 26.40, at most 27.72): MISSED (31.20, +18.2%)" in md
    assert "MISSED (31.20, +18.2%)" in to_html(card, [])
    card["runtimes"]["llama.cpp"]["accuracy_floor"]["increase_ci95"] = {"ratio": 1.045, "low": 1.031, "high": 1.058,
                                                                         "blocks": 32}  # fmt: skip
    assert ("met (27.70, +4.5%; 95% interval +3.1% to +5.8%, paired bootstrap over 32 blocks): the interval "
            "reaches past the floor") in to_markdown(card)
    card["runtimes"]["onnxruntime"]["accuracy_floor"]["increase_ci95"] = {"ratio": 1.18, "low": 1.04, "high": 1.33,
                                                                           "blocks": 32}  # fmt: skip
    assert ("MISSED (31.20, +18.2%; 95% interval +4.0% to +33.0%, paired bootstrap over 32 blocks): the interval "
            "reaches under the floor") in to_markdown(card)
    card["runtimes"]["onnxruntime"]["accuracy_floor"]["increase_ci95"]["low"] = 1.06
    assert to_markdown(card).count("reaches under") == 0
    assert "recovered again" not in md
    card["runtimes"]["onnxruntime"]["recovery"] = {
        "changed": 210, "example": "layers.0.q_proj iq4_nl->int4s_b32", "floor_ppl_before": 35.86, "floor_ppl_after": 32.2,
        "steps_run": 60, "wall_s": 729.0, "floor_ppl_limit": 30.65, "meets_floor": False}  # fmt: skip
    line = ("recovered again for this runtime's formats (210 tensors change format, e.g. layers.0.q_proj "
            "iq4_nl->int4s_b32): floor-check ppl 35.86 → 32.20 after 60 steps (729 s, warm-started from the winner's "
            "recovery), floor 30.65: missed (formats simulated)")  # fmt: skip
    md = to_markdown(card)
    assert line in md and md.index(line) < md.index("MISSED (31.20,") and md.count("recovered again") == 1
    assert html.escape(line) in to_html(card, [])
    card["runtimes"]["onnxruntime"]["recovery"].update(format_share=0.8, narrow_blocks=24, tries=[
        {"format_share": 1.0, "floor_ppl_after": 32.2, "wall_s": 300.0},
        {"format_share": 0.8, "floor_ppl_after": 30.5, "wall_s": 310.0}])
    md = to_markdown(card)
    assert "iq4_nl->int4s_b32; at format share 0.8: 24 blocks keep the carried formats" in md
    assert "(formats simulated); tried share 1 → 32.20 (300 s), share 0.8 → 30.50 (310 s)" in md
    card["runtimes"]["onnxruntime"]["recovery"]["gptq_linears"] = 168
    assert "(729 s, warm-started from the winner's recovery, with GPTQ redone for 168 linears at this runtime's " \
           "formats), floor 30.65" in to_markdown(card)


def test_scorecard_shows_the_shortlist_and_the_promoted_candidate():
    card = sample_card()
    row = {"spec": "29/30 layers", "predicted_decode_ms": 9.95, "floor_ppl_before": 32.21, "floor_ppl_after": 30.8,
           "floor_ppl_limit": 30.6, "meets_floor": False}
    promoted = {"spec": "29/30 layers", "floor_ppl_before": 32.21, "floor_ppl_after": 30.52, "steps_run": 80,
                "wall_s": 242, "floor_ppl_limit": 30.6, "meets_floor": True}
    card["selection"] = {"how": "promoted", "shortlist": [row], "promoted": promoted}
    md = to_markdown(card)
    assert "| 29/30 layers | 9.95 | 32.21 | 30.80 | 30.60 | no |" in md
    assert "32.21 → 30.52 after 80 steps (242 s), floor 30.60: met, so it won." in md
    assert "met, so it won." in to_html(card, [])
    promoted["meets_floor"] = False
    assert "floor 30.60: missed, so the fallback won." in to_markdown(card)
    card["selection"]["shortlist"].append(dict(row, floor_ppl_after=30.5, meets_floor=True))
    assert "missed, so the fastest shortlisted candidate meeting it won." in to_markdown(card)
    card["selection"]["promoted"] = None
    assert "promoted to full recovery" not in to_markdown(card)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_scorecard_html_renders_in_headless_chromium(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png = tmp_path / "plot.png"
    plt.plot([1, 2, 3], [3, 1, 2])
    plt.savefig(png)
    page = tmp_path / "scorecard.html"
    page.write_text(to_html(sample_card(), [png]))
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'u'}",
                    "--window-size=1000,1400", f"--screenshot={shot}", page.as_uri()], check=True, timeout=120,
                   capture_output=True)
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          f"--user-data-dir={tmp_path / 'u2'}", "--dump-dom", page.as_uri()], check=True, timeout=120,
                         capture_output=True, text=True).stdout
    assert "decode latency" in dom and 'src="data:image/png;base64,' in dom
    assert shot.stat().st_size > 10_000
