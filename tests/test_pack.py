"""`packager pack` end to end on a small random model that carries SmolLM2's tokenizer."""

import json

import pytest
from click.testing import CliRunner

from packager.cli import main
from packager.pack import Pack, PackConfig, PackError
from search.importance import Importance
from subnet.spec import SubnetSpec
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
              eval_blocks=2, recover_steps=4, accuracy_floor=10.0, seed=0)
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
    assert card["spec"]["base"]["num_layers"] == 4
    assert (folder / "scorecard.html").read_text().count("data:image/png;base64,") >= 1
    # a finished run is refused without --force; verify passes, then catches a changed byte
    with pytest.raises(PackError, match="already exists"):
        Pack(small_config(small_model_dir), out)
    res = CliRunner().invoke(main, ["verify", str(tmp_path / "bundle.tar.gz"), "--no-measure"])
    assert res.exit_code == 0 and "integrity: ok" in res.output
    gguf = next((folder / "artifacts" / "llama.cpp").glob("*.gguf"))
    data = bytearray(gguf.read_bytes())
    data[-1] ^= 0xFF
    gguf.write_bytes(bytes(data))
    res = CliRunner().invoke(main, ["verify", str(folder), "--no-measure"])
    assert res.exit_code == 2 and "packaged.gguf has changed" in res.output


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
    with pytest.raises(PackError, match="other options"):
        Pack(small_config(small_model_dir, budget=7), out, resume=True)
    p = Pack(cfg, out, resume=True)
    assert set(p.state["done"]) == {"prepare", "search", "select", "recover"}
    p.run()
    assert (out / "manifest.json").is_file()


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
    assert 1 <= len(sel["shortlist"]) <= 2
    for t in sel["shortlist"]:
        assert t["meets_floor"] == (t["val_ppl_after"] <= t["val_ppl_limit"])
        assert t["val_curve"][0] == [0, pytest.approx(t["val_ppl_before"])]
    passing = [t["evaluation"] for t in sel["shortlist"] if t["meets_floor"]]
    want = min(passing, key=lambda e: e["decode_ms"]) if passing else sel["fallback"]
    assert sel["winner"] == want
    assert json.loads((p.work / "spec.json").read_text())["meta"]["selected"] == sel["how"]


def test_spread_picks_evenly_from_most_to_least_accurate():
    from types import SimpleNamespace

    from packager.pack import spread

    front = [SimpleNamespace(ppl=float(v)) for v in (5, 1, 4, 2, 3)]
    assert [e.ppl for e in spread(front, 3)] == [1.0, 3.0, 5.0]
    assert [e.ppl for e in spread(front, 1)] == [1.0]
    assert len(spread(front, 9)) == 5 and spread(front, 0) == []


def test_promotion_takes_the_fastest_near_miss_faster_than_every_passing_candidate():
    from packager.pack import promotion_candidate

    def tried(ms, after, meets):
        return {"evaluation": {"decode_ms": ms}, "val_ppl_after": after, "val_ppl_limit": 30.0, "meets_floor": meets}

    fast_near, slow_near, far, passing = tried(8.0, 31.0, False), tried(9.0, 30.5, False), tried(7.0, 40.0, False), tried(8.5, 29.9, True)
    assert promotion_candidate([slow_near, fast_near, far], 0.05, None) is fast_near  # 40 is beyond the 5% margin
    assert promotion_candidate([slow_near, fast_near, passing], 0.05, 8.5) is fast_near
    assert promotion_candidate([slow_near, passing], 0.05, 8.5) is None  # slower than the passing one: no need
    assert promotion_candidate([passing], 0.05, None) is None


def test_shortlist_takes_the_most_accurate_of_each_format_family():
    """Three families (q8_0/q4_0, iq4_nl/q4_0, q4_0/q4_0 by narrowest format per role): one each, the
    most accurate member, whatever the share of narrowed blocks; with fewer families, the front fills in."""
    from types import SimpleNamespace

    from packager.pack import format_family, shortlist_by_family
    from subnet.arch import ATTN_LINEARS, MLP_LINEARS, arch_of

    arch = arch_of(tiny_model("llama").config)

    def cand(ppl, attn, mlp, narrowed):
        spec = SubnetSpec.uniform(arch, fmt="q8_0")
        for ly in spec.layers[:narrowed]:
            ly.formats.update({n: attn for n in ATTN_LINEARS} | {n: mlp for n in MLP_LINEARS})
        return SimpleNamespace(ppl=ppl, spec_obj=lambda: spec)

    front = [cand(30.6, "q8_0", "q4_0", 3), cand(32.6, "q8_0", "q4_0", 4), cand(31.9, "iq4_nl", "q4_0", 3),
             cand(35.0, "iq4_nl", "q4_0", 4), cand(33.0, "q4_0", "q4_0", 3), cand(36.6, "q4_0", "q4_0", 4)]
    assert format_family(front[0].spec_obj()) == ("q8_0", "q4_0", "q8_0", "q8_0")
    assert format_family(front[2].spec_obj()) == format_family(front[3].spec_obj())
    assert [e.ppl for e in shortlist_by_family(front, 3)] == [30.6, 31.9, 33.0]
    assert [e.ppl for e in shortlist_by_family(front, 2)] == [30.6, 33.0]  # spread over the families
    assert [e.ppl for e in shortlist_by_family(front, 5)] == [30.6, 31.9, 32.6, 33.0, 36.6]
    assert shortlist_by_family(front, 0) == []


def test_promotion_gives_a_near_miss_the_full_recovery_and_the_recover_stage_reuses_it(small_model_dir, tmp_path):
    p = Pack(small_config(small_model_dir, recover_steps=2, promote_margin=0.05), tmp_path / "p")
    p.state.setdefault("done", {})["prepare"] = {"result": p.stage_prepare(), "wall_s": 0}
    p.state["done"]["search"] = {"result": p.stage_search(), "wall_s": 0}
    evals = json.loads((p.work / "evaluations.json").read_text())
    pruned = min(evals, key=lambda e: e["decode_ms"])  # not the base: there is something to recover
    model = p.sorted_model()

    def near(limit, after):
        return [{"evaluation": pruned, "val_ppl_after": after, "val_ppl_limit": limit, "meets_floor": False}]

    assert p.promotion(model, near(1.0, 1.2), None) is None  # 20% above the floor: not promoted
    missed = p.promotion(model, near(1.0, 1.04), None)  # promoted, but no model reaches perplexity 1
    assert missed["meets_floor"] is False and not (p.work / "recovered").exists()
    met = p.promotion(model, near(1e9, 1.04e9), None)
    assert met["meets_floor"] and met["recovery"]["steps_run"] == 2 and (p.work / "recovered" / "config.json").is_file()
    p.state["done"]["select"] = {"result": {"promoted": met}, "wall_s": 0}
    assert p.stage_recover()["done_in"] == "select"


def test_a_runtime_that_rounds_the_winner_differently_gets_its_own_recovery(small_model_dir, tmp_path):
    """iq4_nl has no ONNX Runtime twin: its retarget is recovered again, warm-started, for the ONNX export;
    missing the floor (here an unreachable one), it is tried again with the most rounding-sensitive half
    of the blocks at the base's formats, and the more accurate try is kept."""
    p = Pack(small_config(small_model_dir, runtimes=["llama.cpp", "onnxruntime"], recover_steps=2,
                          runtime_recover_steps=2, accuracy_floor=-0.5, runtime_format_shares=[1.0, 0.5]),
             tmp_path / "r")  # fmt: skip
    p.state.setdefault("done", {})["prepare"] = {"result": p.stage_prepare(), "wall_s": 0}
    space = p.space(Importance.load(p.work / "importance.json"))
    spec = space.decode(space.largest())
    for ly in spec.layers:
        ly.formats = {n: "iq4_nl" for n in ly.formats}
    spec.save(p.work / "spec.json")
    p.state["done"]["select"] = {"result": {"promoted": None}, "wall_s": 0}
    rec = p.stage_recover()
    own = rec["runtimes"]["onnxruntime"]
    assert own["steps_run"] == 2 and own["changed"] == 4 * 7 and "iq4_nl->int4" in own["example"]
    assert "llama.cpp" not in rec["runtimes"]  # the search runtime holds its own formats
    assert own["ppl_before"] != pytest.approx(rec["ppl_after"])  # scored at ONNX Runtime's rounding, not iq4_nl's
    assert not own["meets_floor"] and [t["format_share"] for t in own["tries"]] == [1.0, 0.5]
    assert own["ppl_after"] == min(t["ppl_after"] for t in own["tries"])
    assert own["narrow_blocks"] == (4 if own["format_share"] == 1.0 else 2)
    p.state["done"]["recover"] = {"result": rec, "wall_s": 0}
    shipped, base = p.runtime_specs("onnxruntime")  # the kept try's spec goes to the export
    wide = [i for i, ly in enumerate(shipped.layers) if set(ly.formats.values()) == {"int8s_b32"}]
    assert len(wide) == 4 - own["narrow_blocks"] and {f for ly in base.layers for f in ly.formats.values()} == {"int8s_b32"}
    assert p.recovered_dir("onnxruntime").name == "recovered-onnxruntime"
    assert p.recovered_dir("llama.cpp").name == "recovered"
    _, scales = p._recovered("llama.cpp")
    assert scales and not p._recovered("onnxruntime")[1]  # iq4_nl's block scales stay with the GGUF export


def test_rounding_rank_is_measured_when_the_search_did_not_rank_blocks(small_model_dir, tmp_path):
    """hetero mode ranks no blocks in prepare; a runtime's format-share try needs the ranking: measured then, kept."""
    p = Pack(small_config(small_model_dir, mode="hetero"), tmp_path / "h")
    p.state.setdefault("done", {})["prepare"] = {"result": p.stage_prepare(), "wall_s": 0}
    assert Importance.load(p.work / "importance.json").quant_rank is None
    rank = p.rounding_rank()
    assert sorted(rank) == list(range(4))
    assert Importance.load(p.work / "importance.json").quant_rank == rank
