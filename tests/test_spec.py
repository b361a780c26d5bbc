"""SubnetSpec: construction, JSON round trip and validation errors."""

import pytest

from subnet.arch import ArchInfo
from subnet.formats import closest_format, effective_format
from subnet.spec import LayerSpec, SpecError, SubnetSpec, lossy_retargets, retarget_formats

BASE = ArchInfo("llama", num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64,
                intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)


def test_full_spec_counts_smollm2_params():
    spec = SubnetSpec.full(BASE).validate()
    assert spec.is_uniform
    assert spec.num_params() == 134_515_008
    assert spec.weight_bytes() == pytest.approx(spec.num_params() * 4)


def test_json_round_trip_heterogeneous(tmp_path):
    spec = SubnetSpec.uniform(BASE, layers=[0, 1, 5, 29], fmt="q8_0")
    spec.layers[1].heads, spec.layers[1].kv_heads = 4, 2
    spec.layers[2].mlp = 768
    spec.layers[2].mlp_channels = list(range(768, 1536))
    spec.layers[3].formats["gate_proj"] = "q4_0"
    spec.save(tmp_path / "s.json")
    back = SubnetSpec.load(tmp_path / "s.json")
    assert back.to_dict() == spec.to_dict()
    assert not back.is_uniform
    assert back.layers[2].mlp_index()[0] == 768
    assert back.layers[1].head_index(BASE.group_size) == [0, 1, 3, 4]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: setattr(s.layers[0], "heads", 12), "query heads, the base has 1..9"),
        (lambda s: setattr(s.layers[0], "heads", 5), "do not divide into 3 KV groups"),
        (lambda s: (setattr(s.layers[0], "heads", 8), setattr(s.layers[0], "kv_heads", 2)), "4 query heads per KV group"),
        (lambda s: setattr(s.layers[0], "kv_heads", 4), "KV heads, the base has 1..3"),
        (lambda s: setattr(s.layers[0], "mlp", 2000), "MLP width 2000"),
        (lambda s: setattr(s.layers[0], "index", 30), "the base has layers 0..29"),
        (lambda s: s.layers.append(s.layers[0]), "listed twice"),
        (lambda s: setattr(s.layers[0], "mlp", 1504) or s.layers[0].formats.__setitem__("down_proj", "q4_k"),
         "multiple of 256, this row has 1504"),
        (lambda s: s.layers[0].formats.__setitem__("q_proj", "q4_k"), "llama.cpp would fall back to q5_0"),
        (lambda s: s.layers[0].formats.__setitem__("q_proj", "q3_x"), "unknown weight format 'q3_x'"),
        (lambda s: setattr(s.layers[0], "mlp", 1000) or s.layers[0].formats.__setitem__("down_proj", "q8_0"),
         "multiple of 32, this row has 1000"),
        (lambda s: setattr(s, "lm_head_format", "q4_0"), "share one format"),
        (lambda s: setattr(s.layers[0], "mlp_channels", [0, 0]), "2 indices listed but the count is 1536"),
        (lambda s: setattr(s, "layers", []), "keeps no layers"),
        (lambda s: setattr(s, "hidden_size", 640), "outside 1..576"),
    ],
)
def test_validation_errors(mutate, message):
    spec = SubnetSpec.full(BASE)
    mutate(spec)
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        spec.validate()


def test_from_json_rejects_garbage():
    with pytest.raises(SpecError, match="not valid JSON"):
        SubnetSpec.from_json("{nope")
    with pytest.raises(SpecError, match="not a SubnetSpec"):
        SubnetSpec.from_json('{"a": 1}')
    with pytest.raises(SpecError, match="version 7"):
        d = SubnetSpec.full(BASE).to_dict()
        d["version"] = 7
        SubnetSpec.from_dict(d)


def test_other_base_is_refused():
    other = ArchInfo("qwen2", 24, 896, 14, 2, 64, 4864, 151936, True, True)
    with pytest.raises(SpecError, match="different base model"):
        SubnetSpec.full(BASE).validate(other)


def test_kquant_fallback_matches_llama_cpp():
    assert effective_format("q4_k", 576) == "q5_0"
    assert effective_format("q6_k", 576) == "q8_0"
    assert effective_format("q4_k", 1536) == "q4_k"


def test_layer_formats_compact_in_json():
    d = LayerSpec(3, 9, 3, 1536, {n: "q8_0" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}).to_dict()
    assert d["formats"] == "q8_0"


def test_retarget_prefers_a_format_with_the_same_weights():
    """q4_0 goes to ONNX Runtime as int4s_b32 (its exact twin), other formats to the nearest in bits."""
    spec = SubnetSpec.full(BASE, "q8_0")
    spec.layers[0].formats.update(gate_proj="q4_0", up_proj="q5_0", down_proj="iq4_nl")
    ort = ["f32", "int8_b32", "int4_b32", "int4s_b32"]
    out = retarget_formats(spec, ort, ["f32", "f16"])
    f = out.layers[0].formats
    assert (f["gate_proj"], f["up_proj"], f["q_proj"]) == ("int4s_b32", "int4_b32", "int8_b32")
    assert closest_format("int4s_b32", ["q8_0", "q5_0", "q4_0"]) == "q4_0"
    assert closest_format("q4_0", ["int8_b32", "int4_b32"]) == "int4_b32"  # no twin: nearest in bits
    assert out.embed_format == "f16"


def test_lossy_retargets_names_the_tensors_a_runtime_rounds_differently():
    """Exact twins (q4_0 -> int4s_b32) and float formats (q8_0 embedding -> f16) lose nothing; the rest do."""
    spec = SubnetSpec.full(BASE, "q8_0")
    spec.layers[0].formats.update(gate_proj="q4_0", up_proj="iq4_nl")
    spec.embed_format = spec.lm_head_format = "q8_0"
    out = retarget_formats(spec, ["f32", "int8_b32", "int4_b32", "int4s_b32"], ["f32", "f16"])
    lossy = lossy_retargets(spec, out)
    assert "layers.0.up_proj iq4_nl->int4s_b32" in lossy and "layers.1.q_proj q8_0->int8_b32" in lossy
    assert not [t for t in lossy if "gate_proj" in t and t.startswith("layers.0.")] and not [t for t in lossy if "embedding" in t]
    assert lossy_retargets(spec, SubnetSpec.from_dict(spec.to_dict())) == []
