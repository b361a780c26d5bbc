"""The `packager` command line."""

from __future__ import annotations

import json
import sys

import click

from subnet.arch import UnsupportedArchitecture
from subnet.loading import ModelLoadError
from subnet.spec import SpecError

USER_ERRORS = (ModelLoadError, UnsupportedArchitecture, SpecError, FileExistsError)


def _user_errors() -> tuple:
    """Every error type that means "bad input" (each carries a one-line reason and fix)."""
    from packager.bundle import BundleError
    from packager.pack import PackError
    from profiles.costmodel import CostModelError
    from profiles.profiler import ProfileError
    from search.importance import ImportanceError
    from search.problem import InfeasibleBudget
    from search.recovery import RecoveryError
    from search.run import SearchError
    from search.space import SpaceError
    from search.text import TextError
    from targets.backend import ExportError
    from targets.registry import TargetError

    return USER_ERRORS + (BundleError, PackError, CostModelError, ProfileError, ImportanceError, InfeasibleBudget,
                          SearchError, SpaceError, TextError, ExportError, TargetError, RecoveryError)  # fmt: skip


class _Group(click.Group):
    """Turns the errors a user can fix into one clear line and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as e:  # noqa: BLE001 - user errors become one line; anything else keeps its traceback
            if isinstance(e, _user_errors()):
                click.echo(f"error: {e}", err=True)
                sys.exit(2)
            raise


@click.group(cls=_Group)
@click.version_option(package_name="packager")
def main():
    """Find, export and measure the smallest, fastest sub-network of an LLM for a target device."""


model_option = click.option(
    "--model", "model", default=None, help="HF folder, .gguf file or hub id (default: embedded SmolLM2-135M)."
)
pickle_option = click.option(
    "--allow-pickle", is_flag=True, help="Allow pickle (.bin/.pt) checkpoints; they can run code when loaded."
)


@main.command()
@click.argument("model", required=False)
@pickle_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def inspect(model, allow_pickle, as_json):
    """Architecture, parameters, per-layer shapes, dtype and size of MODEL (default: embedded SmolLM2)."""
    from packager.inspect import print_summary, summary
    from subnet.loading import load_model

    info = summary(load_model(model, allow_pickle=allow_pickle))
    if as_json:
        click.echo(json.dumps(info, indent=1))
    else:
        print_summary(info)


@main.command()
def targets():
    """List the known targets (built-in and $PACKAGER_HOME/targets/*.json)."""
    from rich.console import Console
    from rich.table import Table

    from targets.registry import list_targets

    table = Table("target", "runtimes (formats)", "memory", "bandwidth", "source")
    for t in list_targets():
        rts = "\n".join(f"{r}: {', '.join(f)}" for r, f in t.runtimes.items())
        mem = f"{t.memory_gb:g} GB" if t.memory_gb else "measured"
        bw = f"{t.bandwidth_gbps:g} GB/s" if t.bandwidth_gbps else "measured"
        table.add_row(t.name, rts, mem, bw, t.source)
    Console().print(table)


@main.command()
@click.option("--target", "target", default="laptop-cpu", show_default=True)
@click.option("--runtime", "runtime", default=None, help="Runtime to profile (default: the target's default).")
@click.option("--threads", type=int, default=None)
@click.option("--repeats", type=int, default=5, show_default=True)
@click.option("--out", type=click.Path(), default=None, help="Table path (default: $PACKAGER_HOME/profiles/).")
@click.option("--no-resume", is_flag=True, help="Start over instead of continuing an interrupted profile.")
@click.option("--memory-only", is_flag=True,
              help="Re-measure only the peak memory of the table's points measured under other load settings, or "
                   "counted otherwise "
                   "(the table at --out, else the one this machine uses, written to --out or $PACKAGER_HOME/profiles/); "
                   "latency and its calibration are kept.")  # fmt: skip
def profile(target, runtime, threads, repeats, out, no_resume, memory_only):
    """Measure the runtime's building-block latencies on this machine into a profile table."""
    from profiles import costmodel
    from profiles.profiler import profile as run_profile
    from profiles.profiler import remeasure_memory

    if memory_only:
        from pathlib import Path

        from targets.registry import get_target

        tgt = get_target(target)
        rt = tgt.runtime(runtime)
        src = out if out and Path(out).is_file() else costmodel.table_path(tgt.name, rt)
        dst = out or costmodel.user_tables_dir() / costmodel.table_name(tgt.name, rt)
        table = remeasure_memory(src, dst, threads=threads)
        m = table["model"]["memory"]
        click.echo(f"peak memory of {len(table['points'])} points → {dst} (fit MAPE {m.get('mape', float('nan')):.1f}%)")
        return
    table = run_profile(target, runtime, out=out, resume=not no_resume, threads=threads, repeats=repeats)
    click.echo(f"profiled {len(table['points'])} points → {table.get('path', out or 'the user table folder')}")


def _shares(text: str) -> list[float]:
    """``--runtime-format-shares``: comma-separated shares in (0, 1], largest first."""
    try:
        shares = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        shares = []
    if not shares or not all(0 < x <= 1 for x in shares) or shares != sorted(shares, reverse=True):
        raise click.BadParameter(f"{text!r}: give comma-separated shares in (0, 1], largest first, e.g. 1.0,0.8,0.6",
                                 param_hint="--runtime-format-shares")  # fmt: skip
    return shares


def _base_and_calibration(model, allow_pickle, calib_blocks=16):
    """Load a model and the calibration blocks the search prepares it on: (loaded model, blocks)."""
    from search.text import token_blocks
    from subnet.loading import load_model

    loaded = load_model(model, allow_pickle=allow_pickle)
    return loaded, token_blocks(loaded.tokenizer, "calibration", 256, calib_blocks)


def _search_problem(model, target, runtime, mode, budgets, allow_pickle, strategy="nsga2", eval_blocks=8, calib_blocks=16,
                    adapter=None):  # fmt: skip
    """Load a model and prepare it as `packager pack` does (``prepare_for_search``); wrap it as a search problem on ``target``."""
    from packager.pack import cost_fn, prepare_for_search, search_space
    from search.problem import Problem
    from search.text import token_blocks
    from subnet.supernet import Supernet
    from targets.registry import get_target

    tgt = get_target(target)
    rt = tgt.runtime(runtime)
    loaded, calib = _base_and_calibration(model, allow_pickle, calib_blocks)
    imp, _ = prepare_for_search(loaded.model, calib, tgt, rt, mode, strategy, adapter=adapter)
    space = search_space(loaded.arch, tgt, rt, mode, imp)
    evals = token_blocks(loaded.tokenizer, "evaluation", 256, eval_blocks)
    return Problem(space, Supernet(loaded.model), evals, calib, cost_fn(tgt, rt), budgets)


@main.command()
@model_option
@click.option("--target", default="laptop-cpu", show_default=True)
@click.option("--runtime", default=None, help="Runtime whose formats and latency are searched (default: the target's).")
@click.option("--strategy", default="nsga2", show_default=True,
              type=click.Choice(["nsga2", "linas", "random", "sequential", "differentiable"]))
@click.option("--mode", default="uniform", show_default=True, type=click.Choice(["uniform", "hetero"]))
@click.option("--budget", default=100, show_default=True, help="Real (accuracy) evaluations.")
@click.option("--latency-ms", type=float, default=None, help="Decode latency budget (ms/token).")
@click.option("--memory-mb", type=float, default=None, help="Peak memory budget (MiB).")
@click.option("--size-mb", type=float, default=None, help="Size-on-disk budget (MiB).")
@click.option("--accuracy-floor", type=float, default=None, help="Max perplexity increase over the base, e.g. 0.05.")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(), required=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted search in --out.")
@click.option("--supernet-adapter", type=click.Path(), default=None,
              help="A `packager tune-supernet` adapter folder, merged into the sorted model before the search.")
@pickle_option
def search(model, target, runtime, strategy, mode, budget, latency_ms, memory_mb, size_mb, accuracy_floor, seed, out,
           resume, supernet_adapter, allow_pickle):  # fmt: skip
    """Search sub-networks x weight formats; writes front.json, state.json and front.png to --out."""
    from pathlib import Path

    from search.problem import Budgets
    from search.run import plot_front, require_feasible, run_search

    budgets = Budgets(latency_ms=latency_ms, memory_mb=memory_mb, size_mb=size_mb, max_ppl_increase=accuracy_floor)
    problem = _search_problem(model, target, runtime, mode, budgets, allow_pickle, strategy, adapter=supernet_adapter)
    res = run_search(problem, strategy, budget, seed, out=Path(out), resume=resume)
    plot_front({strategy: res}, Path(out) / "front.png", f"{strategy} on {target}")
    best = require_feasible(res, problem)
    click.echo(f"{len(res.evaluations)} evaluations, {len(res.front)} on the front, hypervolume {res.hypervolume:.4f}; "
               f"base perplexity {res.base.ppl:.2f} at {res.base.decode_ms:.2f} ms/token; most accurate feasible: "
               f"{best.ppl:.2f} at {best.decode_ms:.2f} ms/token → {out}/front.json")  # fmt: skip


@main.command("tune-supernet")
@model_option
@click.option("--target", default="laptop-cpu", show_default=True)
@click.option("--runtime", default=None, help="Runtime whose search space is sampled (default: the target's).")
@click.option("--mode", default="uniform", show_default=True, type=click.Choice(["uniform", "hetero"]))
@click.option("--steps", default=100, show_default=True, help="Sandwich-rule steps.")
@click.option("--calib-blocks", default=64, show_default=True, help="Calibration blocks of 256 tokens to tune on.")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(), required=True, help="Folder for the adapter (peft layout).")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@pickle_option
def tune_supernet_cmd(model, target, runtime, mode, steps, calib_blocks, seed, out, force, allow_pickle):
    """Sandwich-rule LoRA tuning (InstaTune/LoNAS) of the sorted model's shared weights, saved as an adapter.

    Sorts the model as `packager search` does: pass the adapter to `packager search --supernet-adapter`
    with the same --model.
    """
    from packager.pack import search_space
    from search.supernet_tuning import (
        SupernetTuningConfig,
        tune_supernet,
        tuning_summary,
    )
    from search.importance import sort_model
    from search.text import token_blocks
    from targets.registry import get_target

    tgt = get_target(target)
    loaded, sort_text = _base_and_calibration(model, allow_pickle)  # the blocks `packager search` sorts on
    imp = sort_model(loaded.model, sort_text)
    space = search_space(loaded.arch, tgt, tgt.runtime(runtime), mode, imp)
    text = token_blocks(loaded.tokenizer, "calibration", 256, calib_blocks)
    path = tune_supernet(loaded.model, space, text, SupernetTuningConfig(steps=steps, seed=seed), out, force=force)
    click.echo(f"{tuning_summary(path)} → {out}")


@main.command()
@click.option("--target", default="laptop-cpu", show_default=True)
@model_option
@click.option("--latency-ms", type=float, default=None, help="Decode latency budget (ms/token).")
@click.option("--memory-mb", type=float, default=None, help="Peak memory budget (MiB).")
@click.option("--size-mb", type=float, default=None, help="Size-on-disk budget (MiB).")
@click.option("--accuracy-floor", type=float, default=0.05, show_default=True,
              help="Max perplexity increase over the base at the widest searched formats.")
@click.option("--formats", "runtimes", multiple=True, help="Runtime(s) to export to (default: all of the target's).")
@click.option("--strategy", default="nsga2", show_default=True,
              type=click.Choice(["nsga2", "linas", "random", "sequential", "differentiable"]))
@click.option("--mode", default="uniform", show_default=True, type=click.Choice(["uniform", "hetero"]))
@click.option("--budget", default=100, show_default=True, help="Search evaluations.")
@click.option("--recover-steps", default=120, show_default=True)
@click.option("--recover-blocks", default=160, show_default=True,
              help="Blocks of 256 calibration tokens recovery trains on (spread over the split; none held out).")
@click.option("--floor-blocks", default=32, show_default=True,
              help="Blocks of 256 tokens the floor check scores after recovery, from calibration documents that "
                   "nothing is fitted or trained on (the check split).")
@click.option("--runtime-recover-steps", default=60, show_default=True,
              help="Recovery steps for each other runtime whose formats round the winner differently (0: none).")
@click.option("--runtime-format-shares", default="1.0,0.9,0.8", show_default=True,
              help="Shares of blocks (least rounding-sensitive first) keeping the carried formats in such a runtime, "
                   "tried in turn until its recovery meets the floor; the rest take the exact carry's formats where "
                   "it holds the winner's weights, else the base's.")
@click.option("--retarget", default="exact", show_default=True, type=click.Choice(["exact", "fastest"]),
              help="How the winner's formats reach the other runtimes: exact (the same weights where a twin format "
                   "holds them) or fastest (per code width, the layout that runtime's profile prices at least 3%% "
                   "faster, e.g. ONNX Runtime's 4-bit blocks of 64, recovered for it; exact if that misses the floor).")
@click.option("--shortlist", default=3, show_default=True,
              help="Faster candidates given a short recovery before choosing the winner (0: choose before recovery).")
@click.option("--recoverable", default=0.3, show_default=True,
              help="Perplexity increase above the floor that the search explores for the shortlist.")
@click.option("--promote-margin", default=0.05, show_default=True,
              help="The fastest shortlisted near miss (within this margin of the floor), if faster than every one "
                   "meeting it, gets the full recovery.")
@click.option("--long-recovery/--short-recovery", default=True, show_default=True,
              help="Long: the promoted near miss trains 600 steps on 4x the training text with every step run "
                   "(30-40 min on 2 cores for SmolLM2), and so does each try of another runtime's own "
                   "recovery. Short: the winner's recovery (120 steps, early-stopped; 5-6 min), a bundle "
                   "that can land just over the accuracy floor.")
@click.option("--equalize/--no-equalize", default=True, show_default=True,
              help="Scale input channels for rounding (activation-aware, folded into norms, up and v) before the search.")
@click.option("--gptq/--no-gptq", default=True, show_default=True,
              help="Round iq4_nl linears by GPTQ (error compensation on calibration text) before every recovery.")
@click.option("--ladder", default=2, show_default=True,
              help="Rounds of bisection toward faster members of each format family whose shortlisted candidate met "
                   "the floor (a short recovery each; 0: the shortlist only).")
@click.option("--step-down", default=1, show_default=True,
              help="Format shares a promoted near miss that misses the floor steps down (its most rounding-sensitive "
                   "blocks back at the widest formats; the same recovery each, while within the budgets and faster "
                   "than every candidate that met the floor; 0: none).")
@click.option("--report-blocks", default=32, show_default=True,
              help="Blocks of 256 evaluation tokens (none the search scored) each runtime's perplexity is reported on.")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=2, show_default=True)
@click.option("--measure-rounds", default=3, show_default=True,
              help="Rounds in which the base and the packaged artifact take turns being timed (the decode gain is "
                   "the median of the per-round ratios).")
@click.option("--out", type=click.Path(), default="out/pack", show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last finished stage.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@pickle_option
def pack(target, model, latency_ms, memory_mb, size_mb, accuracy_floor, runtimes, strategy, mode, budget,
         recover_steps, recover_blocks, floor_blocks, runtime_recover_steps, runtime_format_shares, retarget, shortlist,
         recoverable, promote_margin,
         long_recovery, equalize, gptq, ladder, step_down, report_blocks, seed, threads, measure_rounds, out, resume, force,
         allow_pickle):  # fmt: skip
    """One command from model to bundle: search, select, recover, export, measure, scorecard."""
    from pathlib import Path

    from packager.pack import Pack, PackConfig

    cfg = PackConfig(target=target, model=model, latency_ms=latency_ms, memory_mb=memory_mb, size_mb=size_mb,
                     accuracy_floor=accuracy_floor, runtimes=list(runtimes), strategy=strategy, mode=mode,
                     budget=budget, seed=seed, recover_steps=recover_steps, recover_blocks=recover_blocks,
                     floor_blocks=floor_blocks, runtime_recover_steps=runtime_recover_steps,
                     runtime_format_shares=_shares(runtime_format_shares), retarget=retarget,
                     shortlist=shortlist, recoverable=recoverable, promote_margin=promote_margin,
                     long_recovery=long_recovery, equalize=equalize, gptq=gptq, ladder=ladder, step_down=step_down,
                     report_blocks=report_blocks, threads=threads, measure_rounds=measure_rounds,
                     allow_pickle=allow_pickle)  # fmt: skip
    folder = Pack(cfg, Path(out), resume=resume, force=force).run()
    click.echo((folder / "scorecard.md").read_text())


@main.command()
@model_option
@click.option("--spec", "spec_path", type=click.Path(exists=True), required=True, help="SubnetSpec JSON.")
@click.option("--out", type=click.Path(), required=True, help="Folder for the recovered model (safetensors).")
@click.option("--steps", default=200, show_default=True)
@click.option("--qat", is_flag=True, help="Train against the spec's simulated weight formats.")
@click.option("--calib-blocks", default=32, show_default=True, help="Calibration blocks of 256 tokens.")
@click.option("--val-blocks", default=8, show_default=True,
              help="Held-out calibration blocks of 256 tokens (early stopping), spread over the split.")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in --out.work.")
@pickle_option
def recover(model, spec_path, out, steps, qat, calib_blocks, val_blocks, resume, allow_pickle):
    """LoRA + distillation recovery of a spec's sub-network, merged into its weights.

    MODEL must be the base the spec was cut from (for a pack run: its DIR.work/sorted folder).
    """
    from pathlib import Path

    from search.recovery import RecoveryConfig
    from search.recovery import recover as run_recovery
    from search.text import holdout_blocks
    from subnet.extract import extract
    from subnet.loading import load_model
    from subnet.spec import SubnetSpec
    from targets.backend import atomic_output

    loaded = load_model(model, allow_pickle=allow_pickle)
    spec = SubnetSpec.load(spec_path).validate(loaded.arch)
    blocks = holdout_blocks(loaded.tokenizer, "calibration", 256, calib_blocks, val_blocks)
    work = Path(out).with_name(Path(out).name + ".work")
    res = run_recovery(loaded.model, extract(loaded.model, spec), spec, blocks.train, blocks.held,
                       RecoveryConfig(max_steps=steps, qat=qat), out_dir=work, resume=resume)  # fmt: skip
    with atomic_output(out, force=resume) as tmp:
        res.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
    click.echo(f"perplexity {res.ppl_before:.2f} → {res.ppl_after:.2f} on held-out calibration blocks "
               f"({res.steps_run} steps, {res.wall_s:.0f} s, {res.stopped_reason}) → {out}")  # fmt: skip


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--no-measure", is_flag=True, help="Only check integrity.")
@click.option("--tolerance", default=0.25, show_default=True, help="Relative drift that is flagged.")
@click.option("--threads", type=int, default=None)
@click.option("--rounds", default=3, show_default=True, help="Re-measurements (fresh processes) whose median is compared.")
def verify(bundle, no_measure, tolerance, threads, rounds):
    """Check a bundle's integrity and re-measure it against its scorecard."""
    from packager.verify import verify as run_verify

    rep = run_verify(bundle, remeasure=not no_measure, tolerance=tolerance, threads=threads, rounds=rounds)
    click.echo(f"integrity: ok ({rep['files_checked']} files, sha256 verified)")
    for rt, r in rep["runtimes"].items():
        if "skipped" in r:
            click.echo(f"{rt}: not re-measured: {r['skipped']}")
            continue
        for row in r["rows"]:
            if "not_compared" in row:
                mark = f"not compared: {row['not_compared']}"
            else:
                mark = f"({row['drift']:+.0%}) {'DRIFT' if row['flag'] else 'ok'}"
            click.echo(f"{rt} {row['metric']}: scorecard {row['scorecard']:.3g}, now {row['measured_now']:.3g} {mark}")
    if rep["drift"]:
        click.echo(f"drift beyond {tolerance:.0%}: " + "; ".join(rep["drift"]), err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
