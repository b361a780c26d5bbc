"""Search strategies behind one interface: ``strategy(problem, budget, seed)`` evaluates candidates
through ``problem.evaluate`` until the budget is spent.

- random: uniform samples of the joint space.
- nsga2: pymoo's NSGA-II on the integer-encoded joint space (SBX + polynomial mutation with rounding).
- linas: LLaMA-NAS's LINAS — NSGA-II whose inner loop ranks many candidates with cheap accuracy
  predictors (ridge / RBF-SVR chosen by cross-validated MAPE) fitted on the real evaluations so far,
  and only the final predicted population is evaluated for real.
- sequential: the prune-then-quantize baseline — NSGA-II over the architecture with every weight at the
  widest format, then uniform quantization options tried on the architecture front.
- differentiable: the relaxed joint search (search.differentiable), whose argmax candidates are evaluated.

Every strategy seeds its first candidates with the base model at each uniform weight format (the
widest first) and the smallest candidate (whittle seeds the largest and smallest), and is
deterministic for a given seed.
"""

from __future__ import annotations

import math

import numpy as np

from search.problem import BudgetExhausted, Problem, pareto_front
from search.space import FORMAT_SHARE, is_format_var

POP = 16  # NSGA-II population for the default budgets (≈ budget / 12 generations)


def _seeds(problem: Problem) -> list[list[int]]:
    """The base model at each of its uniform weight formats (widest first), and the smallest candidate."""
    s = problem.space
    return [s.largest(k) for k in range(s.n_formats)] + [s.smallest()]


def _random_x(space, rng: np.random.Generator) -> list[int]:
    return [int(rng.integers(n)) for n in space.sizes]


def random_search(problem: Problem, budget: int, seed: int) -> None:
    """Uniform random sampling of the joint space."""
    rng = np.random.default_rng(seed)
    try:
        for x in _seeds(problem):
            problem.evaluate(x)
        while problem.n_evals < budget:
            problem.evaluate(_random_x(problem.space, rng))
    except BudgetExhausted:
        pass


# ---- NSGA-II (pymoo) -----------------------------------------------------------------------
def _pymoo_nsga2(pop_size: int, initial: np.ndarray | None):
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.operators.sampling.rnd import IntegerRandomSampling

    return NSGA2(
        pop_size=pop_size,
        sampling=initial if initial is not None else IntegerRandomSampling(),
        crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
        mutation=PM(eta=20, vtype=float, repair=RoundingRepair()),
        eliminate_duplicates=True,
    )


def _problem_for_pymoo(n_var: int, sizes: list[int], fn):
    from pymoo.core.problem import Problem as PymooProblem

    class _P(PymooProblem):
        def __init__(self):
            super().__init__(n_var=n_var, n_obj=2, n_ieq_constr=1, xl=0, xu=np.array(sizes) - 1, vtype=int)

        def _evaluate(self, X, out, *args, **kwargs):
            F, G = zip(*(fn([int(round(v)) for v in x]) for x in X))
            out["F"], out["G"] = np.array(F), np.array(G)[:, None]

    return _P()


def _initial(problem: Problem, pop: int, rng: np.random.Generator, extra=()) -> np.ndarray:
    xs = [*_seeds(problem), *extra]
    while len(xs) < pop:
        xs.append(_random_x(problem.space, rng))
    return np.array(xs[:pop])


def _run_nsga2(space_sizes, fn, pop: int, n_evals: int, seed: int, initial) -> object:
    from pymoo.optimize import minimize

    return minimize(_problem_for_pymoo(len(space_sizes), space_sizes, fn), _pymoo_nsga2(pop, initial),
                    ("n_evals", n_evals), seed=seed, verbose=False)  # fmt: skip


def _real(problem: Problem):
    def fn(x):
        ev = problem.evaluate(x)
        return problem.objectives(ev), ev.violation

    return fn


def nsga2_search(problem: Problem, budget: int, seed: int, pop: int = POP) -> None:
    """NSGA-II over the joint space with real (memoized) evaluations."""
    rng = np.random.default_rng(seed)
    try:
        # pymoo counts memoized repeats as evaluations too: let BudgetExhausted end the run instead
        _run_nsga2(problem.space.sizes, _real(problem), pop, 50 * budget, seed, _initial(problem, pop, rng))
    except BudgetExhausted:
        pass


# ---- LINAS ---------------------------------------------------------------------------------
def _one_hot(space, X) -> np.ndarray:
    cols = []
    for j, n in enumerate(space.sizes):
        if n > 1:
            cols.append(np.eye(n)[np.asarray(X)[:, j]])
    return np.hstack(cols) if cols else np.zeros((len(X), 1))


def fit_predictor(space, X, y):
    """Ridge or RBF-SVR on one-hot features, whichever has the lower 5-fold CV MAPE (LINAS)."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVR

    feats = _one_hot(space, X)
    folds = min(5, len(y))
    best = None
    for est, grid in ((Ridge(), {"alpha": [0.1, 1.0, 10.0]}), (SVR(kernel="rbf", epsilon=0.0), {"C": [1, 10, 100]})):
        gs = GridSearchCV(est, grid, cv=folds, scoring="neg_mean_absolute_percentage_error").fit(feats, y)
        if best is None or gs.best_score_ > best.best_score_:
            best = gs
    model = best.best_estimator_
    return lambda Xn: model.predict(_one_hot(space, Xn))


def linas_search(problem: Problem, budget: int, seed: int, pop: int = POP, inner_evals: int = 3000) -> None:
    """LINAS: real evaluations in batches of ``pop``; between them NSGA-II runs on predicted accuracy."""
    rng = np.random.default_rng(seed)
    space = problem.space
    batch = [list(x) for x in _initial(problem, pop, rng)]
    rounds = 0
    try:
        while problem.n_evals < budget:
            for x in batch:
                problem.evaluate(x)
            evals = problem.evaluations()
            X = np.array([e.x for e in evals])
            y = np.log([e.ppl for e in evals])
            predict = fit_predictor(space, X, y)

            def fn(x, predict=predict):
                if tuple(x) in problem.cache:
                    ev = problem.cache[tuple(x)]
                    return problem.objectives(ev), ev.violation
                spec = space.decode(x)
                cost = problem.cost_of(spec)
                lp = float(predict(np.array([x]))[0])
                return (lp, cost["decode_ms"]), problem.violation(math.exp(lp), cost)

            res = _run_nsga2(space.sizes, fn, pop, inner_evals, seed + rounds + 1,
                             _initial(problem, pop, rng, [e.x for e in pareto_front(evals, False)]))  # fmt: skip
            rounds += 1
            fresh = [list(map(int, x)) for x in res.pop.get("X") if tuple(map(int, x)) not in problem.cache]
            if not fresh:  # the predictor has converged onto known points: explore instead
                fresh = [_random_x(space, rng) for _ in range(pop)]
            batch = fresh
    except BudgetExhausted:
        pass


# ---- sequential prune -> quantize ----------------------------------------------------------------
def sequential_search(problem: Problem, budget: int, seed: int, pop: int = POP, arch_share: float = 0.6) -> None:
    """Prune-then-quantize baseline: architecture search at the widest formats, then quantize the front."""
    space = problem.space
    fmt_vars = [j for j, v in enumerate(space.vars) if is_format_var(v)]
    # the baseline quantizes every kept block alike: a format share stays at 1.0 (choice 0)
    arch_vars = [j for j, v in enumerate(space.vars) if j not in fmt_vars and v.name != FORMAT_SHARE]
    arch_sizes = [space.sizes[j] for j in arch_vars]

    def full(xa, fmt_choice: dict[int, int] | None = None):
        x = [0] * space.n_var
        for j, v in zip(arch_vars, xa):
            x[j] = int(v)
        for j in fmt_vars:
            x[j] = (fmt_choice or {}).get(j, 0)
        return x

    def fn(xa):
        ev = problem.evaluate(full(xa))
        return problem.objectives(ev), ev.violation

    rng = np.random.default_rng(seed)
    init = np.array([[x[j] for j in arch_vars] for x in _initial(problem, pop, rng)])
    # stage 1: the architecture, at the widest formats (budget violations of the quantized model are
    # unknown here, so stage 1 only honours the accuracy floor and keeps the whole accuracy/latency front)
    problem.budget = max(pop, int(budget * arch_share))
    try:
        _run_nsga2(arch_sizes, fn, pop, 50 * budget, seed, init)
    except BudgetExhausted:
        pass
    problem.budget = budget
    try:
        arch_front = pareto_front(problem.evaluations(), feasible_only=False)
        # stage 2: uniform quantization options for each front architecture, best-accuracy first
        options = _uniform_format_options(space, fmt_vars)
        for ev in sorted(arch_front, key=lambda e: e.ppl):
            xa = [ev.x[j] for j in arch_vars]
            for opt in options:
                problem.evaluate(full(xa, opt))
        random_rng = np.random.default_rng(seed + 1)
        while problem.n_evals < budget:  # leftover budget: more quantized variants of front archs
            ev = arch_front[int(random_rng.integers(len(arch_front)))]
            opt = options[int(random_rng.integers(len(options)))]
            problem.evaluate(full([ev.x[j] for j in arch_vars], opt))
    except BudgetExhausted:
        pass


def _uniform_format_options(space, fmt_vars) -> list[dict[int, int]]:
    """One option per (linear format, embedding format): every layer at the same format."""
    lin = [j for j in fmt_vars if space.vars[j].name != "embed_format"]
    emb = [j for j in fmt_vars if space.vars[j].name == "embed_format"]
    n_lin = max(space.vars[j].size for j in lin)
    n_emb = max((space.vars[j].size for j in emb), default=1)
    return [{**{j: f for j in lin}, **{j: e for j in emb}} for f in range(n_lin) for e in range(n_emb)]


def differentiable(problem: Problem, budget: int, seed: int) -> None:
    """Relaxed joint search; its argmax candidates (one per latency weight) are evaluated for real."""
    from search.differentiable import differentiable_search

    try:
        for x in _seeds(problem):
            problem.evaluate(x)
        for x in differentiable_search(problem, budget, seed):
            problem.evaluate(x)
    except BudgetExhausted:
        pass


STRATEGIES = {
    "nsga2": nsga2_search,
    "linas": linas_search,
    "random": random_search,
    "sequential": sequential_search,
    "differentiable": differentiable,
}
