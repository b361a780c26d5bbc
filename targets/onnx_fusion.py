"""Fewer, wider kernels: the block-quantized projections that read the same input, as one MatMulNBits.

In a decode step every MatMulNBits call costs more than its weights: ONNX Runtime dispatches it to the
thread pool and quantizes its input to int8 (accuracy_level 4) before the first weight is read. A
layer's q/k/v read one normed input, and so do its gate/up. ``fuse_projections`` stores each such group
as one MatMulNBits over the rows of all of them (codes, scales and zero points stacked along N, so
every weight is stored and computed exactly as before). A q/k/v group that feeds GroupQueryAttention
goes in packed (the kernel's packed-QKV input, key and value left empty) with its biases as one Add;
any other group is split back into its members' own output names. On the embedded SmolLM2 this is
121 MatMulNBits and 30 Splits per token instead of 211 MatMulNBits; the packed model decodes 1.09x
faster, the base 1.03x (benchmarks/RESULTS.md, stop 37).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from targets.onnx_attention import OP_NAME
from targets.onnx_graph import MS_DOMAIN, GraphIndex, attrs, drop_unused_initializers, set_nodes

_SHAPE = ("K", "bits", "block_size", "accuracy_level")  # what members of one fused node must share


def _bias_add(graph: GraphIndex, node):
    """(Add node, bias [N]) when ``node``'s output is used only by an Add of a constant bias."""
    add = graph.only_consumer(node.output[0])
    if add is None or add.op_type != "Add":
        return None
    bias = graph.const(add.input[1] if add.input[0] == node.output[0] else add.input[0])
    return (add, bias) if bias is not None and bias.shape == (attrs(node)["N"],) else None


def _stacked(graph: GraphIndex, members: list, name: str) -> tuple:
    """The MatMulNBits over the rows of ``members`` (output ``name``) and each member's column span."""
    a = attrs(members[0])
    ns = [attrs(m)["N"] for m in members]

    def rows(i):  # input i of every member, stacked along N
        return np.concatenate([graph.const(m.input[i]).reshape(n, -1) for m, n in zip(members, ns)])

    codes = rows(1).reshape(sum(ns), *graph.inits[members[0].input[1]].dims[1:])  # [N, blocks, blob]
    scales = graph.add_const(rows(2).reshape(-1), name + "_scales")
    inputs = [members[0].input[0], graph.add_const(codes, name + "_Q"), scales]
    if len(members[0].input) > 3 and members[0].input[3]:
        zps = rows(3).reshape(-1)
        inputs.append(graph.add_const(zps, name + "_zero_points"))
    node = helper.make_node("MatMulNBits", inputs, [name], name=name, domain=MS_DOMAIN, N=sum(ns),
                            **{k: a[k] for k in _SHAPE})  # fmt: skip
    spans = np.cumsum([0, *ns])
    return node, [(int(s), int(e)) for s, e in zip(spans[:-1], spans[1:])]


def _groups(graph: GraphIndex) -> list[list]:
    """MatMulNBits nodes that read the same input with the same shape attributes, two or more, in graph order."""
    by_key: dict[tuple, list] = {}
    for n in graph.g.node:
        if n.op_type != "MatMulNBits" or len(n.input) > 4:  # g_idx / bias inputs: left alone
            continue
        zp = len(n.input) > 3 and bool(n.input[3])
        if any(t not in graph.inits for t in n.input[1 : 4 if zp else 3]):
            continue
        by_key.setdefault((n.input[0], zp, *(attrs(n).get(k) for k in _SHAPE)), []).append(n)
    return [g for g in by_key.values() if len(g) > 1]


def _packed_qkv(graph: GraphIndex, group: list):
    """(attention node, its [q, k, v] projections, their bias Adds or None) when three of the group feed
    one GroupQueryAttention's query/key/value inputs (each directly or through a bias Add), else None."""
    handed = {}  # the tensor each projection hands on (its output or its bias Add's) -> (projection, add)
    for m in group:
        add = _bias_add(graph, m)
        tensor = add[0].output[0] if add else m.output[0]
        if graph.only_consumer(tensor) is not None:
            handed[tensor] = (m, add)
    for gqa in {id(c): c for c in map(graph.only_consumer, handed)}.values():
        if gqa.op_type != OP_NAME or len(gqa.input) < 3 or not all(t in handed for t in gqa.input[:3]):
            continue
        picked = [handed[t] for t in gqa.input[:3]]
        adds = [a for _, a in picked]
        if len({id(m) for m, _ in picked}) == 3 and (all(adds) or not any(adds)):
            return gqa, [m for m, _ in picked], adds if all(adds) else None
    return None


def fuse_projections(model: onnx.ModelProto) -> dict:
    """Fuse, in place, the MatMulNBits nodes that share an input (see the module docstring).

    Returns ``{"qkv_packed": n, "split": m, "spans": {member output: [fused output, start, stop]}}``:
    the spans say where each packed projection's output now lives (columns start:stop of the fused
    node's output); a split group's members keep their own output names. Runs on the quantized graph
    before ``scales_to_f16``, while every tensor it stacks is a plain initializer.
    """
    graph = GraphIndex(model)
    order = {id(n): i for i, n in enumerate(graph.g.node)}
    removed, placed, spans = set(), {}, {}
    packed = split = 0
    for group in _groups(graph):
        qkv = _packed_qkv(graph, group)
        if qkv is not None:
            gqa, members, adds = qkv
            name = gqa.name + "_qkv"
            node, cols = _stacked(graph, members, name)
            new, out = [node], name
            if adds:
                out = name + "_biased"
                bias = graph.add_const(np.concatenate([b for _, b in adds]), name + "_bias")
                new.append(helper.make_node("Add", [name, bias], [out], name=out))
                removed.update(id(a) for a, _ in adds)
            gqa.input[0], gqa.input[1], gqa.input[2] = out, "", ""
            spans.update({m.output[0]: [name, s, e] for m, (s, e) in zip(members, cols)})
            packed += 1
        else:
            members, name = group, group[0].name + "_fused"
            node, cols = _stacked(graph, members, name)
            sizes = graph.add_const(np.array([e - s for s, e in cols], dtype=np.int64), name + "_split")
            new = [node, helper.make_node("Split", [name, sizes], [m.output[0] for m in members], axis=-1,
                                          name=name + "_split")]  # fmt: skip
            split += 1
        removed.update(id(m) for m in members)
        placed[min((id(m) for m in members), key=order.get)] = new  # where the first of them was
    nodes = []
    for n in graph.g.node:
        nodes.extend(placed.get(id(n), []))
        if id(n) not in removed:
            nodes.append(n)
    set_nodes(graph.g, nodes)
    drop_unused_initializers(model)
    return {"qkv_packed": packed, "split": split, "spans": spans}

