"""`packager pack`: model → importance sort → search → extract → recover → export → measure →
scorecard → bundle, with every stage checkpointed so an interrupted run resumes where it stopped.

Work files live in ``<out>.work/`` (sorted model, search state, recovered model, artifacts); the
bundle is assembled there and renamed to ``<out>`` at the very end, beside ``<out>.tar.gz``.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from rich.console import Console

from packager.bundle import make_tarball, write_manifest
from packager.scorecard import figure, write_all
from packager.selection import (
    candidate_key,
    ladder_probes,
    promotion_candidate,
    share_try_key,
    shortlist_by_family,
    spec_key,
    stepped_down,
)
from profiles.costmodel import CostModelError, predict, runtime_version
from search.evaluate import perplexity, perplexity_ratio
from search.importance import Importance, quantization_rank, sort_model
from search.problem import Budgets, Evaluation, Problem, pareto_front
from search.run import infeasible, plot_front, require_feasible, run_search
from search.space import DEFAULT_FORMATS, SearchSpace, SpaceConfig, least_sensitive
from search.text import Holdout, holdout_blocks, report_blocks, token_blocks
from subnet.arch import ATTN_LINEARS, LINEARS, MLP_LINEARS, arch_of, linear_module_name
from subnet.equalize import equalize_channels
from subnet.extract import extract
from subnet.formats import get_format, same_weights
from subnet.gptq import gptq_round, swap_compensation
from subnet.loading import LoadedModel, load_model
from subnet.quant import KEPT_SCALE_FORMATS, fake_quantize_model
from subnet.spec import SubnetSpec, lossy_retargets, retarget_formats, swap_formats
from subnet.supernet import Supernet
from targets.backend import (PEAK_RSS, atomic_output, backend, fingerprint, measure_interleaved, median_measurement,
                             memory_record, paired_speedup, runner_nll_per_block, settings_text)
from targets.registry import Target, get_target

if TYPE_CHECKING:
    from search.recovery import RecoveryResult

BLOCK_SCALES = "block_scales.safetensors"  # beside a recovered model: its kept-scale weights' kept scales
FLOOR_KEYS = ("floor_ppl_before", "floor_ppl_after", "floor_ppl_limit", "meets_floor")  # a floor check's outcome
STAGES = ("prepare", "search", "select", "recover", "export", "measure", "scorecard", "bundle")
console = Console(stderr=True)


# options that act only from a late stage on (option -> that stage): a run resumed with only these changed is
# redone from the earliest stage they act in; the select stage's act after the shortlist's recoveries (shortlist.json)
LATE_OPTIONS = {"promote_margin": "select", "step_down": "select", "long_recovery": "select",
                "long_recover_steps": "select", "long_recover_blocks": "select", "runtime_recover_steps": "recover",
                "runtime_format_shares": "recover", "retarget": "recover", "measure_rounds": "measure"}
# how the winner's formats are carried to the other runtimes (Pack.runtime_recovery)
RETARGET_RULES = ("exact", "fastest")
LAYOUT_GAIN = 0.03  # a relayout must be priced this much faster for the whole model, beyond the table's fit error


class PackError(ValueError):
    pass


@dataclass
class PackConfig:
    """Everything `packager pack` was asked to do (recorded in the scorecard)."""

    target: str = "laptop-cpu"
    model: str | None = None
    latency_ms: float | None = None
    memory_mb: float | None = None
    size_mb: float | None = None
    accuracy_floor: float = 0.05  # max perplexity increase over the base at the widest searched formats
    recoverable: float = 0.3  # pre-recovery perplexity increase the search explores and the shortlist tries
    shortlist: int = 3  # candidates faster than the fastest floor-meeting one, each given a short recovery
    shortlist_steps: int = 30  # recovery steps per shortlisted candidate
    promote_margin: float = 0.05  # a shortlisted candidate missing the floor by at most this gets the full recovery
    # the promoted candidate trains long_recover_steps on long_recover_blocks, every step run (Pack.promotion_recovery);
    # False: the winner's recovery (recover_steps, early-stopped), 25-30 minutes sooner for SmolLM2 on 2 cores
    long_recovery: bool = True
    long_recover_steps: int = 600
    long_recover_blocks: int = 640
    equalize: bool = True  # scale input channels for rounding (activation-aware) before the search
    gptq: bool = True  # round kept-scale-format linears by GPTQ before every recovery (subnet.gptq)
    ladder: int = 2  # rounds of bisection toward faster members of each family whose shortlisted member met the floor
    step_down: int = 1  # format shares a promoted near miss that still misses the floor steps down (selection.stepped_down)
    runtimes: list[str] = field(default_factory=list)  # default: every runtime of the target
    strategy: str = "nsga2"
    mode: str = "uniform"
    budget: int = 100
    seed: int = 0
    calib_blocks: int = 32  # x 256 tokens (importance, equalization, GPTQ)
    recover_blocks: int = 160  # x 256 calibration tokens recovery trains on, spread over the split, none held out
    val_blocks: int = 8  # x 256 calibration tokens, spread over the split, held out of recovery: its early stopping
    floor_blocks: int = 32  # x 256 tokens of the check split (held-out calibration documents): the floor check
    eval_blocks: int = 8  # x 256 tokens (search accuracy; held out)
    report_blocks: int = 32  # x 256 evaluation tokens each runtime scores for the scorecard (none the search scored)
    recover_steps: int = 120
    runtime_recover_steps: int = 60  # per other runtime whose formats round differently (0: export them as is)
    # the shares of blocks that keep their carried formats, tried in turn until that runtime meets the floor
    runtime_format_shares: list[float] = field(default_factory=lambda: [1.0, 0.9, 0.8])
    # "exact": other runtimes hold the winner's weights where a twin format can; "fastest": each code width
    # moves to the layout that runtime's table prices fastest, recovered for it (Pack.relaid_spec)
    retarget: str = "exact"
    threads: int = 2
    measure_rounds: int = 3  # rounds in which base and packaged artifacts take turns being timed
    allow_pickle: bool = False


class ShareTry(NamedTuple):
    """One of ``Pack.runtime_recovery``'s format-share tries: the share, the spec it narrows ``narrow``
    blocks of, its recovery, the floor-check perplexity after it, and its warm start (``runtime_warm_start``)."""

    share: float
    spec: SubnetSpec
    result: RecoveryResult
    narrow: set[int]
    floor_ppl: float
    start: torch.nn.Module
    scales: dict[str, torch.Tensor]
    regptq: int


class Pack:
    """One pack run: its folders, its checkpointed stage results, and the stages themselves."""

    def __init__(self, cfg: PackConfig, out: Path, resume: bool = False, force: bool = False):
        if cfg.measure_rounds < 1:
            raise PackError(f"measure_rounds {cfg.measure_rounds}: time the artifacts in at least 1 round (--measure-rounds)")
        if cfg.retarget not in RETARGET_RULES:
            raise PackError(f"retarget {cfg.retarget!r} is not one of {', '.join(RETARGET_RULES)} (--retarget)")
        if cfg.report_blocks < 2 or cfg.report_blocks % cfg.eval_blocks:
            raise PackError(f"report_blocks {cfg.report_blocks} must be a multiple (>= 2) of eval_blocks "
                            f"{cfg.eval_blocks}, so that no reported block overlaps one the search scored")  # fmt: skip
        self.cfg, self.out = cfg, Path(out)
        self.work = self.out.with_name(self.out.name + ".work")
        if self.out.exists() and not force:
            raise PackError(f"{self.out} already exists: pass --force to replace it, or choose another --out")
        if self.work.exists() and not resume and not force:
            raise PackError(f"{self.work} holds an unfinished run: pass --resume to continue it or --force to start over")
        if force and not resume:
            shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.state_path = self.work / "stages.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        saved = self.state.get("config")
        if saved:  # an option added since the run started resumes at its default
            saved = {**asdict(PackConfig(target=cfg.target)), **saved}
        if saved and saved != asdict(cfg):
            now = asdict(cfg)
            if not resume or shortlist_options(saved) != shortlist_options(now):
                raise PackError(f"{self.work} was started with other options ({_diff(saved, now)}): use the same options "
                                "to resume (or change only --promote-margin / --long-recovery / --runtime-recover-steps / "
                                "--runtime-format-shares / --retarget / --measure-rounds), "
                                "or --force to start over")  # fmt: skip
            first = min((stage for k, stage in LATE_OPTIONS.items() if saved.get(k) != now.get(k)), key=STAGES.index)
            kept = STAGES[: STAGES.index(first)]
            self.state["done"] = {k: v for k, v in self.state.get("done", {}).items() if k in kept}
            console.print(f"options changed since the run started ({_diff(saved, now)}): redoing it from the {first} stage")
        self.state["config"] = asdict(cfg)
        self.target: Target = get_target(cfg.target)
        self.runtimes = cfg.runtimes or list(self.target.runtimes)
        for rt in self.runtimes:
            self.target.runtime(rt)
        self.search_runtime = self.target.default_runtime if self.target.default_runtime in self.runtimes else self.runtimes[0]
        self._loaded: LoadedModel | None = None

    # ---- bookkeeping -------------------------------------------------------------------------
    def _save(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1, default=str))
        tmp.replace(self.state_path)

    def run(self) -> Path:
        """Run every stage not yet finished; return the bundle folder."""
        t0 = time.time()
        for i, stage in enumerate(STAGES, 1):
            if stage in self.state.get("done", {}):
                console.print(f"[dim][{i}/{len(STAGES)}] {stage}: done earlier, skipped[/dim]")
                continue
            console.print(f"[bold][{i}/{len(STAGES)}] {stage}[/bold]")
            s0 = time.time()
            result = getattr(self, f"stage_{stage}")()
            self.state.setdefault("done", {})[stage] = {"result": result, "wall_s": round(time.time() - s0, 1)}
            self._save()
        console.print(f"packed in {time.time() - t0:.0f} s → {self.out} and {self.out}.tar.gz")
        return self.out

    def result(self, stage: str):
        return self.state["done"][stage]["result"]

    # ---- shared inputs -----------------------------------------------------------------------
    def base(self) -> LoadedModel:
        if self._loaded is None:
            self._loaded = load_model(self.cfg.model, allow_pickle=self.cfg.allow_pickle)
        return self._loaded

    def sorted_model(self):
        """The importance-sorted base (saved by the prepare stage)."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.work / "sorted", dtype=torch.float32).eval()

    def blocks(self, split: str, n: int) -> torch.Tensor:
        return token_blocks(self.base().tokenizer, split, 256, n)

    def space(self, importance: Importance) -> SearchSpace:
        return search_space(self.base().arch, self.target, self.search_runtime, self.cfg.mode, importance)

    # ---- stages ------------------------------------------------------------------------------
    def stage_prepare(self) -> dict:
        loaded = self.base()
        model = loaded.model
        calib = self.calibration_blocks()
        imp, equalized = prepare_for_search(model, calib, self.target, self.search_runtime, self.cfg.mode,
                                            self.cfg.strategy, self.cfg.equalize)  # fmt: skip
        save_model(model, self.work / "sorted", loaded.tokenizer)
        imp.save(self.work / "importance.json")
        self._loaded = None  # the in-memory model is now permuted: reload the untouched one when needed
        return {"layer_rank": imp.layer_rank, "calibration_tokens": imp.calibration_tokens,
                "unit_method": imp.unit_method, "layer_method": imp.layer_method, "quant_rank": imp.quant_rank,
                "equalization": equalization_summary(equalized)}  # fmt: skip

    def problem(self, model, max_ppl_increase: float) -> Problem:
        """The search problem on the sorted ``model``, with that accuracy floor (before recovery)."""
        c = self.cfg
        budgets = Budgets(latency_ms=c.latency_ms, memory_mb=c.memory_mb, size_mb=c.size_mb,
                          max_ppl_increase=max_ppl_increase)  # fmt: skip
        return Problem(self.space(Importance.load(self.work / "importance.json")), Supernet(model),
                       self.blocks("evaluation", c.eval_blocks), self.calibration_blocks(),
                       cost_fn(self.target, self.search_runtime), budgets)  # fmt: skip

    def stage_search(self) -> dict:
        # the search explores up to `recoverable` above the floor: recovery wins some of it back (select stage)
        loose = self.cfg.accuracy_floor + (self.cfg.recoverable if self.cfg.shortlist else 0.0)
        problem = self.problem(self.sorted_model(), loose)
        res = run_search(problem, self.cfg.strategy, self.cfg.budget, self.cfg.seed, out=self.work / "search", resume=True)
        plot_front({self.cfg.strategy: res}, self.work / "front.png",
                   f"{self.base().source} on {self.target.name}/{self.search_runtime}")  # fmt: skip
        require_feasible(res, problem)
        (self.work / "evaluations.json").write_text(json.dumps([asdict(e) for e in res.evaluations]))
        return {"base": asdict(res.base), "hypervolume": res.hypervolume, "evaluations": len(res.evaluations),
                "wall_s": res.wall_s, "front_size": len(res.front), "explored_ppl_increase": loose}  # fmt: skip

    def stage_select(self) -> dict:
        """Pick the winner: the fastest candidate whose perplexity meets the floor after recovery.

        The fallback is the fastest candidate meeting every budget before recovery. Up to ``shortlist``
        faster front candidates, one per format family (``shortlist_by_family``), get a short recovery
        (LoRA + distillation, formats simulated); in each family whose candidate met the floor, up to
        ``ladder`` faster members follow, bisecting the family's front (``ladder_probes``). The fastest
        candidate whose recovered perplexity meets the floor on held-out calibration text wins, unless a
        faster one that nearly met it meets it after the full recovery (``promotion``).
        """
        evals = [Evaluation(**e) for e in json.loads((self.work / "evaluations.json").read_text())]
        base_ev = Evaluation(**self.result("search")["base"])
        model = self.sorted_model()
        problem = self.problem(model, self.cfg.accuracy_floor)
        problem.base_ppl = base_ev.ppl
        strict = [replace(e, violation=problem.violation(e.ppl, vars(e))) for e in evals]
        feasible = [e for e in strict if e.feasible]
        fallback = min(feasible, key=lambda e: (e.decode_ms, e.ppl)) if feasible else None
        faster = [e for e in pareto_front(evals) if fallback is None or e.decode_ms < fallback.decode_ms]
        tried = self.short_recoveries(problem.supernet, base_ev, shortlist_by_family(faster, self.cfg.shortlist))
        climbed = []
        for _ in range(self.cfg.ladder):
            probes = ladder_probes(faster, tried)
            if not probes:
                break
            climbed += [candidate_key(e.x) for e in probes]
            tried += self.short_recoveries(problem.supernet, base_ev, probes)
        passing = [t for t in tried if t["meets_floor"]]
        best = min(passing, key=lambda t: t["evaluation"]["decode_ms"]) if passing else None
        promoted = self.promotion(problem, tried, best["evaluation"]["decode_ms"] if best else None)
        if promoted and promoted["meets_floor"]:
            near = "faster than every one meeting the floor" if best else f"within {self.cfg.promote_margin:.0%} of the floor"
            n = len(promoted["missed"])
            down = f", {n} format share{'s' if n > 1 else ''} lower," if n else ""
            winner, how = Evaluation(**promoted["evaluation"]), (
                f"shortlisted candidate {near} after {self.cfg.shortlist_steps} steps that{down} met it after the "
                f"{'long' if self.cfg.long_recovery else 'full'} "
                f"recovery ({promoted['recovery']['steps_run']} steps)")  # fmt: skip
        elif best:
            winner, how = Evaluation(**best["evaluation"]), (
                f"fastest shortlisted candidate meeting the floor after {self.cfg.shortlist_steps} recovery steps")
        elif fallback is not None:
            winner, how = fallback, "fastest candidate meeting every budget before recovery"
        else:
            raise infeasible(strict, problem)
        spec = winner.spec_obj()
        spec.meta = {"selected": how, "ppl_simulated": winner.ppl}
        spec.save(self.work / "spec.json")
        return {"winner": asdict(winner), "how": how, "fallback": asdict(fallback) if fallback else None,
                "shortlist": tried, "ladder": climbed, "promoted": promoted}  # fmt: skip

    def promotion(self, problem: Problem, tried: list[dict], faster_than: float | None) -> dict | None:
        """Full recovery for ``promotion_candidate`` (a near miss faster than every passing candidate).

        Short recoveries stop after a few steps; a candidate just above the floor often meets it with the
        full recovery. If it misses, the member of its family one format share lower (``stepped_down``)
        gets the same recovery, up to ``step_down`` times, while that member stays within the budgets and
        faster than every passing candidate. The first to meet the floor has its recovered model kept for
        the recover stage and wins (``missed``: the tries before it); if none does, the fastest passing
        candidate (or the fallback) does.
        """
        t = promotion_candidate(tried, self.cfg.promote_margin, faster_than)
        if t is None:
            return None
        e, missed = Evaluation(**t["evaluation"]), []
        out = self.promote(problem.supernet.model, e, t["floor_ppl_limit"], before=t["floor_ppl_before"])
        for _ in range(self.cfg.step_down):
            down = None if out["meets_floor"] else stepped_down(problem, e, faster_than)
            if down is None:
                break
            missed.append(out)
            e = down
            console.print(f"  stepped down one format share ({e.decode_ms:.2f} ms/token predicted, {e.size_mb:.1f} MiB)")
            out = self.promote(problem.supernet.model, e, t["floor_ppl_limit"])
        return out | {"missed": missed}

    def promote(self, model, e: Evaluation, limit: float, before: float | None = None) -> dict:
        """Give ``e`` the promotion's recovery (``promotion_recovery``) from its GPTQ rounding, and the floor
        check before (``before`` where its short recovery already scored it) and after it against ``limit``;
        a recovered model that meets it is kept for the recover stage."""
        spec = e.spec_obj()
        blocks, config = self.promotion_recovery()
        long = "-long" if self.cfg.long_recovery else ""
        console.print(f"  promoted to {'long' if long else 'full'} recovery: {_spec_summary(spec)}")
        res, gptq, before, after = self.recover_rounded(model, spec, blocks, config,
                                                        self.work / "promotion" / (candidate_key(e.x) + long), before)  # fmt: skip
        ok = after <= limit
        if ok:
            save_model(res.model, self.work / "recovered", block_scales=res.block_scales)
        console.print(f"  promoted: floor-check ppl {before:.2f} → {after:.2f} after {res.steps_run} "
                      f"steps (limit {limit:.2f}): {'meets' if ok else 'misses'} the floor")  # fmt: skip
        return {"evaluation": asdict(e),
                "recovery": res.summary() | {"gptq_linears": gptq, "train_blocks": len(blocks.train)},
                "long": self.cfg.long_recovery,
                "floor_ppl_before": before, "floor_ppl_after": after, "floor_ppl_limit": limit, "meets_floor": ok}  # fmt: skip

    def recover_rounded(self, model, spec: SubnetSpec, blocks: Holdout, config, out_dir: Path | None,
                        before: float | None = None) -> tuple[RecoveryResult, int, float, float]:
        """``spec``'s recovery by ``config`` on ``blocks`` from its GPTQ rounding (``rounded_subnet``),
        checkpointed under ``out_dir`` (None: not at all): the result, how many linears GPTQ rounded, and
        the floor check before (``before`` where it was already scored) and after it."""
        from search.recovery import recover

        sub, scales = self.rounded_subnet(model, spec, self.calibration_blocks())
        before = self.checked_ppl(sub, spec, scales) if before is None else before
        res = recover(model, sub, spec, blocks.train, blocks.held, config, block_scales=scales, out_dir=out_dir,
                      resume=out_dir is not None)
        return res, len(scales), before, self.checked_ppl(res.model, spec, res.block_scales)

    def short_recoveries(self, net: Supernet, base_ev: Evaluation, candidates: list[Evaluation]) -> list[dict]:
        """Give each candidate ``shortlist_steps`` of recovery; its perplexity before/after vs the floor.

        Perplexity is the floor check's (``checked_ppl``), against the base (widest formats) on the same
        blocks (``floor_limit``). Finished candidates are kept in ``shortlist.json`` (with the early-stopping
        blocks' perplexity every 10 steps, ``val_curve``), under the options of the run that made them, so a
        resumed run skips them unless an option changed since.
        """
        from search.recovery import RecoveryConfig

        if not candidates:
            return []
        model, blocks = net.model, self.recovery_blocks
        limit = self.floor_limit(model, base_ev.spec_obj())
        done_path = self.work / "shortlist.json"
        saved = json.loads(done_path.read_text()) if done_path.exists() else {}
        options = shortlist_options(json.loads(json.dumps(asdict(self.cfg))))  # as JSON reads it back (tuples as lists)
        done = saved.get("candidates", {}) if shortlist_options(saved.get("options", {})) == options else {}
        keys = [candidate_key(e.x) for e in candidates]
        for key, e in zip(keys, candidates):
            if key in done:
                continue
            spec = e.spec_obj()
            config = RecoveryConfig(max_steps=self.cfg.shortlist_steps, eval_every=10, qat=True)
            res, _, before, after = self.recover_rounded(model, spec, blocks, config, None)
            done[key] = {"evaluation": asdict(e), "floor_ppl_before": before, "floor_ppl_after": after,
                         "floor_ppl_limit": limit, "meets_floor": after <= limit, "wall_s": res.wall_s,
                         "val_curve": [[h["step"], h["val_ppl"]] for h in res.history if "val_ppl" in h]}  # fmt: skip
            done_path.write_text(json.dumps({"options": options, "candidates": done}))
            console.print(f"  shortlist: {_spec_summary(spec)}: {e.decode_ms:.2f} ms/token, floor-check ppl "
                          f"{before:.2f} → {after:.2f} after {res.steps_run} steps (limit {limit:.2f})")  # fmt: skip
        return [done[key] for key in keys]

    def floor_limit(self, model, base_spec: SubnetSpec) -> float:
        """The most perplexity the floor check lets through: the base (``model`` at ``base_spec``'s simulated
        formats) on the floor-check blocks, plus ``accuracy_floor``."""
        base = fake_quantize_model(extract(model, base_spec), base_spec)
        return perplexity(base, self.floor_check_blocks) * (1 + self.cfg.accuracy_floor)

    def checked_ppl(self, model, spec: SubnetSpec, block_scales: dict[str, torch.Tensor]) -> float:
        """The floor check: ``model``'s perplexity at ``spec``'s simulated formats (kept-scale weights at
        ``block_scales``) on ``floor_check_blocks``, text of documents that nothing was fitted or trained on."""
        return perplexity(fake_quantize_model(model, spec, block_scales=block_scales), self.floor_check_blocks)

    @cached_property
    def floor_check_blocks(self) -> torch.Tensor:
        """``floor_blocks`` blocks spread over the check split: calibration documents that importance
        sorting, equalization, GPTQ, recovery and its early stopping never see, so a recovered model is
        scored on documents it did not adapt to, as the evaluation text scores it (the README gives how
        far blocks from the training documents flattered it, stop 28)."""
        return token_blocks(self.base().tokenizer, "check", 256, self.cfg.floor_blocks)

    @cached_property
    def recovery_blocks(self) -> Holdout:
        """Recovery's calibration blocks (``holdout_blocks``): ``recover_blocks`` to train on (``train``) and
        ``val_blocks`` for its early stopping (``held``), every k-th of ``calib_blocks + val_blocks`` blocks
        spread over the split. Computed once per run; the README gives what training on more text measured
        (stop 26)."""
        return self.holdout(self.cfg.recover_blocks)

    def holdout(self, n_train: int) -> Holdout:
        """``n_train`` calibration blocks to train on and the ``val_blocks`` held out for early stopping,
        the same held-out ones whatever ``n_train`` (``holdout_blocks`` on a grid of ``calib_blocks +
        val_blocks``)."""
        c = self.cfg
        return holdout_blocks(self.base().tokenizer, "calibration", 256, n_train, c.val_blocks,
                              grid=c.calib_blocks + c.val_blocks)  # fmt: skip

    def calibration_blocks(self) -> torch.Tensor:
        """The ``calib_blocks`` calibration blocks that importance sorting, equalization, rounding
        sensitivity and GPTQ fit on (none of them held out: ``recovery_blocks``)."""
        return self.blocks("calibration", self.cfg.calib_blocks)

    def rounded_subnet(self, model, spec: SubnetSpec, calib: torch.Tensor) -> tuple[torch.nn.Module, dict]:
        """What each recovery starts from: ``spec`` extracted from ``model`` with its kept-scale-format
        linears put through GPTQ on ``calib`` (unless ``gptq`` is off), and the block scales that round
        them to GPTQ's choice ({} without)."""
        sub = extract(model, spec)
        return sub, (gptq_round(sub, spec, calib) if self.cfg.gptq else {})

    def recovery_config(self):
        """The winner's recovery: LoRA + distillation against its simulated formats."""
        from search.recovery import RecoveryConfig

        return RecoveryConfig(max_steps=self.cfg.recover_steps, qat=True)

    def promotion_recovery(self):
        """The promoted candidate's training blocks and recovery: the winner's, or with ``long_recovery``
        ``long_recover_steps`` on ``long_recover_blocks`` blocks with every step run, keeping the best on the
        held-out blocks (on SmolLM2 early stopping on 8 of them gave up at step 260 of a run whose held-out
        perplexity still fell until step 580, and the floor check then missed where the full run met it:
        stop 32, README)."""
        from search.recovery import RecoveryConfig

        c = self.cfg
        if not c.long_recovery:
            return self.recovery_blocks, self.recovery_config()
        return self.holdout(c.long_recover_blocks), RecoveryConfig(max_steps=c.long_recover_steps, qat=True, patience_share=1.0)

    def stage_recover(self) -> dict:
        """Recover the winner for the search runtime, then for every other runtime that rounds it
        differently (``runtime_recovery``)."""
        promoted = self.result("select").get("promoted")
        if promoted and promoted["meets_floor"]:  # the select stage already recovered the winner in full
            out = promoted["recovery"] | {k: promoted[k] for k in FLOOR_KEYS} | {"done_in": "select"}
        else:
            out = self.recover_winner()
        others = {rt: self.runtime_recovery(rt) for rt in self.runtimes if rt != self.search_runtime}
        return out | {"runtimes": {rt: r for rt, r in others.items() if r}}

    def winner_spec(self) -> SubnetSpec:
        """The winner the select stage saved (its spec.json)."""
        return SubnetSpec.load(self.work / "spec.json")

    def recover_winner(self) -> dict:
        spec = self.winner_spec()
        model = self.sorted_model()
        from search.recovery import base_format, nothing_to_recover

        why = nothing_to_recover(spec, base_format(model), qat=True)
        if why:  # the base itself at lossless formats
            save_model(extract(model, spec), self.work / "recovered")
            return {"skipped": why}
        res, gptq, before, after = self.recover_rounded(model, spec, self.recovery_blocks, self.recovery_config(),
                                                        self.work / "recovery" / spec_key(spec))  # fmt: skip
        save_model(res.model, self.work / "recovered", block_scales=res.block_scales)
        limit = self.floor_limit(model, self.base_spec())
        return res.summary() | {"gptq_linears": gptq, "floor_ppl_before": before, "floor_ppl_after": after,
                                "floor_ppl_limit": limit, "meets_floor": after <= limit}  # fmt: skip

    def runtime_recovery(self, runtime: str) -> dict | None:
        """Recover the winner again at ``runtime``'s formats where they round weights the search
        runtime's don't hold exactly (ONNX Runtime has no iq4_nl), or where ``retarget`` "fastest" moved
        them to a faster layout (``relaid_spec``): LoRA + distillation warm-started from the winner's
        recovered model (``runtime_warm_start``, per try) on ``runtime_recovery_plan``'s text and steps,
        scored on held-out text against the floor there (the base at that runtime's formats, plus
        ``accuracy_floor``). A try that misses the floor is followed by one at the next of
        ``runtime_format_shares``: only that share of the blocks the winner narrows, the least sensitive
        to rounding (the search's format-share rule), keeps the carried formats; the rest take the
        exact carry where it holds the winner's weights (a relayout's twins), else the base's (widest)
        formats. A share that narrows the same blocks as an earlier try is skipped. The first try that
        meets the floor is kept, else the most accurate; but a relayout none of whose tries meets it
        is not used (``used``: the exact carry ships). A kept try's model and spec (``spec-<runtime>.json``)
        go to that runtime's export. None when the runtime holds the winner's formats exactly (or the
        steps are 0)."""
        from search.recovery import recover

        exact, base_spec = self.retargeted_specs(runtime)
        winner = self.winner_spec()
        relaid = self.relaid_spec(runtime, exact) if self.cfg.retarget == "fastest" else None
        spec = relaid["spec"] if relaid else exact
        changed = lossy_retargets(winner, spec)
        if not changed or not self.cfg.runtime_recover_steps:
            return None
        console.print(f"  recovery for {runtime}: {len(changed)} tensors change format ({changed[0]}, ...)")
        fallback = relaid is not None and not lossy_retargets(winner, exact)  # the exact carry needs no recovery
        wide = exact if fallback else base_spec
        sorted_model, (blocks, config) = self.sorted_model(), self.runtime_recovery_plan()
        limit = self.floor_limit(sorted_model, base_spec)
        narrowed, tries = narrowed_blocks(spec, wide), []
        for share in self.cfg.runtime_format_shares:
            narrow = least_sensitive(self.rounding_rank() if share < 1 else None, narrowed, share)
            if any(narrow == t.narrow for t in tries):  # e.g. a winner already at that share: nothing new to try
                continue
            tried = widen_blocks(spec, wide, narrow)
            start, scales, regptq = self.runtime_warm_start(tried)
            res = recover(sorted_model, start, tried, blocks.train, blocks.held, config, block_scales=scales,
                          out_dir=self.work / f"recovery-{runtime}" / share_try_key(tried, narrow), resume=True)  # fmt: skip
            tries.append(ShareTry(share, tried, res, narrow, self.checked_ppl(res.model, tried, res.block_scales),
                                  start, scales, regptq))  # fmt: skip
            console.print(f"  {runtime} at format share {share:g}: floor-check ppl {tries[-1].floor_ppl:.2f} "
                          f"(floor {limit:.2f})")  # fmt: skip
            if tries[-1].floor_ppl <= limit:
                break
        kept = next((t for t in tries if t.floor_ppl <= limit), min(tries, key=lambda t: t.floor_ppl))
        used = kept.floor_ppl <= limit or not fallback
        if used:
            save_model(kept.result.model, self.work / f"recovered-{runtime}", block_scales=kept.result.block_scales)
            kept.spec.save(self.work / f"spec-{runtime}.json")
        else:
            console.print(f"  {runtime}: no try met the floor; it keeps the winner's weights in its exact formats")
        return kept.result.summary() | {
            "changed": len(changed), "example": changed[0], "used": used, "widened_to": "exact" if fallback else "base",
            "relayout": {k: v for k, v in relaid.items() if k != "spec"} if relaid else None,
            "floor_ppl_before": self.checked_ppl(kept.start, kept.spec, kept.scales),
            "floor_ppl_after": kept.floor_ppl, "floor_ppl_limit": limit, "meets_floor": kept.floor_ppl <= limit,
            "format_share": kept.share, "narrow_blocks": len(kept.narrow), "gptq_linears": kept.regptq,
            "tries": [{"format_share": t.share, "floor_ppl_after": t.floor_ppl, "wall_s": t.result.summary()["wall_s"]}
                      for t in tries],
        }  # fmt: skip

    def runtime_recovery_plan(self):
        """Each ``runtime_recovery`` try's training blocks and recovery: ``runtime_recover_steps`` on the
        winner's recovery text, or with ``long_recovery`` the long recovery's (``promotion_recovery``)."""
        from search.recovery import RecoveryConfig

        if self.cfg.long_recovery:
            return self.promotion_recovery()
        return self.recovery_blocks, RecoveryConfig(max_steps=self.cfg.runtime_recover_steps, qat=True)

    def relaid_spec(self, runtime: str, exact: SubnetSpec) -> dict | None:
        """``exact`` (the winner carried to ``runtime``) relaid by ``fastest_layouts`` at the prices of
        ``runtime``'s table, a layout that breaks the size or memory budget priced out; with the swaps
        and the predicted decode ms/token before and after (``spec``, ``swaps``, ``decode_ms``). None
        when no layout is ``LAYOUT_GAIN`` faster, or the table cannot price the carry."""
        c = self.cfg

        def price(spec: SubnetSpec) -> float:
            cost = predict(spec, self.target, runtime)
            over = (c.size_mb and cost.size_mb > c.size_mb) or (c.memory_mb and cost.peak_memory_mb > c.memory_mb)
            return math.inf if over else cost.decode_ms_per_token

        try:
            before = price(exact)
        except CostModelError:
            return None
        relaid, swaps = fastest_layouts(exact, self.target.formats(runtime), price)
        return {"spec": relaid, "swaps": swaps, "decode_ms": [before, price(relaid)]} if swaps else None

    def runtime_warm_start(self, spec: SubnetSpec) -> tuple[torch.nn.Module, dict[str, torch.Tensor], int]:
        """What ``runtime_recovery`` starts from for a runtime that holds the winner as ``spec``, the block
        scales its kept-scale linears start at, and how many linears GPTQ rounded anew: the winner's
        recovered model, with GPTQ's error compensation swapped (``swap_compensation``) in the linears
        ``spec`` rounds another way, the compensation for the winner's formats out (``winner_rounding``)
        and GPTQ's for ``spec``'s in, at GPTQ's scales for ``spec``; the other linears keep the scales the
        winner's recovery kept.
        Carried into ONNX Runtime's 4-bit blocks, the compensation for iq4_nl's rounding made the
        start worse: held-out 21.58 with it, 20.05 without (the same winner, format share 0.8); the
        README gives what putting int4s_b32's own in measured (stop 28)."""
        student, kept = self.recovered_model(self.search_runtime)
        linears = changed_linears(self.winner_spec(), spec)
        moved = {linear_module_name(i, n) for i, n in linears}
        scales = {k: v for k, v in kept.items() if k not in moved}
        if not (linears and self.cfg.gptq):
            return student, scales, 0
        new = self.rounded_subnet(self.sorted_model(), spec, self.calibration_blocks())
        swap_compensation(student, self.winner_rounding[0], new[0], linears)
        regptq = {k: v for k, v in new[1].items() if k in moved}
        return student, scales | regptq, len(regptq)

    @cached_property
    def winner_rounding(self) -> tuple[torch.nn.Module, dict]:
        """GPTQ's rounding of the winner at its own formats (``rounded_subnet``): the compensation every
        ``runtime_warm_start`` swaps out, computed once per run rather than once per format-share try."""
        return self.rounded_subnet(self.sorted_model(), self.winner_spec(), self.calibration_blocks())

    def rounding_rank(self) -> list[int]:
        """The blocks, least sensitive to rounding first: the prepare stage's ranking where the search
        used one, else measured now (narrowest vs widest search format) and kept in importance.json."""
        imp = Importance.load(self.work / "importance.json")
        if imp.quant_rank is None:
            measure_rounding(imp, self.sorted_model(), self.calibration_blocks(), self.target, self.search_runtime)
            imp.save(self.work / "importance.json")
        return imp.quant_rank

    def own_recovery(self, runtime: str) -> bool:
        """Whether ``runtime`` ships a recovery of its own (``runtime_recovery``) from the recover stage."""
        own = self.result("recover").get("runtimes", {}).get(runtime) if runtime != self.search_runtime else None
        return bool(own) and own.get("used", True)

    def recovered_dir(self, runtime: str) -> Path:
        """Where the model recovered for ``runtime`` is: its own recovery's if it had one, else the search runtime's."""
        return self.work / (f"recovered-{runtime}" if self.own_recovery(runtime) else "recovered")

    def recovered_model(self, runtime: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
        """The model recovered for ``runtime`` and the block scales its kept-scale weights were trained at."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        folder = self.recovered_dir(runtime)
        scales = load_file(folder / BLOCK_SCALES) if (folder / BLOCK_SCALES).exists() else {}
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), scales

    def runtime_specs(self, runtime: str) -> tuple[SubnetSpec, SubnetSpec]:
        """(packaged, base) specs in ``runtime``'s formats: the packaged one as that runtime's own recovery
        chose it (``runtime_recovery``), else carried over (``retargeted_specs``)."""
        spec, base = self.retargeted_specs(runtime)
        return (SubnetSpec.load(self.work / f"spec-{runtime}.json") if self.own_recovery(runtime) else spec), base

    def base_spec(self) -> SubnetSpec:
        """The base at the search's widest formats (the largest member of its space)."""
        space = self.space(Importance.load(self.work / "importance.json"))
        return space.decode(space.largest())

    def retargeted_specs(self, runtime: str) -> tuple[SubnetSpec, SubnetSpec]:
        """(packaged, base) specs carried to ``runtime``'s formats: the base at the search's widest formats."""
        spec, base = self.winner_spec(), self.base_spec()
        held = self.target.formats(runtime)
        allowed = runtime_formats(self.target, runtime)
        allowed += [f for f in held if get_format(f).same_as and f not in allowed]  # exact twins: q4_0 -> int4s_b32
        embed = [f for f in getattr(backend(runtime), "EMBED_FORMATS", held) if f in held] or None
        return retarget_formats(spec, allowed, embed), retarget_formats(base, allowed, embed)

    def stage_export(self) -> dict:
        arts = {}
        tok = self.base().tokenizer
        sorted_model = None
        for rt in self.runtimes:
            mod = backend(rt)
            spec, base_spec = self.runtime_specs(rt)
            folder = self.work / "artifacts" / rt
            folder.mkdir(parents=True, exist_ok=True)
            model, scales = self.recovered_model(rt)
            # the weights recovery trained at kept block scales are written with them (llama.cpp's iq4_nl)
            kept = {"block_scales": scales} if scales and spec.formats_used() & set(KEPT_SCALE_FORMATS) else {}
            model.config.name_or_path = f"{self.base().name} packaged for {self.target.name}"  # the artifacts' name
            packed = mod.export(model, tok, spec, folder / _artifact_name(rt, "packaged"), force=True, **kept)
            sorted_model = sorted_model or self.sorted_model()
            base_model = extract(sorted_model, base_spec)
            base_model.config.name_or_path = f"{self.base().name} base"
            base = mod.export(base_model, tok, base_spec, folder / _artifact_name(rt, "base"), force=True)
            arts[rt] = {"packaged": packed.to_dict(), "base": base.to_dict(),
                        "spec": spec.to_dict(), "base_spec": base_spec.to_dict()}  # fmt: skip
        return arts

    def stage_measure(self) -> dict:
        out = {}
        wl = self.target.workload
        ppl_blocks = report_blocks(self.base().tokenizer, self.cfg.report_blocks)
        for rt, arts in self.result("export").items():
            mod = backend(rt)
            entry = {}
            artifacts = {which: _artifact(arts[which]) for which in ("base", "packaged")}
            measured = None
            if self.target.host and hasattr(mod, "measure"):  # base and packaged take turns, round by round
                measured = measure_interleaved(mod, artifacts, wl, self.cfg.threads, self.cfg.measure_rounds)
                decode = {w: [m.decode_ms_per_token for m in runs] for w, runs in measured.items()}
                entry["decode_speedup"] = paired_speedup(decode["base"], decode["packaged"])
            for which, art in artifacts.items():
                spec = SubnetSpec.from_dict(arts["spec" if which == "packaged" else "base_spec"])
                rec = {"size_bytes": _size(art.files or [art.path])}
                try:
                    rec["predicted"] = predict(spec, self.target, rt, wl).to_dict()
                except CostModelError as e:  # no profile for this runtime yet: measure, and say why not predicted
                    rec["predicted"], rec["not_predicted"] = None, str(e)
                if measured:
                    rec["measured"] = median_measurement(measured[which]).to_dict()
                    rec["decode_ms_rounds"] = decode[which]
                    runner = mod.load(art, threads=self.cfg.threads)
                    nll = runner_nll_per_block(runner, ppl_blocks)
                    rec["perplexity_tokens"] = int(ppl_blocks.shape[0] * (ppl_blocks.shape[1] - 1))
                    rec["perplexity_runtime"] = math.exp(nll.sum() / rec["perplexity_tokens"])
                    rec["nll_per_block"] = nll.tolist()
                    getattr(runner, "close", lambda: None)()
                entry[which] = rec
            out[rt] = entry
        return out

    def stage_scorecard(self) -> dict:
        card = build_card(self)
        plots = [self.work / "front.png", plot_predicted_vs_measured(self.result("measure"), self.work / "latency.png")]
        folder = self.work / "bundle"
        folder.mkdir(exist_ok=True)
        write_all(card, folder, [p for p in plots if p])
        return {"files": ["scorecard.json", "scorecard.md", "scorecard.html"]}

    def stage_bundle(self) -> dict:
        folder = self.work / "bundle"
        (folder / "spec.json").write_text((self.work / "spec.json").read_text())
        for rt, arts in self.result("export").items():
            dest = folder / "artifacts" / rt
            dest.mkdir(parents=True, exist_ok=True)
            art = _artifact(arts["packaged"])
            src = Path(art.path)
            if src.is_dir():
                shutil.copytree(src, dest / src.name, dirs_exist_ok=True)
            else:
                for f in art.files or [art.path]:
                    shutil.copy2(f, dest / Path(f).name)
            (dest / "artifact.json").write_text(json.dumps(arts["packaged"], indent=1, default=str))
        manifest = write_manifest(folder, _versions(), {"target": self.target.name})
        if self.out.exists():
            shutil.rmtree(self.out)
        folder.rename(self.out)
        make_tarball(self.out, self.out.with_name(self.out.name + ".tar.gz"))
        return {"files": len(manifest["files"])}


def shortlist_options(options: dict) -> dict:
    """The pack options a short recovery may depend on: all but ``LATE_OPTIONS``."""
    return {k: v for k, v in options.items() if k not in LATE_OPTIONS}


def save_model(model, folder: Path, tokenizer=None, block_scales: dict[str, torch.Tensor] | None = None) -> None:
    """Save ``model`` (safetensors) to ``folder`` through a temporary sibling, so it is never half-written;
    with the ``block_scales`` recovery kept (``BLOCK_SCALES``) where there are any."""
    from safetensors.torch import save_file

    with atomic_output(folder, force=True) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if block_scales:
            save_file({k: v.contiguous() for k, v in block_scales.items()}, str(tmp / BLOCK_SCALES))


def changed_linears(spec: SubnetSpec, other: SubnetSpec) -> list[tuple[int, str]]:
    """(layer index, linear name) of the linears ``other`` holds in weights other than ``spec``'s."""
    return [(i, n) for i, (a, b) in enumerate(zip(spec.layers, other.layers)) for n in LINEARS
            if not same_weights(a.formats[n], b.formats[n])]  # fmt: skip


def fastest_layouts(spec: SubnetSpec, held: list[str], price) -> tuple[SubnetSpec, list[str]]:
    """``spec`` with the linears of each MatMulNBits code width it uses moved to another layout of that
    width among ``held`` (ORT's int4s_b32 -> int4_b64: another block size, a zero point) where ``price``
    (a spec's decode ms/token; CostModelError where it cannot tell) finds the whole model at least
    ``LAYOUT_GAIN`` faster, the fastest such layout per width; and the swaps made (``old->new``)."""
    best, best_ms, swaps = spec, price(spec), []
    for old in sorted({f for ly in spec.layers for f in ly.formats.values()}):
        width = get_format(old).nbits
        priced = []
        for new in (f for f in held if f != old and width and get_format(f).nbits == width):  # none: not MatMulNBits
            try:
                priced.append((price(swap_formats(best, old, new)), new))
            except CostModelError:  # a layout the table has not profiled
                continue
        ms, new = min(priced, default=(math.inf, None))
        if ms < best_ms * (1 - LAYOUT_GAIN):  # never when priced out (inf)
            best, best_ms = swap_formats(best, old, new), ms
            swaps.append(f"{old}->{new}")
    return best, swaps


def narrowed_blocks(spec: SubnetSpec, wide: SubnetSpec) -> list[int]:
    """The kept blocks ``spec`` holds in other formats than ``wide`` gives them (``widen_blocks``' inverse)."""
    formats = {ly.index: ly.formats for ly in wide.layers}
    return [ly.index for ly in spec.layers if ly.formats != formats[ly.index]]


def widen_blocks(spec: SubnetSpec, wide: SubnetSpec, narrow: set[int]) -> SubnetSpec:
    """``spec`` with every kept block not in ``narrow`` in the formats ``wide`` gives that block."""
    out = SubnetSpec.from_dict(spec.to_dict())
    formats = {ly.index: ly.formats for ly in wide.layers}
    for ly in out.layers:
        if ly.index not in narrow:
            ly.formats = dict(formats[ly.index])
    return out.validate()


def runtime_formats(target: Target, runtime: str) -> list[str]:
    """The search's default formats of ``runtime`` (e.g. not ORT's per-tensor int8) that the target runs."""
    held = target.formats(runtime)
    return [f for f in DEFAULT_FORMATS.get(runtime, []) if f in held] or held


def search_space(arch, target: Target, runtime: str, mode: str, importance: Importance) -> SearchSpace:
    """The joint space for ``target``/``runtime`` with that runtime's default formats (and, in uniform
    mode with a quantization ranking, format shares)."""
    fmts = runtime_formats(target, runtime)
    quant_rank = importance.quant_rank if mode == "uniform" else None
    return SearchSpace(arch, runtime, SpaceConfig(mode=mode, attn_formats=fmts, mlp_formats=fmts),
                       importance.layer_rank, quant_rank)  # fmt: skip


def prepare_for_search(model, calib: torch.Tensor, target: Target, runtime: str, mode: str, strategy: str,
                       equalize: bool = True, adapter=None) -> tuple[Importance, list[dict]]:  # fmt: skip
    """What the search reads, done to ``model`` in place: importance-sort it, merge a supernet
    ``adapter`` (if any), equalize its channels for rounding (``equalize_for``) and rank its blocks'
    sensitivity to rounding (``rank_quantization``). Returns the importance and the equalization rows."""
    imp = sort_model(model, calib)
    if adapter:
        from search.supernet_tuning import load_supernet_adapter

        load_supernet_adapter(model, adapter)
    equalized = equalize_for(model, calib, target, runtime) if equalize else []
    return rank_quantization(imp, model, calib, target, runtime, mode, strategy), equalized


EQUALIZE_BLOCKS = 8  # x 256 calibration tokens whose activations choose the channel scales


def equalize_for(model, calib: torch.Tensor, target: Target, runtime: str) -> list[dict]:
    """Equalize ``model``'s input channels in place (``equalize_channels``) for the formats the search
    is likely to pick (``equalization_formats``), on the first calibration blocks; one row per layer
    and group, each naming those formats."""
    fmts = equalization_formats(arch_of(model.config), target, runtime)
    return [r | {"formats": fmts} for r in equalize_channels(model, calib[:EQUALIZE_BLOCKS], fmts)]


def equalization_formats(arch, target: Target, runtime: str) -> list[str]:
    """The search formats of ``runtime`` narrower than 8 bits that pay for their rounding: those the
    target's cost model predicts decode faster than the widest one, every linear alike. All narrow
    ones when none does or the table cannot tell (q5_0 on an AVX-512 CPU: slower than q8_0, never on
    the search's front without a size budget, and tuning for it too costs 4-bit formats accuracy)."""
    fmts = runtime_formats(target, runtime)
    narrow = [f for f in fmts if get_format(f).bits < 8]
    try:
        ms = {f: predict(SubnetSpec.uniform(arch, fmt=f, embed_format=fmts[0]), target, runtime).decode_ms_per_token
              for f in [fmts[0], *narrow]}  # fmt: skip
    except CostModelError:
        return narrow
    return [f for f in narrow if ms[f] < ms[fmts[0]]] or narrow


def equalization_summary(rows: list[dict]) -> dict | None:
    """The formats equalized for, and per group of linears the median alpha and the median rounding
    error relative to no scaling."""
    if not rows:
        return None
    groups = dict.fromkeys(r["group"] for r in rows)
    return {"formats": rows[0].get("formats"),
            "groups": {g: {k: statistics.median(r[k] for r in rows if r["group"] == g) for k in ("alpha", "error_ratio")}
                       for g in groups}}  # fmt: skip


def equalization_notes(summary: dict | None) -> list[str]:
    """The scorecard's line on channel equalization (none when it was off)."""
    if not summary:
        return []
    groups = summary.get("groups", summary)  # a run prepared before the formats were recorded: groups only
    names = {"o": "o", "qkv": "q/k/v", "down": "down", "gate_up": "gate/up"}
    cut = ", ".join(f"{names.get(g, g)} x{v['error_ratio']:.2f}" for g, v in groups.items())
    tuned = f" for {', '.join(summary['formats'])}" if summary.get("formats") else ""
    return [f"input channels equalized{tuned} before the search (activation-aware scales folded into the "
            f"norms, up and v; the float model is unchanged): rounding error of each group's outputs, median "
            f"over layers: {cut}"]  # fmt: skip


def gptq_notes(recovery: dict, spec: SubnetSpec, calib_tokens: int) -> list[str]:
    """The scorecard's line on the GPTQ rounding the winner's recovery started from (none without it)."""
    n = recovery.get("gptq_linears")
    if not n:
        return []
    fmts = ", ".join(sorted(spec.formats_used() & set(KEPT_SCALE_FORMATS)))
    return [f"{n} {fmts} linears rounded by GPTQ (each rounding's error moved onto the columns not yet rounded, "
            f"on {calib_tokens:,} calibration tokens) before recovery trained from there"]


QUANT_RANK_BLOCKS = 4  # x 256 calibration tokens per block-sensitivity evaluation (30 of them on SmolLM2)


def rank_quantization(importance: Importance, model, calib: torch.Tensor, target: Target, runtime: str,
                      mode: str, strategy: str) -> Importance:  # fmt: skip
    """Add the blocks' sensitivity to rounding (narrowest vs widest search format) to ``importance``
    where the search uses it: format shares, i.e. uniform mode and a strategy other than the
    sequential baseline (uniform quantization) and the differentiable search (per-block pricing)."""
    if mode != "uniform" or strategy in ("sequential", "differentiable"):
        return importance
    return measure_rounding(importance, model, calib, target, runtime)


def measure_rounding(importance: Importance, model, calib: torch.Tensor, target: Target, runtime: str) -> Importance:
    """Add the blocks' sensitivity to rounding (narrowest vs widest search format of ``runtime``) to ``importance``."""
    fmts = runtime_formats(target, runtime)
    importance.quant_rank, importance.quant_scores = quantization_rank(model, calib[:QUANT_RANK_BLOCKS], fmts[-1], fmts[0])
    importance.quant_formats = [fmts[-1], fmts[0]]
    return importance


def cost_fn(target: Target, runtime: str):
    """The search's cost function: the target's profile prediction as the dict ``search.problem`` expects."""

    def fn(spec: SubnetSpec) -> dict:
        c = predict(spec, target, runtime)
        return {"decode_ms": c.decode_ms_per_token, "prefill_ms": c.prefill_ms,
                "memory_mb": c.peak_memory_mb, "size_mb": c.size_mb}  # fmt: skip

    return fn


def _artifact(d: dict):
    from targets.backend import Artifact

    return Artifact(**d)


def _artifact_name(runtime: str, which: str) -> str:
    return f"{which}.gguf" if runtime == "llama.cpp" else which


def _size(files) -> int:
    total = 0
    for f in files:
        p = Path(f)
        total += sum(q.stat().st_size for q in p.rglob("*") if q.is_file()) if p.is_dir() else p.stat().st_size
    return total


def _diff(a: dict, b: dict) -> str:
    return ", ".join(f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("packager", "torch", "transformers", "peft", "gguf", "llama-cpp-python", "onnx", "onnxruntime", "pymoo"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _spec_summary(spec: SubnetSpec) -> str:
    shapes = sorted({(ly.heads, ly.kv_heads, ly.mlp) for ly in spec.layers})
    shape = (f"{shapes[0][0]}/{shapes[0][1]} heads, MLP {shapes[0][2]}" if len(shapes) == 1
             else f"{len(shapes)} layer shapes (heterogeneous)")  # fmt: skip
    return (f"{len(spec.layers)}/{spec.base.num_layers} layers, hidden {spec.hidden_size}, {shape}; "
            f"formats {_formats_summary(spec)}; {spec.num_params() / 1e6:.1f}M parameters")  # fmt: skip


def _formats_summary(spec: SubnetSpec) -> str:
    """Formats by role, with block counts where blocks differ: 'attention q8_0, MLP q4_0 x24 + q8_0 x6, embedding q8_0'."""
    parts = []
    for role, names in (("attention", ATTN_LINEARS), ("MLP", MLP_LINEARS)):
        counts = Counter("/".join(dict.fromkeys(ly.formats[n] for n in names)) for ly in spec.layers)
        parts.append(f"{role} " + (next(iter(counts)) if len(counts) == 1 else
                                   " + ".join(f"{f} x{k}" for f, k in counts.most_common())))  # fmt: skip
    parts.append(f"embedding {spec.embed_format}")
    if not spec.base.tie_word_embeddings:
        parts.append(f"LM head {spec.lm_head_format}")
    return ", ".join(parts)


def build_card(p: Pack) -> dict:
    """The scorecard data: every figure with its provenance."""
    measure, export = p.result("measure"), p.result("export")
    srch, rec = p.result("search"), p.result("recover")
    fp = None
    runtimes = {}
    for rt, entry in measure.items():
        sec = {"base": {}, "packaged": {}, "artifact": f"artifacts/{rt}/{Path(export[rt]['packaged']['path']).name}"}
        sec["version"] = runtime_version(rt) or ""
        for which in ("base", "packaged"):
            rec_ = entry[which]
            spec = SubnetSpec.from_dict(export[rt]["spec" if which == "packaged" else "base_spec"])
            pr = rec_["predicted"]
            row = {
                "parameters": figure(spec.num_params(), "", "computed", "counted from the spec"),
                "size_mb": figure(rec_["size_bytes"] / 2**20, "MiB", "computed", "bytes of the artifact files"),
            }
            if pr:
                est = f"the {p.target.name}/{rt} profile ({pr['provenance']})"
                row.update({
                    "predicted_decode_ms": figure(pr["decode_ms_per_token"], "ms/token", "estimated", est),
                    "predicted_prefill_ms": figure(pr["prefill_ms"], "ms", "estimated", est),
                    "predicted_peak_memory_mb": figure(pr["peak_memory_mb"], "MiB", "estimated", est),
                })  # fmt: skip
            else:
                sec["not_predicted"] = rec_["not_predicted"]
            m = rec_.get("measured")
            if m:
                fp = m["fingerprint"]
                run = m.get("settings", {})  # none: measured before they were kept
                how_run = settings_text(run)
                where = (f"{fp['device']}, {fp['threads']} threads, {fp['runtime']} {fp['runtime_version']}"
                         f"{f' ({how_run})' if how_run else ''}, {fp['date']}")  # fmt: skip
                n = len(rec_.get("decode_ms_rounds", []))  # none: measured before rounds were kept, in one
                how = (f"median of {n} round{'s' * (n > 1)} (base and packaged taking turns) of {m['repeats'] // n} runs"
                       if n else f"median of {m['repeats']}")  # fmt: skip
                row.update({
                    "prefill_ms": figure(m["prefill_ms"], "ms", "measured", f"{how}, {where}", run),
                    "decode_ms_per_token": figure(m["decode_ms_per_token"], "ms/token", "measured", f"{how}, {where}", run),
                    "tokens_per_s": figure(m["tokens_per_s"], "tokens/s", "measured", where, run),
                    "peak_memory_mb": figure(m["peak_rss_mb"], "MiB", "measured", f"{PEAK_RSS}, {where}",
                                             memory_record(run)),
                    "perplexity_runtime": figure(rec_["perplexity_runtime"], "", "measured",
                                                 f"{rec_['perplexity_tokens']:,} held-out tokens scored in {rt}"),
                })  # fmt: skip
            elif pr:
                row.update({
                    "prefill_ms": figure(pr["prefill_ms"], "ms", "estimated", est),
                    "decode_ms_per_token": figure(pr["decode_ms_per_token"], "ms/token", "estimated", est),
                    "tokens_per_s": figure(pr["tokens_per_s"], "tokens/s", "estimated", est),
                    "peak_memory_mb": figure(pr["peak_memory_mb"], "MiB", "estimated", est),
                })  # fmt: skip
            sim = p.result("select")["winner"]["ppl"] if which == "packaged" else srch["base"]["ppl"]
            src = f"torch supernet, before recovery, formats simulated, {p.cfg.eval_blocks * 255:,} held-out tokens"
            row["perplexity_simulated"] = figure(sim, "", "measured", src)
            sec[which] = row
        ppl = [sec[w].get("perplexity_runtime", {}).get("value") for w in ("base", "packaged")]
        if None not in ppl:
            limit = ppl[0] * (1 + p.cfg.accuracy_floor)
            sec["accuracy_floor"] = {"max_increase": p.cfg.accuracy_floor, "base": ppl[0], "packaged": ppl[1],
                                     "limit": limit, "met": ppl[1] <= limit}  # fmt: skip
            nll = [entry[w].get("nll_per_block") for w in ("base", "packaged")]
            if None not in nll:  # measured before per-block scores were kept: no interval
                tokens = entry["base"]["perplexity_tokens"] // len(nll[0])
                sec["accuracy_floor"]["increase_ci95"] = perplexity_ratio(*nll, tokens)
        if entry.get("decode_speedup"):
            sec["decode_speedup"] = entry["decode_speedup"]
        if rt in rec.get("runtimes", {}):
            sec["recovery"] = rec["runtimes"][rt]
        par = export[rt]["packaged"].get("meta", {}).get("parity")
        if par:
            sec["parity"] = par
        eng = export[rt]["packaged"].get("meta", {}).get("engine")
        if eng:
            sec["engine"] = eng
        runtimes[rt] = sec
    spec = p.winner_spec()
    loaded = p.base()
    return {
        "model": {"source": loaded.source, "architecture": loaded.arch.to_dict(),
                  "notes": loaded.notes + equalization_notes(p.result("prepare").get("equalization"))
                  + gptq_notes(rec, spec, p.cfg.calib_blocks * 256)},
        "target": p.target.to_dict(),
        "workload": asdict(p.target.workload) if not isinstance(p.target.workload, dict) else p.target.workload,
        "machine": fp or fingerprint("none", "", None),
        "config": asdict(p.cfg),
        "spec": spec.to_dict(),
        "spec_summary": _spec_summary(spec),
        "search": {"strategy": p.cfg.strategy, "seed": p.cfg.seed, "evaluations": srch["evaluations"],
                   "hypervolume": srch["hypervolume"], "wall_s": srch["wall_s"], "runtime": p.search_runtime},
        "selection": selection_summary(p.result("select")),
        "recovery": rec if "ppl_after" in rec else None,
        "runtimes": runtimes,
        "stage_wall_s": {k: v["wall_s"] for k, v in p.state.get("done", {}).items()},
    }  # fmt: skip


def selection_summary(sel: dict) -> dict:
    """How the winner was chosen, and each shortlisted candidate's short-recovery outcome."""
    rows = [{"spec": _spec_summary(SubnetSpec.from_dict(t["evaluation"]["spec"])),
             "predicted_decode_ms": t["evaluation"]["decode_ms"], "ppl_simulated": t["evaluation"]["ppl"],
             **{k: t[k] for k in (*FLOOR_KEYS, "wall_s")}}
            for t in sel["shortlist"]]  # fmt: skip

    def promoted(pro: dict) -> dict:
        return {"spec": _spec_summary(SubnetSpec.from_dict(pro["evaluation"]["spec"])),
                **{k: pro["recovery"][k] for k in ("steps_run", "wall_s")}, "train_blocks": pro["recovery"].get("train_blocks"),
                "long": pro.get("long", False), "predicted_decode_ms": pro["evaluation"]["decode_ms"],
                **{k: pro[k] for k in FLOOR_KEYS}}  # fmt: skip

    pro = sel.get("promoted")
    if pro:
        pro = promoted(pro) | {"missed": [promoted(m) for m in pro.get("missed", [])]}
    return {"how": sel["how"], "shortlist": rows, "promoted": pro}


def plot_predicted_vs_measured(measure: dict, path: Path) -> Path | None:
    """Bar chart of predicted vs measured decode latency per runtime and model (None if nothing measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, pred, meas = [], [], []
    for rt, entry in measure.items():
        for which in ("base", "packaged"):
            m = entry[which].get("measured")
            if m and entry[which].get("predicted"):
                labels.append(f"{rt}\n{which}")
                pred.append(entry[which]["predicted"]["decode_ms_per_token"])
                meas.append(m["decode_ms_per_token"])
    if not labels:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], pred, 0.4, label="predicted (profile)")
    ax.bar([x + 0.2 for x in xs], meas, 0.4, label="measured")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("decode ms/token")
    ax.set_title("Decode latency: cost model vs measurement")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

