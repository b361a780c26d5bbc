"""Weight formats a linear layer (or the embedding) can be stored in, and what each needs.

One registry serves validation (row-length alignment), cost (bits per weight), the exporters
(which runtime holds which format) and quantization simulation (see ``subnet.quant``).
"""

from __future__ import annotations

from dataclasses import dataclass

LLAMA_CPP = "llama.cpp"
ONNXRUNTIME = "onnxruntime"
TENSORRT = "tensorrt"


@dataclass(frozen=True)
class WeightFormat:
    """A storage format for a 2-D weight, quantized along its rows (the input dimension)."""

    name: str
    bits: float  # storage bits per weight, scales and offsets included
    block: int  # the row length (input features) must be a multiple of this
    runtimes: tuple[str, ...]
    ggml_type: str | None = None  # gguf.GGMLQuantizationType member name, for GGUF formats
    fallback: str | None = None  # what llama.cpp substitutes when the row length does not fit
    note: str = ""
    same_as: str | None = None  # another runtime's format whose weights this one stores exactly
    nbits: int | None = None  # ONNX Runtime MatMulNBits code width, for its block formats
    symmetric: bool = False  # MatMulNBits without zero points (asymmetric RTN otherwise)
    f16_scales: bool = False  # MatMulNBits block scales rounded to and stored in float16 (cast to f32 at load)

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    def fits(self, row_length: int) -> bool:
        return row_length % self.block == 0


def _f(name, bits, block, runtimes, ggml=None, fallback=None, note="", same_as=None, nbits=None, symmetric=False,
       f16_scales=False):
    return WeightFormat(name, bits, block, tuple(runtimes), ggml, fallback, note, same_as, nbits, symmetric, f16_scales)


_ALL = (LLAMA_CPP, ONNXRUNTIME, TENSORRT)
FORMATS: dict[str, WeightFormat] = {
    f.name: f
    for f in [
        _f("f32", 32, 1, (LLAMA_CPP, ONNXRUNTIME), "F32"),
        _f("f16", 16, 1, _ALL, "F16"),
        _f("bf16", 16, 1, (LLAMA_CPP,), "BF16"),
        # GGML block formats (block sizes and byte layouts from ggml-common.h)
        _f("q8_0", 8.5, 32, (LLAMA_CPP,), "Q8_0"),
        _f("q6_k", 6.5625, 256, (LLAMA_CPP,), "Q6_K", fallback="q8_0"),
        _f("q5_k", 5.5, 256, (LLAMA_CPP,), "Q5_K", fallback="q5_1"),
        _f("q5_1", 6.0, 32, (LLAMA_CPP,), "Q5_1"),
        _f("q5_0", 5.5, 32, (LLAMA_CPP,), "Q5_0"),
        _f("q4_k", 4.5, 256, (LLAMA_CPP,), "Q4_K", fallback="q5_0"),
        _f("q4_1", 5.0, 32, (LLAMA_CPP,), "Q4_1"),
        _f("q4_0", 4.5, 32, (LLAMA_CPP,), "Q4_0"),
        _f("iq4_nl", 4.5, 32, (LLAMA_CPP,), "IQ4_NL", note="non-linear 4-bit grid, 32-wide blocks"),
        _f("q3_k", 3.4375, 256, (LLAMA_CPP,), "Q3_K", fallback="q4_0"),
        _f("q2_k", 2.625, 256, (LLAMA_CPP,), "Q2_K", fallback="q4_0"),
        # ONNX Runtime / TensorRT weight formats
        _f("int8", 8.0, 1, (ONNXRUNTIME, TENSORRT), note="symmetric int8 per output channel"),
        _f("int8_b32", 9.25, 32, (ONNXRUNTIME,), nbits=8,
           note="MatMulNBits 8-bit, block 32, fp32 scale + 8-bit zero point"),
        _f("int4_b32", 5.125, 32, (ONNXRUNTIME,), nbits=4,
           note="MatMulNBits 4-bit, block 32, fp32 scale + 4-bit zero point"),
        _f("int8s_b32", 8.5, 32, (ONNXRUNTIME,), same_as="q8_0", nbits=8, symmetric=True, f16_scales=True,
           note="MatMulNBits 8-bit symmetric, block 32, f16 scales (cast to f32 at load): q8_0's weights exactly"),
        _f("int4s_b32", 4.5, 32, (ONNXRUNTIME,), same_as="q4_0", nbits=4, symmetric=True, f16_scales=True,
           note="MatMulNBits 4-bit symmetric, block 32, f16 scales (cast to f32 at load): q4_0's weights exactly"),
        _f("int4_b64", 4.3125, 64, (ONNXRUNTIME,), nbits=4, f16_scales=True,
           note="MatMulNBits 4-bit, block 64, f16 scale (cast to f32 at load) + 4-bit zero point"),
        _f("int4_b128", 4.28125, 128, (ONNXRUNTIME, TENSORRT), nbits=4, note="4-bit, block 128, scale + zero point"),
    ]
}

NBITS_FORMATS = tuple(n for n, f in FORMATS.items() if f.nbits)  # ONNX Runtime's MatMulNBits block formats


def get_format(name: str) -> WeightFormat:
    """Look a format up by name; unknown names fail with the list of known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown weight format {name!r}; known formats: {', '.join(FORMATS)}") from None


def formats_for(runtime: str) -> list[str]:
    """Names of the formats a runtime can hold."""
    return [f.name for f in FORMATS.values() if runtime in f.runtimes]


def effective_format(name: str, row_length: int) -> str:
    """The format llama.cpp really writes for a row of this length (K-quants fall back)."""
    fmt = get_format(name)
    seen = set()
    while not fmt.fits(row_length) and fmt.fallback and fmt.name not in seen:
        seen.add(fmt.name)
        fmt = get_format(fmt.fallback)
    if not fmt.fits(row_length):
        raise ValueError(f"format {name!r} cannot hold rows of length {row_length} (needs a multiple of {fmt.block})")
    return fmt.name


def same_weights(a: str, b: str) -> bool:
    """True when formats ``a`` and ``b`` store a weight exactly alike: the same format, or twins (``same_as``)."""
    return a == b or get_format(a).same_as == b or get_format(b).same_as == a


def closest_format(name: str, allowed: list[str], row_lengths=()) -> str:
    """The format in ``allowed`` that stores ``name``'s weights exactly, else the one nearest in bits
    per weight (ties: the wider one), that holds every row length given; used to carry a spec from one
    runtime's formats to another's."""
    if name in allowed and all(get_format(name).fits(r) for r in row_lengths):
        return name
    fmt = get_format(name)
    ok = [a for a in allowed if all(get_format(a).fits(r) for r in row_lengths)]
    if not ok:
        raise ValueError(f"none of the formats {allowed} holds rows of length {sorted(set(row_lengths))}")
    twins = [a for a in ok if same_weights(a, name)]
    if twins:
        return twins[0]
    bits = fmt.bits
    return min(ok, key=lambda a: (abs(get_format(a).bits - bits), -get_format(a).bits))
