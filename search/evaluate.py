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


def perplexity_ratio(base_nll, other_nll, tokens_per_block: int, n_boot: int = 2000, seed: int = 0) -> dict:
    """Perplexity of one model over another's on the same blocks, with a paired bootstrap 95% interval.

    ``base_nll`` and ``other_nll`` are per-block summed NLLs (``nll_per_block``, or a runtime's
    ``targets.backend.runner_nll_per_block``) of the same equal-length blocks. Blocks are resampled in
    pairs, so text that is hard for both models does not widen the interval. Returns ``ratio``, ``low``,
    ``high`` (perplexity ratios) and ``blocks``.
    """
    base = torch.as_tensor(base_nll, dtype=torch.float64).flatten()
    other = torch.as_tensor(other_nll, dtype=torch.float64).flatten()
    if other.numel() != base.numel() or base.numel() < 2 or tokens_per_block < 1:
        raise EvaluateError(f"need per-block NLLs of the same >= 2 blocks for both models (got {base.numel()} and "
                            f"{other.numel()}) and tokens_per_block >= 1: score both on the same blocks")  # fmt: skip
    diff = other - base
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, diff.numel(), (n_boot, diff.numel()), generator=gen)
    boots = torch.exp(diff[picks].mean(1) / tokens_per_block)
    low, high = torch.quantile(boots, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"ratio": math.exp(diff.mean().item() / tokens_per_block), "low": low, "high": high, "blocks": diff.numel()}
