"""Attention as one ONNX Runtime kernel: ``com.microsoft.GroupQueryAttention`` in the exported graph.

Traced from the Hugging Face modules, a decoder's attention is ~40 small ONNX nodes per layer (rotary
slices and concats, the KV-cache concat, the grouped-query Expand, mask arithmetic, softmax), and on a
CPU their per-node cost outweighs the weights' own matmuls in a model this small. ``GQADecoder`` is an
export-only forward over the same modules in which each layer's attention core (rotary embedding, KV
cache append, grouped-query attention) is one call to the custom op ``packager::group_query_attention``;
``torch.onnx.export`` translates it to ORT's GroupQueryAttention (``custom_translation_table``). The
projections, norms and MLP stay the model's own modules, so their MatMuls keep the name scopes the
exporter maps to spec layers.

The op's eager implementation is the reference for its semantics (checked against ORT's kernel in the
tests): query/key/value [batch, seq, heads*head_dim], past key/value [batch, kv_heads, past, head_dim],
rotary ("rotate half") at positions past..past+seq-1 from cos/sin caches [max_positions, head_dim/2],
causal attention over past + new, presents = past + new. The graph takes no position_ids: the kernel
derives positions from the attention mask (``seqlens_k`` = tokens so far - 1), so sequences are
right-padded (batch 1, the deployment case, always is). The kernel's total length comes from the mask
too, so past and present may be one preallocated buffer per layer, written in place (the graph's
metadata says so, ``targets.onnx_artifact.KV_CACHE``, and the runner then binds them with IO binding).
"""

from __future__ import annotations

import torch
from torch import Tensor

from targets.onnx_graph import MS_DOMAIN

OP = "packager::group_query_attention"
OP_NAME = "GroupQueryAttention"


@torch.library.custom_op(OP, mutates_args=())
def group_query_attention(query: Tensor, key: Tensor, value: Tensor, past_key: Tensor, past_value: Tensor,
                          seqlens_k: Tensor, cos_cache: Tensor, sin_cache: Tensor, num_heads: int,
                          kv_num_heads: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(output [b, s, heads*d], present_key, present_value [b, kv_heads, past+s, d]) as ORT computes them."""
    b, s, _ = query.shape
    d, past = past_key.shape[-1], past_key.shape[2]
    pos = torch.arange(past, past + s)
    cos, sin = cos_cache[pos], sin_cache[pos]

    def heads(x, n):
        return x.view(b, s, n, d).transpose(1, 2)

    def rotate(x):
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    q, k, v = rotate(heads(query, num_heads)), rotate(heads(key, kv_num_heads)), heads(value, kv_num_heads)
    present_key, present_value = torch.cat([past_key, k], 2), torch.cat([past_value, v], 2)
    group = num_heads // kv_num_heads
    causal = torch.ones(s, past + s, dtype=torch.bool).tril(past)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, present_key.repeat_interleave(group, 1), present_value.repeat_interleave(group, 1), attn_mask=causal, scale=scale
    )
    return out.transpose(1, 2).reshape(b, s, num_heads * d), present_key, present_value


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, cos_cache, sin_cache, num_heads, kv_num_heads, scale):
    b, s, _ = query.shape
    d, total = past_key.shape[-1], past_key.shape[2] + s
    return query.new_empty(b, s, num_heads * d), past_key.new_empty(b, kv_num_heads, total, d), \
        past_value.new_empty(b, kv_num_heads, total, d)  # fmt: skip


def register_onnx_schema() -> None:
    """Tell onnx (and onnxscript, which looks ops up there) the GroupQueryAttention inputs we use."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(OP_NAME, MS_DOMAIN):
        return
    names = [("query", "T"), ("key", "T"), ("value", "T"), ("past_key", "T"), ("past_value", "T"),
             ("seqlens_k", "M"), ("total_sequence_length", "M"), ("cos_cache", "T"), ("sin_cache", "T")]  # fmt: skip
    param = OpSchema.FormalParameter
    attrs = [("num_heads", OpSchema.AttrType.INT), ("kv_num_heads", OpSchema.AttrType.INT),
             ("scale", OpSchema.AttrType.FLOAT), ("do_rotary", OpSchema.AttrType.INT)]  # fmt: skip
    onnx.defs.register_schema(OpSchema(
        OP_NAME, MS_DOMAIN, 1, doc="ONNX Runtime contrib op (the inputs and attributes packager writes)",
        inputs=[param(n, t) for n, t in names],
        outputs=[param("output", "T"), param("present_key", "T"), param("present_value", "T")],
        type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute(n, t, "") for n, t in attrs],
    ))  # fmt: skip


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: our op -> ORT's GroupQueryAttention."""
    import numpy as np
    from onnx import numpy_helper
    from onnxscript import opset18 as op
    from onnxscript.values import Opset

    register_onnx_schema()
    ms = Opset(MS_DOMAIN, 1)
    ONE = numpy_helper.from_array(np.array(1, dtype=np.int32))

    def to_onnx(query, key, value, past_key, past_value, seqlens_k, cos_cache, sin_cache, num_heads: int,
                kv_num_heads: int, scale: float):  # fmt: skip
        # tokens so far, from the mask (seqlens_k + 1), not from the past's shape: a KV buffer of any
        # capacity can then be both past and present (ORT's shared-buffer mode, ``targets.onnx_artifact.KV_CACHE``)
        total = op.Add(op.ReduceMax(seqlens_k, keepdims=0), op.Constant(value=ONE))
        return ms.GroupQueryAttention(query, key, value, past_key, past_value, seqlens_k, total, cos_cache, sin_cache,
                                      num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale, do_rotary=1)  # fmt: skip

    return {torch.ops.packager.group_query_attention.default: to_onnx}


def unsupported(model) -> str | None:
    """Why ``model``'s attention cannot be exported as GroupQueryAttention (None: it can)."""
    for i, layer in enumerate(model.model.layers):
        att = layer.self_attn
        if getattr(att, "sliding_window", None):
            return f"layer {i} uses sliding-window attention"
        if att.q_proj.out_features == 0:
            return f"layer {i} has no attention heads"
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is None or rotary.inv_freq.numel() * 2 != model.model.layers[0].self_attn.head_dim:
        return "the rotary embedding does not cover the whole head (partial rotary)"
    return None


def rotary_caches(model) -> tuple[Tensor, Tensor]:
    """cos and sin [max_position_embeddings, head_dim/2] of the model's own rotary embedding (its scaling
    included), the tables GroupQueryAttention reads."""
    rotary = model.model.rotary_emb
    positions = torch.arange(model.config.max_position_embeddings)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    half = cos.shape[-1] // 2
    return cos[0, :, :half].float().contiguous(), sin[0, :, :half].float().contiguous()


class GQADecoder(torch.nn.Module):
    """forward(input_ids, attention_mask, *past) -> (logits, *present) for export: the model's own embedding,
    norms, projections, MLPs and head, with each attention core one ``group_query_attention`` call."""

    def __init__(self, model):
        super().__init__()
        why = unsupported(model)
        if why:
            raise ValueError(f"cannot export GroupQueryAttention: {why}")
        self.model = model
        cos, sin = rotary_caches(model)
        self.register_buffer("cos_cache", cos, persistent=False)
        self.register_buffer("sin_cache", sin, persistent=False)

    def forward(self, input_ids, attention_mask, *past):
        m = self.model.model
        seqlens_k = (attention_mask.sum(-1) - 1).to(torch.int32)
        h = m.embed_tokens(input_ids)
        present = []
        for i, layer in enumerate(m.layers):
            att = layer.self_attn
            x = layer.input_layernorm(h)
            hd = att.head_dim
            out, k, v = torch.ops.packager.group_query_attention(
                att.q_proj(x), att.k_proj(x), att.v_proj(x), past[2 * i], past[2 * i + 1], seqlens_k,
                self.cos_cache, self.sin_cache, att.q_proj.out_features // hd, att.k_proj.out_features // hd,
                float(att.scaling),
            )  # fmt: skip
            h = h + att.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            present += [k, v]
        return (self.model.lm_head(m.norm(h)), *present)
