"""Quantization simulation: bit-exact against gguf.quants, ggml and ONNX Runtime; model-level application."""

import ctypes

import numpy as np
import pytest
import torch
from gguf import quants

import subnet  # noqa: F401  (registers heterogeneous classes)
from subnet.arch import LINEARS, arch_of
from subnet.extract import extract
from subnet.formats import FORMATS
from subnet.quant import (
    _FAST,
    QuantError,
    TrainingRounder,
    _ggml,
    block_codes,
    block_scales,
    encode_to_scales,
    fake_quantize,
    fake_quantize_ggml,
    fake_quantize_model,
    ggml_dequantize,
    ggml_qtype,
    ggml_quantize,
    ort_block_codes,
    ort_block_quantize_input,
    ort_dynamic_quantize_input,
    ort_int8_linear,
    ort_int8_saturates,
    round_to_scales,
    u8s8_saturation,
)
from subnet.spec import SubnetSpec
from tests.conftest import tiny_model

GGUF = [n for n, f in FORMATS.items() if f.ggml_type]
ONNX = [n for n, f in FORMATS.items() if not f.ggml_type]
SIMPLE = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]  # block formats gguf.quants also quantizes
K_AND_IQ = ["q6_k", "q5_k", "q4_k", "iq4_nl", "q3_k", "q2_k"]
# relative RMS round-trip error on Gaussian weights; measured (seed 0, 64x512): q6_k 0.018, q5_k 0.036,
# q4_k 0.071, iq4_nl 0.076, q3_k 0.15, q2_k 0.30. Bounds leave ~30% headroom.
RMS_TOL = {"q6_k": 0.025, "q5_k": 0.05, "q4_k": 0.1, "iq4_nl": 0.1, "q3_k": 0.2, "q2_k": 0.4}


def weight(rows=24, cols=512, seed=0):
    """Gaussian rows of varied scale plus the edge cases: a zero block, one-signed blocks, +-max ties,
    exact .5 quotients, an outlier."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * rng.uniform(0.005, 0.5, (rows, 1))).astype(np.float32)
    w[0, :32] = 0
    w[1, :32] = np.abs(w[1, :32])
    w[2, :32] = -np.abs(w[2, :32])
    w[3, 0], w[3, 1] = -1.0, 1.0  # ties between +max and -max: the first one wins
    w[3, 32], w[3, 33] = 1.0, -1.0
    w[4, :32] = np.arange(32, dtype=np.float32) * 0.5 - 8  # values landing on .5 after scaling
    w[5, 7] = 40.0
    return w


def bits_equal(a, b) -> bool:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# ---- GGUF formats --------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", SIMPLE + ["bf16"])
def test_simple_formats_equal_gguf_numpy(fmt):
    w = weight()
    qt = ggml_qtype(fmt)
    ref_bytes = quants.quantize(w, qt)
    assert np.array_equal(ggml_quantize(w, fmt), ref_bytes)  # ggml's bytes == gguf-py's
    ref = quants.dequantize(ref_bytes, qt)
    assert bits_equal(fake_quantize(torch.from_numpy(w), fmt).numpy(), ref)  # torch fast path
    assert bits_equal(fake_quantize_ggml(torch.from_numpy(w), fmt).numpy(), ref)  # ggml path


@pytest.mark.parametrize("fmt,twin,lo,hi", [("q8_0", "int8s_b32", -127, 127), ("q4_0", "int4s_b32", -8, 7),
                                             ("q5_0", None, -16, 15)])  # fmt: skip
def test_block_codes_are_what_the_format_stores(fmt, twin, lo, hi):
    """codes * scales is the format's round trip, bit for bit; codes are integers in the format's range,
    scales f16 values; a twin has the same codes."""
    w = torch.from_numpy(weight())
    codes, scales = block_codes(w, fmt)
    assert codes.shape == w.shape and scales.shape == (w.shape[0], w.shape[1] // 32)
    assert torch.equal(codes, codes.round()) and codes.min() >= lo and codes.max() <= hi
    assert torch.equal(scales, scales.half().float())
    got = (codes.reshape(w.shape[0], -1, 32) * scales[..., None]).reshape(w.shape)
    assert bits_equal(got.numpy(), fake_quantize(w, fmt).numpy())
    if twin:
        assert all(torch.equal(a, b) for a, b in zip(block_codes(w, twin), (codes, scales)))
        assert bits_equal(fake_quantize(w, twin).numpy(), got.numpy())
    with pytest.raises(QuantError, match="no absmax block codes"):
        block_codes(w, "q4_1")


@pytest.mark.parametrize("fmt", [f for f in _FAST if f in GGUF])
@pytest.mark.parametrize("seed", [1, 2])
def test_fast_path_bit_identical_to_ggml(fmt, seed):
    w = torch.from_numpy(weight(seed=seed))
    assert bits_equal(fake_quantize(w, fmt).numpy(), fake_quantize_ggml(w, fmt).numpy())


@pytest.mark.parametrize("fmt", sorted(_FAST))
def test_fast_path_rounds_in_row_chunks_bit_identically(fmt):
    """More rows than one chunk, read through a column slice (non-contiguous, as a pruned hidden size
    gives): the chunked result equals the format applied to the whole contiguous matrix at once."""
    w = torch.from_numpy(weight(rows=600, cols=768, seed=4))[:, :512]
    assert bits_equal(fake_quantize(w, fmt).numpy(), _FAST[fmt](w.contiguous()).numpy())


@pytest.mark.parametrize("fmt", GGUF)
def test_bytes_match_bits_per_weight(fmt):
    w = weight(rows=6, cols=768)
    raw = ggml_quantize(w, fmt)
    assert raw.dtype == np.uint8 and raw.shape[0] == 6
    assert raw.shape[1] * 8 / w.shape[1] == FORMATS[fmt].bits


_C_NAMES = {"q6_k": "q6_K", "q5_k": "q5_K", "q4_k": "q4_K", "q3_k": "q3_K", "q2_k": "q2_K"}


@pytest.mark.parametrize("fmt", [f for f in GGUF if f not in ("f32", "f16", "bf16")])
def test_dequantize_equals_ggml_own_dequantize(fmt):
    w = weight(rows=8)
    raw = ggml_quantize(w, fmt)
    fn = getattr(_ggml(), "dequantize_row_" + _C_NAMES.get(fmt, fmt))
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    out = np.empty(w.shape, np.float32)
    fn(raw.ctypes.data, out.ctypes.data, w.size)
    assert bits_equal(ggml_dequantize(raw, fmt, w.shape), out)


@pytest.mark.parametrize("fmt", K_AND_IQ)
def test_k_and_iq_round_trip_error(fmt):
    w = torch.from_numpy(weight(rows=64, cols=512, seed=3)[6:])  # Gaussian rows only
    w = w / w.std(dim=1, keepdim=True) * 0.02
    fq = fake_quantize(w, fmt)
    assert fq.shape == w.shape and fq.dtype == w.dtype
    rel = ((fq - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()).item()
    assert 0 < rel < RMS_TOL[fmt], f"{fmt}: relative RMS error {rel:.4f}"


@pytest.mark.parametrize("fmt", ["iq4_nl", "q4_0"])
def test_kept_scales_of_a_slice_are_a_slice_of_the_scales(fmt):
    """A block's scale depends on its own 32 weights only: one search serves every row/column-prefix
    slice, and rounding a slice with its share of the scales is ggml's rounding of the slice, bit for bit."""
    w = torch.from_numpy(weight(rows=40, cols=256, seed=5))
    s = block_scales(w, fmt)
    assert s.shape == (40, 8) and s.dtype == torch.float32
    part = w[5:30, :128]
    assert bits_equal(block_scales(part, fmt).numpy(), s[5:30, :4].numpy())
    assert bits_equal(round_to_scales(part, s[5:30, :4], fmt).numpy(), fake_quantize_ggml(part, fmt).numpy())


def test_training_rounder_is_exact_at_the_start_and_close_after_a_step():
    w = torch.from_numpy(weight(rows=64, cols=512, seed=6)[6:])
    rnd = TrainingRounder(w, "iq4_nl")
    assert bits_equal(rnd(w).numpy(), fake_quantize_ggml(w, "iq4_nl").numpy())
    moved = w + 1e-3 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    exact = fake_quantize(moved, "iq4_nl")
    err_fixed = (rnd(moved) - moved).pow(2).mean().item()
    err_exact = (exact - moved).pow(2).mean().item()
    assert err_exact <= err_fixed <= 1.01 * err_exact  # the kept scales are still almost the best ones
    q = TrainingRounder(w, "q8_0")
    assert q.scales is None and bits_equal(q(moved).numpy(), fake_quantize(moved, "q8_0").numpy())


@pytest.mark.parametrize("fmt", ["iq4_nl", "q4_0"])
def test_encode_to_scales_writes_ggml_blocks_at_kept_scales(fmt):
    """At the weight's own scales the bytes are ggml's, bit for bit (an all-zero row included); at the
    scales training kept, ggml decodes them to exactly what training rounded the moved weight to (q4_0:
    a weight moved past its block's largest code stays at it)."""
    w = torch.from_numpy(weight(rows=48, cols=256, seed=7))
    w[3] = 0.0
    rnd = TrainingRounder(w, fmt)
    raw = encode_to_scales(w, rnd.scales, fmt)
    assert raw.dtype == np.uint8 and np.array_equal(raw, ggml_quantize(w.numpy(), fmt))
    moved = w + 3e-2 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    kept = encode_to_scales(moved, rnd.scales, fmt)
    assert not np.array_equal(kept, ggml_quantize(moved.numpy(), fmt))  # ggml would pick its scales again
    assert bits_equal(ggml_dequantize(kept, fmt, tuple(w.shape)), rnd(moved).numpy())


def test_int4s_b32_codes_at_kept_scales_are_q4_0s():
    """ONNX Runtime's q4_0 twin stores the same codes and fp16 scales as q4_0 at kept scales too."""
    w = torch.from_numpy(weight(rows=16, cols=128, seed=8))
    s = block_scales(w, "int4s_b32")
    moved = w + 3e-2 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    codes, stored = block_codes(moved, "int4s_b32", s)
    assert codes.min() >= -8 and codes.max() <= 7 and torch.equal(stored, s.half().float())
    assert bits_equal((codes.reshape(16, 4, 32) * stored.unsqueeze(-1)).reshape(16, 128).numpy(),
                      round_to_scales(moved, s, "q4_0").numpy())  # fmt: skip
    assert torch.equal(block_codes(w, "int4s_b32", s)[0], block_codes(w, "q4_0")[0])


def test_kept_scales_bad_inputs():
    w = torch.randn(4, 64)
    with pytest.raises(QuantError, match="keeps no block scales"):
        block_scales(w, "q8_0")
    with pytest.raises(QuantError, match="do not fit"):
        round_to_scales(w, torch.ones(4, 3), "iq4_nl")
    with pytest.raises(QuantError, match="keeps no block scales"):
        encode_to_scales(w, torch.ones(4, 2), "q5_0")
    with pytest.raises(QuantError, match="not a GGUF format"):
        encode_to_scales(w, torch.ones(4, 2), "int4s_b32")
    with pytest.raises(QuantError, match="multiple of 32"):
        block_scales(torch.randn(4, 48), "iq4_nl")


def test_f32_f16_identity_and_dtype():
    w = torch.from_numpy(weight())
    assert fake_quantize(w, "f32") is w
    assert np.array_equal(ggml_quantize(w.numpy(), "f32").view(np.float32), w.numpy())
    assert torch.equal(fake_quantize(w, "f16"), w.half().float())
    wb = w.to(torch.bfloat16)
    out = fake_quantize(wb, "q8_0")
    assert out.dtype == torch.bfloat16 and out.shape == w.shape


@pytest.mark.parametrize("fmt", ["q4_k", "q8_0", "int4_b128"])
def test_bad_row_length_is_a_clear_value_error(fmt):
    w = np.zeros((4, 96), np.float32)  # 96 is not a multiple of 256 / 128; 100 is not of 32
    if FORMATS[fmt].block == 32:
        w = np.zeros((4, 100), np.float32)
    with pytest.raises(ValueError, match=f"multiple of {FORMATS[fmt].block}"):
        fake_quantize(torch.from_numpy(w), fmt)
    if FORMATS[fmt].ggml_type:
        with pytest.raises(ValueError, match="multiple of"):
            ggml_quantize(w, fmt)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown weight format"):
        fake_quantize(torch.zeros(2, 32), "q7_0")
    with pytest.raises(ValueError, match="2-D"):
        fake_quantize(torch.zeros(32), "q8_0")
    with pytest.raises(ValueError, match="not a GGUF format"):
        ggml_quantize(np.zeros((2, 32), np.float32), "int8")


# ---- ONNX Runtime formats, checked against ORT itself ---------------------------------------
def _matmul_model(w: np.ndarray, path):
    """A one-MatMul ONNX graph y = x @ w.T, the way torch.onnx exports a Linear (weight stored as w.T)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out_f, in_f = w.shape
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, in_f])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, out_f])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "W")],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), path)
    return path


def _run(path, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_int8_matches_ort_quantize_dynamic(tmp_path):
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    w = weight(rows=48, cols=256)
    x = np.random.default_rng(1).standard_normal((5, 256)).astype(np.float32)
    src = _matmul_model(w, tmp_path / "m.onnx")
    quantize_dynamic(src, tmp_path / "q.onnx", per_channel=True, weight_type=QuantType.QInt8)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(tmp_path / "q.onnx").graph.initializer}
    fq = fake_quantize(torch.from_numpy(w), "int8").numpy()
    # the weight ORT stores, dequantized, is exactly ours
    assert not inits["W_zero_point"].any()
    assert bits_equal(inits["W_quantized"].T.astype(np.float32) * inits["W_scale"][:, None], fq)
    # ORT's output = our weight times ORT's dynamically quantized input (tolerance: fp32 rounding),
    # less what this CPU's kernel loses to int16 saturation (the ramp row saturates where it can)
    y = _run(tmp_path / "q.onnx", x)
    xt, wt, tol = torch.from_numpy(x), torch.from_numpy(w), 1e-5 * np.abs(y).max()
    here = ort_int8_saturates()
    np.testing.assert_allclose(y, ort_int8_linear(xt, wt, scope="tensor").numpy(), rtol=0, atol=tol)
    assert np.abs(y - ort_int8_linear(xt, wt, scope="tensor", saturates=not here).numpy()).max() > 100 * tol
    xq = ort_dynamic_quantize_input(xt).numpy()
    np.testing.assert_allclose(ort_int8_linear(xt, wt, scope="tensor", saturates=False).numpy(), xq @ fq.T,
                               rtol=0, atol=tol / 10)  # fmt: skip
    # weight-only simulation is off by the input rounding alone (step (max-min)/255)
    assert np.abs(y - x @ fq.T).max() > 1e-4 * np.abs(y).max()


def test_u8s8_saturation_is_what_a_vpmaddubsw_kernel_loses():
    """Adjacent pairs of uint8 x int8 products summed into a saturating int16, against a direct count."""
    a = torch.tensor([[255.0, 255, 255, 255, 200, 10, 130, 130], [1, 2, 3, 4, 5, 6, 7, 8]])
    b = torch.tensor([[127.0, 127, 127, -128, 100, 100, 127, 127], [-128, -128, -128, -128, 0, 0, 0, 0]])
    pairs = (a[:, None, :] * b[None]).reshape(2, 2, 4, 2).sum(-1)
    want = (pairs.clamp(-32768, 32767) - pairs).sum(-1).double()
    got = u8s8_saturation(a, b)
    assert torch.equal(got, want) and got[0, 0] == (32767 - 64770) + (32767 - 33020) and got[1].eq(0).all()
    # measured here on ORT's MatMulInteger: row 0 of a against b[0] gives 86279, exact 118535
    assert float((a[0] * b[0]).sum() + got[0, 0]) == 86279
    assert torch.equal(u8s8_saturation(a[:, :7], b[:, :7]), u8s8_saturation(a[:, :7], b[:, :7], chunk=1))  # odd width


def test_int8_token_scope_matches_ort_one_token_per_call(tmp_path):
    """Decoding runs one token per call, so ORT's DynamicQuantizeLinear range is that token's own: the
    "token" scope reproduces it bit for bit, also with an outlier token in the batch (which the
    "tensor" scope lets set everybody's range)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    w = weight(rows=48, cols=256)
    x = np.random.default_rng(2).standard_normal((6, 256)).astype(np.float32)
    x[0] *= 300  # an outlier token (as the first token of a real LM)
    x[3] = 0  # an all-zero token stays zero
    src = _matmul_model(w, tmp_path / "m.onnx")
    quantize_dynamic(src, tmp_path / "q.onnx", per_channel=True, weight_type=QuantType.QInt8)
    fq = fake_quantize(torch.from_numpy(w), "int8").numpy()
    xt = torch.from_numpy(x)
    per_call = np.concatenate([_run(tmp_path / "q.onnx", x[i : i + 1]) for i in range(len(x))])
    ours = ort_dynamic_quantize_input(xt, "token").numpy()
    for i in range(len(x)):
        assert bits_equal(ours[i : i + 1], ort_dynamic_quantize_input(xt[i : i + 1]).numpy())
    row_max = np.abs(per_call).max(axis=1, keepdims=True)
    ref = ort_int8_linear(xt, torch.from_numpy(w), scope="token").numpy()  # ours @ fq.T, less saturation
    assert (np.abs(per_call - ref) <= 1e-5 * row_max).all()  # fp32 accumulation order only
    assert not ours[3].any()
    whole = ort_dynamic_quantize_input(xt, "tensor").numpy() @ fq.T
    assert np.abs(whole[1:] - per_call[1:]).max() > 0.1 * np.abs(per_call[1:]).max()  # the old simulation
    with pytest.raises(ValueError, match="scope 'row' is not one of"):
        ort_dynamic_quantize_input(xt, "row")


def test_int8_simulation_does_not_depend_on_batching():
    """A sequence scores the same alone or batched with an outlier sequence (old: one range per batch)."""
    base = tiny_model("llama")
    spec = SubnetSpec.full(arch_of(base.config), "int8")
    model = extract(base, spec)
    with torch.no_grad():
        model.model.embed_tokens.weight[7] *= 200  # token 7 makes outlier activations
        ids = torch.tensor([[5, 17, 42, 99, 3, 64], [7, 7, 7, 7, 7, 7]])
        for scope, same in (("token", True), ("tensor", False)):
            sim = fake_quantize_model(model, spec, int8_scope=scope)
            alone, batched = sim(ids[:1]).logits[0], sim(ids).logits[0]
            assert torch.allclose(alone, batched, atol=1e-5) == same, scope


ASYM_NBITS = [n for n, f in FORMATS.items() if f.nbits and not f.same_as]


def _nbits_model(w: np.ndarray, fmt: str, path, accuracy_level: int = 4):
    """A one-MatMul graph with its weight stored in MatMulNBits format ``fmt`` by the exporter
    (``quantize_nbits``: ORT's quantizer, or the codes written here for float16 scales)."""
    import onnx
    from onnx import helper

    from targets.onnx_export import quantize_nbits

    quantize_nbits(_matmul_model(w, path), fmt, ["mm"])
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits"]
    node = model.graph.node[0]
    node.attribute.remove(next(a for a in node.attribute if a.name == "accuracy_level"))
    node.attribute.append(helper.make_attribute("accuracy_level", accuracy_level))
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("fmt", ASYM_NBITS)
def test_blockwise_accuracy_level_4_matches_ort(tmp_path, fmt):
    """accuracy_level=4 also quantizes the input (int8 per token and block): simulated, ORT agrees."""
    w = weight(rows=40, cols=256)
    x = np.random.default_rng(3).standard_normal((5, 256)).astype(np.float32)
    y = _run(_nbits_model(w, fmt, tmp_path / "q.onnx"), x)
    fq = fake_quantize(torch.from_numpy(w), fmt).numpy()
    xq = ort_block_quantize_input(torch.from_numpy(x), FORMATS[fmt].block).numpy()
    np.testing.assert_allclose(y, xq @ fq.T, rtol=0, atol=1e-5 * np.abs(y).max())
    assert np.abs(y - x @ fq.T).max() > 1e-4 * np.abs(y).max()  # the input rounding is visible


@pytest.mark.parametrize("fmt", ASYM_NBITS)
def test_blockwise_matches_ort_matmulnbits(tmp_path, fmt):
    w = weight(rows=40, cols=256)
    x = np.random.default_rng(2).standard_normal((5, 256)).astype(np.float32)
    y = _run(_nbits_model(w, fmt, tmp_path / "q.onnx", accuracy_level=0), x)
    fq = fake_quantize(torch.from_numpy(w), fmt).numpy()
    # accuracy_level 0 computes in fp32 from the dequantized weight: only summation order differs
    np.testing.assert_allclose(y, x @ fq.T, rtol=0, atol=1e-5 * np.abs(y).max())
    assert np.abs(y - x @ w.T).max() > 1e-3 * np.abs(y).max()  # and quantization is visible


def test_float16_scaled_blocks_are_ort_quantizers_where_its_scales_are_float16(tmp_path):
    """int4_b64's codes, scales and zero points are byte for byte what ORT's quantizer writes for a weight
    whose every block scale float16 holds (span 15 * 2^-k); elsewhere the scales differ, float16 values."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from targets.onnx_export import asym_blocks

    rng = np.random.default_rng(4)
    s = 2.0 ** -rng.integers(2, 9, (24, 4, 1))  # a power of two per block of 64
    b = rng.uniform(-7, 8, (24, 4, 64)) * s
    b[..., 0], b[..., 1] = -7 * s[..., 0], 8 * s[..., 0]  # min and max: the span is 15 s exactly
    w = b.reshape(24, 256).astype(np.float32)
    q = MatMulNBitsQuantizer(onnx.load(_matmul_model(w, tmp_path / "m.onnx")), bits=4, block_size=64)
    q.process()
    ort = {i.name: numpy_helper.to_array(i) for i in q.model.model.graph.initializer}
    codes, scales, zero_points = asym_blocks(w, "int4_b64")
    assert np.array_equal(codes, ort["W_Q4"].reshape(24, -1))
    assert bits_equal(scales, ort["W_scales"]) and np.array_equal(zero_points, ort["W_zero_points"])

    w = weight(rows=24, cols=256)
    scales = asym_blocks(w, "int4_b64")[1]
    fp32 = ort_block_codes(torch.from_numpy(w), 4, 64)[2].reshape(24, -1).numpy()  # ORT's quantizer's
    assert bits_equal(scales, scales.astype(np.float16).astype(np.float32)) and not bits_equal(scales, fp32)
    np.testing.assert_allclose(scales, fp32, rtol=2**-11)
    assert asym_blocks(np.ascontiguousarray(w[:, :192]), "int4_b64")[2].shape == (24, 2)  # 3 zero points a row, padded


@pytest.mark.parametrize("fmt,bits,block", [("int8_b32", 8, 32), ("int4_b32", 4, 32), ("int4_b128", 4, 128)])
def test_blockwise_equals_ort_quantize_kernel(fmt, bits, block):
    """Bit-exact against the kernel MatMulNBitsQuantizer calls (MLAS blockwise, asymmetric, float32 scales)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    w = weight(rows=16, cols=256)
    b = np.ascontiguousarray(w.T)  # (K, N) as the ONNX weight
    k, n = b.shape
    kb = k // block
    scales = np.zeros((n, kb), np.float32)
    if bits == 4:
        packed = np.zeros((n, kb, block // 2), np.uint8)
        zp = np.zeros((n, (kb + 1) // 2), np.uint8)
        quantize_matmul_4bits(packed, b, scales, zp, block, n, k, False)
        q = np.stack([packed & 15, packed >> 4], -1).reshape(n, kb, block)
        zp = np.stack([zp & 15, zp >> 4], -1).reshape(n, -1)[:, :kb]
    else:
        q = np.zeros((n, kb, block), np.uint8)
        zp = np.zeros((n, kb), np.uint8)
        quantize_matmul_8bits(q, b, scales, zp, block, n, k, False)
    ref = ((q.astype(np.float32) - zp[..., None]) * scales[..., None]).reshape(n, k)
    assert bits_equal(fake_quantize(torch.from_numpy(w), fmt).numpy(), ref)


# ---- whole models --------------------------------------------------------------------------
def _mixed_spec(model):
    spec = SubnetSpec.full(arch_of(model.config))
    plan = [
        {"q_proj": "q8_0", "down_proj": "q4_0"},
        {"gate_proj": "int4_b32", "up_proj": "int8"},
        {},
        {"v_proj": "q5_1", "o_proj": "iq4_nl", "k_proj": "bf16"},
    ]
    for ly, fmts in zip(spec.layers, plan):
        ly.formats.update(fmts)
    return spec, plan


def _linear(model, i, name):
    layer = model.model.layers[i]
    return getattr(layer.self_attn if name in LINEARS[:4] else layer.mlp, name)


@pytest.mark.parametrize("tied", [True, False])
def test_fake_quantize_model_changes_exactly_the_spec_linears(tied):
    family = "llama" if tied else "qwen2"
    base = tiny_model(family)
    spec, plan = _mixed_spec(base)
    spec.embed_format = "q8_0"
    spec.lm_head_format = "q8_0" if tied else "q4_1"
    model = extract(base, spec.validate())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = fake_quantize_model(model, spec)
    assert out is not model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # input untouched
    after = out.state_dict()
    expected = {}
    for i, fmts in enumerate(plan):
        for name in LINEARS:
            key = f"model.layers.{i}.{'self_attn' if name in LINEARS[:4] else 'mlp'}.{name}.weight"
            expected[key] = fmts.get(name, "f32")
    expected["model.embed_tokens.weight"] = "q8_0"
    expected["lm_head.weight"] = "q8_0" if tied else "q4_1"
    for key, value in before.items():
        fmt = expected.get(key, "f32")
        if fmt == "f32":
            assert torch.equal(after[key], value), key  # norms, biases, f32 linears untouched
        else:
            assert not torch.equal(after[key], value), key
            assert torch.equal(after[key], fake_quantize(value, fmt)), key
    if tied:
        assert out.lm_head.weight is out.model.embed_tokens.weight


def test_fake_quantize_model_int8_quantizes_inputs_and_runs():
    base = tiny_model("llama")
    spec, _ = _mixed_spec(base)
    model = extract(base, spec.validate())
    sim = fake_quantize_model(model, spec)
    lin = _linear(sim, 1, "up_proj")  # int8: ORT also quantizes its input
    x = torch.randn(2, 3, lin.in_features)
    w = _linear(model, 1, "up_proj").weight  # the float weight the int8 one is rounded from
    with torch.no_grad():
        y = lin(x)
        expect = ort_int8_linear(x, w, scope="token")  # default: one range per token
        assert torch.allclose(y, expect, atol=1e-6)
        plain = ort_dynamic_quantize_input(x, "token") @ lin.weight.T  # without this CPU's saturation
        assert torch.allclose(plain, ort_int8_linear(x, w, scope="token", saturates=False), atol=1e-6)
        whole = _linear(fake_quantize_model(model, spec, int8_scope="tensor"), 1, "up_proj")
        assert torch.allclose(whole(x), ort_int8_linear(x, w, scope="tensor"), atol=1e-6)
        assert not torch.allclose(y, x @ lin.weight.T, atol=1e-6)
        weights_only = fake_quantize_model(model, spec, activations=False)
        assert torch.allclose(_linear(weights_only, 1, "up_proj")(x), x @ lin.weight.T, atol=1e-6)
        gate = _linear(sim, 1, "gate_proj")  # int4_b32 at accuracy_level 4: int8 input blocks of 32
        assert torch.allclose(gate(x), ort_block_quantize_input(x, 32) @ gate.weight.T, atol=1e-6)
        fp32_compute = fake_quantize_model(model, spec, ort_accuracy_level=0)
        assert torch.allclose(_linear(fp32_compute, 1, "gate_proj")(x), x @ gate.weight.T, atol=1e-6)
        ids = torch.tensor([[5, 17, 42, 99, 3]])
        assert torch.isfinite(sim(ids).logits).all()


def test_fake_quantize_model_inplace_and_layer_mismatch():
    base = tiny_model("llama")
    spec = SubnetSpec.full(arch_of(base.config), "q8_0")
    model = extract(base, spec)
    assert fake_quantize_model(model, spec, inplace=True) is model
    assert torch.equal(_linear(model, 0, "q_proj").weight, fake_quantize(_linear(base, 0, "q_proj").weight, "q8_0"))
    short = SubnetSpec.uniform(spec.base, layers=[0, 1])
    with pytest.raises(ValueError, match="spec has 2 layers but the model has 4"):
        fake_quantize_model(model, short)


@pytest.mark.integration
def test_smollm2_all_q8_0_matches_ggml_path(smollm2):
    model = smollm2.model
    spec = SubnetSpec.full(smollm2.arch, "q8_0")
    sim = fake_quantize_model(model, spec)
    w = model.model.layers[0].mlp.down_proj.weight
    assert torch.equal(sim.model.layers[0].mlp.down_proj.weight, fake_quantize_ggml(w, "q8_0"))
    assert torch.equal(sim.model.embed_tokens.weight, fake_quantize_ggml(model.model.embed_tokens.weight, "q8_0"))
    text = "The capital of France is Paris, and the capital of Italy is"
    ids = smollm2.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = model(ids).logits, sim(ids).logits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8  # q8_0 barely moves SmolLM2


@pytest.mark.integration
def test_smollm2_iq4_nl_fast_path_equals_ggml(smollm2):
    """The torch scale search reproduces ggml's iq4_nl on real weights (wide and narrow, row-sliced)."""
    layer = smollm2.model.model.layers[7]
    for w in (layer.mlp.down_proj.weight, layer.self_attn.k_proj.weight, layer.mlp.up_proj.weight[:512]):
        assert bits_equal(fake_quantize(w, "iq4_nl").numpy(), fake_quantize_ggml(w, "iq4_nl").numpy())
