"""Exact token-level perplexity of a causal LM over fixed token blocks (see search.text.token_blocks).

Every block is full length, so there is no padding: each block of L tokens contributes L-1 predicted
tokens, and perplexity = exp(sum of their negative log-likelihoods / their count). Works for any object
that behaves like an HF causal LM (``model(input_ids=...)`` returning ``.logits`` or a tuple whose first
item is the logits): an extracted sub-network, a model whose forward a supernet view patches, a PEFT model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class EvaluateError(ValueError):
    """Blocks that cannot be scored, with the reason and the fix in one line."""


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _check_blocks(blocks: torch.Tensor) -> None:
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.dtype != torch.long:
        raise EvaluateError("blocks must be a LongTensor [n_blocks, seq_len]: build them with search.text.token_blocks")
    if blocks.shape[0] < 1 or blocks.shape[1] < 2:
        raise EvaluateError(f"blocks of shape {tuple(blocks.shape)} predict no token: need >= 1 block of >= 2 tokens")


def nll_per_block(model, blocks: torch.LongTensor, batch_size: int = 4, progress: bool = False) -> torch.Tensor:
    """Summed negative log-likelihood (nats, float64) of each block's predicted tokens: shape [n_blocks]."""
    _check_blocks(blocks)
    if batch_size < 1:
        raise EvaluateError(f"batch_size must be >= 1 (got {batch_size})")
    device = _device_of(model)
    sums = torch.empty(blocks.shape[0], dtype=torch.float64)
    starts = range(0, blocks.shape[0], batch_size)
    if progress:
        from rich.progress import track

        starts = track(starts, description="perplexity", total=len(starts))
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()  # dropout off while scoring; the caller's mode is restored below
    try:
        with torch.inference_mode():
            for start in starts:
                batch = blocks[start : start + batch_size].to(device)
                out = model(input_ids=batch, use_cache=False)
                logits = out.logits if hasattr(out, "logits") else out[0]
                logits = logits[:, :-1].float()
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
                sums[start : start + batch.shape[0]] = nll.view(batch.shape[0], -1).double().sum(1).cpu()
    finally:
        if was_training:
            model.train()
    return sums


def perplexity(model, blocks: torch.LongTensor, batch_size: int = 4, progress: bool = False) -> float:
    """exp(mean NLL) over every predicted token of every block."""
    sums = nll_per_block(model, blocks, batch_size=batch_size, progress=progress)
    mean = sums.sum().item() / (blocks.shape[0] * (blocks.shape[1] - 1))
    return math.exp(mean)
