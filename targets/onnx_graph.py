"""Lookups and edits over one ONNX graph, shared by the export passes (``targets.onnx_export``,
``targets.onnx_fusion``): who produces and who reads each tensor, initializer values, and the small
rewrites (node lists, Casts in front of initializers, dropped value_info) the passes repeat."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops
STACK_TRACE = "pkg.torch.onnx.stack_trace"  # torch.onnx's per-node Python stack: file paths of the exporting machine


def attrs(node) -> dict:
    """A node's attributes as name -> Python value."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def drop_stack_traces(model: onnx.ModelProto) -> None:
    """Remove torch.onnx's per-node stack traces, which name the exporting machine's source and site-packages
    paths, so that the same weights and spec export to the same bytes on any machine."""
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if p.key != STACK_TRACE]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)


def weight_bytes(graph: onnx.GraphProto) -> int:
    """Bytes of weight data the graph's kernels read per run: every initializer, those stored in float16
    behind a Cast to float32 (which ONNX Runtime folds at load) at the float32 bytes the kernels get."""
    widened = {n.input[0] for n in graph.node if n.op_type == "Cast" and attrs(n)["to"] == TensorProto.FLOAT}
    total = 0
    for t in graph.initializer:
        itemsize = 4 if t.name in widened else helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        total += int(np.prod(t.dims, dtype=np.int64)) * itemsize
    return total


def initializers(graph: onnx.GraphProto) -> dict:
    """The graph's initializers by name."""
    return {t.name: t for t in graph.initializer}


class GraphIndex:
    """One graph's initializers, each tensor's producer and consumers, and its output names, as they
    stand when the index is built (a pass that rewrites nodes builds a new one afterwards)."""

    def __init__(self, model: onnx.ModelProto):
        self.g = model.graph
        self.inits = initializers(self.g)
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in self.g.output}

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer input, or None if it is computed."""
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def readers(self, tensor: str) -> int:
        """How many node inputs read ``tensor``."""
        return len(self.consumers.get(tensor, []))

    def only_consumer(self, tensor: str):
        """The one node that reads ``tensor``, or None if several do, none does, or it is a graph output."""
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in self.outputs else None

    def add_const(self, arr: np.ndarray, name: str) -> str:
        """Add ``arr`` as initializer ``name``; returns the name."""
        self.g.initializer.append(numpy_helper.from_array(arr, name))
        return name


def set_nodes(graph: onnx.GraphProto, nodes: list) -> None:
    """Replace the graph's nodes by ``nodes`` (in that order)."""
    del graph.node[:]
    graph.node.extend(nodes)


def prepend(graph: onnx.GraphProto, nodes: list) -> None:
    """Put ``nodes`` in front of the graph's nodes."""
    set_nodes(graph, nodes + list(graph.node))


def cast_initializer(init: onnx.TensorProto, new_nodes: list, node_name: str) -> None:
    """Store ``init`` in float16 under ``<name>.f16`` and append to ``new_nodes`` the Cast that gives the
    graph its float32 value under the old name."""
    name = init.name
    arr = numpy_helper.to_array(init).astype(np.float16)
    init.CopyFrom(numpy_helper.from_array(arr, name + ".f16"))
    new_nodes.append(helper.make_node("Cast", [name + ".f16"], [name], to=TensorProto.FLOAT, name=node_name))


def drop_value_info(graph: onnx.GraphProto, names: set[str]) -> None:
    """Forget the recorded shapes of tensors a pass removed."""
    infos = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove the initializers nothing reads any more."""
    g = model.graph
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def use_ms_domain(model: onnx.ModelProto) -> None:
    """Import ONNX Runtime's contrib-op domain (once)."""
    if not any(d.domain == MS_DOMAIN for d in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
