"""Weight-sharing supernet view: run any SubnetSpec of a loaded model in place, without weight copies.

The base model's parameters are read through slices (views for prefixes, which an importance-sorted
base makes the common case); switching specs only swaps a small description. The forward pass is
written out here in one readable function (LitGPT-style) so that every sub-network, including
per-layer head counts, MLP widths, dropped layers and a narrower hidden size, runs through the same
code. Quantization is simulated per linear with the spec's formats, computed layer by layer during
the forward pass so that at most one layer's quantized copy exists at a time; formats whose block
scales come from a search (iq4_nl) search them once per base weight and round every slice with them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from subnet.arch import LINEARS, arch_of, linear_of
from subnet.extract import layer_index_sets
from subnet.formats import get_format
from subnet.heap import free_large_blocks_eagerly, return_freed_heap
from subnet.quant import KEPT_SCALE_FORMATS, block_scales, fake_quantize, round_to_scales
from subnet.spec import SubnetSpec


def _compact(idx: torch.Tensor) -> int | torch.Tensor:
    """A prefix index list becomes its length (sliced as a view); anything else stays a gather index."""
    n = idx.numel()
    return n if torch.equal(idx, torch.arange(n)) else idx


def _take(w: torch.Tensor, idx: int | slice | torch.Tensor | None, dim: int) -> torch.Tensor:
    """Index ``w`` along ``dim``: a view for a prefix length or a slice, a gather for an index tensor."""
    if idx is None:
        return w
    if isinstance(idx, int):
        return w if idx == w.shape[dim] else w.narrow(dim, 0, idx)
    if isinstance(idx, slice):
        return w.narrow(dim, idx.start, idx.stop - idx.start)
    return w.index_select(dim, idx)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class Supernet:
    """A view of ``model`` that computes the sub-network of the active spec."""

    def __init__(self, model):
        free_large_blocks_eagerly()
        self.model = model.eval()
        self.arch = arch_of(model.config)
        self.eps = model.config.rms_norm_eps
        self.spec: SubnetSpec = SubnetSpec.full(self.arch)
        self.simulate_quantization = True
        self._plan = None
        self._scales: dict[tuple, tuple[int, torch.Tensor]] = {}
        self.activate(self.spec)

    # ---- activation ---------------------------------------------------------------------
    def activate(self, spec: SubnetSpec) -> "Supernet":
        """Make ``spec`` the active sub-network (validated against the base; no weights move)."""
        spec.validate(self.arch)
        self._plan = {
            "hidden": _compact(torch.tensor(spec.hidden_index(), dtype=torch.long)),
            "layers": [(ly, {k: _compact(v) for k, v in layer_index_sets(spec, ly).items()}) for ly in spec.layers],
        }
        self.spec = spec
        return self

    def _weight(self, w: torch.Tensor, rows, cols, fmt: str) -> torch.Tensor:
        part = _take(_take(w, rows, 0), cols, 1)
        if not self.simulate_quantization or fmt == "f32":
            return part
        if fmt in KEPT_SCALE_FORMATS and not isinstance(cols, torch.Tensor):  # a column prefix
            scales = _take(self._block_scales(w, fmt), rows, 0)
            return round_to_scales(part, scales[:, : part.shape[1] // get_format(fmt).block], fmt)
        return fake_quantize(part, fmt)

    def prepare(self, formats) -> "Supernet":
        """Search the block scales of every base weight in each kept-scale format of ``formats`` now,
        in one pass before a sweep (searched lazily mid-sweep instead, they raised a SmolLM2 sweep's
        peak RSS by ~30 MiB, measured), so candidates only round. Other formats need nothing."""
        fmts = [f for f in dict.fromkeys(formats) if f in KEPT_SCALE_FORMATS]
        if not fmts:
            return self
        m = self.model.model
        weights = [m.embed_tokens.weight, self._head_weight()[0]]
        weights += [linear_of(layer, name).weight for layer in m.layers for name in LINEARS]
        for w in {id(w): w for w in weights}.values():
            for fmt in fmts:
                if w.shape[1] % get_format(fmt).block == 0:
                    self._block_scales(w, fmt)
        return_freed_heap(collect=False)
        return self

    def _block_scales(self, w: torch.Tensor, fmt: str) -> torch.Tensor:
        """The block scales of a whole base weight in a kept-scale format, searched once and kept
        (~0.125 bytes per weight) until the weight changes in place."""
        key = (w.data_ptr(), tuple(w.shape), fmt)
        hit = self._scales.get(key)
        if hit is None or hit[0] != w._version:
            hit = self._scales[key] = (w._version, block_scales(w, fmt))
        return hit[1]

    # ---- forward ------------------------------------------------------------------------
    @torch.inference_mode()
    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states [batch, seq, hidden] of the active sub-network (no autograd).

        One row at a time through each block: measured on a SmolLM2 sweep, ~8 MiB lower peak than two
        rows for ~4% more time.
        """
        return self.forward_hidden(input_ids, micro_batch=1)

    def forward_hidden(self, input_ids: torch.Tensor, micro_batch: int = 2) -> torch.Tensor:
        """``hidden_states`` with autograd left to the caller (for training on the shared weights).

        Layer by layer: each layer's weights are rounded once, then applied to ``micro_batch`` rows
        of the batch at a time, so activations stay small while rounding costs the same.
        """
        m, spec, plan = self.model.model, self.spec, self._plan
        hid = plan["hidden"]
        # only the rows the input uses are rounded (every format rounds rows independently)
        used, where = torch.unique(input_ids, return_inverse=True)
        x = F.embedding(where, self._weight(m.embed_tokens.weight, used, hid, spec.embed_format))
        pos = torch.arange(input_ids.shape[1]).unsqueeze(0)
        cos, sin = m.rotary_emb(x, pos)
        for ly, idx in plan["layers"]:
            layer = m.layers[ly.index]
            w = self._layer_weights(layer, ly, idx)
            x = torch.cat([self._block(layer, ly, w, xs, cos, sin) for xs in x.split(micro_batch)])
            del w  # before the next layer's are rounded: one layer's rounded copy at a time
        return _rms_norm(x, _take(m.norm.weight, hid, 0), self.eps)

    def _layer_weights(self, layer, ly, idx) -> dict:
        """The layer's weights and biases sliced to the spec (and rounded to its formats)."""
        hid, att, mlp, f = self._plan["hidden"], layer.self_attn, layer.mlp, ly.formats
        rows = {"q_proj": (att.q_proj, idx["q"], hid), "k_proj": (att.k_proj, idx["kv"], hid),
                "v_proj": (att.v_proj, idx["kv"], hid), "o_proj": (att.o_proj, hid, idx["q"]),
                "gate_proj": (mlp.gate_proj, idx["mlp"], hid), "up_proj": (mlp.up_proj, idx["mlp"], hid),
                "down_proj": (mlp.down_proj, hid, idx["mlp"])}  # fmt: skip
        return {name: (self._weight(lin.weight, r, c, f[name]), _bias(lin, r)) for name, (lin, r, c) in rows.items()}

    def _block(self, layer, ly, w: dict, x: torch.Tensor, cos, sin) -> torch.Tensor:
        """One decoder block on ``x`` [batch, seq, hidden] with the prepared weights ``w``."""
        hid, hd = self._plan["hidden"], self.arch.head_dim
        bsz, seq = x.shape[:2]
        h = _rms_norm(x, _take(layer.input_layernorm.weight, hid, 0), self.eps)
        q = F.linear(h, *w["q_proj"]).view(bsz, seq, ly.heads, hd).transpose(1, 2)
        k = F.linear(h, *w["k_proj"]).view(bsz, seq, ly.kv_heads, hd).transpose(1, 2)
        v = F.linear(h, *w["v_proj"]).view(bsz, seq, ly.kv_heads, hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=ly.heads != ly.kv_heads)
        x = x + F.linear(a.transpose(1, 2).reshape(bsz, seq, ly.heads * hd), *w["o_proj"])
        h = _rms_norm(x, _take(layer.post_attention_layernorm.weight, hid, 0), self.eps)
        g, u = F.linear(h, *w["gate_proj"]), F.linear(h, *w["up_proj"])
        return x + F.linear(layer.mlp.act_fn(g) * u, *w["down_proj"])

    def lm_head(self) -> torch.Tensor:
        """The active sub-network's output projection weight [vocab, hidden] (formats simulated)."""
        head, fmt = self._head_weight()
        return self._weight(head, None, self._plan["hidden"], fmt)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, seq, vocab] of the active sub-network."""
        return F.linear(self.hidden_states(input_ids), self.lm_head())

    @torch.inference_mode()
    def nll(self, blocks: torch.Tensor, vocab_chunk: int = 256) -> tuple[float, int]:
        """Summed next-token negative log-likelihood over ``blocks`` [n, seq] and the token count.

        The LM head is rounded and applied ``vocab_chunk`` rows at a time with a running log-sum-exp,
        so neither the rounded head nor the full [tokens, vocab] logits ever exist at once.
        """
        h = self.hidden_states(blocks)[:, :-1].reshape(-1, self.spec.hidden_size)
        target = blocks[:, 1:].reshape(-1)
        head, fmt = self._head_weight()
        lse = torch.full((target.numel(),), float("-inf"))
        picked = torch.zeros(target.numel())
        for v0 in range(0, head.shape[0], vocab_chunk):
            rows = slice(v0, min(v0 + vocab_chunk, head.shape[0]))
            lg = F.linear(h, self._weight(head, rows, self._plan["hidden"], fmt)).float()
            lse = torch.logaddexp(lse, torch.logsumexp(lg, 1))
            hit = (target >= v0) & (target < v0 + lg.shape[1])
            picked[hit] = lg[hit, target[hit] - v0]
        return float((lse - picked).sum()), int(target.numel())

    def _head_weight(self) -> tuple[torch.Tensor, str]:
        """The base output projection (the embedding when tied) and the spec's format for it."""
        if self.arch.tie_word_embeddings:
            return self.model.model.embed_tokens.weight, self.spec.embed_format
        return self.model.lm_head.weight, self.spec.lm_head_format

    def perplexity(self, blocks: torch.Tensor, batch_blocks: int = 4) -> float:
        """Perplexity of the active sub-network on ``blocks`` (quantization simulated).

        ``batch_blocks`` blocks per pass: measured on SmolLM2 (256-token blocks), 4 instead of 8 lowers a
        candidate's transient memory by ~20 MiB for ~10% more time (each pass rounds the weights again).
        """
        total, count = 0.0, 0
        for s in range(0, blocks.shape[0], batch_blocks):
            t, c = self.nll(blocks[s : s + batch_blocks])
            total, count = total + t, count + c
        return_freed_heap(collect=False)  # the candidate's rounded weights and activations
        return float(torch.exp(torch.tensor(total / count)))


def _bias(linear, rows):
    return None if linear.bias is None else _take(linear.bias, rows, 0)
