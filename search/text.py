"""The shipped real English text (search/data/) and token blocks cut from it.

Two splits that share no document and no sentence: ``calibration`` (importance sorting, recovery,
quantizer calibration) and ``evaluation`` (held-out perplexity, the offline lm-eval tasks). Each file holds
documents separated by a blank line, paragraphs by a newline. How they were made:
benchmarks/make_text_data.py; sources and licences: search/data/SOURCES.md.
"""

from __future__ import annotations

import re
import weakref
from functools import lru_cache
from pathlib import Path

import torch

from subnet.heap import return_freed_heap

DATA_DIR = Path(__file__).resolve().parent / "data"
SPLITS = ("calibration", "evaluation")

# a sentence ends at . ! ? (plus closing quotes/brackets) followed by space and an opening capital/quote,
# unless the word before is a known abbreviation or a single initial ("J. R. Kennedy")
_ABBREVS = ("Mr", "Mrs", "Ms", "Dr", "St", "Jr", "Sr", "vs", "No", "ca", "c", "i.e", "e.g", "Mt", "Gen", "Col")
_NOT_AN_END = "".join(rf"(?<!\b{re.escape(a)}\.)" for a in _ABBREVS) + r"(?<!\b[A-Z]\.)"
_SENTENCE_END = re.compile(r"(?<=[.!?])" + _NOT_AN_END + r"""(["'\u201d\u2019)\]]*)\s+(?=["'\u201c\u2018(\[]?[A-Z0-9])""")


class TextError(ValueError):
    """A request the shipped text cannot serve, with the reason and the fix in one line."""


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise TextError(f"unknown text split {split!r}: use one of {', '.join(SPLITS)}")


@lru_cache(maxsize=None)
def load_text(split: str) -> str:
    """The whole cleaned text of one split ("calibration" or "evaluation")."""
    _check_split(split)
    path = DATA_DIR / f"{split}.txt"
    if not path.is_file():
        raise TextError(f"{path} is missing: reinstall packager (search/data/*.txt is package data)")
    return path.read_text(encoding="utf-8")


def split_documents(text: str) -> list[str]:
    """The documents of a split's text (separated by blank lines)."""
    return [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]


def document_sentences(doc: str) -> list[str]:
    """The sentences of a document, paragraph by paragraph (rule-based; good enough for prose)."""
    out = []
    for para in doc.split("\n"):
        parts = _SENTENCE_END.split(para.strip())
        # re.split returns [sent, closer, sent, closer, ...]: glue each closer back onto its sentence
        for i in range(0, len(parts), 2):
            s = (parts[i] + (parts[i + 1] if i + 1 < len(parts) else "")).strip()
            if s:
                out.append(s)
    return out


def documents(split: str) -> list[str]:
    """The documents of one split."""
    return split_documents(load_text(split))


_TOKEN_CACHE: dict[tuple[int, str], tuple[weakref.ref, torch.Tensor]] = {}


def split_token_ids(tokenizer, split: str) -> torch.Tensor:
    """All token ids of a split (no special tokens), cached per tokenizer object."""
    key = (id(tokenizer), split)
    hit = _TOKEN_CACHE.get(key)
    if hit is not None and hit[0]() is tokenizer:
        return hit[1]
    ids = tokenizer(load_text(split), add_special_tokens=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    return_freed_heap()  # the tokenizer's per-token encodings of the whole split (~280 MiB) are freed by now
    try:
        ref = weakref.ref(tokenizer)
    except TypeError:  # an object without weakref support: do not cache
        return ids
    _TOKEN_CACHE[key] = (ref, ids)
    return ids


def token_blocks(tokenizer, split: str, seq_len: int, n_blocks: int, phase: float = 0.0) -> torch.LongTensor:
    """``n_blocks`` non-overlapping contiguous chunks of ``seq_len`` tokens, spread evenly over the split.

    Deterministic: block i starts at token ``(i + phase) * (N // n_blocks)`` of the split's N tokens, so a
    few blocks still sample every source and genre of the split. Returns a LongTensor ``[n_blocks, seq_len]``.
    """
    _check_split(split)
    if seq_len < 2 or n_blocks < 1:
        raise TextError(f"token_blocks needs seq_len >= 2 and n_blocks >= 1 (got {seq_len}, {n_blocks})")
    ids = split_token_ids(tokenizer, split)
    need = seq_len * n_blocks
    if need > len(ids):
        raise TextError(
            f"{split} text too short: {len(ids)} tokens, need {need} ({n_blocks} blocks of {seq_len}): "
            "ask for fewer or shorter blocks"
        )
    stride = len(ids) // n_blocks
    shift = int(phase * stride)
    if not 0.0 <= phase < 1.0 or shift + seq_len > stride:
        raise TextError(f"phase {phase} does not fit blocks of {seq_len} tokens in strides of {stride}: use 0 <= phase "
                        f"<= {(stride - seq_len) / stride:.2f}")  # fmt: skip
    return torch.stack([ids[i * stride + shift : i * stride + shift + seq_len] for i in range(n_blocks)])


def report_blocks(tokenizer, n_blocks: int, seq_len: int = 256) -> torch.LongTensor:
    """Evaluation-split blocks for the perplexity a scorecard or benchmark reports: each starts half a stride
    in, so with a multiple of the search's block count none overlaps the blocks (phase 0) it scored."""
    return token_blocks(tokenizer, "evaluation", seq_len, n_blocks, phase=0.5)


def holdout_blocks(tokenizer, split: str, seq_len: int, n_train: int, n_held: int,
                   grid: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) blocks of one split, sharing no token.

    The held-out ones are every k-th of ``grid`` blocks spread over the split (``token_blocks``; default
    ``n_train + n_held``), so they sample the whole split rather than its end. The ``n_train`` training ones
    are spread evenly over the split too, each moved just past a held-out block it would overlap: more of
    them than the grid holds gives recovery more text without moving the held-out blocks.
    """
    if n_train < 1 or n_held < 1:
        raise TextError(f"holdout_blocks needs at least one block on each side (got {n_train}, {n_held})")
    grid = grid or n_train + n_held
    if grid <= n_held:
        raise TextError(f"holdout_blocks: a grid of {grid} blocks cannot hold {n_held} held-out ones plus training ones")
    held_index = [(2 * i + 1) * grid // (2 * n_held) for i in range(n_held)]
    held = token_blocks(tokenizer, split, seq_len, grid)[held_index]
    ids = split_token_ids(tokenizer, split)
    held_at = [i * (len(ids) // grid) for i in held_index]
    stride = len(ids) // n_train
    train = []
    for i in range(n_train):
        start = i * stride
        for h in held_at:  # ascending: a block moved past one held-out block is checked against the next
            if start < h + seq_len and h < start + seq_len:
                start = h + seq_len
        if start + seq_len > min(len(ids), (i + 1) * stride):
            raise TextError(f"{split} text too short for {n_train} training blocks of {seq_len} tokens around "
                            f"{n_held} held-out ones ({len(ids)} tokens): ask for fewer or shorter blocks")  # fmt: skip
        train.append(ids[start : start + seq_len])
    return torch.stack(train), held
