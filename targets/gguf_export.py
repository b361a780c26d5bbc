"""GGUF export: an extracted sub-network, its tokenizer and its per-tensor weight formats → one .gguf file.

Written with the ``gguf`` package's ``GGUFWriter`` (no converter script). Uniform sub-networks use the
``llama`` architecture (``qwen2`` for Qwen2); heterogeneous ones use ``deci``, which reads per-layer
head counts and FFN widths. Each weight is quantized by ggml itself (``subnet.quant.ggml_quantize``)
in the format the spec names, except a kept-scale weight (iq4_nl, q4_0) that quantization-aware recovery
trained at kept block scales: it is written at those (``subnet.quant.encode_to_scales``). A K-quant
on a row it cannot hold gets llama.cpp's own fallback (``subnet.formats.effective_format``), and every
substitution is recorded.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from subnet.arch import LINEARS
from subnet.formats import LLAMA_CPP, effective_format, formats_for, get_format
from subnet.quant import KEPT_SCALE_FORMATS, encode_to_scales, ggml_qtype, ggml_quantize
from subnet.spec import SubnetSpec
from targets.backend import Artifact, ExportError, model_name

RUNTIME = "llama.cpp"

# HF linear / norm names inside a decoder layer -> GGUF tensor names (llama.cpp's LLM_TENSOR_*)
GGUF_LINEAR = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
HF_MODULE = {name: ("self_attn" if name in LINEARS[:4] else "mlp") for name in LINEARS}
GGUF_NORM = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}

# general.file_type from the format that holds most weights
FILE_TYPE = {
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0",
    "q6_k": "MOSTLY_Q6_K",
    "q5_k": "MOSTLY_Q5_K_M",
    "q5_1": "MOSTLY_Q5_1",
    "q5_0": "MOSTLY_Q5_0",
    "q4_k": "MOSTLY_Q4_K_M",
    "q4_1": "MOSTLY_Q4_1",
    "q4_0": "MOSTLY_Q4_0",
    "iq4_nl": "MOSTLY_IQ4_NL",
    "q3_k": "MOSTLY_Q3_K_M",
    "q2_k": "MOSTLY_Q2_K",
}

# llama.cpp pre-tokenizer names, for tokenizers recognised by their vocabulary (sha256 of the tokens,
# newline-joined) -- the same idea as llama.cpp's convert_hf_to_gguf "chkhsh" table
KNOWN_VOCABS = {
    # SmolLM / SmolLM2 (digits split one by one, then GPT-2 byte-level regex)
    "d1f2ce856b324081b621d9e2e8dbd22879f462329f3fd4aa39fa758dddb2ce55": "smollm",
}


class GGUFExportError(ExportError, ValueError):
    """A model, tokenizer or spec that cannot be written as GGUF, with the reason and the fix."""


# ---- tokenizer --------------------------------------------------------------------------------
@dataclass
class GGUFVocab:
    """A tokenizer as llama.cpp's ``tokenizer.ggml.*`` metadata holds it."""

    model: str  # "gpt2" = byte-level BPE
    pre: str  # llama.cpp pre-tokenizer name
    tokens: list[str]
    token_types: list[int]  # gguf.TokenType values
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None

    def add_to(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        writer.add_token_merges(self.merges)
        for kind, tid in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(tid)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        writer.add_add_space_prefix(False)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a tokenizer.json pre-tokenizer that it implements, else None."""

    def byte_level(p):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) and not p.get("add_prefix_space", False)

    if pre is None:
        return None
    if byte_level(pre):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if (
            len(parts) == 2
            and parts[0].get("type") == "Digits"
            and parts[0].get("individual_digits")
            and byte_level(parts[1])
        ):
            return "smollm"
    return None


def gguf_vocab(tokenizer, vocab_size: int) -> GGUFVocab:
    """Convert a byte-level BPE (GPT-2 style) fast tokenizer to GGUF metadata, or fail saying why."""
    from gguf import TokenType

    name = type(tokenizer).__name__
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError(
            f"tokenizer {name} has no fast (tokenizers) backend: GGUF export converts byte-level BPE tokenizers; "
            "load the model's tokenizer.json (fast tokenizer) instead"
        )
    tj = json.loads(backend.to_str())
    bpe = tj.get("model", {})
    if bpe.get("type") != "BPE" or bpe.get("byte_fallback") or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise GGUFExportError(
            f"tokenizer {name} is not a byte-level BPE (GPT-2 style) tokenizer (model {bpe.get('type')}, "
            f"decoder {(tj.get('decoder') or {}).get('type')}): GGUF export supports only those so far"
        )
    n = len(tokenizer)
    if n > vocab_size:
        raise GGUFExportError(f"tokenizer has {n} tokens but the model's embedding only {vocab_size} rows")
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    if any(t is None for t in tokens):
        raise GGUFExportError("tokenizer ids are not contiguous (some id below len(tokenizer) has no token)")
    added = tokenizer.added_tokens_decoder
    types = [
        (TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED) if i in added else TokenType.NORMAL
        for i in range(n)
    ]
    for i in range(n, vocab_size):  # embedding rows beyond the tokenizer (padded vocabularies)
        tokens.append(f"[PAD{i}]")
        types.append(TokenType.UNUSED)
    digest = hashlib.sha256("\n".join(tokens).encode()).hexdigest()
    pre = KNOWN_VOCABS.get(digest) or _pre_tokenizer_name(tj.get("pre_tokenizer"))
    if pre is None:
        raise GGUFExportError(
            f"tokenizer {name}: pre-tokenizer {json.dumps(tj.get('pre_tokenizer'))[:120]} has no known llama.cpp "
            "equivalent; add its llama.cpp name to targets.gguf_export.KNOWN_VOCABS"
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    special = {
        kind: tid
        for kind in ("bos", "eos", "unk", "pad")
        if isinstance(tid := getattr(tokenizer, f"{kind}_token_id", None), int)
    }
    with_special = tokenizer.encode("a")
    plain = tokenizer.encode("a", add_special_tokens=False)
    add_bos = "bos" in special and len(with_special) > len(plain) and with_special[0] == special["bos"]
    add_eos = "eos" in special and len(with_special) > len(plain) and with_special[-1] == special["eos"]
    template = getattr(tokenizer, "chat_template", None)
    return GGUFVocab(
        model="gpt2",
        pre=pre,
        tokens=tokens,
        token_types=[int(t) for t in types],
        merges=merges,
        special_ids=special,
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=template if isinstance(template, str) else None,
    )


# ---- formats ----------------------------------------------------------------------------------
def effective_spec(spec: SubnetSpec) -> tuple[SubnetSpec, list[dict]]:
    """The spec with every format replaced by what llama.cpp can really store, and the substitutions.

    K-quants need rows that are a multiple of 256; where a row is shorter they fall back the way
    llama.cpp's quantizer does (Q4_K→Q5_0, Q5_K→Q5_1, Q6_K→Q8_0, Q2_K/Q3_K→Q4_0).
    """
    eff = copy.deepcopy(spec)
    fallbacks: list[dict] = []

    def sub(fmt: str, row: int, tensor: str) -> str:
        if get_format(fmt).ggml_type is None:
            raise GGUFExportError(
                f"{tensor}: {fmt} is not a format llama.cpp stores; GGUF formats: {', '.join(formats_for(LLAMA_CPP))}"
            )
        try:
            new = effective_format(fmt, row)
        except ValueError as e:
            raise GGUFExportError(f"{tensor}: {e}") from None
        if new != fmt:
            fallbacks.append({"tensor": tensor, "requested": fmt, "written": new, "row_length": row})
        return new

    eff.embed_format = sub(spec.embed_format, spec.hidden_size, "token_embd.weight")
    if spec.base.tie_word_embeddings:
        eff.lm_head_format = eff.embed_format
    else:
        eff.lm_head_format = sub(spec.lm_head_format, spec.hidden_size, "output.weight")
    for i, (ly, new_ly) in enumerate(zip(spec.layers, eff.layers)):
        for name, (_, row) in spec.linear_shapes(ly).items():
            new_ly.formats[name] = sub(ly.formats[name], row, f"blk.{i}.{GGUF_LINEAR[name]}.weight")
    return eff, fallbacks


def gguf_arch(spec: SubnetSpec) -> str:
    """The llama.cpp architecture a sub-network is written as.

    Uniform: ``llama`` (Llama, Mistral) or ``qwen2``. Heterogeneous: ``deci``, which reads per-layer
    head counts and FFN widths and takes optional q/k/v biases (so heterogeneous Qwen2 works too,
    with the rotary permute applied to the biases; checked against torch to 2e-7).
    """
    if spec.is_uniform:
        return "qwen2" if spec.base.family == "qwen2" else "llama"
    return "deci"


def _rope_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half q/k rows → llama.cpp's interleaved rotary layout (per head; weights or biases)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_permuted(t, n_heads: int):
    """``_rope_permute`` of a torch tensor (None stays None)."""
    return None if t is None else torch_from(_rope_permute(t.float().numpy(), n_heads))


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type not in ("default", None):
        raise GGUFExportError(
            f"rope type {rope_type!r} (rope scaling) is not supported by the GGUF exporter yet; "
            "export a model with plain RoPE"
        )
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise GGUFExportError("the model config has no rope_theta")
    return float(theta)


# ---- writing ----------------------------------------------------------------------------------
@contextmanager
def atomic_file(final: str | os.PathLike, force: bool = False):
    """Yield a temp file path next to ``final``; on success it is renamed to ``final``.

    An existing ``final`` is refused unless ``force``; on error the temp file is removed.
    """
    final = Path(final)
    if final.exists() and not force:
        raise GGUFExportError(f"{final} already exists: choose another output path or pass --force")
    if final.is_dir():
        raise GGUFExportError(f"{final} is a directory: give a .gguf file path")
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _tensor_bytes(weight, fmt: str, scales=None):
    """(array, raw_dtype) for GGUFWriter.add_tensor: float32 as is, other formats as raw ggml bytes
    (at the given block ``scales`` of a kept-scale format, else at ggml's own)."""
    if scales is not None:
        return encode_to_scales(weight.detach().float().cpu(), scales, fmt), ggml_qtype(fmt)
    w = np.ascontiguousarray(weight.detach().float().cpu().numpy())
    if fmt == "f32":
        return w, None
    return ggml_quantize(w, fmt), ggml_qtype(fmt)


def _check_model(model, spec: SubnetSpec) -> None:
    cfg = model.config
    if cfg.num_hidden_layers != len(spec.layers) or cfg.hidden_size != spec.hidden_size:
        raise GGUFExportError(
            f"the model ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}) is not the spec's sub-network "
            f"({len(spec.layers)} layers, hidden {spec.hidden_size}): pass subnet.extract.extract(base, spec)"
        )
    for i, (layer, ly) in enumerate(zip(model.model.layers, spec.layers)):
        for name, (rows, cols) in spec.linear_shapes(ly).items():
            w = getattr(getattr(layer, HF_MODULE[name]), name).weight
            if tuple(w.shape) != (rows, cols):
                raise GGUFExportError(
                    f"layer {i} {name} is {tuple(w.shape)} but the spec says {(rows, cols)}: "
                    "pass subnet.extract.extract(base, spec)"
                )


def write_gguf(
    model, tokenizer, spec: SubnetSpec, out_path: str | os.PathLike, force: bool = False, block_scales=None,
) -> Artifact:
    """Write an extracted sub-network (``subnet.extract.extract(base, spec)``) as a GGUF file.

    ``spec.layers[i]`` describes ``model.model.layers[i]``. Weights are stored in the spec's formats
    (K-quant fallbacks recorded in ``meta["fallbacks"]`` and the ``packager.fallbacks`` key), norms and
    biases in F32; the tokenizer and chat template are carried. ``block_scales`` (module name -> scales,
    from ``search.recovery``'s result) are the scales a kept-scale weight is written at; the count
    written so is ``meta["kept_scales"]``. The file appears only when complete.
    """
    import gguf

    t0 = time.perf_counter()
    _check_model(model, spec)
    arch = gguf_arch(spec)
    eff, fallbacks = effective_spec(spec)
    cfg = model.config
    vocab = gguf_vocab(tokenizer, cfg.vocab_size)
    theta = _rope_theta(cfg)
    hd = spec.base.head_dim
    permute = arch in ("llama", "deci")  # NORM rope: llama.cpp rotates interleaved pairs
    state = model.state_dict()
    tied = spec.base.tie_word_embeddings

    weights: dict[str, int] = {}  # format -> number of weights, for general.file_type
    tensors = []  # (name, array, raw_dtype)

    scales = block_scales or {}
    kept = []  # tensors written at kept block scales

    def add(name, tensor, fmt, scale=None):
        scale = scale if fmt in KEPT_SCALE_FORMATS else None  # other formats have no scales to keep
        arr, qtype = _tensor_bytes(tensor, fmt, scale)
        tensors.append((name, arr, qtype))
        weights[fmt] = weights.get(fmt, 0) + tensor.numel()
        if scale is not None:
            kept.append(name)

    add("token_embd.weight", state["model.embed_tokens.weight"], eff.embed_format)
    add("output_norm.weight", state["model.norm.weight"], "f32")
    if not tied:
        add("output.weight", state["lm_head.weight"], eff.lm_head_format)
    for i, ly in enumerate(eff.layers):
        p = f"model.layers.{i}."
        heads = {"q_proj": ly.heads, "k_proj": ly.kv_heads}
        for name in LINEARS:
            key = f"{p}{HF_MODULE[name]}.{name}"
            w, b, s = state[key + ".weight"], state.get(key + ".bias"), scales.get(key)
            if permute and name in heads:  # rows move, each with its block scales
                w, b, s = (_rope_permuted(t, heads[name]) for t in (w, b, s))
            add(f"blk.{i}.{GGUF_LINEAR[name]}.weight", w, ly.formats[name], s)
            if b is not None:
                add(f"blk.{i}.{GGUF_LINEAR[name]}.bias", b, "f32")
        for hf, gg in GGUF_NORM.items():
            add(f"blk.{i}.{gg}.weight", state[f"{p}{hf}.weight"], "f32")

    main_fmt = max(weights, key=weights.get)
    file_type = gguf.LlamaFileType[FILE_TYPE.get(main_fmt, "GUESSED")]
    layers = eff.layers
    with atomic_file(out_path, force=force) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(model_name(cfg, spec.base.family))
        w.add_block_count(len(layers))
        w.add_context_length(int(cfg.max_position_embeddings))
        w.add_embedding_length(spec.hidden_size)
        if arch == "deci":
            w.add_feed_forward_length([ly.mlp for ly in layers])
            w.add_head_count([ly.heads for ly in layers])
            w.add_head_count_kv([ly.kv_heads for ly in layers])
            w.add_vocab_size(cfg.vocab_size)
        else:
            w.add_feed_forward_length(layers[0].mlp)
            w.add_head_count(layers[0].heads)
            w.add_head_count_kv(layers[0].kv_heads)
            w.add_vocab_size(cfg.vocab_size)
        w.add_key_length(hd)
        w.add_value_length(hd)
        w.add_rope_dimension_count(hd)
        w.add_rope_freq_base(theta)
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_file_type(int(file_type))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.add_to(w)
        w.add_string("packager.spec", spec.to_json(indent=None))
        w.add_string("packager.fallbacks", json.dumps(fallbacks))
        for name, arr, qtype in tensors:
            w.add_tensor(name, arr, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    out = Path(out_path)
    counts: dict[str, int] = {}
    for _, arr, qtype in tensors:
        kind = qtype.name if qtype is not None else "F32"
        counts[kind] = counts.get(kind, 0) + 1
    meta = {
        "arch": arch,
        "file_type": file_type.name,
        "fallbacks": fallbacks,
        "kept_scales": len(kept),
        "tensor_types": counts,
        "spec": spec.to_dict(),
        "effective_spec": eff.to_dict(),
        "tokenizer_pre": vocab.pre,
        "bytes": out.stat().st_size,
        "export_s": round(time.perf_counter() - t0, 3),
        "gguf_version": _version("gguf"),
    }
    return Artifact(runtime=RUNTIME, path=str(out), files=[str(out)], meta=meta)


def torch_from(arr: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(arr))


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "unknown"
