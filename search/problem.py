"""The search problem: objectives (perplexity, predicted latency), budgets, and memoized evaluation.

Accuracy is held-out perplexity of the candidate run through the supernet view with its weight
formats simulated. Latency, memory and size come from a cost function (the target's profile), so
they are cheap. Every evaluation is memoized by its choice vector: a strategy replayed from the
same seed over a saved cache continues exactly where it stopped, which is how ``--resume`` works.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from search.space import SearchSpace
from subnet.spec import SubnetSpec


class BudgetExhausted(Exception):
    """Raised by Problem.evaluate once the evaluation budget is spent."""


class InfeasibleBudget(ValueError):
    """No evaluated candidate meets the budgets; carries the closest one."""

    def __init__(self, message: str, closest=None):
        super().__init__(message)
        self.closest = closest


@dataclass
class Budgets:
    """Constraints. ``max_ppl_increase`` is the accuracy floor: perplexity ≤ base · (1 + it)."""

    latency_ms: float | None = None  # decode ms/token on the target
    prefill_ms: float | None = None
    memory_mb: float | None = None
    size_mb: float | None = None
    max_ppl_increase: float | None = None

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in asdict(self).items() if v is not None]
        return ", ".join(parts) or "none"


@dataclass
class Evaluation:
    """One candidate, evaluated: accuracy for real, cost from the profile."""

    x: list[int]
    ppl: float
    decode_ms: float
    prefill_ms: float
    memory_mb: float
    size_mb: float
    params: int
    violation: float  # 0 when every budget is met; otherwise the sum of relative overshoots
    spec: dict = field(repr=False)

    @property
    def feasible(self) -> bool:
        return self.violation == 0.0

    def spec_obj(self) -> SubnetSpec:
        return SubnetSpec.from_dict(self.spec)


CostFn = Callable[[SubnetSpec], dict]


class Problem:
    """Joint search problem over ``space``: minimize (perplexity, decode latency) under budgets."""

    def __init__(
        self,
        space: SearchSpace,
        supernet,
        eval_blocks: torch.Tensor,
        calib_blocks: torch.Tensor,
        cost_fn: CostFn,
        budgets: Budgets | None = None,
        base_ppl: float | None = None,
    ):
        self.space, self.supernet, self.cost_fn = space, supernet, cost_fn
        supernet.prepare(space.formats)
        self.eval_blocks, self.calib_blocks = eval_blocks, calib_blocks
        self.budgets = budgets or Budgets()
        self.cache: dict[tuple, Evaluation] = {}
        self.history: list[tuple] = []  # order in which new candidates were evaluated
        self.budget: int | None = None
        self.on_evaluation: Callable[[Evaluation], None] | None = None
        self.base_ppl = base_ppl
        self.latency_budget_ms = self.budgets.latency_ms

    # ---- pieces strategies use ----------------------------------------------------------------
    def cost_of(self, spec: SubnetSpec) -> dict:
        """Predicted cost of a spec on the target (decode_ms, prefill_ms, memory_mb, size_mb)."""
        return self.cost_fn(spec)

    def accuracy(self, spec: SubnetSpec) -> float:
        """Held-out perplexity of ``spec`` with its formats simulated."""
        return self.supernet.activate(spec).perplexity(self.eval_blocks)

    @property
    def n_evals(self) -> int:
        return len(self.history)

    def reference_ppl(self) -> float:
        """Perplexity of the base model at the widest offered formats (the accuracy reference)."""
        if self.base_ppl is None:
            self.base_ppl = self.accuracy(self.space.decode(self.space.largest()))
        return self.base_ppl

    # ---- evaluation ---------------------------------------------------------------------------
    def cost_violation(self, cost: dict) -> float:
        """The sum of ``cost``'s relative overshoots of the latency, prefill, memory and size budgets (0: all met)."""
        b, v = self.budgets, 0.0
        for limit, value in ((b.latency_ms, cost["decode_ms"]), (b.prefill_ms, cost["prefill_ms"]),
                             (b.memory_mb, cost["memory_mb"]), (b.size_mb, cost["size_mb"])):  # fmt: skip
            if limit is not None and value > limit:
                v += value / limit - 1
        return v

    def violation(self, ppl: float, cost: dict) -> float:
        """``cost_violation`` plus the relative overshoot of the accuracy floor by ``ppl``."""
        b, v = self.budgets, self.cost_violation(cost)
        if b.max_ppl_increase is not None:
            limit = self.reference_ppl() * (1 + b.max_ppl_increase)
            if ppl > limit:
                v += ppl / limit - 1
        return v

    def evaluate(self, x) -> Evaluation:
        """Evaluate a choice vector (memoized; a new one counts against the budget). Vectors that decode to
        the same sub-network (a dropped block's widths, a format share at the widest formats) share one
        evaluation, memoized under the spec's own encoding."""
        key = self.canonical(x)
        if key in self.cache:
            ev = self.cache[key]
            if key not in self.history:
                self.history.append(key)  # replayed from a checkpoint
            return ev
        if self.budget is not None and self.n_evals >= self.budget:
            raise BudgetExhausted
        spec = self.space.decode(key)
        cost = self.cost_of(spec)
        ppl = self.accuracy(spec)
        if not math.isfinite(ppl):
            ppl = 1e9
        ev = Evaluation(list(key), ppl, cost["decode_ms"], cost["prefill_ms"], cost["memory_mb"], cost["size_mb"],
                        spec.num_params(), self.violation(ppl, cost), spec.to_dict())  # fmt: skip
        self.cache[key] = ev
        self.history.append(key)
        if self.on_evaluation:
            self.on_evaluation(ev)
        return ev

    def canonical(self, x) -> tuple[int, ...]:
        """The encoding of the spec ``x`` decodes to, where it decodes to the same spec; else ``x``."""
        x = tuple(int(v) for v in x)
        spec = self.space.decode(x)
        c = tuple(self.space.encode(spec))
        return c if c == x or self.space.decode(c).to_dict() == spec.to_dict() else x

    def evaluations(self) -> list[Evaluation]:
        return [self.cache[k] for k in self.history]

    def objectives(self, ev: Evaluation) -> tuple[float, float]:
        """What strategies minimize: log perplexity and predicted decode latency."""
        return math.log(ev.ppl), ev.decode_ms


def pareto_front(evals: list[Evaluation], feasible_only: bool = True) -> list[Evaluation]:
    """Non-dominated candidates on (perplexity, decode latency), sorted by latency."""
    pool = [e for e in evals if e.feasible] if feasible_only else list(evals)
    front = []
    for e in sorted(pool, key=lambda e: (e.decode_ms, e.ppl)):
        if not front or e.ppl < front[-1].ppl:
            front.append(e)
    return front
