"""Quantization simulation with the exact numerics of each weight format in ``subnet.formats``.

GGUF formats are quantized by ggml itself (``ggml_quantize_chunk`` from llama-cpp-python's
``libggml-base``, the code llama.cpp's quantizer runs) and dequantized by ``gguf.quants``.
"""

from __future__ import annotations

import ctypes
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

from subnet.formats import get_format


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
