"""Targets, the roofline estimate, the fitted cost model and the profiler's resume (fast: fake measurements)."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest

from profiles import costmodel, profiler, roofline
from profiles.costmodel import CostModelError, OutsideGridWarning, TableMismatchWarning
from subnet.arch import LINEARS, MLP_LINEARS, ArchInfo
from subnet.spec import SubnetSpec
from targets.backend import Measurement, Workload
from targets.registry import TargetError, get_target, list_targets

TINY = ArchInfo("llama", 6, 64, 4, 2, 16, 128, 256, True)
TRUTH = {  # ground-truth coefficients of the fake device (ms per feature unit)
    "decode": {"const": 0.7, "layer": 0.05, "w:q8_0": 2.0, "w:q4_0": 1.2, "w:f16": 3.5, "attn": 0.4, "kv": 0.1,
               "h:q8_0": 0.9, "h:q4_0": 0.5, "h:f16": 2.0, "t:f16": 8.0, "t:q4_0": 0.4},
    "prefill": {"const": 2.0, "layer": 0.3, "w:q8_0": 0.05, "w:q4_0": 0.06, "w:f16": 0.04, "act": 1.0, "attn": 0.01,
                "head": 0.5, "headP": 0.001, "t:f16": 0.2},
}


def _stub_table(runtime="llama.cpp"):
    return {"runtime": runtime, "head_dim": TINY.head_dim, "vocab": TINY.vocab_size}


def fake_measure(point: dict, truth=TRUTH, runtime="llama.cpp") -> dict:
    """An exactly-linear fake device: latency = ``truth`` · features of the point."""
    out = {}
    for phase, key in (("decode", "decode_ms_per_token"), ("prefill", "prefill_ms")):
        feats = costmodel.point_spec_features(_stub_table(runtime), point, phase)
        out[key] = sum(truth[phase].get(k, 0.0) * v for k, v in feats.items())
    spec = profiler.point_spec(point, TINY)
    out["peak_rss_mb"] = true_rss(spec)
    out["size_mb"] = spec.weight_bytes() / costmodel.MIB + 0.5
    return out


RESIDENT = {"q4_0": 2.0, "q8_0": 1.1, "f16": 1.0}  # the fake device's MiB in RAM per MiB on disk, per format


def true_rss(spec: SubnetSpec, resident=RESIDENT) -> float:
    """The fake device's peak RSS: 30 MiB, and each weight matrix's bytes times its format's ``resident``
    factor (q4_0 at 2: repacked beside the mapped file, as llama.cpp's CPU backend does)."""
    from subnet.formats import get_format

    return 30.0 + sum(resident.get(f, 1.0) * r * n * get_format(f).bits / 8 for _, f, r, n in spec.weight_matrices()) / costmodel.MIB


def tiny_grid(fmts=("f16", "q8_0", "q4_0")):
    return profiler.default_grid("llama.cpp", TINY, list(fmts), Workload(16, 8))


@pytest.fixture
def fitted(tmp_path):
    out = tmp_path / "laptop-cpu__llama.cpp.json"
    table = profiler.profile("laptop-cpu", "llama.cpp", grid=tiny_grid(), out=out, base=TINY, threads=1,
                             measure_point=fake_measure, progress=False)  # fmt: skip
    return table, out


# ---- targets --------------------------------------------------------------------------------------
def test_targets_listed_and_loaded():
    names = {t.name for t in list_targets()}
    assert {"a100", "laptop-cpu", "jetson-orin"} <= names
    a100 = get_target("a100")
    assert a100.formats("tensorrt") == ["f16", "int8", "int4_b128"]
    assert set(a100.runtimes) == {"tensorrt", "onnxruntime", "llama.cpp"}
    assert a100.bandwidth_gbps == 2039 and a100.compute_tflops["fp16"] == 312
    assert "q4_0" in a100.formats("llama.cpp")
    orin = get_target("jetson-orin")
    assert set(orin.runtimes) == {"tensorrt", "llama.cpp"} and orin.memory_gb == 64
    cpu = get_target("laptop-cpu")
    assert cpu.host and cpu.bandwidth_gbps is None and cpu.default_runtime == "llama.cpp"
    assert cpu.memory_capacity_mb() > 0 and cpu.workload.prompt_tokens > 0


def test_unknown_target_and_runtime_name_the_known_ones():
    with pytest.raises(TargetError, match="known targets: .*a100.*laptop-cpu"):
        get_target("tpu-v9")
    with pytest.raises(TargetError, match="its runtimes: tensorrt, llama.cpp"):
        get_target("jetson-orin").runtime("onnxruntime")


def test_user_target_file_by_path_and_home(tmp_path, monkeypatch):
    d = {"name": "my-box", "runtimes": {"llama.cpp": {"formats": ["q8_0", "q4_0"]}}, "memory_gb": 8,
         "bandwidth_gbps": 50, "compute_tflops": {"fp32": 1, "fp16": 2}, "workload": {"prompt_tokens": 32}}  # fmt: skip
    path = tmp_path / "my-box.json"
    path.write_text(json.dumps(d))
    assert get_target(str(path)).formats() == ["q8_0", "q4_0"]
    monkeypatch.setenv("PACKAGER_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "targets").mkdir(parents=True)
    (tmp_path / "home" / "targets" / "my-box.json").write_text(json.dumps(d))
    assert "my-box" in {t.name for t in list_targets()}
    assert get_target("my-box").workload.prompt_tokens == 32
    d["runtimes"] = {"llama.cpp": {"formats": ["int4_b128"]}}
    path.write_text(json.dumps(d))
    with pytest.raises(TargetError, match="cannot hold"):
        get_target(str(path))


# ---- roofline ---------------------------------------------------------------------------------------
def test_roofline_monotonic_in_bytes():
    r = roofline.Roofline.of(get_target("jetson-orin"))
    hd = TINY.head_dim

    def decode(fmt, mlp=1536, ctx=128):
        lin = costmodel.block_linears(9, 3, mlp, 576, 64, fmt)
        return roofline.block_ms(r, lin, 9, 3, hd, "decode", 1, ctx)

    by_bits = [decode(f) for f in ("q4_0", "q5_0", "q8_0", "f16", "f32")]
    assert by_bits == sorted(by_bits) and by_bits[0] < by_bits[-1]
    assert decode("q8_0", mlp=512) < decode("q8_0", mlp=1024) < decode("q8_0", mlp=1536)
    assert decode("f16", ctx=64) < decode("f16", ctx=4096)
    lin = costmodel.block_linears(9, 3, 1536, 576, 64, "f16")
    assert roofline.block_ms(r, lin, 9, 3, 64, "prefill", 64, 64) < roofline.block_ms(r, lin, 9, 3, 64, "prefill", 2048, 2048)


def test_estimated_tables_shipped_and_reproduce_their_points():
    for name, rt in (("a100", "tensorrt"), ("jetson-orin", "llama.cpp")):
        table = costmodel.load_table(name, rt)
        assert table["provenance"] == "estimated" and "datasheet" in table["source"]
        wl = Workload(**table["workload"])
        for p in table["points"]:
            b = p["block"]
            got = costmodel.layer_cost(table, b["heads"], b["kv_heads"], b["mlp"], b["hidden"], b["format"], "decode", wl)
            assert got == pytest.approx(p["decode_ms"], rel=1e-9)
    cost = costmodel.predict(SubnetSpec.full(profiler.SMOLLM2, "f16"), "a100", "tensorrt")
    assert cost.provenance.startswith("estimated: roofline from NVIDIA A100")
    assert cost.peak_memory_mb > cost.size_mb > 0


# ---- fitted cost model ------------------------------------------------------------------------------
def test_fit_reproduces_grid_points_and_is_additive(fitted):
    table, _ = fitted
    for p in table["points"]:
        spec = profiler.point_spec(p, TINY)
        wl = Workload(p["prompt_tokens"], p["gen_tokens"])
        for phase, key in (("decode", "decode_ms_per_token"), ("prefill", "prefill_ms")):
            assert costmodel.spec_latency(table, spec, phase, wl) == pytest.approx(p[key], rel=1e-3)
    assert table["model"]["decode"]["holdout_mape"] < 0.01
    # mixed formats and heterogeneous layers: the whole = fixed + the sum of its blocks
    spec = SubnetSpec.uniform(TINY, layers=[0, 2, 3], fmt="q8_0")
    spec.layers[1].mlp = 64
    spec.layers[1].formats.update(gate_proj="q4_0", up_proj="q4_0")
    wl = Workload(16, 8)
    cost = costmodel.predict(spec, "laptop-cpu", "llama.cpp", wl, table)
    parts = costmodel.fixed_cost(table, 64, "q8_0", "decode", wl) + sum(
        costmodel.layer_cost(table, ly.heads, ly.kv_heads, ly.mlp, 64, ly.formats, "decode", wl) for ly in spec.layers
    )
    assert cost.decode_ms_per_token == pytest.approx(parts)
    assert cost.tokens_per_s == pytest.approx(1000 / parts)
    assert cost.provenance.startswith("measured:")
    assert cost.peak_memory_mb == pytest.approx(true_rss(spec), rel=1e-3)  # q4_0's MLP at twice its bytes
    coef = table["model"]["memory"]["coef"]
    assert coef["m:q4_0"] == pytest.approx(2.0, rel=1e-3) and coef["e:q8_0"] == pytest.approx(1.1, rel=1e-3)


def test_row_tails_past_the_simd_step_are_their_own_feature():
    """Weights after a row's last full 64-wide step count per format, in the blocks and the LM head."""
    wl = Workload(16, 8)
    full = costmodel.block_linears(4, 2, 128, 64, 16, "f16")
    assert not any(k.startswith("t:") for k in costmodel.layer_features("decode", 4, 2, 64, 16, full, wl))
    narrow = costmodel.block_linears(4, 2, 128, 96, 16, "f16")  # rows of 96 (q, k, v, gate, up): 32 past a step
    f = costmodel.layer_features("prefill", 4, 2, 96, 16, narrow, wl)
    assert f["t:f16"] == pytest.approx((64 + 32 + 32 + 128 + 128) * 32 * 16 / 1e6)
    head = costmodel.fixed_features("decode", 1000, 96, "q8_0", wl)
    assert head["t:q8_0"] == pytest.approx(1000 * 32 / 1e6)
    assert "t:q8_0" not in costmodel.fixed_features("decode", 1000, 128, "q8_0", wl)


def test_outside_grid_warns_naming_the_dimension(fitted):
    table, _ = fitted
    spec = SubnetSpec.uniform(TINY, mlp=32, fmt="q8_0")
    with pytest.warns(OutsideGridWarning, match="mlp 32 is outside the profiled range"):
        cost = costmodel.predict(spec, "laptop-cpu", "llama.cpp", Workload(16, 8), table)
    assert any("mlp" in w for w in cost.warnings)
    with pytest.warns(OutsideGridWarning, match="prompt_tokens 4096"):
        costmodel.predict(SubnetSpec.uniform(TINY, fmt="q8_0"), "laptop-cpu", "llama.cpp", Workload(4096, 8), table)
    with pytest.raises(CostModelError, match="q5_0 were not profiled"):
        costmodel.predict(SubnetSpec.uniform(TINY, fmt="q5_0"), "laptop-cpu", "llama.cpp", Workload(16, 8), table)
    with pytest.raises(CostModelError, match="cannot run format"):
        costmodel.predict(SubnetSpec.uniform(TINY, fmt="int4_b128"), "laptop-cpu", "llama.cpp", Workload(16, 8), table)


def test_table_from_another_machine_or_version_warns(fitted):
    table, out = fitted
    table["fingerprint"]["device"] = "Some Other CPU 9000"
    table["runtime_version"] = "0.0.1"
    costmodel.write_table(table, out)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        costmodel.load_table("laptop-cpu", "llama.cpp", path=out)
    msgs = [str(w.message) for w in rec if issubclass(w.category, TableMismatchWarning)]
    assert any("Some Other CPU 9000" in m for m in msgs)
    assert any("llama.cpp 0.0.1" in m for m in msgs)
    with pytest.raises(CostModelError, match="not laptop-cpu/onnxruntime"):
        costmodel.load_table("laptop-cpu", "onnxruntime", path=out)


def test_same_cpu_name_with_other_simd_features_warns(fitted, monkeypatch):
    """Two VMs both called "AMD EPYC", one AVX2-only, one with AVX-512 VNNI: not the same machine."""
    table, out = fitted
    table["fingerprint"].update(device=costmodel.cpu_model(), cores=os.cpu_count(), cpu_features=["avx2", "fma"])
    table["runtime_version"] = costmodel.runtime_version("llama.cpp")
    costmodel.write_table(table, out)
    monkeypatch.setattr(costmodel, "cpu_features", lambda: ["avx2", "fma", "avx512f", "avx512_vnni"])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        costmodel.load_table("laptop-cpu", "llama.cpp", path=out)
    (msg,) = [str(w.message) for w in rec if issubclass(w.category, TableMismatchWarning)]
    assert "other SIMD features (it had nothing more; this one has avx512_vnni, avx512f)" in msg
    monkeypatch.setattr(costmodel, "cpu_features", lambda: ["fma", "avx2"])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        costmodel.load_table("laptop-cpu", "llama.cpp", path=out)
    assert not [w for w in rec if issubclass(w.category, TableMismatchWarning)]


def test_shipped_table_measured_on_a_cpu_like_this_one_is_chosen(fitted, tmp_path, monkeypatch):
    """The default shipped table came from one CPU, a ``--<cpu>`` variant from another: the host's wins,
    else the one with the fewest SIMD features differing (an AVX-512 CPU without one of the variant's
    extensions is still far closer to it than to an AVX2-only one), first among tables of this CPU's
    name, then among all."""
    table, _ = fitted
    shipped = tmp_path / "tables"
    monkeypatch.setattr(costmodel, "TABLES_DIR", shipped)
    monkeypatch.setenv("PACKAGER_HOME", str(tmp_path / "home"))
    table["fingerprint"].update(device=costmodel.cpu_model(), cores=os.cpu_count(), cpu_features=["avx2", "fma"])
    costmodel.write_table(table, shipped / "laptop-cpu__llama.cpp.json")
    table["fingerprint"]["cpu_features"] = ["avx2", "fma", "avx512f"]
    costmodel.write_table(table, shipped / "laptop-cpu__llama.cpp--avx512.json")
    monkeypatch.setattr(costmodel, "cpu_features", lambda: ["avx2", "fma", "avx512f"])
    assert costmodel.table_path("laptop-cpu", "llama.cpp").name == "laptop-cpu__llama.cpp--avx512.json"
    monkeypatch.setattr(costmodel, "cpu_features", lambda: ["avx2", "fma"])
    assert costmodel.table_path("laptop-cpu", "llama.cpp").name == "laptop-cpu__llama.cpp.json"
    monkeypatch.setattr(costmodel, "cpu_features", lambda: ["avx2", "fma", "avx512f", "avx512bw"])
    assert costmodel.table_path("laptop-cpu", "llama.cpp").name == "laptop-cpu__llama.cpp--avx512.json"
    monkeypatch.setattr(costmodel, "cpu_features", lambda: ["sse4_2"])  # like neither: the default, which warns
    assert costmodel.table_path("laptop-cpu", "llama.cpp").name == "laptop-cpu__llama.cpp.json"
    table["fingerprint"].update(device="another CPU", cpu_features=["avx2", "fma", "avx512f", "avx512bw"])
    costmodel.write_table(table, shipped / "laptop-cpu__llama.cpp--other.json")  # its features match, its name not
    monkeypatch.setattr(costmodel, "cpu_features", lambda: ["avx2", "fma", "avx512f", "avx512bw"])
    assert costmodel.table_path("laptop-cpu", "llama.cpp").name == "laptop-cpu__llama.cpp--avx512.json"
    monkeypatch.setattr(costmodel, "cpu_model", lambda: "a third CPU")  # none of this name: the features decide
    assert costmodel.table_path("laptop-cpu", "llama.cpp").name == "laptop-cpu__llama.cpp--other.json"
    monkeypatch.setattr(costmodel, "cpu_features", lambda: ["sse4_2"])  # 3, 4 and 5 flags off: the closest
    assert costmodel.table_path("laptop-cpu", "llama.cpp").name == "laptop-cpu__llama.cpp.json"
    costmodel.write_table(table, tmp_path / "home" / "profiles" / "laptop-cpu__llama.cpp.json")  # profiled here
    assert costmodel.table_path("laptop-cpu", "llama.cpp").parent == tmp_path / "home" / "profiles"


def test_table_of_an_older_version_is_refitted_and_its_calibration_dropped(fitted):
    table, out = fitted
    coef = dict(table["model"]["decode"]["coef"])
    old = {**table, "version": 1, "calibration": {"n": 3, "decode": {"scale": 2.0, "offset": 0.0}}}
    old["model"] = {**table["model"], "decode": {"coef": {"const": 99.0}}}
    costmodel.write_table(old, out)
    with pytest.warns(TableMismatchWarning, match="older packager: refitted from its .* calibration dropped"):
        got = costmodel.load_table("laptop-cpu", "llama.cpp", path=out)
    assert got["version"] == costmodel.TABLE_VERSION and "calibration" not in got
    assert got["model"]["decode"]["coef"] == pytest.approx(coef)


def test_table_of_the_last_latency_version_keeps_its_calibration(fitted):
    """A table fitted before the per-format memory model: only its memory model is refitted."""
    table, out = fitted
    coef = dict(table["model"]["decode"]["coef"])
    old = {**table, "version": costmodel.LATENCY_VERSION, "calibration": {"n": 3, "decode": {"scale": 2.0, "offset": 0.0}}}
    old["model"] = {**table["model"], "memory": {"const": 37.0, "weights": 0.9, "kv": 8.0, "mape": 14.7}}
    costmodel.write_table(old, out)
    with pytest.warns(TableMismatchWarning, match="peak-memory model refitted from its .* points"):
        got = costmodel.load_table("laptop-cpu", "llama.cpp", path=out)
    assert got["version"] == costmodel.TABLE_VERSION and got["calibration"]["decode"]["scale"] == 2.0
    assert got["model"]["decode"]["coef"] == coef
    assert got["model"]["memory"]["coef"]["m:q4_0"] == pytest.approx(2.0, rel=1e-3)


def test_memory_remeasured_under_new_load_settings_keeps_latency(fitted):
    """Points measured under other load settings (llama.cpp's file mapped), or whose peak RSS counted
    something else, get it measured again and the memory model refitted; latency, its fit and calibration
    stay; a rerun measures nothing."""
    table, out = fitted
    table["calibration"] = {"n": 3, "decode": {"scale": 2.0, "offset": 0.0}}
    costmodel.write_table(table, out)
    read = {"q4_0": 1.0, "q8_0": 1.1}  # read into memory, q4_0 is resident once
    calls = []

    def measure(p):
        calls.append(p)
        return {"peak_rss_mb": true_rss(profiler.point_spec(p, TINY), read)}

    got = profiler.remeasure_memory(out, measure_point=measure, progress=False)
    assert len(calls) == len(table["points"]) and got["calibration"] == table["calibration"]
    assert got["model"]["decode"] == table["model"]["decode"]
    assert got["model"]["memory"]["coef"]["m:q4_0"] == pytest.approx(1.0, rel=1e-3)
    assert got["memory_measured"]["settings"] == profiler.memory_settings("llama.cpp") == {
        "use_mmap": False, "kv_cache": "f16", "peak_rss": "model"}
    assert costmodel.read_table(out)["model"]["memory"] == got["model"]["memory"]
    profiler.remeasure_memory(out, measure_point=measure, progress=False)
    assert len(calls) == len(table["points"])
    got["points"][0]["memory_settings"] = {"use_mmap": False, "kv_cache": "f16"}  # read, but counted otherwise
    costmodel.write_table(got, out)
    profiler.remeasure_memory(out, measure_point=measure, progress=False)
    assert len(calls) == len(table["points"]) + 1


def test_shipped_measured_tables_are_current_and_hold_their_memory_points():
    """No shipped table is refitted at load; every measured point's peak RSS counts what the backends count
    now; each memory model reproduces its own grid's peak RSS."""
    for path in sorted(costmodel.TABLES_DIR.glob("*.json")):
        table = json.loads(path.read_text())
        if table.get("kind") != "fitted":
            continue
        assert table["version"] == costmodel.TABLE_VERSION, f"{path.name}: refit it (see README)"
        now = profiler.memory_settings(table["runtime"])
        stale = [p for p in table["points"] if "decode_ms_per_token" in p and p.get("memory_settings") != now]
        assert not stale, f"{path.name}: re-measure its peak memory (packager profile --memory-only)"
        mem = table["model"]["memory"]
        assert mem["mape"] < 5 and mem.get("holdout_mape", 0) < 5, path.name


def test_head_format_never_profiled_is_refused(fitted):
    table, _ = fitted
    table["model"]["head_formats"] = ["q8_0"]
    with pytest.raises(CostModelError, match=r"LM head format\(s\) q4_0 were not profiled .*\(it has q8_0\)"):
        costmodel.predict(SubnetSpec.uniform(TINY, fmt="q4_0"), "laptop-cpu", "llama.cpp", Workload(16, 8), table)
    table["model"]["head_formats"] = ["q8_0", "q4_0"]
    del table["model"]["memory"]["coef"]["m:q4_0"]
    with pytest.raises(CostModelError, match=r"peak memory of format\(s\) q4_0 was not profiled"):
        costmodel.predict(SubnetSpec.uniform(TINY, fmt="q4_0"), "laptop-cpu", "llama.cpp", Workload(16, 8), table)


def test_grid_measures_every_head_format_the_runtime_stores():
    """ONNX Runtime's f16 and q8_0-twin embedding / LM head (what pack ships) is profiled, not only f32."""
    for runtime, fmts, heads in (("llama.cpp", ["q8_0", "q4_0"], {"q8_0", "q4_0"}),
                                 ("onnxruntime", ["int8_b32", "int4_b32"], {"f32", "f16", "int8s_b32"})):  # fmt: skip
        grid = profiler.default_grid(runtime, TINY, fmts, Workload(16, 8))
        assert {p["embed_format"] for p in grid} == heads
        assert len({profiler.point_key(p) for p in grid}) == len(grid)


def test_onnxruntime_float16_blocks_cost_what_float32_ones_do(tmp_path):
    """ONNX Runtime folds a float16 weight's Cast when it loads the graph, so an f16 block runs (and is
    priced) as f32; a format profiled only as an LM head prices no block (it used to price f16 at 0)."""
    truth = {"decode": {"const": 0.5, "layer": 0.05, "w:f32": 3.0, "w:int8s_b32": 1.0, "attn": 0.4,
                        "h:f32": 2.0, "h:f16": 2.0, "h:int8s_b32": 0.6},
             "prefill": {"const": 2.0, "layer": 0.3, "w:f32": 0.05, "w:int8s_b32": 0.04, "act": 1.0, "head": 0.5}}  # fmt: skip
    grid = profiler.default_grid("onnxruntime", TINY, ["f32", "int8s_b32"], Workload(16, 8))
    table = profiler.profile("laptop-cpu", "onnxruntime", grid=grid, out=tmp_path / "t.json", base=TINY, threads=1,
                             measure_point=lambda p: fake_measure(p, truth, "onnxruntime"), progress=False)  # fmt: skip
    assert table["model"]["formats"] == ["f32", "int8s_b32"] and "f16" in table["model"]["head_formats"]

    def decode(fmt):
        return costmodel.layer_cost(table, 4, 2, 128, 64, {n: fmt for n in LINEARS}, "decode")

    assert decode("f16") == pytest.approx(decode("f32")) and decode("f16") > 1.5 * decode("int8s_b32")


def test_grid_measures_quantized_blocks_under_a_quantized_head():
    """ONNX Runtime's block formats that have no table of their own are measured under the q8_0-twin head
    (a float32 head's reads would swamp a 4-bit block's), float blocks under the float32 head."""
    grid = profiler.default_grid("onnxruntime", TINY, ["f32", "int8", "int4_b32", "int4s_b32"], Workload(16, 8))
    fit = [p for p in grid if p["role"] == "fit" and p["layers"] != min(q["layers"] for q in grid)]
    assert {p["format"]: p["embed_format"] for p in fit} == {
        "f32": "f32", "int8": "int8s_b32", "int4_b32": "int8s_b32", "int4s_b32": "int8s_b32"}


def _calibration_pairs(table, depths, scale_dec, off_dec, scale_pre, off_pre):
    wl = Workload(16, 8)
    pairs = []
    for n in depths:
        spec = SubnetSpec.uniform(TINY, layers=list(range(n)), fmt="q8_0")
        dec = costmodel.spec_latency(table, spec, "decode", wl)
        pre = costmodel.spec_latency(table, spec, "prefill", wl)
        m = Measurement("llama.cpp", scale_pre * pre + off_pre, scale_dec * dec + off_dec, 10, 3, vars(wl), {})
        pairs.append((spec, m))
    return pairs, wl


def test_calibration_fits_scale_and_offset_with_enough_runs(fitted):
    table, _ = fitted
    depths = [1 + i % 6 for i in range(costmodel.MIN_OFFSET_FIT)]
    pairs, wl = _calibration_pairs(table, depths, 1.2, 0.5, 1.5, 2)
    costmodel.calibrate(table, pairs)
    assert table["calibration"]["decode"]["scale"] == pytest.approx(1.2)
    assert table["calibration"]["decode"]["offset"] == pytest.approx(0.5)
    spec, m = pairs[1]
    cost = costmodel.predict(spec, "laptop-cpu", "llama.cpp", wl, table)
    assert cost.decode_ms_per_token == pytest.approx(m.decode_ms_per_token)
    assert cost.prefill_ms == pytest.approx(m.prefill_ms)


def test_calibration_with_few_runs_fits_a_robust_scale(fitted):
    table, _ = fitted
    pairs, wl = _calibration_pairs(table, (2, 4, 6), 1.3, 0.0, 0.9, 0.0)
    pairs[0][1].decode_ms_per_token *= 5  # one disturbed run must not drag the scale
    costmodel.calibrate(table, pairs)
    assert table["calibration"]["decode"] == pytest.approx(
        {**table["calibration"]["decode"], "scale": 1.3, "offset": 0.0})
    assert table["calibration"]["prefill"]["scale"] == pytest.approx(0.9)


def test_per_format_calibration_learns_each_formats_speed(fitted):
    """Whole models where q4_0 runs 2x slower than the grid says and the rest 1.1x: a per-format
    calibration tells them apart, predicts unseen mixes better than one common scale, and leaves unmeasured formats at the common scale."""
    table, _ = fitted
    wl = Workload(16, 8)
    truth = copy.deepcopy(table)
    for phase in ("decode", "prefill"):
        coef = truth["model"][phase]["coef"]
        for k in coef:
            coef[k] *= 2.0 if costmodel.feature_format(k) == "q4_0" else 1.1

    def mixed(n, attn, mlp):
        spec = SubnetSpec.uniform(TINY, layers=list(range(n)), fmt=attn)
        for ly in spec.layers:
            ly.formats |= {k: mlp for k in MLP_LINEARS}
        return spec

    def run(spec):
        lat = {ph: costmodel.spec_latency(truth, spec, ph, wl) for ph in ("decode", "prefill")}
        return spec, Measurement("llama.cpp", lat["prefill"], lat["decode"], 10, 3, vars(wl), {})

    calib = [run(mixed(n, a, m)) for n in (2, 4, 6) for a, m in (("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "q4_0"))]
    unseen = [run(mixed(n, a, m)) for n, a, m in ((3, "q4_0", "q8_0"), (5, "q8_0", "q4_0"), (1, "q4_0", "q4_0"))]

    def err(t):
        return max(abs(costmodel.spec_latency(t, s, "decode", wl) / m.decode_ms_per_token - 1) for s, m in unseen)

    common = costmodel.calibrate(copy.deepcopy(table), calib)
    per = costmodel.calibrate(copy.deepcopy(table), calib, per_format=True)
    dec = per["calibration"]["decode"]
    fs = dec["format_scales"]  # shape terms and formats are nearly collinear in whole models: a ridge, not exact
    assert fs["q4_0"] > fs["q8_0"] + 0.4
    assert "f16" not in dec["format_scales"] and dec["mape_after"] < dec["mape_before"]
    assert err(per) < 0.7 * err(common)
    f16 = SubnetSpec.uniform(TINY, fmt="f16")  # never measured: priced at the common scale
    assert costmodel.layer_cost(per, 4, 2, 128, 64, "f16", workload=wl) == pytest.approx(
        dec["scale"] * costmodel.layer_cost(table, 4, 2, 128, 64, "f16", workload=wl))
    assert costmodel.spec_latency(per, f16, "decode", wl) > 0
    assert costmodel.provenance(per).endswith("calibrated on 9 whole-model runs per format")
    assert costmodel.provenance(common).endswith("calibrated on 9 whole-model runs")


# ---- profiler ----------------------------------------------------------------------------------------
def test_profiler_resume_skips_done_points(tmp_path):
    grid = tiny_grid(("q8_0", "q4_0"))
    out = tmp_path / "t.json"
    calls = []

    def dies_after_3(p):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(profiler.point_key(p))
        return fake_measure(p)

    with pytest.raises(KeyboardInterrupt):
        profiler.profile("laptop-cpu", "llama.cpp", grid=grid, out=out, base=TINY, threads=1,
                         measure_point=dies_after_3, progress=False)  # fmt: skip
    saved = json.loads(out.read_text())
    assert [profiler.point_key(p) for p in saved["points"]] == calls
    assert saved["fingerprint"]["threads"] == 1 and saved["runtime_version"]
    with pytest.raises(CostModelError, match="interrupted profile"):
        costmodel.load_table("laptop-cpu", "llama.cpp", path=out)
    again = []
    table = profiler.profile("laptop-cpu", "llama.cpp", grid=grid, out=out, base=TINY, threads=1,
                             measure_point=lambda p: again.append(profiler.point_key(p)) or fake_measure(p),
                             progress=False)  # fmt: skip
    assert set(again).isdisjoint(calls) and len(again) + len(calls) == len(grid)
    assert len(table["points"]) == len(grid) and "model" in table
    with pytest.raises(profiler.ProfileError, match="cannot resume"):
        profiler.profile("laptop-cpu", "llama.cpp", grid=grid, out=out, base=TINY, threads=2,
                         measure_point=fake_measure, progress=False)  # fmt: skip


def test_profiler_refuses_remote_targets_and_foreign_formats(tmp_path):
    with pytest.raises(profiler.ProfileError, match="remote device"):
        profiler.profile("a100", "tensorrt", out=tmp_path / "x.json")
    with pytest.raises(profiler.ProfileError, match="does not run format"):
        profiler.profile("laptop-cpu", "onnxruntime", grid=tiny_grid(("q8_0",)), out=tmp_path / "x.json",
                         base=TINY, measure_point=fake_measure, progress=False)  # fmt: skip


@pytest.mark.integration
def test_real_profile_point_llamacpp():
    """The production path on one tiny point: random model → GGUF → llama.cpp measure."""
    base = ArchInfo("llama", 2, 64, 4, 2, 16, 128, 49152, True)
    p = profiler._point(2, 4, 2, 128, 64, "q8_0", "q8_0", Workload(8, 4))
    res = profiler.RealMeasure("llama.cpp", base, 2, threads=1, repeats=1)(p)
    assert res["decode_ms_per_token"] > 0 and res["prefill_ms"] > 0 and res["size_mb"] > 0
    assert res["memory_settings"] == profiler.memory_settings("llama.cpp")  # --memory-only leaves it alone


@pytest.mark.integration
def test_interleaved_measurement_exports_once_and_measures_every_model_each_round(monkeypatch):
    base = ArchInfo("llama", 2, 64, 4, 2, 16, 128, 49152, True)
    rb = profiler.RandomBase(base, 2, None)
    specs = {f: profiler.point_spec(profiler._point(2, 4, 2, 128, 64, f, "q8_0", Workload(8, 4)), rb.arch)
             for f in ("q8_0", "q4_0")}  # fmt: skip
    exported, export = [], profiler.export_for

    def counting(runtime, model, tokenizer, spec, folder):
        exported.append(spec)
        return export(runtime, model, tokenizer, spec, folder)

    monkeypatch.setattr(profiler, "export_for", counting)
    res = profiler.measure_interleaved(rb.model, rb.tokenizer, specs, "llama.cpp", Workload(8, 4), threads=1,
                                       rounds=2, repeats=1)  # fmt: skip
    assert len(exported) == 2 and set(res) == {"q8_0", "q4_0"}
    for r in res.values():
        assert r["rounds"] == 2 and r["decode_ms"] > 0 and r["prefill_ms"] > 0 and r["decode_spread"] >= 0
        assert len(r["decode_rounds"]) == len(r["prefill_rounds"]) == 2
        assert min(r["decode_rounds"]) <= r["decode_ms"] <= max(r["decode_rounds"])
