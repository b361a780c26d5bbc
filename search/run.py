"""Running a search: checkpointing, resume, the Pareto front, hypervolume and the front plot.

The state file holds every evaluation made so far. A resumed run replays its strategy from the same
seed with those evaluations memoized, so it continues exactly where it stopped and the same seed
always gives the same result.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from search.problem import Evaluation, InfeasibleBudget, Problem, pareto_front
from search.strategies import STRATEGIES

HV_REF = (2.0, 1.05)  # hypervolume reference in (ppl / base ppl, decode ms / base decode ms)


class SearchError(ValueError):
    pass


@dataclass
class SearchResult:
    strategy: str
    seed: int
    budget: int
    base: Evaluation
    evaluations: list[Evaluation]
    front: list[Evaluation]
    hypervolume: float
    wall_s: float

    def best_within(self, max_ppl_increase: float) -> Evaluation | None:
        """The fastest candidate whose perplexity is within ``max_ppl_increase`` of the base."""
        ok = [e for e in self.front if e.ppl <= self.base.ppl * (1 + max_ppl_increase)]
        return min(ok, key=lambda e: e.decode_ms) if ok else None

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy, "seed": self.seed, "budget": self.budget, "wall_s": self.wall_s,
            "hypervolume": self.hypervolume, "hv_reference": HV_REF,
            "base": asdict(self.base), "front": [asdict(e) for e in self.front],
        }  # fmt: skip


def hypervolume(front: list[Evaluation], base: Evaluation) -> float:
    """Dominated area of the front in (ppl / base, decode / base) up to the reference point HV_REF."""
    from pymoo.indicators.hv import HV

    pts = [(e.ppl / base.ppl, e.decode_ms / base.decode_ms) for e in front]
    pts = [p for p in pts if p[0] < HV_REF[0] and p[1] < HV_REF[1]]
    if not pts:
        return 0.0
    import numpy as np

    return float(HV(ref_point=np.array(HV_REF))(np.array(pts)))


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def run_search(problem: Problem, strategy: str, budget: int, seed: int, out: Path | None = None,
               resume: bool = False, progress: bool = True) -> SearchResult:  # fmt: skip
    """Run ``strategy`` for ``budget`` evaluations; checkpoint to ``out/state.json`` after each one."""
    if strategy not in STRATEGIES:
        raise SearchError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if budget < 4:
        raise SearchError(f"budget {budget} is too small: give at least 4 evaluations")
    state_path = Path(out) / "state.json" if out else None
    if state_path is not None:
        state_path.parent.mkdir(parents=True, exist_ok=True)
        if state_path.exists() and not resume:
            raise SearchError(f"{state_path.parent} already holds a search: pass --resume to continue it or pick a new --out")
        if resume and state_path.exists():
            state = json.loads(state_path.read_text())
            if (state["strategy"], state["seed"]) != (strategy, seed):
                raise SearchError(f"cannot resume: {state_path} is a {state['strategy']} search with seed {state['seed']}")
            for d in state["evaluations"]:
                problem.cache[tuple(d["x"])] = Evaluation(**d)
    problem.budget = budget
    start = time.time()
    done = []

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[front]}"), disable=not progress, transient=False) as bar:  # fmt: skip
        task = bar.add_task(f"search ({strategy})", total=budget, front="")

        def on_eval(ev: Evaluation):
            done.append(ev)
            front = pareto_front(problem.evaluations(), feasible_only=False)
            desc = " ".join(f"{e.ppl:.1f}@{e.decode_ms:.2f}ms" for e in front[:4])
            bar.update(task, completed=problem.n_evals, front=f"front: {desc}")
            if state_path is not None:
                _write_json(state_path, {"strategy": strategy, "seed": seed, "budget": budget,
                                         "evaluations": [asdict(problem.cache[k]) for k in problem.cache]})  # fmt: skip

        problem.on_evaluation = on_eval
        base = problem.evaluate(problem.space.largest())
        problem.base_ppl = base.ppl
        STRATEGIES[strategy](problem, budget, seed)
        bar.update(task, completed=problem.n_evals)
    problem.on_evaluation = None
    evals = problem.evaluations()
    front = pareto_front(evals)
    result = SearchResult(strategy, seed, budget, base, evals, front, hypervolume(front, base), time.time() - start)
    if out:
        _write_json(Path(out) / "front.json", result.to_dict())
    return result


def require_feasible(result: SearchResult, problem: Problem) -> Evaluation:
    """The best feasible candidate (lowest perplexity among those meeting every budget), or a clear error."""
    feasible = [e for e in result.evaluations if e.feasible]
    if feasible:
        return min(feasible, key=lambda e: (e.ppl, e.decode_ms))
    raise infeasible(result.evaluations, problem)


def infeasible(evals: list[Evaluation], problem: Problem) -> InfeasibleBudget:
    """The error for evaluations none of which meets the budgets, naming the closest one."""
    closest = min(evals, key=lambda e: e.violation)
    return InfeasibleBudget(
        f"no sub-network meets the budgets ({problem.budgets.describe()}); closest: perplexity {closest.ppl:.2f}, "
        f"decode {closest.decode_ms:.2f} ms/token, memory {closest.memory_mb:.0f} MB, size {closest.size_mb:.0f} MB "
        f"— relax a budget or raise --budget",
        closest,
    )


def plot_front(results: dict[str, SearchResult], path: Path, title: str = "") -> Path:
    """PNG of every strategy's front (perplexity vs decode latency) against the base model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    base = None
    for name, res in results.items():
        base = res.base
        ax.scatter([e.decode_ms for e in res.evaluations], [e.ppl for e in res.evaluations], s=6, alpha=0.25)
        f = res.front
        ax.plot([e.decode_ms for e in f], [e.ppl for e in f], marker="o", ms=3, label=f"{name} (HV {res.hypervolume:.3f})")
    if base is not None:
        ax.scatter([base.decode_ms], [base.ppl], marker="*", s=160, c="k", label="base", zorder=5)
        ax.set_ylim(base.ppl * 0.95, base.ppl * HV_REF[0])
    ax.set_xlabel("predicted decode latency (ms/token)")
    ax.set_ylabel("held-out perplexity (formats simulated)")
    ax.set_title(title or "Pareto fronts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
