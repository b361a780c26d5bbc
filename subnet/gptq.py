"""GPTQ (Frantar et al. 2023) rounding for the block formats whose scales are kept beside the weights.

Round-to-nearest rounds every weight on its own. GPTQ rounds a linear's input columns one at a time and
moves the error each rounding makes onto the columns not yet rounded, weighted by the inverse Hessian
``(X^T X)^-1`` of the linear's inputs on calibration text, so the layer's *outputs* stay close to the
float ones. Layers are done in order, each fed the outputs of the layers before it as the runtime will
compute them (every weight already rounded).

A block's scale is ggml's (``block_scales``: iq4_nl's search, q4_0's absmax rule) on the block's
compensated weights when GPTQ reaches its first column (the "dynamic groups" of GPTQ). The model keeps
each column as GPTQ found it when rounding it (float, compensated), and the scales: ``round_to_scales``
at them gives GPTQ's rounding, quantization-aware recovery trains from there and keeps them, and the
exporters write the codes at them (``encode_to_scales`` for GGUF, ``block_codes`` for ONNX Runtime's
int4s_b32, q4_0's twin). Formats whose scales are not kept (q8_0, q5_0, ...) are left to
round-to-nearest: their exporters recompute the scales from the weights.
"""

from __future__ import annotations

import torch

from subnet.arch import LINEARS, linear_of
from subnet.formats import get_format
from subnet.quant import (
    KEPT_SCALE_FORMATS,
    block_scales,
    fake_quantize,
    quantized_weights,
    round_at_scale,
    round_to_scales,
)

# linears that read one input, in the order a decoder layer computes those inputs
_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


class _Caught(Exception):
    """Raised by a forward hook once it has the input it wanted: the forward stops there."""


def _first_layer_inputs(model, blocks: torch.Tensor, micro_batch: int) -> list[tuple[torch.Tensor, dict]]:
    """The first decoder layer's (hidden states, keyword arguments) for each micro-batch of ``blocks``."""
    caught: list[tuple[torch.Tensor, dict]] = []

    def hook(_mod, args, kwargs):
        caught.append((args[0] if args else kwargs.pop("hidden_states"), kwargs))
        raise _Caught

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, blocks.shape[0], micro_batch):
            try:
                model.model(blocks[i : i + micro_batch], use_cache=False)
            except _Caught:
                pass
    finally:
        handle.remove()
    return caught


def _hessian(layer, name: str, batches: list[tuple[torch.Tensor, dict]]) -> torch.Tensor:
    """x^T x summed over every token of the input of ``layer``'s linear ``name`` (the layer's forward
    stops there: what comes after it is not needed)."""
    acc = []

    def grab(_mod, inp):
        x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
        acc.append((x.T @ x).double())
        raise _Caught

    handle = linear_of(layer, name).register_forward_pre_hook(grab)
    try:
        for h, kwargs in batches:
            try:
                layer(h, **kwargs)
            except _Caught:
                pass
    finally:
        handle.remove()
    return sum(acc)


def gptq_weight(weight: torch.Tensor, hessian: torch.Tensor, fmt: str, damp: float = 0.01,
                lazy_block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """GPTQ of ``weight`` [out, in] in ``fmt`` (a kept-scale format) with ``hessian`` [in, in] (x^T x of
    its inputs), damped by ``damp`` x its mean diagonal: (compensated weight, block scales).

    The compensated weight is each column as GPTQ found it when rounding it (the earlier columns' error
    moved onto it), still float: ``round_to_scales`` at the scales gives GPTQ's rounded weight. Keeping it
    float rather than on the grid lets quantization-aware training move it across rounding boundaries.
    """
    block = get_format(fmt).block
    w = weight.detach().double().clone()
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += torch.eye(h.shape[0], dtype=h.dtype) * damp * torch.diag(h).mean()
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    cols = w.shape[1]
    scales = torch.zeros(w.shape[0], cols // block, dtype=torch.float32)
    comp = torch.zeros_like(w)
    lazy_block = max(block, lazy_block // block * block)
    for i1 in range(0, cols, lazy_block):
        i2 = min(i1 + lazy_block, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for g in range(0, i2 - i1, block):
            s = block_scales(w1[:, g : g + block].float(), fmt)
            scales[:, (i1 + g) // block] = s[:, 0]
            for i in range(g, g + block):
                col = w1[:, i : i + 1].clone()
                qc = round_at_scale(col.float(), s, fmt).double()
                e = (col - qc) / hinv1[i, i]
                w1[:, i:] -= e * hinv1[i, i:].unsqueeze(0)
                comp[:, i1 + i] = col[:, 0]
                err1[:, i] = e[:, 0]
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return comp.to(weight.dtype), scales


@torch.no_grad()
def gptq_round(model, spec, blocks: torch.Tensor, damp: float = 0.01, micro_batch: int = 8,
               progress: bool = True) -> dict[str, torch.Tensor]:  # fmt: skip
    """GPTQ for ``model``'s (an extracted sub-network of ``spec``) kept-scale-format linears on
    calibration ``blocks`` [n, seq]: each weight is replaced in place by its compensated weight
    (``gptq_weight``); returns module name -> the block scales to round it at (``round_to_scales``,
    ``fake_quantize_model(block_scales=...)``, the exporters) to get GPTQ's rounding.

    The other weights are left as they are; while the layers are fed forward they are rounded through
    their spec formats (and put back after), so each layer sees its inputs as the runtime computes them.
    Returns {} (and leaves the model alone) when the spec uses no kept-scale format.
    """
    from rich.progress import Progress

    plan = quantized_weights(model, spec)
    if not any(fmt in KEPT_SCALE_FORMATS for *_, fmt in plan):
        return {}
    saved = {}
    for _name, m, fmt in plan:  # every weight as the runtime holds it; kept-scale linears are replaced below
        saved[m] = m.weight.data.clone()
        if fmt not in KEPT_SCALE_FORMATS:
            m.weight.data.copy_(fake_quantize(m.weight.data, fmt))
    kept: dict[str, torch.Tensor] = {}
    compensated: dict[torch.nn.Module, torch.Tensor] = {}
    names = {id(m): n for n, m in model.named_modules()}
    try:
        batches = _first_layer_inputs(model, blocks, micro_batch)
        with Progress(transient=True, disable=not progress) as bar:
            task = bar.add_task("GPTQ rounding", total=len(spec.layers))
            for layer, ly in zip(model.model.layers, spec.layers):
                todo = [n for n in LINEARS if ly.formats[n] in KEPT_SCALE_FORMATS]
                for n in todo:  # float until its turn: GPTQ compensates the error of what it rounds itself
                    linear_of(layer, n).weight.data.copy_(saved[linear_of(layer, n)])
                for group in _GROUPS:  # in the order the inputs are computed: each sees its producers rounded
                    names_here = [n for n in group if n in todo]
                    if not names_here:
                        continue
                    hess = _hessian(layer, names_here[0], batches)  # the group shares its input
                    for n in names_here:
                        lin = linear_of(layer, n)
                        w, s = gptq_weight(lin.weight.data, hess, ly.formats[n], damp)
                        lin.weight.data.copy_(round_to_scales(w, s, ly.formats[n]))  # rounded for what follows
                        compensated[lin], kept[names[id(lin)]] = w, s
                batches = [(layer(h, **kwargs), kwargs) for h, kwargs in batches]
                bar.advance(task)
    finally:
        for m, w in (saved | compensated).items():
            m.weight.data.copy_(w)
    return kept


@torch.no_grad()
def swap_compensation(model, old, new, linears) -> None:
    """Swap GPTQ's error compensation in ``model``, a sub-network trained from ``old``, for ``new``'s, in
    place, for the (layer index, linear name) pairs ``linears``: each of those weights gets ``new``'s
    minus ``old``'s added. ``old`` and ``new`` are ``gptq_round``'s outputs for the same extracted weights
    in two specs, or one of them those plain weights (to take compensation out, or put it in). What
    training changed stays; the compensation, which offsets the rounding errors of one format at its
    scales, is exchanged for the other's."""
    for i, name in linears:
        w = linear_of(model.model.layers[i], name).weight
        w += linear_of(new.model.layers[i], name).weight - linear_of(old.model.layers[i], name).weight
