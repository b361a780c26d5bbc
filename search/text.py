"""The shipped real English text (search/data/) and token blocks cut from it.

Three splits that share no document: ``calibration`` (importance sorting, recovery, quantizer
calibration), ``check`` (the pack's floor check: every eleventh document of calibration.txt, which the
calibration split leaves out, so nothing is fitted or trained on the documents it scores) and
``evaluation`` (held-out perplexity, the offline lm-eval tasks; it shares no sentence with the other two).
Each file holds documents separated by a blank line, paragraphs by a newline. How they were made:
benchmarks/make_text_data.py; sources and licences: search/data/SOURCES.md.
"""

from __future__ import annotations

import bisect
import re
import weakref
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from subnet.heap import return_freed_heap

DATA_DIR = Path(__file__).resolve().parent / "data"
SPLITS = ("calibration", "check", "evaluation")
# calibration.txt's documents i with i % CHECK_EVERY == CHECK_AT are the check split: an odd period takes
# every source of the round-robin interleave (benchmarks/make_text_data.py) in turn, about 8% of its text
CHECK_EVERY, CHECK_AT = 11, 5

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
    """The whole cleaned text of one split ("calibration", "check" or "evaluation")."""
    _check_split(split)
    path = DATA_DIR / ("evaluation.txt" if split == "evaluation" else "calibration.txt")
    if not path.is_file():
        raise TextError(f"{path} is missing: reinstall packager (search/data/*.txt is package data)")
    text = path.read_text(encoding="utf-8")
    if split == "evaluation":
        return text
    docs = split_documents(text)
    return "\n\n".join(d for i, d in enumerate(docs) if (i % CHECK_EVERY == CHECK_AT) == (split == "check"))


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


def spread_starts(n_tokens: int, seq_len: int, n_blocks: int, phase: float = 0.0,
                  avoid: Sequence[int] = ()) -> list[int]:
    """Token offsets of ``n_blocks`` blocks of ``seq_len`` spread evenly over ``n_tokens``: block i at
    ``(i + phase) * (n_tokens // n_blocks)``, moved just past any block (also ``seq_len`` long) starting at an
    offset in ``avoid`` that it would overlap. A block pushed out of its stride is a ``TextError``."""
    stride, taken = n_tokens // n_blocks, sorted(avoid)
    starts = []
    for i in range(n_blocks):
        start = i * stride + int(phase * stride)
        for a in taken[bisect.bisect_right(taken, start - seq_len) :]:  # ascending: moved past one, check the next
            if a >= start + seq_len:
                break
            start = a + seq_len
        if start + seq_len > min(n_tokens, (i + 1) * stride):
            raise TextError(f"text too short for {n_blocks} blocks of {seq_len} tokens around {len(avoid)} others "
                            f"({n_tokens} tokens): ask for fewer or shorter blocks")  # fmt: skip
        starts.append(start)
    return starts


def token_blocks(tokenizer, split: str, seq_len: int, n_blocks: int, phase: float = 0.0) -> torch.LongTensor:
    """``n_blocks`` non-overlapping contiguous chunks of ``seq_len`` tokens, spread evenly over the split.

    Deterministic: block i starts at token ``(i + phase) * (N // n_blocks)`` of the split's N tokens
    (``spread_starts``), so a few blocks still sample every source and genre of the split. Returns a
    LongTensor ``[n_blocks, seq_len]``.
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
    if not 0.0 <= phase < 1.0 or int(phase * stride) + seq_len > stride:
        raise TextError(f"phase {phase} does not fit blocks of {seq_len} tokens in strides of {stride}: use 0 <= phase "
                        f"<= {(stride - seq_len) / stride:.2f}")  # fmt: skip
    return _cut(ids, spread_starts(len(ids), seq_len, n_blocks, phase), seq_len)


def _cut(ids: torch.Tensor, starts: Sequence[int], seq_len: int) -> torch.LongTensor:
    return torch.stack([ids[s : s + seq_len] for s in starts])


def report_blocks(tokenizer, n_blocks: int, seq_len: int = 256) -> torch.LongTensor:
    """Evaluation-split blocks for the perplexity a scorecard or benchmark reports: each starts half a stride
    in, so with a multiple of the search's block count none overlaps the blocks (phase 0) it scored."""
    return token_blocks(tokenizer, "evaluation", seq_len, n_blocks, phase=0.5)


class Holdout(NamedTuple):
    """Blocks of one split that share no token: ``train`` and ``held`` (e.g. early stopping)."""

    train: torch.LongTensor
    held: torch.LongTensor


def holdout_blocks(tokenizer, split: str, seq_len: int, n_train: int, n_held: int, grid: int | None = None) -> Holdout:
    """(training, held-out) blocks of one split, sharing no token.

    The held-out ones are every k-th of ``grid`` blocks spread over the split (``token_blocks``; default
    ``n_train + n_held``), so they sample the whole split rather than its end. The ``n_train`` training ones
    are spread evenly over the split too, each moved just past a held-out block it would overlap: more of
    them than the grid holds gives recovery more text without moving the held-out ones.
    """
    if n_train < 1 or n_held < 1:
        raise TextError(f"holdout_blocks needs at least one block on each side (got {n_train}, {n_held})")
    grid = grid or n_train + n_held
    if grid <= n_held:
        raise TextError(f"holdout_blocks: a grid of {grid} blocks cannot hold {n_held} held-out ones plus training ones")
    _check_split(split)
    ids = split_token_ids(tokenizer, split)
    on_grid = spread_starts(len(ids), seq_len, grid)
    held_at = [on_grid[(2 * i + 1) * grid // (2 * n_held)] for i in range(n_held)]
    train_at = spread_starts(len(ids), seq_len, n_train, avoid=held_at)
    return Holdout(_cut(ids, train_at, seq_len), _cut(ids, held_at, seq_len))
