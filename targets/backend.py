"""What every runtime backend shares: the artifact it writes and the measurement it takes.

A backend module (``targets.llamacpp``, ``targets.onnxrt``, ``targets.tensorrt``) provides
``export(model, tokenizer, spec, out, force=False) -> Artifact`` (one whose runtime has kept-scale
formats also takes ``block_scales``, the scales recovery kept), ``load(artifact)`` returning an
object with ``logits(token_ids) -> np.ndarray`` and ``generate(token_ids, n) -> list[int]``, and
``measure(artifact, workload, threads) -> Measurement``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path


class ExportError(RuntimeError):
    """An export that cannot be done, with the reason and the fix in one line."""


@dataclass
class Artifact:
    """An exported model: its files and what made it."""

    runtime: str
    path: str  # the main file (.gguf, .onnx) or folder
    files: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # formats really written, fallbacks, parity, versions

    def to_dict(self) -> dict:
        return asdict(self)

    def write_meta(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))


@dataclass
class Workload:
    """What a deployment runs: prompt length, tokens generated, batch."""

    prompt_tokens: int = 128
    gen_tokens: int = 64
    batch: int = 1

    @property
    def context(self) -> int:
        return self.prompt_tokens + self.gen_tokens


# What ``Measurement.peak_rss_mb`` counts, in every backend: the runtime library is imported first, so the
# figure is the model's (weights as the runtime holds them, its buffers, the KV cache) and not Python's.
PEAK_RSS = "the model's peak RSS (the process's peak minus its RSS before loading)"
PEAK_RSS_BASIS = "model"  # PEAK_RSS in a word, recorded beside a profile point's or a scorecard's peak RSS


def memory_record(settings: dict) -> dict:
    """What a peak RSS taken under load ``settings`` depends on besides the model: those settings and what
    the figure counts (``PEAK_RSS_BASIS``). Two peaks compare only where their records are equal."""
    return {**settings, "peak_rss": PEAK_RSS_BASIS}


@dataclass
class Measurement:
    """Latency and memory measured on this host (medians over repeats)."""

    runtime: str
    prefill_ms: float  # time to process the prompt = time to first token
    decode_ms_per_token: float
    peak_rss_mb: float
    repeats: int
    workload: dict
    fingerprint: dict
    settings: dict = field(default_factory=dict)  # how the runtime loaded and ran the model, where it has a choice

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 / self.decode_ms_per_token

    @property
    def memory_settings(self) -> dict:
        """What its peak RSS depends on besides the model (``memory_record``)."""
        return memory_record(self.settings)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_s"] = self.tokens_per_s
        return d


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """This CPU's model name (read once per process)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# SIMD features that change which kernels llama.cpp / ONNX Runtime run (and so their speed)
SIMD_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile",
                 "asimd", "sve", "i8mm")  # fmt: skip


@lru_cache(maxsize=1)
def cpu_features() -> tuple[str, ...]:
    """This CPU's ``SIMD_FEATURES`` (from /proc/cpuinfo, read once per process; empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                have = set(line.split(":", 1)[1].split())
                return tuple(f for f in SIMD_FEATURES if f in have)
    except OSError:
        pass
    return ()


def fingerprint(runtime: str, version: str, threads: int | None = None, device: str | None = None) -> dict:
    """Where a measurement was taken: machine, its SIMD features, cores, threads, runtime and version, date."""
    return {
        "device": device or cpu_model(),
        "cpu_features": list(cpu_features()) if device is None else None,
        "cores": os.cpu_count(),
        "threads": threads,
        "machine": platform.machine(),
        "os": platform.platform(terse=True),
        "runtime": runtime,
        "runtime_version": version,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def settings_text(settings: dict) -> str:
    """A measurement's settings as a scorecard names them, e.g. ``use_mmap=False, kv_cache=f16`` ("" for none)."""
    return ", ".join(f"{k}={v}" for k, v in settings.items())


def _status_mb(key: str) -> float:
    """VmRSS / VmHWM (peak) of this process in MiB, from /proc (ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def drop_page_cache(paths) -> None:
    """Write ``paths`` back and drop them from the page cache (Linux; elsewhere, or for a file that cannot
    be opened, nothing happens), so a runtime that maps them reads them from disk, as at a cold start.

    How a file entered the page cache moves the RSS of a mapping of it: written moments before (an
    export), its pages sit in folios of up to 2 MiB that map whole. On the Xeon of stop 44, ONNX Runtime's
    model peak for the base read 267.5 MiB with its files just written, 249.8 once they were dropped."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)  # dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except (OSError, AttributeError):  # no posix_fadvise on this platform
            pass
        finally:
            os.close(fd)


class ModelPeakRss:
    """The peak RSS that the code inside ``with ModelPeakRss() as rss:`` adds to this process, in MiB
    (``rss.mb`` after the block; ``PEAK_RSS``): the peak is reset to the current RSS on entry (Linux
    ``clear_refs`` 5; where that fails, the process's peak since it started stands in)."""

    def __enter__(self) -> "ModelPeakRss":
        self.before = _status_mb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self.mb = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.mb = _status_mb("VmHWM") - self.before


def model_name(config, family: str) -> str:
    """The name an artifact carries (GGUF ``general.name``, the ONNX graph's name): the config's
    ``name_or_path`` without its folders (what a packager run sets it to, or the folder or hub id it was
    loaded from), else a generic one."""
    name = Path(str(getattr(config, "name_or_path", "") or "")).name
    return name or f"packager {family} sub-network"


@contextmanager
def atomic_output(final: str | os.PathLike, force: bool = False):
    """Yield a temp folder next to ``final``; on success it is renamed to ``final``.

    An existing ``final`` is refused unless ``force``; on error nothing is left under the final name.
    """
    final = Path(final)
    if final.exists() and not force:
        raise ExportError(f"{final} already exists: choose another output path or pass --force")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


BACKENDS = {"llama.cpp": ("targets.llamacpp", "llama-cpp-python"), "onnxruntime": ("targets.onnxrt", "onnxruntime"),
            "tensorrt": ("targets.tensorrt", "tensorrt")}  # fmt: skip


def save_tokenizer(tokenizer, folder: str | os.PathLike) -> None:
    """The tokenizer's files in ``folder``, a fast tokenizer's tokenizer.json written compact (transformers
    indents it: for SmolLM2's 3.5 MB, 1.6 MB without the indentation; the same JSON)."""
    tokenizer.save_pretrained(folder)
    fast = getattr(tokenizer, "backend_tokenizer", None)
    if fast is not None and (Path(folder) / "tokenizer.json").exists():
        fast.save(str(Path(folder) / "tokenizer.json"), pretty=False)


def read_json(path: str | os.PathLike, what: str, error: type[Exception]):
    """Parse a JSON file; unreadable or invalid files raise ``error`` with one line naming ``what``."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise error(f"{what} {path} is not valid JSON: {e}") from None


def backend(runtime: str):
    """The backend module of a runtime (export/load/measure); a missing runtime says what to install."""
    import importlib

    if runtime not in BACKENDS:
        raise ExportError(f"unknown runtime {runtime!r}; known runtimes: {', '.join(BACKENDS)}")
    module, package = BACKENDS[runtime]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ExportError(f"runtime {runtime} is not installed ({e.name} missing): pip install {package}") from None


def runner_nll_per_block(runner, blocks):
    """Summed negative log-likelihood (nats) of each block's predicted tokens, scored by a loaded artifact
    (any runner with ``logits(ids) -> [n, vocab]``): a float64 array of shape [n_blocks]."""
    import numpy as np

    sums = []
    for row in np.asarray(blocks):
        logits = runner.logits(row.tolist()).astype(np.float64)[:-1]
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        sums.append(-float(logp[np.arange(len(row) - 1), row[1:]].sum()))
    return np.array(sums)


def measure_interleaved(mod, artifacts: dict, workload: Workload, threads: int, rounds: int,
                        repeats: int = 3) -> dict[str, list[Measurement]]:  # fmt: skip
    """Each of ``artifacts`` (name -> artifact or path) measured by backend ``mod`` once per round (each a
    median of ``repeats``), the artifacts taking turns within a round, so that drift in the machine's
    speed hits them alike."""
    runs: dict[str, list[Measurement]] = {name: [] for name in artifacts}
    for _ in range(rounds):
        for name, art in artifacts.items():
            runs[name].append(mod.measure(art, workload, threads=threads, repeats=repeats))
    return runs


def median_measurement(runs: list[Measurement]) -> Measurement:
    """One measurement from several rounds: the median of each figure, the repeats of all of them, the
    last round's fingerprint and settings."""
    return Measurement(
        runs[-1].runtime,
        statistics.median(m.prefill_ms for m in runs),
        statistics.median(m.decode_ms_per_token for m in runs),
        statistics.median(m.peak_rss_mb for m in runs),
        sum(m.repeats for m in runs),
        runs[-1].workload,
        runs[-1].fingerprint,
        runs[-1].settings,
    )


def paired_speedup(ref: list[float], other: list[float]) -> dict:
    """How much faster ``other`` is than ``ref`` (times per round, lower is faster), round by round: each
    ratio pairs two measurements taken moments apart. Median and range over the rounds."""
    ratios = [r / o for r, o in zip(ref, other, strict=True)]
    return {"median": statistics.median(ratios), "low": min(ratios), "high": max(ratios), "rounds": len(ratios)}
