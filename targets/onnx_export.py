"""Export an extracted sub-network to ONNX with a KV cache, then store each linear in its spec format.

One graph serves prefill and decode: inputs ``input_ids``, ``attention_mask`` (past + new tokens),
``position_ids`` (not in the fused ONNX Runtime graph, whose GroupQueryAttention takes positions from
the mask: see ``write_onnx``) and ``past_key_values.{i}.key/value`` (past length may be 0), outputs
``logits`` and ``present.{i}.key/value``. Batch, sequence and past length are dynamic; KV head counts
are per layer. Weight formats are applied with ONNX Runtime's own quantizers on the graph:

* ``f32``: nothing; ``f16``: the weight is stored in float16 and cast to float32 in front of its
  MatMul (CPU EP has no fp16 MatMul, so this halves storage, not compute);
* ``int8``: ``quantize_dynamic(per_channel=True)`` (MatMulInteger, int8 weights per output channel,
  activations quantized dynamically at run time);
* ``int8_b32`` / ``int4_b32`` / ``int4_b128``: ``MatMulNBitsQuantizer(accuracy_level=4)``;
* ``int4_b64``: the same asymmetric MatMulNBits, written here from ``subnet.quant.ort_block_codes`` with
  each block's scale rounded to float16 first, so the scales can be stored in float16 (see below);
* ``int8s_b32`` / ``int4s_b32``, the exact twins of GGUF q8_0 / q4_0: symmetric MatMulNBits
  (accuracy_level 4) written here from ggml's own codes and f16 scales (``subnet.quant.block_codes``),
  so a model recovered for q8_0 / q4_0 keeps its weights bit for bit. The scales of the formats with
  ``f16_scales`` are stored in float16 (as GGUF stores them) behind a Cast that ONNX Runtime folds at
  load time (``scales_to_f16``).

MatMul nodes are tied to spec layers through the exporter's node metadata
``pkg.torch.onnx.name_scopes``. The embedding is f32, f16, or a twin format: then its Gather becomes
``GatherBlockQuantized`` and a tied lm_head (``MatMul(x, Transpose(embed))``) a ``MatMulNBits`` over
the same stored codes, so the table is stored once, quantized. What every node really got is
recorded in ``meta["applied"]``.
"""

from __future__ import annotations

import ast
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from subnet.arch import LINEARS, linear_module_name
from subnet.formats import NBITS_FORMATS, ONNXRUNTIME, get_format
from subnet.spec import SubnetSpec
from targets.backend import Artifact, ExportError, atomic_output, model_name
from targets.onnx_artifact import EMBED_FORMATS, KV_CACHE, MODEL_FILE
from targets.onnx_attention import GQADecoder, translation_table, unsupported
from targets.onnx_fusion import fuse_projections
from targets.onnx_graph import (MS_DOMAIN, GraphIndex, attrs, cast_initializer, drop_stack_traces, drop_value_info,
                                 initializers, prepend, set_nodes, use_ms_domain)  # fmt: skip

NBITS = {  # bits, block, symmetric (asymmetric RTN unless symmetric, as subnet.quant simulates)
    n: (get_format(n).nbits, get_format(n).block, get_format(n).symmetric) for n in NBITS_FORMATS
}
_QUANT_SUFFIX = re.compile(r"_(quant|Q\d+)$")  # names ORT's quantizers give the node that replaces a MatMul
_SCOPE = re.compile(r"(?:^|\.)model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)$")


class FormatNotSupported(ExportError, ValueError):
    """A weight format this runtime cannot hold."""


def input_names(n_layers: int, positions: bool = True) -> list[str]:
    """The graph's inputs; a GroupQueryAttention graph has no position_ids (``positions=False``)."""
    kv = [f"past_key_values.{i}.{t}" for i in range(n_layers) for t in ("key", "value")]
    return ["input_ids", "attention_mask", *(["position_ids"] if positions else []), *kv]


def output_names(n_layers: int) -> list[str]:
    return ["logits", *[f"present.{i}.{t}" for i in range(n_layers) for t in ("key", "value")]]


def check_formats(spec: SubnetSpec, runtime: str = ONNXRUNTIME, embed_formats=EMBED_FORMATS, also=()) -> None:
    """Raise FormatNotSupported naming the first format ``runtime`` cannot hold (and who holds it).

    ``also``: formats accepted beyond the registry's list for ``runtime``.
    """
    wanted = [(f"layer {ly.index} {name}", fmt) for ly in spec.layers for name, fmt in ly.formats.items()]
    wanted += [("embedding", spec.embed_format), ("lm_head", spec.lm_head_format)]
    for where, name in wanted:
        fmt = get_format(name)
        if runtime not in fmt.runtimes and name not in also:
            raise FormatNotSupported(
                f"{where}: weight format {name!r} cannot be stored for {runtime} (only {', '.join(fmt.runtimes)} "
                f"holds it); pick one of the {runtime} formats for this export"
            )
    embed = {("embedding", spec.embed_format)}
    if spec.base.tie_word_embeddings:
        embed.add(("tied lm_head", spec.lm_head_format))
    for where, name in sorted(embed):
        if name not in embed_formats:
            raise FormatNotSupported(
                f"{where}: format {name!r} is not supported by the {runtime} export (the embedding table "
                f"stays {' or '.join(embed_formats)}); set embed_format/lm_head_format to one of those"
            )


class KVCacheWrapper(torch.nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present) for export."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        cache = DynamicCache(ddp_cache_data=pairs, config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def kv_shapes(model) -> list[tuple[int, int]]:
    """(KV heads, head_dim) of every layer of an extracted model."""
    shapes = []
    for layer in model.model.layers:
        att = layer.self_attn
        hd = att.head_dim
        shapes.append((att.k_proj.out_features // hd, hd))
    return shapes


def sample_inputs(model, batch=2, seq=3, past=2, positions: bool = True):
    """Example inputs for tracing: past length >= 1 so that the past axis is traced as dynamic."""
    dtype = next(model.parameters()).dtype
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).unsqueeze(0).expand(batch, seq).contiguous()
    kv = []
    for heads, hd in kv_shapes(model):
        kv += [torch.zeros(batch, heads, past, hd, dtype=dtype), torch.zeros(batch, heads, past, hd, dtype=dtype)]
    return (ids, mask, *([pos] if positions else []), *kv)


def dynamic_shapes(n_layers: int, positions: bool = True) -> dict:
    from torch.export import Dim

    batch, seq, past = Dim("batch"), Dim("sequence"), Dim("past_sequence")
    shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: Dim.DYNAMIC},  # past + sequence (a derived dim raises)
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past} for _ in range(2 * n_layers)),
    }
    if not positions:
        del shapes["position_ids"]
    return shapes


ATTENTION = ("eager", "gqa")  # the modules' own attention ops / one GroupQueryAttention per layer (ORT only)


def torch_export(model, path: Path, optimize: bool = False, attention: str = "eager") -> None:
    """Trace ``model`` with its KV cache and save the float graph with external data at ``path``.

    ``attention="gqa"``: each layer's attention is ORT's GroupQueryAttention (``targets.onnx_attention``)."""
    if attention not in ATTENTION:
        raise ExportError(f"unknown attention export {attention!r}; choose one of {', '.join(ATTENTION)}")
    n = len(model.model.layers)
    gqa = attention == "gqa"
    wrapper = (GQADecoder(model) if gqa else KVCacheWrapper(model)).eval()
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            sample_inputs(model, positions=not gqa),
            dynamo=True,
            dynamic_shapes=dynamic_shapes(n, positions=not gqa),
            input_names=input_names(n, positions=not gqa),
            output_names=output_names(n),
            optimize=optimize,
            custom_translation_table=translation_table() if gqa else None,
            verbose=False,
        )
    program.save(str(path), external_data=True)


# ---- graph passes ---------------------------------------------------------------------------
def fold_weight_transposes(model: onnx.ModelProto) -> int:
    """Replace Transpose(initializer) feeding only MatMuls by a transposed initializer (what quantizers need).

    A weight that is also read elsewhere (the tied embedding, gathered by the embedding lookup) is left alone.
    """
    index = GraphIndex(model)
    g, inits = model.graph, index.inits
    stale, keep = set(), []
    for node in g.node:
        src = node.input[0] if node.op_type == "Transpose" else None
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        outs = index.consumers.get(node.output[0], []) if src else []
        if (
            src in inits
            and index.readers(src) == 1
            and perm == [1, 0]
            and len(inits[src].dims) == 2
            and outs
            and all(c.op_type == "MatMul" and c.input[1] == node.output[0] for c in outs)
        ):
            arr = numpy_helper.to_array(inits[src]).T.copy()
            inits[src].CopyFrom(numpy_helper.from_array(arr, src))
            for c in outs:
                c.input[1] = src
            stale.update((src, node.output[0]))
            continue
        keep.append(node)
    set_nodes(g, keep)
    drop_value_info(g, stale)  # shapes recorded before the fold
    return len(stale) // 2


def name_dims(model: onnx.ModelProto) -> None:
    """Give the mask's and the presents' length axis one readable name."""
    for v in list(model.graph.input) + list(model.graph.output):
        dims = v.type.tensor_type.shape.dim
        if v.name == "attention_mask":
            dims[1].dim_param = "total_sequence"
        elif v.name.startswith("present."):
            dims[2].dim_param = "total_sequence"


def linear_nodes(model: onnx.ModelProto) -> dict[str, str]:
    """MatMul node name -> ``layers.{i}.{linear}`` or ``lm_head``, from the exporter's name scopes."""
    found = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = meta.get("pkg.torch.onnx.name_scopes")
        if not scopes:
            continue
        scopes = ast.literal_eval(scopes)
        for scope in reversed(scopes):
            m = _SCOPE.search(scope)
            if m and m.group(2) in LINEARS:
                found[node.name] = f"layers.{m.group(1)}.{m.group(2)}"
                break
            if scope.endswith("lm_head"):
                found[node.name] = "lm_head"
                break
    return found


def linear_io(model: onnx.ModelProto, nodes: dict[str, str]) -> dict[str, list[str]]:
    """``layers.{i}.{linear}`` / ``lm_head`` -> [input, output] tensor names of its MatMul.

    ORT's quantizers keep both names (the input feeds the activation quantizer or MatMulNBits, the
    output comes from the node chain that replaces the MatMul), so they name the linear afterwards too.
    """
    return {nodes[n.name]: [n.input[0], n.output[0]] for n in model.graph.node if n.name in nodes}


def wanted_formats(spec: SubnetSpec, nodes: dict[str, str]) -> dict[str, str]:
    """MatMul node name -> the format the spec asks for it."""
    out = {}
    for node, key in nodes.items():
        if key == "lm_head":
            out[node] = spec.lm_head_format
        else:
            _, i, linear = key.split(".")
            out[node] = spec.layers[int(i)].formats[linear]
    return out


def weights_to_f16(model: onnx.ModelProto, node_names: set[str]) -> list[str]:
    """Store the MatMul weights of these nodes (or the embedding) in float16 behind a Cast to float32."""
    g = model.graph
    inits = initializers(g)
    done, new_nodes = [], []
    for node in g.node:
        if node.name in node_names and node.input[1] in inits:
            cast_initializer(inits[node.input[1]], new_nodes, f"{node.name}_weight_f16")
            done.append(node.name)
    prepend(g, new_nodes)
    return done


def _embedding_gather(graph: onnx.GraphProto, inits: dict):
    """The Gather that looks token ids up in the embedding table (a 2-D initializer), or None."""
    return next((n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
                 and len(inits[n.input[0]].dims) == 2), None)  # fmt: skip


def retie_head(model: onnx.ModelProto, head: str) -> bool:
    """Undo what the exporter's optimizer does to a tied lm_head: it folds ``Transpose(embedding)`` into a
    transposed copy of the table. Put the Transpose back, so the table is stored once. True if it did."""
    g = model.graph
    inits = initializers(g)
    node, gather = next(n for n in g.node if n.name == head), _embedding_gather(g, inits)
    copy = inits.get(node.input[1])
    if copy is None or gather is None:
        return False
    table = numpy_helper.to_array(inits[gather.input[0]])
    if list(copy.dims) != [table.shape[1], table.shape[0]] or not np.array_equal(numpy_helper.to_array(copy), table.T):
        return False
    g.initializer.remove(copy)
    prepend(g, [helper.make_node("Transpose", [gather.input[0]], [node.input[1]], perm=[1, 0], name=head + "_tied")])
    return True


def embedding_to_f16(model: onnx.ModelProto) -> str | None:
    """Store the embedding table in float16 (one Cast in front of its Gather and a tied lm_head)."""
    g = model.graph
    inits = initializers(g)
    gather = _embedding_gather(g, inits)
    if gather is None:
        return None
    new = []
    cast_initializer(inits[gather.input[0]], new, "embed_tokens_f16")
    prepend(g, new)
    return gather.input[0]


def scales_to_f16(model: onnx.ModelProto) -> int:
    """Store the block scales of MatMulNBits / GatherBlockQuantized nodes that float16 holds exactly (the
    formats with ``f16_scales``: the twins' are ggml's f16 values) in float16 behind a Cast to float32, as
    GGUF stores them: 2 bytes less per block on disk. ONNX Runtime folds the Cast when it loads the graph,
    so the kernels get the same float32 scales. Other scales (ORT's own quantizer's) stay float32.
    Returns how many tensors."""
    g = model.graph
    inits = initializers(g)
    names = {n.input[2] for n in g.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized") and len(n.input) > 2}
    new_nodes = []
    for name in sorted(names & set(inits)):
        arr = numpy_helper.to_array(inits[name])
        if arr.dtype == np.float32 and np.array_equal(arr.astype(np.float16).astype(np.float32), arr):
            cast_initializer(inits[name], new_nodes, name + "_f16")
    prepend(g, new_nodes)
    return len(new_nodes)


def save(model: onnx.ModelProto, path: Path) -> None:
    """Save with all weights in one external data file (safe past protobuf's 2 GB limit)."""
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name, size_threshold=1024
    )


def quantize_int8(path: Path, nodes: list[str]) -> None:
    """int8 weights per output channel for exactly ``nodes`` (ONNX Runtime dynamic quantization)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_name("int8." + path.name)
    quantize_dynamic(
        path,
        tmp,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        weight_type=QuantType.QInt8,
        nodes_to_quantize=list(nodes),
        use_external_data_format=True,
    )
    model = onnx.load(str(tmp))
    tmp.unlink()
    tmp.with_name(tmp.name + ".data").unlink(missing_ok=True)
    for extra in tmp.parent.glob("int8.*"):
        extra.unlink()
    save(model, path)


def quantize_nbits(path: Path, fmt: str, nodes: list[str], kept: dict | None = None) -> None:
    """MatMulNBits (block-wise, accuracy_level 4) for exactly ``nodes``; every other node excluded.

    The asymmetric formats go through ORT's own quantizer (``MatMulNBitsQuantizer``), except those with
    float16 scales (``asym_blocks``); the twins of GGUF formats get ggml's codes and scales
    (``twin_blocks``), at ``kept`` block scales where given (node name -> scales)."""
    model = onnx.load(str(path))
    if get_format(fmt).f16_scales:
        codes_to_nbits(model, fmt, set(nodes), kept)
        save(model, path)
        return
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    bits, block, symmetric = NBITS[fmt]
    others = [n.name for n in model.graph.node if n.name not in set(nodes)]  # nodes_to_include does not restrict
    quant = MatMulNBitsQuantizer(
        model, bits=bits, block_size=block, is_symmetric=symmetric, accuracy_level=4, nodes_to_exclude=others
    )
    quant.process()
    save(quant.model.model, path)


def twin_blocks(weight: np.ndarray, fmt: str, scales=None) -> tuple[np.ndarray, np.ndarray]:
    """``weight`` [rows, n] in a twin format as ONNX Runtime's block ops store it: codes plus the implicit
    zero point 2^(bits-1), packed two to a byte low nibble first at 4 bits ([rows, n * bits / 8] uint8),
    and the scales [rows, n / block] (float32 holding ggml's f16 values). ``scales``: a kept-scale
    format's block scales (recovery's) to code at instead of the weight's own."""
    from subnet.quant import block_codes

    bits = get_format(fmt).nbits
    codes, scales = block_codes(torch.from_numpy(np.array(weight, dtype=np.float32)), fmt, scales)
    return _pack((codes + (1 << (bits - 1))).numpy(), bits), scales.numpy()


def asym_blocks(weight: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``weight`` [rows, n] in an asymmetric MatMulNBits format as ONNX Runtime stores it: the packed codes
    [rows, n * bits / 8], the scales [rows, n / block] (float32; float16 values for ``f16_scales``) and the
    packed zero points [rows, ceil(n / block * bits / 8)], from ``subnet.quant.ort_block_codes``."""
    from subnet.quant import ort_block_codes

    f = get_format(fmt)
    w = torch.from_numpy(np.array(weight, dtype=np.float32))
    q, zp, scale = (t.reshape(w.shape[0], -1).numpy() for t in ort_block_codes(w, f.nbits, f.block, f.f16_scales))
    return _pack(q, f.nbits), scale, _pack(zp, f.nbits)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes [rows, m] as MatMulNBits stores them: bytes, two 4-bit codes a byte, low nibble first
    (a row of odd length padded with a zero nibble)."""
    stored = codes.astype(np.uint8)
    if bits == 4:
        stored = np.pad(stored, ((0, 0), (0, stored.shape[1] % 2)))
        stored = stored[:, 0::2] | (stored[:, 1::2] << 4)
    return np.ascontiguousarray(stored)


def _matmul_nbits(node, stored: list[str], shape: tuple[int, int], fmt: str):
    """The MatMulNBits node that replaces MatMul ``node`` (weight [n_out, n_in]), reading ``stored`` (codes,
    scales and, if asymmetric, zero points), named as ORT's quantizer would."""
    bits, block, _ = NBITS[fmt]
    n, k = shape
    return helper.make_node("MatMulNBits", [node.input[0], *stored], [node.output[0]], name=f"{node.name}_Q{bits}",
                            domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=block, accuracy_level=4)  # fmt: skip


def codes_to_nbits(model: onnx.ModelProto, fmt: str, nodes: set[str], kept: dict | None = None) -> None:
    """Replace the MatMuls ``nodes`` (weight initializers [in, out]) by MatMulNBits holding the codes
    ``subnet.quant`` computes: a twin's ggml codes (``twin_blocks``), at the block scales ``kept`` gives a
    node (node name -> scales [out, in / block]) where it gives one, or asymmetric codes (``asym_blocks``)."""
    g = model.graph
    inits = initializers(g)
    keep = []
    for node in g.node:
        if node.name not in nodes:
            keep.append(node)
            continue
        init = inits[node.input[1]]
        weight = numpy_helper.to_array(init).T  # [out, in]
        if get_format(fmt).same_as:
            data, scales = twin_blocks(weight, fmt, (kept or {}).get(node.name))
            extra = {"_scales": scales.reshape(-1)}
        else:
            data, scales, zero_points = asym_blocks(weight, fmt)
            extra = {"_scales": scales, "_zero_points": zero_points}
        n, k = weight.shape
        stored = {"_Q": data.reshape(n, k // NBITS[fmt][1], -1), **extra}  # MatMulNBits' [N, blocks, blob]
        g.initializer.remove(init)
        g.initializer.extend(numpy_helper.from_array(a, init.name + suffix) for suffix, a in stored.items())
        keep.append(_matmul_nbits(node, [init.name + suffix for suffix in stored], (n, k), fmt))
    set_nodes(g, keep)
    use_ms_domain(model)


def embedding_to_blocks(model: onnx.ModelProto, fmt: str, tied_head: str | None) -> str | None:
    """Store the embedding table in twin format ``fmt``, once: its Gather becomes GatherBlockQuantized and
    the tied lm_head MatMul ``tied_head`` (``MatMul(x, Transpose(embed))``) a MatMulNBits over the same codes.
    Returns the table's name (None if the graph has no embedding Gather)."""
    g, index = model.graph, GraphIndex(model)
    gather = _embedding_gather(g, index.inits)
    if gather is None:
        return None
    name = gather.input[0]
    table = index.inits[name]
    weight = numpy_helper.to_array(table)
    vocab, width = weight.shape
    data, scales = twin_blocks(weight, fmt)
    bits, block, _ = NBITS[fmt]
    g.initializer.remove(table)
    g.initializer.extend([numpy_helper.from_array(data, name + "_Q"), numpy_helper.from_array(scales, name + "_scales"),
                          numpy_helper.from_array(np.array([vocab, width // block, -1], np.int64), name + "_Q_shape"),
                          numpy_helper.from_array(np.array([-1], np.int64), name + "_scales_shape")])  # fmt: skip
    new_nodes, dropped = [], set()
    for node in g.node:
        if node is gather:
            node = helper.make_node("GatherBlockQuantized", [name + "_Q", gather.input[1], name + "_scales"],
                                    list(gather.output), name=gather.name + "_Q", domain=MS_DOMAIN, bits=bits,
                                    block_size=block, gather_axis=0, quantize_axis=1)  # fmt: skip
        elif node.name == tied_head:
            transpose = index.producer[node.input[1]]
            if transpose.op_type != "Transpose" or transpose.input[0] != name or index.readers(node.input[1]) != 1:
                raise ExportError(f"the tied lm_head {node.name} does not read Transpose({name}); cannot share its storage")
            dropped.add(transpose.output[0])
            new_nodes += [helper.make_node("Reshape", [name + "_Q", name + "_Q_shape"], [name + "_Q3d"], name=name + "_Q3d"),
                          helper.make_node("Reshape", [name + "_scales", name + "_scales_shape"], [name + "_scales1d"],
                                           name=name + "_scales1d")]  # fmt: skip
            node = _matmul_nbits(node, [name + "_Q3d", name + "_scales1d"], (vocab, width), fmt)
        new_nodes.append(node)
    set_nodes(g, [n for n in new_nodes if n.output[0] not in dropped])
    drop_value_info(g, dropped)
    use_ms_domain(model)
    return name


def applied_formats(model: onnx.ModelProto, nodes: dict[str, str]) -> dict[str, str]:
    """``layers.{i}.{linear}``/``lm_head`` -> the format the graph really holds (read back from the graph)."""
    index = GraphIndex(model)
    inits, producers = index.inits, index.producer
    out = {}
    for node in model.graph.node:
        key = nodes.get(node.name) or nodes.get(_QUANT_SUFFIX.sub("", node.name))
        if key is None:
            continue
        if node.op_type == "MatMulNBits":
            a = attrs(node)
            symmetric = len(node.input) < 4 or not node.input[3]  # no zero points
            out[key] = next(f for f, v in NBITS.items() if v == (a["bits"], a["block_size"], symmetric))
        elif node.op_type == "MatMulInteger":
            out[key] = "int8"
        elif node.op_type == "MatMul":
            w = node.input[1]
            if w in inits:
                out[key] = "f16" if inits[w].data_type == TensorProto.FLOAT16 else "f32"
            elif w in producers and producers[w].op_type == "Cast":
                src = inits.get(producers[w].input[0])
                out[key] = "f16" if src is not None and src.data_type == TensorProto.FLOAT16 else "f32"
            elif w in producers and producers[w].op_type == "Transpose":  # the tied embedding
                src = producers[w].input[0]
                p = producers.get(src)
                out[key] = "f16" if p is not None and p.op_type == "Cast" else "f32"
    return out


def fuse_norms(path: Path) -> dict[str, int]:
    """ORT's transformer optimizer on the saved graph, norms only: each RMSNorm, with the residual Add in
    front of it, becomes one (Skip)SimplifiedLayerNormalization. Returns the fused ops' counts."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    opts = FusionOptions("gpt2")
    opts.enable_attention = opts.enable_rotary_embeddings = opts.enable_embed_layer_norm = False
    opts.enable_gelu = opts.enable_bias_gelu = opts.enable_qordered_matmul = False
    fused = optimize_model(str(path), model_type="gpt2", num_heads=0, hidden_size=0, optimization_options=opts,
                           opt_level=0)  # fmt: skip
    save(fused.model, path)
    return {op: n for op, n in fused.get_fused_operator_statistics().items() if n}


def write_onnx(model, spec: SubnetSpec, folder: Path, fused: bool = False, block_scales: dict | None = None) -> dict:
    """Export into ``folder`` (which must exist) and apply the spec's formats; return the meta dict.

    ``block_scales`` (module name -> scales, as recovery kept them): the scales a kept-scale weight
    (int4s_b32) is written at, instead of its own; how many were is ``meta["kept_scales"]``.

    ``fused``: the graph ONNX Runtime runs fastest: attention as GroupQueryAttention where the model allows
    (``targets.onnx_attention``; else the modules' own ops, and ``meta["attention"]`` says why), the
    exporter's graph optimizer, RMSNorms fused (``fuse_norms``) and the block-quantized projections that
    share an input as one MatMulNBits (``targets.onnx_fusion``; ``meta["linear_io"]`` then gives a packed
    projection's output as [input, fused output, start, stop]). Without it, every op is standard ONNX
    (what TensorRT builds from)."""
    import onnxruntime

    check_formats(spec)
    if len(spec.layers) != len(model.model.layers):
        raise ExportError(
            f"the spec has {len(spec.layers)} layers but the model has {len(model.model.layers)}: "
            "pass the model extracted from this spec (subnet.extract.extract)"
        )
    t0 = time.perf_counter()
    path = folder / MODEL_FILE
    raw = folder / "torch_export"
    raw.mkdir()
    why_not = unsupported(model) if fused else "not asked (standard ONNX ops only)"
    attention = "eager" if why_not else "gqa"
    torch_export(model, raw / MODEL_FILE, optimize=fused, attention=attention)
    graph = onnx.load(str(raw / MODEL_FILE))
    drop_stack_traces(graph)
    for f in raw.iterdir():
        f.unlink()
    raw.rmdir()
    nodes = linear_nodes(graph)
    head = next((n for n, k in nodes.items() if k == "lm_head"), None)
    if spec.base.tie_word_embeddings and head:
        retie_head(graph, head)
    folded = fold_weight_transposes(graph)
    name_dims(graph)
    missing = {f"layers.{i}.{n}" for i in range(len(spec.layers)) for n in LINEARS} - set(nodes.values())
    if missing:
        raise ExportError(f"could not find the MatMul of {sorted(missing)[:3]} in the exported graph")
    want = wanted_formats(spec, nodes)
    io = linear_io(graph, nodes)
    by_fmt: dict[str, list[str]] = {}
    for node, fmt in want.items():
        by_fmt.setdefault(fmt, []).append(node)
    weights_to_f16(graph, set(by_fmt.get("f16", [])))
    tied = spec.base.tie_word_embeddings
    if get_format(spec.embed_format).same_as:
        embed = spec.embed_format if embedding_to_blocks(graph, spec.embed_format, head if tied else None) else "f32"
    else:
        embed = "f16" if spec.embed_format == "f16" and embedding_to_f16(graph) is not None else "f32"
    graph.graph.name = model_name(model.config, spec.base.family)
    if attention == "gqa":
        helper.set_model_props(graph, dict([KV_CACHE]))
    save(graph, path)
    del graph
    if by_fmt.get("int8"):
        quantize_int8(path, by_fmt["int8"])
    kept = kept_scales_by_node(nodes, want, block_scales or {})
    for fmt in NBITS:
        if by_fmt.get(fmt):
            quantize_nbits(path, fmt, by_fmt[fmt], kept)
    onnx.checker.check_model(str(path))  # before fusion: the checker's schema of GroupQueryAttention refuses packed QKV
    graph = onnx.load(str(path))
    applied = applied_formats(graph, nodes)  # read while every linear is still its own node
    mismatched = {k: (want[n], applied.get(k)) for n, k in nodes.items() if applied.get(k) != want[n]}
    if tied:  # the tied lm_head follows the embedding table
        mismatched.pop("lm_head", None)
    if mismatched:
        raise ExportError(f"formats not applied as asked (wanted, got): {dict(list(mismatched.items())[:4])}")
    projections = fuse_projections(graph) if fused else {"qkv_packed": 0, "split": 0, "spans": {}}
    io = {k: [x, *projections["spans"].get(y, [y])] for k, (x, y) in io.items()}
    f16_scales = scales_to_f16(graph)
    save(graph, path)
    del graph
    norms = fuse_norms(path) if fused else {}  # ORT's fused norms live in the default domain, unknown to onnx
    final = onnx.load(str(path))
    return {
        "format": "onnx",
        "inputs": [i.name for i in final.graph.input],
        "outputs": [o.name for o in final.graph.output],
        "kv_heads": [h for h, _ in kv_shapes(model)],
        "head_dim": kv_shapes(model)[0][1],
        "opset": {d.domain or "ai.onnx": d.version for d in final.opset_import},
        "applied": applied,
        "nodes": nodes,
        "linear_io": io,
        "embedding": {
            "requested": spec.embed_format,
            "applied": embed,
            "lm_head": (f"tied: {applied.get('lm_head')}, the same stored table as the embedding" if tied
                        else f"separate MatMul, {applied.get('lm_head')}"),
        },
        "node_ops": dict(Counter(n.op_type for n in final.graph.node if n.op_type in
                                 ("MatMul", "MatMulInteger", "MatMulNBits", "Gather", "GatherBlockQuantized"))),
        "folded_weight_transposes": folded,
        "kept_scales": len(kept),
        "f16_scales": f16_scales,
        "attention": "GroupQueryAttention (com.microsoft)" if attention == "gqa" else f"standard ONNX ops: {why_not}",
        "kv_cache": ("one buffer per tensor, past = present (IO binding)"
                     if dict((p.key, p.value) for p in final.metadata_props).get(KV_CACHE[0]) == KV_CACHE[1]
                     else "past in, past + new out (copied every step)"),
        "fused": norms,
        "fused_projections": {"qkv_packed": projections["qkv_packed"], "split": projections["split"]},
        "optimized": fused,
        "f16_note": "f16 = float16 weight storage cast to float32 before the MatMul (CPU EP computes in f32); "
                    "f16_scales = block-scale tensors stored in float16 (exactly: ggml's f16 scales), cast to float32 "
                    "when ONNX Runtime loads the graph",
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "spec": spec.to_dict(),
        "export_s": round(time.perf_counter() - t0, 2),
    }


def kept_scales_by_node(nodes: dict[str, str], want: dict[str, str], block_scales: dict) -> dict:
    """Node name -> the block scales its weight is written at: ``block_scales`` (module name -> scales)
    of the decoder linears whose wanted format keeps its scales (``KEPT_SCALE_FORMATS``)."""
    from subnet.quant import KEPT_SCALE_FORMATS

    out = {}
    for node, key in nodes.items():
        if key.startswith("layers.") and want.get(node) in KEPT_SCALE_FORMATS:
            _, i, name = key.split(".")
            scales = block_scales.get(linear_module_name(int(i), name))
            if scales is not None:
                out[node] = scales
    return out


def artifact_files(folder: Path, final: Path, extra: list[str] = ()) -> list[str]:
    """Paths the files of ``folder`` will have once it is renamed to ``final``."""
    names = {p.name for p in folder.iterdir() if p.is_file()} | set(extra)
    return sorted(str(final / n) for n in names)


def export_onnx(model, spec: SubnetSpec, out_dir, force: bool = False, fused: bool = True) -> Artifact:
    """Export an extracted sub-network to ``out_dir`` (model.onnx + model.onnx.data + artifact.json)."""
    out_dir = Path(out_dir)
    check_formats(spec)
    with atomic_output(out_dir, force=force) as tmp:
        meta = write_onnx(model, spec, tmp, fused=fused)
        meta["size_bytes"] = sum(p.stat().st_size for p in tmp.iterdir())
        art = Artifact(ONNXRUNTIME, str(out_dir / MODEL_FILE), artifact_files(tmp, out_dir, ["artifact.json"]), meta)
        art.write_meta(tmp / "artifact.json")
    return art
