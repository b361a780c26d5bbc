"""Choosing the winner among the search's front: which candidates get a short recovery (one per format
family, then a bisection toward each family's faster members), which near miss gets the full one, and
which member of its family it steps down to where the full one misses.

Functions of search evaluations and short-recovery outcomes (a step down evaluates its new member
through the search problem); the recoveries themselves run in ``packager.pack``.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

from search.problem import Evaluation, Problem
from subnet.arch import ATTN_LINEARS, MLP_LINEARS
from subnet.formats import get_format
from subnet.spec import SubnetSpec


def candidate_key(x: list[int]) -> str:
    """A search candidate's name in work files (its encoding, comma-joined)."""
    return ",".join(map(str, x))


def spec_key(spec: SubnetSpec) -> str:
    """A digest of ``spec``, to name the work files of a recovery of it: a checkpoint resumes only into
    a recovery of the same spec (a new winner, a new name)."""
    return hashlib.sha1(spec.to_json().encode()).hexdigest()[:10]


def share_try_key(spec: SubnetSpec, narrow: list[int]) -> str:
    """A runtime's format-share try's name in work files: how many blocks it narrows and ``spec_key``."""
    return f"narrow-{len(narrow)}-{spec_key(spec)}"


def format_family(spec: SubnetSpec) -> tuple[str, ...]:
    """The narrowest format of each role (attention, MLP, embedding, LM head): the members of one family
    differ in shape and in how many blocks are narrowed, not in which formats they use."""

    def narrowest(fmts: set[str]) -> str:
        return min(fmts, key=lambda f: (get_format(f).bits, f))

    return (narrowest({ly.formats[n] for ly in spec.layers for n in ATTN_LINEARS}),
            narrowest({ly.formats[n] for ly in spec.layers for n in MLP_LINEARS}),
            spec.embed_format, spec.lm_head_format)  # fmt: skip


def shortlist_by_family(front: list[Evaluation], k: int) -> list[Evaluation]:
    """Up to ``k`` front points to give a short recovery: the most accurate of each format family
    (``format_family``), spread over the families when there are more than ``k``; when there are fewer,
    the rest spread over the remaining front. Most accurate first.

    Recovery wins back different amounts per format (iq4_nl far more than q4_0 on SmolLM2), so every
    family gets its best chance instead of an even spread over perplexity that can skip one entirely.
    """
    best: dict[tuple[str, ...], Evaluation] = {}
    for e in sorted(front, key=lambda e: e.ppl):
        best.setdefault(format_family(e.spec_obj()), e)
    picks = spread(list(best.values()), k)
    picks += spread([e for e in front if e not in picks], k - len(picks))
    return sorted(picks, key=lambda e: e.ppl)


def spread(front: list[Evaluation], k: int) -> list[Evaluation]:
    """Up to ``k`` front points spread evenly over it, the most accurate (slowest) first."""
    by_ppl = sorted(front, key=lambda e: e.ppl)
    if len(by_ppl) <= k or k < 1:
        return by_ppl[: max(k, 0)]
    return [by_ppl[round(i * (len(by_ppl) - 1) / (k - 1))] for i in range(k)] if k > 1 else by_ppl[:1]


def promotion_candidate(tried: list[dict], margin: float, faster_than: float | None) -> dict | None:
    """The fastest short-recovered candidate that missed the floor by at most ``margin`` (relative) and
    is faster than ``faster_than`` (the fastest one that met it; None when none did), if any."""
    near = [t for t in tried if not t["meets_floor"] and t["floor_ppl_after"] <= t["floor_ppl_limit"] * (1 + margin)
            and (faster_than is None or t["evaluation"]["decode_ms"] < faster_than)]  # fmt: skip
    return min(near, key=lambda t: t["evaluation"]["decode_ms"]) if near else None


def stepped_down(problem: Problem, e: Evaluation, faster_than: float | None) -> Evaluation | None:
    """The member of ``e``'s family at the next lower format share that differs from it
    (``SearchSpace.widened``: its most rounding-sensitive blocks back at the widest formats), evaluated by
    ``problem``, where it meets the cost budgets and is predicted faster than ``faster_than`` (the fastest
    candidate that met the floor; None when none did); else None.

    The search ranks members before recovery, so a family's front can skip the member that recovery
    brings under the floor: under a 92 MiB budget on the Xeon it held only all-30-block 4-bit members,
    and the one promoted missed the floor by 0.8% (stop 43)."""
    here = e.spec_obj().to_dict()
    x = problem.space.widened(e.x)
    while x is not None and problem.space.decode(x).to_dict() == here:  # the same blocks narrowed at that share
        x = problem.space.widened(x)
    if x is None:
        return None
    down = problem.evaluate(x)
    if problem.cost_violation(vars(down)) > 0 or (faster_than is not None and down.decode_ms >= faster_than):
        return None
    return down


def ladder_probes(front: list[Evaluation], tried: list[dict]) -> list[Evaluation]:
    """The next member to short-recover in each format family whose fastest tried member met the floor.

    A family's front members, most accurate first, form a ladder: recovery is assumed to fail from some
    rung on. Between the last rung known to meet the floor and the first known to miss it (or the end of
    the ladder) the middle one is probed, so a family of n members needs about log2(n) short recoveries
    to find its fastest member that recovers. ``tried`` holds ``Pack.short_recoveries`` outcomes.
    """
    outcome = {candidate_key(t["evaluation"]["x"]): t["meets_floor"] for t in tried}
    ladders: dict[tuple[str, ...], list[Evaluation]] = defaultdict(list)
    for e in sorted(front, key=lambda e: e.ppl):
        ladders[format_family(e.spec_obj())].append(e)
    probes = []
    for rungs in ladders.values():
        met = [i for i, e in enumerate(rungs) if outcome.get(candidate_key(e.x)) is True]
        if not met:
            continue
        missed = [i for i, e in enumerate(rungs) if outcome.get(candidate_key(e.x)) is False and i > met[-1]]
        lo, hi = met[-1], min(missed, default=len(rungs))
        if hi - lo >= 2:
            probes.append(rungs[(lo + hi) // 2])
    return probes
