"""TensorRT backend: a TensorRT-ready ONNX (weight-only Q/DQ where the spec asks) and an engine build recipe.

TensorRT engines are specific to a GPU model and TensorRT version, so they are built on the device.
``export`` always writes the ONNX graph (the same KV-cache graph as ``targets.onnx_export``), a
``build_engine.sh`` (trtexec with min/opt/max shapes for every dynamic input, each past key/value
included) and a README; when TensorRT and a CUDA GPU are present it also builds the engine with
the TensorRT Python API.

Weight formats, expressed the way TensorRT consumes them (explicit quantization, ``--stronglyTyped``):
``int8`` = int8 weight, one fp32 scale per output channel, ``DequantizeLinear(axis=1)`` in front of
the MatMul; ``int4_b128`` = int4 weight, fp32 scale per 128 input features, ``DequantizeLinear(axis=0,
block_size=128)`` (opset 21); both symmetric (TensorRT's weight DQ takes no zero point). ``f16`` =
float16 weight storage; ``f32`` = float. The graph's activations are float32: with ``--stronglyTyped``
TensorRT computes them in fp32; a graph without Q/DQ is built with ``--fp16``.
"""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from subnet.formats import TENSORRT
from targets.backend import Artifact, ExportError, Workload, atomic_output, save_tokenizer
from targets.onnx_artifact import MODEL_FILE
from targets.onnx_export import artifact_files, check_formats, save, write_onnx
from targets.onnx_graph import initializers, prepend

if TYPE_CHECKING:
    from subnet.spec import SubnetSpec

QDQ_FORMATS = ("int8", "int4_b128")
INT4_BLOCK = 128


def available() -> tuple[bool, str]:
    """(True, "") when TensorRT is importable and a CUDA GPU is present, else (False, the reason)."""
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError as e:
        return False, f"TensorRT unavailable: the tensorrt package is not installed ({e}); pip install packager[tensorrt]"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "TensorRT unavailable: no CUDA GPU visible"
    except ImportError:
        return False, "TensorRT unavailable: cannot check for a CUDA GPU (torch missing)"
    return True, ""


# ---- weight-only Q/DQ ------------------------------------------------------------------------
def quantize_int8_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 of a MatMul weight [in, out], one scale per output column: (q, scale[out])."""
    absmax = np.abs(w).max(axis=0).astype(np.float64)
    scale = (2 * absmax / 254).astype(np.float32)
    scale[scale < np.finfo(np.float32).tiny] = 1.0
    q = np.clip(np.rint(w / scale), -128, 127).astype(np.int8)
    return q, scale


def quantize_int4_block(w: np.ndarray, block: int = INT4_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 of a MatMul weight [in, out] in blocks of ``block`` inputs: (q in -8..7, scale[in/block, out])."""
    k, n = w.shape
    b = w.reshape(k // block, block, n)
    scale = (np.abs(b).max(axis=1) / 7.0).astype(np.float32)
    scale[scale < np.finfo(np.float32).tiny] = 1.0
    q = np.clip(np.rint(b / scale[:, None, :]), -8, 7).astype(np.int8).reshape(k, n)
    return q, scale


def int4_tensor(name: str, q: np.ndarray) -> onnx.TensorProto:
    """An INT4 initializer from int8 values in -8..7 (two per byte, low nibble first)."""
    flat = (q.reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
    return helper.make_tensor(name, TensorProto.INT4, q.shape, packed.tobytes(), raw=True)


def add_weight_qdq(model: onnx.ModelProto, targets: dict[str, str]) -> dict[str, np.ndarray]:
    """Replace the float weight of each MatMul node in ``targets`` (name -> int8/int4_b128) by int + DQ.

    Returns node name -> the dequantized weight [in, out] the graph now computes with.
    """
    g = model.graph
    inits = initializers(g)
    dq_nodes, deq = [], {}
    for node in g.node:
        fmt = targets.get(node.name)
        if fmt is None:
            continue
        w_name = node.input[1]
        if node.op_type != "MatMul" or w_name not in inits:
            raise ExportError(f"cannot add Q/DQ to {node.name}: its weight is not a float initializer")
        w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
        if fmt == "int8":
            q, scale = quantize_int8_channel(w)
            q_init, attrs, back = numpy_helper.from_array(q, w_name + ".int8"), {"axis": 1}, q * scale
        else:
            q, scale = quantize_int4_block(w)
            q_init, attrs = int4_tensor(w_name + ".int4", q), {"axis": 0, "block_size": INT4_BLOCK}
            back = (q.reshape(-1, INT4_BLOCK, w.shape[1]) * scale[:, None, :]).reshape(w.shape)
        s_init = numpy_helper.from_array(scale, w_name + ".scale")
        inits[w_name].CopyFrom(q_init)
        g.initializer.append(s_init)
        dq_nodes.append(
            helper.make_node("DequantizeLinear", [q_init.name, s_init.name], [w_name + ".dq"], name=f"{node.name}_DQ", **attrs)
        )
        node.input[1] = w_name + ".dq"
        deq[node.name] = back.astype(np.float32)
    prepend(g, dq_nodes)
    if any(f == "int4_b128" for f in targets.values()):  # INT4 and block_size need opset 21 (type extensions only)
        for op in model.opset_import:
            if op.domain in ("", "ai.onnx") and op.version < 21:
                op.version = 21
    return deq


# ---- build recipe ----------------------------------------------------------------------------
def profile_shapes(kv_heads: list[int], head_dim: int, workload: Workload) -> dict[str, tuple[tuple, tuple, tuple]]:
    """min/opt/max shape of every dynamic input: decode-optimal, up to the workload's prompt and context."""
    b, prompt, ctx = workload.batch, workload.prompt_tokens, workload.context
    shapes = {
        "input_ids": ((1, 1), (b, 1), (b, prompt)),
        "attention_mask": ((1, 1), (b, ctx), (b, ctx)),
        "position_ids": ((1, 1), (b, 1), (b, prompt)),
    }
    for i, h in enumerate(kv_heads):
        for t in ("key", "value"):
            shapes[f"past_key_values.{i}.{t}"] = ((1, h, 0, head_dim), (b, h, ctx - 1, head_dim), (b, h, ctx - 1, head_dim))
    return shapes


def trtexec_command(onnx_file: str, engine_file: str, shapes: dict, strongly_typed: bool, fp16: bool) -> list[str]:
    def fmt(k):
        return ",".join(f"{name}:{'x'.join(str(d) for d in dims[k])}" for name, dims in shapes.items())

    cmd = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine={engine_file}"]
    cmd += [f"--minShapes={fmt(0)}", f"--optShapes={fmt(1)}", f"--maxShapes={fmt(2)}"]
    if strongly_typed:
        cmd.append("--stronglyTyped")
    elif fp16:
        cmd.append("--fp16")
    return cmd


def build_engine(onnx_path: Path, engine_path: Path, shapes: dict, strongly_typed: bool, fp16: bool) -> None:
    """Build a serialized engine with the TensorRT Python API (needs tensorrt and a CUDA GPU)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if fp16 and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path}")
    engine_path.write_bytes(bytes(engine))


README = """# TensorRT-ready ONNX

- `model.onnx` (+ `model.onnx.data`): one graph for prefill and decode with a KV cache
  (inputs {inputs}; outputs logits and present.i.key/value).
- Weight formats per linear: {formats}. {qdq}
- Engine: {engine}

Build the engine on the target device (engines are tied to the GPU model and TensorRT version):

    sh build_engine.sh            # or: python -c "from targets.tensorrt import build_engine; ..."

Shapes: min = 1 token and an empty cache; opt = decoding one token at {ctx} tokens of context;
max = a {prompt}-token prompt and {ctx} tokens of context (batch {batch}). Re-run with a larger
workload to serve longer contexts.
"""


def _float_spec(spec: "SubnetSpec") -> "SubnetSpec":
    """The spec with the Q/DQ formats replaced by f32 (their weights are quantized by add_weight_qdq)."""
    s = copy.deepcopy(spec)
    for ly in s.layers:
        ly.formats = {k: ("f32" if v in QDQ_FORMATS else v) for k, v in ly.formats.items()}
    if s.lm_head_format in QDQ_FORMATS:
        s.lm_head_format = "f32"
    return s


def qdq_parity(onnx_path: Path, model, float_spec, deq: dict, nodes: dict, token_ids) -> dict:
    """ORT (CPU) on the Q/DQ graph vs torch with exactly the weights the DQ nodes produce."""
    import torch

    from subnet.quant import fake_quantize_model
    from targets.onnxrt import load

    ref_model = fake_quantize_model(model, float_spec)
    with torch.no_grad():
        for node, w in deq.items():
            key = nodes[node]
            if key == "lm_head":
                lin = ref_model.lm_head
            else:
                _, i, name = key.split(".")
                layer = ref_model.model.layers[int(i)]
                lin = getattr(layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp, name)
            lin.weight.copy_(torch.from_numpy(w.T.copy()))
        ref = ref_model(torch.tensor([list(token_ids)])).logits[0].numpy()
    got = load(onnx_path, graph_opt="basic").logits(token_ids)  # weight-only, as TensorRT runs it
    return {
        "max_abs_diff": float(np.abs(got - ref).max()),
        "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
        "n_tokens": len(token_ids),
        "reference": "torch eager with the dequantized Q/DQ weights; run with ONNX Runtime CPU, basic graph optimizations (TensorRT not run)",
    }


def export(model, tokenizer, spec: "SubnetSpec", out, force: bool = False, workload: Workload | None = None) -> Artifact:
    """TensorRT-ready ONNX + build_engine.sh + README (+ the engine when TensorRT and a GPU are present)."""
    from targets.onnxrt import parity_ids

    workload = workload or Workload()
    check_formats(spec, TENSORRT, embed_formats=("f32", "f16"), also=("f32",))
    out = Path(out)
    with atomic_output(out, force=force) as tmp:
        fspec = _float_spec(spec)
        meta = write_onnx(model, fspec, tmp)
        nodes = meta["nodes"]
        want = {n: (spec.lm_head_format if k == "lm_head" else spec.layers[int(k.split(".")[1])].formats[k.split(".")[2]])
                for n, k in nodes.items()}
        targets = {n: f for n, f in want.items() if f in QDQ_FORMATS}
        path = tmp / MODEL_FILE
        if targets:
            graph = onnx.load(str(path))
            deq = add_weight_qdq(graph, targets)
            save(graph, path)
            del graph
            onnx.checker.check_model(str(path))
            for n, f in targets.items():
                meta["applied"][nodes[n]] = f"{f} (Q/DQ)"
        else:
            deq = {}
        meta["spec"] = spec.to_dict()
        meta["opset"] = {d.domain or "ai.onnx": d.version for d in onnx.load(str(path), load_external_data=False).opset_import}
        meta["parity"] = qdq_parity(path, model, fspec, deq, nodes, parity_ids(tokenizer, model.config.vocab_size))
        strongly = bool(targets)
        fp16 = not strongly and "f16" in spec.formats_used()
        shapes = profile_shapes(meta["kv_heads"], meta["head_dim"], workload)
        cmd = trtexec_command(MODEL_FILE, "model.engine", shapes, strongly, fp16)
        (tmp / "build_engine.sh").write_text("#!/bin/sh\nset -e\ncd \"$(dirname \"$0\")\"\n" + shlex.join(cmd) + "\n")
        (tmp / "build_engine.sh").chmod(0o755)
        ok, reason = available()
        if ok:
            build_engine(path, tmp / "model.engine", shapes, strongly, fp16)
            meta["engine"] = "model.engine (built with the TensorRT Python API on this host)"
        else:
            meta["engine"] = f"not built: {reason}"
        meta.update(
            trtexec=cmd,
            profile_shapes={k: [list(s) for s in v] for k, v in shapes.items()},
            workload={"prompt_tokens": workload.prompt_tokens, "gen_tokens": workload.gen_tokens, "batch": workload.batch},
            precision="strongly typed (Q/DQ weights, fp32 activations)" if strongly else ("fp16" if fp16 else "fp32"),
            qdq="weight-only Q/DQ written and checked with ONNX Runtime CPU" if strongly else "none",
        )
        (tmp / "README.md").write_text(README.format(
            inputs=", ".join(meta["inputs"][:3]) + ", past_key_values.i.key/value",
            formats=json.dumps(sorted(set(meta["applied"].values()))),
            qdq="int8/int4 weights are DequantizeLinear nodes (explicit quantization): build with --stronglyTyped."
            if strongly else "No Q/DQ nodes.",
            engine=meta["engine"], ctx=workload.context, prompt=workload.prompt_tokens, batch=workload.batch,
        ))
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        meta["size_bytes"] = sum(p.stat().st_size for p in tmp.iterdir() if p.name.startswith("model.onnx"))
        art = Artifact(TENSORRT, str(out / MODEL_FILE), artifact_files(tmp, out, ["artifact.json"]), meta)
        art.write_meta(tmp / "artifact.json")
    return art
