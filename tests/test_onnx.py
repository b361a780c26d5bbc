"""ONNX export with KV cache, ONNX Runtime runner, per-layer weight formats, TensorRT recipe."""

import os
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from subnet.arch import LINEARS, arch_of, linear_of
from subnet.extract import extract
from subnet.formats import get_format
from subnet.spec import SubnetSpec
from targets import onnxrt, tensorrt
from targets.backend import ExportError, ModelPeakRss, Workload, drop_page_cache
from targets.onnx_export import NBITS, FormatNotSupported, applied_formats, export_onnx, kv_shapes, quantize_nbits
from targets.onnx_graph import STACK_TRACE
from tests.conftest import tiny_model

IDS = [5, 17, 42, 99, 3, 64, 7, 120, 33, 8, 71, 12]


def scales_initializer(graph, name: str) -> onnx.TensorProto:
    """The initializer that stores a block op's scales input ``name``: itself, or the one behind its Cast
    (``scales_to_f16``)."""
    inits = {t.name: t for t in graph.initializer}
    if name not in inits:
        name = next(n.input[0] for n in graph.node if n.op_type == "Cast" and n.output[0] == name)
    return inits[name]


def stored_scales(graph, name: str) -> tuple[np.ndarray, int]:
    """A block op's scales input ``name`` as the file stores it: its values in float32, its data type."""
    from onnx import numpy_helper

    init = scales_initializer(graph, name)
    return numpy_helper.to_array(init).astype(np.float32), init.data_type


def make_spec(arch, kind):
    if kind == "uniform":
        return SubnetSpec.uniform(arch, layers=[0, 1, 3], mlp=64)
    spec = SubnetSpec.uniform(arch, layers=[0, 2, 3])
    spec.layers[0].heads, spec.layers[0].kv_heads = 2, 1  # per-layer KV heads: 1, 2, 1
    spec.layers[1].mlp = 64
    spec.layers[2].kv_groups, spec.layers[2].kv_heads, spec.layers[2].heads = [1], 1, 2
    return spec.validate()


@pytest.fixture(scope="module", params=[("llama", "uniform"), ("llama", "hetero"), ("qwen2", "uniform"), ("qwen2", "hetero")])
def f32_export(request, tmp_path_factory):
    family, kind = request.param
    base = tiny_model(family)
    spec = make_spec(arch_of(base.config), kind)
    model = extract(base, spec)
    art = onnxrt.export(model, None, spec, tmp_path_factory.mktemp("onnx") / "out")
    return model, spec, art


def test_f32_logits_match_torch(f32_export):
    model, spec, art = f32_export
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0].numpy()
    got = onnxrt.load(art, threads=2).logits(IDS)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-3
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert art.meta["parity"]["top1_agreement"] == 1.0 and art.meta["parity"]["max_abs_diff"] <= 1e-3
    assert art.meta["parity"]["format_class"] == "float" and art.meta["parity"]["within_bounds"]


def test_f32_graph_io_names_and_per_layer_kv(f32_export):
    _, spec, art = f32_export
    g = onnx.load(art.path, load_external_data=False).graph
    n = len(spec.layers)
    assert [i.name for i in g.input][:2] == ["input_ids", "attention_mask"]  # positions come from the mask
    assert g.name == f"packager {spec.base.family} sub-network"  # a model built in memory has no name
    assert art.meta["attention"] == "GroupQueryAttention (com.microsoft)"
    assert sum(node.op_type == "GroupQueryAttention" for node in g.node) == n
    assert art.meta["fused"] == {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2 * n}
    if spec.base.tie_word_embeddings:  # the table is stored once (the optimizer's transposed copy is undone)
        assert [spec.hidden_size, spec.base.vocab_size] not in [list(t.dims) for t in g.initializer]
    past = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in g.input[2:]}
    assert list(past) == [f"past_key_values.{i}.{t}" for i in range(n) for t in ("key", "value")]
    for i, ly in enumerate(spec.layers):
        assert past[f"past_key_values.{i}.key"][1] == ly.kv_heads
        assert past[f"past_key_values.{i}.value"][1] == ly.kv_heads
    assert [o.name for o in g.output] == ["logits"] + [f"present.{i}.{t}" for i in range(n) for t in ("key", "value")]


def test_graph_holds_no_path_of_the_exporting_machine(f32_export):
    """torch.onnx's per-node stack traces are dropped: the exported bytes do not depend on where the code lives."""
    _, _, art = f32_export
    raw = Path(art.path).read_bytes()
    assert str(Path(onnxrt.__file__).resolve().parents[1]).encode() not in raw and b"site-packages" not in raw
    graph = onnx.load(art.path, load_external_data=False).graph
    assert not any(p.key == STACK_TRACE for node in graph.node for p in node.metadata_props)
    assert any(p.key == "pkg.torch.onnx.name_scopes" for node in graph.node for p in node.metadata_props)


def test_kv_cache_decode_matches_torch(f32_export):
    """Token-by-token decoding with the KV cache: every step's logits match torch on the full sequence."""
    model, _, art = f32_export
    runner = onnxrt.load(art, threads=2)
    logits, past = runner.step(np.array([IDS[:4]]), runner.empty_past())
    for t in range(4, len(IDS)):
        logits, past = runner.step(np.array([[IDS[t]]]), past)
        with torch.no_grad():
            ref = model(torch.tensor([IDS[: t + 1]])).logits[0, -1].numpy()
        assert np.abs(logits[0, -1] - ref).max() <= 1e-3
    got = runner.generate(IDS[:5], 8)
    ref = model.generate(torch.tensor([IDS[:5]]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 5:].tolist()
    assert got == ref


def test_shared_kv_buffer_decodes_like_the_copied_past(f32_export):
    """The GroupQueryAttention graph's KV cache bound in place (one buffer, past = present) gives the logits
    of past-in/present-out decoding, step by step, and refuses tokens past its capacity."""
    model, _, art = f32_export
    runner = onnxrt.load(art, threads=2)
    assert runner.shared_kv and art.meta["kv_cache"].startswith("one buffer per tensor")
    shared, copied = runner.cache(1, 7), onnxrt.PastKV(runner, 1)
    assert isinstance(shared, onnxrt.SharedKV)
    for chunk in ([IDS[:4]], [[IDS[4]]], [[IDS[5]]], [[IDS[6]]]):
        a, b = shared.step(np.array(chunk)), copied.step(np.array(chunk))
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5
    with pytest.raises(ValueError, match="do not fit a KV cache of batch 1 holding 7 of 7 positions"):
        shared.step(np.array([[IDS[7]]]))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gqa_decoder_in_torch_is_the_model(family):
    """The export-only forward (one group_query_attention op per layer, run eagerly) computes the model's
    own logits, in one pass and token by token with its presents as the next past."""
    from targets.onnx_attention import GQADecoder

    base = tiny_model(family)
    model = extract(base, make_spec(arch_of(base.config), "hetero"))
    dec = GQADecoder(model).eval()
    ids = torch.tensor([IDS])
    with torch.no_grad():
        ref = model(ids).logits
        empty = [torch.zeros(1, h, 0, d) for h, d in kv_shapes(model) for _ in (0, 1)]
        logits, *past = dec(ids[:, :5], torch.ones(1, 5, dtype=torch.long), *empty)
        assert torch.allclose(logits, ref[:, :5], atol=1e-5)
        for t in range(5, len(IDS)):
            logits, *past = dec(ids[:, t : t + 1], torch.ones(1, t + 1, dtype=torch.long), *past)
            assert torch.allclose(logits[0, -1], ref[0, t], atol=1e-5)


def test_attention_that_gqa_cannot_hold_exports_standard_ops(monkeypatch, tmp_path):
    """A sliding-window layer is no GroupQueryAttention here: the fused export falls back to the modules'
    own attention ops (position_ids input back), says why, and still matches torch."""
    import targets.onnx_export as ox
    from targets.onnx_attention import unsupported

    base = tiny_model("llama")
    spec = make_spec(arch_of(base.config), "uniform")
    model = extract(base, spec)
    model.model.layers[1].self_attn.sliding_window = 4
    assert unsupported(model) == "layer 1 uses sliding-window attention"
    model.model.layers[1].self_attn.sliding_window = None
    monkeypatch.setattr(ox, "unsupported", lambda m: "layer 1 uses sliding-window attention")
    art = onnxrt.export(model, None, spec, tmp_path / "out")
    assert art.meta["attention"] == "standard ONNX ops: layer 1 uses sliding-window attention"
    assert art.meta["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert art.meta["parity"]["within_bounds"] and art.meta["fused"]["SkipSimplifiedLayerNormalization"] == 6


MIXED = {  # per kept layer: linear -> format (rest f32); tiny rows are 64 wide, o_proj of 2 heads 32
    0: {"q_proj": "int8", "k_proj": "int4_b32", "down_proj": "int8_b32"},
    1: {"gate_proj": "int4_b32", "up_proj": "int4_b32", "down_proj": "int8", "o_proj": "f16"},
    2: {"v_proj": "int8_b32", "o_proj": "int8", "gate_proj": "int4s_b32", "up_proj": "int4_b64"},
}


@pytest.mark.parametrize("family,kind", [("llama", "uniform"), ("qwen2", "hetero"), ("llama", "hetero")])
def test_mixed_formats_land_on_the_right_matmuls(family, kind, tmp_path):
    base = tiny_model(family)
    spec = make_spec(arch_of(base.config), kind)
    for i, fmts in MIXED.items():
        spec.layers[i].formats.update(fmts)
    if not spec.base.tie_word_embeddings:
        spec.lm_head_format = "int4_b32"
    spec.validate()
    model = extract(base, spec)
    art = onnxrt.export(model, None, spec, tmp_path / "out")
    applied = art.meta["applied"]
    for i, ly in enumerate(spec.layers):
        for name, fmt in ly.formats.items():
            assert applied[f"layers.{i}.{name}"] == fmt, (i, name)
    assert applied["lm_head"] == spec.lm_head_format
    assert art.meta["kv_cache"].startswith("one buffer per tensor")  # the graph metadata survives quantization

    # the graph itself: every quantized linear's rows in a node of its format (shared-input projections share one)
    g = onnx.load(art.path, load_external_data=False).graph
    nbits = [n for n in g.node if n.op_type == "MatMulNBits"]
    got = Counter()  # output rows per (bits, block): projections that share an input share one node
    for n in nbits:
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        got[a["bits"], a["block_size"]] += a["N"]
    want, want_fmts = Counter(), []
    for i, ly in enumerate(spec.layers):
        for name, fmt in ly.formats.items():
            want_fmts.append(fmt)
            if fmt in NBITS:
                want[NBITS[fmt][:2]] += linear_of(model.model.layers[i], name).out_features
    if not spec.base.tie_word_embeddings:
        want_fmts.append(spec.lm_head_format)
        want[NBITS[spec.lm_head_format][:2]] += model.config.vocab_size
    assert got == want
    assert sum(n.op_type == "MatMulInteger" for n in g.node) == want_fmts.count("int8")
    f16 = [i.name for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert sum(not n.endswith("_scales.f16") for n in f16) == want_fmts.count("f16")
    # the twin's scales (ggml's f16 values) and int4_b64's are stored in float16; ORT's own quantizer's stay float32
    scale_types = [scales_initializer(g, n.input[2]).data_type for n in nbits]
    f16_scaled = sum(f in NBITS and get_format(f).f16_scales for f in want_fmts)
    assert scale_types.count(onnx.TensorProto.FLOAT16) == f16_scaled == art.meta["f16_scales"] == 2

    p = art.meta["parity"]  # vs torch with the same simulated formats (subnet.quant)
    assert p["max_abs_diff"] <= 2e-2
    assert p["top1_agreement"] >= 0.95
    assert p["format_class"] == "dynamic_int8" and p["decode_top1_agreement"] >= 0.95
    assert p["linears"]["n_linears"] == len(art.meta["linear_io"]) >= 7 * len(spec.layers)
    assert p["linears"]["max_rel_err"] <= 1e-4 and p["within_bounds"]


def test_int4s_b32_stores_q4_0_weights_exactly(tmp_path):
    """The symmetric 4-bit graph holds ggml's q4_0 weights bit for bit (codes and f16 scales), so a
    model recovered for GGUF q4_0 runs in ONNX Runtime with the same weights."""
    from gguf import GGMLQuantizationType, quants
    from onnx import TensorProto, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((48, 256)) * rng.uniform(0.005, 0.5, (48, 1))).astype(np.float32)  # [out, in]
    w[0, :32], w[1, 0], w[1, 1] = 0, -1.0, 1.0  # a zero block; a +-max tie
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 48])],
                          [numpy_helper.from_array(np.ascontiguousarray(w.T), "W")])  # fmt: skip
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    quantize_nbits(path, "int4s_b32", ["mm"])
    model = onnx.load(str(path))
    (node,) = model.graph.node
    assert node.op_type == "MatMulNBits" and len(node.input) == 3  # symmetric: no zero points
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    packed, scales = inits[node.input[1]], inits[node.input[2]]  # [48, 8, 16] uint8, [48 * 8] f32
    codes = np.stack([packed & 15, packed >> 4], -1).reshape(48, 8, 32).astype(np.float32)
    got = ((codes - 8) * scales.reshape(48, 8, 1)).reshape(48, 256)
    want = quants.dequantize(quants.quantize(w, GGMLQuantizationType.Q4_0), GGMLQuantizationType.Q4_0)
    assert np.array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))
    assert applied_formats(model, {"mm": "mm"}) == {"mm": "int4s_b32"}


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # tied / untied embeddings
def test_twin_embedding_and_linears_hold_ggml_weights(family, tmp_path):
    """q8_0's twin everywhere (embedding and lm_head too, q4_0's in one MLP): the table is stored once as
    GatherBlockQuantized codes (a tied lm_head reads the same codes through MatMulNBits), ggml's q8_0
    weights bit for bit, and the graph agrees with the simulation linear by linear."""
    from gguf import GGMLQuantizationType, quants
    from onnx import numpy_helper

    base = tiny_model(family)
    spec = SubnetSpec.uniform(arch_of(base.config), layers=[0, 1, 3], fmt="int8s_b32")
    spec.layers[1].formats.update(gate_proj="int4s_b32", up_proj="int4s_b32", down_proj="int4s_b32")
    model = extract(base, spec.validate())
    art = onnxrt.export(model, None, spec, tmp_path / "out")
    tied = spec.base.tie_word_embeddings
    assert art.meta["embedding"]["applied"] == "int8s_b32" and art.meta["applied"]["lm_head"] == "int8s_b32"
    assert all(art.meta["applied"][f"layers.{i}.{n}"] == f for i, ly in enumerate(spec.layers)
               for n, f in ly.formats.items())  # fmt: skip
    g = onnx.load(art.path).graph
    ops = [n.op_type for n in g.node]
    assert ops.count("GatherBlockQuantized") == 1  # per layer q/k/v, o, gate/up, down; the head
    assert ops.count("MatMulNBits") == 4 * 3 + 1 and art.meta["fused_projections"] == {"qkv_packed": 3, "split": 3}
    (gather,) = [n for n in g.node if n.op_type == "GatherBlockQuantized"]
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    table = model.get_input_embeddings().weight.detach().numpy()
    assert not any(v.shape == table.shape and v.dtype == np.float32 for v in inits.values())  # no float copy left
    codes, (scales, stored) = inits[gather.input[0]], stored_scales(g, gather.input[2])
    assert stored == onnx.TensorProto.FLOAT16  # exactly ggml's f16 scales, as GGUF stores them
    got = ((codes.astype(np.float32) - 128).reshape(len(table), -1, 32) * scales[..., None]).reshape(table.shape)
    want = quants.dequantize(quants.quantize(table, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
    assert np.array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))
    head_matmul = next(k for k, v in art.meta["nodes"].items() if v == "lm_head")
    head = next(n for n in g.node if n.name == head_matmul + "_Q8")
    assert (head.input[1] == gather.input[0] + "3d") == tied  # a tied head reads the gathered codes, reshaped
    p = art.meta["parity"]
    assert p["format_class"] == "block_int8_input" and p["within_bounds"]
    assert p["linears"]["n_linears"] == 7 * 3 + 1 and p["top1_agreement"] >= 0.9


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # tied / untied embeddings
def test_float16_scales_shrink_the_file_and_change_no_logit(family, monkeypatch, tmp_path):
    """Twin and int4_b64 scales stored in float16 behind a Cast: 2 bytes less per block on disk, and ONNX
    Runtime computes the very same logits as from the float32 scales."""
    import targets.onnx_export as ox

    base = tiny_model(family)
    spec = SubnetSpec.uniform(arch_of(base.config), layers=[0, 1, 3], fmt="int8s_b32")
    spec.layers[1].formats.update(gate_proj="int4s_b32", up_proj="int4s_b32", down_proj="int4s_b32")
    spec.layers[0].formats.update(q_proj="int4_b64", k_proj="int4_b64", v_proj="int4_b64")
    if not spec.base.tie_word_embeddings:
        spec.lm_head_format = "int8s_b32"
    model = extract(base, spec.validate())
    f16 = onnxrt.export(model, None, spec, tmp_path / "f16")
    monkeypatch.setattr(ox, "scales_to_f16", lambda graph: 0)
    f32 = onnxrt.export(model, None, spec, tmp_path / "f32")
    tied = spec.base.tie_word_embeddings
    # per layer q/k/v, o, gate/up, down (targets.onnx_fusion); the table; an untied head
    assert f16.meta["f16_scales"] == 4 * 3 + 1 + (not tied) and f32.meta["f16_scales"] == 0
    g = onnx.load(f32.path).graph
    scales = {n.input[2] for n in g.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}
    n_blocks = sum(stored_scales(g, name)[0].size for name in scales if not name.endswith("1d"))  # not the reshaped table
    saved = f32.meta["size_bytes"] - f16.meta["size_bytes"]
    assert 2 * n_blocks >= saved >= 2 * n_blocks - 100 * f16.meta["f16_scales"]  # less each Cast node's bytes
    for ids in (IDS, IDS[:1]):
        assert np.array_equal(onnxrt.load(f16).logits(ids), onnxrt.load(f32).logits(ids))


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # no biases / q, k, v biases
def test_projections_that_share_an_input_run_as_one_kernel(family, monkeypatch, tmp_path):
    """q/k/v of one format go into GroupQueryAttention packed (with their biases as one Add); other
    same-format projections of one input (k/v beside a q of another format, gate/up, with or without zero
    points) run as one MatMulNBits split back into their outputs. The logits are the unfused graph's (to
    float rounding over a prompt), and every linear is still checked against the simulation on its own columns."""
    import targets.onnx_export as ox

    base = tiny_model(family)
    spec = SubnetSpec.uniform(arch_of(base.config), layers=[0, 1, 3], fmt="int8s_b32")
    spec.layers[1].formats.update(q_proj="int4s_b32", gate_proj="int4_b32", up_proj="int4_b32", down_proj="int4_b32")
    if not spec.base.tie_word_embeddings:
        spec.lm_head_format = "int8s_b32"
    model = extract(base, spec.validate())
    fused = onnxrt.export(model, None, spec, tmp_path / "fused")
    monkeypatch.setattr(ox, "fuse_projections", lambda graph: {"qkv_packed": 0, "split": 0, "spans": {}})
    plain = onnxrt.export(model, None, spec, tmp_path / "plain")
    assert fused.meta["fused_projections"] == {"qkv_packed": 2, "split": 4}  # layers 0, 2; k/v and gate/up of 1
    ops = Counter(n.op_type for n in onnx.load(fused.path, load_external_data=False).graph.node)
    plain_ops = Counter(n.op_type for n in onnx.load(plain.path, load_external_data=False).graph.node)
    assert plain_ops["MatMulNBits"] - ops["MatMulNBits"] == 2 * 2 + 4 and ops["Split"] == 4
    if spec.base.qkv_bias:
        assert plain_ops["Add"] - ops["Add"] == 2 * 2  # three bias Adds became one, twice
    packed = [k for k, io in fused.meta["linear_io"].items() if len(io) == 4]
    assert sorted(packed) == sorted(f"layers.{i}.{n}_proj" for i in (0, 2) for n in "qkv")
    assert fused.meta["parity"]["linears"]["n_linears"] == 7 * 3 + 1  # and the head
    assert fused.meta["parity"]["within_bounds"]
    a, b = onnxrt.load(fused), onnxrt.load(plain)
    assert np.array_equal(a.logits(IDS[:1]), b.logits(IDS[:1]))  # one token: the same sums, bit for bit
    np.testing.assert_allclose(a.logits(IDS), b.logits(IDS), rtol=0, atol=1e-5)  # a prompt: tiled differently
    assert a.generate(IDS[:4], 8) == b.generate(IDS[:4], 8)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # tied / untied embeddings
def test_stored_bytes_are_the_formats_bits_per_weight(family, tmp_path):
    """Each block op's codes, scales and zero points take exactly its format's bits per weight
    (``subnet.formats``), the figure the cost model's size and memory predictions rest on."""
    from onnx import numpy_helper

    from subnet.formats import FORMATS

    base = tiny_model(family)
    spec = SubnetSpec.uniform(arch_of(base.config), layers=[0, 1, 3], fmt="int8s_b32")
    # int4_b32 on rows of 2 blocks (gate_proj's): its 4-bit zero points pad an odd count to a whole byte
    spec.layers[1].formats.update(gate_proj="int4_b32", up_proj="int4s_b32", down_proj="int4s_b32", o_proj="int8_b32")
    spec.lm_head_format = "int8s_b32"
    model = extract(base, spec.validate())
    art = onnxrt.export(model, None, spec, tmp_path / "out")
    g = onnx.load(art.path).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    format_of = {layout: name for name, layout in NBITS.items()}  # (bits, block, symmetric) -> format
    checked = []
    for n in g.node:
        codes = n.input[1] if n.op_type == "MatMulNBits" else n.input[0]
        if n.op_type not in ("MatMulNBits", "GatherBlockQuantized") or codes not in inits:
            continue  # a tied head reads the table's codes through a Reshape: counted once, as the table
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        bits, zero_points = a.get("bits", 4), n.input[3] if len(n.input) > 3 else ""
        fmt = format_of[(bits, a["block_size"], not zero_points)]
        stored = inits[codes].nbytes + inits[scales_initializer(g, n.input[2]).name].nbytes  # as the file holds them
        stored += inits[zero_points].nbytes if zero_points else 0
        weights = a["K"] * a["N"] if n.op_type == "MatMulNBits" else inits[codes].size * 8 // bits
        assert stored * 8 == FORMATS[fmt].bits * weights, (n.name, fmt)
        checked.append((fmt, weights))
    assert sorted({f for f, _ in checked}) == ["int4_b32", "int4s_b32", "int8_b32", "int8s_b32"]
    table = model.config.vocab_size * model.config.hidden_size
    linears = sum(linear_of(ly, n).weight.numel() for ly in model.model.layers for n in LINEARS)
    assert sum(w for _, w in checked) == linears + table * (1 + (not spec.base.tie_word_embeddings))  # every weight once


def test_int4s_b32_is_written_at_the_block_scales_gptq_kept(tmp_path):
    """GPTQ rounds int4s_b32 linears at scales of its choosing (as for q4_0); the export writes the codes at
    those scales, and parity holds against the simulation at them."""
    from onnx import numpy_helper

    from subnet.gptq import gptq_round
    from subnet.quant import fake_quantize, round_to_scales

    base = tiny_model("llama", vocab_size=128)
    spec = SubnetSpec.uniform(arch_of(base.config), layers=[0, 1, 3], fmt="int8s_b32")
    spec.layers[1].formats.update(gate_proj="int4s_b32", up_proj="int4s_b32", down_proj="int4s_b32")
    model = extract(base, spec.validate())
    kept = gptq_round(model, spec, torch.randint(3, 128, (8, 32)), progress=False)
    assert set(kept) == {f"model.layers.1.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")}
    art = onnxrt.export(model, None, spec, tmp_path / "out", block_scales=kept)
    assert art.meta["kept_scales"] == 3 and art.meta["parity"]["within_bounds"]
    g = onnx.load(art.path).graph
    node = next(k for k, v in art.meta["nodes"].items() if v == "layers.1.down_proj")  # gate/up: one node
    q = next(n for n in g.node if n.name == node + "_Q4")
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    packed, (scales, _) = inits[q.input[1]], stored_scales(g, q.input[2])
    codes = np.stack([packed & 15, packed >> 4], -1).reshape(packed.shape[0], -1, 32).astype(np.float32)
    got = ((codes - 8) * scales.reshape(packed.shape[0], -1, 1)).reshape(packed.shape[0], -1)
    w = model.model.layers[1].mlp.down_proj.weight.detach()
    assert np.array_equal(got, round_to_scales(w, kept["model.layers.1.mlp.down_proj"], "int4s_b32").numpy())
    assert not np.array_equal(got, fake_quantize(w, "int4s_b32").numpy())  # not the weight's own absmax scales


def test_int8_with_outlier_token_matches_decode_and_every_linear(tmp_path):
    """A first token with outlier activations (as in real LMs) sets ORT's int8 range for the whole
    prefill call but not for later one-token decode calls: decoding follows the "token" simulation, the
    prefill call the "tensor" one, and every linear matches on ORT's own input."""
    from subnet.quant import fake_quantize_model

    base = tiny_model("llama")
    with torch.no_grad():
        base.model.embed_tokens.weight[IDS[0]] *= 300
    spec = SubnetSpec.uniform(arch_of(base.config), layers=[0, 1, 2, 3], fmt="int8", embed_format="f32")
    model = extract(base, spec)
    art = onnxrt.export(model, None, spec, tmp_path / "out")
    p = onnxrt.parity(art, model, spec, IDS)
    assert p["format_class"] == "dynamic_int8" and p["within_bounds"]
    assert p["linears"]["max_rel_err"] <= 1e-4 and p["linears"]["n_linears"] == 4 * 7 + 1  # + the tied lm_head (f32)
    assert p["max_abs_diff"] <= 1e-3 and p["decode_max_abs_diff"] <= 1e-3
    assert p["top1_agreement"] == 1.0 and p["decode_top1_agreement"] == 1.0
    # the old simulation (one range over the whole sequence) is not what decoding computes
    runner = onnxrt.load(art)
    past, steps = runner.empty_past(), []
    for t in IDS:
        logits, past = runner.step(np.array([[t]]), past)
        steps.append(logits[0, -1])
    with torch.no_grad():
        old = fake_quantize_model(model, spec, int8_scope="tensor")(torch.tensor([IDS])).logits[0].numpy()
    assert np.abs(np.stack(steps) - old).max() > 100 * p["decode_max_abs_diff"]


def test_gguf_only_format_is_refused(tmp_path):
    base = tiny_model("llama")
    spec = SubnetSpec.uniform(arch_of(base.config), layers=[0, 1])
    spec.layers[1].formats["up_proj"] = "q8_0"
    with pytest.raises(FormatNotSupported, match=r"layer 1 up_proj: weight format 'q8_0'.*llama\.cpp"):
        export_onnx(extract(base, spec), spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_quantized_embedding_is_refused(tmp_path):
    base = tiny_model("llama")
    spec = SubnetSpec.uniform(arch_of(base.config), layers=[0], fmt="int8")
    with pytest.raises(FormatNotSupported, match="embedding: format 'int8'"):
        export_onnx(extract(base, spec), spec, tmp_path / "out")


def test_existing_output_needs_force(tmp_path):
    base = tiny_model("llama")
    spec = SubnetSpec.uniform(arch_of(base.config), layers=[0, 1])
    model = extract(base, spec)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="already exists"):
        export_onnx(model, spec, out)
    assert (out / "keep.txt").exists()
    art = export_onnx(model, spec, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.onnx").exists()
    assert art.meta["applied"]["layers.0.q_proj"] == "f32"


def test_measure_runs_in_a_subprocess(f32_export, monkeypatch):
    """Timed in a fresh process whose peak RSS counts the model alone: the tiny model's session and KV
    cache, not the ~60 MiB or more that Python, numpy and ONNX Runtime hold before it loads. The model's
    files are dropped from the page cache first, and the measurement says so."""
    _, _, art = f32_export
    dropped = []
    fadvise = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, *a: dropped.append(os.readlink(f"/proc/self/fd/{fd}")) or fadvise(fd, *a))
    m = onnxrt.measure(art, Workload(prompt_tokens=6, gen_tokens=3), threads=1, repeats=1)
    assert m.prefill_ms > 0 and m.decode_ms_per_token > 0 and 0 < m.peak_rss_mb < 30
    assert m.fingerprint["runtime"] == "onnxruntime" and m.fingerprint["threads"] == 1
    model_files = sorted(str(p) for p in Path(art.path).parent.iterdir() if p.name.startswith("model.onnx"))
    assert sorted(dropped) == model_files and m.settings == {"page_cache": "dropped"}
    drop_page_cache([Path(art.path).parent / "missing.onnx"])  # a file that cannot be opened is skipped


def test_model_peak_rss_counts_only_what_its_block_adds():
    """64 MiB touched and freed inside the block count; the process's earlier peak does not."""
    with ModelPeakRss() as rss:
        a = np.ones(16 * 2**20, dtype=np.float32)
        del a
    assert 60 < rss.mb < 80
    with ModelPeakRss() as again:  # the peak was reset on entry: the freed 64 MiB are not counted again
        b = np.ones(2**20, dtype=np.float32)
        del b
    assert again.mb < 16


@pytest.mark.integration
def test_smollm2_pruned_greedy_matches_torch(smollm2, tmp_path):
    from transformers import AutoTokenizer

    arch = smollm2.arch
    spec = SubnetSpec.uniform(arch, layers=[i for i in range(arch.num_layers) if i not in (22, 24, 26)])
    spec.layers[3].mlp = 1024
    spec.layers[5].kv_heads, spec.layers[5].heads = 2, 6
    spec.validate()
    model = extract(smollm2.model, spec)
    art = onnxrt.export(model, smollm2.tokenizer, spec, tmp_path / "smol")
    ids = smollm2.tokenizer("The capital of France is")["input_ids"]
    got = onnxrt.load(art, threads=2).generate(ids, 8)
    # the artifact's own tokenizer, its tokenizer.json written compact, encodes and decodes alike
    tok_json = tmp_path / "smol" / "tokenizer.json"
    assert b"\n" not in tok_json.read_bytes() and tok_json.stat().st_size < 2_000_000
    shipped = AutoTokenizer.from_pretrained(tmp_path / "smol")
    assert shipped("The capital of France is")["input_ids"] == ids
    assert shipped.decode(got) == smollm2.tokenizer.decode(got)
    ref = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    assert got == ref


@pytest.mark.integration
def test_smollm2_int8_every_linear_matches_simulation(smollm2, tmp_path):
    """All-int8 SmolLM2: logits are chaotic (see onnxrt.PARITY_BOUNDS), every linear is exact."""
    spec = SubnetSpec.uniform(smollm2.arch, layers=[0, 1, 2, 3, 11, 28, 29], fmt="int8", embed_format="f32")
    model = extract(smollm2.model, spec)
    art = onnxrt.export(model, smollm2.tokenizer, spec, tmp_path / "smol")
    p = art.meta["parity"]
    assert p["linears"]["n_linears"] == 7 * 7 + 1 and p["linears"]["max_rel_err"] <= 1e-4 and p["within_bounds"]


@pytest.fixture(scope="module")
def trt_export(tmp_path_factory):
    base = tiny_model("qwen2", hidden_size=128, intermediate_size=128)  # untied lm_head; 128-wide rows for int4_b128
    spec = make_spec(arch_of(base.config), "hetero")
    spec.layers[0].formats.update(q_proj="int8", up_proj="int8")
    spec.layers[2].formats.update(gate_proj="int4_b128")
    spec.layers[1].formats.update(down_proj="f16")
    spec.lm_head_format = "int8"
    spec.validate()
    art = tensorrt.export(extract(base, spec), None, spec, tmp_path_factory.mktemp("trt") / "out",
                          workload=Workload(prompt_tokens=16, gen_tokens=8))
    return spec, art


def test_tensorrt_recipe_covers_every_dynamic_input(trt_export):
    spec, art = trt_export
    script = (__import__("pathlib").Path(art.path).parent / "build_engine.sh").read_text()
    assert "trtexec --onnx=model.onnx --saveEngine=model.engine" in script and "--stronglyTyped" in script
    g = onnx.load(art.path, load_external_data=False).graph
    dims = {i.name: [d.dim_value or None for d in i.type.tensor_type.shape.dim] for i in g.input}
    for flag, k in (("--minShapes=", 0), ("--optShapes=", 1), ("--maxShapes=", 2)):
        arg = next(a for a in script.split() if a.startswith(flag))[len(flag):]
        shapes = {n: [int(d) for d in s.split("x")] for n, s in (x.rsplit(":", 1) for x in arg.split(","))}
        assert set(shapes) == set(dims)  # every input, each past key/value included
        for name, shape in shapes.items():
            assert all(s == d for s, d in zip(shape, dims[name]) if d)  # static dims agree (per-layer KV heads)
    assert shapes["attention_mask"] == [1, 24] and shapes["past_key_values.2.key"] == [1, 1, 23, 16]
    assert [int(d) for d in script.split("--minShapes=")[1].split("past_key_values.0.key:")[1].split(",")[0].split("x")] == [
        1, spec.layers[0].kv_heads, 0, 16]


def test_tensorrt_qdq_graph_runs_and_matches(trt_export):
    spec, art = trt_export
    g = onnx.load(art.path, load_external_data=False).graph
    dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 4  # q_proj, up_proj, gate_proj, lm_head
    assert sorted(dict((a.name, helper.get_attribute_value(a)) for a in n.attribute).get("block_size", 0) for n in dq) == [0, 0, 0, 128]
    assert art.meta["opset"]["ai.onnx"] == 21  # INT4 blocked DequantizeLinear
    assert art.meta["applied"]["layers.0.q_proj"] == "int8 (Q/DQ)"
    assert art.meta["applied"]["layers.2.gate_proj"] == "int4_b128 (Q/DQ)"
    assert art.meta["applied"]["layers.1.down_proj"] == "f16"
    assert art.meta["parity"]["max_abs_diff"] <= 1e-3 and art.meta["parity"]["top1_agreement"] == 1.0


def test_tensorrt_engine_build_is_skipped_without_tensorrt(trt_export):
    ok, reason = tensorrt.available()
    _, art = trt_export
    if not ok:
        assert reason.startswith("TensorRT unavailable")
        assert art.meta["engine"] == f"not built: {reason}"
        pytest.skip(reason)
    assert (__import__("pathlib").Path(art.path).parent / "model.engine").exists()


def test_tensorrt_refuses_formats_it_cannot_hold(tmp_path):
    base = tiny_model("llama")
    spec = SubnetSpec.uniform(arch_of(base.config), layers=[0], fmt="int4_b32", embed_format="f32")
    with pytest.raises(FormatNotSupported, match="'int4_b32' cannot be stored for tensorrt"):
        tensorrt.export(extract(base, spec), None, spec, tmp_path / "out")
