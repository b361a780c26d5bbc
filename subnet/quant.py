"""Quantization simulation with the exact numerics of each weight format in ``subnet.formats``.

GGUF formats are quantized by ggml itself (``ggml_quantize_chunk`` from llama-cpp-python's
``libggml-base``, the code llama.cpp's quantizer runs) and dequantized by ``gguf.quants``.
"""

from __future__ import annotations

import copy
import ctypes
import importlib.util
import sys
from collections.abc import Callable
from functools import lru_cache, partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from subnet.arch import LINEARS, linear_of
from subnet.formats import NBITS_FORMATS, get_format


class QuantError(ValueError):
    """A weight that a format cannot hold (wrong shape, row length or format)."""


# ---- ggml through ctypes -------------------------------------------------------------------
@lru_cache(maxsize=1)
def _ggml():
    """llama-cpp-python's libggml-base, with the quantization entry points typed."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise QuantError("llama-cpp-python is not installed; install it to quantize GGUF formats")
    path = Path(spec.submodule_search_locations[0]) / "lib" / "libggml-base.so"
    if not path.exists():
        raise QuantError(f"{path} not found; reinstall llama-cpp-python (it ships libggml-base)")
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p,
    ]  # fmt: skip
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    return lib


def ggml_qtype(fmt: str):
    """The ``gguf.GGMLQuantizationType`` of a GGUF weight format (ValueError for ONNX formats)."""
    from gguf import GGMLQuantizationType

    f = get_format(fmt)
    if f.ggml_type is None:
        raise QuantError(f"format {fmt!r} is not a GGUF format; use fake_quantize for ONNX formats")
    return GGMLQuantizationType[f.ggml_type]


@lru_cache(maxsize=None)
def _checked_type(fmt: str) -> int:
    """ggml's enum value for ``fmt``, checked against the library (names and block size agree)."""
    from gguf import GGML_QUANT_SIZES

    qt = ggml_qtype(fmt)
    lib = _ggml()
    name = lib.ggml_type_name(int(qt)).decode().upper()
    block, _ = GGML_QUANT_SIZES[qt]
    if name != qt.name or lib.ggml_blck_size(int(qt)) != block:
        raise QuantError(f"libggml type {int(qt)} is {name!r}, gguf says {qt.name}: llama-cpp-python and gguf disagree")
    if lib.ggml_quantize_requires_imatrix(int(qt)):
        raise QuantError(f"format {fmt!r} needs an importance matrix, which this simulation does not supply")
    lib.ggml_quantize_init(int(qt))  # builds lookup grids some types (iq*) need; no-op for the rest
    return int(qt)


def _check_2d(weight: np.ndarray, fmt: str) -> np.ndarray:
    if weight.ndim != 2:
        raise QuantError(f"expected a 2-D weight (rows, row_length), got shape {tuple(weight.shape)}")
    block = get_format(fmt).block
    if weight.shape[1] % block:
        raise QuantError(
            f"format {fmt} needs rows that are a multiple of {block}, this weight's rows have {weight.shape[1]} "
            f"(pick a format whose block divides the row, see subnet.formats.effective_format)"
        )
    return np.ascontiguousarray(weight, dtype=np.float32)


def ggml_quantize(weight: np.ndarray, fmt: str) -> np.ndarray:
    """Raw GGML bytes, uint8 shaped (rows, row_bytes), of a 2-D float weight quantized along its rows.

    The bytes are what ``GGUFWriter.add_tensor(name, raw, raw_dtype=ggml_qtype(fmt))`` expects, and
    identical to what llama.cpp's quantizer writes for the tensor (no importance matrix).
    """
    src = _check_2d(np.asarray(weight), fmt)
    qtype = _checked_type(fmt)
    lib = _ggml()
    rows, n = src.shape
    row_bytes = lib.ggml_row_size(qtype, n)
    dst = np.empty((rows, row_bytes), dtype=np.uint8)
    if rows:
        written = lib.ggml_quantize_chunk(qtype, src.ctypes.data, dst.ctypes.data, 0, rows, n, None)
        if written != dst.nbytes:
            raise QuantError(f"ggml wrote {written} bytes for {fmt}, expected {dst.nbytes}")
    return dst


def ggml_dequantize(raw: np.ndarray, fmt: str, shape: tuple[int, int]) -> np.ndarray:
    """Float32 weight of ``shape`` decoded from raw GGML bytes (``gguf.quants.dequantize``)."""
    from gguf import quants

    raw = np.asarray(raw, dtype=np.uint8).reshape(shape[0], -1)
    out = quants.dequantize(raw, ggml_qtype(fmt))
    return np.asarray(out, dtype=np.float32).reshape(shape)


# ---- simulation: dequant(quant(W)) -----------------------------------------------------------
def fake_quantize(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """``weight`` (2-D, quantized along rows) after a round trip through ``fmt``; same shape and dtype.

    Exact numerics of the runtime that stores ``fmt``: ggml's quantizer for GGUF formats (pure-torch
    bit-identical fast paths for f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 and iq4_nl; ggml itself for
    K-quants), ONNX Runtime's weight quantizers for int8 (``quantize_dynamic(per_channel=True)``) and
    int8_b32 / int4_b32 / int4_b128 (``MatMulNBitsQuantizer``, asymmetric RTN; int4_b64 the same at
    float16 scales, ``ort_block_codes``); int4s_b32 and int8s_b32 store q4_0's and q8_0's weights
    exactly (symmetric MatMulNBits, f16 scales). f32 is the identity.
    """
    if fmt == "f32":
        _check_2d_torch(weight, fmt)
        return weight
    w = _check_2d_torch(weight, fmt)
    fast = _FAST.get(fmt)
    if fast is not None:
        out = _by_row_chunks(fast, w)
    else:
        raw = ggml_quantize(w.cpu().numpy(), fmt)
        out = torch.from_numpy(ggml_dequantize(raw, fmt, tuple(w.shape)))
    return out.to(device=weight.device, dtype=weight.dtype)


def _check_2d_torch(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """``weight`` detached as float32 after the checks ``fmt`` needs (2-D, rows a multiple of its block)."""
    block = get_format(fmt).block
    if weight.dim() != 2:
        raise QuantError(f"expected a 2-D weight (out_features, in_features), got shape {tuple(weight.shape)}")
    if weight.shape[1] % block:
        _check_2d(np.empty((0, weight.shape[1]), np.float32), fmt)  # raises the one-line message
    return weight.detach().to(torch.float32)


def _by_row_chunks(fast, w: torch.Tensor, *more: torch.Tensor, rows: int = 256, out_cols: int | None = None):
    """``fast(w, *more)`` computed ``rows`` rows at a time into one output (every format rounds rows
    independently), so its temporaries, and the copy of a sliced non-contiguous ``w``, stay chunk-sized.
    ``more``: tensors whose rows go with ``w``'s; ``out_cols``: the output's width when it is not ``w``'s."""
    if w.shape[0] <= rows:
        return fast(w, *more)
    out = torch.empty((w.shape[0], w.shape[1] if out_cols is None else out_cols), dtype=torch.float32)
    for r in range(0, w.shape[0], rows):
        out[r : r + rows] = fast(w[r : r + rows], *(m[r : r + rows] for m in more))
    return out


def fake_quantize_ggml(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """The reference path for any GGUF format: ggml quantizes, gguf.quants dequantizes (no fast path)."""
    w = weight.detach().to(torch.float32).cpu().numpy()
    out = ggml_dequantize(ggml_quantize(w, fmt), fmt, tuple(w.shape))
    return torch.from_numpy(out).to(device=weight.device, dtype=weight.dtype)


def _blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    return w.reshape(w.shape[0], w.shape[1] // block, block)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """A float32 value as stored in an fp16 field (round to nearest even), read back as float32."""
    return x.to(torch.float16).to(torch.float32)


def _recip(d: torch.Tensor) -> torch.Tensor:
    """1/d, 0 where d is 0 (ggml's ``id = d ? 1.0f/d : 0.0f``)."""
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def _roundf_(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` in place: nearest integer, halfway cases away from zero (torch.round rounds half
    to even). trunc(x) + trunc(2 * (x - trunc(x))), every step exact in float32."""
    t = torch.trunc(x)
    return x.sub_(t).mul_(2).trunc_().add_(t)


def _signed_absmax(b: torch.Tensor) -> torch.Tensor:
    """Per block, the value of largest magnitude, the first one on ties (ggml's strict '<' scan)."""
    hi, lo = b.amax(dim=-1, keepdim=True), b.amin(dim=-1, keepdim=True)
    out = torch.where(hi > -lo, hi, lo)
    tie = (hi == -lo).squeeze(-1)
    if tie.any():  # +m and -m both present (or an all-zero block): argmax keeps the first
        tb = b[tie]
        out[tie] = torch.gather(tb, -1, tb.abs().argmax(dim=-1, keepdim=True))
    return out


def _q8_0_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml quantize_row_q8_0_ref: d = amax/127, q = roundf(x/d) in [-127, 127]; codes [rows, n/32, 32]
    and the scales fp16(d) [rows, n/32, 1] as stored."""
    b = _blocks(w, 32)
    d = b.abs().amax(dim=-1, keepdim=True) / 127
    return _roundf_(b * _recip(d)).add_(0.0), _fp16(d)  # add 0.0: an int8 has no -0


def _absmax_scales(w: torch.Tensor, half: int) -> torch.Tensor:
    """ggml q4_0 (half=8) / q5_0 (half=16)'s float32 scale of every 32-block of ``w`` [rows, n]: the block's
    value of largest magnitude over -half, [rows, n/32, 1]."""
    return _signed_absmax(_blocks(w, 32)) / -half


def _absmax_code(y: torch.Tensor, half: int) -> torch.Tensor:
    """The stored code (0..2*half-1) of each ``y`` = x / scale: ggml's ``MIN(2*half-1, (int8_t)(y + half + 0.5f))``,
    held at 0 below (only a weight that moved off its block's own scale gets there)."""
    return (y + (half + 0.5)).trunc_().clamp_(0, 2 * half - 1)


def _absmax_codes(w: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml q4_0 (half=8) / q5_0 (half=16): d = ``_absmax_scales``, q = ``_absmax_code``(x/d) - half in
    [-half, half-1]; codes and fp16(d) as ``_q8_0_codes``."""
    d = _absmax_scales(w, half)
    return _absmax_code(_blocks(w, 32) * _recip(d), half).sub_(half), _fp16(d)


def _decode(codes_and_scales: tuple[torch.Tensor, torch.Tensor], shape) -> torch.Tensor:
    codes, scales = codes_and_scales
    return codes.mul_(scales).reshape(shape)


def _q8_0(w: torch.Tensor) -> torch.Tensor:
    return _decode(_q8_0_codes(w), w.shape)


def _absmax_blocks(w: torch.Tensor, half: int) -> torch.Tensor:
    return _decode(_absmax_codes(w, half), w.shape)


_CODES = {"q8_0": _q8_0_codes, "q4_0": lambda w: _absmax_codes(w, 8), "q5_0": lambda w: _absmax_codes(w, 16)}


def block_codes(weight: torch.Tensor, fmt: str, scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The signed integer codes [rows, n] (as floats) and per-block scales [rows, n/32] (f16 values, as
    float32) that ``fmt`` stores for ``weight``, for the absmax formats (q8_0, q4_0, q5_0) and their exact
    twins (``same_as``: int8s_b32, int4s_b32); ``codes * scales`` is ``fake_quantize(weight, fmt)``.
    ``scales``: a kept-scale format's float32 block scales to code at instead (``round_to_scales``)."""
    name = get_format(fmt).same_as or fmt
    if name not in _CODES:
        raise QuantError(f"format {fmt!r} has no absmax block codes; those formats are {', '.join(_CODES)} and their twins")
    w = _check_2d_torch(weight, fmt)
    if scales is not None:
        s = _check_scales(w, scales, fmt)
        codes = _KEPT_SCALES[_kept(fmt)].level(_blocks(w, 32) * _recip(s.unsqueeze(-1)))
        return codes.reshape(w.shape), _fp16(s)
    codes, scales = _CODES[name](w)
    return codes.reshape(w.shape), scales.squeeze(-1)


def _minmax_blocks(w: torch.Tensor, levels: int) -> torch.Tensor:
    """ggml q4_1 (levels=15) / q5_1 (levels=31): d = (max-min)/levels, q = min(levels,
    trunc((x-min)/d + 0.5)); dequant fp16(d) * q + fp16(min)."""
    b = _blocks(w, 32)
    lo, hi = b.amin(dim=-1, keepdim=True), b.amax(dim=-1, keepdim=True)
    d = (hi - lo) / levels
    q = (b - lo).mul_(_recip(d)).add_(0.5).trunc_().clamp_(max=levels)
    return q.mul_(_fp16(d)).add_(_fp16(lo)).reshape(w.shape)


def _ort_int8_per_channel(w: torch.Tensor) -> torch.Tensor:
    """onnxruntime quantize_dynamic(per_channel=True, weight_type=QInt8) of a MatMul weight.

    The ONNX weight is W.T (in, out) with channel axis -1, i.e. one scale per row of W here.
    Symmetric (QInt8 weights default to WeightSymmetric), range [-127, 127], reduce_range off:
    scale = float32(2*absmax / 254) computed in float64; q = clip(round_half_even(w / scale), -128, 127);
    a channel whose scale is below float32 tiny gets scale 1 (ORT's compute_scale_zp).
    """
    q, scale = ort_int8_weight(w)
    return q * scale


def ort_int8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 values (as floats) [out, in] and per-row scales [out, 1] ORT stores for ``w`` (see
    ``_ort_int8_per_channel``)."""
    w = w.detach().to(torch.float32)
    absmax = w.abs().amax(dim=1, keepdim=True).to(torch.float64)
    scale = (2 * absmax / 254).to(torch.float32)
    scale = torch.where(scale < torch.finfo(torch.float32).tiny, torch.ones_like(scale), scale)
    return torch.clamp(torch.round(w / scale), -128, 127) + 0.0, scale  # + 0.0: an int8 has no -0


def ort_block_codes(w: torch.Tensor, bits: int, block: int, f16_scales: bool = False):
    """onnxruntime MatMulNBits weight quantization (MLAS BlockwiseQuantizer, asymmetric, the default):
    the unsigned codes [rows, n/block, block], zero points and scales [rows, n/block, 1] (as floats).

    Blocks of ``block`` consecutive input features per output feature. min/max are widened to include
    0, scale = (max-min)/(2^bits-1), zp = clamp(roundf(-min/scale)), q = clamp(roundf(x*(1/scale) + zp));
    dequant (q - zp) * scale. ``f16_scales``: the scale is rounded to float16 first, and zero point and
    codes are computed at the rounded scale (what ``targets.onnx_export`` writes for such formats).
    """
    levels = float((1 << bits) - 1)
    b = _blocks(w, block)
    lo = b.amin(dim=-1, keepdim=True).clamp(max=0.0)
    hi = b.amax(dim=-1, keepdim=True).clamp(min=0.0)
    scale = (hi - lo) / levels
    if f16_scales:
        scale = _fp16(scale)
    zp = torch.where(scale != 0, 0.0 - lo / torch.where(scale == 0, torch.ones_like(scale), scale), lo)
    zp = _roundf_(zp.clamp(0.0, levels))
    q = _roundf_((b * _recip(scale)).add_(zp)).clamp_(0.0, levels).add_(0.0)  # uint: no -0
    return q, zp, scale


def _ort_blockwise(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """``w`` through MatMulNBits format ``fmt`` (``ort_block_codes``) and back."""
    f = get_format(fmt)
    q, zp, scale = ort_block_codes(w, f.nbits, f.block, f.f16_scales)
    return q.sub_(zp).mul_(scale).reshape(w.shape)


# ---- iq4_nl: ggml's per-block scale search, then the nearest of 16 non-linear levels ---------------
IQ4_NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # kvalues_iq4nl
_IQ4_NL_TRIES = 7  # quantize_iq4_nl's ntry: scales (t - 127) / max for t in -7..7 are tried
# Formats whose block scales are kept beside the weight: each 32-block stores one fp16 scale that may be
# any value, so GPTQ can fix a block's scale when it reaches the block, quantization-aware training can
# keep it, and the exporters write the codes at it. iq4_nl's scales come from ggml's search, q4_0's (and
# its twin int4s_b32's) from the absmax rule. See block_scales, round_to_scales.
KEPT_SCALE_FORMATS = ("iq4_nl", "q4_0", "int4s_b32")


@lru_cache(maxsize=1)
def _iq4_nl_cell_codes() -> torch.Tensor:
    """The index of the iq4_nl level nearest to each half-unit cell [c/2, (c+1)/2), c in [-255, 227]:
    level midpoints are multiples of 1/2, so one cell never straddles one, and a midpoint starts the
    cell of the upper level (ggml ``best_index_int8``: ``x - lo < hi - x ? lo : hi``)."""
    levels = torch.tensor(IQ4_NL_LEVELS, dtype=torch.float32)
    mids = (levels[:-1] + levels[1:]) / 2
    starts = torch.arange(_CELL_LO, _CELL_HI + 1, dtype=torch.float32) / 2
    return torch.bucketize(starts, mids, right=True)


@lru_cache(maxsize=1)
def _iq4_nl_cells() -> torch.Tensor:
    """The iq4_nl level (a float) nearest to each half-unit cell (see ``_iq4_nl_cell_codes``)."""
    return torch.tensor(IQ4_NL_LEVELS, dtype=torch.float32)[_iq4_nl_cell_codes()]


_CELL_LO, _CELL_HI = 2 * IQ4_NL_LEVELS[0] - 1, 2 * IQ4_NL_LEVELS[-1] + 1  # beyond them: the end levels


def _cell(x: torch.Tensor) -> torch.Tensor:
    """The half-unit cell of each element of ``x`` (2x is exact, so the cell is too), as a table index."""
    return (x * 2).floor_().clamp_(_CELL_LO, _CELL_HI).to(torch.int32).sub_(_CELL_LO)


def _nearest_level(x: torch.Tensor) -> torch.Tensor:
    """The iq4_nl level (a float) nearest to each element of ``x``, as ggml's ``best_index_int8`` picks it."""
    return _iq4_nl_cells()[_cell(x)]


def _iq4_nl_block_scales(w: torch.Tensor) -> torch.Tensor:
    """ggml quantize_row_iq4_nl_impl's float32 scale of every 32-block of ``w`` [rows, n] -> [rows, n/32].

    Per block (weights x^2, no importance matrix): start at max/127, refit by weighted least squares,
    try the 15 scales (t - 127)/max, keep the best refit. The sums run over the block's 32 elements in
    ggml's order, one float32 operation at a time, so every scale is the one ggml computes.
    """
    b = _blocks(w, 32).reshape(-1, 32)
    mx = _signed_absmax(b).squeeze(-1)
    live = mx.abs() >= 1e-15  # GROUP_MAX_EPS: an all-but-zero block gets scale 0
    mx = torch.where(live, mx, torch.ones_like(mx))
    xt = b.t().contiguous()  # [32, blocks]: column j is element j of every block
    wt = xt * xt

    def sums(inv_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = _nearest_level(xt * inv_scale)
        sqx, sq2 = torch.zeros_like(mx), torch.zeros_like(mx)
        for j in range(32):  # sumqx += w*q*x; sumq2 += w*q*q, in this order
            wq = wt[j] * q[j]
            sqx += wq * xt[j]
            sq2 += wq * q[j]
        return sqx, sq2

    sqx, sq2 = sums(1 / (mx / 127))
    d = torch.where(sq2 > 0, sqx / torch.where(sq2 > 0, sq2, 1.0), 0.0)
    best = d * sqx
    for t in range(-_IQ4_NL_TRIES, _IQ4_NL_TRIES + 1):
        # a tensor numerator: torch computes `number / tensor` as tensor.reciprocal() * number
        sqx, sq2 = sums(torch.full_like(mx, t + IQ4_NL_LEVELS[0]) / mx)
        better = (sq2 > 0) & (sqx * sqx > best * sq2)
        d = torch.where(better, sqx / torch.where(better, sq2, 1.0), d)
        best = torch.where(better, d * sqx, best)
    return torch.where(live, d, 0.0).reshape(w.shape[0], w.shape[1] // 32)


class _KeptScale(NamedTuple):
    """How a kept-scale format rounds: its block scales of a weight, and for y = x / scale the 4-bit code
    it stores and the level that code decodes to."""

    scales: Callable[[torch.Tensor], torch.Tensor]
    code: Callable[[torch.Tensor], torch.Tensor]
    level: Callable[[torch.Tensor], torch.Tensor]


_KEPT_SCALES = {  # twins go by their GGUF format's name
    "iq4_nl": _KeptScale(_iq4_nl_block_scales, lambda y: _iq4_nl_cell_codes()[_cell(y)].float(), _nearest_level),
    "q4_0": _KeptScale(lambda w: _absmax_scales(w, 8).reshape(w.shape[0], -1), partial(_absmax_code, half=8),
                       lambda y: _absmax_code(y, 8).sub_(8)),
}


def _kept(fmt: str) -> str:
    """``fmt``'s entry in ``_KEPT_SCALES`` (a twin's is its GGUF format's), or an error naming those formats."""
    if fmt not in KEPT_SCALE_FORMATS:
        raise QuantError(f"format {fmt!r} keeps no block scales; those that do: {', '.join(KEPT_SCALE_FORMATS)}")
    return get_format(fmt).same_as or fmt


def round_at_scale(x: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """Each element of ``x`` at the nearest level of ``fmt`` (a kept-scale format) for the float32
    block ``scale`` it belongs to (broadcast against ``x``), as the exported block decodes it: what
    ``round_to_scales`` does to whole blocks, for any slice of their columns (GPTQ rounds one at a time)."""
    return _KEPT_SCALES[_kept(fmt)].level(x * _recip(scale)).mul_(_fp16(scale))


def block_scales(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """The float32 block scales ggml picks for ``weight`` [rows, n] in ``fmt`` (one of
    ``KEPT_SCALE_FORMATS``), [rows, n / block]. A block's scale depends only on its own weights, so
    the scales of a row prefix are a prefix of the row's scales: one search serves every slice."""
    scales_of = _KEPT_SCALES[_kept(fmt)].scales
    w = _check_2d_torch(weight, fmt)
    return _by_row_chunks(scales_of, w, rows=1024, out_cols=w.shape[1] // get_format(fmt).block)


def _check_scales(w: torch.Tensor, scales: torch.Tensor, fmt: str) -> torch.Tensor:
    _kept(fmt)
    if scales.shape != (w.shape[0], w.shape[1] // get_format(fmt).block):
        raise QuantError(f"{fmt} scales of shape {tuple(scales.shape)} do not fit a weight of shape {tuple(w.shape)}")
    return scales.to(torch.float32)


def round_to_scales(weight: torch.Tensor, scales: torch.Tensor, fmt: str) -> torch.Tensor:
    """``weight`` rounded through ``fmt`` with given block ``scales`` (from ``block_scales``): exactly
    ``fake_quantize`` when they are the weight's own scales; with the scales of a nearby weight (a
    LoRA-updated one), the cheap rounding that quantization-aware training runs every step."""
    w = _check_2d_torch(weight, fmt)
    return _by_row_chunks(partial(_round_blocks, fmt=fmt), w, _check_scales(w, scales, fmt))


def _round_blocks(w: torch.Tensor, scales: torch.Tensor, fmt: str) -> torch.Tensor:
    """``w`` [rows, n] at the nearest level of ``fmt`` for its blocks' float32 ``scales`` [rows, n/32]."""
    return round_at_scale(_blocks(w, 32), scales.unsqueeze(-1), fmt).reshape(w.shape)


def encode_to_scales(weight: torch.Tensor, scales: torch.Tensor, fmt: str) -> np.ndarray:
    """The raw ggml blocks of ``weight`` in ``fmt`` at given block ``scales``, uint8 (rows, row_bytes)
    as ``ggml_quantize`` returns them: ggml's own bytes when the scales are the weight's (``block_scales``),
    and with the scales quantization-aware training kept, the weight it trained against (``round_to_scales``).

    An iq4_nl block is ggml's ``block_iq4_nl`` and a q4_0 block ``block_q4_0``: the fp16 scale, then 16
    bytes holding the code (level index; q4_0: value + 8) of element j in the low nibble of byte j and
    that of element j + 16 in its high nibble.
    """
    if get_format(fmt).same_as:
        raise QuantError(f"{fmt} is not a GGUF format (its GGUF twin is {get_format(fmt).same_as}): ggml has no blocks of it")
    w = _check_2d_torch(weight, fmt)
    s = _check_scales(w, scales, fmt).unsqueeze(-1)
    codes = _KEPT_SCALES[_kept(fmt)].code(_blocks(w, 32) * _recip(s)).to(torch.uint8)
    packed = codes[..., :16] | (codes[..., 16:] << 4)
    d = s.to(torch.float16).view(torch.uint8)  # the fp16 bytes, little-endian like ggml's
    if sys.byteorder != "little":
        d = d.flip(-1)
    return torch.cat([d, packed], dim=-1).reshape(w.shape[0], -1).numpy()


class TrainingRounder:
    """How quantization-aware training rounds a weight that starts as ``weight`` and drifts from it:
    ``fake_quantize`` for formats with a cheap exact rounding; for kept-scale formats, the nearest
    level at the starting weight's block ``scales`` (exact at the start, a search-free step after).
    Those scales are what the trained weight is exact at: ``encode_to_scales`` exports it with them.
    ``scales``: given ones (GPTQ's, ``subnet.gptq``), kept instead of searching the starting weight's."""

    def __init__(self, weight: torch.Tensor, fmt: str, scales: torch.Tensor | None = None):
        self.fmt = fmt
        self.scales = None
        if fmt in KEPT_SCALE_FORMATS:
            self.scales = block_scales(weight, fmt) if scales is None else _check_scales(weight, scales, fmt)

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        if self.scales is None:
            return fake_quantize(w, self.fmt)
        return round_to_scales(w, self.scales, self.fmt).to(dtype=w.dtype)


_FAST = {
    "f16": lambda w: w.to(torch.float16).to(torch.float32),
    "bf16": lambda w: w.to(torch.bfloat16).to(torch.float32),
    "q8_0": _q8_0,
    "q4_0": lambda w: _absmax_blocks(w, 8),
    "q5_0": lambda w: _absmax_blocks(w, 16),
    "q4_1": lambda w: _minmax_blocks(w, 15),
    "q5_1": lambda w: _minmax_blocks(w, 31),
    "int8": _ort_int8_per_channel,
    **{n: partial(_ort_blockwise, fmt=n) for n in NBITS_FORMATS if not get_format(n).same_as},  # asymmetric RTN
    # the twins: targets.onnx_export writes q4_0's / q8_0's codes and scales (block_codes) into the graph
    "int4s_b32": lambda w: _absmax_blocks(w, 8),
    "int8s_b32": _q8_0,
    "iq4_nl": lambda w: round_to_scales(w, _iq4_nl_block_scales(w), "iq4_nl"),
}


INT8_SCOPES = ("token", "tensor")  # what one DynamicQuantizeLinear range spans in the simulation


def _check_int8_scope(scope: str) -> None:
    if scope not in INT8_SCOPES:
        raise QuantError(f"int8 activation scope {scope!r} is not one of {INT8_SCOPES}")


def ort_dynamic_quantize_input(x: torch.Tensor, scope: str = "tensor") -> torch.Tensor:
    """What ORT's ``DynamicQuantizeLinear`` does to a MatMul input under ``quantize_dynamic``: uint8,
    asymmetric, range widened to include 0, scale = (max-min)/255, zp = round(-min/scale), round half to
    even (bit-exact with ORT on the tensor it is given).

    ``scope="tensor"``: one range for all of ``x``, which is what ORT computes for one call on ``x``;
    ``scope="token"``: one range per token (last axis), which is what ORT computes when it decodes one
    token per call at batch 1. One outlier token sets a "tensor" range for every other token.
    """
    q, zp, scale = _ort_dynamic_quantize(x, scope)
    return ((q - zp) * scale).to(x.dtype)


def _ort_dynamic_quantize(x: torch.Tensor, scope: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``DynamicQuantizeLinear`` of ``x``: the uint8 values (as floats), zero point and scale."""
    _check_int8_scope(scope)
    xf = x.to(torch.float32)
    dims = (-1,) if scope == "token" else tuple(range(xf.dim()))
    lo = xf.amin(dim=dims, keepdim=True).clamp(max=0.0)
    hi = xf.amax(dim=dims, keepdim=True).clamp(min=0.0)
    scale = (hi - lo) / 255
    if not scale.all():  # an all-zero token (or tensor) stays zero
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        lo = torch.where(hi == lo, torch.zeros_like(lo), lo)
    zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    return torch.clamp(torch.round(xf / scale) + zp, 0, 255), zp, scale


@lru_cache(maxsize=1)
def ort_int8_saturates() -> bool:
    """Whether ONNX Runtime's u8s8 int8 GEMM on this CPU saturates: x86 without VNNI, where MLAS
    multiplies with ``vpmaddubsw``, which adds two adjacent uint8 x int8 products into a saturating
    int16 (measured here, AMD EPYC with AVX2: 255*127 + 255*127 comes back as 32767). With VNNI
    (``vpdpbusd``) and on other architectures the sums are exact."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("flags")), [])  # fmt: skip
    except OSError:
        return False
    return not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags)


def u8s8_saturation(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """What int16 saturation takes from ``a @ b.T`` in a ``vpmaddubsw`` kernel: per output [..., out],
    sum over input pairs (2j, 2j+1) of sat16(s) - s, s = a[..., 2j] b[o, 2j] + a[..., 2j+1] b[o, 2j+1].

    ``a`` holds uint8 values (the raw quantized input, zero point included), ``b`` int8 values
    [out, in], both as floats. Exact and cheap: only the (output, pair) combinations whose largest
    possible |s| over these inputs exceeds int16 are computed, ``chunk`` elements at a time.
    """
    lead, k = a.shape[:-1], a.shape[-1]
    a2 = a.reshape(-1, k).to(torch.float32)
    b2 = b.to(torch.float32)
    if k % 2:
        a2, b2 = F.pad(a2, (0, 1)), F.pad(b2, (0, 1))
    a2, b2 = a2.reshape(a2.shape[0], -1, 2), b2.reshape(b2.shape[0], -1, 2)
    top = a2.amax(dim=0)  # [pairs, 2]: the largest input value of each position (uint8: >= 0)
    cand = ((top * b2.clamp(min=0)).sum(-1) > 32767) | ((top * b2.clamp(max=0)).sum(-1) < -32768)
    out_idx, pair_idx = cand.nonzero(as_tuple=True)
    corr = torch.zeros(a2.shape[0], b2.shape[0], dtype=torch.float64)
    step = max(1, chunk // max(1, a2.shape[0]))
    for c in range(0, out_idx.numel(), step):
        o, j = out_idx[c : c + step], pair_idx[c : c + step]
        s = a2[:, j, 0] * b2[o, j, 0] + a2[:, j, 1] * b2[o, j, 1]  # exact: |s| < 2^17
        corr.index_add_(1, o, (s.clamp(-32768, 32767) - s).to(torch.float64))
    return corr.reshape(*lead, b2.shape[0])


def ort_int8_linear(x: torch.Tensor, weight: torch.Tensor, bias=None, scope: str = "token",
                    saturates: bool | None = None) -> torch.Tensor:  # fmt: skip
    """ONNX Runtime's ``quantize_dynamic`` linear of float ``weight`` on float ``x``: the input
    quantized (``scope``), the weight in int8 per row, and, where the CPU's kernel saturates
    (``ort_int8_saturates``; the default None asks this machine), what saturation takes away."""
    q, zp, sx = _ort_dynamic_quantize(x, scope)
    wq, sw = ort_int8_weight(weight)
    y = F.linear(((q - zp) * sx).to(x.dtype), (wq * sw).to(x.dtype), bias)
    return y + _saturation_term(q, sx, wq, sw, y.dtype) if _saturating(saturates) else y


def _saturating(saturates: bool | None) -> bool:
    return ort_int8_saturates() if saturates is None else saturates


def _saturation_term(q, sx, wq, sw, dtype) -> torch.Tensor | float:
    """u8s8_saturation of the quantized input ``q`` and weight ``wq``, scaled to the output."""
    corr = u8s8_saturation(q, wq)
    if not corr.any():
        return 0.0
    return (corr * sx.to(torch.float64) * sw.reshape(-1).to(torch.float64)).to(dtype)


def _int8_input_hook(scope: str):
    """Forward pre-hook of a simulated ORT int8 linear: quantize the input, keep its uint8 values."""

    def hook(mod, args):
        q, zp, sx = _ort_dynamic_quantize(args[0], scope)
        mod._ort_int8_input = (q, sx)
        return (((q - zp) * sx).to(args[0].dtype), *args[1:])

    return hook


def _int8_saturation_hook(mod, args, out):
    """Forward hook after ``_int8_input_hook`` where the kernel saturates: add what saturation takes."""
    q, sx = mod.__dict__.pop("_ort_int8_input")
    return out + _saturation_term(q, sx, *mod._ort_int8_weight, out.dtype)


def ort_block_quantize_input(x: torch.Tensor, block: int) -> torch.Tensor:
    """What ORT's MatMulNBits with ``accuracy_level=4`` (int8 compute) does to its input: per token,
    blocks of ``block`` input features, symmetric int8 with scale absmax/127 (round half to even)."""
    xf = x.to(torch.float32)
    b = xf.reshape(*xf.shape[:-1], xf.shape[-1] // block, block)
    scale = b.abs().amax(dim=-1, keepdim=True) / 127
    q = torch.round(b * _recip(scale))
    return (q * scale).reshape(x.shape).to(x.dtype)


def input_quantizer(fmt: str, accuracy_level: int | None, int8_scope: str = "token"):
    """How the runtime of ``fmt`` quantizes a linear's input (None: it does not).

    int8 (``quantize_dynamic``) quantizes the whole tensor of each call with one range: ``int8_scope``
    picks the tensor the simulation stands for ("token": one-token decode at batch 1, the default, and
    independent of how an evaluator batches its text; "tensor": the whole input, e.g. one prefill call).
    """
    if fmt == "int8":
        _check_int8_scope(int8_scope)  # now, not at the first forward
        return lambda x: ort_dynamic_quantize_input(x, int8_scope)
    if fmt in NBITS_FORMATS and accuracy_level == 4:
        block = get_format(fmt).block
        return lambda x: ort_block_quantize_input(x, block)
    return None


def quantized_weights(model, spec) -> list[tuple[str, object, str]]:
    """(module name, module, format) of every weight the spec rounds (f32 ones left out)."""
    layers = model.model.layers
    if len(layers) != len(spec.layers):
        raise QuantError(
            f"spec has {len(spec.layers)} layers but the model has {len(layers)}: "
            f"pass the model extracted from this spec (subnet.extract.extract(model, spec))"
        )
    names = {id(m): n for n, m in model.named_modules()}
    todo = [(linear_of(layer, name), ly.formats[name]) for layer, ly in zip(layers, spec.layers) for name in LINEARS]
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    todo.append((embed, spec.embed_format))
    if head is not None and head.weight is not embed.weight:  # a tied lm_head shares embed_format
        todo.append((head, spec.lm_head_format))
    return [(names[id(m)], m, fmt) for m, fmt in todo if fmt != "f32"]


def fake_quantize_model(
    model, spec, inplace: bool = False, activations: bool = True, ort_accuracy_level: int | None = 4,
    int8_scope: str = "token", block_scales: dict[str, torch.Tensor] | None = None,
):
    """``model`` (an extracted sub-network of ``spec``) with every weight rounded through its spec format.

    ``spec.layers[i]`` gives the formats of ``model.model.layers[i]`` (one per name in ``LINEARS``);
    ``spec.embed_format`` goes to the embedding and ``spec.lm_head_format`` to an untied lm_head (a tied
    one shares the embedding's weight and format). Norms and biases stay as they are. With
    ``activations``, linears in formats whose runtime also quantizes their input simulate it: ORT int8
    (``quantize_dynamic``: uint8 per tensor, plus what this CPU's kernel loses to saturation, see
    ``ort_int8_linear``) and, when
    ``ort_accuracy_level`` is 4 (int8 compute, the fast setting), the MatMulNBits formats (int8 per
    token and block). ``int8_scope`` is the range one ORT int8 input quantization spans (see
    ``input_quantizer``): "token" (default) simulates decoding; "tensor" one call on the whole input.
    ``block_scales`` (module name -> scales, from ``TrainingRounder``) rounds those kept-scale weights
    at the scales training kept instead of searching them again, as the exporters write them.
    Returns the model (a copy unless ``inplace``).
    """
    plan = quantized_weights(model, spec)
    kept = block_scales or {}

    def rounded(name: str, w: torch.Tensor, fmt: str) -> torch.Tensor:
        if name in kept and fmt in KEPT_SCALE_FORMATS:
            return round_to_scales(w, kept[name], fmt).to(dtype=w.dtype)
        return fake_quantize(w, fmt)

    saturates = activations and any(fmt == "int8" for *_, fmt in plan) and ort_int8_saturates()
    int8_weights = {name: ort_int8_weight(m.weight) for name, m, fmt in plan if fmt == "int8" and saturates}
    with torch.no_grad():
        if inplace:
            for name, m, fmt in plan:
                m.weight.copy_(rounded(name, m.weight, fmt))
        else:  # copy everything else once; the rounded weights go straight into the copy
            memo = {}
            for name, m, fmt in plan:
                w = m.weight
                memo[id(w)] = torch.nn.Parameter(rounded(name, w, fmt), requires_grad=w.requires_grad)
            model = copy.deepcopy(model, memo)
    for name, m, fmt in plan:
        quant = input_quantizer(fmt, ort_accuracy_level, int8_scope)
        if not activations or quant is None or isinstance(m, torch.nn.Embedding):
            continue
        mod = model.get_submodule(name)
        if fmt != "int8":
            mod.register_forward_pre_hook(lambda _m, args, q=quant: (q(args[0]), *args[1:]))
            continue
        mod.register_forward_pre_hook(_int8_input_hook(int8_scope))
        if saturates:
            mod._ort_int8_weight = int8_weights[name]
            mod.register_forward_hook(_int8_saturation_hook)
    head = model.get_output_embeddings()
    quant = spec.embed_format in NBITS_FORMATS and input_quantizer(spec.embed_format, ort_accuracy_level)
    if activations and quant and head is not None and head.weight is model.get_input_embeddings().weight:
        head.register_forward_pre_hook(lambda _m, args, q=quant: (q(args[0]), *args[1:]))  # a tied block-format head
    return model
