"""Accuracy on lm-eval tasks for a model object in memory.

Standard lm-eval task names (arc_easy, hellaswag, ...) are passed through; they download their data set
from the Hugging Face hub, so they need it reachable. The shipped tasks (search/tasks/*.yaml, built from
the evaluation text) run offline: their YAML names a local JSONL, which is resolved to an absolute path in
a temporary copy so that it works from an installed package and from any working directory.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import yaml

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


class LmEvalError(ValueError):
    """An lm-eval run that cannot go ahead, with the reason and the fix in one line."""


def shipped_tasks() -> list[str]:
    """Names of the offline tasks shipped with packager."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def _materialize_shipped(dest: Path) -> None:
    """Copy the shipped task YAMLs to ``dest`` with their data_files made absolute."""
    for src in TASKS_DIR.glob("*.yaml"):
        cfg = yaml.safe_load(src.read_text(encoding="utf-8"))
        files = cfg.get("dataset_kwargs", {}).get("data_files", {})
        for split, name in files.items():
            path = (TASKS_DIR / name).resolve()
            if not path.is_file():
                raise LmEvalError(f"{path} is missing: reinstall packager (search/tasks/*.jsonl is package data)")
            files[split] = str(path)
        (dest / src.name).write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")


def _hub_reachable(timeout: float = 5.0) -> bool:
    import os
    import urllib.request

    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(f"{endpoint}/api/datasets?limit=1", timeout=timeout)  # noqa: S310
        return True
    except Exception:
        return False


def evaluate_tasks(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
) -> dict[str, dict[str, float]]:
    """Run lm-eval 0.4.13 on ``model`` (any HF causal LM in memory) and return {task: {metric: value}}.

    ``limit`` caps the items per task (a fraction if < 1). Metric names drop lm-eval's ",none" filter
    suffix; standard errors are returned as ``<metric>_stderr`` and the number of items as ``n``.
    """
    if not tasks:
        raise LmEvalError("no lm-eval task given: name at least one, e.g. " + ", ".join(shipped_tasks()))
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tmp = Path(tempfile.mkdtemp(prefix="packager-lmeval-"))
    try:
        _materialize_shipped(tmp)
        offline = shipped_tasks()
        remote = [t for t in tasks if t not in offline]
        # indexing lm-eval's thousands of built-in task files takes seconds: only when a standard task is asked for
        manager = TaskManager(include_path=str(tmp), include_defaults=bool(remote))
        unknown = [t for t in remote if t not in manager.all_tasks]
        if unknown:
            raise LmEvalError(
                f"unknown lm-eval task(s) {', '.join(unknown)}: use a standard lm-eval task name or one of "
                f"the shipped offline tasks ({', '.join(offline)})"
            )
        if remote and not _hub_reachable():
            raise LmEvalError(
                f"lm-eval task(s) {', '.join(remote)} need their data set from the Hugging Face hub, which is "
                f"not reachable here: use the offline tasks ({', '.join(offline)}) or run where the hub is"
            )
        device = str(next(model.parameters()).device)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        try:
            out = simple_evaluate(
                model=lm,
                tasks=list(tasks),
                limit=limit,
                num_fewshot=num_fewshot,
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=1000,  # "mean" metrics use the closed-form stderr; 0 would drop stderrs
                random_seed=0,
                numpy_random_seed=0,
                torch_random_seed=0,
                fewshot_random_seed=0,
            )
        except (ConnectionError, OSError) as e:
            if not remote:
                raise
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LmEvalError(f"lm-eval could not fetch the data set of {', '.join(remote)}: {first}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {task: _clean_metrics(out["results"][task]) for task in tasks}


def _clean_metrics(raw: dict) -> dict[str, float]:
    """{"acc,none": 0.5, "acc_stderr,none": ..., "alias": ...} -> {"acc": 0.5, "acc_stderr": ...}."""
    clean = {}
    for key, value in raw.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            name = key.split(",")[0]
            clean["n" if name == "sample_len" else name] = float(value)
    return clean
