"""`packager pack` end to end on a small random model that carries SmolLM2's tokenizer."""

import json
import shutil
from dataclasses import asdict, replace

import gguf
import pytest
import torch
from click.testing import CliRunner

from packager.cli import main
from packager.pack import Pack, PackConfig, PackError, selection_summary
from packager.scorecard import promotion_line, recovery_summary, schema_version
from packager.selection import candidate_key, format_family, spec_key
from packager.verify import not_comparable
from search.importance import Importance
from search.problem import Evaluation
from search.space import FORMAT_SHARE
from search.recovery import RecoveryConfig
from subnet.arch import LINEARS, linear_module_name
from subnet.spec import SubnetSpec
from targets.backend import PEAK_RSS, Measurement, memory_record
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    from subnet.loading import embedded_model_dir

    folder = tmp_path_factory.mktemp("small")
    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    model = tiny_model("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def small_config(model_dir, **over):
    kw = dict(target="laptop-cpu", model=str(model_dir), runtimes=["llama.cpp"], budget=6, calib_blocks=8, val_blocks=2,
              floor_blocks=4, eval_blocks=2, report_blocks=4, recover_steps=4, accuracy_floor=10.0, seed=0, measure_rounds=2,
              long_recovery=False)
    kw.update(over)
    return PackConfig(**kw)


def test_pack_end_to_end_and_verify(small_model_dir, tmp_path):
    out = tmp_path / "bundle"
    folder = Pack(small_config(small_model_dir), out).run()
    assert (tmp_path / "bundle.tar.gz").is_file()
    card = json.loads((folder / "scorecard.json").read_text())
    sec = card["runtimes"]["llama.cpp"]
    assert sec["packaged"]["decode_ms_per_token"]["kind"] == "measured"
    assert sec["packaged"]["predicted_decode_ms"]["kind"] == "estimated"
    speedup = sec["decode_speedup"]  # base and packaged timed in turns: the gain is the median per-round ratio
    assert speedup["rounds"] == 2 and speedup["low"] <= speedup["median"] <= speedup["high"]
    assert sec["packaged"]["decode_ms_per_token"]["source"].startswith("median of 2 rounds (base and packaged taking turns) of 3 runs")
    source = sec["packaged"]["peak_memory_mb"]["source"]  # what the figure counts, and how the model was loaded
    assert source.startswith("the model's peak RSS (the process's peak minus") and " (use_mmap=False, kv_cache=f16), " in source
    settings = {"use_mmap": False, "kv_cache": "f16"}  # and as fields, for verify to compare
    assert sec["packaged"]["peak_memory_mb"]["settings"] == {**settings, "peak_rss": "model"}
    assert sec["base"]["decode_ms_per_token"]["settings"] == settings and "settings" not in sec["packaged"]["size_mb"]
    assert card["spec"]["base"]["num_layers"] == 4
    floor, ci = sec["accuracy_floor"], sec["accuracy_floor"]["increase_ci95"]
    assert sec["packaged"]["perplexity_runtime"]["source"].startswith("1,020 held-out tokens")
    assert ci["blocks"] == 4 and ci["low"] <= ci["ratio"] <= ci["high"]
    assert ci["ratio"] == pytest.approx(floor["packaged"] / floor["base"])
    assert (folder / "scorecard.html").read_text().count("data:image/png;base64,") >= 1
    names = {role: gguf.GGUFReader(tmp_path / "bundle.work" / "artifacts" / "llama.cpp" / f"{role}.gguf")
             .fields["general.name"].contents() for role in ("packaged", "base")}  # fmt: skip
    assert names == {"packaged": f"{small_model_dir.name} packaged for laptop-cpu", "base": f"{small_model_dir.name} base"}
    md = (folder / "scorecard.md").read_text()
    assert "trained on 40,960 calibration tokens, early-stopped on 510 held-out ones)" in md
    assert f"| {speedup['median']:.2f}x ({speedup['low']:.2f}–{speedup['high']:.2f}x over 2 rounds) |" in md
    assert card["recovery"]["meets_floor"] and "on 1,020 tokens of held-out calibration documents (the check split), floor" in md
    # a finished run is refused without --force; verify passes, then catches a changed byte
    with pytest.raises(PackError, match="already exists"):
        Pack(small_config(small_model_dir), out)
    res = CliRunner().invoke(main, ["verify", str(tmp_path / "bundle.tar.gz"), "--no-measure"])
    assert res.exit_code == 0 and "integrity: ok" in res.output
    res = CliRunner().invoke(main, ["verify", str(folder), "--rounds", "2", "--tolerance", "100"])  # re-measured
    assert res.exit_code == 0 and f"llama.cpp decode_ms_per_token: scorecard {sec['packaged']['decode_ms_per_token']['value']:.3g}" in res.output
    assert "llama.cpp peak_memory_mb: scorecard" in res.output and "not compared" not in res.output
    packed = next((folder / "artifacts" / "llama.cpp").glob("*.gguf"))
    data = bytearray(packed.read_bytes())
    data[-1] ^= 0xFF
    packed.write_bytes(bytes(data))
    res = CliRunner().invoke(main, ["verify", str(folder), "--no-measure"])
    assert res.exit_code == 2 and "packaged.gguf has changed" in res.output


def test_verify_compares_a_figure_only_where_it_was_measured_alike():
    """A figure measured under other load settings, or a peak memory that counted something else, is not
    held against today's: from its settings field (schema 2), or from a schema-1 peak memory's source,
    whose ONNX Runtime figure counted the whole process before stop 42 and whose llama.cpp figure was
    taken with the file mapped before stop 41."""
    now = Measurement("llama.cpp", 1.0, 1.0, 124.0, 3, {}, {}, {"use_mmap": False, "kv_cache": "f16"})
    v2, v1 = 2, 1
    mem = {"value": 124.0, "source": PEAK_RSS, "settings": memory_record(now.settings)}
    assert not_comparable(v2, "peak_memory_mb", mem, now) is None
    assert not_comparable(v2, "decode_ms_per_token", {**mem, "settings": now.settings}, now) is None
    mapped = {**mem, "settings": memory_record({"use_mmap": True, "kv_cache": "f16"})}
    assert not_comparable(v2, "peak_memory_mb", mapped, now) == (
        "the scorecard's figure was measured with use_mmap=True, kv_cache=f16, peak_rss=model, "
        "this version's with use_mmap=False, kv_cache=f16, peak_rss=model")
    assert "counted something other than" in not_comparable(v2, "peak_memory_mb", {**mem, "settings": now.settings}, now)
    assert "measured with other settings" in not_comparable(v2, "prefill_ms", {**mem, "settings": {}}, now)
    where = "AMD EPYC, 2 threads, llama.cpp 0.3.36"
    src = {"source": f"{PEAK_RSS}, {where} (use_mmap=False, kv_cache=f16), 2026-12-05"}
    assert not_comparable(v1, "peak_memory_mb", src, now) is None and not_comparable(schema_version({}), "peak_memory_mb", src, now) is None
    assert not_comparable(v1, "decode_ms_per_token", {"source": "median of 3"}, now) is None  # schema 1: timings compared
    assert "other load settings" in not_comparable(v1, "peak_memory_mb", {"source": f"{PEAK_RSS}, {where}, 2026-12-01"}, now)
    old_ort = {"source": "peak RSS of the measuring process (Python, numpy and ONNX Runtime included), AMD EPYC"}
    ort = replace(now, runtime="onnxruntime", settings={})
    assert "counted something other than the model's peak RSS" in not_comparable(v1, "peak_memory_mb", old_ort, ort)
    assert not_comparable(v1, "peak_memory_mb", {"source": f"{PEAK_RSS}, AMD EPYC, 2 threads, onnxruntime 1.32.0"}, ort) is None


def test_pack_resumes_from_the_last_finished_stage(small_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "b"
    cfg = small_config(small_model_dir)

    def boom(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Pack, "stage_export", boom)
    with pytest.raises(KeyboardInterrupt):
        Pack(cfg, out).run()
    monkeypatch.undo()
    with pytest.raises(PackError, match="pass --resume"):
        Pack(cfg, out)
    with pytest.raises(PackError, match="report_blocks 5 must be a multiple"):
        Pack(small_config(small_model_dir, report_blocks=5), tmp_path / "c")
    with pytest.raises(PackError, match="other options"):
        Pack(small_config(small_model_dir, budget=7), out, resume=True)
    p = Pack(cfg, out, resume=True)
    assert set(p.state["done"]) == {"prepare", "search", "select", "recover"}
    p.run()
    assert (out / "manifest.json").is_file()
    # an option that acts only after the shortlist (--long-recovery) redoes the run from the select stage
    with pytest.raises(PackError, match="other options"):
        Pack(replace(cfg, long_recovery=True, budget=7), out, resume=True, force=True)  # the search's budget did too
    again = Pack(replace(cfg, long_recovery=True), out, resume=True, force=True)
    assert set(again.state["done"]) == {"prepare", "search"} and again.state["config"]["long_recovery"]
    # --measure-rounds acts from the measure stage on; with a select-stage option too, the earlier stage wins
    timed = Pack(replace(cfg, measure_rounds=3), out, resume=True, force=True)
    assert set(timed.state["done"]) == {"prepare", "search", "select", "recover", "export"}
    both = Pack(replace(cfg, measure_rounds=3, long_recovery=True), out, resume=True, force=True)
    assert set(both.state["done"]) == {"prepare", "search"}
    with pytest.raises(PackError, match="at least 1 round"):
        Pack(small_config(small_model_dir, measure_rounds=0), tmp_path / "d")


def test_select_recovers_a_shortlist_and_keeps_the_fastest_that_meets_the_floor(small_model_dir, tmp_path):
    # a floor of 0 before recovery leaves little feasible: faster front points are shortlisted and recovered
    cfg = small_config(small_model_dir, accuracy_floor=0.01, recoverable=100.0, shortlist=2, shortlist_steps=2)
    p = Pack(cfg, tmp_path / "s")

    def finish(stage):
        p.state.setdefault("done", {})[stage] = {"result": getattr(p, f"stage_{stage}")(), "wall_s": 0}

    finish("prepare")
    finish("search")
    # a random model loses nothing by pruning: make faster candidates less accurate, as real ones are
    path, base = p.work / "evaluations.json", p.result("search")["base"]
    evals = json.loads(path.read_text())
    for e in evals:
        e["ppl"] = base["ppl"] * (1 + max(0.0, 1 - e["decode_ms"] / base["decode_ms"]))
    path.write_text(json.dumps(evals))
    finish("select")
    sel = p.result("select")
    first = [t for t in sel["shortlist"] if candidate_key(t["evaluation"]["x"]) not in sel["ladder"]]
    assert 1 <= len(first) <= 2 and len(sel["ladder"]) <= 2 * cfg.ladder
    met = {format_family(SubnetSpec.from_dict(t["evaluation"]["spec"])) for t in first if t["meets_floor"]}
    for t in sel["shortlist"]:  # the ladder only climbs in a family whose shortlisted member met the floor
        if candidate_key(t["evaluation"]["x"]) in sel["ladder"]:
            assert format_family(SubnetSpec.from_dict(t["evaluation"]["spec"])) in met
    for t in sel["shortlist"]:
        assert t["meets_floor"] == (t["floor_ppl_after"] <= t["floor_ppl_limit"])
        assert t["val_curve"][0][0] == 0 and t["floor_ppl_before"] != t["val_curve"][0][1]  # two sets of blocks
    passing = [t["evaluation"] for t in sel["shortlist"] if t["meets_floor"]]
    want = min(passing, key=lambda e: e["decode_ms"]) if passing else sel["fallback"]
    assert sel["winner"] == want
    assert json.loads((p.work / "spec.json").read_text())["meta"]["selected"] == sel["how"]
    # a resumed run reuses the short recoveries made under its options, and redoes those made under others
    # (an option added since, resumed at its default, may change what recovery trains on)
    first = sel["shortlist"][0]
    net, base_ev = p.problem(p.sorted_model(), cfg.accuracy_floor).supernet, Evaluation(**p.result("search")["base"])
    again = p.short_recoveries(net, base_ev, [Evaluation(**first["evaluation"])])[0]
    assert (again["wall_s"], again["floor_ppl_after"]) == (first["wall_s"], first["floor_ppl_after"])
    saved = json.loads((p.work / "shortlist.json").read_text())
    saved["options"]["recover_blocks"] += 1
    (p.work / "shortlist.json").write_text(json.dumps(saved))
    redone = p.short_recoveries(net, base_ev, [Evaluation(**first["evaluation"])])[0]
    assert redone["wall_s"] != first["wall_s"] and redone["floor_ppl_limit"] == pytest.approx(first["floor_ppl_limit"])
    assert json.loads((p.work / "shortlist.json").read_text())["options"]["recover_blocks"] == cfg.recover_blocks


def test_promotion_gives_a_near_miss_the_full_recovery_and_the_recover_stage_reuses_it(small_model_dir, tmp_path,
                                                                                         monkeypatch):
    p = Pack(small_config(small_model_dir, recover_steps=2, promote_margin=0.05), tmp_path / "p")
    p.state.setdefault("done", {})["prepare"] = {"result": p.stage_prepare(), "wall_s": 0}
    p.state["done"]["search"] = {"result": p.stage_search(), "wall_s": 0}
    evals = json.loads((p.work / "evaluations.json").read_text())
    pruned = min(evals, key=lambda e: e["decode_ms"])  # not the base: there is something to recover
    model = p.sorted_model()

    def near(limit, after):
        return [{"evaluation": pruned, "floor_ppl_before": after, "floor_ppl_after": after, "floor_ppl_limit": limit,
                 "meets_floor": False}]

    problem = p.problem(model, p.cfg.accuracy_floor)
    assert p.promotion(problem, near(1.0, 1.2), None) is None  # 20% above the floor: not promoted
    p.cfg.step_down = 0
    missed = p.promotion(problem, near(1.0, 1.04), None)  # promoted, but no model reaches perplexity 1
    assert missed["meets_floor"] is False and missed["missed"] == [] and not (p.work / "recovered").exists()
    met = p.promotion(problem, near(1e9, 1.04e9), None)
    assert met["meets_floor"] and met["recovery"]["steps_run"] == 2 and (p.work / "recovered" / "config.json").is_file()
    p.state["done"]["select"] = {"result": {"promoted": met}, "wall_s": 0}
    rec = p.stage_recover()
    assert rec["done_in"] == "select" and rec["floor_ppl_after"] == met["floor_ppl_after"]
    assert recovery_summary(rec, asdict(p.cfg)).endswith("floor 1000000000.00: met (formats simulated)")
    # a winner recovered in the recover stage checkpoints under its own name: a resumed run whose winner
    # changed since starts that winner afresh instead of failing on the other's checkpoints
    monkeypatch.setattr(Pack, "recovery_config", lambda self: RecoveryConfig(max_steps=2, checkpoint_every=2, qat=True))
    others = sorted((e for e in evals if e["x"] != pruned["x"]), key=lambda e: e["decode_ms"])
    specs = [Evaluation(**e).spec_obj() for e in (pruned, others[0])]
    for spec in specs:
        spec.save(p.work / "spec.json")
        p.recover_winner()
    assert sorted(d.name for d in (p.work / "recovery").iterdir()) == sorted(spec_key(s) for s in specs)


def test_a_promoted_candidate_that_misses_steps_down_one_format_share(small_model_dir, tmp_path):
    """Missing the floor after the full recovery, the promoted member's family member one format share
    lower (its most rounding-sensitive block back at the widest formats) gets the same recovery; the first
    try is recorded as missed, and the scorecard tells both."""
    p = Pack(small_config(small_model_dir, recover_steps=2), tmp_path / "p")
    p.state.setdefault("done", {})["prepare"] = {"result": p.stage_prepare(), "wall_s": 0}
    problem = p.problem(p.sorted_model(), p.cfg.accuracy_floor)
    space = problem.space
    assert space.vars[-1].name == FORMAT_SHARE and len(space.vars[-1].choices) > 1
    narrow = problem.evaluate(space.largest(fmt_index=space.n_formats - 1))  # every block narrowed
    tried = [{"evaluation": asdict(narrow), "floor_ppl_before": 1.04, "floor_ppl_after": 1.04, "floor_ppl_limit": 1.0,
              "meets_floor": False}]  # a floor no model reaches: every try misses
    out = p.promotion(problem, tried, None)
    assert [m["evaluation"]["x"] for m in out["missed"]] == [narrow.x] and out["meets_floor"] is False
    down = out["evaluation"]["x"]  # the first lower share that changes it (0.95 and 0.9 of 4 blocks round to 4)
    assert down[:-1] == narrow.x[:-1] and space.vars[-1].choices[down[-1]] == 0.8
    widest = {ly.formats["q_proj"] for ly in Evaluation(**out["evaluation"]).spec_obj().layers}
    assert widest == {space.config.attn_formats[0], space.config.attn_formats[-1]}  # some blocks back at the widest
    assert [t["recovery"]["steps_run"] for t in (*out["missed"], out)] == [2, 2]
    # the promoted member's floor check before recovery is its short recovery's; the step down's is scored anew
    assert out["missed"][0]["floor_ppl_before"] == 1.04 and out["floor_ppl_before"] > 2
    line = promotion_line(selection_summary({"shortlist": [], "promoted": out, "how": ""}))
    assert "; missed, so it stepped down one format share: " in line and line.endswith("missed, so the fallback won.")
    faster_than = narrow.decode_ms + 1e-6  # a passing candidate just slower than the promoted one, faster than its step down
    assert p.promotion(problem, tried, faster_than)["missed"] == []


def test_long_recovery_trains_the_promoted_candidate_longer_on_more_text_and_keeps_the_shortlist(small_model_dir,
                                                                                                    tmp_path):
    """--long-recovery: the promotion runs every one of its steps (no early stopping) on more training blocks,
    the same held-out ones, in a folder of its own; the scorecard says on how much text; the shortlist's
    recoveries, which the option does not touch, are kept."""
    cfg = small_config(small_model_dir, long_recovery=True, long_recover_steps=40, long_recover_blocks=12)
    p = Pack(cfg, tmp_path / "p")
    p.state.setdefault("done", {})["prepare"] = {"result": p.stage_prepare(), "wall_s": 0}
    p.state["done"]["search"] = {"result": p.stage_search(), "wall_s": 0}
    pruned = min(json.loads((p.work / "evaluations.json").read_text()), key=lambda e: e["decode_ms"])
    blocks, config = p.promotion_recovery()
    assert len(blocks.train) == 12 and torch.equal(blocks.held, p.recovery_blocks.held)
    assert config.max_steps == 40 and config.evaluations_patience == 40 // config.eval_every
    tried = [{"evaluation": pruned, "floor_ppl_before": 1.04e9, "floor_ppl_after": 1.04e9, "floor_ppl_limit": 1e9,
              "meets_floor": False}]
    met = p.promotion(p.problem(p.sorted_model(), cfg.accuracy_floor), tried, None)
    assert met["recovery"]["steps_run"] == 40 and met["recovery"]["stopped_reason"] == "max steps"
    assert met["recovery"]["train_blocks"] == 12
    assert [d.name for d in (p.work / "promotion").iterdir()] == [candidate_key(pruned["x"]) + "-long"]
    line = promotion_line(selection_summary({"shortlist": [], "promoted": met, "how": ""}))
    assert line.startswith("promoted to long recovery: ") and line.endswith("met, so it won.")
    assert "after 40 steps on 3,072 calibration tokens" in line
    # shortlist.json made without the option is reused with it
    net, base_ev = p.problem(p.sorted_model(), cfg.accuracy_floor).supernet, Evaluation(**p.result("search")["base"])
    first = p.short_recoveries(net, base_ev, [Evaluation(**pruned)])[0]
    saved = json.loads((p.work / "shortlist.json").read_text())
    saved["options"] |= {"long_recovery": False, "promote_margin": 0.2}
    (p.work / "shortlist.json").write_text(json.dumps(saved))
    assert p.short_recoveries(net, base_ev, [Evaluation(**pruned)])[0]["wall_s"] == first["wall_s"]


def _prepare_with_winner(p: Pack, fmt: str) -> None:
    """Run ``p``'s prepare stage and mark its select stage done with the base's largest member, its
    first three blocks in ``fmt`` (the recover stage's input)."""
    p.state.setdefault("done", {})["prepare"] = {"result": p.stage_prepare(), "wall_s": 0}
    space = p.space(Importance.load(p.work / "importance.json"))
    spec = space.decode(space.largest())
    for ly in spec.layers[:3]:
        ly.formats = {n: fmt for n in ly.formats}
    spec.save(p.work / "spec.json")
    p.state["done"]["select"] = {"result": {"promoted": None}, "wall_s": 0}


def test_a_runtime_that_rounds_the_winner_differently_gets_its_own_recovery(small_model_dir, tmp_path):
    """iq4_nl has no ONNX Runtime twin: its retarget is recovered again, warm-started, for the ONNX export;
    missing the floor (here an unreachable one), it is tried again with the most rounding-sensitive half
    of the blocks the winner narrows (3 of 4) at the base's formats, and the more accurate try is kept.
    A share that narrows the same blocks as an earlier try (1.0 twice) is not tried again."""
    p = Pack(small_config(small_model_dir, runtimes=["llama.cpp", "onnxruntime"], recover_steps=2,
                          runtime_recover_steps=2, accuracy_floor=-0.5, runtime_format_shares=[1.0, 1.0, 0.5]),
             tmp_path / "r")  # fmt: skip
    _prepare_with_winner(p, "iq4_nl")
    rec = p.stage_recover()
    assert rec["gptq_linears"] == 3 * 7  # the winner's recovery started from GPTQ's rounding of its iq4_nl linears
    own = rec["runtimes"]["onnxruntime"]
    assert own["steps_run"] == 2 and own["changed"] == 3 * 7 and "iq4_nl->int4" in own["example"]
    assert "llama.cpp" not in rec["runtimes"]  # the search runtime holds its own formats
    assert own["floor_ppl_before"] != pytest.approx(rec["floor_ppl_after"])  # at ONNX Runtime's rounding, not iq4_nl's
    assert not own["meets_floor"] and [t["format_share"] for t in own["tries"]] == [1.0, 0.5]
    assert own["gptq_linears"] == 7 * own["narrow_blocks"]  # GPTQ redone at int4s_b32 in the blocks kept narrow
    assert own["floor_ppl_after"] == min(t["floor_ppl_after"] for t in own["tries"])
    assert own["narrow_blocks"] == (3 if own["format_share"] == 1.0 else 2)
    p.state["done"]["recover"] = {"result": rec, "wall_s": 0}
    shipped, base = p.runtime_specs("onnxruntime")  # the kept try's spec goes to the export
    wide = [i for i, ly in enumerate(shipped.layers) if set(ly.formats.values()) == {"int8s_b32"}]
    assert len(wide) == 4 - own["narrow_blocks"] and {f for ly in base.layers for f in ly.formats.values()} == {"int8s_b32"}
    assert p.recovered_dir("onnxruntime").name == "recovered-onnxruntime"
    assert p.recovered_dir("llama.cpp").name == "recovered"
    recovered, scales = p.recovered_model("llama.cpp")
    int4 = {linear_module_name(i, n) for i, ly in enumerate(shipped.layers) for n, f in ly.formats.items() if f == "int4s_b32"}
    assert scales and set(p.recovered_model("onnxruntime")[1]) == int4  # ONNX Runtime keeps its own int4 blocks' scales
    # the warm start is the winner's recovered model with GPTQ's compensation for iq4_nl swapped for that for
    # int4s_b32, in exactly its iq4_nl linears, which start at GPTQ's int4s_b32 scales
    start, kept, regptq = p.runtime_warm_start(p.retargeted_specs("onnxruntime")[0])
    moved = {n for (n, a), b in zip(start.named_parameters(), recovered.parameters()) if not torch.equal(a, b)}
    assert len(moved) == 3 * 7 and {n.split(".")[2] for n in moved} == {"0", "1", "2"}
    assert set(kept) == {linear_module_name(i, n) for i in range(3) for n in LINEARS} and regptq == 3 * 7
    assert not any(torch.equal(kept[k], scales[k]) for k in kept)


def _layout_costs(per_linear: dict[str, float], size_mb: float = 10.0):
    """A stand-in for ``predict``: decode ms the sum of a per-format cost over the linears; an unlisted
    format was not profiled."""
    from types import SimpleNamespace

    from profiles.costmodel import CostModelError

    def predict(spec, *_):
        fmts = [f for ly in spec.layers for f in ly.formats.values()]
        if any(f not in per_linear for f in fmts):
            raise CostModelError("not profiled")
        return SimpleNamespace(decode_ms_per_token=sum(per_linear[f] for f in fmts), size_mb=size_mb, peak_memory_mb=size_mb)

    return predict


def test_fastest_layouts_moves_a_code_width_where_the_table_prices_the_model_faster():
    """int4s_b32 -> int4_b64 (the fastest of its width; int4_b128 unprofiled); int8s_b32 stays, int8_b32 being
    under LAYOUT_GAIN faster; a row that block 64 does not divide keeps its format."""
    from packager.pack import fastest_layouts
    from subnet.arch import arch_of
    from subnet.formats import formats_for
    from subnet.spec import swap_formats

    spec = SubnetSpec.uniform(arch_of(tiny_model("llama", hidden_size=96, intermediate_size=128).config), fmt="int4s_b32")
    spec.layers[0].formats = {n: "int8s_b32" for n in LINEARS}
    price = _layout_costs({"int4s_b32": 1.0, "int4_b32": 0.95, "int4_b64": 0.8, "int8s_b32": 2.0, "int8_b32": 1.99})
    fast, swaps = fastest_layouts(spec, formats_for("onnxruntime"), lambda s: price(s).decode_ms_per_token)
    assert swaps == ["int4s_b32->int4_b64"]
    assert set(fast.layers[0].formats.values()) == {"int8s_b32"}
    assert fast.layers[1].formats["down_proj"] == "int4_b64"  # rows of 128
    assert fast.layers[1].formats["up_proj"] == "int4s_b32"  # rows of 96
    assert fast.to_dict() == swap_formats(spec, "int4s_b32", "int4_b64").to_dict()
    assert fastest_layouts(spec, ["int4s_b32", "int8s_b32"], lambda s: price(s).decode_ms_per_token)[1] == []


def test_a_faster_layout_is_recovered_for_its_runtime_and_falls_back_to_the_exact_twins(small_model_dir, tmp_path,
                                                                                         monkeypatch):  # fmt: skip
    """--retarget fastest: a q4_0 winner goes to ONNX Runtime at int4_b64, not its twin int4s_b32, and is
    recovered for it; a format-share try widens its sensitive blocks to the twin, not the base's formats.
    Under an unreachable floor, the exact twins ship; a size budget the relayout breaks keeps them too."""
    import packager.pack as pack
    from packager.scorecard import recovery_line

    monkeypatch.setattr(pack, "predict", _layout_costs({"int4s_b32": 1.0, "int4_b64": 0.8, "int8s_b32": 2.0}))
    kw = dict(runtimes=["llama.cpp", "onnxruntime"], recover_steps=2, runtime_recover_steps=2, retarget="fastest")
    p = Pack(small_config(small_model_dir, runtime_format_shares=[0.5], **kw), tmp_path / "met")
    _prepare_with_winner(p, "q4_0")
    rec = p.stage_recover()
    own = rec["runtimes"]["onnxruntime"]
    ms = [3 * 7 * 1.0 + 7 * 2.0, 3 * 7 * 0.8 + 7 * 2.0]  # three blocks of 4-bit linears, one of 8-bit ones
    assert own["used"] and own["relayout"] == {"swaps": ["int4s_b32->int4_b64"], "decode_ms": pytest.approx(ms)}
    assert own["changed"] == 3 * 7 and own["narrow_blocks"] == 2 and "q4_0->int4_b64" in own["example"]
    p.state["done"]["recover"] = {"result": rec, "wall_s": 0}
    shipped = [sorted(set(ly.formats.values())) for ly in p.runtime_specs("onnxruntime")[0].layers]
    assert sorted(shipped) == [["int4_b64"], ["int4_b64"], ["int4s_b32"], ["int8s_b32"]]  # widened to the twin
    line = recovery_line({"recovery": own})
    assert line.startswith("relaid for speed (int4s_b32->int4_b64: 35.00 → 30.80 ms/token")
    assert "2 blocks keep the carried formats, the more rounding-sensitive rest the exact twins'" in line

    p2 = Pack(small_config(small_model_dir, accuracy_floor=-0.5, runtime_format_shares=[1.0], **kw), tmp_path / "missed")
    for name in ("importance.json", "spec.json", "sorted", "recovered"):  # the same winner, recovered
        src = p.work / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, p2.work / name)
    p2.state["done"] = {k: p.state["done"][k] for k in ("prepare", "select")}
    own = p2.runtime_recovery("onnxruntime")
    assert not own["used"] and not own["meets_floor"]
    p2.state["done"]["recover"] = {"result": {"runtimes": {"onnxruntime": own}}, "wall_s": 0}
    assert not p2.own_recovery("onnxruntime") and not (p2.work / "spec-onnxruntime.json").exists()
    assert {f for ly in p2.runtime_specs("onnxruntime")[0].layers[:3] for f in ly.formats.values()} == {"int4s_b32"}
    assert recovery_line({"recovery": own}).endswith("ships the winner's weights in their exact formats")
    p3 = Pack(small_config(small_model_dir, size_mb=5.0, **kw), tmp_path / "budget")
    assert p3.relaid_spec("onnxruntime", p.retargeted_specs("onnxruntime")[0]) is None  # 10 MiB priced over 5


def test_each_recovery_starts_from_gptq_unless_it_is_off(small_model_dir, tmp_path):
    from packager.pack import gptq_notes
    from subnet.arch import arch_of
    from subnet.extract import extract

    model = tiny_model("llama", vocab_size=128)
    spec = SubnetSpec.uniform(arch_of(model.config), layers=[0, 1], fmt="iq4_nl", embed_format="q8_0")
    calib, plain = torch.randint(3, 128, (4, 32)), extract(model, spec)
    sub, scales = Pack(small_config(small_model_dir), tmp_path / "on").rounded_subnet(model, spec, calib)
    assert len(scales) == 2 * 7
    assert not torch.equal(sub.model.layers[0].mlp.up_proj.weight, plain.model.layers[0].mlp.up_proj.weight)
    sub, scales = Pack(small_config(small_model_dir, gptq=False), tmp_path / "off").rounded_subnet(model, spec, calib)
    assert scales == {} and all(torch.equal(a, b) for a, b in zip(sub.parameters(), plain.parameters()))
    (note,) = gptq_notes({"gptq_linears": 14}, spec, 1024)
    assert note.startswith("14 iq4_nl linears rounded by GPTQ") and "on 1,024 calibration tokens" in note
    assert gptq_notes({"ppl_after": 1.0}, spec, 1024) == []  # recovered without GPTQ (off, or before it existed)


def test_rounding_rank_is_measured_when_the_search_did_not_rank_blocks(small_model_dir, tmp_path):
    """hetero mode ranks no blocks in prepare; a runtime's format-share try needs the ranking: measured then, kept."""
    p = Pack(small_config(small_model_dir, mode="hetero"), tmp_path / "h")
    p.state.setdefault("done", {})["prepare"] = {"result": p.stage_prepare(), "wall_s": 0}
    assert Importance.load(p.work / "importance.json").quant_rank is None
    rank = p.rounding_rank()
    assert sorted(rank) == list(range(4))
    assert Importance.load(p.work / "importance.json").quant_rank == rank


def test_equalization_is_tuned_for_the_narrow_formats_the_cost_model_finds_faster(monkeypatch):
    """q5_0 decoding slower than q8_0 (as on an AVX-512 CPU) is left out; none faster, or a table that
    cannot tell, keeps every narrow format."""
    from types import SimpleNamespace

    import packager.pack as pack
    from profiles.costmodel import CostModelError
    from subnet.arch import arch_of
    from targets.registry import get_target

    arch, target = arch_of(tiny_model("llama").config), get_target("laptop-cpu")

    def costs(ms):
        return lambda spec, *_: SimpleNamespace(decode_ms_per_token=ms[spec.layers[0].formats["q_proj"]])

    monkeypatch.setattr(pack, "predict", costs({"q8_0": 8.3, "q5_0": 8.6, "iq4_nl": 6.6, "q4_0": 5.8}))
    assert pack.equalization_formats(arch, target, "llama.cpp") == ["iq4_nl", "q4_0"]
    monkeypatch.setattr(pack, "predict", costs({"q8_0": 5.0, "q5_0": 8.6, "iq4_nl": 6.6, "q4_0": 5.8}))
    assert pack.equalization_formats(arch, target, "llama.cpp") == ["q5_0", "iq4_nl", "q4_0"]

    def no_table(*_):
        raise CostModelError("no table")

    monkeypatch.setattr(pack, "predict", no_table)
    assert pack.equalization_formats(arch, target, "llama.cpp") == ["q5_0", "iq4_nl", "q4_0"]


def test_the_equalization_note_names_the_formats_and_reads_runs_prepared_before_they_were_recorded():
    from packager.pack import equalization_notes, equalization_summary

    rows = [{"layer": i, "group": g, "alpha": a, "error_ratio": e, "formats": ["iq4_nl", "q4_0"]}
            for i, (a, e) in enumerate([(0.5, 0.5), (0.7, 0.6), (0.6, 0.7)]) for g in ("qkv", "down")]  # fmt: skip
    summary = equalization_summary(rows)
    assert summary["groups"]["qkv"] == {"alpha": 0.6, "error_ratio": 0.6}
    (note,) = equalization_notes(summary)
    assert "equalized for iq4_nl, q4_0 before" in note and "q/k/v x0.60, down x0.60" in note
    (old,) = equalization_notes(summary["groups"])
    assert "equalized before" in old and "q/k/v x0.60" in old
    assert equalization_notes(None) == [] and equalization_summary([]) is None


@pytest.mark.parametrize("flags, long", [([], True), (["--short-recovery"], False), (["--long-recovery"], True)])
def test_pack_cli_gives_the_promotion_the_long_recovery_unless_told_short(monkeypatch, tmp_path, flags, long):
    """The CLI's default is PackConfig's: the long recovery; ``--short-recovery`` turns it off."""
    seen = []

    class Captured:
        def __init__(self, cfg, out, resume=False, force=False):
            seen.append(cfg)

        def run(self):
            (tmp_path / "scorecard.md").write_text("scorecard")
            return tmp_path

    monkeypatch.setattr("packager.pack.Pack", Captured)
    res = CliRunner().invoke(main, ["pack", "--target", "laptop-cpu", "--out", str(tmp_path / "b"), *flags])
    assert res.exit_code == 0, res.output
    assert seen[0].long_recovery is long and PackConfig(target="laptop-cpu").long_recovery is True
