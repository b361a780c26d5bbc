"""Export an extracted sub-network to ONNX with a KV cache, then store each linear in its spec format.

One graph serves prefill and decode: inputs ``input_ids``, ``attention_mask`` (past + new tokens),
``position_ids`` and ``past_key_values.{i}.key/value`` (past length may be 0), outputs ``logits``
and ``present.{i}.key/value``. Batch, sequence and past length are dynamic; KV head counts are per
layer. Weight formats are applied with ONNX Runtime's own quantizers on the graph:

* ``f32``: nothing; ``f16``: the weight is stored in float16 and cast to float32 in front of its
  MatMul (CPU EP has no fp16 MatMul, so this halves storage, not compute);
* ``int8``: ``quantize_dynamic(per_channel=True)`` (MatMulInteger, int8 weights per output channel,
  activations quantized dynamically at run time);
* ``int8_b32`` / ``int4_b32`` / ``int4_b128``: ``MatMulNBitsQuantizer(accuracy_level=4)``;
  ``int4s_b32``: the same, symmetric, with its scales rounded to f16 afterwards: MLAS picks q4_0's
  codes and scale (the signed absmax / -8), and ggml stores that scale in f16, so the graph holds
  q4_0's weights exactly and a model recovered for GGUF q4_0 keeps its accuracy here.

MatMul nodes are tied to spec layers through the exporter's node metadata
``pkg.torch.onnx.name_scopes``. A tied lm_head exports as ``MatMul(x, Transpose(embed))``, which
weight quantizers skip: the embedding (and a tied lm_head) can be f32 or f16 here; other embedding
formats are refused. What every node really got is recorded in ``meta["applied"]``.
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

from subnet.arch import LINEARS
from subnet.formats import NBITS_FORMATS, ONNXRUNTIME, get_format
from subnet.spec import SubnetSpec
from targets.backend import Artifact, ExportError, atomic_output
from targets.onnxrt import EMBED_FORMATS

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
NBITS = {  # bits, block, symmetric (asymmetric RTN unless symmetric, as subnet.quant simulates)
    n: (get_format(n).nbits, get_format(n).block, get_format(n).symmetric) for n in NBITS_FORMATS
}
_QUANT_SUFFIX = re.compile(r"_(quant|Q\d+)$")  # names ORT's quantizers give the node that replaces a MatMul
_SCOPE = re.compile(r"(?:^|\.)model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)$")


class FormatNotSupported(ExportError, ValueError):
    """A weight format this runtime cannot hold."""


def input_names(n_layers: int) -> list[str]:
    kv = [f"past_key_values.{i}.{t}" for i in range(n_layers) for t in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *kv]


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


def sample_inputs(model, batch=2, seq=3, past=2):
    """Example inputs for tracing: past length >= 1 so that the past axis is traced as dynamic."""
    dtype = next(model.parameters()).dtype
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).unsqueeze(0).expand(batch, seq).contiguous()
    kv = []
    for heads, hd in kv_shapes(model):
        kv += [torch.zeros(batch, heads, past, hd, dtype=dtype), torch.zeros(batch, heads, past, hd, dtype=dtype)]
    return (ids, mask, pos, *kv)


def dynamic_shapes(n_layers: int) -> dict:
    from torch.export import Dim

    batch, seq, past = Dim("batch"), Dim("sequence"), Dim("past_sequence")
    return {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: Dim.DYNAMIC},  # past + sequence (a derived dim raises)
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past} for _ in range(2 * n_layers)),
    }


def torch_export(model, path: Path, optimize: bool = False) -> None:
    """Trace ``model`` with its KV cache and save the float graph with external data at ``path``."""
    n = len(model.model.layers)
    wrapper = KVCacheWrapper(model).eval()
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            sample_inputs(model),
            dynamo=True,
            dynamic_shapes=dynamic_shapes(n),
            input_names=input_names(n),
            output_names=output_names(n),
            optimize=optimize,
            verbose=False,
        )
    program.save(str(path), external_data=True)


# ---- graph passes ---------------------------------------------------------------------------
def fold_weight_transposes(model: onnx.ModelProto) -> int:
    """Replace Transpose(initializer) feeding only MatMuls by a transposed initializer (what quantizers need).

    A weight that is also read elsewhere (the tied embedding, gathered by the embedding lookup) is left alone.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    users = Counter(i for n in g.node for i in n.input)
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    stale, keep = set(), []
    for node in g.node:
        src = node.input[0] if node.op_type == "Transpose" else None
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        outs = consumers.get(node.output[0], []) if src else []
        if (
            src in inits
            and users[src] == 1
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
    del g.node[:]
    g.node.extend(keep)
    infos = [v for v in g.value_info if v.name not in stale]  # shapes recorded before the fold
    del g.value_info[:]
    g.value_info.extend(infos)
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
    inits = {t.name: t for t in g.initializer}
    done, new_nodes = [], []
    for node in g.node:
        if node.name in node_names and node.input[1] in inits:
            _cast_initializer(inits[node.input[1]], new_nodes, f"{node.name}_weight_f16")
            done.append(node.name)
    _prepend(g, new_nodes)
    return done


def embedding_to_f16(model: onnx.ModelProto) -> str | None:
    """Store the embedding table in float16 (one Cast in front of its Gather and a tied lm_head)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    for node in g.node:
        if node.op_type == "Gather" and node.input[0] in inits and len(inits[node.input[0]].dims) == 2:
            new = []
            _cast_initializer(inits[node.input[0]], new, "embed_tokens_f16")
            _prepend(g, new)
            return node.input[0]
    return None


def _prepend(graph: onnx.GraphProto, nodes: list) -> None:
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)


def _cast_initializer(init: onnx.TensorProto, new_nodes: list, node_name: str) -> None:
    name = init.name
    arr = numpy_helper.to_array(init).astype(np.float16)
    init.CopyFrom(numpy_helper.from_array(arr, name + ".f16"))
    new_nodes.append(helper.make_node("Cast", [name + ".f16"], [name], to=TensorProto.FLOAT, name=node_name))


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


def quantize_nbits(path: Path, fmt: str, nodes: list[str]) -> None:
    """MatMulNBits (block-wise, accuracy_level 4) for exactly ``nodes``; every other node excluded."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    bits, block, symmetric = NBITS[fmt]
    model = onnx.load(str(path))
    others = [n.name for n in model.graph.node if n.name not in set(nodes)]  # nodes_to_include does not restrict
    quant = MatMulNBitsQuantizer(
        model, bits=bits, block_size=block, is_symmetric=symmetric, accuracy_level=4, nodes_to_exclude=others
    )
    quant.process()
    if get_format(fmt).same_as:  # int4s_b32: ggml's f16 scales (MLAS keeps them in f32)
        _round_scales_to_f16(quant.model.model, set(nodes))
    save(quant.model.model, path)


def _round_scales_to_f16(model: onnx.ModelProto, nodes: set[str]) -> None:
    """Round the scales of the MatMulNBits nodes that replaced ``nodes`` to f16 precision (kept f32)."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and _QUANT_SUFFIX.sub("", node.name) in nodes:
            t = inits[node.input[2]]
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16).astype(np.float32), t.name))


def applied_formats(model: onnx.ModelProto, nodes: dict[str, str]) -> dict[str, str]:
    """``layers.{i}.{linear}``/``lm_head`` -> the format the graph really holds (read back from the graph)."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for node in model.graph.node:
        key = nodes.get(node.name) or nodes.get(_QUANT_SUFFIX.sub("", node.name))
        if key is None:
            continue
        if node.op_type == "MatMulNBits":
            a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
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


def write_onnx(model, spec: SubnetSpec, folder: Path, optimize: bool = False) -> dict:
    """Export into ``folder`` (which must exist) and apply the spec's formats; return the meta dict."""
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
    torch_export(model, raw / MODEL_FILE, optimize=optimize)
    graph = onnx.load(str(raw / MODEL_FILE))
    for f in raw.iterdir():
        f.unlink()
    raw.rmdir()
    folded = fold_weight_transposes(graph)
    name_dims(graph)
    nodes = linear_nodes(graph)
    missing = {f"layers.{i}.{n}" for i in range(len(spec.layers)) for n in LINEARS} - set(nodes.values())
    if missing:
        raise ExportError(f"could not find the MatMul of {sorted(missing)[:3]} in the exported graph")
    want = wanted_formats(spec, nodes)
    io = linear_io(graph, nodes)
    by_fmt: dict[str, list[str]] = {}
    for node, fmt in want.items():
        by_fmt.setdefault(fmt, []).append(node)
    weights_to_f16(graph, set(by_fmt.get("f16", [])))
    embed_f16 = spec.embed_format == "f16" and embedding_to_f16(graph) is not None
    save(graph, path)
    del graph
    if by_fmt.get("int8"):
        quantize_int8(path, by_fmt["int8"])
    for fmt in NBITS:
        if by_fmt.get(fmt):
            quantize_nbits(path, fmt, by_fmt[fmt])
    final = onnx.load(str(path))
    onnx.checker.check_model(str(path))
    applied = applied_formats(final, nodes)
    tied = spec.base.tie_word_embeddings
    mismatched = {k: (want[n], applied.get(k)) for n, k in nodes.items() if applied.get(k) != want[n]}
    if tied:  # the tied lm_head follows the embedding table
        mismatched.pop("lm_head", None)
    if mismatched:
        raise ExportError(f"formats not applied as asked (wanted, got): {dict(list(mismatched.items())[:4])}")
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
            "applied": "f16" if embed_f16 else "f32",
            "lm_head": ("tied: MatMul(x, Transpose(embedding)), same storage as the embedding" if tied
                        else f"separate MatMul, {applied.get('lm_head')}"),
        },
        "node_ops": dict(Counter(n.op_type for n in final.graph.node if n.op_type in
                                 ("MatMul", "MatMulInteger", "MatMulNBits", "Gather"))),
        "folded_weight_transposes": folded,
        "optimized": optimize,
        "f16_note": "f16 = float16 weight storage cast to float32 before the MatMul (CPU EP computes in f32)",
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "spec": spec.to_dict(),
        "export_s": round(time.perf_counter() - t0, 2),
    }


def artifact_files(folder: Path, final: Path, extra: list[str] = ()) -> list[str]:
    """Paths the files of ``folder`` will have once it is renamed to ``final``."""
    names = {p.name for p in folder.iterdir() if p.is_file()} | set(extra)
    return sorted(str(final / n) for n in names)


def export_onnx(model, spec: SubnetSpec, out_dir, force: bool = False, optimize: bool = False) -> Artifact:
    """Export an extracted sub-network to ``out_dir`` (model.onnx + model.onnx.data + artifact.json)."""
    out_dir = Path(out_dir)
    check_formats(spec)
    with atomic_output(out_dir, force=force) as tmp:
        meta = write_onnx(model, spec, tmp, optimize=optimize)
        meta["size_bytes"] = sum(p.stat().st_size for p in tmp.iterdir())
        art = Artifact(ONNXRUNTIME, str(out_dir / MODEL_FILE), artifact_files(tmp, out_dir, ["artifact.json"]), meta)
        art.write_meta(tmp / "artifact.json")
    return art
